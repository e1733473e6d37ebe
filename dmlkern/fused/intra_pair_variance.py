"""IntraPairVarianceLoss over all pairs without an N x M buffer (backend "blocked").

PML's loss: with v the pair value and m_pos / m_neg the means of v over all positive / negative
pairs (not detached), each pair's loss is h^2 with h = relu(dev):
  similarity: positives dev = (1 - pos_eps) m_pos - v, negatives dev = v - (1 + neg_eps) m_neg;
  distance:   positives dev = v - (1 + pos_eps) m_pos, negatives dev = (1 - neg_eps) m_neg - v.
v follows from the rows' dot product s (`value_kind`): the cosine or raw dot product s, the
unit-Euclidean distance sqrt(2 - 2s) or its square 2 - 2s. Each side's reducer (Mean,
AvgNonZero, Sum) needs only Q = sum h^2, the number of h^2 > 0 and the number of pairs
(`_common.reduced_sub_loss`), so the loss dict holds already-reduced values.

The means: for v linear in s, from each row's dot product with its class's sum of reference rows
(O((N + M) D)); for the distance, a sweep of row blocks of ~1M pair values (`row_blocks`, as
triplet.py). Then one sweep sums the terms. Products are `ops.fixed_mm` and sums in fixed
orders, so values and gradients are bit-identical at any CPU thread count. Written
dev = sigma (v - beta m), the gradient of Q is dQ/dv = 2 sigma (h - beta H / P) on the side's pairs
(H = sum h, P the number of pairs: the mean's share reaches every pair of the side); the backward
recomputes each block and adds grad_x = G_b y, grad_y += G_b^T x_b in block order. Memory
O(block + N D).

`pair_blocks` (the row-block sweep with its label masks) and the loss-dict helpers are shared with
snr_contrastive.py.
"""
import torch

from .. import distances
from .._autograd import applier
from .._determinism import fixed_order_sum
from .._tracing import static_shapes
from ..ops import pair_engine as pe
from ..ops.fixed_mm_op import fixed_mm
from ..reducers import AvgNonZeroReducer, MeanReducer, SumReducer
from . import _common
from ._common import (Degenerate, LabelStats, all_pairs_plan, block_masks, class_sums_for_rows, decline,
                      is_unit_cosine, is_unit_euclidean, reduced_sub_loss, reference_backend_reason, row_blocks,
                      row_sums, unit_rows)
from ._common import SHORT_ROWS
from ._epilogue import ZERO_LOSS, _already_reduced, _already_reduced_kinds, _at_most_one_pair_each
from .pair_lists import unit_distance

BACKEND = "blocked"
SUB_LOSSES = ("pos_loss", "neg_loss")
REDUCER_KINDS = {AvgNonZeroReducer: "nonzero", MeanReducer: "mean", SumReducer: "sum"}
NON_FINITE = "a NaN or infinite pair value (the reference keeps or drops each such pair loss as its reducer does)"


# ------------------------------------------------------------------------------ shared sweep
def pair_blocks(x, y, labels, ref_labels):
    """(r0, r1, s, same) per row block: s = x[r0:r1] @ yᵀ and the same-label mask (positive pairs
    where True, negative pairs where False, less the self pairs: `drop_self_pairs`)."""
    for r0, r1 in row_blocks(x.shape[0], y.shape[0], x.device):
        yield r0, r1, fixed_mm(x[r0:r1], y), labels[r0:r1, None] == ref_labels[None, :]


def drop_self_pairs(t, r0, exclude_diag):
    """Zeroes the block's self pairs (i, i) in place (they are neither positive nor negative)."""
    if exclude_diag:
        rows = torch.arange(t.shape[0], device=t.device)
        t[rows, rows + r0] = 0
    return t


def side_row_sums(t, same):
    """Per-row sums of t over the same-label and the other entries (bits independent of the
    thread count)."""
    return row_sums(torch.where(same, t, 0.0)), row_sums(torch.where(same, 0.0, t))


def side_row_counts(counted, same):
    """Per row, how many entries are `counted` (a bool mask) among the same-label and the other ones."""
    on_same = (counted & same).sum(dim=1)
    return on_same, counted.sum(dim=1) - on_same


def non_finite(*totals):
    """Whether a total is NaN or infinite, read only where a branch costs no host sync (eager on the
    CPU; as contrastive's `nan_in`): there the reference runs, whose reducers keep or drop each
    such pair loss. On CUDA the value propagates."""
    return not _common.branch_free(totals[0]) and not bool(torch.isfinite(torch.stack(totals)).all())


def blocked_plan_reason(module, embeddings):
    """Why no blocked path runs this call (the `decline` text), or None."""
    if reason := reference_backend_reason(module.backend, embeddings.device):
        return reason
    if embeddings.dtype not in (torch.float32, torch.float64):
        return f"dtype {embeddings.dtype} (the blocked path runs fp32 / fp64)"
    if static_shapes():
        return "torch.compile (the blocked path runs eagerly)"
    return None


def all_pairs_setup(indices_tuple, embeddings, labels, ref_emb, ref_labels):
    """(labels, ref_labels, ref_emb, exclude_diag, LabelStats, Degenerate) for every pair of the
    rows with the reference rows, or for CrossBatchMemory's lazy all-pairs tuple (the queue rolled:
    the self comparisons are the diagonal). PML's `len <= 1` rule makes the batch degenerate."""
    plan = all_pairs_plan(indices_tuple, embeddings, ref_emb)
    if plan is None:
        stats = LabelStats(labels, ref_labels)
        degenerate = Degenerate(labels, _at_most_one_pair_each(stats))
        return labels, ref_labels, ref_emb, ref_labels is labels, stats, degenerate
    return (plan.labels, plan.ref_labels, plan.ref_emb, plan.exclude_diag, plan.stats,
            Degenerate(plan.labels, plan.pair_rule()))


def blocked_pairs_setup(module, distance_reason, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """(early, setup) of IntraPairVariance's and SNR's blocked paths: `early` is the call's answer
    when it is known before any pair is computed (None after a decline, ZERO_LOSS for a
    degenerate batch), and setup None; else setup = (reducer kinds, then `all_pairs_setup`'s six)."""
    reason = blocked_plan_reason(module, embeddings) or distance_reason
    if reason is None and labels is None:
        reason = "no labels (pairs from indices_tuple only)"
    if reason is None and indices_tuple is not None and all_pairs_plan(indices_tuple, embeddings, ref_emb) is None:
        reason = "an indices_tuple (the blocked path takes all pairs)"
    if reason is not None:
        return decline(module, reason), None
    kinds = _already_reduced_kinds(module, SUB_LOSSES, REDUCER_KINDS)
    if kinds is None:
        return None, None
    setup = all_pairs_setup(indices_tuple, embeddings, labels, ref_emb, ref_labels)
    if setup[-1].returns_zero_now():
        return ZERO_LOSS, None
    return None, (kinds, *setup)


def reduced_sub_losses(kinds, totals, nonzeros, counts, degenerate, embeddings):
    """The loss dict of already-reduced sub-losses from each side's total, non-zero count and pair count."""
    loss_dict = {}
    for name, total, nonzero, count in zip(SUB_LOSSES, totals, nonzeros, counts):
        kind, reducer = kinds[name]
        value = reduced_sub_loss(kind, total, nonzero.detach(), count, reducer, embeddings)
        loss_dict[name] = _already_reduced(degenerate.zero_where(value), embeddings)
    return loss_dict


def side_upstreams(grad_pos, grad_neg, like):
    """The two sub-losses' upstream gradients (a backward's arguments), zeros where None."""
    return [g if g is not None else torch.zeros((), dtype=like.dtype, device=like.device) for g in (grad_pos, grad_neg)]


def graph_grads(ctx, x, y, upstream, materialised_totals):
    """(grad_x, grad_y or None when y is x) with a graph, for create_graph=True: the reference
    gradient of `materialised_totals(x, y)`, the two totals from plain ops on the whole matrix."""
    def totals(x, y=None):
        return materialised_totals(x, x if ctx.self_pairs else y)
    inputs = (x,) if ctx.self_pairs else (x, y)
    grads = pe.reference_gradient(totals, inputs, ctx.needs_input_grad[:len(inputs)], tuple(upstream))
    return grads[0], None if ctx.self_pairs else grads[1]


# ------------------------------------------------------------------------------ the loss
def _side_rules(module, kind):
    """Per side (pos, neg): (sigma, beta) with dev = sigma (v - beta m), written as PML does."""
    pos_up = kind == "dot"  # PML's incentivize_increase for the positives: the distance is_inverted
    pos_eps, neg_eps = float(module.pos_eps), float(module.neg_eps)
    pos = (-1.0, 1 - pos_eps) if pos_up else (1.0, 1 + pos_eps)
    neg = (1.0, 1 + neg_eps) if pos_up else (-1.0, 1 - neg_eps)
    return pos, neg


def _deviation(v, mean, sigma, beta):
    """PML's variance_with_eps: (1 - eps) * mean - v, or v - (1 + eps) * mean."""
    return beta * mean - v if sigma < 0 else v - beta * mean


def value_kind(distance):
    """(kind, unit rows?) for the distances whose pair value v follows from the rows' dot product s:
    "dot" v = s (CosineSimilarity, DotProductSimilarity with or without normalising), "distance"
    v = sqrt(2 - 2s) and "squared" v = 2 - 2s (LpDistance(p=2) of normalised rows, power 1 / 2);
    None for any other distance."""
    if is_unit_cosine(distance):
        return "dot", True
    if (type(distance) is distances.DotProductSimilarity and not distance.normalize_embeddings
            and distance.power == 1 and distance.is_inverted):
        return "dot", False
    if is_unit_euclidean(distance):
        return "distance", True
    if (type(distance) is distances.LpDistance and distance.normalize_embeddings and distance.p == 2
            and distance.power == 2 and not distance.is_inverted):
        return "squared", True
    return None


def _values(s, kind):
    if kind == "distance":
        return unit_distance(s)
    return 2 - 2 * s if kind == "squared" else s


def _value_slope(v, kind):
    """dv/ds (None for 1): -1/d for the unit distance (0 where d = 0, the engine's convention)."""
    if kind == "distance":
        return torch.where(v > 0, -1.0 / torch.where(v > 0, v, 1.0), 0.0)
    return -2.0 if kind == "squared" else None


def _side_means(x, y, labels, ref_labels, exclude_diag, kind, stats):
    """Pass 1: each side's mean pair value (0 for a side without pairs). v linear in s: from the
    rows' dot products with their class sums, O((N + M) D); the unit distance: a sweep."""
    counts = [stats.pos_total.to(x.dtype), stats.neg_total.to(x.dtype)]
    if kind == "distance":
        sums = torch.empty(2, x.shape[0], dtype=x.dtype, device=x.device)
        for r0, r1, s, same in pair_blocks(x, y, labels, ref_labels):
            v = drop_self_pairs(_values(s, kind), r0, exclude_diag)
            sums[0, r0:r1], sums[1, r0:r1] = side_row_sums(v, same)
        sums = [fixed_order_sum(sums[k]) for k in range(2)]
    else:
        sums = _side_sums_of_dots(x, y, stats, exclude_diag)
        if kind == "squared":  # sum of 2 - 2s
            sums = [2 * counts[k] - 2 * sums[k] for k in range(2)]
    return [sums[k] / counts[k].clamp(min=1) for k in range(2)]


def _side_sums_of_dots(x, y, stats, exclude_diag):
    """(sum of s over the positive pairs, over the negative pairs) from each row's dot product with
    the sum of its class's reference rows and with the sum of all of them."""
    same = fixed_order_sum(row_sums(x * class_sums_for_rows(stats, y)))
    y_total = fixed_mm(y.new_ones(1, y.shape[0]), y.T)[0]  # (a fixed-order column sum)
    neg = fixed_order_sum(row_sums(x * y_total)) - same
    if exclude_diag:  # the self pairs (i, i) are neither
        return same - fixed_order_sum(row_sums(x * y[:x.shape[0]])), neg
    return same, neg


def _hinges(v, same, means, rules, r0, exclude_diag):
    """h = relu(dev) of every pair of the block, the positives' or the negatives' deviation by
    label; 0 for the self pairs."""
    dev = torch.where(same, _deviation(v, means[0], *rules[0]), _deviation(v, means[1], *rules[1]))
    return drop_self_pairs(dev.relu_(), r0, exclude_diag)


def _ipv_totals(x, y, labels, ref_labels, exclude_diag, kind, rules, stats):
    """Pass 2: per side Q = sum h^2, H = sum h, the number of h^2 > 0; and the side means."""
    means = _side_means(x, y, labels, ref_labels, exclude_diag, kind, stats)
    n = x.shape[0]
    q = torch.empty(2, n, dtype=x.dtype, device=x.device)
    h_sums = torch.empty(2, n, dtype=x.dtype, device=x.device)
    nonzero = torch.empty(2, n, dtype=torch.long, device=x.device)
    for r0, r1, s, same in pair_blocks(x, y, labels, ref_labels):
        h = _hinges(_values(s, kind), same, means, rules, r0, exclude_diag)
        term = h * h
        q[0, r0:r1], q[1, r0:r1] = side_row_sums(term, same)
        h_sums[0, r0:r1], h_sums[1, r0:r1] = side_row_sums(h, same)
        nonzero[0, r0:r1], nonzero[1, r0:r1] = side_row_counts(term > 0, same)
    totals = [fixed_order_sum(q[k]) for k in range(2)]
    return totals, [fixed_order_sum(h_sums[k]) for k in range(2)], [nonzero[k].sum() for k in range(2)], means


def _materialised_totals(x, y, labels, ref_labels, exclude_diag, kind, rules):
    """(Q_pos, Q_neg) through plain differentiable ops on the whole N x M matrix: the gradient with
    a graph for create_graph=True."""
    s = x @ y.T
    v = _values(s, kind)
    pos, neg = block_masks(labels, ref_labels, 0, exclude_diag)  # (N x M: create_graph only)
    out = []
    for mask, rule in ((pos, rules[0]), (neg, rules[1])):
        mean = torch.where(mask, v, 0.0).sum() / mask.sum().clamp(min=1)
        h = torch.relu(_deviation(v, mean, *rule))
        out.append(torch.where(mask, h * h, 0.0).sum())
    return tuple(out)


class _IntraPairTotals(torch.autograd.Function):
    """(Q_pos, Q_neg, nonzero_pos, nonzero_neg, (H_pos, H_neg), (m_pos, m_neg)): the Q differentiable.
    y None: y is x. stats: the `LabelStats` of the pairs (their counts, class sums)."""

    @staticmethod
    def forward(x, y, labels, ref_labels, exclude_diag, kind, rules, stats):
        y = x if y is None else y
        totals, h_totals, nonzero, means = _ipv_totals(x, y, labels, ref_labels, exclude_diag, kind, rules,
                                                       stats)
        return totals[0], totals[1], nonzero[0], nonzero[1], torch.stack(h_totals), torch.stack(means)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, labels, ref_labels, exclude_diag, kind, rules, stats = inputs
        ctx.self_pairs = y is None
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x if y is None else y, labels, ref_labels, output[4], output[5],
                              stats.pos_total, stats.neg_total)
        ctx.config = (exclude_diag, kind, rules)

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, *_constant_outputs):
        x, y, labels, ref_labels, h_totals, means, pos_count, neg_count = ctx.saved_tensors
        exclude_diag, kind, rules = ctx.config
        nones = (None,) * 6
        if grad_pos is None and grad_neg is None:
            return None, None, *nones
        upstream = side_upstreams(grad_pos, grad_neg, x)
        if pe.backward_needs_graph(x):
            return *graph_grads(ctx, x, y, upstream, lambda x, y: _materialised_totals(
                x, y, labels, ref_labels, exclude_diag, kind, rules)), *nones
        counts = (pos_count, neg_count)
        # dQ/dv = 2 sigma (h - beta H / P): per side a scale on h and a constant over its pairs
        coef = [2 * upstream[k].to(x.dtype) * rules[k][0] for k in range(2)]
        shift = [rules[k][1] * h_totals[k] / counts[k].clamp(min=1).to(x.dtype) for k in range(2)]
        grad_x = torch.empty_like(x)
        grad_y = torch.zeros_like(y)
        for r0, r1, s, same in pair_blocks(x, y, labels, ref_labels):
            v = _values(s, kind)
            h = _hinges(v, same, means, rules, r0, exclude_diag)
            g = h.sub_(torch.where(same, shift[0], shift[1])).mul_(torch.where(same, coef[0], coef[1]))
            slope = _value_slope(v, kind)
            if slope is not None:
                g *= slope
            drop_self_pairs(g, r0, exclude_diag)  # (the mean's share reached them too)
            grad_x[r0:r1] = fixed_mm(g, y.T)
            grad_y += fixed_mm(g.T, x[r0:r1].T)  # the blocks in order: deterministic
        if ctx.self_pairs:
            return grad_x.add_(grad_y), None, *nones
        return grad_x, grad_y, *nones


intra_pair_totals = applier(_IntraPairTotals)


def intra_pair_variance(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The fused IntraPairVarianceLoss (all pairs, or CrossBatchMemory's lazy all pairs; the
    distances of `value_kind`; Mean / AvgNonZero / Sum reducers), or None after `decline` (the
    reference runs)."""
    kind_and_rows = value_kind(module.distance)
    distance_reason = None if kind_and_rows is not None else (
        f"distance {type(module.distance).__name__} with these arguments (fused: CosineSimilarity, "
        "DotProductSimilarity, LpDistance(p=2, normalize_embeddings=True, power=1 or 2))")
    early, setup = blocked_pairs_setup(module, distance_reason, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    if setup is None:
        return early
    kind, unit = kind_and_rows
    kinds, labels, ref_labels, ref_emb, exclude_diag, stats, degenerate = setup
    if kind != "dot" and _common.has_short_rows(embeddings, ref_emb):
        return decline(module, SHORT_ROWS)  # 2 - 2s assumes unit rows
    rows = (lambda t: unit_rows(t, full_precision=kind != "dot")) if unit else (lambda t: t)
    x = rows(embeddings)
    y = None if ref_emb is embeddings else rows(ref_emb)
    counts = (stats.pos_total, stats.neg_total)
    q_pos, q_neg, nz_pos, nz_neg, _, _ = intra_pair_totals(x, y, labels, ref_labels, exclude_diag, kind,
                                                           _side_rules(module, kind), stats)
    if non_finite(q_pos, q_neg):
        return decline(module, NON_FINITE)
    return reduced_sub_losses(kinds, (q_pos, q_neg), (nz_pos, nz_neg), counts, degenerate, embeddings), BACKEND

