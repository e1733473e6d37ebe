"""TripletMarginLoss's row sweep in Triton: the GPU twin of csrc/cpu/triplet_rows_cpu.cpp, with the
contract of fused/triplet.py's `_block_pass` (whose torch ops are the yardstick of its tests,
tests/test_triplet_triton.py).

A program owns a chunk of one row of the block's similarities s = x_b @ yᵀ (CHUNK_COLUMNS
columns, so that a block of few long rows still fills a GPU). It walks its columns in tiles of
BLOCK_N; for each tile it loads e (the distance: sqrt(max(2 - 2s, 0)), or -s) once, then meets it
with each of the row's positives (their columns precomputed, `slots`): t = e_n - e_ap, the kept
triplets' terms relu / softplus(margin - t) summed, and with the gradient w (the term's slope on
a kept triplet) summed per negative over the positives (dL/de_n = -sum_p w: the tile's dL/ds,
written once) and per positive over the chunk's negatives (dL/de_p = sum_n w, in a (rows, chunks,
slots) scratch). The host sums the chunks' partial results in chunk order; the positives' dL/ds
follows from their dL/de in fused/triplet.py.
With `swap` (SWAP) the block holds whole classes of the batch against itself sorted by label
(column ROW0 + k is the block's row k): a term's e_n is min(e_n, e_qn), q the positive's row, whose
tile the program loads beside its own, and a negative's dL/ds also collects the row's role as the
positive of the triplets (q, r, n); each min's gradient is shared as torch.minimum's (half at a tie).
Every output has one writer and a fixed order of additions: deterministic, no atomics.
Work O(P · M) a row, as the C++ kernel's direct sweep (rows of classes of 128 or more sort their
negatives instead: fused/triplet.py's `_sorted_rows`, torch ops on a GPU)."""
import torch
import triton
import triton.language as tl

from .pair_engine import _split
from .tile_math import _param

_WINDOW_ALL, _WINDOW_HARD, _WINDOW_SEMIHARD, _WINDOW_EASY = 1, 2, 3, 4  # fused/triplet.py's WINDOW_IDS


@triton.jit
def _farness(s, EUCLIDEAN: tl.constexpr, FP64: tl.constexpr):
    """e from s: sqrt(max(2 - 2s, 0)) (NaN stays NaN, as torch.clamp's), or -s."""
    if EUCLIDEAN:
        inner = 2 - 2 * s
        inner = tl.where(inner < 0, 0.0, inner).to(s.dtype)
        if FP64:  # (IEEE in fp64; sqrt_rn takes fp32 only)
            e = tl.sqrt(inner)
        else:  # correctly rounded, as std::sqrt in the C++ kernels (tl.sqrt may approximate in fp32)
            e = tl.sqrt_rn(inner)
    else:
        e = -s
    return e


@triton.jit
def _log1p(z):
    """log(1 + z) accurate for small z (u = 1 + z rounded: log(u) z / (u - 1))."""
    u = 1 + z
    return tl.where(u == 1, z, tl.log(u) * z / tl.where(u == 1, 1.0, u - 1))


@triton.jit
def _in_window(keep, t, window_margin, WINDOW: tl.constexpr):
    """keep & the miner's condition on t (PML's comparisons; fused/triplet.py's WINDOW_IDS)."""
    if WINDOW == 4:  # easy
        keep = keep & (t > window_margin)
    elif WINDOW != 0:
        keep = keep & (t <= window_margin)
        if WINDOW == 2:  # hard
            keep = keep & (t <= 0)
        elif WINDOW == 3:  # semihard
            keep = keep & (t > 0)
    return keep


@triton.jit
def _term_slope(viol, SMOOTH: tl.constexpr, acc_dtype: tl.constexpr):
    """The term and its slope (csrc/triplet_slots.h's term_slope): relu(viol), NaN kept as
    torch.relu's, and 1[viol > 0]; or F.softplus(viol) (beta 1, threshold 20) and sigmoid(viol)."""
    if SMOOTH:
        z = tl.exp(tl.where(viol > 20, 20.0, viol).to(acc_dtype))
        term = tl.where(viol > 20, viol, _log1p(z))
        slope = tl.where(viol > 20, 1.0, z / (z + 1))
    else:
        term = tl.where((viol > 0) | (viol != viol), viol, 0.0)
        slope = tl.where(viol > 0, 1.0, 0.0)
    return term, slope.to(acc_dtype)


@triton.jit
def _triplet_rows_kernel(S, LAB, REF, SLOTS, SUMS, COUNTS, G, PSUM, M, P, CHUNK, s_sn, s_gn, B, ROW0,
                         m_h, m_m, m_l, wm_h, wm_m, wm_l, SMOOTH: tl.constexpr,
                         EUCLIDEAN: tl.constexpr, WINDOW: tl.constexpr, WITH_GRAD: tl.constexpr,
                         SWAP: tl.constexpr, FP64: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (r, c): row r's columns [c CHUNK, (c + 1) CHUNK). Writes the chunk's sum, counts
    and per-positive sums of w at [r, c] (SUMS (B, C), COUNTS (B, C, 2), PSUM (B, C, P)) and
    dL/ds of the chunk's columns (0 at the positives: the host adds theirs)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    chunks = tl.num_programs(1).to(tl.int64)
    acc_dtype = S.dtype.element_ty
    margin = _param(m_h, m_m, m_l, acc_dtype)
    window_margin = _param(wm_h, wm_m, wm_l, acc_dtype)
    lab = tl.load(LAB + r)
    total = tl.zeros([BLOCK_N], dtype=acc_dtype)
    nonzero = tl.zeros([BLOCK_N], dtype=tl.int64)
    kept = tl.zeros([BLOCK_N], dtype=tl.int64)
    out = r * chunks + c  # this program's slot in SUMS, COUNTS, PSUM
    for n0 in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, M), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = (cols < M) & (cols < (c + 1) * CHUNK)
        e = _farness(tl.load(S + r * s_sn + cols, mask=ok, other=0.0), EUCLIDEAN, FP64)
        negative = ok & (tl.load(REF + cols, mask=ok, other=0) != lab)
        w_sum = tl.zeros([BLOCK_N], dtype=acc_dtype)
        for j in range(P):
            col = tl.load(SLOTS + r * P + j)
            if col >= 0:
                e_ap = _farness(tl.load(S + r * s_sn + col), EUCLIDEAN, FP64)
                t = e - e_ap
                keep = _in_window(negative, t, window_margin, WINDOW)
                if SWAP:  # e_n -> min(e_n, e_qn) (NaN if either is), q the positive's row
                    q = tl.minimum(tl.maximum(col - ROW0, 0), B - 1)
                    e_q = _farness(tl.load(S + q * s_sn + cols, mask=ok, other=0.0), EUCLIDEAN, FP64)
                    e_min = tl.where(e_q != e_q, e_q, tl.where(e_q < e, e_q, e))
                    share = tl.where(e == e_q, 0.5, tl.where(e > e_q, 0.0, 1.0))  # e_n's part of the min's gradient
                    viol = margin - (e_min - e_ap)
                else:
                    viol = margin - t
                term, slope = _term_slope(viol, SMOOTH, acc_dtype)
                total += tl.where(keep, term, 0.0)
                nonzero += (keep & (term > 0)).to(tl.int64)
                kept += keep.to(tl.int64)
                if WITH_GRAD:
                    w = tl.where(keep, slope, 0.0).to(acc_dtype)
                    tl.store(PSUM + out * P + j, tl.load(PSUM + out * P + j) + tl.sum(w, axis=0))
                    if SWAP:  # this row's share, and the triplets (q, r, n): q the anchor, r its positive
                        w_sum += w * share
                        e_qr = _farness(tl.load(S + q * s_sn + ROW0 + r), EUCLIDEAN, FP64)
                        keep_q = _in_window(negative, e_q - e_qr, window_margin, WINDOW)
                        _, slope_q = _term_slope(margin - (e_min - e_qr), SMOOTH, acc_dtype)
                        w_q = tl.where(keep_q, slope_q, 0.0)
                        w_sum += w_q.to(acc_dtype) * share
                    else:
                        w_sum += w
        if WITH_GRAD:  # dL/ds of the negatives: -dL/de = w_sum, or w_sum / e (Euclidean; 0 at e = 0)
            if EUCLIDEAN:
                g = tl.where(e > 0, w_sum / tl.where(e > 0, e, 1.0), 0.0)
            else:
                g = w_sum
            tl.store(G + r * s_gn + cols, g.to(acc_dtype), mask=ok)
    tl.store(SUMS + out, tl.sum(total, axis=0))
    tl.store(COUNTS + 2 * out, tl.sum(nonzero, axis=0))
    tl.store(COUNTS + 2 * out + 1, tl.sum(kept, axis=0))


# Columns per program: a row's sweep split over programs so that a block of few rows (N = 65536:
# 256 rows a block) still fills a GPU; each chunk's partial results are summed on the host side
# in chunk order (deterministic).
CHUNK_COLUMNS = 4096


def supports(s, rule):
    """Whether the kernel takes this block: fp32 / fp64 similarities."""
    return s.dtype in (torch.float32, torch.float64)


def triplet_rows(s, slot_cols, labels_b, ref_labels, rule, window_id, with_grad, row0=0):
    """(sums, nonzero, kept, dL/ds, dL/de of the positives) of the block's rows: s (B, M) fp32 /
    fp64, slot_cols (B, P) int64 each row's positive columns (-1: none; the diagonal is left out
    there), labels (B,), (M,) int64; with rule.swap the block is rows row0 .. row0 + B of the
    batch against itself (whole classes). dL/ds is 0 at the positives' columns, whose dL/de (B, P)
    the caller turns into dL/ds (`fused.triplet._direct_rows`); both None without with_grad."""
    if rule.swap and not (0 <= row0 and row0 + s.shape[0] <= s.shape[1]):
        raise ValueError(f"triplet_rows: with swap the block's rows row0 .. row0 + B must be columns; got row0 "
                         f"{row0}, s {tuple(s.shape)}")
    B, M = s.shape
    s = s.contiguous()
    P = slot_cols.shape[1]
    block_n = 256 if M >= 256 else 64
    chunk = max(block_n, CHUNK_COLUMNS)
    chunks = max(-(-M // chunk), 1)
    sums = torch.zeros(B, chunks, dtype=s.dtype, device=s.device)
    counts = torch.zeros(B, chunks, 2, dtype=torch.long, device=s.device)
    g = torch.empty_like(s) if with_grad else s.new_empty(1, 1)
    psum = torch.zeros(B, chunks, max(P, 1), dtype=s.dtype, device=s.device) if with_grad else s.new_empty(1)
    if B > 0 and M > 0:
        _triplet_rows_kernel[(B, chunks)](
            s, labels_b.contiguous(), ref_labels.contiguous(), slot_cols.contiguous(), sums, counts, g, psum,
            M, P, chunk, s.stride(0), g.stride(0), B, row0, *_split(rule.margin), *_split(rule.window_margin),
            SMOOTH=bool(rule.smooth), EUCLIDEAN=bool(rule.euclidean), WINDOW=int(window_id),
            WITH_GRAD=bool(with_grad), SWAP=bool(rule.swap), FP64=s.dtype == torch.float64, BLOCK_N=block_n)
    counts = counts.sum(dim=1)
    if not with_grad:
        return sums.sum(dim=1), counts[:, 0], counts[:, 1], None, None
    return sums.sum(dim=1), counts[:, 0], counts[:, 1], g, psum.sum(dim=1)[:, :P]
