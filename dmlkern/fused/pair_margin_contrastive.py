"""ContrastiveLoss on a PairMarginMiner's pairs without listing them (backend "blocked").

The miner keeps the positive pairs with w > miner.pos_margin and the negative pairs with
w < miner.neg_margin, w its distance (a similarity: w < pos_margin, w > neg_margin). Both the
window w and the loss's value v follow from the unit rows' dot product s (`distance_kind`:
w, v = sqrt(2 - 2s) or s). One sweep over row blocks of s = x[r0:r1] @ yᵀ (`_BlockSweep`, in
buffers reused from block to block) finds each block's kept pairs: thresholds on s, then the
exact test on d for a Euclidean miner; listed where they are few, masked where they are many. It
sums each side's relu(v - pos_margin) / relu(neg_margin - v) (similarity: relu(pos_margin - v) /
relu(v - neg_margin)), how many of those terms are > 0 and how many pairs are kept: what the Mean,
AvgNonZero and Sum reducers need (`_common.reduced_sub_loss`). The backward gathers rows for the
kept pairs the forward saved (up to SAVED_PAIRS, every block listed), or recomputes each block,
puts dl/ds of its kept pairs into it and multiplies back (as intra_pair_variance.py's). Products
are `ops.fixed_mm` and sums in fixed orders, so the bits do not depend on the CPU thread count.
Memory O(block + N D), however many pairs the window keeps. That torch sweep runs where no kernel
does. On the CPU each block's sums, counts and live pairs (kept, term > 0: the only ones with a
gradient, saved up to SAVED_PAIRS) come from one C++ pass (dmlkern::pair_margin_live), and a
backward that recomputes takes dL/ds of each block from C++ too (dmlkern::pair_margin_rows' CPU
twin). On the Triton backend each block's window, terms and counts (and in the backward its dL/ds)
come from one kernel (triton/pair_margin_rows.py), the backward always recomputing; so on the C++
backend on a GPU (csrc/cuda/pair_margin_rows_cuda.cu).

The window is applied to these values; PML's miner decides on its own `torch.cdist` matrix, so a
pair within a rounding error of a miner margin may be kept by one and not the other (as for the
Triplet-Margin miner's window, fused/triplet.py). Embeddings with a NaN or infinite value go to
the listed path (which runs the reference): PML's pairwise-distance backward spreads the NaN
into every row's gradient.
"""
from typing import NamedTuple

import torch

from .._autograd import applier
from .._determinism import fixed_order_sum
from ..ops import pair_engine as pe
from ..ops.dispatch import extension_loaded
from ..ops.fixed_mm_op import fixed_mm
from ..triton import triton_available
from ._common import Buffers, Degenerate, has_short_rows, reduced_sub_loss, row_blocks, small_problem, unit_rows
from ._epilogue import ZERO_LOSS, _already_reduced, reduced_kinds_or_reason
from .intra_pair_variance import (REDUCER_KINDS, SUB_LOSSES, blocked_plan_reason, drop_self_pairs, graph_grads,
                                  side_upstreams)
from .pair_lists import PairDots, unit_distance
from .triplet import distance_kind

triton_rows = None  # triton/pair_margin_rows.py, when triton is installed
if triton_available():
    from ..triton import pair_margin_rows as triton_rows
# The CUDA C++ kernel (dmlkern::pair_margin_rows, csrc/cuda/pair_margin_rows_cuda.cu): the C++
# backend's on a GPU. Its CPU implementation runs the same per-thread bodies
# (csrc/pair_margin_rows.h) in loops.
# On the CPU the forward runs dmlkern::pair_margin_live (the same pair maths, listing the live
# pairs for the backward) and a backward that recomputes blocks runs this kernel's CPU twin.
_CPP_ROWS = extension_loaded() and hasattr(torch.ops.dmlkern, "pair_margin_rows")
_CPU_LIVE = extension_loaded() and hasattr(torch.ops.dmlkern, "pair_margin_live")
CPP_ROWS_DEVICES = ("cpu", "cuda")
if _CPU_LIVE:
    @torch.library.register_fake("dmlkern::pair_margin_live")
    def _pair_margin_live_fake(s, row_labels, col_labels, row0, exclude_diag, params, flags, thresholds, list_live):
        live = torch.library.get_ctx().new_dynamic_size()
        return (s.new_empty(2), s.new_empty(4, dtype=torch.long), s.new_empty((live, 2), dtype=torch.long),
                s.new_empty(live, dtype=torch.int8))
if _CPP_ROWS:
    @torch.library.register_fake("dmlkern::pair_margin_rows")
    def _pair_margin_rows_fake(s, row_labels, col_labels, row0, exclude_diag, params, flags, coef):
        if coef is not None:
            return s.new_empty(0), s.new_empty(0, dtype=torch.long), s.new_empty(s.shape)
        return s.new_empty(2), s.new_empty(4, dtype=torch.long), s.new_empty((0, 0))

BACKEND = "blocked"
NON_FINITE = "a NaN or infinite embedding"


class MarginPairRule(NamedTuple):
    """The loss's value and margins, and the miner's window, both on unit rows."""
    loss_euclidean: bool  # v = sqrt(2 - 2s), else v = s (cosine)
    pos_margin: float
    neg_margin: float
    miner_euclidean: bool  # w = sqrt(2 - 2s), else w = s
    miner_pos_margin: float
    miner_neg_margin: float
    triton: bool = False  # each block in the Triton kernel (triton/pair_margin_rows.py; the Triton backend)


DENSE_BLOCK_FRACTION = 1 / 16  # past this share of a block's pairs as candidates, masks instead of lists
_SLACK = 1e-3  # how far past a Euclidean miner margin's cosine the candidates reach (>> rounding)


def _cosine_thresholds(rule):
    """(t_pos, t_neg): the miner keeps at most the positive pairs with s < t_pos and the negative
    pairs with s > t_neg. Exact for a cosine miner; for the Euclidean one (d = sqrt(2 - 2s):
    d > m  <=>  s < 1 - m^2 / 2 for m >= 0) a superset by _SLACK that `_BlockSweep` then filters on d."""
    if not rule.miner_euclidean:
        return rule.miner_pos_margin, rule.miner_neg_margin
    mp, mn = rule.miner_pos_margin, rule.miner_neg_margin
    t_pos = 1 - mp * mp / 2 + _SLACK if mp >= 0 else float("inf")  # d > mp < 0: every (non-NaN) pair
    t_neg = 1 - mn * mn / 2 - _SLACK if mn > 0 else float("inf")  # d < mn <= 0: none
    return t_pos, t_neg


class _Side(NamedTuple):
    """One side's kept pairs of a block: listed (rows, cols, their s; mask None) where they are
    few, else the whole block's s with the kept ones' mask (rows, cols None)."""
    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


class _BlockSweep:
    """The row blocks of s = x[r0:r1] @ yᵀ with each side's kept pairs (`_Side`). Block-sized
    tensors live in buffers reused from block to block (`_common.Buffers`): fresh ones each block
    make glibc's heap grow by several blocks' worth (its dynamic mmap threshold), with the few
    kept pairs of a sparse block listed in between."""

    def __init__(self, x, y, labels, ref_labels, rule, exclude_diag):
        self.x, self.y, self.labels, self.ref_labels = x, y, labels, ref_labels
        self.rule, self.exclude_diag = rule, exclude_diag
        self.t_pos, self.t_neg = _cosine_thresholds(rule)
        self.f = Buffers(x)
        self.b = Buffers(torch.empty(0, dtype=torch.bool, device=x.device))
        self._d, self._d_of = None, None  # the "d" buffer and the block it holds the distances of

    def blocks(self):
        """(r0, r1, s, (positive side, negative side)) per row block, in order."""
        m = self.y.shape[0]
        for r0, r1 in row_blocks(self.x.shape[0], m, self.x.device):
            n = r1 - r0
            s = fixed_mm(self.x[r0:r1], self.y, out=self.f.get("s", n, m))
            same = torch.eq(self.labels[r0:r1, None], self.ref_labels[None, :], out=self.b.get("same", n, m))
            yield r0, r1, s, self._sides(s, same, r0)

    def _sides(self, s, same, r0):
        n, m = s.shape
        pos = torch.lt(s, self.t_pos, out=self.b.get("pos", n, m)).logical_and_(same)
        drop_self_pairs(pos, r0, self.exclude_diag)
        neg = torch.gt(s, self.t_neg, out=self.b.get("neg", n, m)).masked_fill_(same, False)
        if int(pos.count_nonzero()) + int(neg.count_nonzero()) <= DENSE_BLOCK_FRACTION * s.numel():
            return self._listed(s, pos, neg)
        rule = self.rule
        if rule.miner_euclidean:
            d = self.distances(s)
            cut = self.b.get("cut", n, m)
            pos.logical_and_(torch.gt(d, rule.miner_pos_margin, out=cut))
            neg.logical_and_(torch.lt(d, rule.miner_neg_margin, out=cut))
        return _Side(None, None, s, pos), _Side(None, None, s, neg)

    def _listed(self, s, pos, neg):
        out = []
        for mask, keep in ((pos, lambda d: d > self.rule.miner_pos_margin),
                           (neg, lambda d: d < self.rule.miner_neg_margin)):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            values = s[rows, cols]
            if self.rule.miner_euclidean:
                k = keep(unit_distance(values))
                rows, cols, values = rows[k], cols[k], values[k]
            out.append(_Side(rows, cols, values, None))
        return out

    def distances(self, s):
        """sqrt(max(2 - 2s, 0)) of the block in the "d" buffer (unit_distance's values, bit for bit)."""
        n, m = s.shape
        if self._d_of is not s:
            self._d = torch.mul(s, -2, out=self.f.get("d", n, m)).add_(2).clamp_(min=0).sqrt_()
            self._d_of = s
        return self._d

    def dense_terms(self, s, side, mask):
        """The side's terms of a dense block in the "term" buffer, 0 at the pairs not kept."""
        rule = self.rule
        n, m = s.shape
        v = self.distances(s) if rule.loss_euclidean else s
        t = self.f.get("term", n, m)
        sub_margin = (side == 0) == rule.loss_euclidean  # relu(v - margin), else relu(margin - v)
        margin = rule.pos_margin if side == 0 else rule.neg_margin
        if sub_margin:
            torch.sub(v, margin, out=t)
        else:
            torch.neg(v, out=t).add_(margin)
        return t.relu_().masked_fill_(torch.logical_not(mask, out=self.b.get("cut", n, m)), 0.0)

    def dense_grads(self, s, sides, coef, g):
        """g (zeroed) += dl/ds of the dense block's kept pairs whose term is > 0."""
        n, m = s.shape
        for side, block in enumerate(sides):
            live = torch.gt(self.dense_terms(s, side, block.mask), 0, out=self.b.get("live", n, m))
            g.masked_fill_(live, coef[side])  # (the two sides' pairs are disjoint)
        if self.rule.loss_euclidean:  # dv/ds = -1/d, 0 where d = 0
            d = self.distances(s)
            g.div_(d).neg_().masked_fill_(torch.eq(d, 0, out=self.b.get("cut", n, m)), 0.0)
        return g


def _terms(s, rule, side):
    """(v, the side's term relu(v - pos_margin) / relu(neg_margin - v); similarity: relu(pos_margin - v)
    / relu(v - neg_margin)) of listed pairs' dot products s."""
    v = unit_distance(s) if rule.loss_euclidean else s
    if side == 0:
        return v, torch.relu(v - rule.pos_margin if rule.loss_euclidean else rule.pos_margin - v)
    return v, torch.relu(rule.neg_margin - v if rule.loss_euclidean else v - rule.neg_margin)


SAVED_PAIRS = 1 << 21  # kept pairs the forward keeps for the backward (~40 MiB); past that it recomputes


class _KeptPairs:
    """The kept pairs of a sweep, block by block, while there are at most SAVED_PAIRS of them and
    every block listed them: (rows, cols, s, side) with global row indices; else None."""

    def __init__(self, saving=True):
        self.parts, self.count = ([] if saving else None), 0

    def add(self, r0, side, block):
        if block.mask is not None:  # a dense block: the backward recomputes
            self.parts = None
            return
        self.add_pairs(block.rows + r0, block.cols, block.values, torch.full_like(block.rows, side, dtype=torch.int8))

    def add_pairs(self, rows, cols, values, sides):
        if self.parts is None:
            return
        self.count += len(rows)
        if self.count > SAVED_PAIRS:
            self.parts = None
            return
        self.parts.append((rows, cols, values, sides))

    def tensors(self, like):
        """(rows, cols, s, side), or four empty tensors and False."""
        if not self.parts:
            empty = torch.empty(0, dtype=torch.long, device=like.device)
            return (empty, empty, like.new_empty(0), empty.to(torch.int8)), self.parts is not None
        return tuple(torch.cat(t) for t in zip(*self.parts)), True


class _CppRows:
    """dmlkern::pair_margin_rows (the CUDA C++ kernel) with triton_rows' block_totals / block_grads."""

    @staticmethod
    def rule_args(rule):
        """The ops' params and flags."""
        return ([rule.pos_margin, rule.neg_margin, rule.miner_pos_margin, rule.miner_neg_margin],
                [int(rule.loss_euclidean), int(rule.miner_euclidean)])

    @staticmethod
    def _call(s, labels_b, ref_labels, row0, rule, exclude_diag, coef):
        return torch.ops.dmlkern.pair_margin_rows.default(s, labels_b, ref_labels, row0, exclude_diag,
                                                  *_CppRows.rule_args(rule), coef)

    @staticmethod
    def block_totals(s, labels_b, ref_labels, row0, rule, exclude_diag):
        return _CppRows._call(s, labels_b, ref_labels, row0, rule, exclude_diag, None)[:2]

    @staticmethod
    def block_grads(s, labels_b, ref_labels, row0, rule, exclude_diag, coef):
        return _CppRows._call(s, labels_b, ref_labels, row0, rule, exclude_diag, coef)[2]


def _kernel_blocks(x, y, rule):
    """(kernel, the row blocks of s = x[r0:r1] @ yᵀ) when a kernel runs each block: the Triton one
    on the Triton backend, else the C++ one (`_CppRows`: CUDA, or its CPU twin); None: the torch
    sweep's."""
    if rule.triton and triton_rows.supports(x):
        kernel = triton_rows
    elif _CPP_ROWS and x.device.type in CPP_ROWS_DEVICES and x.dtype in (torch.float32, torch.float64):
        kernel = _CppRows
    else:
        return None
    return kernel, ((r0, r1, fixed_mm(x[r0:r1], y)) for r0, r1 in row_blocks(x.shape[0], y.shape[0], x.device))


def _margin_pair_totals(x, y, labels, ref_labels, rule, exclude_diag):
    """Forward sweep: per side the total, the number of terms > 0 and of kept pairs (each block's
    partial sums summed in block order: bits independent of the thread count); and the kept
    pairs (`_KeptPairs`; none saved on a kernel's path, whose backward recomputes each block)."""
    if _CPU_LIVE and x.device.type == "cpu" and "cpu" in CPP_ROWS_DEVICES and not rule.triton:
        return _live_totals(x, y, labels, ref_labels, rule, exclude_diag)
    kernel_blocks = _kernel_blocks(x, y, rule)
    if kernel_blocks is not None:
        kernel, blocks = kernel_blocks
        parts = [kernel.block_totals(s, labels[r0:r1], ref_labels, r0, rule, exclude_diag) for r0, r1, s in blocks]
        sums = torch.stack([p[0] for p in parts]).sum(dim=0)
        counts = torch.stack([p[1] for p in parts]).sum(dim=0)
        return list(sums.unbind(0)), list(counts.unbind(0)), _KeptPairs(saving=False)
    parts = [[], []]
    counts = torch.zeros(4, dtype=torch.long, device=x.device)
    kept = _KeptPairs()
    sweep = _BlockSweep(x, y, labels, ref_labels, rule, exclude_diag)
    for r0, _, s, sides in sweep.blocks():
        for side, block in enumerate(sides):
            if block.mask is None:
                term = _terms(block.values, rule, side)[1]
                counts[2 + side] += term.numel()
            else:
                term = sweep.dense_terms(s, side, block.mask)
                counts[2 + side] += block.mask.count_nonzero()
            parts[side].append(fixed_order_sum(term).reshape(1))
            counts[side] += term.count_nonzero()  # (terms are >= 0, NaN excluded by the caller)
            kept.add(r0, side, block)
    totals = [fixed_order_sum(torch.cat(p)) if p else x.new_zeros(()) for p in parts]
    return totals, list(counts.unbind(0)), kept


def _live_totals(x, y, labels, ref_labels, rule, exclude_diag):
    """`_margin_pair_totals` on the CPU in C++ (dmlkern::pair_margin_live): per row block its totals
    and its live pairs (kept, term > 0: the only ones with a gradient), saved while there are at
    most SAVED_PAIRS; s in one buffer reused from block to block."""
    thresholds = list(_cosine_thresholds(rule))
    f = Buffers(x)
    sums, counts, kept = [], [], _KeptPairs()
    for r0, r1 in row_blocks(x.shape[0], y.shape[0], x.device):
        s = fixed_mm(x[r0:r1], y, out=f.get("s", r1 - r0, y.shape[0]))
        block_sums, block_counts, pairs, sides = torch.ops.dmlkern.pair_margin_live.default(
            s, labels[r0:r1], ref_labels, r0, exclude_diag, *_CppRows.rule_args(rule), thresholds,
            kept.parts is not None)
        sums.append(block_sums)
        counts.append(block_counts)
        rows, cols = pairs.unbind(1)
        kept.add_pairs(rows + r0, cols, s[rows, cols], sides)
    return (list(torch.stack(sums).sum(dim=0).unbind(0)), list(torch.stack(counts).sum(dim=0).unbind(0)), kept)


def _materialised_totals(x, y, labels, ref_labels, rule, exclude_diag):
    """(positive total, negative total) through plain differentiable ops on the whole N x M matrix:
    the gradient with a graph for create_graph=True."""
    s = x @ y.T
    sweep = _BlockSweep(x.detach(), y.detach(), labels, ref_labels, rule, exclude_diag)
    same = labels[:, None] == ref_labels[None, :]
    totals = []
    for side, block in enumerate(sweep._sides(s.detach(), same, 0)):
        if block.mask is None:
            totals.append(_terms(s[block.rows, block.cols], rule, side)[1].sum())
        else:
            totals.append(torch.where(block.mask, _terms(s, rule, side)[1], 0.0).sum())
    return tuple(totals)


def _pair_grads(values, side, rule, coef):
    """dl/ds of listed kept pairs of one side (0 where the term is 0; dv/ds = -1/d, 0 where d = 0)."""
    v, term = _terms(values, rule, side)
    g = torch.where(term > 0, coef[side], 0.0)
    if rule.loss_euclidean:
        g = torch.where(v == 0, 0.0, -(g / v))
    return g


def _grads_from_kept(x, y, kept, rule, coef):
    """(grad_x, grad_y) from the saved kept pairs: per pair dl/ds times the other row, summed per row
    with index_add (serial on a CPU: the bits do not depend on the thread count), in chunks."""
    rows, cols, values, side = kept
    g = torch.empty_like(values)
    for k in (0, 1):
        on_side = side == k
        g[on_side] = _pair_grads(values[on_side], k, rule, coef)
    live = g != 0
    rows, cols, g = rows[live], cols[live], g[live]
    grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
    for c in range(0, len(g), PairDots.CHUNK):
        sl = slice(c, c + PairDots.CHUNK)
        w = g[sl, None]
        grad_x.index_add_(0, rows[sl], w * y.index_select(0, cols[sl]))
        grad_y.index_add_(0, cols[sl], w * x.index_select(0, rows[sl]))
    return grad_x, grad_y


def _block_grads(x, y, labels, ref_labels, rule, exclude_diag, coef):
    """(r0, r1, dl/ds of the block's kept pairs) per row block, in order: a kernel's, or the torch
    sweep's."""
    kernel_blocks = _kernel_blocks(x, y, rule)
    if kernel_blocks is not None:
        kernel, blocks = kernel_blocks
        coef = torch.stack(coef).to(x.dtype)
        for r0, r1, s in blocks:
            yield r0, r1, kernel.block_grads(s, labels[r0:r1], ref_labels, r0, rule, exclude_diag, coef)
        return
    sweep = _BlockSweep(x, y, labels, ref_labels, rule, exclude_diag)
    for r0, r1, s, sides in sweep.blocks():
        g = sweep.f.get("g", *s.shape).zero_()
        if sides[0].mask is None:
            for side, block in enumerate(sides):
                g[block.rows, block.cols] = _pair_grads(block.values, side, rule, coef)  # (each pair once)
        else:
            sweep.dense_grads(s, sides, coef, g)
        yield r0, r1, g


def _grads_by_blocks(x, y, labels, ref_labels, rule, exclude_diag, coef):
    """(grad_x, grad_y) recomputing each block: its kept pairs' dl/ds in the block, then
    grad_x = G_b y, grad_y += G_bᵀ x_b in block order."""
    grad_x = torch.empty_like(x)
    grad_y = torch.zeros_like(y)
    for r0, r1, g in _block_grads(x, y, labels, ref_labels, rule, exclude_diag, coef):
        grad_x[r0:r1] = fixed_mm(g, y.T)
        grad_y += fixed_mm(g.T, x[r0:r1].T)  # the blocks in order: deterministic
    return grad_x, grad_y


class _MarginPairTotals(torch.autograd.Function):
    """(positive total, negative total, their numbers of terms > 0, their numbers of kept pairs):
    the totals differentiable in x and y (y None: y is x). Up to SAVED_PAIRS kept pairs are saved
    for the backward (a few gathered rows per pair); more, and it recomputes each block."""

    @staticmethod
    def forward(x, y, labels, ref_labels, rule, exclude_diag):
        totals, counts, kept = _margin_pair_totals(x, x if y is None else y, labels, ref_labels, rule,
                                                   exclude_diag)
        kept, complete = kept.tensors(x)
        return (*totals, *counts, *kept, torch.tensor(complete))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, labels, ref_labels, rule, exclude_diag = inputs
        ctx.self_pairs = y is None
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)
        ctx.kept_saved = bool(output[-1])
        ctx.save_for_backward(x, x if y is None else y, labels, ref_labels, *output[6:10])
        ctx.config = (rule, exclude_diag)

    @staticmethod
    def backward(ctx, grad_pos, grad_neg, *_constant_outputs):
        x, y, labels, ref_labels, *kept = ctx.saved_tensors
        rule, exclude_diag = ctx.config
        nones = (None,) * 4
        if grad_pos is None and grad_neg is None:
            return None, None, *nones
        upstream = side_upstreams(grad_pos, grad_neg, x)
        if pe.backward_needs_graph(x):
            return *graph_grads(ctx, x, y, upstream, lambda x, y: _materialised_totals(
                x, y, labels, ref_labels, rule, exclude_diag)), *nones
        # d term / dv on the kept pairs whose term is > 0: +-1 by side and value kind
        sign = 1.0 if rule.loss_euclidean else -1.0
        coef = (sign * upstream[0].to(x.dtype), -sign * upstream[1].to(x.dtype))
        if ctx.kept_saved:
            grad_x, grad_y = _grads_from_kept(x, y, kept, rule, coef)
        else:
            grad_x, grad_y = _grads_by_blocks(x, y, labels, ref_labels, rule, exclude_diag, coef)
        if ctx.self_pairs:
            return grad_x.add_(grad_y), None, *nones
        return grad_x, grad_y, *nones


margin_pair_totals = applier(_MarginPairTotals)


def plan_reason(module, mined, embeddings, ref_emb):
    """Why the blocked path can't run ContrastiveLoss on this PairMarginMiner result (a str; the
    caller lists the pairs instead), or None."""
    reason = blocked_plan_reason(module, embeddings) or small_problem(embeddings, ref_emb)
    if reason is not None:
        return reason
    if distance_kind(module.distance) is None or module.distance.collect_stats:
        return f"the loss's distance {type(module.distance).__name__} (unit Euclidean or cosine only)"
    if mined.distance_kind is None:
        return f"the miner's distance {type(mined.distance).__name__} (unit Euclidean or cosine only)"
    if not (mined.shape_matches(embeddings, ref_emb) and mined.holds_inputs(embeddings, ref_emb)):
        return "the miner's pairs come from other embeddings (or they changed since mining)"
    if not (bool(torch.isfinite(embeddings).all()) and (ref_emb is embeddings or bool(torch.isfinite(ref_emb).all()))):
        return NON_FINITE  # (the listed path then runs the reference: PML's NaN gradients everywhere)
    if "euclidean" in (mined.distance_kind, distance_kind(module.distance)) and has_short_rows(embeddings, ref_emb):
        return "an embedding row shorter than 1e-12 (unit rows assumed)"
    return None


def pair_margin_contrastive(module, mined, embeddings, ref_emb):
    """ContrastiveLoss(embeddings, indices_tuple=mined, ref_emb=ref_emb) with `mined` a
    PairMarginMiner's lazy pairs (`lazy_pairs.LazyMarginPairs`): (loss_dict, backend), ZERO_LOSS
    for fewer than two pairs a side (PML's `len <= 1` rule), or a str saying why not."""
    reason = plan_reason(module, mined, embeddings, ref_emb)
    if reason is not None:
        return reason
    kinds = reduced_kinds_or_reason(module, SUB_LOSSES, REDUCER_KINDS)
    if isinstance(kinds, str):
        return kinds
    settings = mined.mining.settings
    rule = MarginPairRule(distance_kind(module.distance) == "euclidean", float(module.pos_margin),
                          float(module.neg_margin), mined.distance_kind == "euclidean",
                          settings["pos_margin"], settings["neg_margin"],
                          triton_rows is not None and pe.choose_backend(module.backend, embeddings.device) == "triton")
    labels, ref_labels = mined.mining_labels()
    exclude_diag = mined.mining.ref_labels_same  # PML's get_all_pairs_indices: (i, i) no positive pair
    cdist = rule.loss_euclidean or rule.miner_euclidean  # (one set of rows: the miner's picks as PML's when it is Lp)
    x = unit_rows(embeddings, cdist)
    y = None if ref_emb is embeddings else unit_rows(ref_emb, cdist)
    pos_total, neg_total, pos_nonzero, neg_nonzero, pos_count, neg_count, *_ = margin_pair_totals(
        x, y, labels, ref_labels, rule, exclude_diag)
    degenerate = Degenerate(labels, False)
    degenerate.include(lambda: (pos_count <= 1) & (neg_count <= 1))
    if degenerate.returns_zero_now():
        return ZERO_LOSS
    loss_dict = {}
    for name, total, nonzero, count in (("pos_loss", pos_total, pos_nonzero, pos_count),
                                        ("neg_loss", neg_total, neg_nonzero, neg_count)):
        kind, reducer = kinds[name]
        value = reduced_sub_loss(kind, total, nonzero, count, reducer, embeddings)
        loss_dict[name] = _already_reduced(degenerate.zero_where(value.to(embeddings.dtype)), embeddings)
    return loss_dict, BACKEND
