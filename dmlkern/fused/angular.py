"""AngularLoss without a pairs x M matrix.

Per positive pair (a, p), with u the L2-normalised rows, x_n the raw reference rows, c = 4 tan²(α)
and k = 2 (1 + tan²(α)) (PML 2.9.0):

    loss_ap = log(1 + Σ_{n: label_n != label_a} exp(c (u_a + u_p)·x_n − k u_a·u_p))
            = softplus(log Σ_n e^(c s_an) e^(c s_pn) − k u_a·u_p),   s_an = u_a·x_n.

All pairs (`last_backend` "blocked"): a and p share a's class, hence its negatives, so over one
class the sums are a Gram product G = A·Bᵀ with A[a, n] = e^(c s_an − m_a) on a's negatives (0
elsewhere), m_a the row's largest c s_an there, B likewise for the positives' rows, and
log Σ = log G_ap + m_a + m_p. The rows are walked in blocks of whole classes (`_blocks`: up to
512 rows, ~4M similarity values): a block's similarity rows (deterministic `ops.fixed_mm`) give A
(and B: the same rows when the reference is the batch), and G comes per positive pair from the op
`pair_dots` on the CPU (each pair's sum alone: Σ_c n_c² M), elsewhere from one small product per
Gram group (whole classes, ≤ 32 rows; ~32 N M); the gradient's products with the pairs' weights
(W B, Wᵀ A below) likewise from `pair_row_sums`. The CPU's small products ran on one core at a
fraction of its rate: the Gram groups were ~25 % of a call at N=8192. Work: one N x M x D product
plus the pairs' sums; memory O(block x M + pairs).
With w_ap = dL/dloss_ap times sigmoid(z_ap) and W = c w / G, dL/ds_an = A[a, n] (W B)[a, n] and
dL/ds_pn = B[p, n] (Wᵀ A)[p, n]; the gradients of u and of the raw x follow by products, added
block by block in a fixed order (`_GradSums`): bit-identical at any CPU thread count. With PML's
MeanReducer (the default) dL/dloss_ap is 1 / pairs times the upstream scalar, so the walk forms
the mean and its gradients at once, each tile's A and B at hand, and the backward scales them:
3 (rows x M x D) products per block in all. Other reducers take the per-pair losses; their
backward walks again, recomputing each block's A and B (with the forward's row maxima; each
pair's z and G are kept from the forward): 4 products per block. A block's same-label entries
are set to -inf by flat index from its pairs (`_positive_entries`; no (rows x M) label
comparison), and the gradient of a block that is its own and only positive block turns A into
A ⊙ (W + Wᵀ) A in place, Gram group by Gram group (no second (rows x M) buffer).

The shifted exps are accurate while a pair's G is not tiny: the terms lost to underflow are each
below the dtype's smallest normal number, so G >= M · tiny / eps (≈ e^-61 in fp32 at M = 16384)
keeps the relative error within eps. Unit-norm rows have G >= e^(-2c) (e^-5.6 at α = 40°); when a
pair's G is smaller (rows of large norm: c s spans more than the dtype's exp range) the call is
left to the reference.

An indices_tuple (`last_backend` "listed"): its pairs (a, p) as listed (a triplet tuple's (a, p)
per triplet, duplicates kept, as PML), in chunks of pairs: c (u_a + u_p)·xᵀ for the chunk's rows
and a masked log-sum-exp per pair, as PML's product (O(pairs · M · D)) in O(chunk x M) memory.
"""
import math
from typing import NamedTuple

import torch

from .._autograd import applier
from .._determinism import fixed_order_sum, log as fixed_log
from .._tracing import static_shapes
from ..ops import pair_dots_op
from ..ops import pair_engine as pe
from ..ops.fixed_mm_op import fixed_mm
from ..reference.indices import convert_to_pairs, logsumexp
from . import _stats
from ._common import (Buffers, Degenerate, LabelStats, decline, is_plain_mean, is_unit_euclidean, no_pos_or_neg,
                      reference_backend_reason, row_sums, unit_rows, widened)
from ._epilogue import ZERO_LOSS, _log1p_exp, _pml_zeros
from .pair_lists import positive_pairs

BACKEND = "blocked"  # `last_backend` for all pairs: class blocks of Gram products
LISTED = "listed"  # `last_backend` for an indices_tuple's pairs
# Per block of rows: at most 4M similarity values (16 MiB in fp32) and 512 rows (its pair masks are rows x
# rows). Each block adds an (M x D) product into the gradient of x; its (rows x M) products are written
# into buffers reused from block to block (`Buffers`). At N=8192, 512-row blocks ran fwd+bwd in 0.88x
# the time of 256-row ones, 1024-row ones in 1.33x (measured with a fresh buffer per block).
_BLOCK_VALUES = 1 << 22
_BLOCK_ROWS = 512
_LISTED_VALUES = 1 << 21  # logits per chunk of listed pairs (8 MiB in fp32)
_GROUP_ROWS = 32  # rows per Gram product of small classes (the entries of two classes are wasted work)
UNSAFE = ("AngularLoss: a pair whose negatives' exp(c s) span more than the dtype's exp range "
          "(rows of large norm); the reference's per-pair log-sum-exp")


class _Setup(NamedTuple):
    """What the blocked forward and backward share besides the three differentiable inputs."""
    labels: torch.Tensor
    ref_labels: torch.Tensor
    blocks: list  # [(anchor rows, [(positive rows, groups, _Pairs), ...])] (`_blocks`, then `_tile_pairs`)
    first: torch.Tensor  # (N,) where each anchor's pairs start in the pair list
    rank: torch.Tensor  # (M,) each reference row's place among its class's rows
    exclude_diag: bool
    pairs: tuple  # (a, p): the pair list, PML's row-major order
    c: float
    k: float


def _sigmoid(z):
    """sigmoid(z) from exp and division (thread-count independent bits; 0 at z = -inf)."""
    return 1 / (1 + torch.exp(-z))


def _materialised(ua, up, x, setup):
    """PML's per-pair losses with autograd through plain ops (pairs x M memory): the
    differentiable gradient for create_graph=True."""
    a, p = setup.pairs
    xa, xp = ua[a], up[p]
    logits = setup.c * ((xa + xp) @ x.T) - setup.k * (xa * xp).sum(dim=1, keepdim=True)
    keep = setup.labels[a][:, None] != setup.ref_labels[None, :]
    return logsumexp(logits, keep_mask=keep, add_one=True).squeeze(1)


def _save(ctx, inputs, kept=()):
    """Saves the three differentiable inputs, then `kept` (forward results the backward reads)."""
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:3], *kept)
    ctx.setup = inputs[3]


def _reference_grads(ctx, grad, reduce=lambda losses: losses):
    """The gradients of (u_a, u_p, x) with their graph (create_graph=True): the reference's, of
    reduce(per-pair losses)."""
    # aliases: their own graph nodes, so that x's gradient is only its direct use (the unit rows
    # descend from x when the reference is the batch)
    aliases = [t.view_as(t) for t in ctx.saved_tensors[:3]]
    return pe.reference_gradient(lambda *t: reduce(_materialised(*t, ctx.setup)), aliases, ctx.needs_input_grad[:3],
                                 grad)


def _backward(ctx, grad, add_grads):
    """The gradients of (u_a, u_p, x, setup): add_grads(grad, u_a, u_p, x, setup, grad_ua, grad_up,
    grad_x, *kept) adds them into zeros; the reference's under create_graph=True."""
    if grad is None:
        return None, None, None, None
    ua, up, x, *kept = ctx.saved_tensors
    if pe.backward_needs_graph(x):
        return (*_reference_grads(ctx, grad), None)
    with torch.no_grad():
        grads = torch.zeros_like(ua), torch.zeros_like(up), torch.zeros_like(x)
        add_grads(grad, ua, up, x, ctx.setup, *grads, *kept)
    return (*grads, None)


# ----------------------------------------------------------------------------- all pairs, blocked
def _blocks(labels, ref_labels, m, exclude_diag, same_rows):
    """[(anchor rows, [(positive rows, groups), ...])] over the classes with pairs and negatives.
    Whole classes make Gram groups of ≤ _GROUP_ROWS rows (a larger class is a group of its own),
    consecutive groups a block of ≤ step = min(_BLOCK_ROWS, _BLOCK_VALUES / M) rows (at least
    _GROUP_ROWS); a class of more than step rows is cut into square tiles of step rows. groups:
    (a0, a1, p0, p1), a group's rows in the block's anchor and positive rows. With same_rows (the reference is the batch) a positive block `is`
    its anchor block when they are the same rows."""
    sorted_a, order_a = torch.sort(labels, stable=True)
    sorted_r, order_r = torch.sort(ref_labels, stable=True)
    classes, count_a = torch.unique_consecutive(sorted_a, return_counts=True)
    start_r = torch.searchsorted(sorted_r, classes)
    count_r = torch.searchsorted(sorted_r, classes, right=True) - start_r
    start_a = torch.cumsum(count_a, 0) - count_a
    step = max(_GROUP_ROWS, min(_BLOCK_ROWS, _BLOCK_VALUES // m))
    blocks, block_a, block_r, cuts = [], [], [], []  # the current block's class rows and groups

    def flush():
        if cuts:
            rows_a = torch.cat(block_a)
            blocks.append((rows_a, [(rows_a if same_rows else torch.cat(block_r), list(cuts))]))
            block_a.clear(), block_r.clear(), cuts.clear()

    for sa, na, sr, nr in zip(start_a.tolist(), count_a.tolist(), start_r.tolist(), count_r.tolist()):
        if nr == m or na * nr == (na if exclude_diag else 0):
            continue  # no negative, or no pair
        rows_a, rows_r = order_a[sa:sa + na], order_r[sr:sr + nr]
        if max(na, nr) > step:
            flush()
            for i in range(0, na, step):
                tile_a = rows_a[i:i + step]
                blocks.append((tile_a, [(tile_a if same_rows and j == i else rows_r[j:j + step],
                                         [(0, len(tile_a), 0, len(rows_r[j:j + step]))]) for j in range(0, nr, step)]))
            continue
        if cuts and (cuts[-1][1] + na > step or cuts[-1][3] + nr > step):
            flush()
        a0, p0 = (cuts[-1][1], cuts[-1][3]) if cuts else (0, 0)
        if cuts and a0 + na - cuts[-1][0] <= _GROUP_ROWS and p0 + nr - cuts[-1][2] <= _GROUP_ROWS:
            cuts[-1] = (cuts[-1][0], a0 + na, cuts[-1][2], p0 + nr)  # joins the last group
        else:
            cuts.append((a0, a0 + na, p0, p0 + nr))
        block_a.append(rows_a), block_r.append(rows_r)
    flush()
    return blocks


def _pair_slots(stats, ref_labels):
    """(first, rank): pair (a, p) is entry first[a] + rank[p] − [p > a] (that term when the
    self-pairs are excluded) of PML's row-major pair list."""
    first = torch.cumsum(stats.pos, 0) - stats.pos
    sorted_r, order_r = torch.sort(ref_labels, stable=True)
    in_run = torch.arange(len(order_r), device=order_r.device) - torch.searchsorted(sorted_r, sorted_r)
    return first, torch.empty_like(order_r).index_put_((order_r,), in_run)


def _exp_rows(u_rows, x, positives, c, out, m=None):
    """(A, m): A = exp(c s − m) on each row's negatives (0 elsewhere), m the row's largest c s
    there (given: the forward's). In place on the product, written into `out` (rows x M).
    positives: the flat indices of the rows' same-label entries (`_positive_entries`), or
    (row labels, reference labels) to compare (an (rows x M) mask)."""
    cs = fixed_mm(c * u_rows, x, out=out)
    if isinstance(positives, torch.Tensor):
        cs.view(-1).index_fill_(0, positives, -math.inf)
    else:
        cs.masked_fill_(positives[0][:, None] == positives[1][None, :], -math.inf)
    if m is None:
        m = cs.amax(dim=1, keepdim=True)
    return cs.sub_(m).exp_(), m


class _Pairs(NamedTuple):
    """The pairs of one tile (anchor block x positive block)."""
    i: torch.Tensor  # their entries' rows and columns in the tile
    j: torch.Tensor
    slots: torch.Tensor  # their places in the pair list


def _tile_pairs(setup, rows_a, rows_p):
    mask = setup.labels[rows_a][:, None] == setup.ref_labels[rows_p][None, :]
    if setup.exclude_diag:
        mask &= rows_a[:, None] != rows_p[None, :]
    i, j = mask.nonzero(as_tuple=True)
    pa, pp = rows_a.index_select(0, i), rows_p.index_select(0, j)
    slots = setup.first.index_select(0, pa) + setup.rank.index_select(0, pp)
    if setup.exclude_diag:
        slots -= (pp > pa).long()
    return _Pairs(i, j, slots)


def _positive_entries(setup, rows_a, positive_blocks, m):
    """The flat indices in the anchor block's (rows x M) A of its same-label entries: its tiles'
    pairs (their positive rows together are every reference row of the block's classes) and,
    with the self-pairs excluded, each row's own column (the reference is labelled as the batch);
    (row labels, reference labels) to compare instead where they are more than 1/8 of the block
    (an int64 index then outweighs the bool mask)."""
    count = sum(len(pairs.i) for _, _, pairs in positive_blocks) + (len(rows_a) if setup.exclude_diag else 0)
    if count * 8 > len(rows_a) * m:
        return setup.labels[rows_a], setup.ref_labels
    flat = [pairs.i * m + rows_p.index_select(0, pairs.j) for rows_p, _, pairs in positive_blocks]
    if setup.exclude_diag:
        flat.append(torch.arange(0, len(rows_a) * m, m, device=rows_a.device) + rows_a)
    return torch.cat(flat)


def _blocked_setup(stats, labels, ref_labels, m, exclude_diag, same_rows, c, k):
    """The blocked pass's `_Setup`: the pair list, its slots, the blocks and each tile's pairs."""
    first, rank = _pair_slots(stats, ref_labels)
    setup = _Setup(labels, ref_labels, None, first, rank, exclude_diag,
                   positive_pairs(labels, ref_labels, exclude_diag), c, k)
    blocks = _blocks(labels, ref_labels, m, exclude_diag, same_rows)
    return setup._replace(blocks=[(rows_a, [(rows_p, groups, _tile_pairs(setup, rows_a, rows_p))
                                            for rows_p, groups in tiles]) for rows_a, tiles in blocks])


class _Tile(NamedTuple):
    """One tile of `_walk`: an anchor block against one of its positive blocks."""
    rows_a: torch.Tensor
    ua_rows: torch.Tensor
    A: torch.Tensor
    m_a: torch.Tensor
    rows_p: torch.Tensor
    up_rows: torch.Tensor
    B: torch.Tensor
    m_p: torch.Tensor
    groups: list
    pairs: _Pairs
    only: bool  # the tile is its anchor block's one tile


def _walk(ua, up, x, setup, buffers, m_a_all=None, m_p_all=None):
    """Yields a `_Tile` per tile; rows_p is rows_a (and B is A) for a block that is its own
    positive block. m_a_all, m_p_all: the forward's row maxima (the backward's). Each anchor row is in one
    anchor block. A and B live in `buffers`; A alternates between two, so that a block's A is
    intact while the next block's is formed (the backward finishes a block after that)."""
    m = x.shape[0]
    for index, (rows_a, positive_blocks) in enumerate(setup.blocks):
        ua_rows = ua.index_select(0, rows_a)
        A, m_a = _exp_rows(ua_rows, x, _positive_entries(setup, rows_a, positive_blocks, m), setup.c,
                           buffers.get(index % 2, len(rows_a), m),
                           None if m_a_all is None else m_a_all.index_select(0, rows_a))
        for rows_p, groups, pairs in positive_blocks:
            if rows_p is rows_a:
                up_rows, B, m_p = ua_rows, A, m_a
            else:
                up_rows = up.index_select(0, rows_p)
                B, m_p = _exp_rows(up_rows, x, (setup.ref_labels[rows_p], setup.ref_labels), setup.c,
                                   buffers.get("B", len(rows_p), m),
                                   None if m_p_all is None else m_p_all.index_select(0, rows_p))
            yield _Tile(rows_a, ua_rows, A, m_a, rows_p, up_rows, B, m_p, groups, pairs, len(positive_blocks) == 1)


def _tile_z(tile, k, buffers):
    """(z, G) of a tile's pairs: G from the op `pair_dots` on the CPU (each pair's sum alone), else one
    product per Gram group; z = log G + m_a + m_p − k u_a·u_p."""
    rows_a, ua_rows, A, m_a, rows_p, up_rows, B, m_p, groups, pairs, _ = tile
    if pair_dots_op.runs_kernel(A, B):  # the pairs' sums alone, in parallel (CPU)
        gram = pair_dots_op.pair_dots(A, B, pairs.i, pairs.j)
    else:
        gram = buffers.get("gram", len(rows_a), len(rows_p)).zero_()  # only the groups' blocks hold pairs
        for a0, a1, p0, p1 in groups:
            fixed_mm(A[a0:a1], B[p0:p1], out=gram[a0:a1, p0:p1])
        gram = gram[pairs.i, pairs.j]
    dots = row_sums(ua_rows.index_select(0, pairs.i) * up_rows.index_select(0, pairs.j))
    return fixed_log(gram) + m_a[pairs.i, 0] + m_p[pairs.j, 0] - k * dots, gram


class _BlockedAngular(torch.autograd.Function):
    """(per-pair losses in PML's order, the smallest G of any pair, and for the backward: each pair's
    z and G, the anchor and positive rows' maxima m); only the losses are differentiable, in u_a,
    u_p (the normalised rows) and x (the raw reference rows). The backward recomputes each tile."""

    @staticmethod
    def forward(ua, up, x, setup):
        num_pairs = len(setup.pairs[0])
        losses, z_all = ua.new_zeros(num_pairs), ua.new_zeros(num_pairs)  # no negative: PML's 0
        gram_all = ua.new_ones(num_pairs)
        m_a_all = ua.new_empty(ua.shape[0], 1)
        m_p_all = m_a_all if ua is up and setup.labels is setup.ref_labels else ua.new_empty(up.shape[0], 1)
        smallest = ua.new_full((), math.inf)
        buffers = Buffers(x)
        for tile in _walk(ua, up, x, setup, buffers):
            m_a_all[tile.rows_a], m_p_all[tile.rows_p] = tile.m_a, tile.m_p
            slots = tile.pairs.slots
            if not slots.numel():
                continue
            z, gram = _tile_z(tile, setup.k, buffers)
            losses[slots], z_all[slots], gram_all[slots] = _log1p_exp(z), z, gram
            smallest = torch.minimum(smallest, gram.amin())
        return losses, smallest, z_all, gram_all, m_a_all, m_p_all

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        _save(ctx, inputs, output[2:])

    @staticmethod
    def backward(ctx, grad, *_):
        return _backward(ctx, grad, _add_blocked_grads)


def _add_blocked_grads(grad, ua, up, x, setup, grad_ua, grad_up, grad_x, z_all, gram_all, m_a_all, m_p_all):
    buffers = Buffers(x)
    sums = _GradSums(x, setup, buffers, grad_ua, grad_up, grad_x)
    for tile in _walk(ua, up, x, setup, buffers, m_a_all, m_p_all):
        slots = tile.pairs.slots
        sums.add(tile, grad.index_select(0, slots) * _sigmoid(z_all.index_select(0, slots)),
                 gram_all.index_select(0, slots))
    sums.finish()


class _BlockedAngularMean(torch.autograd.Function):
    """(the mean of the per-pair losses, the smallest G of any pair, and with with_grads the
    gradients of that mean in u_a, u_p, x): PML's MeanReducer in one walk. The gradients are
    formed in the forward, where each tile's A and B are at hand (the backward scales them by the
    upstream gradient): one (rows x M x D) product per block fewer than recomputing them."""

    @staticmethod
    def forward(ua, up, x, setup, with_grads):
        num_pairs = len(setup.pairs[0])
        losses = ua.new_zeros(num_pairs)  # no negative: PML's 0
        smallest = ua.new_full((), math.inf)
        buffers = Buffers(x)
        grads = (torch.zeros_like(ua), torch.zeros_like(up), torch.zeros_like(x)) if with_grads else ()
        sums = _GradSums(x, setup, buffers, *grads) if with_grads else None
        for tile in _walk(ua, up, x, setup, buffers):
            if not tile.pairs.slots.numel():
                continue
            z, gram = _tile_z(tile, setup.k, buffers)
            losses[tile.pairs.slots] = _log1p_exp(z)
            smallest = torch.minimum(smallest, gram.amin())
            if with_grads:
                sums.add(tile, _sigmoid(z) / num_pairs, gram)
        if with_grads:
            sums.finish()
        return (fixed_order_sum(losses) / num_pairs, smallest, *grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        _save(ctx, inputs, output[2:])

    @staticmethod
    def backward(ctx, grad, *_):
        if grad is None:
            return None, None, None, None, None
        ua, up, x, *grads = ctx.saved_tensors
        if pe.backward_needs_graph(x) or not grads:
            return (*_reference_grads(ctx, grad, torch.mean), None, None)
        return (*(g * grad if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None)


class _GradSums:
    """The gradients in (u_a, u_p, x) of Σ_pairs (dL/dloss_ap) loss_ap, added into grad_ua, grad_up,
    grad_x tile by tile in `_walk`'s order (`add`, then `finish`): with w_ap = dL/dloss_ap ·
    sigmoid(z_ap) and W = c w / G, dL/ds_an = A[a, n] (W B)[a, n] and dL/ds_pn = B[p, n] (Wᵀ A)[p, n],
    and u_a·u_p's part −k w."""

    def __init__(self, x, setup, buffers, grad_ua, grad_up, grad_x):
        self.x, self.c, self.k, self.buffers = x, setup.c, setup.k, buffers
        self.grad_ua, self.grad_up, self.grad_x = grad_ua, grad_up, grad_x
        # [rows_a, ua_rows, A, Σ (c W) B over its tiles, gradient of the ua rows] of the current block;
        # A is None once the sum is A ⊙ Σ (c W) B (the block's own and only tile: computed in A's place)
        self.anchor = None

    def _mm(self, a, b, name):  # a @ b.T into the named buffer
        return fixed_mm(a, b, out=self.buffers.get(name, a.shape[0], b.shape[0]))

    def _pair_matrix(self, pairs, rows, cols, values, name, symmetric=False):  # values at the pairs, else 0
        out = self.buffers.get(name, rows, cols).zero_().index_put_((pairs.i, pairs.j), values)
        # W + Wᵀ without W: (i, j) and (j, i) are both pairs (no (i, i)), so each entry is w_ij + w_ji,
        # one addition (the bits of W + Wᵀ on any device)
        return out.index_put_((pairs.j, pairs.i), values, accumulate=True) if symmetric else out

    def add(self, tile, w, gram):
        """A tile of `_walk` with its pairs' w = dL/dloss · sigmoid(z) and G."""
        rows_a, ua_rows, A, _, rows_p, up_rows, B, _, groups, pairs, only = tile
        if self.anchor is None or self.anchor[0] is not rows_a:
            self._finish_anchor_block()
            self.anchor = [rows_a, ua_rows, A, None, torch.zeros_like(ua_rows)]
        anchor, mm, m = self.anchor, self._mm, self.x.shape[0]
        if not pairs.slots.numel():
            return
        cw = self.c * w / gram
        rows, cols = len(rows_a), len(rows_p)
        # On the CPU the sums over each row's pairs come from the op pair_row_sums (the pairs alone;
        # elsewhere one product per Gram group). Where a tile's pairs are its own rows, (i, j) and
        # (j, i) are both pairs, so W + Wᵀ is W_sym at the pairs.
        by_pairs = pair_dots_op.runs_kernel(A, B)
        if rows_p is rows_a and only:  # a group's pairs are its own rows: A ⊙ (W + Wᵀ) A
            W = self._pair_matrix(pairs, rows, rows, cw, "W", symmetric=True)
            V = self._pair_matrix(pairs, rows, rows, -self.k * w, "V", symmetric=True)
            if by_pairs:  # into a buffer of its own (A's rows are read while the sums are written)
                grad_s = pair_dots_op.pair_row_sums(A, pairs.i, pairs.j, W[pairs.i, pairs.j], A,
                                                    self.buffers.get("sum_w_b", rows, m))
            else:  # in place
                for a0, a1, p0, p1 in groups:
                    A[a0:a1].mul_(mm(W[a0:a1, p0:p1], A[p0:p1].T, "group"))
                grad_s = A
            anchor[2:4] = None, grad_s
            anchor[4] += mm(V, ua_rows.T, "rows_d")
            return
        W = self._pair_matrix(pairs, rows, cols, cw, "W")
        V = self._pair_matrix(pairs, rows, cols, -self.k * w, "V")
        # the block's first tile writes Σ (c W) B itself, later ones add theirs; the groups cover every row
        w_b = self.buffers.get("w_b" if anchor[3] is not None else "sum_w_b", rows, m)
        if rows_p is rows_a:  # both ends of every pair are this block's rows
            W = torch.add(W, W.T, out=self.buffers.get("W_sym", rows, rows))
            if by_pairs:
                pair_dots_op.pair_row_sums(A, pairs.i, pairs.j, W[pairs.i, pairs.j], None, w_b)
            else:
                for a0, a1, p0, p1 in groups:
                    fixed_mm(W[a0:a1, p0:p1], A[p0:p1].T, out=w_b[a0:a1])
            anchor[4] += mm(torch.add(V, V.T, out=self.buffers.get("V_sym", rows, rows)), ua_rows.T, "rows_d")
        else:
            grad_s = self.buffers.get("grad_s", cols, m)
            if by_pairs:
                w_pairs = W[pairs.i, pairs.j]
                pair_dots_op.pair_row_sums(B, pairs.i, pairs.j, w_pairs, None, w_b)
                pair_dots_op.pair_row_sums(A, pairs.j, pairs.i, w_pairs, B, grad_s)
            else:
                for a0, a1, p0, p1 in groups:
                    fixed_mm(W[a0:a1, p0:p1], B[p0:p1].T, out=w_b[a0:a1])
                    fixed_mm(W[a0:a1, p0:p1].T, A[a0:a1].T, out=grad_s[p0:p1])
                grad_s.mul_(B)
            anchor[4] += mm(V, up_rows.T, "rows_d")
            self.grad_up.index_add_(0, rows_p, mm(V.T, ua_rows.T, "cols_d").add_(mm(grad_s, self.x.T, "rows_d")))
            self.grad_x += mm(grad_s.T, up_rows.T, "m_d")
        anchor[3] = w_b if anchor[3] is None else anchor[3].add_(w_b)

    def finish(self):
        self._finish_anchor_block()

    def _finish_anchor_block(self):
        """An anchor block's gradient: its s gradient is A ⊙ (the sum of (c W) B over its tiles).
        Its rows' gradient is written now (each anchor row is in one block): kept until the end,
        these small tensors sat between the block buffers and kept ~700 MiB of freed heap
        (N=65536)."""
        if self.anchor is None:
            return
        rows_a, ua_rows, A, w_b, grad_rows = self.anchor
        if w_b is not None:
            grad_s = w_b if A is None else w_b.mul_(A)
            grad_rows += self._mm(grad_s, self.x.T, "rows_d")
            self.grad_x += self._mm(grad_s.T, ua_rows.T, "m_d")
        self.grad_ua.index_copy_(0, rows_a, grad_rows)
        self.anchor = None


blocked_angular = applier(_BlockedAngular)
blocked_angular_mean = applier(_BlockedAngularMean)


# ----------------------------------------------------------------------------- listed pairs
def _listed_chunk(ua, up, x, a, p, labels, ref_labels, c, k):
    """For pairs (a, p): (ua rows, up rows, the masked logits c (u_a + u_p)·x_n, their
    log-sum-exp, z = lse − k u_a·u_p)."""
    ua_q, up_q = ua.index_select(0, a), up.index_select(0, p)
    cs = torch.where(labels[a][:, None] != ref_labels[None, :], c * fixed_mm(ua_q + up_q, x), -math.inf)
    m = cs.amax(dim=1, keepdim=True)
    m = torch.where(torch.isneginf(m), 0.0, m)  # no negative: the sum is 0, lse -inf
    lse = m.squeeze(1) + fixed_log(row_sums(torch.exp(cs - m)))
    # no negative: z = -inf, a loss of exactly 0 as PML's masked logsumexp (also when u_a . u_p is NaN)
    return ua_q, up_q, cs, lse, torch.where(torch.isneginf(lse), lse, lse - k * row_sums(ua_q * up_q))


def _chunks(num_pairs, m):
    step = max(1, _LISTED_VALUES // m)
    return [slice(s, s + step) for s in range(0, num_pairs, step)]


class _ListedAngular(torch.autograd.Function):
    """Per-pair losses of the listed pairs (setup.pairs), differentiable in u_a, u_p and x."""

    @staticmethod
    def forward(ua, up, x, setup):
        a, p = setup.pairs
        losses = ua.new_empty(len(a))
        for sl in _chunks(len(a), x.shape[0]):
            z = _listed_chunk(ua, up, x, a[sl], p[sl], setup.labels, setup.ref_labels, setup.c, setup.k)[4]
            losses[sl] = _log1p_exp(z)  # no negative: log(1) = 0
        return losses

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs)

    @staticmethod
    def backward(ctx, grad):
        return _backward(ctx, grad, _add_listed_grads)


def _add_listed_grads(grad, ua, up, x, setup, grad_ua, grad_up, grad_x):
    c, k = setup.c, setup.k
    a, p = setup.pairs
    for sl in _chunks(len(a), x.shape[0]):
        ua_q, up_q, cs, lse, z = _listed_chunk(ua, up, x, a[sl], p[sl], setup.labels, setup.ref_labels, c, k)
        w = (grad[sl] * _sigmoid(z))[:, None]
        # 0 at the masked (non-negative) entries whatever w is (PML's masked_fill: also for a NaN w)
        grad_s = torch.where(torch.isneginf(cs), 0.0, c * w * torch.exp(cs - lse[:, None]))
        grad_rows = fixed_mm(grad_s, x.T)
        grad_ua.index_add_(0, a[sl], grad_rows - k * w * up_q)  # (serial on a CPU: repeats add in order)
        grad_up.index_add_(0, p[sl], grad_rows - k * w * ua_q)
        grad_x += fixed_mm(grad_s.T, (ua_q + up_q).T)


listed_angular = applier(_ListedAngular)


# ----------------------------------------------------------------------------- the loss
def _inputs(embeddings, ref_emb, anchors, positives):
    """(u_a, u_p, x): the unit anchor rows, the unit reference rows, the raw reference rows; fp16 /
    bf16 embeddings in fp32 (every value after them too; PML computes in the half dtype). Not rounded
    under autocast: PML's u_a . u_p is an elementwise fp32 product there. anchors / positives: which
    rows of each are in some pair (bool masks)."""
    emb_w, ref_w = widened(embeddings, ref_emb)
    if ref_w is emb_w:  # one tensor: a row in a pair at either end
        ua = _paired_unit_rows(emb_w, anchors | positives)
        return ua, ua, ref_w
    return _paired_unit_rows(emb_w, anchors), _paired_unit_rows(ref_w, positives), ref_w


def _paired_unit_rows(x, paired):
    """The unit rows of x, whose gradient reaches only the `paired` rows: PML normalises the rows
    of its pairs alone, so a row in no pair (e.g. one without positives) gets gradient 0 there even
    where its unit row is NaN (a normalisation's backward gives it 0 · NaN)."""
    if bool(paired.all()):
        return unit_rows(x, full_precision=True)
    rows = paired.nonzero().squeeze(1)
    return unit_rows(x.detach(), full_precision=True).index_copy(
        0, rows, unit_rows(x.index_select(0, rows), full_precision=True))


def _rows_in(n, index):
    """A bool mask over n rows: the rows in `index`."""
    return torch.zeros(n, dtype=torch.bool, device=index.device).index_fill_(0, index, True)


def _entry(losses, a, p):
    return {"loss": {"losses": losses.unsqueeze(1), "indices": (a, p), "reduction_type": "pos_pair"}}


def angular(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The fused AngularLoss: every pair on class blocks, or an indices_tuple's pairs listed;
    ZERO_LOSS where PML returns its zero; None (the reference) after `decline`."""
    if reason := reference_backend_reason(module.backend, embeddings.device):
        return decline(module, reason)
    if static_shapes():
        return decline(module, "torch.compile (the fused AngularLoss walks classes of data-dependent sizes)")
    if not embeddings.dtype.is_floating_point:
        return decline(module, f"dtype {embeddings.dtype} (the fused AngularLoss takes floating-point embeddings)")
    if not is_unit_euclidean(module.distance):
        return decline(module, f"distance {type(module.distance).__name__} (a subclass or other settings)")
    if ref_labels.shape[0] != ref_emb.shape[0]:
        return decline(module, "ref_labels of another length than ref_emb")  # the reference raises
    sq_tan = math.tan(float(module.alpha)) ** 2
    c, k = 4 * sq_tan, 2 * (1 + sq_tan)
    if indices_tuple is not None:
        a1, p, a2, _ = convert_to_pairs(indices_tuple, labels, ref_labels)
        if len(a1) == 0 or len(a2) == 0:
            return ZERO_LOSS
        setup = _Setup(labels, ref_labels, None, None, None, False, (a1, p), c, k)
        inputs = _inputs(embeddings, ref_emb, _rows_in(len(embeddings), a1), _rows_in(len(ref_emb), p))
        losses = _pml_zeros(listed_angular(*inputs, setup), embeddings.dtype)
        return _entry(losses.to(embeddings.dtype), a1, p), LISTED
    stats = LabelStats(labels, ref_labels)
    if Degenerate(labels, lambda: no_pos_or_neg(stats)).now():  # PML: no positive or no negative pair
        return ZERO_LOSS
    exclude_diag = ref_labels is labels  # PML's get_all_pairs_indices: the self-pairs by identity
    setup = _blocked_setup(stats, labels, ref_labels, ref_emb.shape[0], exclude_diag,
                           exclude_diag and ref_emb is embeddings, c, k)
    a, p = setup.pairs
    # PML's anchors: the rows with a positive; its positives: the reference rows whose label a row has
    anchors = stats.pos > 0
    positives = anchors if exclude_diag else LabelStats(ref_labels, labels).same > 0
    inputs = _inputs(embeddings, ref_emb, anchors, positives)
    if is_plain_mean(module.reducer):  # the mean in the walk, its gradients formed there too
        with_grads = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        loss, smallest, *_ = blocked_angular_mean(*inputs, setup, with_grads)
        entry = {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced",
                 **_stats.already_reduced_size(module.reducer, torch.tensor(len(a)))}
    else:
        losses, smallest, *_ = blocked_angular(*inputs, setup)
        entry = _entry(_pml_zeros(losses, embeddings.dtype).to(embeddings.dtype), a, p)["loss"]
    info = torch.finfo(inputs[0].dtype)
    if bool(smallest < ref_emb.shape[0] * info.tiny / info.eps):  # some underflowed terms may matter
        return decline(module, UNSAFE)
    return {"loss": entry}, BACKEND
