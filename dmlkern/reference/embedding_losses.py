"""Reference (pure PyTorch, materialising) embedding losses with PML 2.9.0 semantics.

Every loss has two functions:

* ``<name>_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, <params>,
  distance)``: the maths. Takes already prepared inputs (see ``dmlkern._validation.prepare_inputs``:
  ``ref_emb``/``ref_labels`` are the batch itself when absent) and returns PML's loss dict
  ``{sub_loss_name: {"losses", "indices", "reduction_type"[, "divisor"]}}``. The loss classes in
  ``dmlkern.losses`` call these.
* ``<name>_loss(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
  <params>, distance=None, reducer=None)``: validates and prepares the inputs, calls the dict
  function and reduces it with the loss's default reducer (or ``reducer``), returning exactly
  what the PML loss module returns.

Conventions: ``mat`` is the (B, M) distance/similarity matrix between queries and references;
"pairs" ``(a1, p, a2, n)`` index (query row, ref row); "all pairs" from labels exclude the
diagonal only when the references are the batch itself. ``distance.margin(x, y)`` is ``x - y``
for a distance and ``y - x`` for a similarity, which is how every formula below is written for
both kinds.

Deviations from PML (documented; everywhere else the values and gradients match):

* NCA with no row that has a positive returns the grad-carrying zero (PML: NaN, the mean of an
  empty tensor).
* TupletMargin clamps the cosine to [-1, 1] before ``acos`` (PML gives NaN for a cosine that
  rounding pushed above 1; values are unchanged elsewhere).
* Distance-type requirements (Tuplet, Circle: CosineSimilarity; Angular: normalised
  LpDistance(p=2, power=1)) and the "pair is both positive and negative" check raise
  ``InvalidInputError`` (a ValueError that is also an AssertionError; PML asserts).
"""

import math

import torch
import torch.nn.functional as F

from .._validation import InvalidInputError, prepare_inputs
from ..distances import CosineSimilarity, DotProductSimilarity, LpDistance
from ..reducers import AvgNonZeroReducer, DivisorReducer, MeanReducer, resolve_reducer
from .indices import (
    convert_to_pairs,
    convert_to_pos_pairs_with_unique_labels,
    convert_to_triplets,
    convert_to_weights,
    logsumexp,
    neg_inf,
    small_val,
)

__all__ = [
    "contrastive_loss",
    "triplet_margin_loss",
    "margin_loss",
    "multi_similarity_loss",
    "lifted_structure_loss",
    "generalized_lifted_structure_loss",
    "n_pairs_loss",
    "ntxent_loss",
    "supcon_loss",
    "tuplet_margin_loss",
    "angular_loss",
    "nca_loss",
    "circle_loss",
    "contrastive_loss_dict",
    "triplet_margin_loss_dict",
    "margin_loss_dict",
    "multi_similarity_loss_dict",
    "lifted_structure_loss_dict",
    "generalized_lifted_structure_loss_dict",
    "n_pairs_loss_dict",
    "ntxent_loss_dict",
    "supcon_loss_dict",
    "tuplet_margin_loss_dict",
    "angular_loss_dict",
    "nca_loss_dict",
    "circle_loss_dict",
]

CONTRASTIVE_SUB_LOSSES = ["pos_loss", "neg_loss"]
MARGIN_SUB_LOSSES = ["margin_loss", "beta_reg_loss"]


# =============================================================================== helpers
def _zero_entry():
    """PML's ``zero_loss()``: reduces to ``torch.sum(embeddings * 0)``."""
    return {"losses": 0, "indices": None, "reduction_type": "already_reduced"}


def _zeros(names=("loss",)):
    return {k: _zero_entry() for k in names}


def _entry(losses, indices, reduction_type, **extra):
    d = {"losses": losses, "indices": indices, "reduction_type": reduction_type}
    d.update(extra)
    return d


def _rows(x):
    return torch.arange(x.shape[0], device=x.device)


def _reduce(loss_dict, reducer, default_factory, sub_loss_names, embeddings, labels):
    red = resolve_reducer(reducer, sub_loss_names, default_factory)
    return red(loss_dict, embeddings, labels)


def _class_names(obj):
    return {c.__name__ for c in type(obj).__mro__}


def require_distance(loss_name, distance, class_name, **attrs):
    """Raise unless ``distance`` is a ``class_name`` (ours or PML's) with the given attributes."""
    ok = class_name in _class_names(distance) and all(getattr(distance, k, None) == v for k, v in attrs.items())
    if not ok:
        want = class_name + ("(" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + ")" if attrs else "")
        raise InvalidInputError(f"{loss_name} requires the distance metric to be {want}, got {distance!r}")


def pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """PML's GenericPairLoss front half: pairs from the tuple (or all pairs from labels).

    Returns None when every index tensor has at most one entry (PML's ``len <= 1``
    short-circuit: the loss is then zero, even for one valid positive and one valid negative
    pair); otherwise ``(mat, (a1, p, a2, n))``.
    """
    pairs = convert_to_pairs(indices_tuple, labels, ref_labels)
    if all(len(x) <= 1 for x in pairs):
        return None
    return distance(embeddings, ref_emb), pairs


def pair_masks(mat, pairs):
    """0/1 masks (dtype of ``mat``) of the positive and negative pairs; duplicates collapse."""
    a1, p, a2, n = pairs
    pos_mask = torch.zeros_like(mat)
    neg_mask = torch.zeros_like(mat)
    pos_mask[a1, p] = 1
    neg_mask[a2, n] = 1
    if torch.any((pos_mask != 0) & (neg_mask != 0)):
        raise InvalidInputError("indices_tuple: each pair should be either positive or negative, not both")
    return pos_mask, neg_mask


# =============================================================================== Contrastive
def contrastive_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, pos_margin, neg_margin, distance):
    """pos: relu(margin(d_ap, pos_margin)); neg: relu(margin(neg_margin, d_an)); per pair."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros(CONTRASTIVE_SUB_LOSSES)
    mat, (a1, p, a2, n) = setup
    pos_loss = F.relu(distance.margin(mat[a1, p], pos_margin)) if len(a1) > 0 else 0
    neg_loss = F.relu(distance.margin(neg_margin, mat[a2, n])) if len(a2) > 0 else 0
    return {
        "pos_loss": _entry(pos_loss, (a1, p), "pos_pair"),
        "neg_loss": _entry(neg_loss, (a2, n), "neg_pair"),
    }


def contrastive_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    pos_margin=0, neg_margin=1, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = LpDistance(p=2) if distance is None else distance
    d = contrastive_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels,
        pos_margin=pos_margin, neg_margin=neg_margin, distance=distance,
    )
    return _reduce(d, reducer, AvgNonZeroReducer, CONTRASTIVE_SUB_LOSSES, embeddings, labels)


# =============================================================================== TripletMargin
def triplet_margin_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *,
    margin, swap, smooth_loss, triplets_per_anchor, distance,
):
    """relu (or softplus) of margin(d_ap, d_an) + margin, per triplet."""
    a, p, n = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=triplets_per_anchor)
    if len(a) == 0:
        return _zeros()
    mat = distance(embeddings, ref_emb)
    d_ap = mat[a, p]
    d_an = mat[a, n]
    if swap:
        # PML reads the positive-negative distance from the query x ref matrix, with the
        # positive's ref index used as a query row.
        if int(p.max()) >= mat.shape[0]:
            raise ValueError("TripletMarginLoss(swap=True): a positive index is not a valid embeddings row")
        d_an = distance.smallest_dist(d_an, mat[p, n])
    violation = distance.margin(d_ap, d_an) + margin
    losses = F.softplus(violation) if smooth_loss else F.relu(violation)
    return {"loss": _entry(losses, (a, p, n), "triplet")}


def triplet_margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = LpDistance(p=2) if distance is None else distance
    d = triplet_margin_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=margin, swap=swap,
        smooth_loss=smooth_loss, triplets_per_anchor=triplets_per_anchor, distance=distance,
    )
    return _reduce(d, reducer, AvgNonZeroReducer, ["loss"], embeddings, labels)


# =============================================================================== Margin
def make_margin_beta(beta, num_classes=None):
    """PML's beta: a float32 tensor of shape (1,), or (num_classes,) when num_classes is set."""
    b = torch.tensor([float(beta)])
    if num_classes:
        b = torch.ones(num_classes) * b
    return b


def margin_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *,
    margin, nu, beta, learn_beta, triplets_per_anchor, distance,
):
    """Per triplet: relu(margin(d_ap, b) + margin) + relu(margin(b, d_an) + margin), divided by
    the number of non-zero terms; ``b = beta`` (one value) or ``beta[labels[anchor]]``.

    ``beta_reg_loss`` (only when ``learn_beta``): ``b * nu``, already reduced for one beta,
    otherwise per anchor over the same divisor.
    """
    a, p, n = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor=triplets_per_anchor)
    if len(a) == 0:
        return _zeros(MARGIN_SUB_LOSSES)
    if len(beta) == 1:
        b = beta
    else:
        if labels is None:
            raise ValueError("MarginLoss with num_classes needs labels (beta is per class)")
        la = labels[a]
        if int(la.min()) < 0 or int(la.max()) >= len(beta):
            raise ValueError(f"labels must be in [0, num_classes={len(beta)}) for a per-class beta")
        b = beta[la.to(beta.device)]
    b = b.to(device=embeddings.device, dtype=embeddings.dtype)
    mat = distance(embeddings, ref_emb)
    pos_loss = F.relu(distance.margin(mat[a, p], b) + margin)
    neg_loss = F.relu(distance.margin(b, mat[a, n]) + margin)
    divisor = torch.sum(pos_loss > 0.0) + torch.sum(neg_loss > 0.0)
    out = {"margin_loss": _entry(pos_loss + neg_loss, (a, p, n), "triplet", divisor=divisor)}
    if learn_beta:
        reg = b * nu
        if len(beta) == 1:
            out["beta_reg_loss"] = _entry(reg, None, "already_reduced")
        else:
            out["beta_reg_loss"] = _entry(reg, a, "element", divisor=divisor)
    else:
        out["beta_reg_loss"] = _zero_entry()
    return out


def margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None,
    distance=None, reducer=None,
):
    """``beta`` may be a number (made into PML's tensor) or a tensor of shape (1,)/(C,)."""
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    if not torch.is_tensor(beta):
        beta = make_margin_beta(beta, num_classes)
    distance = LpDistance(p=2) if distance is None else distance
    d = margin_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=margin, nu=nu, beta=beta,
        learn_beta=learn_beta, triplets_per_anchor=triplets_per_anchor, distance=distance,
    )
    return _reduce(d, reducer, DivisorReducer, MARGIN_SUB_LOSSES, embeddings, labels)


# =============================================================================== MultiSimilarity
def multi_similarity_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, alpha, beta, base, distance):
    """Per row i: (1/alpha) log(1 + sum_p exp(alpha*margin(s_ip, base)))
    + (1/beta) log(1 + sum_n exp(beta*margin(base, s_in))); rows without pairs give 0."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pairs = setup
    pos_mask, neg_mask = pair_masks(mat, pairs)
    pos_term = (1.0 / alpha) * logsumexp(alpha * distance.margin(mat, base), keep_mask=pos_mask.bool(), add_one=True)
    neg_term = (1.0 / beta) * logsumexp(beta * distance.margin(base, mat), keep_mask=neg_mask.bool(), add_one=True)
    return {"loss": _entry(pos_term + neg_term, _rows(mat), "element")}


def multi_similarity_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    alpha=2, beta=50, base=0.5, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = CosineSimilarity() if distance is None else distance
    d = multi_similarity_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, alpha=alpha, beta=beta, base=base, distance=distance
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== LiftedStructure
def lifted_structure_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, neg_margin, pos_margin, distance):
    """Per positive pair (i, j): relu(logsumexp_{neg pairs anchored at i or j} margin(neg_margin,
    d_n) + margin(d_ij, pos_margin))^2 / 2. Negative pairs are matched by their anchor index
    equalling i or j (index values, as PML does, also when ref_emb is given)."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    if len(a1) == 0 or len(a2) == 0:
        return _zeros()
    pos_vals = mat[a1, p].unsqueeze(1)  # (P, 1)
    neg_vals = mat[a2, n]  # (N,)
    takes_neg = (a2.unsqueeze(0) == a1.unsqueeze(1)) | (a2.unsqueeze(0) == p.unsqueeze(1))  # (P, N)
    neg_vals = neg_vals * takes_neg.to(neg_vals.dtype)
    neg_part = logsumexp(distance.margin(neg_margin, neg_vals), keep_mask=takes_neg, add_one=False, dim=1)
    per_pair = torch.relu(neg_part + distance.margin(pos_vals, pos_margin)) ** 2 / 2
    return {"loss": _entry(per_pair, (a1, p), "pos_pair")}


def lifted_structure_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    neg_margin=1, pos_margin=0, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = LpDistance(p=2) if distance is None else distance
    d = lifted_structure_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, neg_margin=neg_margin, pos_margin=pos_margin,
        distance=distance,
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== GeneralizedLifted
def generalized_lifted_structure_loss_dict(
    embeddings, labels, indices_tuple, ref_emb, ref_labels, *, neg_margin, pos_margin, distance
):
    """Per row: relu(log sum_p exp(margin(d_ip, pos_margin)) + log sum_n exp(margin(neg_margin,
    d_in))); a side without pairs contributes 0."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pairs = setup
    pos_mask, neg_mask = pair_masks(mat, pairs)
    pos_part = logsumexp(distance.margin(mat, pos_margin), keep_mask=pos_mask.bool(), add_one=False)
    neg_part = logsumexp(distance.margin(neg_margin, mat), keep_mask=neg_mask.bool(), add_one=False)
    return {"loss": _entry(torch.relu(pos_part + neg_part), _rows(mat), "element")}


def generalized_lifted_structure_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    neg_margin=1, pos_margin=0, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = LpDistance(p=2) if distance is None else distance
    d = generalized_lifted_structure_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, neg_margin=neg_margin, pos_margin=pos_margin,
        distance=distance,
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== NPairs
def check_n_pairs_ref(embeddings, labels, ref_emb, ref_labels):
    """PML's NPairs ValueError: ref_emb is allowed only if it is the batch itself (the very same
    ``embeddings`` object, with ``ref_labels`` the very same ``labels`` object)."""
    if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
        raise ValueError("ref_emb is not supported for this loss function (NPairsLoss)")


def n_pairs_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, distance):
    """Keeps the first positive pair of each anchor label; cross-entropy of
    S[anchors, positives] (negated for a distance) against arange."""
    if labels is None:
        raise ValueError("labels are required for this loss function")
    a, p = convert_to_pos_pairs_with_unique_labels(indices_tuple, labels)
    if len(a) == 0:
        return _zeros()
    sim = distance(embeddings[a], embeddings[p])
    if not distance.is_inverted:
        sim = -sim
    targets = torch.arange(len(a), device=embeddings.device)
    return {"loss": _entry(F.cross_entropy(sim, targets, reduction="none"), a, "element")}


def n_pairs_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, distance=None, reducer=None
):
    check_n_pairs_ref(embeddings, labels, ref_emb, ref_labels)
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, None, None, labels_required=True
    )
    distance = DotProductSimilarity() if distance is None else distance
    d = n_pairs_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance=distance)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== NTXent
def ntxent_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, temperature, distance):
    """Per positive pair (a, p): -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{neg pairs of a} e^{s_an/t}))
    (s = -d for a distance); PML subtracts a detached max and adds ``tiny`` inside the log."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    if len(a1) == 0 or len(a2) == 0:
        return _zeros()
    pos_vals, neg_vals = mat[a1, p], mat[a2, n]
    dtype = neg_vals.dtype
    if not distance.is_inverted:
        pos_vals, neg_vals = -pos_vals, -neg_vals
    pos_logits = pos_vals.unsqueeze(1) / temperature  # (P, 1)
    same_anchor = a2.unsqueeze(0) == a1.unsqueeze(1)  # (P, N)
    neg_logits = (neg_vals / temperature) * same_anchor.to(dtype)
    neg_logits = neg_logits.masked_fill(~same_anchor, neg_inf(dtype))
    shift = torch.max(pos_logits, torch.max(neg_logits, dim=1, keepdim=True)[0]).detach()
    numerator = torch.exp(pos_logits - shift).squeeze(1)
    denominator = torch.sum(torch.exp(neg_logits - shift), dim=1) + numerator
    losses = -torch.log(numerator / denominator + small_val(dtype))
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def ntxent_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    temperature=0.07, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = CosineSimilarity() if distance is None else distance
    d = ntxent_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=temperature, distance=distance)
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== SupCon
def supcon_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, temperature, distance):
    """Per anchor i: -(1/|P(i)|) sum_{p in P(i)} [s_ip/t - log sum_{k in P(i) u N(i)} e^{s_ik/t}]
    (s = -d for a distance). Zero unless there is at least one positive and one negative pair."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pairs = setup
    pos_mask, neg_mask = pair_masks(mat, pairs)
    if not (pos_mask.bool().any() and neg_mask.bool().any()):
        return _zeros()
    if not distance.is_inverted:
        mat = -mat
    logits = mat / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    log_denominator = logsumexp(logits, keep_mask=(pos_mask + neg_mask).bool(), add_one=False, dim=1)
    log_prob = logits - log_denominator
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + small_val(logits.dtype))
    return {"loss": _entry(-mean_log_prob_pos, _rows(logits), "element")}


def supcon_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    temperature=0.1, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    distance = CosineSimilarity() if distance is None else distance
    d = supcon_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=temperature, distance=distance)
    return _reduce(d, reducer, AvgNonZeroReducer, ["loss"], embeddings, labels)


# =============================================================================== TupletMargin
def tuplet_margin_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, margin, scale, distance):
    """Per positive pair (a, p): log(1 + sum_{neg pairs of a} exp(scale*(s_an - cos(acos(s_ap) -
    margin)))); ``margin`` in radians."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    if len(a1) == 0 or len(a2) == 0:
        return _zeros()
    pos_cos, neg_cos = mat[a1, p], mat[a2, n]
    pos_angle = torch.acos(pos_cos.clamp(-1, 1))
    shifted_pos = torch.cos(pos_angle - margin).unsqueeze(1)  # (P, 1)
    inside = scale * (neg_cos.unsqueeze(0) - shifted_pos)  # (P, N)
    same_anchor = a2.unsqueeze(0) == a1.unsqueeze(1)
    losses = logsumexp(inside, keep_mask=same_anchor, add_one=True, dim=1)
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def tuplet_margin_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    margin=5.73, scale=64, distance=None, reducer=None,
):
    """``margin`` in degrees, as in the class constructor."""
    distance = CosineSimilarity() if distance is None else distance
    require_distance("TupletMarginLoss", distance, "CosineSimilarity")
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    d = tuplet_margin_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, margin=math.radians(margin), scale=scale,
        distance=distance,
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== Angular
def angular_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, alpha, distance):
    """Per positive pair (a, p), over every ref item n with a label different from a's:
    log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p).x_n - 2 (1 + tan^2(alpha)) x_a.x_p)),
    x_a, x_p normalised, x_n the raw ref embedding (PML quirk). ``alpha`` in radians.
    Negatives come from labels even when indices_tuple is given."""
    if labels is None:
        raise ValueError("labels are required for this loss function")
    a1, p, a2, _ = convert_to_pairs(indices_tuple, labels, ref_labels)
    if len(a1) == 0 or len(a2) == 0:
        return _zeros()
    if ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError("ref_labels is required when ref_emb and embeddings differ in size")
    x_a = distance.normalize(embeddings[a1])
    x_p = distance.normalize(ref_emb[p])
    is_neg = labels[a1].unsqueeze(1) != ref_labels.unsqueeze(0)  # (P, M)
    sq_tan = math.tan(float(alpha)) ** 2
    ap_dot = torch.sum(x_a * x_p, dim=1, keepdim=True)  # (P, 1)
    center_dot_n = (x_a + x_p) @ ref_emb.t()  # (P, M)
    logits = 4 * sq_tan * center_dot_n - 2 * (1 + sq_tan) * ap_dot
    losses = logsumexp(logits, keep_mask=is_neg, add_one=True)
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def angular_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    alpha=40, distance=None, reducer=None,
):
    """``alpha`` in degrees, as in the class constructor."""
    distance = LpDistance(p=2) if distance is None else distance
    require_distance("AngularLoss", distance, "LpDistance", p=2, power=1, normalize_embeddings=True)
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=True
    )
    d = angular_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, alpha=math.radians(alpha), distance=distance
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== NCA
def nca_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, softmax_scale, distance):
    """Per query i: -log sum_{j: y_j = y_i} softmax_j(scale * s_ij) (s = -d for a distance; the
    diagonal is excluded when the references are the batch itself), times the miner weight of
    i. Rows whose positive probability is 0 are dropped; if every row is dropped the loss is the
    grad-carrying zero (deviation: PML gives NaN)."""
    if len(embeddings) <= 1:
        return _zeros()
    if labels is None:
        raise ValueError("labels are required for this loss function")
    if ref_labels is None or ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError("ref_labels is required when ref_emb and embeddings differ in size")
    self_ref = embeddings is ref_emb
    dtype = embeddings.dtype
    weights = convert_to_weights(indices_tuple, labels, dtype=dtype, using_ref=not self_ref)
    mat = distance(embeddings, ref_emb)
    if not distance.is_inverted:
        mat = -mat
    if self_ref:
        eye = torch.eye(mat.shape[0], dtype=torch.bool, device=mat.device)
        mat = mat.masked_fill(eye, neg_inf(dtype))
    same = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).to(dtype)
    prob_pos = torch.sum(F.softmax(softmax_scale * mat, dim=1) * same, dim=1)
    kept = prob_pos != 0
    if not bool(kept.any()):
        return _zeros()
    losses = -torch.log(prob_pos[kept]) * weights[kept]
    return {"loss": _entry(losses, _rows(embeddings)[kept], "element")}


def nca_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    softmax_scale=1, distance=None, reducer=None,
):
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=None
    )
    distance = LpDistance(power=2) if distance is None else distance
    d = nca_loss_dict(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, softmax_scale=softmax_scale, distance=distance
    )
    return _reduce(d, reducer, MeanReducer, ["loss"], embeddings, labels)


# =============================================================================== Circle
def circle_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, m, gamma, distance):
    """Per row: softplus(logsumexp_p(-gamma relu(1+m-s_p) (s_p-(1-m))) + logsumexp_n(gamma
    relu(s_n+m) (s_n-m))), the relu weights detached; rows lacking a positive or a negative
    give 0."""
    setup = pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pairs = setup
    pos_mask, neg_mask = pair_masks(mat, pairs)
    pos_b, neg_b = pos_mask.bool(), neg_mask.bool()
    op, on, delta_p, delta_n = 1 + m, -m, 1 - m, m
    s_p, s_n = mat[pos_b], mat[neg_b]
    logits = torch.zeros_like(mat)
    logits[pos_b] = -gamma * torch.relu(op - s_p.detach()) * (s_p - delta_p)
    logits[neg_b] = gamma * torch.relu(s_n.detach() - on) * (s_n - delta_n)
    lse_pos = logsumexp(logits, keep_mask=pos_b, add_one=False, dim=1)
    lse_neg = logsumexp(logits, keep_mask=neg_b, add_one=False, dim=1)
    losses = F.softplus(lse_pos + lse_neg)
    complete = (pos_mask.sum(dim=1) != 0) & (neg_mask.sum(dim=1) != 0)  # (B,)
    losses = losses * complete.to(losses.dtype).unsqueeze(1)
    return {"loss": _entry(losses, _rows(mat), "element")}


def circle_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    m=0.4, gamma=80, distance=None, reducer=None,
):
    distance = CosineSimilarity() if distance is None else distance
    require_distance("CircleLoss", distance, "CosineSimilarity")
    embeddings, labels, indices_tuple, ref_emb, ref_labels = prepare_inputs(
        embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=False
    )
    d = circle_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, m=m, gamma=gamma, distance=distance)
    return _reduce(d, reducer, AvgNonZeroReducer, ["loss"], embeddings, labels)
