"""The miners that PML runs on the whole N x M distance matrix (or its list of every pair or
triplet), on row blocks instead: BatchEasyHardMiner (BatchHardMiner), PairMarginMiner, HDCMiner,
DistanceWeightedMiner, and AngularMiner on chunks of positive pairs. The same output as PML
(`reference/miners.py` stays the readable ground truth) with peak memory O(B · M + output)
instead of several N x M tensors (the matrix, candidate masks, filled copies, PML's list of every
pair) or AngularMiner's T x D gathered rows.

Each block is the miner's distance on a block of query rows: the distance's own normalisation
(once for all rows), `compute_mat` and `power`, i.e. the rows of `distance(embeddings, ref_emb)`.
Blocks have equal sizes (within one row) of at least `_MIN_BLOCK_ROWS` rows: a BLAS product of
so many rows gives each row the bits of the whole matrix's product (a product of a few rows may
take another kernel, e.g. gemv, and round otherwise), so the picks tie-break as on the full matrix
(torch.min / max per row, torch.topk, torch.multinomial) and the indices are PML's. Row-major
order within and across blocks. Each miner's function says where it departs from PML."""
import math
import os

import torch

from .._determinism import fixed_order_sum
from ..ops import fixed_mm
from ..ops.dispatch import extension_loaded
from ..reference import miners as ref
from ..reference.histogram_miner import uniform_histogram_miner as reference_histogram_miner
from ..reference.indices import IndexColumns, random_positives
from ._common import Buffers

_CPU_PICKS = extension_loaded() and hasattr(torch.ops.dmlkern, "batch_hard_rows")  # csrc/cpu/batch_hard_rows_cpu.cpp
_BLOCK_VALUES = 1 << 21  # distance values per row block (8 MiB in fp32); a few such buffers live at once
_MIN_BLOCK_ROWS = 64
# UniformHistogramMiner runs the reference (PML's list of every pair) up to these sizes, where its
# blocks of at least _MIN_BLOCK_ROWS rows, or its draws, would hold more than that list
_HISTOGRAM_REFERENCE_ROWS = 8 * _MIN_BLOCK_ROWS
_HISTOGRAM_REFERENCE_PAIRS_PER_DRAW = 8


def _row_blocks(n, m, values=None):
    """(r0, r1) blocks of near-equal size covering range(n): ~`values` (_BLOCK_VALUES) values each,
    never fewer than _MIN_BLOCK_ROWS rows (unless n is)."""
    step = max(_MIN_BLOCK_ROWS, (values or _BLOCK_VALUES) // max(1, m))
    count = max(1, math.ceil(n / step))
    base, extra = divmod(n, count)
    r0 = 0
    for i in range(count):
        r1 = r0 + base + (i < extra)
        yield r0, r1
        r0 = r1


def distance_blocks(distance, embeddings, ref_emb, want=None, reuse=False, record=True, block_values=None):
    """(r0, r1, distance(embeddings, ref_emb)[r0:r1]) block by block (only the blocks where
    want(r0, r1), if given). Records the distance's statistics as one call would (a no-op unless
    it collects them; record=False: a later sweep of the same call). reuse=True: the caller is done
    with a block before asking for the next, so a Euclidean block may be written into the previous
    one's buffer (`_EuclideanBlocks`). block_values: the blocks' size (default _BLOCK_VALUES)."""
    if record:
        distance.record_stats(embeddings, ref_emb)
    query = distance.maybe_normalize(embeddings)
    refs = query if ref_emb is embeddings else distance.maybe_normalize(ref_emb)
    euclidean = _EuclideanBlocks(refs) if reuse and _EuclideanBlocks.apply(distance, query, refs) else None
    for r0, r1 in _row_blocks(embeddings.shape[0], refs.shape[0], block_values):
        if want is not None and not want(r0, r1):
            continue
        if euclidean is not None:
            mat = euclidean.block(query[r0:r1])
            yield r0, r1, mat if distance.power == 1 else mat.pow_(distance.power)
            continue
        mat = distance.compute_mat(query[r0:r1], refs)
        yield r0, r1, mat if distance.power == 1 else mat**distance.power


class _EuclideanBlocks:
    """`torch.cdist(q, refs)` block after block, bit for bit, into one reused buffer. cdist's
    product path (either side over 25 rows) builds refs' padded (M, D + 2) copy and a fresh (B, M)
    result for every block: where freed memory goes back to the system (glibc past its mmap
    threshold, as under the bench's MALLOC_MMAP_THRESHOLD_) each block then pays its page faults,
    more than the block's product. Here the padded refs are built once and each block's product
    goes into the same buffer, with cdist's own ops: [-2q, |q|², 1] @ [r, 1, |r|²]ᵀ, clamped at 0,
    square root (tested bit for bit against torch.cdist)."""

    @staticmethod
    def apply(distance, query, refs):
        from ..distances import LpDistance
        return (isinstance(distance, LpDistance) and type(distance).compute_mat is LpDistance.compute_mat
                and distance.p == 2 and query.device.type == "cpu" and refs.device == query.device
                and query.dtype in (torch.float32, torch.float64) and refs.dtype == query.dtype
                and refs.shape[0] > 25 and query.shape[1] > 0
                and not (torch.is_grad_enabled() and (query.requires_grad or refs.requires_grad)))

    def __init__(self, refs):
        norms = refs.pow(2).sum(-1, keepdim=True)
        self._padded = torch.cat([refs, torch.ones_like(norms), norms], -1)
        self._buffers = Buffers(refs)

    def block(self, q):
        norms = q.pow(2).sum(-1, keepdim=True)
        padded = torch.cat([q.mul(-2), norms, torch.ones_like(norms)], -1)
        out = self._buffers.get("mat", q.shape[0], self._padded.shape[0])
        torch.mm(padded, self._padded.mT, out=out)
        return out.clamp_min_(0).sqrt_()


def _candidates(labels, ref_labels, r0, r1):
    """The block's (positive, negative) candidate masks: PML's get_matches_and_diffs rows,
    the pair (i, i) no positive when ref_labels is labels."""
    pos = labels[r0:r1, None] == ref_labels[None, :]
    neg = ~pos
    if ref_labels is labels:
        rows = torch.arange(r0, min(r1, len(ref_labels)), device=pos.device)
        pos[rows - r0, rows] = False
    return pos, neg


def _pick_per_row(mat, candidates, take_min, thresholds=None, val_range=None):
    """`reference.miners._pick_per_row` (the same masks and torch.min / max) without its copies
    of the mask and the fill: ((values, column indices), row_has_candidate). NaN values (and NaN
    thresholds) are kept, as PML's."""
    valid = candidates
    if thresholds is not None:
        valid = valid & ~((mat <= thresholds[:, None]) if take_min else (mat >= thresholds[:, None]))
    if val_range is not None:
        valid = valid & ~((mat > val_range[1]) | (mat < val_range[0]))
    fill = torch.finfo(mat.dtype).max if take_min else torch.finfo(mat.dtype).min
    filled = torch.where(valid, mat, fill)
    best = torch.min(filled, dim=1) if take_min else torch.max(filled, dim=1)
    return best, valid.any(dim=1)


def _cpu_picks_apply(mat, labels, ref_labels):
    """Whether the block's picks run in C++ (`dmlkern::batch_hard_rows`): a CPU block of fp32 /
    fp64 distances and int64 labels."""
    return (_CPU_PICKS and mat.device.type == "cpu" and mat.dtype in (torch.float32, torch.float64)
            and labels.dtype == torch.long and ref_labels.dtype == torch.long)


def _cpu_picks(mat, labels, ref_labels, r0, r1, pos_mode, neg_mode, order, pos_range, neg_range):
    """`_pick_per_row` of both sides of rows r0:r1 in one C++ sweep of the block: ((values,
    indices), ok) per side, None for a side not picked (mode 0). Modes 1 (min) / 2 (max);
    order 1 / 2: semihard positives / negatives (beyond the other side's value)."""
    values, indices, ok = torch.ops.dmlkern.batch_hard_rows.default(
        mat, labels[r0:r1], ref_labels, r0, ref_labels is labels, [pos_mode, neg_mode, order],
        [] if pos_range is None else [float(v) for v in pos_range],
        [] if neg_range is None else [float(v) for v in neg_range])
    return tuple(None if not mode else ((values[:, k], indices[:, k]), ok[:, k])
                 for k, mode in enumerate((pos_mode, neg_mode)))


def _where_offset(mask, r0):
    rows, cols = torch.where(mask)
    return rows + r0, cols


def batch_easy_hard_miner(distance, embeddings, labels, ref_emb, ref_labels, pos_strategy, neg_strategy,
                          allowed_pos_range=None, allowed_neg_range=None):
    """`reference.miners.batch_easy_hard_miner(distance(embeddings, ref_emb), ...)` block by block:
    (a1, p, a2, n). A side's per-row pick (and the semihard threshold from the other side's) is
    row-local; a side set to "all" lists its pairs block by block. On the CPU the picks of a block
    are one C++ sweep of its rows (`_cpu_picks`), elsewhere torch ops (`_torch_picks`), bit for
    bit the same."""
    n, device = embeddings.shape[0], embeddings.device
    if n == 0 or ref_emb.shape[0] == 0:
        return ref._empty(device, 4)
    ref_labels = labels if ref_labels is None else ref_labels  # (None: labels, the diagonal excluded)
    closest_is_min = not distance.is_inverted  # "closest": the min of a distance, the max of a similarity
    pos_take_min = closest_is_min if pos_strategy == ref.EASY else not closest_is_min
    neg_take_min = closest_is_min if neg_strategy in (ref.HARD, ref.SEMIHARD) else not closest_is_min
    pick_pos, pick_neg = pos_strategy != ref.ALL, neg_strategy != ref.ALL
    pos_idx = torch.zeros(n, dtype=torch.long, device=device)
    neg_idx = torch.zeros(n, dtype=torch.long, device=device)
    pos_ok = torch.zeros(n, dtype=torch.bool, device=device)
    neg_ok = torch.zeros(n, dtype=torch.bool, device=device)
    all_pos, all_neg = IndexColumns(2, device), IndexColumns(2, device)  # (a side set to "all")
    order = 1 if pos_strategy == ref.SEMIHARD and pick_neg else 2 if neg_strategy == ref.SEMIHARD and pick_pos else 0
    modes = [(1 if take_min else 2) if pick else 0
             for pick, take_min in ((pick_pos, pos_take_min), (pick_neg, neg_take_min))]
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb, reuse=True):  # picks copy out of mat
        if _cpu_picks_apply(mat, labels, ref_labels):
            pos, neg = _cpu_picks(mat, labels, ref_labels, r0, r1, *modes, order, allowed_pos_range,
                                  allowed_neg_range)
            if pos is None or neg is None:  # a side set to "all": its pairs listed
                pos_cand, neg_cand = _candidates(labels, ref_labels, r0, r1)
        else:
            pos, neg, pos_cand, neg_cand = _torch_picks(mat, labels, ref_labels, r0, r1, pos_strategy,
                                                        neg_strategy, pos_take_min, neg_take_min,
                                                        allowed_pos_range, allowed_neg_range)
        if pos is not None:
            pos_idx[r0:r1], pos_ok[r0:r1] = pos[0][1], pos[1]
        else:
            all_pos.add(*_where_offset(pos_cand, r0))
        if neg is not None:
            neg_idx[r0:r1], neg_ok[r0:r1] = neg[0][1], neg[1]
        else:
            all_neg.add(*_where_offset(neg_cand, r0))
    rows = torch.arange(n, device=device)
    if pick_pos and pick_neg:
        keep = pos_ok & neg_ok
        a = rows[keep]
        return a, pos_idx[keep], a, neg_idx[keep]
    a1, p = all_pos.result() if not pick_pos else (rows[pos_ok], pos_idx[pos_ok])
    a2, ng = all_neg.result() if not pick_neg else (rows[neg_ok], neg_idx[neg_ok])
    return a1, p, a2, ng


def _torch_picks(mat, labels, ref_labels, r0, r1, pos_strategy, neg_strategy, pos_take_min, neg_take_min,
                 allowed_pos_range, allowed_neg_range):
    """A block's picks in torch ops (any device; the C++ sweep's twin): (pos, neg, pos_cand,
    neg_cand), a side's pick ((values, indices), ok), or None for "all"."""
    pick_pos, pick_neg = pos_strategy != ref.ALL, neg_strategy != ref.ALL
    pos_cand, neg_cand = _candidates(labels, ref_labels, r0, r1)

    def positives(thr=None):
        return _pick_per_row(mat, pos_cand, pos_take_min, thr, allowed_pos_range)

    def negatives(thr=None):
        return _pick_per_row(mat, neg_cand, neg_take_min, thr, allowed_neg_range)

    if pos_strategy == ref.SEMIHARD and pick_neg:
        neg = negatives()
        pos = positives(neg[0].values)
    elif neg_strategy == ref.SEMIHARD and pick_pos:
        pos = positives()
        neg = negatives(pos[0].values)
    else:
        pos = positives() if pick_pos else None
        neg = negatives() if pick_neg else None
    return pos, neg, pos_cand, neg_cand


def pair_margin_miner(distance, embeddings, labels, ref_emb, ref_labels, pos_margin, neg_margin):
    """`reference.miners.pair_margin_miner(distance(embeddings, ref_emb), ...)` block by block."""
    if embeddings.shape[0] == 0 or ref_emb.shape[0] == 0:
        return ref._empty(embeddings.device, 4)
    ref_labels = labels if ref_labels is None else ref_labels
    pos_pairs, neg_pairs = IndexColumns(2, embeddings.device), IndexColumns(2, embeddings.device)
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb):
        pos_cand, neg_cand = _candidates(labels, ref_labels, r0, r1)
        if distance.is_inverted:
            pos_cand &= mat < pos_margin
            neg_cand &= mat > neg_margin
        else:
            pos_cand &= mat > pos_margin
            neg_cand &= mat < neg_margin
        pos_pairs.add(*_where_offset(pos_cand, r0))
        neg_pairs.add(*_where_offset(neg_cand, r0))
    return (*pos_pairs.result(), *neg_pairs.result())


def _label_counts(labels, ref_labels):
    """Per query row, the number of reference rows with its label (any integer ids)."""
    sorted_ref = torch.sort(ref_labels).values
    return (torch.searchsorted(sorted_ref, labels, right=True) - torch.searchsorted(sorted_ref, labels)).long()


# ----------------------------------------------------------------------------- UniformHistogramMiner
def _histogram_bins(values, edges):
    """The bin of each value under PML's comparisons (edges[i] <= v < edges[i + 1], the last bin
    closed; -1 where none holds), for edges in order: an estimate from the edges' even spacing,
    corrected against the edges themselves (the last edge <= v)."""
    n_bins = len(edges) - 1
    low, high = edges[0], edges[-1]
    if not bool(high > low):
        return torch.where(values == high, n_bins - 1, -1)
    # outside [edges[0], edges[-1]]: in no bin (linspace's last edge can round below the largest
    # value; and a block's entries of the other side), so neither corrected nor searched
    inside = (values >= low) & (values <= high)
    bins = torch.floor((values - low) * (n_bins / (high - low))).clamp(0, n_bins - 1).to(torch.long)
    # (edges.take: a gather ~3x faster than edges[bins]'s advanced indexing on a CPU)
    bins = bins - (inside & (values < edges.take(bins))).long()  # the estimate is off by one at most: one step
    bins = bins + (inside & (bins < n_bins - 1) & (values >= edges.take(bins + 1))).long()
    off = inside & ((values < edges.take(bins)) | ((bins < n_bins - 1) & (values >= edges.take(bins + 1))))
    if bool(off.any()):  # (edges far from even spacing: the exact search)
        bins = (torch.searchsorted(edges, values.contiguous(), right=True) - 1).clamp(0, n_bins - 1)
    return torch.where(inside, bins, -1)


def uniform_histogram_miner(distance, embeddings, labels, ref_emb, ref_labels, num_bins, pos_per_bin, neg_per_bin):
    """`reference.histogram_miner.uniform_histogram_miner(distance(embeddings, ref_emb), ...)` in three
    sweeps of row blocks, never listing every pair: each side's smallest and largest value (the
    bins' edges, PML's linspace), then each bin's number of pairs (PML's comparisons), then the
    drawn pairs located by their rank in the bin (row-major order, as PML's list). The draws are
    PML's calls, bin by bin, positives first: the same pairs for the same seed. A NaN value, or
    edges out of order, run the reference on the full matrix."""
    device = embeddings.device
    if embeddings.shape[0] == 0 or ref_emb.shape[0] == 0:
        return ref._empty(device, 4)
    ref_labels = labels if ref_labels is None else ref_labels
    n_pairs = embeddings.shape[0] * ref_emb.shape[0]
    if (n_pairs <= _HISTOGRAM_REFERENCE_PAIRS_PER_DRAW * num_bins * (pos_per_bin + neg_per_bin)
            or embeddings.shape[0] <= _HISTOGRAM_REFERENCE_ROWS):
        # few pairs per draw, or few rows per block: the draws' bookkeeping or a block's
        # temporaries below would cost more than PML's list of the pairs, which the reference
        # builds as PML does (the same pairs for the same seed)
        return reference_histogram_miner(distance(embeddings, ref_emb), labels, ref_labels, num_bins, pos_per_bin,
                                         neg_per_bin)
    # ~8 int64 / float temporaries per value: ~64 MiB at once, and within PML's list of every pair
    # (~20 bytes a pair): an eighth of the pairs a block, or _MIN_BLOCK_ROWS rows (fewer would
    # change the distances' bits: another product kernel)
    block_values = max(1, min(_BLOCK_VALUES // 4, n_pairs // 8))
    low, high, counts = [None, None], [None, None], [0, 0]  # positives, negatives
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb, reuse=True, block_values=block_values):
        for side, mask in enumerate(_candidates(labels, ref_labels, r0, r1)):
            n = int(mask.sum())
            if n:
                block_low = torch.where(mask, mat, torch.inf).amin()
                block_high = torch.where(mask, mat, -torch.inf).amax()
                low[side] = block_low if low[side] is None else torch.minimum(low[side], block_low)
                high[side] = block_high if high[side] is None else torch.maximum(high[side], block_high)
                counts[side] += n
    edges = [None if not counts[k] else torch.linspace(low[k], high[k], steps=num_bins + 1, device=device,
                                                       dtype=low[k].dtype) for k in range(2)]
    if any(e is not None and (bool(torch.isnan(e).any()) or bool((e[1:] < e[:-1]).any())) for e in edges):
        mat = distance(embeddings, ref_emb)  # PML's behaviour there (NaN: its torch.cat of no bin raises)
        return reference_histogram_miner(mat, labels, ref_labels, num_bins, pos_per_bin, neg_per_bin)
    none = 2 * num_bins  # the key of a pair on neither side (the self pairs)

    def block_keys(mat, r0, r1):
        """Per entry: its positive bin, num_bins + its negative bin, or `none`. A side holding few
        of the block's entries (the positives, usually) is binned on its listed values only."""
        keys = torch.full(mat.shape, none, dtype=torch.long, device=device)
        for side, mask in enumerate(_candidates(labels, ref_labels, r0, r1)):
            if edges[side] is None:
                continue
            if 4 * int(mask.sum()) < mask.numel():
                bins = _histogram_bins(mat[mask], edges[side])
                keys[mask] = torch.where(bins >= 0, side * num_bins + bins, none)
            else:
                bins = _histogram_bins(mat, edges[side])
                keys = torch.where(mask & (bins >= 0), side * num_bins + bins, keys)
        return keys.flatten()

    per_key = torch.zeros(none + 1, dtype=torch.long, device=device)
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb, reuse=True, record=False,
                                         block_values=block_values):
        per_key += torch.bincount(block_keys(mat, r0, r1), minlength=none + 1)
    # the draws: PML's torch.multinomial calls, bin by bin, positives first
    picks = [[], []]  # per side: (key, rank in its bin) of each pick, in PML's order
    for side, take in enumerate((pos_per_bin, neg_per_bin)):
        if edges[side] is None:
            continue
        for b, count in enumerate(per_key[side * num_bins:(side + 1) * num_bins].tolist()):
            if count:
                draws = torch.multinomial(torch.ones(count, device=device, dtype=torch.float), take, replacement=True)
                picks[side].append(torch.stack([torch.full_like(draws, side * num_bins + b), draws], dim=1))
    sizes = [sum(len(p) for p in side) for side in picks]
    wanted = torch.cat([p for side in picks for p in side]) if sum(sizes) else torch.empty(0, 2, dtype=torch.long,
                                                                                          device=device)
    found = torch.empty(len(wanted), 2, dtype=torch.long, device=device)
    seen = torch.zeros(none + 1, dtype=torch.long, device=device)
    key_dtype = torch.int16 if none < 2**15 else torch.int32  # (sorted faster than int64)
    sweeps = distance_blocks(distance, embeddings, ref_emb, reuse=True, record=False,
                             block_values=block_values) if len(wanted) else ()
    for r0, r1, mat in sweeps:
        keys = block_keys(mat, r0, r1)
        in_block = torch.bincount(keys, minlength=none + 1)
        rank = wanted[:, 1] - seen[wanted[:, 0]]  # among this block's pairs of the pick's bin
        here = (rank >= 0) & (rank < in_block[wanted[:, 0]])
        if bool(here.any()):
            by_key = torch.sort(keys.to(key_dtype), stable=True).indices  # bin by bin, row-major within
            at = by_key[(torch.cumsum(in_block, 0) - in_block)[wanted[here, 0]] + rank[here]]
            found[here] = torch.stack([at // mat.shape[1] + r0, at % mat.shape[1]], dim=1)
        seen += in_block
    pos, neg = found[:sizes[0]], found[sizes[0]:]
    return pos[:, 0], pos[:, 1], neg[:, 0], neg[:, 1]


# ----------------------------------------------------------------------------- AngularMiner
_ANGLE_VALUES = 1 << 20  # (positive pair, reference row) fp64 values per chunk; a few such buffers live at once
_OUTPUT_MEMORY_FRACTION = 0.5  # the mined triplets (and their concatenation) may use this much of the free memory
_MAX_OUTPUT_BYTES = None  # a fixed limit instead (tests)


def _free_memory_bytes(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class AngleStats:
    """AngularMiner's statistics over every triplet's angle, merged chunk by chunk in fp64
    (count, sum, min, max and Chan et al.'s pairwise merge of the squared deviations, so the
    standard deviation needs no second pass; sums in an order independent of the thread count)."""

    def __init__(self):
        self.n = self.total = self.m2 = self.above_n = self.above_total = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, angles, above):
        n = float(angles.numel())
        if n == 0:
            return
        total = float(fixed_order_sum(angles))
        m2 = float(fixed_order_sum((angles - total / n) ** 2))
        if self.n > 0:
            delta = total / n - self.total / self.n
            m2 += self.m2 + delta * delta * self.n * n / (self.n + n)
        self.n, self.total, self.m2 = self.n + n, self.total + total, m2
        self.above_n += float(above.sum())
        self.above_total += float(fixed_order_sum(angles[above]))
        self.lo, self.hi = min(self.lo, float(angles.min())), max(self.hi, float(angles.max()))

    def as_dict(self):
        """The statistics PML sets, in degrees: average/min/max/std when there is a triplet, the
        mean above / below the threshold when that side has one (torch.std's unbiased std)."""
        out = {}
        if self.n > 0:
            std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan
            out.update(average_angle=math.degrees(self.total / self.n), min_angle=math.degrees(self.lo),
                       max_angle=math.degrees(self.hi), std_of_angle=math.degrees(std))
        if self.above_n > 0:
            out["average_angle_above_threshold"] = math.degrees(self.above_total / self.above_n)
        if self.n - self.above_n > 0:
            out["average_angle_below_threshold"] = math.degrees(
                (self.total - self.above_total) / (self.n - self.above_n))
        return out


def _pml_angles(embeddings, ref_emb, a, p, n):
    """PML's angles of the triplets (a, p, n), computed as PML does (gathered rows, the centre of
    the raw rows, F.pairwise_distance): each triplet's bits are PML's."""
    xa, xp = embeddings[a], ref_emb[p]
    centers = (xa + xp) / 2
    ap = torch.nn.functional.pairwise_distance(xa, xp)
    nc = torch.nn.functional.pairwise_distance(ref_emb[n], centers)
    return torch.atan(ap / (2 * nc))


def _tan_bound(theta):
    """tan(theta) extended monotonically: +inf at or past pi/2, -inf at or below -pi/2."""
    if theta >= math.pi / 2:
        return math.inf
    if theta <= -math.pi / 2:
        return -math.inf
    return math.tan(theta)


def _nc2_limit(ap, t, err, keep):
    """Per pair, the d_nc^2 below which (keep) / above which (not keep) d_ap / (2 d_nc) is surely
    beyond t: ap^2 / (4 t^2) moved by err; +-inf where t is <= 0 or infinite."""
    if (keep and t < 0) or (not keep and t <= 0):
        return torch.full_like(ap, math.inf)
    if math.isinf(t):
        return torch.full_like(ap, -math.inf)
    return ap * ap / (4 * t * t) + err


def angular_miner(embeddings, labels, ref_emb, ref_labels, angle, stats=None):
    """PML's AngularMiner: every triplet (a, p, n) with atan(d_ap / (2 d_nc)) > angle, where
    d_ap = ||x_a - x_p||, d_nc = ||x_n - (x_a + x_p) / 2|| on the raw rows (F.pairwise_distance,
    eps 1e-6 added to the difference), in PML's order (a, then p, then n).

    Chunks of positive pairs (a, p) against all reference rows: d_nc^2 from fp64 products,
    ||n + eps||^2 + ||c - eps||^2 - 2 c.n (`fixed_mm`, c = PML's rounded centre). Each triplet is
    decided from an interval holding PML's angle (the products' error bound, PML's own rounding in
    its dtype, atan and the threshold's rounding); the few whose interval holds the threshold, or
    whose d_nc is too small for the products to bound, are recomputed as PML does
    (`_pml_angles`), so the indices are PML's. `stats` (an AngleStats) collects every angle
    (fp64 from the products, PML's where recomputed). Memory: O(chunk + output); an output that
    would not fit in `_OUTPUT_MEMORY_FRACTION` of the free memory raises torch.OutOfMemoryError
    before it is built."""
    device, dtype = embeddings.device, embeddings.dtype
    n_rows, n_ref = embeddings.shape[0], ref_emb.shape[0]
    if n_rows == 0 or n_ref == 0:
        return ref._empty(device, 3)
    dim = embeddings.shape[1]
    u_in, u64 = torch.finfo(dtype).eps, torch.finfo(torch.float64).eps / 2
    eps = float(torch.tensor(1e-6, dtype=dtype))  # F.pairwise_distance's eps, in the rows' dtype
    theta = float(torch.tensor(angle, dtype=dtype))  # PML compares in the angles' dtype
    eta = 4 * u_in  # atan's and the angles' rounding (angles <= pi/2)
    t_hi, t_lo = _tan_bound(theta + eta), _tan_bound(theta - eta)
    rel = (2 * dim + 16) * u_in  # PML's rounding of d_ap / (2 d_nc), relative
    refs = ref_emb.double()
    ref_sq = (refs * refs).sum(1)
    row_term = ref_sq + 2 * eps * refs.sum(1) + dim * eps * eps  # ||n + eps||^2
    # bound on the products' error in d_nc^2 (per pair: the largest ||n||^2) and PML's absolute
    # error where d_nc ~ eps
    gamma, max_ref_sq = 4 * (dim + 8) * u64, float(ref_sq.max())
    floor = 4 * u_in * dim * eps * eps + torch.finfo(torch.float64).tiny
    limit = _MAX_OUTPUT_BYTES
    if limit is None:
        limit = _OUTPUT_MEMORY_FRACTION * _free_memory_bytes(device)
    ref_labels_ = labels if ref_labels is None else ref_labels
    parts, kept_total = [], 0
    pairs_per_chunk = max(1, _ANGLE_VALUES // n_ref)
    for r0, r1 in _row_blocks(n_rows, n_ref):
        pos, _ = _candidates(labels, ref_labels_, r0, r1)
        pair_a, pair_p = _where_offset(pos, r0)
        del pos
        for c0 in range(0, len(pair_a), pairs_per_chunk):
            pa, pp = pair_a[c0:c0 + pairs_per_chunk], pair_p[c0:c0 + pairs_per_chunk]
            xa, xp = embeddings[pa], ref_emb[pp]
            centers = ((xa + xp) / 2).double()
            ap = torch.nn.functional.pairwise_distance(xa, xp).double()
            del xa, xp
            c_sq = (centers * centers).sum(1)
            col_term = c_sq - 2 * eps * centers.sum(1)  # ||c - eps||^2: d_nc^2 = h + col_term
            err = gamma * (max_ref_sq + c_sq) + floor
            # PML's d_ap / (2 d_nc) > t_hi for sure where d_nc^2 < k_lim, < t_lo where d_nc^2 > d_lim
            k_lim = _nc2_limit(ap * (1 - rel), t_hi, -err, keep=True) - col_term
            d_lim = _nc2_limit(ap * (1 + rel), t_lo, err, keep=False) - col_term
            h = fixed_mm(centers, refs).mul_(-2).add_(row_term)
            neg = labels[pa][:, None] != ref_labels_[None, :]
            keep = (h < k_lim[:, None]).logical_and_(neg)
            unsure = neg & ~keep & ~(h > d_lim[:, None])  # NaN included
            if stats is not None:  # d_nc too small for the products to give its angle: PML's maths
                unsure |= neg & (h < (64 * err - col_term)[:, None])
            ui, un = torch.where(unsure)
            del unsure
            exact = _pml_angles(embeddings, ref_emb, pa[ui], pp[ui], un) if len(ui) else None
            if exact is not None:
                keep[ui, un] = exact > angle
            if stats is not None:
                approx = h.add_(col_term[:, None]).clamp_min_(0).sqrt_().mul_(2)
                approx = torch.atan(torch.div(ap[:, None], approx, out=approx))
                if exact is not None:
                    approx[ui, un] = exact.double()
                stats.add(approx[neg], keep[neg])
            del h, neg
            ki, kn = torch.where(keep)
            kept_total += len(ki)
            if 2 * 24 * kept_total > limit:  # three int64 per triplet, held twice while concatenated
                raise torch.OutOfMemoryError(
                    f"AngularMiner: the mined triplets would need more than {2 * 24 * kept_total / 2**30:.2f} GiB "
                    f"({kept_total} triplets from the first {int(pa[-1]) + 1} of {n_rows} anchors), over "
                    f"the limit of {limit / 2**30:.2f} GiB ({_OUTPUT_MEMORY_FRACTION:.0%} of the free memory): "
                    "raise the angle or mine a smaller batch")
            parts.append((pa[ki], pp[ki], kn))
    if not parts:
        return ref._empty(device, 3)
    a, p, n = zip(*parts)
    return torch.cat(a), torch.cat(p), torch.cat(n)


# ----------------------------------------------------------------------------- HDCMiner
_TOPK_PAIRS = 1 << 21  # a side with up to this many pairs runs PML's torch.topk on its whole list
def _hdc_key(values, largest):
    """Values as keys ranked largest first, in the order torch.topk ranks them (NaN first when
    largest, last otherwise)."""
    key = values if largest else -values
    return torch.nan_to_num(key, nan=math.inf if largest else -math.inf, posinf=math.inf, neginf=-math.inf)


def _top_k_in_order(keys, k):
    """Mask of the k largest keys, the earliest ones among ties with the k-th."""
    if k >= len(keys):
        return torch.ones_like(keys, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    kth = torch.kthvalue(keys, len(keys) - k + 1).values
    kept = keys > kth
    kept[torch.nonzero(keys == kth).squeeze(1)[:k - int(kept.sum())]] = True
    return kept


class _RunningTopK:
    """The k largest keys seen so far and their flat positions, in position order (of keys tied
    with the k-th, the earliest), in preallocated buffers of `capacity` (at least k plus one
    block's candidates): pruned to k when the next block would not fit; once k are held, a
    later key must beat the k-th (`worst`) to be added."""

    def __init__(self, k, capacity, dtype, flat_dtype, device):
        self.k, self.size, self.worst = k, 0, None
        self.keys = torch.empty(capacity, dtype=dtype, device=device)
        self.flats = torch.empty(capacity, dtype=flat_dtype, device=device)

    def add(self, keys, flats):
        if self.size + len(keys) > len(self.keys):
            self._compact(_top_k_in_order(self.keys[:self.size], self.k))
            if self.size == self.k:
                self.worst = self.keys[:self.size].min()
        end = self.size + len(keys)
        self.keys[self.size:end] = keys
        self.flats[self.size:end] = flats
        self.size = end

    def _compact(self, kept):
        kept = torch.nonzero(kept).squeeze(1)
        self.keys[:len(kept)] = self.keys[kept]
        self.flats[:len(kept)] = self.flats[kept]
        self.size = len(kept)

    def flats_in_order(self):
        """The k kept flat positions, largest key first, ties in position order."""
        self._compact(_top_k_in_order(self.keys[:self.size], self.k))
        order = torch.sort(self.keys[:self.size], descending=True, stable=True).indices
        return self.flats[order]


def _hdc_k(filter_percentage, count):
    k = int(math.ceil(filter_percentage * count))
    if not 0 <= k <= count:
        raise RuntimeError(f"selected index k out of range (k = {k} of {count} pairs)")  # torch.topk's error
    return k


def hdc_all_pairs(distance, embeddings, labels, ref_emb, ref_labels, filter_percentage):
    """PML's HDCMiner on all pairs: the ceil(f * #positive pairs) positive pairs farthest apart
    and the ceil(f * #negative pairs) negative pairs closest (similarities: the reverse), each
    list hardest first, from one pass over row blocks of the distance matrix.

    A side with at most `_TOPK_PAIRS` pairs collects its values in PML's (row-major) order and
    runs torch.topk on them as PML does: PML's output, ties included. A larger side keeps running
    candidates (`_RunningTopK`: key, flat position; O(block + k) memory): the same values in the
    same order, but pairs tied in distance come in row-major order (and a tie at the k-th value keeps the earliest), where PML's torch.topk
    over the whole list orders ties as its sort happens to leave them (e.g. the pairs (i, j) and
    (j, i) of a batch compared with itself)."""
    n, m, device = embeddings.shape[0], ref_emb.shape[0], embeddings.device
    ref_labels = labels if ref_labels is None else ref_labels
    same = _label_counts(labels, ref_labels).sum().item()
    num_pos = same - (min(n, m) if ref_labels is labels else 0)
    sides = [(num_pos, not distance.is_inverted), (n * m - same, distance.is_inverted)]  # (count, largest)
    ks = [_hdc_k(filter_percentage, count) if count > 0 else 0 for count, _ in sides]
    exact = [count <= _TOPK_PAIRS for count, _ in sides]
    block_values = max((r1 - r0) * m for r0, r1 in _row_blocks(n, m)) if n and m else 0
    flat_dtype = torch.int32 if n * m < 2**31 else torch.long
    vals, flats = [[], []], [[], []]  # the exact sides: every pair
    running = [None if exact[side] else _RunningTopK(k, min(count, 2 * k + block_values), embeddings.dtype,
                                                     flat_dtype, device)
               for side, (k, (count, _)) in enumerate(zip(ks, sides))]
    if n and m:
        for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb):
            for side, cand in enumerate(_candidates(labels, ref_labels, r0, r1)):
                if ks[side] == 0:
                    continue
                top = running[side]
                value = mat if top is None else _hdc_key(mat, sides[side][1])
                if top is not None and top.worst is not None:
                    cand &= value > top.worst
                flat = torch.nonzero(cand.reshape(-1)).squeeze(1)
                value = value.reshape(-1)[flat]
                flat = flat.add_(r0 * m).to(flat_dtype)
                if top is None:
                    vals[side].append(value)
                    flats[side].append(flat)
                else:
                    top.add(value, flat)
                del value, cand, flat
    out = []
    for side, (count, largest) in enumerate(sides):
        if ks[side] == 0:
            out += list(ref._empty(device, 2))
            continue
        if exact[side]:
            flat = torch.cat(flats[side])[torch.topk(torch.cat(vals[side]), k=ks[side], largest=largest).indices]
        else:
            flat = running[side].flats_in_order()
            running[side] = None
        out += [torch.div(flat, m, rounding_mode="floor").long(), (flat % m).long()]
    return tuple(out)


def hdc_listed_pairs(distance, embeddings, ref_emb, a1, p, a2, n, filter_percentage):
    """PML's HDCMiner on given pairs (its set_idx_externally): torch.topk of each list's
    distances as PML does, so PML's output. The listed distances are read from the row blocks
    holding a listed anchor (the full matrix's bits): O(block + list) memory."""
    listed = [(a1, p, not distance.is_inverted), (a2, n, distance.is_inverted)]
    values = [None, None]
    for side, (anchor, other, _) in enumerate(listed):
        if len(anchor) and (int(anchor.min()) < 0 or int(anchor.max()) >= embeddings.shape[0]
                            or int(other.min()) < 0 or int(other.max()) >= ref_emb.shape[0]):
            raise IndexError("HDCMiner: an externally set pair indexes outside the batch")
        values[side] = torch.empty(len(anchor), dtype=embeddings.dtype, device=embeddings.device)
    anchors = torch.cat([a1, a2])

    def holds_anchor(r0, r1):
        return bool(((anchors >= r0) & (anchors < r1)).any())

    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb, want=holds_anchor):
        for side, (anchor, other, _) in enumerate(listed):
            at = torch.where((anchor >= r0) & (anchor < r1))[0]
            values[side][at] = mat[anchor[at] - r0, other[at]]
    out = []
    for side, (anchor, other, largest) in enumerate(listed):
        if len(anchor):
            idx = torch.topk(values[side], k=_hdc_k(filter_percentage, len(anchor)), largest=largest).indices
            anchor, other = anchor[idx], other[idx]
        out += [anchor, other]
    return tuple(out)


# ----------------------------------------------------------------------------- DistanceWeightedMiner
def _log_weights(mat, row_labels, ref_labels, dim, cutoff):
    """PML's steps on rows of the distance matrix (`mat`, overwritten): (clamped distances,
    log-weights with the same-class entries zeroed, their inf_or_nan mask before that, the
    not-same-class mask). In place where PML makes a new tensor: the same ops, the same bits."""
    mat = mat.clamp_(min=cutoff)
    log_weights = torch.log(mat).mul_(2.0 - dim)
    second = (mat**2.0).mul_(0.25).neg_().add_(1.0).log_().mul_((dim - 3) / 2)  # exact: -x + 1 == 1 - x
    log_weights.sub_(second)
    del second
    inf_or_nan = torch.isinf(log_weights).logical_or_(torch.isnan(log_weights))
    mask = torch.ones_like(log_weights)
    mask[row_labels.unsqueeze(1) == ref_labels.unsqueeze(0)] = 0
    return mat, log_weights.mul_(mask), inf_or_nan, mask


def _multinomial_rows(weights, rows):
    """torch.multinomial(weights[rows], 1, replacement=True).flatten(), on the CPU in chunks of
    about _BLOCK_VALUES values: torch draws one sample as argmax(w / q), q ~ Exp(1) drawn for
    the whole (rows, columns) tensor in order, so chunks draw the same q and the same samples
    (tests/test_blocked_miners_more.py checks this against torch.multinomial)."""
    step = max(1, _BLOCK_VALUES // max(1, weights.shape[1]))
    if weights.device.type != "cpu" or len(rows) <= step:
        return torch.multinomial(weights[rows], 1, replacement=True).flatten()
    out = []
    for c0 in range(0, len(rows), step):
        w = weights[rows[c0:c0 + step]]
        q = torch.empty_like(w).exponential_(1)
        out.append(torch.argmax(torch.div(w, q, out=q), dim=-1))
    return torch.cat(out)


def distance_weighted_miner(distance, embeddings, labels, ref_emb, ref_labels, cutoff, nonzero_loss_cutoff):
    """PML's DistanceWeightedMiner without the N x M weights: the same triplets for the same
    torch seed. Pass 1 takes PML's global shift (the max finite log-weight) over row blocks; then
    the classes in torch.unique order, as PML's get_random_triplet_indices draws them (the same
    randint and multinomial calls, or multinomial's draws in chunks on the CPU), with each class's
    anchor rows of the weights computed on blocks of whole classes (at least _MIN_BLOCK_ROWS
    rows: the full matrix's bits). Memory: O(block + output), plus a class's anchors x
    negatives weights for a class of more than a block's rows (PML: every class's
    anchors x positives x negatives)."""
    device, dtype = embeddings.device, embeddings.dtype
    n, m = embeddings.shape[0], ref_emb.shape[0]
    if n == 0 or m == 0:
        return ref._empty(device, 3)
    dim = float(embeddings.size(1))
    same_object = ref_labels is None or ref_labels is labels
    ref_labels = labels if ref_labels is None else ref_labels
    shift = None
    for r0, r1, mat in distance_blocks(distance, embeddings, ref_emb):
        _, log_weights, inf_or_nan, _ = _log_weights(mat, labels[r0:r1], ref_labels, dim, cutoff)
        if not bool(inf_or_nan.all()):  # the max of the finite ones (as PML's log_weights[~inf_or_nan])
            top = torch.max(log_weights.masked_fill_(inf_or_nan, -math.inf))
            shift = top if shift is None else torch.maximum(shift, top)
        del mat, log_weights, inf_or_nan  # (before the next block, and before pass 2: PML's peak memory)
    if shift is None:  # every weight inf/nan (PML fails in torch.max)
        return ref._empty(device, 3)
    query = distance.maybe_normalize(embeddings)
    refs = query if ref_emb is embeddings else distance.maybe_normalize(ref_emb)

    def weight_rows(rows):
        """PML's normalised weights of the query rows `rows` (at least _MIN_BLOCK_ROWS rows in
        the product)."""
        short = min(_MIN_BLOCK_ROWS, n) - len(rows)
        padded = torch.cat([rows, rows.new_zeros(short)]) if short > 0 else rows
        mat = distance.compute_mat(query[padded], refs)[:len(rows)]
        mat = mat if distance.power == 1 else mat**distance.power
        mat, log_weights, inf_or_nan, mask = _log_weights(mat, labels[rows], ref_labels, dim, cutoff)
        weights = log_weights.sub_(shift).exp_().mul_(mask).mul_((mat < nonzero_loss_cutoff).to(dtype))
        weights[inf_or_nan] = 0
        return weights.div_(torch.sum(weights, dim=1, keepdim=True))

    sorted_labels, order = torch.sort(labels, stable=True)
    classes, counts = torch.unique_consecutive(sorted_labels, return_counts=True)
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    counts = counts.tolist()
    sorted_ref, ref_order = torch.sort(ref_labels, stable=True)
    ref_lo = torch.searchsorted(sorted_ref, classes).tolist()
    ref_hi = torch.searchsorted(sorted_ref, classes, right=True).tolist()
    block_rows = max(_MIN_BLOCK_ROWS, _BLOCK_VALUES // m)
    group_end, group_start, group_weights = 0, 0, None
    triplets = IndexColumns(3, device)  # (one buffer: per-class results kept between the blocks would
    # pin the classes' freed weights in glibc's heap)
    for ci, c in enumerate(classes):
        pos_ref = ref_order[ref_lo[ci]:ref_hi[ci]]  # torch.where(ref_labels == c)[0]
        anchors = pos_ref if same_object else order[starts[ci]:starts[ci] + counts[ci]]
        neg_ref = torch.where(ref_labels != c)[0]
        n_a, n_p = len(anchors), len(pos_ref)
        if n_p < (2 if same_object else 1) or len(neg_ref) < 1:
            continue
        row, pos = random_positives(pos_ref, n_a, n_p, same_object)
        # the anchors' weights on the negatives: from the cached block of whole classes, or
        # (a class of more than block_rows anchors) computed block by block
        if counts[ci] > block_rows:
            w = torch.cat([weight_rows(anchors[s:s + block_rows])[:, neg_ref] for s in range(0, n_a, block_rows)])
        else:
            if ci >= group_end:  # the next block: whole classes, about block_rows rows
                group_start, group_end, rows = ci, ci, 0
                while group_end < len(counts) and counts[group_end] <= block_rows and rows + counts[group_end] <= block_rows:
                    rows += counts[group_end]
                    group_end += 1
                group_end = max(group_end, ci + 1)
                group_weights = weight_rows(order[starts[group_start]:starts[group_end - 1] + counts[group_end - 1]])
            first = starts[ci] - starts[group_start]
            w = group_weights[first:first + n_a][:, neg_ref]
        row = row.to(device)
        keep = torch.where((w.sum(dim=1) > 0)[row])[0]
        if len(keep) == 0:
            continue
        if w.dtype == torch.float16:
            w = w.float()
        triplets.add(anchors[row[keep]].long(), pos[keep].long(), neg_ref[_multinomial_rows(w, row[keep])].long())
    return triplets.result()
