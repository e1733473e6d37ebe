"""SignalToNoiseRatioContrastiveLoss over all pairs without an N x M buffer (backend "blocked").

PML's SNRDistance d(x, y) = var(x - y) / var(x) (unbiased variances over the D columns, of the
L2-normalised rows by default). With centred rows x~ = x - mean(x), y~ likewise, a = |x~|^2 and
b = |y~|^2, it is d = (a + b - 2 x~ . y~) / a (the 1 / (D - 1) cancels): one product per pair
and O(N) row data. ContrastiveLoss on it: relu(d - pos_margin) per positive pair,
relu(neg_margin - d) per negative pair, each side reduced by its reducer (AvgNonZero by default,
Mean, Sum) from its total, its number of non-zero terms and of pairs, so the loss dict holds
already-reduced values (as the fused ContrastiveLoss's).

One pass over row blocks (`intra_pair_variance.pair_blocks`, `ops.fixed_mm`) gives the totals;
the backward recomputes each block: with W = (dL/dd) / a per pair, grad x~ = -2 W y~ plus
a's share 2 x~ sum_j W (1 - d), grad y~ = -2 W^T x~ plus b's share 2 y~ sum_i W; the centring and
normalisation are differentiated by autograd outside. Products and sums are in fixed orders:
bit-identical at any CPU thread count. Memory O(block + N D).

Where PML's difference is exactly zero or tiny the formula leaves a rounding residue, which
AvgNonZeroReducer would count differently: pairs of equal (normalised) rows get d = 0 exactly
(`_equal_row_ids`, one torch.unique of the rows), d is clamped at 0, and with pos_margin 0 every
positive pair of differing rows counts as non-zero, as PML's var(x - y) > 0 does.
"""
import torch

from .._autograd import applier
from .._determinism import fixed_order_sum
from ..distances import SNRDistance
from ..ops import pair_engine as pe
from ..ops.fixed_mm_op import fixed_mm
from ._common import block_masks, decline, row_sums
from .intra_pair_variance import (BACKEND, NON_FINITE, blocked_pairs_setup, drop_self_pairs, non_finite, pair_blocks,
                                  reduced_sub_losses, side_row_counts, side_row_sums)


def _snr(s, a_rows, b, equal=None):
    """d = (a + b - 2 s) / a for the block's rows (a_rows) and all columns (b); exactly 0 where
    `equal` marks a pair of equal rows (PML's var(x - y) of a zero difference; the formula leaves
    a rounding residue there, which AvgNonZeroReducer would count)."""
    d = ((a_rows[:, None] + b[None, :] - 2 * s) / a_rows[:, None]).clamp_(min=0)  # (a variance ratio)
    return d if equal is None else d.masked_fill_(equal, 0.0)


def _equal_row_ids(x, y):
    """(ids of x's rows, ids of y's rows), equal ids for equal rows, or None when no two rows are
    equal (then nothing needs marking). y None: y is x."""
    both = x if y is None else torch.cat([x, y])
    unique, ids = torch.unique(both, dim=0, return_inverse=True)
    if unique.shape[0] == both.shape[0]:
        return None
    return ids[:x.shape[0]], ids[x.shape[0]:] if y is not None else ids


def _equal_rows(ids, r0, r1):
    """The block's pairs of equal rows (None: there are none)."""
    return None if ids is None else ids[0][r0:r1, None] == ids[1][None, :]


def _snr_terms(d, same, margins, r0, exclude_diag):
    """Every pair's term: relu(d - pos_margin) for the positives, relu(neg_margin - d) for the
    negatives (by label); 0 for the self pairs."""
    dev = torch.where(same, d - margins[0], margins[1] - d)
    return drop_self_pairs(dev.relu_(), r0, exclude_diag)


def _nonzero_terms(term, same, equal, margins, r0, exclude_diag):
    """Which pairs' terms PML's AvgNonZeroReducer counts (> 0). With pos_margin 0, a positive pair's
    term is PML's var(x - y) / var(x): > 0 for any two rows that differ, also where the two differ
    only by rounding and the formula's d rounds to 0."""
    counted = term > 0
    if margins[0] != 0:
        return counted
    differ = same if equal is None else same & ~equal
    return drop_self_pairs(counted | differ, r0, exclude_diag)


def _snr_totals(x, y, a, b, labels, ref_labels, exclude_diag, margins, ids):
    """Per side: the total of the terms and how many are > 0."""
    n = x.shape[0]
    totals = torch.empty(2, n, dtype=x.dtype, device=x.device)
    nonzero = torch.empty(2, n, dtype=torch.long, device=x.device)
    for r0, r1, s, same in pair_blocks(x, y, labels, ref_labels):
        equal = _equal_rows(ids, r0, r1)
        term = _snr_terms(_snr(s, a[r0:r1], b, equal), same, margins, r0, exclude_diag)
        totals[0, r0:r1], totals[1, r0:r1] = side_row_sums(term, same)
        nonzero[0, r0:r1], nonzero[1, r0:r1] = side_row_counts(_nonzero_terms(term, same, equal, margins, r0,
                                                                              exclude_diag), same)
    return [fixed_order_sum(totals[k]) for k in range(2)], [nonzero[k].sum() for k in range(2)]


def _materialised_totals(x, y, a, b, labels, ref_labels, exclude_diag, margins, ids):
    """The two totals through plain differentiable ops on the N x M matrix (create_graph=True)."""
    d = _snr(x @ y.T, a, b, _equal_rows(ids, 0, x.shape[0]))
    pos, neg = block_masks(labels, ref_labels, 0, exclude_diag)
    return (torch.where(pos, torch.relu(d - margins[0]), 0.0).sum(),
            torch.where(neg, torch.relu(margins[1] - d), 0.0).sum())


class _SNRTotals(torch.autograd.Function):
    """(total_pos, total_neg, nonzero_pos, nonzero_neg) of x~, y~ (centred rows) and a, b (their
    squared norms); the totals differentiable. y and b None: the columns are the rows (y is x).
    ids: `_equal_row_ids` of the (normalised) rows."""

    @staticmethod
    def forward(x, y, a, b, labels, ref_labels, exclude_diag, margins, ids):
        self_pairs = y is None
        y, b = (x, a) if self_pairs else (y, b)
        totals, nonzero = _snr_totals(x, y, a, b, labels, ref_labels, exclude_diag, margins, ids)
        return totals[0], totals[1], nonzero[0], nonzero[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, a, b, labels, ref_labels, exclude_diag, margins, ids = inputs
        ctx.self_pairs = y is None
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        if ctx.self_pairs:
            ctx.save_for_backward(x, a, labels, ref_labels)
        else:
            ctx.save_for_backward(x, a, labels, ref_labels, y, b)
        ctx.config = (exclude_diag, margins, ids)

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, *_constant_outputs):
        x, a, labels, ref_labels, *columns = ctx.saved_tensors
        y, b = (x, a) if ctx.self_pairs else columns
        exclude_diag, margins, ids = ctx.config
        nones = (None,) * 5
        if grad_pos is None and grad_neg is None:
            return None, None, None, None, *nones
        upstream = [g.to(x.dtype) if g is not None else torch.zeros((), dtype=x.dtype, device=x.device)
                    for g in (grad_pos, grad_neg)]
        if pe.backward_needs_graph(x):
            # a and b are recomputed from x and y, so their share goes to x and y: autograd.grad with
            # respect to x (not a leaf) would also follow the graph from x to the a given here.
            def totals(x, y=None):
                y = x if ctx.self_pairs else y
                return _materialised_totals(x, y, _squared_norms(x), _squared_norms(y), labels, ref_labels,
                                            exclude_diag, margins, ids)
            inputs = (x,) if ctx.self_pairs else (x, y)
            needs = (ctx.needs_input_grad[0] or ctx.needs_input_grad[2],
                     ctx.needs_input_grad[1] or ctx.needs_input_grad[3])
            grads = pe.reference_gradient(totals, inputs, needs[:len(inputs)], tuple(upstream))
            return grads[0], None if ctx.self_pairs else grads[1], None, None, *nones
        grad_x, grad_a = torch.empty_like(x), torch.empty_like(a)
        grad_y, grad_b = torch.zeros_like(y), torch.zeros_like(b)
        for r0, r1, s, same in pair_blocks(x, y, labels, ref_labels):
            a_rows = a[r0:r1]
            equal = _equal_rows(ids, r0, r1)
            d = _snr(s, a_rows, b, equal)
            active = _snr_terms(d, same, margins, r0, exclude_diag) > 0  # the terms' relu slope
            if equal is not None:
                active &= ~equal  # d = 0 there: no gradient (PML's, of a zero difference)
            w = torch.where(same, upstream[0], -upstream[1]).mul_(active) / a_rows[:, None]  # dL/dd / a
            grad_x[r0:r1] = fixed_mm(w, y.T).mul_(-2)
            grad_a[r0:r1] = row_sums(w * (1 - d))
            # the blocks in order: deterministic; b's share as a product (a fixed-order column sum)
            grad_y += fixed_mm(w.T, x[r0:r1].T).mul_(-2)
            grad_b += fixed_mm(w.T, torch.ones_like(a_rows)[None, :])[:, 0]
        if ctx.self_pairs:
            return grad_x.add_(grad_y), None, grad_a.add_(grad_b), None, *nones
        return grad_x, grad_y, grad_a, grad_b, *nones


snr_totals = applier(_SNRTotals)


def _squared_norms(x):
    return row_sums(x * x)


def _centred(x):
    """(x - row mean, squared norm of that per row): torch.var's numerator (times D - 1)."""
    centred = x - x.mean(dim=1, keepdim=True)
    return centred, _squared_norms(centred)


def _distance_reason(distance, embeddings):
    """Why the blocked path doesn't express this SNRDistance call, or None."""
    if type(distance) is not SNRDistance or distance.power != 1 or distance.is_inverted:
        return f"distance {type(distance).__name__} with power {getattr(distance, 'power', None)}"
    if embeddings.shape[1] < 2:
        return "embeddings of width 1 (PML's unbiased variance is NaN)"
    return None


def snr_contrastive(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The fused SignalToNoiseRatioContrastiveLoss (all pairs, Mean / AvgNonZero / Sum reducers), or
    None after `decline` (the reference runs)."""
    early, setup = blocked_pairs_setup(module, _distance_reason(module.distance, embeddings), embeddings, labels,
                                       indices_tuple, ref_emb, ref_labels)
    if setup is None:
        return early
    kinds, labels, ref_labels, ref_emb, exclude_diag, stats, degenerate = setup
    # PML's own normalisation (in the input dtype, also under autocast: SNR has no product to round for)
    rows = module.distance.maybe_normalize
    x_rows = rows(embeddings)
    y_rows = None if ref_emb is embeddings else rows(ref_emb)
    ids = _equal_row_ids(x_rows.detach(), None if y_rows is None else y_rows.detach())
    x, a = _centred(x_rows)
    y, b = (None, None) if y_rows is None else _centred(y_rows)
    if bool((a == 0).any()):  # (eager only: blocked_plan_reason declined under torch.compile)
        return decline(module, "a constant embedding row (zero variance: SNRDistance divides by it)")
    margins = (float(module.pos_margin), float(module.neg_margin))
    t_pos, t_neg, nz_pos, nz_neg = snr_totals(x, y, a, b, labels, ref_labels, exclude_diag, margins, ids)
    if non_finite(t_pos, t_neg):
        return decline(module, NON_FINITE)
    counts = (stats.pos_total, stats.neg_total)
    return reduced_sub_losses(kinds, (t_pos, t_neg), (nz_pos, nz_neg), counts, degenerate, embeddings), BACKEND
