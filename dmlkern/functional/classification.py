"""Functional proxy / classification losses: the weight tensor is an explicit argument and the
hyperparameters are keywords (same defaults as the loss classes).

Each function is generated from its ``dmlkern.losses`` class (``_from_module.make_function``): it
casts the weight to the embeddings' dtype/device (differentiably, never in place), runs the module
with that weight (``torch.func.functional_call``: the same dispatcher, so ProxyAnchor runs the
fused engine as the module does) and returns the reduced loss, exactly what the class returns for
that weight (without weight/embedding regularizers). ``indices_tuple`` (pairs or triplets from a
miner) turns into per-sample miner weights; ``distance`` and ``reducer`` override the defaults.

Weight layouts: ``proxies`` (C, D); ``W`` (D, C) (SubCenterArcFace: (D, C*K)); ``fc`` (D, C*K);
``centers`` (C, D).
"""

from .. import losses as _L
from ..reference import classification_losses as _ref
from ._from_module import make_function

_PROXIES = {"num_classes": 0, "embedding_size": 1}  # constructor sizes read from a (C, D) weight
_W = {"num_classes": 1, "embedding_size": 0}  # from a (D, C) weight
_D_ONLY = {"embedding_size": 0}  # (D, C*K): num_classes stays a required keyword

_NOT_TAKEN = {"center_loss": ("alpha",)}  # the centers' update rate: a function updates nothing

# name -> (loss class, weight argument, sizes from the weight, extra keywords, summary)
_FUNCTIONS = {
    "proxy_nca_loss": (_L.ProxyNCALoss, "proxies", _PROXIES, ("distance", "reducer"),
                       "ProxyNCALoss. Default distance: normalised squared Euclidean."),
    "proxy_anchor_loss": (_L.ProxyAnchorLoss, "proxies", _PROXIES, ("distance", "reducer"),
                          "ProxyAnchorLoss (pos/neg sub-losses, DivisorReducer, CosineSimilarity)."),
    "soft_triple_loss": (_L.SoftTripleLoss, "fc", _D_ONLY, ("distance", "reducer"),
                         "SoftTripleLoss; ``fc`` (D, num_classes * centers_per_class)."),
    "large_margin_softmax_loss": (_L.LargeMarginSoftmaxLoss, "W", _W, ("distance", "reducer"),
                                  "LargeMarginSoftmaxLoss (integer margin m)."),
    "sphereface_loss": (_L.SphereFaceLoss, "W", _W, ("distance", "reducer"), "SphereFaceLoss."),
    "cosface_loss": (_L.CosFaceLoss, "W", _W, ("distance", "reducer"), "CosFaceLoss."),
    "arcface_loss": (_L.ArcFaceLoss, "W", _W, ("distance", "reducer"), "ArcFaceLoss; ``margin`` in degrees."),
    "subcenter_arcface_loss": (_L.SubCenterArcFaceLoss, "W", _D_ONLY, ("distance", "reducer"),
                               "SubCenterArcFaceLoss; ``W`` (D, num_classes * sub_centers); ``margin`` in degrees."),
    "normalized_softmax_loss": (_L.NormalizedSoftmaxLoss, "W", _W, ("distance", "reducer"),
                                "NormalizedSoftmaxLoss."),
    "center_loss": (_L.CenterLoss, "centers", _PROXIES, ("reducer",),
                    "CenterLoss's value, ``mean_i 0.5 ||x_i - c_{y_i}||^2`` (no center update)."),
    "softmax_loss": (_L.SoftmaxLoss, "W", _W, ("reducer",), "SoftmaxLoss: ``mean_i CE(x_i W, y_i)``."),
}

__all__ = list(_FUNCTIONS)
__all__.insert(__all__.index("center_loss") + 1, "center_loss_update")

for _name, (_cls, _weight, _dims, _extra, _note) in _FUNCTIONS.items():
    globals()[_name] = make_function(_name, _cls, _note, weight=_weight, weight_dims=_dims, extra_keywords=_extra,
                                     module_name=__name__, not_taken=_NOT_TAKEN.get(_name, ()))
del _name, _cls, _weight, _dims, _extra, _note


def center_loss_update(centers, embeddings, labels, *, alpha=0.5):
    """The centers after one CenterLoss update step (a new tensor; no gradient)."""
    return _ref.center_loss_update(centers, embeddings, labels, alpha)
