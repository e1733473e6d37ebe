"""Reference softmax-style losses: NPairs, NTXent, SupCon, NCA (a softmax or cross-entropy over
the similarities of a query). Conventions: see ``embedding_losses``."""

import torch
import torch.nn.functional as F

from .._determinism import softmax
from ..distances import CosineSimilarity, DotProductSimilarity, LpDistance
from ..reducers import AvgNonZeroReducer, MeanReducer
from ._embedding_common import _entry, _rows, _run_loss, _zeros, as_similarity, pair_setup_both, pair_setup_masks
from .indices import convert_to_pos_pairs_with_unique_labels, convert_to_weights, logsumexp, neg_inf, small_val

__all__ = [
    "n_pairs_loss",
    "ntxent_loss",
    "supcon_loss",
    "nca_loss",
    "n_pairs_loss_dict",
    "ntxent_loss_dict",
    "supcon_loss_dict",
    "nca_loss_dict",
]


# =============================================================================== NPairs
def check_n_pairs_ref(embeddings, labels, ref_emb, ref_labels):
    """PML's NPairs ValueError: ref_emb is allowed only if it is the batch itself (the very same
    ``embeddings`` object, with ``ref_labels`` the very same ``labels`` object)."""
    if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
        raise ValueError("ref_emb is not supported for this loss function (NPairsLoss)")


def n_pairs_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, distance, pairs=None):
    """Keeps the first positive pair of each anchor label; cross-entropy of
    S[anchors, positives] (negated for a distance) against arange. pairs: those (anchors,
    positives) when the caller has them already."""
    if labels is None:
        raise ValueError("labels are required for this loss function")
    a, p = convert_to_pos_pairs_with_unique_labels(indices_tuple, labels) if pairs is None else pairs
    if len(a) == 0:
        return _zeros()
    sim = as_similarity(distance(embeddings[a], embeddings[p]), distance)
    targets = torch.arange(len(a), device=embeddings.device)
    return {"loss": _entry(F.cross_entropy(sim, targets, reduction="none"), a, "element")}


def n_pairs_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *, distance=None, reducer=None
):
    check_n_pairs_ref(embeddings, labels, ref_emb, ref_labels)
    return _run_loss(
        n_pairs_loss_dict, (embeddings, labels, indices_tuple, None, None), labels_required=True,
        distance=DotProductSimilarity() if distance is None else distance, reducer=reducer,
        default_reducer=MeanReducer,
    )


# =============================================================================== NTXent
def ntxent_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, temperature, distance):
    """Per positive pair (a, p): -log(e^{s_ap/t} / (e^{s_ap/t} + sum_{neg pairs of a} e^{s_an/t}))
    (s = -d for a distance); PML subtracts a detached max and adds ``tiny`` inside the log."""
    setup = pair_setup_both(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, (a1, p, a2, n) = setup
    pos_vals, neg_vals = mat[a1, p], mat[a2, n]
    dtype = neg_vals.dtype
    pos_vals, neg_vals = as_similarity(pos_vals, distance), as_similarity(neg_vals, distance)
    pos_logits = pos_vals.unsqueeze(1) / temperature  # (P, 1)
    same_anchor = (a2.unsqueeze(0) == a1.unsqueeze(1)).to(dtype)  # (P, N); PML's tensors, so PML's peak memory:
    neg_logits = (neg_vals / temperature) * same_anchor
    neg_logits.masked_fill_(same_anchor == 0, neg_inf(dtype))  # (in place: the product is not saved for backward)
    shift = torch.max(pos_logits, torch.max(neg_logits, dim=1, keepdim=True)[0]).detach()
    numerator = torch.exp(pos_logits - shift).squeeze(1)
    denominator = torch.sum(torch.exp(neg_logits - shift), dim=1) + numerator
    losses = -torch.log(numerator / denominator + small_val(dtype))
    return {"loss": _entry(losses, (a1, p), "pos_pair")}


def ntxent_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    temperature=0.07, distance=None, reducer=None,
):
    return _run_loss(
        ntxent_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=CosineSimilarity() if distance is None else distance, reducer=reducer, default_reducer=MeanReducer,
        temperature=temperature,
    )


# =============================================================================== SupCon
def supcon_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, temperature, distance):
    """Per anchor i: -(1/|P(i)|) sum_{p in P(i)} [s_ip/t - log sum_{k in P(i) u N(i)} e^{s_ik/t}]
    (s = -d for a distance). Zero unless there is at least one positive and one negative pair."""
    setup = pair_setup_masks(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance)
    if setup is None:
        return _zeros()
    mat, pos_mask, neg_mask = setup
    if not (pos_mask.bool().any() and neg_mask.bool().any()):
        return _zeros()
    logits = as_similarity(mat, distance) / temperature
    logits = logits - logits.max(dim=1, keepdim=True)[0].detach()
    log_denominator = logsumexp(logits, keep_mask=(pos_mask + neg_mask).bool(), add_one=False, dim=1)
    log_prob = logits - log_denominator
    mean_log_prob_pos = (pos_mask * log_prob).sum(dim=1) / (pos_mask.sum(dim=1) + small_val(logits.dtype))
    return {"loss": _entry(-mean_log_prob_pos, _rows(logits), "element")}


def supcon_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    temperature=0.1, distance=None, reducer=None,
):
    return _run_loss(
        supcon_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=False,
        distance=CosineSimilarity() if distance is None else distance, reducer=reducer,
        default_reducer=AvgNonZeroReducer, temperature=temperature,
    )


# =============================================================================== NCA
def nca_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, softmax_scale, distance,
                  empty_entry=False, zero_on_graph=False):
    """Per query i: -log sum_{j: y_j = y_i} softmax_j(scale * s_ij) (s = -d for a distance; the
    diagonal is excluded when the references are the batch itself), times the miner weight of
    i. Rows whose positive probability is 0 are dropped; if every row is dropped the loss is the
    grad-carrying zero (deviation: PML's mean of nothing is NaN), on the probabilities' graph with
    zero_on_graph (where PML's reducer answers there: ref_emb's gradient is zeros), or with
    empty_entry (the dict reaches the user: DoNothingReducer) PML's empty entry."""
    if len(embeddings) <= 1:
        return _zeros()
    if labels is None:
        raise ValueError("labels are required for this loss function")
    if ref_labels is None or ref_labels.shape[0] != ref_emb.shape[0]:
        raise ValueError("ref_labels is required when ref_emb and embeddings differ in size")
    self_ref = embeddings is ref_emb
    dtype = embeddings.dtype
    weights = convert_to_weights(indices_tuple, labels, dtype=dtype, using_ref=not self_ref)
    mat = as_similarity(distance(embeddings, ref_emb), distance)
    if self_ref:
        eye = torch.eye(mat.shape[0], dtype=torch.bool, device=mat.device)
        mat = mat.masked_fill(eye, neg_inf(dtype))
    same = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).to(dtype)
    prob_pos = torch.sum(softmax(softmax_scale * mat, dim=1) * same, dim=1)
    kept = prob_pos != 0
    if not (empty_entry or bool(kept.any())):
        if zero_on_graph:  # every probability is exactly 0: so is their sum
            return {"loss": _entry(prob_pos.sum(), None, "already_reduced")}
        return _zeros()
    losses = -torch.log(prob_pos[kept]) * weights[kept]
    return {"loss": _entry(losses, _rows(embeddings)[kept], "element")}


def nca_loss(
    embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None, *,
    softmax_scale=1, distance=None, reducer=None,
):
    return _run_loss(
        nca_loss_dict, (embeddings, labels, indices_tuple, ref_emb, ref_labels), labels_required=None,
        distance=LpDistance(power=2) if distance is None else distance, reducer=reducer, default_reducer=MeanReducer,
        softmax_scale=softmax_scale,
    )
