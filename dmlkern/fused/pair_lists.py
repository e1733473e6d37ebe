"""Pairs listed by index, for the fused paths that work on a list instead of an N x M matrix:
every same-label pair in O(N + M + pairs) (`positive_pairs`), and <x_a, y_p> over a list of
pairs in chunks of rows gathered with index_select (`pair_dots`), reproducible at any CPU thread
count. TupletMarginLoss (`tuplet.py`), the listed pair losses (`listed_pairs.py`) and the listed
triplet losses (`listed_triplets.py`) use them."""
import torch

from .._autograd import applier


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


class PairDots(torch.autograd.Function):
    """<x_a, y_p> for a list of pairs (y None: y is x), in chunks: O(pairs) memory instead of
    O(pairs x D). The backward sums each row's pairs with index_add (serial on the CPU:
    reproducible at any thread count)."""

    CHUNK = 1 << 14  # pairs per chunk: a few (chunk x D) buffers at a time

    @staticmethod
    def chunk(x, y):
        """Pairs per chunk: CHUNK, but a (chunk x D) buffer no larger than the N x M matrix the
        reference would hold (small batches), and at least 256 pairs."""
        return max(256, min(PairDots.CHUNK, x.shape[0] * y.shape[0] // max(x.shape[1], 1)))

    @staticmethod
    def forward(x, y, a, p):
        y = x if y is None else y
        out = x.new_empty(len(a))
        step = PairDots.chunk(x, y)
        for c in range(0, len(a), step):
            sl = slice(c, c + step)
            out[sl] = (x.index_select(0, a[sl]) * y.index_select(0, p[sl])).sum(dim=1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, a, p = inputs
        ctx.self_pairs = y is None
        ctx.save_for_backward(x, x if y is None else y, a, p)

    @staticmethod
    def backward(ctx, grad):
        x, y, a, p = ctx.saved_tensors
        # create_graph=True: out-of-place index_add, a gradient autograd can differentiate; else in
        # place (out of place copies the whole N x D gradient per chunk)
        differentiable = torch.is_grad_enabled()
        gx = torch.zeros_like(x)
        gy = gx if ctx.self_pairs else torch.zeros_like(y)

        def add(acc, rows, values):
            return acc.index_add(0, rows, values) if differentiable else acc.index_add_(0, rows, values)

        step = PairDots.chunk(x, y)
        for c in range(0, len(a), step):
            sl = slice(c, c + step)
            g = grad[sl, None].to(x.dtype)
            gx = add(gx, a[sl], g * y.index_select(0, p[sl]))
            if ctx.self_pairs:
                gx = add(gx, p[sl], g * x.index_select(0, a[sl]))
            else:
                gy = add(gy, p[sl], g * x.index_select(0, a[sl]))
        return gx, None if ctx.self_pairs else gy, None, None


pair_dots = applier(PairDots)


def unit_distance(s):
    """sqrt(max(2 - 2s, 0)), the Euclidean distance of unit rows, without a gradient where it is 0
    (the engine's convention)."""
    inner = torch.clamp(2 - 2 * s, min=0)  # (NaN stays NaN)
    return torch.where(inner == 0, 0.0, torch.sqrt(torch.where(inner == 0, 1.0, inner)))
