"""ContrastiveLoss on a PairMarginMiner's pairs, one row block at a time, in Triton: the GPU
kernel of fused/pair_margin_contrastive.py's sweep (whose torch ops are the yardstick of its
tests, tests/test_pair_margin_triton.py).

A program owns a chunk of CHUNK_COLUMNS columns of one row of the block's similarities
s = x_b @ yᵀ (unit rows), walked in tiles of BLOCK_N. Per tile it takes the miner's value
w (sqrt(max(2 - 2s, 0)) or s) and the loss's value v (the same choice by the loss's distance),
keeps the positive pairs past the miner's pos_margin and the negative pairs within its
neg_margin (the self pair excluded), and sums each side's terms relu(v - pos_margin) /
relu(neg_margin - v) (a similarity: relu(pos_margin - v) / relu(v - neg_margin)), counting the
terms > 0 and the kept pairs: what the Mean, AvgNonZero and Sum reducers need. With WITH_GRAD it
writes dL/ds instead (coef[side] where a kept term is > 0, times -1/d for a Euclidean loss, 0 at
d = 0). Every output has one writer; the host adds the chunks in order: deterministic."""
import torch
import triton
import triton.language as tl

from .pair_engine import _split
from .tile_math import _param
from .triplet_rows import _farness


@triton.jit
def _pair_margin_kernel(S, LAB, REF, SUMS, COUNTS, G, COEF, M, CHUNK, s_sn, s_gn, row0,
                        pm_h, pm_m, pm_l, nm_h, nm_m, nm_l, mp_h, mp_m, mp_l, mn_h, mn_m, mn_l,
                        LOSS_EUCLIDEAN: tl.constexpr, MINER_EUCLIDEAN: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                        WITH_GRAD: tl.constexpr, FP64: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (r, c): row r's columns [c CHUNK, (c + 1) CHUNK). SUMS (B, C, 2) the sides' sums,
    COUNTS (B, C, 4): terms > 0 (positive, negative side), kept pairs (positive, negative)."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    out = r * tl.num_programs(1).to(tl.int64) + c
    acc_dtype = S.dtype.element_ty
    pos_margin = _param(pm_h, pm_m, pm_l, acc_dtype)
    neg_margin = _param(nm_h, nm_m, nm_l, acc_dtype)
    miner_pos = _param(mp_h, mp_m, mp_l, acc_dtype)
    miner_neg = _param(mn_h, mn_m, mn_l, acc_dtype)
    lab = tl.load(LAB + r)
    pos_sum = tl.zeros([BLOCK_N], dtype=acc_dtype)
    neg_sum = tl.zeros([BLOCK_N], dtype=acc_dtype)
    pos_live = tl.zeros([BLOCK_N], dtype=tl.int64)
    neg_live = tl.zeros([BLOCK_N], dtype=tl.int64)
    pos_kept = tl.zeros([BLOCK_N], dtype=tl.int64)
    neg_kept = tl.zeros([BLOCK_N], dtype=tl.int64)
    for n0 in range(c * CHUNK, tl.minimum((c + 1) * CHUNK, M), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = (cols < M) & (cols < (c + 1) * CHUNK)
        s = tl.load(S + r * s_sn + cols, mask=ok, other=0.0)
        same = tl.load(REF + cols, mask=ok, other=0) == lab
        d = _farness(s, True, FP64)  # the unit rows' Euclidean distance
        w = d if MINER_EUCLIDEAN else s
        v = d if LOSS_EUCLIDEAN else s
        pos = ok & same
        if EXCLUDE_DIAG:
            pos = pos & (cols != row0 + r)
        if MINER_EUCLIDEAN:  # a distance: far positives, near negatives
            pos = pos & (w > miner_pos)
            neg = ok & (~same) & (w < miner_neg)
        else:  # a similarity: dissimilar positives, similar negatives
            pos = pos & (w < miner_pos)
            neg = ok & (~same) & (w > miner_neg)
        if LOSS_EUCLIDEAN:
            pos_term = tl.maximum(v - pos_margin, 0.0)
            neg_term = tl.maximum(neg_margin - v, 0.0)
        else:
            pos_term = tl.maximum(pos_margin - v, 0.0)
            neg_term = tl.maximum(v - neg_margin, 0.0)
        pos_on = pos & (pos_term > 0)
        neg_on = neg & (neg_term > 0)
        if WITH_GRAD:
            g = tl.where(pos_on, tl.load(COEF), tl.where(neg_on, tl.load(COEF + 1), 0.0)).to(acc_dtype)
            if LOSS_EUCLIDEAN:  # dv/ds = -1/d, 0 where d = 0
                g = tl.where(d == 0, 0.0, -g / tl.where(d == 0, 1.0, d))
            tl.store(G + r * s_gn + cols, g.to(acc_dtype), mask=ok)
        else:
            pos_sum += tl.where(pos, pos_term, 0.0)
            neg_sum += tl.where(neg, neg_term, 0.0)
            pos_live += pos_on.to(tl.int64)
            neg_live += neg_on.to(tl.int64)
            pos_kept += pos.to(tl.int64)
            neg_kept += neg.to(tl.int64)
    if not WITH_GRAD:
        tl.store(SUMS + 2 * out, tl.sum(pos_sum, axis=0))
        tl.store(SUMS + 2 * out + 1, tl.sum(neg_sum, axis=0))
        tl.store(COUNTS + 4 * out, tl.sum(pos_live, axis=0))
        tl.store(COUNTS + 4 * out + 1, tl.sum(neg_live, axis=0))
        tl.store(COUNTS + 4 * out + 2, tl.sum(pos_kept, axis=0))
        tl.store(COUNTS + 4 * out + 3, tl.sum(neg_kept, axis=0))


CHUNK_COLUMNS = 4096  # columns per program (triplet_rows.py's reason)


def _launch(s, labels_b, ref_labels, row0, rule, exclude_diag, coef):
    B, M = s.shape
    s = s.contiguous()
    block_n = 256 if M >= 256 else 64
    chunk = max(block_n, CHUNK_COLUMNS)
    chunks = max(-(-M // chunk), 1)
    with_grad = coef is not None
    sums = torch.zeros(B, chunks, 2, dtype=s.dtype, device=s.device)
    counts = torch.zeros(B, chunks, 4, dtype=torch.long, device=s.device)
    g = torch.empty_like(s) if with_grad else s.new_empty(1, 1)
    coef = coef if with_grad else s.new_zeros(2)
    if B > 0 and M > 0:
        _pair_margin_kernel[(B, chunks)](
            s, labels_b.contiguous(), ref_labels.contiguous(), sums, counts, g, coef, M, chunk, s.stride(0),
            g.stride(0), row0, *_split(rule.pos_margin), *_split(rule.neg_margin), *_split(rule.miner_pos_margin),
            *_split(rule.miner_neg_margin), LOSS_EUCLIDEAN=bool(rule.loss_euclidean),
            MINER_EUCLIDEAN=bool(rule.miner_euclidean), EXCLUDE_DIAG=bool(exclude_diag), WITH_GRAD=with_grad,
            FP64=s.dtype == torch.float64, BLOCK_N=block_n)
    return sums, counts, g


def block_totals(s, labels_b, ref_labels, row0, rule, exclude_diag):
    """The block's (positive sum, negative sum) and (terms > 0 a side, kept pairs a side): (2,) in
    s's dtype and (4,) int64, each summed in a fixed order."""
    sums, counts, _ = _launch(s, labels_b, ref_labels, row0, rule, exclude_diag, None)
    return sums.sum(dim=(0, 1)), counts.sum(dim=(0, 1))


def block_grads(s, labels_b, ref_labels, row0, rule, exclude_diag, coef):
    """dL/ds of the block, coef (2,) the upstream slopes of the sides' terms (`_MarginPairTotals`)."""
    return _launch(s, labels_b, ref_labels, row0, rule, exclude_diag, coef)[2]


def supports(s):
    return s.dtype in (torch.float32, torch.float64)
