"""N-pairs loss on the engine: cross-entropy over S[anchors, positives] as one lse2 pass (the
diagonal positive, the rest negative); under torch.compile over all sorted positions."""
import torch

from .._determinism import fixed_order_sum
from ..engine_spec import TRANSFORM_UNIT_DISTANCE, EngineParams
from . import _stats
from ._common import (decline, engine_distance, engine_rows, is_plain_mean, static_shapes, unit_rows,
                      value_params)
from ._epilogue import ZERO_LOSS, _log1p_exp, _log1p_exp_as_pml, _lse2, _rows_backend
from .pair_lists import unit_distance


def _first_of_label_pairs(labels):
    """(order, starts_pair): the stable sort order of the labels, and for each sorted position
    whether it is the first sample of its label and a second one follows (static shapes)."""
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    same_as_next = torch.zeros_like(sorted_labels, dtype=torch.bool)
    same_as_next[:-1] = sorted_labels[1:] == sorted_labels[:-1]
    starts_run = torch.ones_like(same_as_next)
    starts_run[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return order, starts_run & same_as_next


def first_pair_per_label(labels):
    """PML's convert_to_pos_pairs_with_unique_labels on all pairs, in O(N log N): for each label
    with at least two samples, the anchor is its first index and the positive its second."""
    order, starts_pair = _first_of_label_pairs(labels)
    first = torch.nonzero(starts_pair).squeeze(1)
    return order[first], order[first + 1]


def n_pairs(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _rows_backend(module, embeddings, labels, indices_tuple, embeddings)
    if backend is None:
        return None
    if static_shapes():
        if engine_distance(module.distance) != "unit_cosine":
            return decline(module, f"{type(module.distance).__name__} other than the unit cosine with NPairsLoss "
                                   "under torch.compile (its dropped columns assume |s| <= 1)")
        return _n_pairs_static_shapes(module, embeddings, labels, backend)
    anchors, positives = first_pair_per_label(labels)
    _stats.n_pairs(module, embeddings, anchors, positives)
    if len(anchors) == 0:
        return ZERO_LOSS
    distance = module.distance
    xa, xp, transform = engine_rows(distance, embeddings[anchors], embeddings[positives])
    sign = 1.0 if distance.is_inverted else -1.0  # PML's logits: the similarity, or minus the distance
    params = value_params(distance, sc_pos=sign, sc_neg=sign)
    k = torch.arange(len(anchors), device=labels.device)
    # Cross-entropy over S[anchors, positives] against arange: pos = the diagonal, neg = the rest;
    # log(1 + e^(lse_neg - target)), exactly 0 where PML's cross-entropy is (one pair, or a target
    # far above the rest): AvgNonZeroReducer / ThresholdReducer count the terms PML counts.
    lse = _lse2(xa, xp, k, k, params, False, backend, transform=transform)
    s_ap = (xa * xp).sum(dim=1)
    v_ap = unit_distance(s_ap) if transform == TRANSFORM_UNIT_DISTANCE else s_ap
    target = params.sc_pos * v_ap + params.off_pos
    losses = _log1p_exp_as_pml(lse[:, 1] - target.to(lse.dtype), embeddings.dtype)
    return {"loss": {"losses": losses.to(embeddings.dtype), "indices": anchors, "reduction_type": "element"}}, backend


_DROPPED_COLUMN = -1.0e4  # a similarity whose exp is exactly 0 next to any |s| <= 1, in every dtype


def _n_pairs_static_shapes(module, embeddings, labels, backend):
    """N-pairs without data-dependent shapes, for torch.compile(fullgraph=True): every sorted
    position k is a candidate anchor (its positive: position k + 1), valid when it starts a label
    run of length >= 2. Invalid columns get an extra coordinate of -1e4 against the anchors' 1, so
    their similarity drops out of every row's log-sum-exp exactly; invalid rows are masked. It
    costs N x N instead of k x k (k anchors): eager mode lists the anchors instead. The mean over
    the k anchors is MeanReducer's; other reducers need the anchor list (the reference)."""
    if not is_plain_mean(module.reducer):
        return decline(module, f"{type(module.reducer).__name__} with NPairsLoss under torch.compile")
    n = labels.shape[0]
    order, valid = _first_of_label_pairs(labels)
    positives = order[(torch.arange(n, device=labels.device) + 1).clamp(max=n - 1)]
    xa, xp = unit_rows(embeddings[order]), unit_rows(embeddings[positives])
    dropped = torch.where(valid, 0.0, _DROPPED_COLUMN).to(xp.dtype)[:, None]
    xa_ext = torch.cat([xa, torch.ones_like(dropped)], dim=1)
    xp_ext = torch.cat([xp, dropped], dim=1)
    k = torch.arange(n, device=labels.device)
    lse = _lse2(xa_ext, xp_ext, k, k, EngineParams(), False, backend)
    losses = _log1p_exp(lse[:, 1] - (xa * xp).sum(dim=1).to(lse.dtype))
    num_anchors = valid.sum()
    loss = fixed_order_sum(torch.where(valid, losses, 0.0)) / num_anchors.clamp(min=1)  # 0 if none
    _stats.n_pairs(module, embeddings, order=order, valid=valid)
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                     **_stats.already_reduced_size(module.reducer, num_anchors)}}, backend
