"""TripletMarginLoss over every triplet, or over the triplets a TripletMarginMiner keeps, without
listing them.

For an anchor a, a positive p and a negative n, with e the distance (larger = farther: the
unit-Euclidean distance, or minus the cosine similarity) and t = e_an - e_ap (the miner's
"triplet margin"), the loss term is relu(margin - t) (softplus with `smooth_loss`), and the miner
keeps t <= m ("all"), t <= min(m, 0) ("hard"), 0 < t <= m ("semihard") or t > m ("easy").
The reducers need only three totals over the kept triplets: the sum of the terms, how many are
non-zero (AvgNonZeroReducer) and how many there are (MeanReducer).

The rows are walked in blocks of ~1M pair values (16M off the CPU; `_common.row_blocks`): each
block computes its similarity rows S = x_b @ yᵀ (deterministic `ops.fixed_mm`), then compares
each row's distance to each of its positives with all of its negatives: on a CPU in C++, row by row
(`dmlkern::triplet_rows`, csrc/cpu/triplet_rows_cpu.cpp), elsewhere with
torch ops one positive "slot" at a time (the j-th positive of every row of the block).
Work O(N · P · M) for P positives per row (the number of triplets), memory O(B · M + N · D); no
N x M buffer, no triplet list. A row with SORTED_MIN_POSITIVES or more positives (relu terms, no
swap: few large classes) sorts its negatives once instead, each positive's kept terms then a run
of them found by binary search, summed from prefix sums: O(M log M + P log M) a row (in C++ on a
CPU, `_sorted_rows`' torch ops elsewhere: a GPU's segmented sort). On the Triton backend the other
rows run a Triton kernel (triton/triplet_rows.py), on the C++ backend on a GPU a CUDA C++ one
(csrc/cuda/triplet_slots_cuda.cu), swap included.
The gradient of the total: dL/de_an = -w, dL/de_ap = sum_n w (w =
1 where the term is kept and positive, or its sigmoid with `smooth_loss`), then grad_x[b] =
G_b @ y and grad_y += G_bᵀ @ x_b, the blocks added in order: bit-identical at any CPU thread
count. It is linear in the upstream gradient, so when the inputs require grad the forward
computes it from the same block S and row sweep (3 products in all) and the backward only
scales it.
With `swap` each triplet's e_an is min(e_an, e_pn) (PML's smallest_dist; a miner's window stays on
e_an - e_ap): the rows are sorted by label and cut into blocks of whole classes (`class_blocks`),
so the positive's row p of the block gives e_pn; row i's gradient then collects its roles as an
anchor and as the positive of each other row of its class (the gradient of e_pn is row p's),
each tie of the min split in halves as torch.minimum's backward: twice the row sweeps, the same
products and memory.
The torch twin runs on every device (and is what the C++ kernel is tested against).
Pairs (a1, p, a2, n) whose triplets are too many to list (PML's convert_to_triplets pairs each
positive pair of an anchor with each of its negative pairs: ~N^3 for a MultiSimilarityMiner's)
run here too, their masks per row block from the pairs (`ListedPairMasks`), in the torch twin.
Any other indices_tuple (a miner's listed triplets or sparser pairs, or a lazy result this path
can't mine, then materialised) runs on its listed triplets instead (`listed_triplets.py`, backend
"listed": O(T · D) from the gathered rows, no N x M matrix).
"""
from typing import NamedTuple

import torch

from .._autograd import applier
from .._determinism import fixed_order_sum
from .._tracing import static_shapes
from ..engine_spec import stats_dtype
from ..ops import pair_engine as pe
from ..ops.dispatch import extension_loaded
from ..ops.fixed_mm_op import fixed_mm
from ..triton import triton_available
from ..reference.indices import positive_slots
from ._common import (DISTANCE_KINDS, DOT_KINDS, block_masks, block_rows, decline, engine_distance, engine_rows,
                      engine_rows_reason, is_unit_cosine, is_unit_euclidean, reduced_sub_loss, reference_backend_reason,
                      row_blocks, row_sums, widened)
from ._epilogue import ZERO_LOSS, avg_non_zero, sub_loss_reducer

BACKEND = "blocked"  # what `last_backend` says: row blocks, per-row work in C++ on a CPU, else torch ops
_DISTANCES = DOT_KINDS + DISTANCE_KINDS  # e = -s or d (the squared distances: the reference)
WINDOW_IDS = {"every": 0, "all": 1, "hard": 2, "semihard": 3, "easy": 4}  # csrc/ops.cpp's triplet_rows
# the C++ kernel's rows with at least this many positives (relu terms, no swap) sort their negatives
# once: O(M log M + P log M) a row instead of O(P M) (few large classes)
SORTED_MIN_POSITIVES = 128
_CPU_KERNEL = extension_loaded() and hasattr(torch.ops.dmlkern, "triplet_rows")
triton_rows = None  # triton/triplet_rows.py, when triton is installed
if triton_available():
    from ..triton import triplet_rows as triton_rows
if _CPU_KERNEL:  # its shapes, for torch.compile (FakeTensor tracing)
    @torch.library.register_fake("dmlkern::triplet_rows")
    def _triplet_rows_fake(s, row_labels, col_labels, row0, exclude_diag, params, flags, with_grad):
        rows = s.shape[0]
        return (s.new_empty(rows), s.new_empty((rows, 2), dtype=torch.long),
                s.new_empty(s.shape if with_grad else (0, 0)))
# The CUDA C++ row sweep (dmlkern::triplet_slot_rows, csrc/cuda/triplet_slots_cuda.cu): the C++
# backend's kernel on a GPU. Its CPU implementation runs the same per-thread bodies
# (csrc/triplet_slots.h) in loops; the tests add "cpu" here to run the loss through it.
_SLOT_KERNEL = extension_loaded() and hasattr(torch.ops.dmlkern, "triplet_slot_rows")
SLOT_KERNEL_DEVICES = ("cuda",)
if _SLOT_KERNEL:
    @torch.library.register_fake("dmlkern::triplet_slot_rows")
    def _triplet_slot_rows_fake(s, slots, row_labels, col_labels, params, flags, with_grad):
        rows = s.shape[0]
        return (s.new_empty(rows), s.new_empty((rows, 2), dtype=torch.long),
                s.new_empty(s.shape if with_grad else (0, 0)),
                s.new_empty((rows, slots.shape[1]) if with_grad else (0, 0)))


class TripletRule(NamedTuple):
    """Which triplets count and what each one costs."""
    margin: float  # the loss's margin
    smooth: bool  # softplus(margin - t) instead of relu(margin - t)
    euclidean: bool  # e = sqrt(max(2 - 2s, 0)) (a Euclidean distance); else e = -s (a similarity)
    window: str  # "every" (no miner) or the miner's type_of_triplets ("all", "hard", "semihard", "easy")
    window_margin: float = 0.0  # the miner's margin
    swap: bool = False  # e_an -> min(e_an, e_pn): the batch against itself, rows sorted by label
    triton: bool = False  # the Triton backend: the rows in its kernel where it takes them (`triton_rows.supports`)
    # a ThresholdReducer's filter on each term L (L > low, L < high; None: no bound), other than
    # AvgNonZero's L > 0 (the kernels' own count): "nonzero" then counts and sums the terms passing
    # it, in the torch twin
    low: float = None
    high: float = None

    @property
    def filtered(self):
        return self.low is not None or self.high is not None


def _passes(term, rule):
    """The terms a ThresholdReducer keeps: PML's comparisons on the loss values."""
    keep = torch.ones_like(term, dtype=torch.bool) if rule.low is None else term > rule.low
    return keep if rule.high is None else keep & (term < rule.high)


def _farness(s, euclidean):
    """e from the similarity s: the unit-Euclidean distance sqrt(max(2 - 2s, 0)), or -s."""
    return torch.sqrt(torch.clamp(2 - 2 * s, min=0)) if euclidean else -s


def _mined(t, rule):
    """The miner's condition on t = e_an - e_ap (PML's comparisons, in the same order), or None."""
    if rule.window == "every":
        return None
    m = rule.window_margin
    if rule.window == "easy":
        return t > m
    keep = t <= m
    if rule.window == "hard":
        keep &= t <= 0
    elif rule.window == "semihard":
        keep &= t > 0
    return keep


def _term(viol, smooth):
    """relu(viol), or F.softplus(viol) (beta 1, threshold 20) from exp and log1p."""
    if not smooth:
        return torch.relu(viol)
    return torch.where(viol > 20, viol, torch.log1p(torch.exp(torch.clamp(viol, max=20))))


def _term_slope(viol, smooth):
    if not smooth:
        return (viol > 0).to(viol.dtype)
    z = torch.exp(torch.clamp(viol, max=20))
    return torch.where(viol > 20, 1.0, z / (z + 1))


def _min_share(x, y):
    """The share of torch.minimum(x, y)'s gradient that x gets: half at a tie, none where x > y."""
    return torch.where(x == y, 0.5, torch.where(x > y, 0.0, 1.0))


def _kept(negative, t, rule):
    mined = _mined(t, rule)
    return negative if mined is None else negative & mined


class ListedPairMasks:
    """Pairs (a1, p, a2, n) as masks of row blocks: row a's positives are the p of its pairs (a, p),
    its negatives the n of its pairs (a, n). PML's convert_to_triplets pairs every positive pair
    with every negative pair of the same anchor: exactly the triplets of these masks, so the blocked
    sweep runs them (a dense MultiSimilarityMiner's pairs: ~N^3 triplets, which PML lists through a
    pairs x pairs match matrix) in O(pairs + B M) memory. Duplicate pairs (PML repeats their
    triplets) have no mask: `of` answers None for them."""

    CHECK_VALUES = 1 << 22  # (row, column) counters per step of the duplicate check

    def __init__(self, sides, m):
        self.sides, self.m = sides, m  # per side: (anchors ascending, their columns)

    @classmethod
    def of(cls, pairs, m):
        sides = []
        for a, c in (pairs[:2], pairs[2:]):
            a, c = a.long(), c.long()
            # (a miner's pairs come from torch.where over its matrix: anchors already ascending)
            if len(a) > 1 and not bool((a[1:] >= a[:-1]).all()):
                order = torch.argsort(a, stable=True)
                a, c = a[order], c[order]
            side = (a, c)
            rows = int(a[-1]) + 1 if len(a) else 0
            step = max(1, cls.CHECK_VALUES // max(m, 1))
            for r0 in range(0, rows, step):  # a duplicate: some (row, column) counted twice
                keys = cls._block_keys(side, r0, min(r0 + step, rows), m)
                if len(keys) > 1 and int(torch.bincount(keys).max()) > 1:
                    return None
            sides.append(side)
        return cls(sides, m)

    @staticmethod
    def _block_keys(side, r0, r1, m):
        """The pairs of anchors [r0, r1) as positions (a - r0) m + c in the block's (r1 - r0) x m mask."""
        anchors, cols = side
        lo, hi = torch.searchsorted(anchors, torch.tensor([r0, r1], device=anchors.device)).tolist()
        return (anchors[lo:hi] - r0) * m + cols[lo:hi]

    def _mask(self, side, r0, r1):
        mask = torch.zeros((r1 - r0) * self.m, dtype=torch.bool, device=side[1].device)
        mask[self._block_keys(side, r0, r1, self.m)] = True
        return mask.view(r1 - r0, self.m)

    def block(self, r0, r1):
        """(positive, negative) masks of the rows [r0, r1)."""
        return self._mask(self.sides[0], r0, r1), self._mask(self.sides[1], r0, r1)


def _block_pass(s, labels_b, ref_labels, row0, rule, exclude_diag, with_grad, pair_masks=None):
    """One row block from its similarities s = x_b @ yᵀ: per row (sum of the kept terms, non-zero
    kept terms, kept triplets), and with_grad the gradient of the total, dL/ds (else None).
    With swap the block holds whole classes of the batch against itself sorted by label (column
    row0 + k is row k): row i's terms against its positive q read row q's e, and its gradient adds
    the triplets (q, i, n), recomputed as q's own sweep computes them, times the e_in side's share
    of min(e_qn, e_in). pair_masks (`ListedPairMasks`): the masks are the listed pairs', and the
    rows run the torch ops (the kernels take their masks from labels)."""
    if pair_masks is not None or rule.filtered:
        kernel = None
        pos, neg = (pair_masks.block(row0, row0 + s.shape[0]) if pair_masks is not None
                    else block_masks(labels_b, ref_labels, row0, exclude_diag))
    else:
        kernel = _row_kernel(s, rule)
        if _CPU_KERNEL and s.device.type == "cpu" and kernel is None:
            return _block_kernel(s, labels_b, ref_labels, row0, rule, exclude_diag, with_grad)
        pos, neg = block_masks(labels_b, ref_labels, row0, exclude_diag)
    many = _sorted_row_mask(s, pos, rule)
    if many is None:
        return _direct_rows(s, pos, neg, labels_b, ref_labels, row0, rule, with_grad, kernel)
    # rows with many positives sorted, the others direct (never with swap: row indices unchanged)
    B = s.shape[0]
    out = [s.new_empty(B), torch.empty(B, dtype=torch.long, device=s.device),
           torch.empty(B, dtype=torch.long, device=s.device), torch.empty_like(s) if with_grad else None]
    few = ~many
    parts = ((many, _sorted_row_chunks(s[many], pos[many], neg[many], rule, with_grad)),
             (few, _direct_rows(s[few], pos[few], neg[few], labels_b[few], ref_labels, row0, rule, with_grad,
                                kernel)))
    for rows, part in parts:
        for whole, piece in zip(out, part):
            if whole is not None:
                whole[rows] = piece
    return tuple(out)


def _row_kernel(s, rule):
    """The kernel that runs a block's direct rows, with `triton_rows.triplet_rows`' contract: the
    Triton one on the Triton backend, the CUDA C++ one on a GPU otherwise (both: fp32 / fp64, swap
    included); None: the C++ CPU op (`_block_kernel`) on a CPU, else torch ops."""
    if rule.triton and triton_rows.supports(s, rule):
        return triton_rows.triplet_rows
    if _SLOT_KERNEL and s.device.type in SLOT_KERNEL_DEVICES and s.dtype in (torch.float32, torch.float64):
        return _slot_rows
    return None


def _slot_rows(s, slot_cols, labels_b, ref_labels, rule, window_id, with_grad, row0):
    """dmlkern::triplet_slot_rows (the CUDA C++ row sweep) as `triton_rows.triplet_rows`."""
    sums, counts, g_s, g_p = torch.ops.dmlkern.triplet_slot_rows.default(
        s, slot_cols, labels_b, ref_labels, [rule.margin, rule.window_margin],
        [int(rule.smooth), int(rule.euclidean), window_id, int(rule.swap), row0], with_grad)
    return sums, counts[:, 0], counts[:, 1], g_s if with_grad else None, g_p if with_grad else None


def _direct_rows(s, pos, neg, labels_b, ref_labels, row0, rule, with_grad, kernel):
    """`_block_pass` for rows of any number of positives: each positive slot against every column
    (`kernel`, from `_row_kernel`, or torch ops); O(P M) a row."""
    slot_cols, valid = positive_slots(pos)
    if kernel is not None:
        total, nonzero, kept, g_s, g_p = kernel(
            s, slot_cols.masked_fill(~valid, -1), labels_b, ref_labels, rule, WINDOW_IDS[rule.window], with_grad, row0)
        if with_grad:  # the positives' dL/ds (one per (row, column): no two writes meet)
            rows, slot = torch.nonzero(valid, as_tuple=True)
            cols = slot_cols[rows, slot]
            g_s[rows, cols] = _grad_s(g_p[rows, slot], _farness(s[rows, cols], rule.euclidean), rule)
        return total, nonzero, kept, g_s
    e = _farness(s, rule.euclidean)
    B = s.shape[0]
    total = torch.zeros(B, dtype=e.dtype, device=e.device)
    nonzero = torch.zeros(B, dtype=torch.long, device=e.device)
    kept = torch.zeros(B, dtype=torch.long, device=e.device)
    g_e = torch.zeros_like(e) if with_grad else None
    own_cols = (torch.arange(B, device=e.device) + row0)[:, None] if rule.swap else None  # row i: column row0 + i
    for j in range(slot_cols.shape[1]):
        col = slot_cols[:, j:j + 1]
        negative = neg & valid[:, j:j + 1]
        e_ap = e.gather(1, col)
        keep = _kept(negative, e - e_ap, rule)  # t = e_an - e_ap, every column (only negatives are kept)
        e_q = e[(col[:, 0] - row0).clamp(0, B - 1)] if rule.swap else None  # each row's j-th positive's row
        viol = rule.margin - ((e if e_q is None else torch.minimum(e, e_q)) - e_ap)  # (e_ap - e_an) + margin exactly
        term = _term(viol, rule.smooth)
        kept += keep.sum(dim=1)
        summed = keep & _passes(term, rule) if rule.filtered else keep  # (a ThresholdReducer's terms only)
        total += row_sums(torch.where(summed, term, 0.0))
        nonzero += (summed if rule.filtered else keep & (term > 0)).sum(dim=1)
        if with_grad:
            w = torch.where(summed, _term_slope(viol, rule.smooth), 0.0)
            g_e -= w if e_q is None else w * _min_share(e, e_q)
            # one column per row: no two writes meet, so the order can't matter
            g_e.scatter_add_(1, col, row_sums(w).unsqueeze(1))
            if e_q is not None:  # the triplets (q, i, n): q the anchor, row i its positive
                e_qi = e_q.gather(1, own_cols)
                keep = _kept(negative, e_q - e_qi, rule)
                viol = rule.margin - (torch.minimum(e_q, e) - e_qi)
                if rule.filtered:
                    keep &= _passes(_term(viol, rule.smooth), rule)
                g_e -= torch.where(keep, _term_slope(viol, rule.smooth), 0.0) * _min_share(e, e_q)
    return total, nonzero, kept, _grad_s(g_e, e, rule) if with_grad else None


def _grad_s(g_e, e, rule):
    """dL/ds from dL/de: -dL/de (e = -s), or -dL/de / e (dd/ds = -1/d; 0 where d = 0, the
    engine's convention)."""
    if not rule.euclidean:
        return -g_e
    return torch.where(e > 0, -g_e / torch.where(e > 0, e, 1.0), 0.0)


def _sorted_row_mask(s, pos, rule):
    """The rows that take the sorted path (as the C++ kernel's): SORTED_MIN_POSITIVES or more
    positives, relu terms, no swap, no NaN in the row; None when no row does."""
    if rule.smooth or rule.swap:
        return None
    many = pos.sum(dim=1) >= max(SORTED_MIN_POSITIVES, 1)
    if not bool(many.any()):
        return None
    many &= ~torch.isnan(s).any(dim=1)
    return many if bool(many.any()) else None


SORTED_CHUNK_VALUES = 1 << 22  # (row, column) values per `_sorted_rows` call: ~10 such int64 / fp64 arrays live


def _sorted_row_chunks(s, pos, neg, rule, with_grad):
    """`_sorted_rows` over chunks of the rows (a GPU block holds 2^24 values)."""
    step = max(1, SORTED_CHUNK_VALUES // max(s.shape[1], 1))
    parts = [_sorted_rows(_farness(s[i:i + step], rule.euclidean), pos[i:i + step], neg[i:i + step], rule, with_grad)
             for i in range(0, s.shape[0], step)]
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*parts))


def _sorted_rows(e, pos, neg, rule, with_grad):
    """The C++ kernel's sorted rows in torch ops (csrc/cpu/triplet_rows_cpu.cpp, sorted_row):
    each row's negatives sorted by e once (ties by column), t = e_n - e_p non-decreasing along
    them, so each window condition and the term's t < margin hold on a prefix or suffix found by
    a bisection on those very comparisons (all positives of the block at once); a run's terms sum
    to count (margin + e_p) - (its e_n's sum), from prefix sums in fp64. Gradient: dL/de_p = the
    run's count, each negative's -(number of runs holding it) from a difference array.
    O(M log M + P log M) a row instead of O(P M); integer counts, so no addition's order matters."""
    B, M = e.shape
    sorted_e, order = torch.sort(torch.where(neg, e, float("inf")), dim=1, stable=True)
    m = neg.sum(dim=1, keepdim=True)  # negatives per row: sorted positions [0, m)
    in_run = torch.arange(M, device=e.device) < m
    prefix = torch.cumsum(torch.where(in_run, sorted_e, 0.0).double(), dim=1)
    prefix = torch.cat([prefix.new_zeros(B, 1), prefix], dim=1)
    slot_cols, valid = positive_slots(pos)
    e_p = e.gather(1, slot_cols)

    def first_false(pred):
        """Per (row, slot): the first sorted position in [0, m) where pred(t) is false (pred true
        on a prefix)."""
        lo = torch.zeros_like(slot_cols)
        hi = m.expand_as(slot_cols).clone()
        for _ in range(max(M, 1).bit_length()):
            mid = (lo + hi) // 2
            holds = pred(sorted_e.gather(1, mid.clamp(max=max(M - 1, 0))) - e_p)
            open_ = lo < hi
            lo = torch.where(open_ & holds, mid + 1, lo)
            hi = torch.where(open_ & ~holds, mid, hi)
        return lo

    wm = rule.window_margin
    lo, hi = torch.zeros_like(slot_cols), m.expand_as(slot_cols)
    if rule.window == "all":
        hi = first_false(lambda t: t <= wm)
    elif rule.window == "hard":
        hi = first_false(lambda t: (t <= wm) & (t <= 0))
    elif rule.window == "semihard":
        lo = first_false(lambda t: ~(t > 0))
        hi = torch.maximum(lo, first_false(lambda t: t <= wm))
    elif rule.window == "easy":
        lo = first_false(lambda t: ~(t > wm))
    kept = torch.where(valid, hi - lo, 0).sum(dim=1)
    first, last = lo, hi  # the summed run: the window, or within it a ThresholdReducer's terms
    if rule.filtered:  # relu(v) < high (v = margin - t falls along the run): v < high, a suffix; none if high <= 0
        if rule.high is not None:
            first = hi if rule.high <= 0 else torch.maximum(lo, first_false(lambda t: ~((rule.margin - t) < rule.high)))
        if rule.low is not None and rule.low >= 0:  # relu(v) > low: v > low, a prefix (every term if low < 0)
            last = torch.minimum(hi, first_false(lambda t: (rule.margin - t) > rule.low))
        last = torch.maximum(first, last)
    end = torch.maximum(first, torch.minimum(last, first_false(lambda t: t < rule.margin)))
    count = torch.where(valid, end - first, 0)
    # "nonzero": the terms > 0, or those passing a ThresholdReducer's filter
    nonzero = torch.where(valid, last - first, 0).sum(dim=1) if rule.filtered else count.sum(dim=1)
    run_sums = prefix.gather(1, end) - prefix.gather(1, first)
    terms = count.double() * (rule.margin + e_p.double()) - torch.where(valid, run_sums, 0.0)
    total = row_sums(terms).to(e.dtype)
    if not with_grad:
        return total, nonzero, kept, None
    g_e = torch.zeros_like(e).scatter_add_(1, slot_cols, count.to(e.dtype))  # (integers: any order)
    runs = torch.zeros(B, M + 1, dtype=torch.long, device=e.device)
    runs.scatter_add_(1, first, valid.long()).scatter_add_(1, end, -valid.long())
    g_e.scatter_add_(1, order, -torch.cumsum(runs[:, :M], dim=1).to(e.dtype))
    return total, nonzero, kept, _grad_s(g_e, e, rule)


def _block_kernel(s, labels_b, ref_labels, row0, rule, exclude_diag, with_grad):
    """`_block_pass` after the product, in C++ (csrc/cpu/triplet_rows_cpu.cpp)."""
    sums, counts, g_s = torch.ops.dmlkern.triplet_rows.default(
        s, labels_b, ref_labels, row0, exclude_diag, [rule.margin, rule.window_margin],
        [int(rule.smooth), int(rule.euclidean), WINDOW_IDS[rule.window], int(rule.swap), SORTED_MIN_POSITIVES],
        with_grad)
    return sums, counts[:, 0], counts[:, 1], g_s if with_grad else None


def _totals(x, y, labels, ref_labels, rule, exclude_diag, with_grad=False, pair_masks=None):
    """(sum of the kept terms, number non-zero, number kept) over all rows, without autograd;
    with_grad: also the gradient of the sum (grad_x, grad_y) from the same products, else Nones.
    pair_masks: the listed pairs' triplets (`ListedPairMasks`) instead of the labels'."""
    n = x.shape[0]
    sums = torch.empty(n, dtype=x.dtype, device=x.device)
    counts = torch.empty(2, n, dtype=torch.long, device=x.device)
    grad_x = torch.empty_like(x) if with_grad else None
    grad_y = torch.zeros_like(y) if with_grad else None
    for r0, r1 in (class_blocks(labels, y.shape[0]) if rule.swap else row_blocks(n, y.shape[0], x.device)):
        s = fixed_mm(x[r0:r1], y)
        # (written into preallocated rows: small per-block tensors kept alive between the
        # blocks' 4 MiB products fragment the CPU heap, ~one product per block)
        sums[r0:r1], counts[0, r0:r1], counts[1, r0:r1], g_s = _block_pass(
            s, labels[r0:r1], ref_labels, r0, rule, exclude_diag, with_grad, pair_masks)
        if with_grad:  # the blocks' grad_y added in order: deterministic
            grad_x[r0:r1] = fixed_mm(g_s, y.T)
            grad_y += fixed_mm(g_s.T, x[r0:r1].T)
    return fixed_order_sum(sums), counts[0].sum(), counts[1].sum(), grad_x, grad_y


def class_blocks(sorted_labels, m):
    """(r0, r1) row blocks of whole classes (each class's rows consecutive in sorted_labels), each
    of at most `_common.block_rows` rows against m columns or of one class, in order."""
    step = block_rows(m, sorted_labels.device)
    blocks, r0, r1 = [], 0, 0
    for count in torch.unique_consecutive(sorted_labels, return_counts=True)[1].tolist():
        if r1 > r0 and r1 + count - r0 > step:
            blocks.append((r0, r1))
            r0 = r1
        r1 += count
    return blocks + ([(r0, r1)] if r1 > r0 else [])


def count_kept(x, y, labels, ref_labels, rule, exclude_diag):
    """How many triplets the rule keeps (the miner's num_triplets), without listing them."""
    with torch.no_grad():
        return int(_totals(x, y, labels, ref_labels, rule, exclude_diag)[2])


def _materialised_total(x, y, labels, ref_labels, rule, exclude_diag, pair_masks=None):
    """The total with autograd through plain ops, all rows as one block (N x M memory): the
    differentiable gradient for create_graph=True."""
    from .pair_lists import unit_distance  # (no gradient at d = 0: the kernels' convention)

    s = x @ y.T
    e = unit_distance(s) if rule.euclidean else -s
    pos, neg = (block_masks(labels, ref_labels, 0, exclude_diag) if pair_masks is None
                else pair_masks.block(0, x.shape[0]))
    t = e.unsqueeze(1) - e.unsqueeze(2)  # [a, p, n] = e_an - e_ap
    keep = _kept(pos.unsqueeze(2) & neg.unsqueeze(1), t, rule)
    viol = rule.margin - t
    if rule.swap:  # [a, p, n] = min(e_an, e_pn) - e_ap
        viol = rule.margin - (torch.minimum(e.unsqueeze(1), e.unsqueeze(0)) - e.unsqueeze(2))
    term = _term(viol, rule.smooth)
    return torch.where(keep & _passes(term, rule) if rule.filtered else keep, term, 0.0).sum()


class _TripletTotals(torch.autograd.Function):
    """(total, nonzero, kept) over the kept triplets; only `total` is differentiable. With
    with_grad the forward also returns the gradient of the total (grad_x, grad_y; None when y is
    x, whose two sides are then added into grad_x): the gradient is linear in the upstream scalar,
    so the backward only scales it, and S is computed once (3 products in all instead of 4)."""

    @staticmethod
    def forward(x, y, labels, ref_labels, rule, exclude_diag, with_grad, pair_masks):
        self_pairs = y is None
        # (None: y is x, ref_labels is labels; torch.compile can't take one tensor twice)
        y = x if self_pairs else y
        ref_labels = labels if ref_labels is None else ref_labels
        total, nonzero, kept, grad_x, grad_y = _totals(x, y, labels, ref_labels, rule, exclude_diag, with_grad,
                                                       pair_masks)
        if with_grad and self_pairs:
            grad_x, grad_y = grad_x.add_(grad_y), None
        return total, nonzero, kept, grad_x, grad_y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, labels, ref_labels, rule, exclude_diag, with_grad, pair_masks = inputs
        ctx.self_pairs = y is None
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, x if y is None else y, labels, labels if ref_labels is None else ref_labels,
                              output[3], output[4])
        ctx.config = (rule, exclude_diag, pair_masks)

    @staticmethod
    def backward(ctx, grad, *_constant_outputs):
        x, y, labels, ref_labels, unit_grad_x, unit_grad_y = ctx.saved_tensors
        rule, exclude_diag, pair_masks = ctx.config
        nones = (None,) * 6
        if grad is None:
            return None, None, *nones
        if pe.backward_needs_graph(x):
            grads = pe.reference_gradient(
                lambda x, y: _materialised_total(x, y, labels, ref_labels, rule, exclude_diag, pair_masks),
                (x, y), ctx.needs_input_grad[:2], grad)
            return (*grads, *nones)
        # (with_grad is set whenever x or y requires grad, so a graph always has it)
        g = grad.to(x.dtype)
        return g * unit_grad_x, None if ctx.self_pairs else g * unit_grad_y, *nones


triplet_totals = applier(_TripletTotals)


def _reduction(reducer):
    """"nonzero" (AvgNonZeroReducer, or ThresholdReducer(low=0): `avg_non_zero`), "mean"
    (MeanReducer) or "sum" (SumReducer) without stats collection: the loss is then a ratio of the
    totals. None for any other reducer."""
    from ..reducers import MeanReducer, SumReducer

    if getattr(reducer, "collect_stats", True):
        return None
    if avg_non_zero(reducer):
        return "nonzero"
    return {MeanReducer: "mean", SumReducer: "sum"}.get(type(reducer))


def distance_kind(distance):
    """"euclidean" / "cosine" for the unit-row distances, else None: what a TripletMarginMiner's
    lazy result and the row-sharded distributed form (both on unit rows) can run. The blocked
    path itself takes every distance `_common.engine_rows` expresses."""
    if is_unit_euclidean(distance):
        return "euclidean"
    if is_unit_cosine(distance):
        return "cosine"
    return None


def triplet_margin(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """The fused TripletMarginLoss: every triplet (triplets_per_anchor="all", no indices_tuple), or
    a TripletMarginMiner's lazy result mined on these very inputs, on row blocks; any other
    indices_tuple (a lazy one materialised), or PML's random triplets (triplets_per_anchor=k), on
    its listed triplets (`listed_triplets.py`); else None (the reference)."""
    from .lazy_pairs import LazyMined, LazyMinedTriplets
    from .listed_pairs import materialized
    from .listed_triplets import listed_triplet_margin, on_random_triplets

    if reason := reference_backend_reason(module.backend, embeddings.device):
        return decline(module, reason)
    if module.triplets_per_anchor != "all" and indices_tuple is None and labels is not None:
        return on_random_triplets(module, embeddings, labels, ref_emb, ref_labels,
                                  lambda triplets: listed_triplet_margin(module, embeddings, triplets, ref_emb))
    if isinstance(indices_tuple, LazyMined) and not isinstance(indices_tuple, LazyMinedTriplets):
        indices_tuple = materialized(indices_tuple, embeddings.device)  # (a miner's pairs: PML's 4-tuple)
    plan = _blocked_plan(module, embeddings, labels, indices_tuple, ref_emb, ref_labels)
    if isinstance(plan, str):
        if indices_tuple is None:
            return decline(module, plan)
        if isinstance(indices_tuple, LazyMinedTriplets):
            indices_tuple = tuple(t.to(embeddings.device) for t in indices_tuple.materialize())
        return listed_triplet_margin(module, embeddings, indices_tuple, ref_emb)
    return _blocked(module, embeddings, ref_emb, *plan)


def _blocked_plan(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """Why the blocked path can't take this call (a str), or what it runs with: (labels,
    ref_labels, rule, reduction, pair_masks), pair_masks the `ListedPairMasks` of dense pairs or None."""
    from .lazy_pairs import LazyMinedTriplets

    if labels is None:
        return "no labels (triplets from indices_tuple only)"
    kind = distance_kind(module.distance)
    if engine_distance(module.distance) not in _DISTANCES or module.distance.collect_stats:
        return f"distance {type(module.distance).__name__} (or its collect_stats)"
    reducer = sub_loss_reducer(module)  # (an embedding regularizer: a MultipleReducers, the loss's own)
    reduction, bounds = _reduction(reducer), _threshold_bounds(reducer)
    if reduction is None and bounds is not None:
        if static_shapes():
            return "a ThresholdReducer under torch.compile (its filter runs in the torch twin)"
        reduction = "nonzero"  # (the mean of the terms passing its filter: `TripletRule.low / high`)
    if reduction is None:
        return f"{type(reducer).__name__} (needs the per-triplet losses)"
    if static_shapes() and not (_CPU_KERNEL and embeddings.device.type == "cpu"):
        return "torch.compile off the CPU (the blocked triplet path's torch twin has data-dependent shapes)"
    if not embeddings.dtype.is_floating_point:
        return f"dtype {embeddings.dtype} (the blocked triplet path takes floating-point embeddings)"
    window, window_margin, pairs = "every", 0.0, None
    if indices_tuple is not None:
        lazy = indices_tuple if isinstance(indices_tuple, LazyMinedTriplets) else None
        if lazy is None and len(indices_tuple) == 4:
            pairs = indices_tuple  # (pairs: their triplets, if dense, as masks below)
            if module.swap:
                return "swap=True with pairs (each triplet's e_pn: the listed triplets)"
            if static_shapes():
                return "pairs under torch.compile (their masks are data-dependent)"
        elif lazy is None:
            return "an indices_tuple (not a TripletMarginMiner's result on these inputs)"
        elif not (lazy.distance_kind == kind and lazy.kernel_can_mine and lazy.holds_inputs(embeddings, ref_emb)):
            return "the miner's result was mined on other inputs or with another distance"
        else:
            labels, ref_labels = lazy.mining_labels()
            window, window_margin = lazy.window, lazy.window_margin
    if module.swap and (ref_emb is not embeddings or ref_labels is not labels):
        return "swap=True with ref_emb (PML reads the embeddings' rows at the positives' ref_emb indices)"
    if module.swap and static_shapes():
        return "swap=True under torch.compile (its blocks of whole classes are data-dependent)"
    reason = engine_rows_reason(module.distance, embeddings, ref_emb)
    if reason is not None:
        return reason
    pair_masks = None
    if pairs is not None:
        pair_masks = _dense_pair_masks(pairs, embeddings, ref_emb)
        if pair_masks is None:
            return "pairs whose triplets the listed path takes (not dense, or duplicate pairs)"
    euclidean = engine_distance(module.distance) in DISTANCE_KINDS
    low, high = bounds if reduction == "nonzero" and bounds is not None and not avg_non_zero(reducer) else (None, None)
    rule = TripletRule(float(module.margin), bool(module.smooth_loss), euclidean, window, window_margin,
                       bool(module.swap), pe.choose_backend(module.backend, embeddings.device) == "triton", low, high)
    return labels, ref_labels, rule, reduction, pair_masks


def _threshold_bounds(reducer):
    """(low, high) of a ThresholdReducer without statistics (None: no bound), else None. PML keeps
    the losses L with L > low and L < high, and averages them (its zero_loss when none passes)."""
    from ..reducers import ThresholdReducer

    if type(reducer) is not ThresholdReducer or getattr(reducer, "collect_stats", True):
        return None
    bounds = (reducer.low, reducer.high)
    if not all(b is None or (isinstance(b, (int, float)) and not isinstance(b, bool)) for b in bounds):
        return None
    return tuple(None if b is None else float(b) for b in bounds)


def _dense_pair_masks(pairs, embeddings, ref_emb):
    """`ListedPairMasks` of PML's pairs (a1, p, a2, n) where listing their triplets would be dense
    (the listed path then declines: PML's convert_to_triplets makes sum_a P_a N_a of them, ~N^3 for
    a MultiSimilarityMiner's), else None."""
    from .listed_pairs import is_dense

    a1, p, a2, n = (t.long() for t in pairs)
    rows = embeddings.shape[0]
    triplets = int((torch.bincount(a1, minlength=rows) * torch.bincount(a2, minlength=rows)).sum())
    if not is_dense(2 * triplets, embeddings, ref_emb):  # (two gathered dot products per listed triplet)
        return None
    return ListedPairMasks.of((a1, p, a2, n), ref_emb.shape[0])


def _blocked(module, embeddings, ref_emb, labels, ref_labels, rule, reduction, pair_masks):
    exclude_diag = ref_labels is labels
    # fp16 / bf16 embeddings: the rows and every value after them in fp32 (the loss back in the
    # embeddings' dtype; autograd casts the gradient back). PML computes in the half dtype.
    rows = engine_rows(module.distance, *widened(embeddings, ref_emb))  # (rule.euclidean: its transform is 1)
    x = rows.x.to(stats_dtype(embeddings.dtype))
    y = None if rows.y is rows.x else rows.y.to(x.dtype)  # None: the rows' own pairs (symmetric)
    if rule.swap:  # rows sorted by label: each block of whole classes holds its positives' rows
        order = torch.argsort(labels, stable=True)
        x, y, labels = x[order], None if y is None else y[order], labels[order]
        ref_labels = labels
    backend = BACKEND
    # (a ThresholdReducer's filter would drop NaN terms unseen, where PML's gradient turns NaN; the
    # torch twin syncs anyway)
    if rule.filtered and any(bool(torch.isnan(t).any()) for t in (embeddings, ref_emb)):
        return decline(module, "NaN triplet losses (the reference drops or keeps each as its reducer does)")
    with_grad = torch.is_grad_enabled() and (x.requires_grad or (y is not None and y.requires_grad))
    total, nonzero, kept, _, _ = triplet_totals(x, y, labels, None if ref_labels is labels else ref_labels, rule,
                                                exclude_diag, with_grad, pair_masks)
    if not static_shapes():  # (under compile no host read: no triplet gives 0 below, a NaN term stays NaN)
        if int(kept) == 0:
            return ZERO_LOSS  # no triplet: PML's zero_losses
        if bool(torch.isnan(total)):  # PML's reducers drop NaN terms, its relu passes their gradient
            return decline(module, "NaN triplet losses (the reference drops or keeps each as its reducer does)")
    loss = reduced_sub_loss(reduction, total, nonzero, kept, sub_loss_reducer(module), embeddings)
    return {"loss": {"losses": loss.to(embeddings.dtype), "indices": None, "reduction_type": "already_reduced"}}, backend
