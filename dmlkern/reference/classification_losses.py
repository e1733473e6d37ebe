"""Reference (pure PyTorch) proxy and classification losses with PML 2.9.0 semantics, plus
CenterLoss and SoftmaxLoss (not in PML).

Every loss has two functions, taking the weight tensor explicitly:

* ``<name>_loss_dict(embeddings, labels, <weight>, indices_tuple, *, <params>, distance)``: the
  maths, on prepared inputs; returns PML's loss dict
  ``{sub_loss: {"losses", "indices", "reduction_type"[, "divisor"]}}``. The loss classes in
  ``dmlkern.losses`` call these with their parameter.
* ``<name>_loss(embeddings, labels, <weight>, indices_tuple=None, *, <params>, distance=None,
  reducer=None)``: validates the inputs, casts the weight to the embeddings' dtype, builds the
  dict and reduces it with the loss's default reducer (or ``reducer``): the value the loss
  module returns.

Weight layouts (as in PML): ``proxies`` (C, D) for ProxyNCA / ProxyAnchor; ``W`` (D, C) for the
large-margin family, NormalizedSoftmax and Softmax (SubCenterArcFace: (D, C*K), column
``c*K + k`` is sub-center k of class c); ``fc`` (D, C*K) for SoftTriple; ``centers`` (C, D) for
CenterLoss.

Miner weights: a per-sample weight from ``indices_tuple`` (``convert_to_weights``: occurrence
count / max count; 0 for samples absent from the tuple; all ones without a tuple) multiplies
each sample's loss; absent samples still count in the mean's denominator. ProxyNCA counts only
anchors; ProxyAnchor adds ``weight - 1`` inside the exponent instead of multiplying.

Deviation from PML: ProxyNCA returns the grad-carrying zero when no sample has a non-zero
positive probability (PML: NaN, the mean of an empty tensor).
"""

import math

import torch
import torch.nn.functional as F

from .._determinism import softmax
from .._validation import InvalidInputError, prepare_inputs
from ..distances import CosineSimilarity, DotProductSimilarity, LpDistance, matmul_t
from ..reducers import DivisorReducer, MeanReducer, resolve_reducer
from .indices import convert_to_weights, logsumexp

__all__ = [
    "proxy_nca_loss_dict",
    "proxy_nca_loss",
    "proxy_anchor_loss_dict",
    "proxy_anchor_loss",
    "soft_triple_logits",
    "soft_triple_loss_dict",
    "soft_triple_loss",
    "multiple_angle_cosine",
    "large_margin_softmax_loss_dict",
    "large_margin_softmax_loss",
    "sphereface_loss_dict",
    "sphereface_loss",
    "cosface_loss_dict",
    "cosface_loss",
    "arcface_target_logit",
    "arcface_loss_dict",
    "arcface_loss",
    "subcenter_cosine",
    "subcenter_arcface_loss_dict",
    "subcenter_arcface_loss",
    "normalized_softmax_logits",
    "normalized_softmax_loss_dict",
    "normalized_softmax_loss",
    "center_loss_dict",
    "center_loss",
    "center_loss_update",
    "center_loss_update_",
    "softmax_loss_dict",
    "softmax_loss",
]

PROXY_ANCHOR_SUB_LOSSES = ["pos_loss", "neg_loss"]


# =============================================================================== helpers
def _zero_entry():
    return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def _element(losses, indices):
    return {"losses": losses, "indices": indices, "reduction_type": "element"}


def _rows(x):
    return torch.arange(x.shape[0], device=x.device)


def _prepare(embeddings, labels, indices_tuple, weight, label_kind="indices"):
    """label_kind: labels index the class weights, or (ProxyNCA) are compared with the class ids."""
    embeddings, labels, indices_tuple, _, _ = prepare_inputs(
        embeddings, labels, indices_tuple, None, None, labels_required=True, label_kind=label_kind
    )
    if weight is not None:
        weight = weight.to(device=embeddings.device, dtype=embeddings.dtype)
    return embeddings, labels, indices_tuple, weight


def _reduce(loss_dict, reducer, default_factory, sub_loss_names, embeddings, labels):
    return resolve_reducer(reducer, sub_loss_names, default_factory)(loss_dict, embeddings, labels)


def _require_cosine(loss_name, distance):
    if not isinstance(distance, CosineSimilarity) and "CosineSimilarity" not in {
        c.__name__ for c in type(distance).__mro__
    }:
        raise InvalidInputError(f"{loss_name} requires the distance metric to be CosineSimilarity")


def _target_mask(labels, num_classes, dtype):
    """(B, C) float mask with a 1 at each sample's class."""
    mask = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    mask[torch.arange(labels.shape[0], device=labels.device), labels] = 1
    return mask


def _replace_target_logit(cosine, mask, new_target):
    """``cosine`` with each row's target entry t replaced by ``new_target(t)`` (one per row; the
    targets gathered once: the boolean mask that indexing saves for backward is PML's one)."""
    target = cosine[mask == 1]
    return cosine + mask * (new_target(target) - target).unsqueeze(1)


def _weighted_ce(logits, labels, miner_weights):
    return F.cross_entropy(logits, labels, reduction="none") * miner_weights


# =============================================================================== ProxyNCA
def proxy_nca_loss_dict(embeddings, labels, proxies, indices_tuple=None, *, softmax_scale=1, distance,
                        empty_entry=False, zero_on_graph=False):
    """NCA against class proxies (Movshovitz-Attias et al. 2017, as PML codes it):

        loss_i = -log softmax_j(scale * s(x_i, proxy_j))[y_i] * w_i

    with ``s = -d`` for a distance (default: squared normalised Euclidean). The softmax
    denominator includes the positive proxy. ``w_i`` counts anchors only. Samples whose
    probability underflows to 0 (or whose label has no proxy) are dropped; if all are, the loss
    is the grad-carrying zero (PML's mean of nothing is NaN), on the probabilities' graph with
    zero_on_graph (where PML's reducer answers there: the proxies' gradient is zeros), or with
    empty_entry (the dict reaches the user: DoNothingReducer) PML's empty entry.
    """
    dtype = embeddings.dtype
    weights = convert_to_weights(indices_tuple, labels, dtype=dtype, using_ref=True)
    mat = distance(embeddings, proxies)
    if not distance.is_inverted:
        mat = -mat
    proxy_labels = torch.arange(proxies.shape[0], device=labels.device)
    same = (labels.unsqueeze(1) == proxy_labels.unsqueeze(0)).to(dtype)
    prob_pos = torch.sum(softmax(softmax_scale * mat, dim=1) * same, dim=1)
    kept = prob_pos != 0
    if not (empty_entry or bool(kept.any())):
        if zero_on_graph:  # every probability is exactly 0: so is their sum
            return {"loss": {"losses": prob_pos.sum(), "indices": None, "reduction_type": "already_reduced"}}
        return {"loss": _zero_entry()}
    losses = -torch.log(prob_pos[kept]) * weights[kept]
    return {"loss": _element(losses, _rows(embeddings)[kept])}


def proxy_nca_loss(
    embeddings, labels, proxies, indices_tuple=None, *, softmax_scale=1, distance=None, reducer=None
):
    embeddings, labels, indices_tuple, proxies = _prepare(embeddings, labels, indices_tuple, proxies, "class_ids")
    distance = LpDistance(power=2) if distance is None else distance
    d = proxy_nca_loss_dict(
        embeddings, labels, proxies, indices_tuple, softmax_scale=softmax_scale, distance=distance
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== ProxyAnchor
def proxy_anchor_loss_dict(embeddings, labels, proxies, indices_tuple=None, *, margin=0.1, alpha=32, distance):
    """Proxy-Anchor loss (Kim et al. 2020). With s = cosine(x_i, proxy_c), w_i the miner weight:

        pos_loss[c] = log(1 + sum_{i: y_i = c}  exp(-alpha (s_ic - margin) + w_i - 1))
        neg_loss[c] = log(1 + sum_{i: y_i != c} exp( alpha (s_ic + margin) + w_i - 1))

    (``distance.margin`` mirrors the signs for a distance). pos_loss is summed and divided by
    the number of proxies with a positive in the batch, neg_loss by the number of classes.
    """
    num_classes = proxies.shape[0]
    dtype = embeddings.dtype
    w = convert_to_weights(indices_tuple, labels, dtype=dtype).unsqueeze(1) - 1
    cos = distance(embeddings, proxies)
    pos_mask = F.one_hot(labels, num_classes)
    neg_mask = 1 - pos_mask
    num_with_pos = int((pos_mask.sum(dim=0) != 0).sum())
    pos_exp = distance.margin(cos, margin)
    neg_exp = distance.margin(-margin, cos)
    pos_term = logsumexp(alpha * pos_exp + w, keep_mask=pos_mask.bool(), add_one=True, dim=0)
    neg_term = logsumexp(alpha * neg_exp + w, keep_mask=neg_mask.bool(), add_one=True, dim=0)
    idx = _rows(proxies)
    return {
        "pos_loss": {**_element(pos_term.squeeze(0), idx), "divisor": num_with_pos},
        "neg_loss": {**_element(neg_term.squeeze(0), idx), "divisor": num_classes},
    }


def proxy_anchor_loss(
    embeddings, labels, proxies, indices_tuple=None, *, margin=0.1, alpha=32, distance=None, reducer=None
):
    embeddings, labels, indices_tuple, proxies = _prepare(embeddings, labels, indices_tuple, proxies)
    distance = CosineSimilarity() if distance is None else distance
    d = proxy_anchor_loss_dict(
        embeddings, labels, proxies, indices_tuple, margin=margin, alpha=alpha, distance=distance
    )
    return _reduce(d, reducer, DivisorReducer, PROXY_ANCHOR_SUB_LOSSES, embeddings, labels)


# =============================================================================== SoftTriple
def soft_triple_logits(embeddings, fc, *, num_classes, centers_per_class, gamma=0.1, distance):
    """Relaxed class similarity S_ic = sum_k softmax_k(s_ick / gamma) * s_ick over the class's K
    centers (``fc`` (D, C*K), column c*K + k)."""
    sim = distance(embeddings, fc.t()).view(-1, num_classes, centers_per_class)
    prob = softmax(sim * (1.0 / gamma), dim=2)
    return torch.sum(prob * sim, dim=2)


def soft_triple_loss_dict(
    embeddings, labels, fc, indices_tuple=None, *, num_classes, centers_per_class,
    la=20, gamma=0.1, margin=0.01, distance,
):
    """SoftTriple (Qian et al. 2019): ``CE(la * (S - margin * onehot(y)), y) * w_i``. The paper's
    center regulariser is not built in (use a weight regularizer on ``fc.t()``)."""
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    S = soft_triple_logits(
        embeddings, fc, num_classes=num_classes, centers_per_class=centers_per_class, gamma=gamma, distance=distance
    )
    m = torch.zeros_like(S)
    m[torch.arange(S.shape[0], device=S.device), labels] = margin
    losses = _weighted_ce(la * (S - m), labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def soft_triple_loss(
    embeddings, labels, fc, indices_tuple=None, *, num_classes, centers_per_class=10,
    la=20, gamma=0.1, margin=0.01, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, fc = _prepare(embeddings, labels, indices_tuple, fc)
    distance = CosineSimilarity() if distance is None else distance
    if not distance.is_inverted:
        raise InvalidInputError("SoftTripleLoss requires a similarity (distance.is_inverted)")
    d = soft_triple_loss_dict(
        embeddings, labels, fc, indices_tuple, num_classes=num_classes, centers_per_class=centers_per_class,
        la=la, gamma=gamma, margin=margin, distance=distance,
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== Large-margin family
def multiple_angle_cosine(cosine, m):
    """cos(m * theta) from c = cos(theta) (multiple-angle formula, Eq. 7 of Liu et al. 2016):

        cos(m theta) = sum_{n=0}^{floor(m/2)} (-1)^n C(m, 2n) c^(m-2n) (1 - c^2)^n
    """
    n = torch.arange(0, m // 2 + 1, device=cosine.device).to(cosine.dtype)
    binom = torch.tensor([math.comb(m, 2 * int(i)) for i in range(m // 2 + 1)], dtype=cosine.dtype, device=cosine.device)
    sign = torch.tensor([(-1) ** i for i in range(m // 2 + 1)], dtype=cosine.dtype, device=cosine.device)
    c = cosine.unsqueeze(1)
    terms = sign * binom * c ** (m - 2 * n) * (1 - c**2) ** n
    return torch.sum(terms, dim=1)


def _lm_target(cos_t, m):
    """psi(theta) = (-1)^k cos(m theta) - 2k, k = floor(theta / (pi / m)) (k is not differentiated)."""
    cos_m = multiple_angle_cosine(cos_t, m)
    with torch.no_grad():
        k = (torch.acos(torch.clamp(cos_t, -1, 1)) / (math.pi / m)).floor()
    return ((-1) ** k) * cos_m - 2 * k


def large_margin_softmax_loss_dict(embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance):
    """L-Softmax (Liu et al. 2016): the target cosine becomes psi(theta) (see ``_lm_target``,
    integer margin m); logits are multiplied by ``||W_j|| * ||x_i|| * scale``; cross-entropy."""
    m = int(margin)
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    cos = distance(embeddings, W.t())
    mask = _target_mask(labels, W.shape[1], cos.dtype)
    logits = _replace_target_logit(cos, mask, lambda t: _lm_target(t, m))
    magnitudes = distance.get_norm(W, dim=0).unsqueeze(0) * distance.get_norm(embeddings).unsqueeze(1)
    losses = _weighted_ce(logits * magnitudes * scale, labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def sphereface_loss_dict(embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance):
    """SphereFace / A-Softmax (Liu et al. 2017): L-Softmax's psi, logits scaled by
    ``||x_i||_2 * scale`` only (the class weights' norms are ignored)."""
    m = int(margin)
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    cos = distance(embeddings, W.t())
    mask = _target_mask(labels, W.shape[1], cos.dtype)
    logits = _replace_target_logit(cos, mask, lambda t: _lm_target(t, m))
    norms = torch.norm(embeddings, p=2, dim=1).unsqueeze(1)
    losses = _weighted_ce(logits * norms * scale, labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def cosface_loss_dict(embeddings, labels, W, indices_tuple=None, *, margin=0.35, scale=64, distance):
    """CosFace / AM-Softmax (Wang et al. 2018): ``CE(scale * (cos - margin * onehot(y)), y)``."""
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    cos = distance(embeddings, W.t())
    mask = _target_mask(labels, W.shape[1], cos.dtype)
    logits = _replace_target_logit(cos, mask, lambda t: t - margin)
    logits = logits * scale  # (rebound: the unscaled logits are freed before the softmax, as in PML)
    losses = _weighted_ce(logits, labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def arcface_target_logit(cos_t, margin_radians):
    """ArcFace target: cos(theta + m) when theta <= pi - m, else cos(theta) - m sin(m)
    (keeps the logit decreasing in theta); theta = acos(clamp(cos, -1, 1))."""
    theta = torch.acos(torch.clamp(cos_t, -1, 1))
    return torch.where(
        theta <= math.pi - margin_radians,
        torch.cos(theta + margin_radians),
        torch.cos(theta) - margin_radians * math.sin(margin_radians),
    )


def _arcface_from_cosine(embeddings, labels, cos, num_classes, indices_tuple, margin_radians, scale):
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    mask = _target_mask(labels, num_classes, cos.dtype)
    logits = _replace_target_logit(cos, mask, lambda t: arcface_target_logit(t, margin_radians))
    logits = logits * scale  # (rebound: the unscaled logits are freed before the softmax, as in PML)
    losses = _weighted_ce(logits, labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def arcface_loss_dict(embeddings, labels, W, indices_tuple=None, *, margin_radians=math.radians(28.6), scale=64, distance):
    """ArcFace (Deng et al. 2019): ``CE(scale * logits, y)`` with the target cosine replaced by
    ``arcface_target_logit`` (additive angular margin, in radians here)."""
    cos = distance(embeddings, W.t())
    return _arcface_from_cosine(embeddings, labels, cos, W.shape[1], indices_tuple, margin_radians, scale)


def subcenter_cosine(embeddings, W, *, num_classes, sub_centers, distance):
    """Per class, the largest cosine over its K sub-centers (``W`` (D, C*K))."""
    cos = distance(embeddings, W.t()).view(-1, num_classes, sub_centers)
    return cos.max(dim=2)[0]


def subcenter_arcface_loss_dict(
    embeddings, labels, W, indices_tuple=None, *, num_classes, sub_centers=3,
    margin_radians=math.radians(28.6), scale=64, distance,
):
    """Sub-center ArcFace (Deng et al. 2020): ArcFace on the per-class max over sub-centers."""
    cos = subcenter_cosine(embeddings, W, num_classes=num_classes, sub_centers=sub_centers, distance=distance)
    return _arcface_from_cosine(embeddings, labels, cos, num_classes, indices_tuple, margin_radians, scale)


def _margin_family(dict_fn, loss_name, embeddings, labels, W, indices_tuple, distance, reducer, **params):
    embeddings, labels, indices_tuple, W = _prepare(embeddings, labels, indices_tuple, W)
    distance = CosineSimilarity() if distance is None else distance
    _require_cosine(loss_name, distance)
    d = dict_fn(embeddings, labels, W, indices_tuple, distance=distance, **params)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


def large_margin_softmax_loss(
    embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance=None, reducer=None
):
    return _margin_family(
        large_margin_softmax_loss_dict, "LargeMarginSoftmaxLoss", embeddings, labels, W, indices_tuple,
        distance, reducer, margin=margin, scale=scale,
    )


def sphereface_loss(embeddings, labels, W, indices_tuple=None, *, margin=4, scale=1, distance=None, reducer=None):
    return _margin_family(
        sphereface_loss_dict, "SphereFaceLoss", embeddings, labels, W, indices_tuple,
        distance, reducer, margin=margin, scale=scale,
    )


def cosface_loss(embeddings, labels, W, indices_tuple=None, *, margin=0.35, scale=64, distance=None, reducer=None):
    return _margin_family(
        cosface_loss_dict, "CosFaceLoss", embeddings, labels, W, indices_tuple,
        distance, reducer, margin=margin, scale=scale,
    )


def arcface_loss(embeddings, labels, W, indices_tuple=None, *, margin=28.6, scale=64, distance=None, reducer=None):
    """``margin`` in degrees, as ArcFaceLoss's constructor."""
    return _margin_family(
        arcface_loss_dict, "ArcFaceLoss", embeddings, labels, W, indices_tuple,
        distance, reducer, margin_radians=math.radians(margin), scale=scale,
    )


def subcenter_arcface_loss(
    embeddings, labels, W, indices_tuple=None, *, num_classes, sub_centers=3, margin=28.6, scale=64,
    distance=None, reducer=None,
):
    """``margin`` in degrees; ``W`` is (D, num_classes * sub_centers)."""
    return _margin_family(
        subcenter_arcface_loss_dict, "SubCenterArcFaceLoss", embeddings, labels, W, indices_tuple,
        distance, reducer, num_classes=num_classes, sub_centers=sub_centers,
        margin_radians=math.radians(margin), scale=scale,
    )


# =============================================================================== NormalizedSoftmax
def normalized_softmax_logits(embeddings, W, *, temperature=0.05, distance):
    """``s(x_i, W_j / ||W_j||) / T`` (negated for a distance)."""
    logits = distance(embeddings, distance.normalize(W, dim=0).t()) / temperature
    return logits if distance.is_inverted else -logits


def normalized_softmax_loss_dict(embeddings, labels, W, indices_tuple=None, *, temperature=0.05, distance):
    """NormSoftmax (Zhai & Wu 2018): ``CE(x_hat . W_hat / T, y) * w_i``."""
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    logits = normalized_softmax_logits(embeddings, W, temperature=temperature, distance=distance)
    return {"loss": _element(_weighted_ce(logits, labels, weights), _rows(embeddings))}


def normalized_softmax_loss(
    embeddings, labels, W, indices_tuple=None, *, temperature=0.05, distance=None, reducer=None
):
    embeddings, labels, indices_tuple, W = _prepare(embeddings, labels, indices_tuple, W)
    distance = DotProductSimilarity() if distance is None else distance
    d = normalized_softmax_loss_dict(embeddings, labels, W, indices_tuple, temperature=temperature, distance=distance)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== CenterLoss
def center_loss_dict(embeddings, labels, centers, indices_tuple=None):
    """Center loss (Wen et al. 2016): ``0.5 * ||x_i - c_{y_i}||^2 * w_i`` per sample (raw,
    un-normalised embeddings; the centers get no gradient)."""
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    diff = embeddings - centers.detach()[labels]
    losses = 0.5 * torch.sum(diff * diff, dim=1) * weights
    return {"loss": _element(losses, _rows(embeddings))}


def center_loss_update(centers, embeddings, labels, alpha=0.5):
    """One center update of Wen et al. 2016 (their Eq. 4), returned as a new tensor:

        delta_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j]);   c_j <- c_j - alpha * delta_j
    """
    updated = centers.detach().clone()
    center_loss_update_(updated, embeddings, labels, alpha)
    return updated


def center_loss_update_(centers, embeddings, labels, alpha=0.5):
    """center_loss_update in place, in O(N D): only the batch's classes move (delta_j = 0 for the
    others), so no C x D temporary is made."""
    with torch.no_grad():
        classes, slot = torch.unique(labels, return_inverse=True)
        x = embeddings.detach().to(centers.dtype)
        counts = torch.bincount(slot, minlength=len(classes)).to(centers.dtype).unsqueeze(1)
        sum_x = x.new_zeros(len(classes), x.shape[1]).index_add_(0, slot, x)
        present = centers.index_select(0, classes)
        delta = (counts * present - sum_x) / (1 + counts)
        centers.index_copy_(0, classes, present - alpha * delta)


def center_loss(embeddings, labels, centers, indices_tuple=None, *, reducer=None):
    """The loss only (no center update; see ``center_loss_update``)."""
    embeddings, labels, indices_tuple, centers = _prepare(embeddings, labels, indices_tuple, centers)
    d = center_loss_dict(embeddings, labels, centers, indices_tuple)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== Softmax
def softmax_loss_dict(embeddings, labels, W, indices_tuple=None):
    """Plain softmax cross-entropy on a bias-free linear classifier: ``CE(x W, y) * w_i``."""
    weights = convert_to_weights(indices_tuple, labels, dtype=embeddings.dtype)
    losses = _weighted_ce(matmul_t(embeddings, W.t()), labels, weights)
    return {"loss": _element(losses, _rows(embeddings))}


def softmax_loss(embeddings, labels, W, indices_tuple=None, *, reducer=None):
    embeddings, labels, indices_tuple, W = _prepare(embeddings, labels, indices_tuple, W)
    d = softmax_loss_dict(embeddings, labels, W, indices_tuple)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)
