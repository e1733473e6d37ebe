"""TupletMargin on the engine: per positive pair (a, p),
log(1 + sum_{n: label_n != label_a} e^(scale (s_an - cos(acos(s_ap) - margin))))
= softplus(L_a - scale cos(acos(s_ap) - margin)), with L_a = log sum_n e^(scale s_an) from one lse2
pass (the negatives' column); s_ap on the listed positive pairs only (O(pairs D), chunked). PML
builds a (pairs x negative pairs) matrix."""
import torch

from .._autograd import applier
from ..engine_spec import EngineParams
from ._common import decline, is_unit_cosine
from ._epilogue import ZERO_LOSS, _log1p_exp, _lse2, _pair_inputs, _plain_backend, _stats_with_pair_rule


def positive_pairs(labels, ref_labels, exclude_diag):
    """All pairs (a, p) with labels[a] == ref_labels[p] (a != p when exclude_diag), in PML's
    row-major order (torch.where of the match matrix), in O(N + M + pairs): for each query row the
    run of its label among the stably sorted reference labels (ascending indices)."""
    sorted_ref, ref_order = torch.sort(ref_labels, stable=True)
    start = torch.searchsorted(sorted_ref, labels)
    count = torch.searchsorted(sorted_ref, labels, right=True) - start
    rows = torch.arange(len(labels), device=labels.device)
    a = torch.repeat_interleave(rows, count)
    first = torch.cumsum(count, 0) - count
    offset = torch.arange(len(a), device=labels.device) - first.index_select(0, a)
    p = ref_order.index_select(0, start.index_select(0, a) + offset)
    if exclude_diag:
        keep = p != a
        a, p = a[keep], p[keep]
    return a, p


class _PairDots(torch.autograd.Function):
    """<x_a, y_p> for a list of pairs (y None: y is x), in chunks: O(pairs) memory instead of
    O(pairs x D). The backward sums each row's pairs with index_add_ (serial on the CPU:
    reproducible at any thread count)."""

    CHUNK = 1 << 14  # pairs per chunk: a few (chunk x D) buffers at a time

    @staticmethod
    def forward(x, y, a, p):
        y = x if y is None else y
        out = x.new_empty(len(a))
        for c in range(0, len(a), _PairDots.CHUNK):
            sl = slice(c, c + _PairDots.CHUNK)
            out[sl] = (x.index_select(0, a[sl]) * y.index_select(0, p[sl])).sum(dim=1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, a, p = inputs
        ctx.self_pairs = y is None
        ctx.save_for_backward(x, x if y is None else y, a, p)

    @staticmethod
    def backward(ctx, grad):  # differentiable ops: a gradient that create_graph=True can differentiate
        x, y, a, p = ctx.saved_tensors
        gx = torch.zeros_like(x)
        gy = gx if ctx.self_pairs else torch.zeros_like(y)
        for c in range(0, len(a), _PairDots.CHUNK):
            sl = slice(c, c + _PairDots.CHUNK)
            g = grad[sl, None].to(x.dtype)
            gx = gx.index_add(0, a[sl], g * y.index_select(0, p[sl]))
            if ctx.self_pairs:
                gx = gx.index_add(0, p[sl], g * x.index_select(0, a[sl]))
            else:
                gy = gy.index_add(0, p[sl], g * x.index_select(0, a[sl]))
        return gx, None if ctx.self_pairs else gy, None, None


_apply_pair_dots = applier(_PairDots)


def tuplet_margin(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    backend = _plain_backend(module, embeddings, labels, indices_tuple, is_unit_cosine)
    if backend is None:
        return None
    module.reset_stats()  # PML's forward does (avg_pos_angle / avg_neg_angle)
    if module.collect_stats:
        return decline(module, "collect_stats with TupletMarginLoss (avg_neg_angle needs every negative pair)")
    if ref_labels.shape[0] != ref_emb.shape[0]:
        return decline(module, "ref_labels of another length than ref_emb")
    exclude_diag = ref_labels is labels  # PML's get_all_pairs_indices: the self-pairs by identity
    stats, degenerate = _stats_with_pair_rule(labels, ref_labels)
    if degenerate.now():  # the pair list has a data-dependent size anyway
        return ZERO_LOSS
    scale, margin = float(module.scale), float(module.margin)
    x, y = _pair_inputs(embeddings, ref_emb)
    lse = _lse2(x, y, labels, ref_labels, EngineParams(sc_pos=0.0, sc_neg=scale), exclude_diag, backend)
    a, p = positive_pairs(labels, ref_labels, exclude_diag)
    s_ap = _apply_pair_dots(x, None if y is x else y, a, p).to(lse.dtype)
    shifted = torch.cos(torch.acos(s_ap.clamp(-1, 1)) - margin)  # the reference's clamp (PML: NaN past 1)
    # index_select: its backward (index_add) is serial on the CPU; indexing's is not (atomics)
    losses = _log1p_exp(lse[:, 1].index_select(0, a) - scale * shifted)  # no negative: log(1) = 0
    return {"loss": {"losses": losses.to(embeddings.dtype).unsqueeze(1), "indices": (a, p),
                     "reduction_type": "pos_pair"}}, backend
