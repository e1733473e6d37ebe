"""Functional proxy / classification losses: the weight tensor is an explicit argument and the
hyperparameters are keywords (same defaults as the loss classes).

Each function validates its inputs, casts the weight to the embeddings' dtype/device
(differentiably) and returns the reduced loss, exactly what the matching ``dmlkern.losses``
class returns for that weight (without weight/embedding regularizers). ``indices_tuple``
(pairs or triplets from a miner) turns into per-sample miner weights; ``distance`` and
``reducer`` override the defaults. The maths lives in ``dmlkern.reference.classification_losses``.

Weight layouts: ``proxies`` (C, D); ``W`` (D, C) (SubCenterArcFace: (D, C*K)); ``fc`` (D, C*K);
``centers`` (C, D).
"""

from ..reference import classification_losses as _ref

__all__ = [
    "proxy_nca_loss",
    "proxy_anchor_loss",
    "soft_triple_loss",
    "large_margin_softmax_loss",
    "sphereface_loss",
    "cosface_loss",
    "arcface_loss",
    "subcenter_arcface_loss",
    "normalized_softmax_loss",
    "center_loss",
    "center_loss_update",
    "softmax_loss",
]


def proxy_nca_loss(embeddings, labels, proxies, indices_tuple=None, *, softmax_scale=1, distance=None, reducer=None):
    """ProxyNCALoss. Default distance: normalised squared Euclidean."""
    return _ref.proxy_nca_loss(
        embeddings, labels, proxies, indices_tuple, softmax_scale=softmax_scale, distance=distance, reducer=reducer
    )


def proxy_anchor_loss(
    embeddings, labels, proxies, indices_tuple=None, *, margin=0.1, alpha=32, distance=None, reducer=None
):
    """ProxyAnchorLoss (pos/neg sub-losses, DivisorReducer, CosineSimilarity)."""
    return _ref.proxy_anchor_loss(
        embeddings, labels, proxies, indices_tuple, margin=margin, alpha=alpha, distance=distance, reducer=reducer
    )


def soft_triple_loss(
    embeddings, labels, fc, indices_tuple=None, *, num_classes, centers_per_class=10, la=20, gamma=0.1,
    margin=0.01, distance=None, reducer=None,
):
    """SoftTripleLoss; ``fc`` (D, num_classes * centers_per_class); ``gamma`` as the constructor's."""
    return _ref.soft_triple_loss(
        embeddings, labels, fc, indices_tuple, num_classes=num_classes, centers_per_class=centers_per_class,
        la=la, gamma=gamma, margin=margin, distance=distance, reducer=reducer,
    )


def large_margin_softmax_loss(embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance=None, reducer=None):
    """LargeMarginSoftmaxLoss (integer margin m)."""
    return _ref.large_margin_softmax_loss(
        embeddings, labels, W, indices_tuple, margin=margin, scale=scale, distance=distance, reducer=reducer
    )


def sphereface_loss(embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance=None, reducer=None):
    """SphereFaceLoss."""
    return _ref.sphereface_loss(
        embeddings, labels, W, indices_tuple, margin=margin, scale=scale, distance=distance, reducer=reducer
    )


def cosface_loss(embeddings, labels, W, indices_tuple=None, *, margin=0.35, scale=64, distance=None, reducer=None):
    """CosFaceLoss."""
    return _ref.cosface_loss(
        embeddings, labels, W, indices_tuple, margin=margin, scale=scale, distance=distance, reducer=reducer
    )


def arcface_loss(embeddings, labels, W, indices_tuple=None, *, margin=28.6, scale=64, distance=None, reducer=None):
    """ArcFaceLoss; ``margin`` in degrees."""
    return _ref.arcface_loss(
        embeddings, labels, W, indices_tuple, margin=margin, scale=scale, distance=distance, reducer=reducer
    )


def subcenter_arcface_loss(
    embeddings, labels, W, indices_tuple=None, *, num_classes, sub_centers=3, margin=28.6, scale=64,
    distance=None, reducer=None,
):
    """SubCenterArcFaceLoss; ``W`` (D, num_classes * sub_centers); ``margin`` in degrees."""
    return _ref.subcenter_arcface_loss(
        embeddings, labels, W, indices_tuple, num_classes=num_classes, sub_centers=sub_centers, margin=margin,
        scale=scale, distance=distance, reducer=reducer,
    )


def normalized_softmax_loss(embeddings, labels, W, indices_tuple=None, *, temperature=0.05, distance=None, reducer=None):
    """NormalizedSoftmaxLoss."""
    return _ref.normalized_softmax_loss(
        embeddings, labels, W, indices_tuple, temperature=temperature, distance=distance, reducer=reducer
    )


def center_loss(embeddings, labels, centers, indices_tuple=None, *, reducer=None):
    """CenterLoss's value, ``mean_i 0.5 ||x_i - c_{y_i}||^2`` (no center update)."""
    return _ref.center_loss(embeddings, labels, centers, indices_tuple, reducer=reducer)


def center_loss_update(centers, embeddings, labels, *, alpha=0.5):
    """The centers after one CenterLoss update step (a new tensor; no gradient)."""
    return _ref.center_loss_update(centers, embeddings, labels, alpha)


def softmax_loss(embeddings, labels, W, indices_tuple=None, *, reducer=None):
    """SoftmaxLoss: ``mean_i CE(x_i W, y_i)``."""
    return _ref.softmax_loss(embeddings, labels, W, indices_tuple, reducer=reducer)
