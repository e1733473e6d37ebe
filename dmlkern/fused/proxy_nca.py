"""ProxyNCA on the class path (class_softmax.py): the proxies are the classes, the softmax
includes the positive proxy, as PML codes it. Default distance, the squared Euclidean distance
of unit rows: logit = -scale * d^2 = 2 * scale * <x_hat, p_hat> - 2 * scale; CosineSimilarity:
scale * <x_hat, p_hat>."""
from .. import distances as dist
from ._common import is_unit_cosine
from .class_softmax import ClassLayout
from .margin_softmax import _fused


def _is_unit_squared_euclidean(distance):
    return (type(distance) is dist.LpDistance and distance.normalize_embeddings and distance.p == 2
            and distance.power == 2 and not distance.is_inverted)


def _supported(distance):
    return _is_unit_squared_euclidean(distance) or is_unit_cosine(distance)


def proxy_nca(module, embeddings, labels, indices_tuple):
    s = float(module.softmax_scale)
    euclidean = _is_unit_squared_euclidean(module.distance)
    sc, off = (2 * s, -2 * s) if euclidean else (s, 0.0)
    return _fused(module, embeddings, labels, indices_tuple, module.proxies,
                  ClassLayout(columns=False, num_classes=module.proxies.shape[0]), distance_ok=_supported,
                  unit_x=True, unit_w=True, scale=sc, offset=off, target_logit=lambda x, w, cos: sc * cos + off,
                  using_ref=True, drop_zero_probability=True, cdist=euclidean)
