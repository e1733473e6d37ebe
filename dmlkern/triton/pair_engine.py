"""Triton tiled pair engine (docs/ENGINE.md): one forward and one backward kernel for every
fused loss. Ground truth: dmlkern/reference/pair_engine.py.

Forward: one program per block of BLOCK_M rows of X streams column tiles of Y, computes the
similarity tile with tl.dot (_sim_tile), turns it into values v (TRANSFORM), applies
the label / mining masks and folds the tile into per-row statistics chosen by PASS_KIND
(extrema, two online log-sum-exps, the positive softplus / sigmoid sums, or the lifted pairs'
sums). Nothing N x M is stored.

Backward (FlashAttention-style): the tiles are recomputed; dl/dv follows the generic row_coef
formula, its B_pos and C_lift terms compiled in only when the caller uses them (HAS_B,
HAS_LIFT) and computed only in tiles whose labels meet the block's. A program owns a block of
rows of X (grad_x) or of Y (grad_y) and is their only writer (no atomics, deterministic); for a
large D a second grid axis splits the output into BLOCK_DOUT slices. symmetric=True (y is x) is
one launch over X's row blocks that adds both ends' dl/ds per tile (SYMMETRIC): half the tile
products of the two-sided backward.

With fp16 / bf16 and D <= 256 (ONE_K) a program keeps its row block loaded and loads each column
tile once, in one piece; the kernels are then bound by their epilogues' instructions, which
is what shaped them (docs/ENGINE.md, last section; scripts/triton_compile_check.py counts them):
exponentials are exp2 with log2(e) folded into the scales, the backward's per-row constants are
computed once per row, and the masks need no row bound (rows past the end are never stored).

Scalar parameters travel as three fp32 pieces each (hi + mid + lo == the Python float
exactly): Triton passes Python floats as fp32, which would round the fp64 path's parameters.
"""
import functools
import struct

import torch
import triton
import triton.language as tl

from ..reference.pair_engine import check_symmetric
from . import interpret_mode

__all__ = ["engine_forward", "engine_backward"]

PASS_EXTREMA, PASS_LSE2, PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS = 0, 1, 2, 3
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exponentials run as exp2
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------- tile helpers

@triton.jit
def _param(hi, mid, lo, ACC_DTYPE: tl.constexpr):
    """Rebuild a parameter in ACC_DTYPE from its fp32 pieces (exact in fp64; in fp32 it is
    the float32 rounding of the parameter, as torch uses for a Python scalar)."""
    return ((tl.full([], 0.0, ACC_DTYPE) + hi + mid) + lo).to(ACC_DTYPE)


@triton.jit
def _value(s, TRANSFORM: tl.constexpr):
    """v(s): s (transform 0) or sqrt(max(2 - 2s, 0)) (transform 1). NaN stays NaN."""
    v = s
    if TRANSFORM == 1:
        t = 2.0 - 2.0 * s
        t = tl.where(t < 0.0, 0.0, t)  # a clamp that keeps NaN (tl.maximum may drop it)
        v = tl.sqrt(t)
    return v


@triton.jit
def _load_rows(P, idx, ok, k0, D, s_n, s_d, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """P[idx, k0:k0 + BLOCK_K], zero outside the rows and D."""
    ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # k * stride may pass 2**31 (strided views)
    t = tl.load(P + idx[:, None] * s_n + ks[None, :] * s_d, mask=ok[:, None] & (ks < D)[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong: compute in fp32 there
        t = t.to(ACC_DTYPE)
    return t


@triton.jit
def _sim_tile(A, B, a_idx, b_idx, a_ok, b_ok, D, s_an, s_ad, s_bn, s_bd,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """<A[a], B[b]> for a tile of rows a and b, accumulated in ACC_DTYPE (D in BLOCK_K slices)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        a = _load_rows(A, a_idx, a_ok, k0, D, s_an, s_ad, BLOCK_K, UPCAST, ACC_DTYPE)
        b = _load_rows(B, b_idx, b_ok, k0, D, s_bn, s_bd, BLOCK_K, UPCAST, ACC_DTYPE)
        acc += tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _self_pairs(row0, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of a tile's self-pairs, row0 + a == col0 + b: one int32 compare
    per element against tile-local constants (col0 - row0 clamped, so it fits in int32)."""
    delta = tl.minimum(tl.maximum(col0 - row0, -BLOCK_N), BLOCK_M).to(tl.int32)
    return (tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]) == delta


@triton.jit
def _engine_masks(v, i_lab, j_lab, col_ok, self_pair, max_neg, min_pos, eps,
                  MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr):
    """(pos kept, neg kept) of a tile; the i-side arguments broadcast along one tile axis, j along
    the other. pos: same label, and not a self-pair when EXCLUDE_DIAG; neg: labels differ.
    Only the tile's columns (the axis every kernel sums over) need their bounds (col_ok): a row
    past the end is never stored. max_neg / min_pos are row i's mining thresholds (MINING)."""
    same = i_lab == j_lab
    pos = same & col_ok
    if EXCLUDE_DIAG:
        pos = pos & (self_pair == 0)
    neg = (same == 0) & col_ok
    if MINING == 1:
        pos = pos & (v - eps < max_neg)
        neg = neg & (v + eps > min_pos)
    return pos, neg


@triton.jit
def _exp(x):
    """exp(x) as one ex2.approx.ftz (tl.exp adds a multiply and a denormal fix-up; results
    below 2**-126 flush to 0, far below every tolerance of a sum or gradient)."""
    return tl.exp2(x * LOG2E)


@triton.jit
def _log1p_of(t, u):
    """log1p(t) given u = 1 + t, without libdevice: log(u) * t / (u - 1) is accurate to a few
    ulp (Goldberg); t where u rounds to 1."""
    return tl.where(u == 1.0, t, (tl.log2(u) * LN2) * (t / (u - 1.0)))


@triton.jit
def _softplus(z):
    """softplus without overflow and without F.softplus's cut-off at z > 20 (exact, as PML's
    NT-Xent): max(z, 0) + log1p(exp(-|z|)). softplus(-inf) = 0, softplus(inf) = inf, NaN -> NaN."""
    t = _exp(-tl.abs(z))
    return tl.where(z > 0.0, z, 0.0) + _log1p_of(t, 1.0 + t)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) without overflow; sigmoid(-inf) = 0, NaN -> NaN."""
    t = _exp(-tl.abs(z))
    r = 1.0 / (1.0 + t)
    return tl.where(z >= 0.0, r, t * r)


@triton.jit
def _logaddexp_sigmoid(a, b):
    """(logaddexp(a, b), sigmoid(a - b)) from one exp (pair_engine.h, engine_lifted_neg_part):
    -inf for a = b = -inf (the sigmoid is then 1/2 and only ever multiplied by 0); NaN -> NaN."""
    d = tl.where(a == b, 0.0, a - b)
    t = _exp(-tl.abs(d))
    u = 1.0 + t
    r = 1.0 / u
    return tl.where(a > b, a, b) + _log1p_of(t, u), tl.where(d >= 0.0, r, t * r)


@triton.jit
def _lifted_relu(v, lae, sc_pos, off_pos):
    """relu(logaddexp(L_i, L_j) + sc_pos * v + off_pos), keeping NaN."""
    z = lae + (sc_pos * v + off_pos)
    return tl.where(z < 0.0, 0.0, z)


@triton.jit
def _finite_or_zero(m):
    """m, or 0 where m is +-inf: the reference point of an online sum of exponentials, so that
    no exp(-inf - -inf) or exp(inf - inf) NaN appears (an +inf value then gives +inf)."""
    return tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)


@triton.jit
def _lse2_update(m_p, s_p, m_n, s_n, v, pos, neg, sc2_pos, off2_pos, sc2_neg, off2_neg):
    """Fold a tile into the online (max, scaled sum) of both sets, in base 2: the scales and
    offsets come multiplied by log2(e) (sc2, off2), so each exponential is one ex2. A masked-out
    element is -inf and contributes exp2(-inf) = 0; a kept NaN makes that row's sum NaN."""
    zp = tl.where(pos, v * sc2_pos + off2_pos, float("-inf"))
    zn = tl.where(neg, v * sc2_neg + off2_neg, float("-inf"))
    m_p_new = tl.maximum(m_p, tl.max(zp, axis=1))
    m_n_new = tl.maximum(m_n, tl.max(zn, axis=1))
    m_p_ref = _finite_or_zero(m_p_new)
    m_n_ref = _finite_or_zero(m_n_new)
    s_p = s_p * tl.exp2(m_p - m_p_ref) + tl.sum(tl.exp2(zp - m_p_ref[:, None]), axis=1)
    s_n = s_n * tl.exp2(m_n - m_n_ref) + tl.sum(tl.exp2(zn - m_n_ref[:, None]), axis=1)
    return m_p_new, s_p, m_n_new, s_n


@triton.jit
def _lse2_final(m2, s):
    """The natural-log LSE of a base-2 online (max, sum): -inf for an empty set; NaN when a
    kept value was NaN (s is NaN then)."""
    empty = s == 0.0
    return tl.where(empty, float("-inf"), (m2 + tl.log2(tl.where(empty, 1.0, s))) * LN2)


@triton.jit
def _softmax_coefs(a, lse, sc, off):
    """Per-row constants of a softmax term a·sc·exp(sc·v + off − lse) = c·exp2(sc·log2(e)·v + shift):
    c = a·sc and shift = (off − lse)·log2(e), c = 0 for a dead term (a = 0 or lse = −inf),
    which then contributes exactly 0 (never NaN)."""
    live = (a != 0.0) & (lse != float("-inf"))
    return tl.where(live, a * sc, 0.0), tl.where(live, (off - lse) * LOG2E, 0.0)


@triton.jit
def _load_row_stats(RIN, COEF, idx, ok, s_rn, s_rc, s_cn, s_cc, sc_pos, off_pos, sc_neg, off_neg,
                    MINING: tl.constexpr, HAS_B: tl.constexpr, HAS_LIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Row i's mining thresholds, L and the backward's per-row constants: the softmax terms'
    (c, shift) for pos and neg (_softmax_coefs), B_pos and C_lift (0 unless HAS_B / HAS_LIFT)."""
    zeros = tl.zeros(idx.shape, dtype=ACC_DTYPE)
    if MINING == 1:
        max_neg = tl.load(RIN + idx * s_rn, mask=ok, other=0.0).to(ACC_DTYPE)
        min_pos = tl.load(RIN + idx * s_rn + s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        max_neg = zeros
        min_pos = zeros
    if HAS_B or HAS_LIFT:
        big_l = tl.load(RIN + idx * s_rn + 2 * s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        big_l = zeros
    a_pos = tl.load(COEF + idx * s_cn, mask=ok, other=0.0).to(ACC_DTYPE)
    lse_pos = tl.load(COEF + idx * s_cn + s_cc, mask=ok, other=float("-inf")).to(ACC_DTYPE)
    a_neg = tl.load(COEF + idx * s_cn + 2 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    lse_neg = tl.load(COEF + idx * s_cn + 3 * s_cc, mask=ok, other=float("-inf")).to(ACC_DTYPE)
    c_pos, sh_pos = _softmax_coefs(a_pos, lse_pos, sc_pos, off_pos)
    c_neg, sh_neg = _softmax_coefs(a_neg, lse_neg, sc_neg, off_neg)
    if HAS_B:
        b_pos = tl.load(COEF + idx * s_cn + 4 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        b_pos = zeros
    if HAS_LIFT:
        c_lift = tl.load(COEF + idx * s_cn + 5 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        c_lift = zeros
    return max_neg, min_pos, big_l, c_pos, sh_pos, c_neg, sh_neg, b_pos, c_lift


@triton.jit
def _softmax_terms(v, pos, neg, c_pos, sh_pos, c_neg, sh_neg, sc2_pos, sc2_neg):
    """The softmax terms of dl/dv (docs/ENGINE.md: A_pos, A_neg), from the per-row constants of
    _load_row_stats. pos and neg are disjoint: one exp2 per element serves both; a term whose c
    is 0 (dead, or the element in neither set) is exactly 0, never NaN; NaN coefficients or
    values propagate like the reference."""
    u = tl.where(pos, v * sc2_pos + sh_pos, v * sc2_neg + sh_neg)
    c = tl.where(pos, c_pos, tl.where(neg, c_neg, 0.0))
    return tl.where(c != 0.0, c * tl.exp2(u), 0.0)


@triton.jit
def _b_term(v, pos, b_pos, big_l, sc_pos, off_pos):
    """The pos_softplus pass's term of dl/dv: -B_pos sc_pos sigmoid(L - sc_pos v - off_pos) on
    pos pairs, exactly 0 where B_pos is 0."""
    return tl.where(pos & (b_pos != 0.0), -(b_pos * sc_pos) * _sigmoid(big_l - sc_pos * v - off_pos), 0.0)


@triton.jit
def _label_range(lab, ok):
    """(min, max) of the labels where ok; (max int64, min int64) if none, which meets no range."""
    return (tl.min(tl.where(ok, lab, 9223372036854775807)),
            tl.max(tl.where(ok, lab, -9223372036854775807 - 1)))


@triton.jit
def _lift_term(v, pos, c_lift, big_l, l_j, sc_pos, off_pos):
    """The lifted pairs' term of dl/dv: C_lift sc_pos relu(logaddexp(L_i, L_j) + sc_pos v + off_pos)
    on pos pairs, exactly 0 where C_lift is 0."""
    lae, _ = _logaddexp_sigmoid(big_l, l_j)
    live_l = pos & (c_lift != 0.0)
    return tl.where(live_l, c_lift * sc_pos * _lifted_relu(v, lae, sc_pos, off_pos), 0.0)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _engine_fwd_kernel(X, Y, XL, YL, RIN, OUT, N, M, D,
                       s_xn, s_xd, s_yn, s_yd, s_xl, s_yl, s_rn, s_rc, s_on, s_oc,
                       p0h, p0m, p0l, p1h, p1m, p1l, p2h, p2m, p2l, p3h, p3m, p3l, p4h, p4m, p4l,
                       PASS_KIND: tl.constexpr, TRANSFORM: tl.constexpr, MINING: tl.constexpr,
                       EXCLUDE_DIAG: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                       UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: N * D may exceed 2**31
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    x_lab = tl.load(XL + rows * s_xl, mask=row_ok, other=0)
    sc_pos = _param(p0h, p0m, p0l, ACC_DTYPE)
    off_pos = _param(p1h, p1m, p1l, ACC_DTYPE)
    sc_neg = _param(p2h, p2m, p2l, ACC_DTYPE)
    off_neg = _param(p3h, p3m, p3l, ACC_DTYPE)
    eps = _param(p4h, p4m, p4l, ACC_DTYPE)

    zeros = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    if MINING == 1:
        max_neg = tl.load(RIN + rows * s_rn, mask=row_ok, other=0.0).to(ACC_DTYPE)
        min_pos = tl.load(RIN + rows * s_rn + s_rc, mask=row_ok, other=0.0).to(ACC_DTYPE)
    else:
        max_neg = zeros
        min_pos = zeros
    if PASS_KIND == 2 or PASS_KIND == 3:
        big_l = tl.load(RIN + rows * s_rn + 2 * s_rc, mask=row_ok, other=0.0).to(ACC_DTYPE)
    else:
        big_l = zeros
    if PASS_KIND == 2 or PASS_KIND == 3:
        # Positives only: a column tile whose label range misses the block's is skipped (a few
        # tiles per block when the rows are sorted by label, as the fused losses do).
        lab_lo, lab_hi = _label_range(x_lab, row_ok)

    # Row statistics (the ones a pass does not use stay constant and are compiled away).
    mx = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)   # extrema: max over neg
    mn = tl.full([BLOCK_M], float("inf"), dtype=ACC_DTYPE)    # extrema: min over pos
    nan_neg = tl.zeros([BLOCK_M], dtype=tl.float32)           # extrema: kept NaN negatives
    m_p = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)  # lse2: online (max, sum), base 2
    s_p = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    m_n = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    s_n = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sp = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)                 # pos_softplus / lifted_pairs sums
    sg = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    cnt = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)

    if ONE_K:
        x_blk = _load_rows(X, rows, row_ok, 0, D, s_xn, s_xd, BLOCK_K, UPCAST, ACC_DTYPE)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        y_lab = tl.load(YL + cols * s_yl, mask=col_ok, other=0)
        if PASS_KIND == 2 or PASS_KIND == 3:
            col_lo, col_hi = _label_range(y_lab, col_ok)
            meets = (col_lo <= lab_hi) & (col_hi >= lab_lo)
        else:
            meets = True
        if meets:
            if ONE_K:  # D fits one slice: the row block stays loaded, one load per column tile
                y_blk = _load_rows(Y, cols, col_ok, 0, D, s_yn, s_yd, BLOCK_K, UPCAST, ACC_DTYPE)
                s = tl.dot(x_blk, tl.trans(y_blk), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                s = _sim_tile(X, Y, rows, cols, row_ok, col_ok, D, s_xn, s_xd, s_yn, s_yd,
                              BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
            v = _value(s, TRANSFORM)
            pos, neg = _engine_masks(v, x_lab[:, None], y_lab[None, :], col_ok[None, :],
                                     _self_pairs(pid * BLOCK_M, c0, BLOCK_M, BLOCK_N),
                                     max_neg[:, None], min_pos[:, None], eps, MINING, EXCLUDE_DIAG)
            if PASS_KIND == 0:
                # As PML's miner (an ascending sort, NaN last): the max over neg is NaN if a kept
                # v is NaN, the min over pos skips NaN. tl.max may drop NaN: count the kept NaNs
                # (a NaN-propagating tl.reduce is leaner on a GPU but ~30x slower in the
                # interpreter the tests run).
                is_nan = v != v
                mx = tl.maximum(mx, tl.max(tl.where(neg, v, float("-inf")), axis=1))
                mn = tl.minimum(mn, tl.min(tl.where(pos & ~is_nan, v, float("inf")), axis=1))
                nan_neg += tl.sum(tl.where(neg & is_nan, 1.0, 0.0), axis=1)
            elif PASS_KIND == 1:
                m_p, s_p, m_n, s_n = _lse2_update(m_p, s_p, m_n, s_n, v, pos, neg, sc_pos * LOG2E, off_pos * LOG2E,
                                                  sc_neg * LOG2E, off_neg * LOG2E)
            elif PASS_KIND == 2:
                z = big_l[:, None] - sc_pos * v - off_pos
                sp += tl.sum(tl.where(pos, _softplus(z), 0.0), axis=1)
                sg += tl.sum(tl.where(pos, _sigmoid(z), 0.0), axis=1)
                cnt += tl.sum(tl.where(pos, 1.0, 0.0).to(ACC_DTYPE), axis=1)
            else:  # lifted pairs, the symmetric case: column j's L is row_in[j, 2]
                l_col = tl.load(RIN + cols * s_rn + 2 * s_rc, mask=col_ok, other=0.0).to(ACC_DTYPE)
                lae, sig = _logaddexp_sigmoid(big_l[:, None], l_col[None, :])
                r = _lifted_relu(v, lae, sc_pos, off_pos)
                f = 0.5 * (r * r)
                sp += tl.sum(tl.where(pos, f, 0.0), axis=1)
                sg += tl.sum(tl.where(pos & (r != 0.0), r * sig, 0.0), axis=1)
                cnt += tl.sum(tl.where(pos & (f > 0.0), 1.0, 0.0).to(ACC_DTYPE), axis=1)

    out = OUT + rows * s_on
    if PASS_KIND == 0:
        tl.store(out, tl.where(nan_neg > 0.0, float("nan"), mx), mask=row_ok)
        tl.store(out + s_oc, mn, mask=row_ok)
    elif PASS_KIND == 1:
        tl.store(out, _lse2_final(m_p, s_p), mask=row_ok)
        tl.store(out + s_oc, _lse2_final(m_n, s_n), mask=row_ok)
    else:
        tl.store(out, sp, mask=row_ok)
        tl.store(out + s_oc, sg, mask=row_ok)
        tl.store(out + 2 * s_oc, cnt, mask=row_ok)


@triton.jit
def _engine_bwd_kernel(OWN, OTHER, XL, YL, RIN, COEF, GRAD, N_OWN, N_OTHER, D,
                       s_on, s_od, s_tn, s_td, s_xl, s_yl, s_rn, s_rc, s_cn, s_cc, s_gn, s_gd,
                       p0h, p0m, p0l, p1h, p1m, p1l, p2h, p2m, p2l, p3h, p3m, p3l, p4h, p4m, p4l,
                       OWN_IS_X: tl.constexpr, SYMMETRIC: tl.constexpr, TRANSFORM: tl.constexpr,
                       MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_LIFT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                       BLOCK_DOUT: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """GRAD[a, dout] = sum_b dl/ds(a, b) OTHER[b, dout] for this program's block of `own` rows a,
    where (i, j) = (a, b) for grad_x (OWN_IS_X) and (b, a) for grad_y. Row-i statistics
    (row_in, row_coef) belong to X's rows: per program for grad_x, per tile for grad_y.
    HAS_LIFT (the symmetric case) also reads row j's L from row_in: per tile for grad_x, per
    program for grad_y. SYMMETRIC (y is x, the same labels; OWN_IS_X): grad_x + grad_y in one
    launch: dl/ds(a, b) of the pair (i, j) = (a, b) with row a's statistics plus that of the pair
    (b, a) with column b's (S is symmetric), so each tile product is done once."""
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    own = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    own_ok = own < N_OWN
    douts = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT).to(tl.int64)
    dout_ok = douts < D
    sc_pos = _param(p0h, p0m, p0l, ACC_DTYPE)
    off_pos = _param(p1h, p1m, p1l, ACC_DTYPE)
    sc_neg = _param(p2h, p2m, p2l, ACC_DTYPE)
    off_neg = _param(p3h, p3m, p3l, ACC_DTYPE)
    eps = _param(p4h, p4m, p4l, ACC_DTYPE)
    sc2_pos = sc_pos * LOG2E
    sc2_neg = sc_neg * LOG2E
    if OWN_IS_X:
        own_lab = tl.load(XL + own * s_xl, mask=own_ok, other=0)
        max_neg, min_pos, big_l, c_pos, sh_pos, c_neg, sh_neg, b_pos, c_lift = _load_row_stats(
            RIN, COEF, own, own_ok, s_rn, s_rc, s_cn, s_cc, sc_pos, off_pos, sc_neg, off_neg,
            MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
    else:
        own_lab = tl.load(YL + own * s_yl, mask=own_ok, other=0)
        if HAS_LIFT:  # y is x: the own row's L
            own_l = tl.load(RIN + own * s_rn + 2 * s_rc, mask=own_ok, other=0.0).to(ACC_DTYPE)
        else:
            own_l = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    if HAS_B or HAS_LIFT:
        own_lo, own_hi = _label_range(own_lab, own_ok)
    if ONE_K:  # D fits one slice (then BLOCK_DOUT = BLOCK_K): the own block stays loaded
        own_blk = _load_rows(OWN, own, own_ok, 0, D, s_on, s_od, BLOCK_K, UPCAST, ACC_DTYPE)
    grad = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=ACC_DTYPE)
    for c0 in range(0, N_OTHER, BLOCK_N):
        oth = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        oth_ok = oth < N_OTHER
        if ONE_K:
            oth_blk = _load_rows(OTHER, oth, oth_ok, 0, D, s_tn, s_td, BLOCK_K, UPCAST, ACC_DTYPE)
            s = tl.dot(own_blk, tl.trans(oth_blk), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            s = _sim_tile(OWN, OTHER, own, oth, own_ok, oth_ok, D, s_on, s_od, s_tn, s_td,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
        if TRANSFORM == 1:  # v = sqrt(d2) and dv/ds = -1/v from one rsqrt (d2 > 0; both 0 at d2 = 0)
            d2 = 2.0 - 2.0 * s
            d2_pos = d2 > 0.0  # NaN: False
            inv_v = tl.where(d2_pos, tl.rsqrt(tl.where(d2_pos, d2, 1.0)), 0.0)
            v = tl.where(d2_pos, d2 * inv_v, tl.where(d2 == d2, 0.0, d2))  # keeps NaN, clamps d2 < 0 to 0
        else:
            v = s
        self_pair = _self_pairs(pid * BLOCK_M, c0, BLOCK_M, BLOCK_N)
        if OWN_IS_X:
            oth_lab = tl.load(YL + oth * s_yl, mask=oth_ok, other=0)
            pos, neg = _engine_masks(v, own_lab[:, None], oth_lab[None, :], oth_ok[None, :], self_pair,
                                     max_neg[:, None], min_pos[:, None], eps, MINING, EXCLUDE_DIAG)
            dv = _softmax_terms(v, pos, neg, c_pos[:, None], sh_pos[:, None], c_neg[:, None], sh_neg[:, None],
                                sc2_pos, sc2_neg)
            if SYMMETRIC:  # the pairs (i, j) = (b, a): column b's statistics (labels: XL = YL)
                t_max_neg, t_min_pos, t_big_l, t_c_pos, t_sh_pos, t_c_neg, t_sh_neg, t_b_pos, t_c_lift = \
                    _load_row_stats(RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, sc_pos, off_pos, sc_neg,
                                    off_neg, MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
                if MINING == 1:  # the masks depend on row i's thresholds: recompute them for i = b
                    t_pos, t_neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth_ok[None, :], self_pair,
                                                 t_max_neg[None, :], t_min_pos[None, :], eps, MINING, EXCLUDE_DIAG)
                else:  # label masks are symmetric
                    t_pos = pos
                    t_neg = neg
                dv += _softmax_terms(v, t_pos, t_neg, t_c_pos[None, :], t_sh_pos[None, :], t_c_neg[None, :],
                                     t_sh_neg[None, :], sc2_pos, sc2_neg)
            elif HAS_LIFT:  # y is x: column j's L
                t_big_l = tl.load(RIN + oth * s_rn + 2 * s_rc, mask=oth_ok, other=0.0).to(ACC_DTYPE)
        else:
            oth_lab = tl.load(XL + oth * s_xl, mask=oth_ok, other=0)
            t_max_neg, t_min_pos, t_big_l, t_c_pos, t_sh_pos, t_c_neg, t_sh_neg, t_b_pos, t_c_lift = \
                _load_row_stats(RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, sc_pos, off_pos, sc_neg, off_neg,
                                MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
            pos, neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth_ok[None, :], self_pair,
                                     t_max_neg[None, :], t_min_pos[None, :], eps, MINING, EXCLUDE_DIAG)
            dv = _softmax_terms(v, pos, neg, t_c_pos[None, :], t_sh_pos[None, :], t_c_neg[None, :],
                                t_sh_neg[None, :], sc2_pos, sc2_neg)
        if HAS_B or HAS_LIFT:
            # Positive pairs only: skip a tile whose column labels miss the block's label range
            # (most tiles, when the rows are sorted by label as NT-Xent and Lifted do).
            col_lo, col_hi = _label_range(oth_lab, oth_ok)
            if (col_lo <= own_hi) & (col_hi >= own_lo):
                if OWN_IS_X:  # row i = a (the block), j = b
                    if HAS_B:
                        dv += _b_term(v, pos, b_pos[:, None], big_l[:, None], sc_pos, off_pos)
                        if SYMMETRIC:
                            dv += _b_term(v, t_pos, t_b_pos[None, :], t_big_l[None, :], sc_pos, off_pos)
                    if HAS_LIFT:  # mining 0: one relu(z) for both orders (logaddexp is symmetric)
                        lae, _ = _logaddexp_sigmoid(big_l[:, None], t_big_l[None, :])
                        r = sc_pos * _lifted_relu(v, lae, sc_pos, off_pos)
                        dv += tl.where(pos & (c_lift[:, None] != 0.0), c_lift[:, None] * r, 0.0)
                        if SYMMETRIC:
                            dv += tl.where(pos & (t_c_lift[None, :] != 0.0), t_c_lift[None, :] * r, 0.0)
                else:  # row i = b (the column), j = a
                    if HAS_B:
                        dv += _b_term(v, pos, t_b_pos[None, :], t_big_l[None, :], sc_pos, off_pos)
                    if HAS_LIFT:
                        dv += _lift_term(v, pos, t_c_lift[None, :], t_big_l[None, :], own_l[:, None], sc_pos, off_pos)
        if TRANSFORM == 1:  # dv/ds = -1/v, and 0 where v = 0 (or NaN, as the reference)
            dv = tl.where(d2_pos, -dv * inv_v, 0.0)
        if ONE_K:  # the tile of the similarity product is the right side of this one too
            other_d = oth_blk
        else:
            other_d = _load_rows(OTHER, oth, oth_ok, pid_d * BLOCK_DOUT, D, s_tn, s_td, BLOCK_DOUT, UPCAST,
                                 ACC_DTYPE)
        if not UPCAST:
            dv = dv.to(other_d.dtype)  # half-precision inputs: tensor-core product, fp32 accumulate
        grad += tl.dot(dv, other_d, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(GRAD + own[:, None] * s_gn + douts[None, :] * s_gd, grad.to(GRAD.dtype.element_ty),
             mask=own_ok[:, None] & dout_ok[None, :])


# ----------------------------------------------------------------------------- host side

def _launch_config(x):
    """Accumulator dtype, dot precision and the interpreter's upcast for inputs like x."""
    interp = interpret_mode()
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32:
        # Follow torch's matmul precision setting: IEEE unless the user allowed TF32.
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"
    # The interpreter computes in numpy; fp64/fp16/bf16 dots go through fp32/fp64 there.
    upcast = interp or x.dtype == torch.float64
    return dict(UPCAST=upcast, ACC_DTYPE=acc, INPUT_PRECISION=precision)


def _block_k(d):
    return max(16, min(64, triton.next_power_of_2(d)))


def _f32(p):
    return struct.unpack("f", struct.pack("f", p))[0]


def _split(p):
    """Three fp32-representable floats with hi + mid + lo == p exactly (for any p whose
    pieces stay in the fp32 normal range, i.e. every sensible loss parameter)."""
    p = float(p)
    if p != p or p in (float("inf"), float("-inf")) or abs(p) > 3.0e38:
        return [p, 0.0, 0.0]
    hi = _f32(p)
    mid = _f32(p - hi)
    lo = _f32(p - hi - mid)
    return [hi, mid, lo]


def _param_args(params):
    if len(params) != 5:
        raise ValueError(f"params must hold 5 floats [sc_pos, off_pos, sc_neg, off_neg, eps], got {params}")
    return _split_params(tuple(float(p) for p in params))


@functools.lru_cache(maxsize=256)  # a loss calls with the same few params every step: host time
def _split_params(params):
    return tuple(piece for p in params for piece in _split(p))


def _tiles(x, d, lift=False, symmetric=False, has_b=False, positives_only=False):
    """Tile sizes and warps per input dtype, from the sm_90 builds at D = 128 as
    scripts/triton_compile_check.py reports them (registers, spills, SASS instructions per tile
    element; nothing here is measured on a GPU yet -- python -m dmlkern.bench.tiles does that).

    Every dtype: the backward with the lifted term, the B_pos term or the symmetric one (two sets
    of row constants, two dl/dv terms) halves the column tile. bf16 there at 64 columns: spills
    (92-188 bytes per thread; fp32 up to 1.7 KiB with B_pos), and the symmetric one with mining
    counted 76 instructions per element against 57 at 32 (predicates spilled into registers);
    only the plain symmetric one is a little leaner at 64 (47 against 51). So do the forward's
    positives-only passes 2 and 3 (positives_only): no spills (bf16 pass 2 spilled 128 bytes at
    64), and narrower column tiles skip more of the columns without positives.

    fp16 / bf16: 64 x 64 tiles over 4 warps (one warpgroup), D up to 256 in one K slice (ONE_K):
    the row block stays loaded, each column tile is loaded once (and is the backward's second
    operand too), and the column loop is the pipelined one. Over 8 warps the backward computed
    every similarity tile twice (Triton gives each warpgroup all 64 columns, the layout of the
    second product's operand): 102 instructions per element in the symmetric backward before
    ONE_K and the leaner epilogues, 47 now; the lse2 forward went from 63 to 26. (At D = 256 the
    backward's 64 x 256 fp32 accumulator spills ~300 bytes per thread; K slices instead would
    compute every tile once per 128-wide output slice, and count 82 per element against 55.)
    fp32 (IEEE products: FMA, 128 per element at D = 128): 64 x 64 over 8 warps with K slices of
    32. fp64: 32 x 32 over 4 warps."""
    half_cols = lift or symmetric or has_b or positives_only
    if x.dtype == torch.float64:
        return dict(block_m=32, block_n=16 if half_cols else 32, block_k=min(_block_k(d), 32),
                    block_dout=64, num_warps=4)
    if x.element_size() == 2:
        block_k = max(16, triton.next_power_of_2(d)) if d <= 256 else 64
        return dict(block_m=64, block_n=32 if half_cols else 64, block_k=block_k, block_dout=128, num_warps=4)
    return dict(block_m=64, block_n=32 if half_cols else 64, block_k=min(_block_k(d), 32), block_dout=128,
                num_warps=8)


# Tile settings for tuning runs (python -m dmlkern.bench.tiles): {"fwd": {...}, "bwd": {...}},
# each with any of block_m, block_n, block_k, block_dout, num_warps, num_stages, replacing
# what _tiles() chose for every launch of that kernel. Empty: the defaults above.
TILE_OVERRIDES: dict = {}
_TILE_KEYS = {"block_m", "block_n", "block_k", "block_dout", "num_warps", "num_stages"}


def _with_overrides(tiles, kernel):
    override = TILE_OVERRIDES.get(kernel) or {}
    unknown = set(override) - _TILE_KEYS
    if unknown:
        raise ValueError(f"TILE_OVERRIDES[{kernel!r}]: unknown keys {sorted(unknown)}; allowed {sorted(_TILE_KEYS)}")
    for key, value in override.items():
        lowest = {"num_warps": 1, "num_stages": 1, "block_k": 16}.get(key, 16)
        power_of_two = key != "num_stages"
        if not isinstance(value, int) or value < lowest or (power_of_two and value & (value - 1)):
            raise ValueError(f"TILE_OVERRIDES[{kernel!r}][{key!r}] must be an int >= {lowest}"
                             f"{', a power of two' if power_of_two else ''}; got {value!r}")
    return {**tiles, **override}


_LAUNCH_TILES = {}  # (dtype, D, kernel, flags, overrides) -> (constexprs, options): host time per launch


def _launch_tiles(x, d, kernel, lift=False, symmetric=False, has_b=False, positives_only=False):
    """(tile constexprs, launch options) of one launch of `kernel` ("fwd" or "bwd"): _tiles, then
    TILE_OVERRIDES; ONE_K when D fits one K slice, and the backward's output slice BLOCK_DOUT
    (all of the padded D when ONE_K: the loaded tile is then both products' operand). Cached:
    the key holds everything the choice depends on, TILE_OVERRIDES' current entry included."""
    override = TILE_OVERRIDES.get(kernel) or {}
    key = (x.dtype, d, kernel, lift, symmetric, has_b, positives_only,
           repr(sorted(override.items())) if override else "")
    hit = _LAUNCH_TILES.get(key)
    if hit is None:
        t = _with_overrides(_tiles(x, d, lift=lift, symmetric=symmetric, has_b=has_b, positives_only=positives_only),
                            kernel)
        const = dict(BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], ONE_K=t["block_k"] >= d)
        if kernel == "bwd":
            const["BLOCK_DOUT"] = (t["block_k"] if const["ONE_K"]
                                   else max(16, min(t["block_dout"], triton.next_power_of_2(d))))
        hit = _LAUNCH_TILES[key] = (const, {k: t[k] for k in ("num_warps", "num_stages") if k in t})
    return dict(hit[0]), dict(hit[1])


def _coef_flags(row_coef, coef_terms):
    """(HAS_B, HAS_LIFT): whether row_coef's B_pos column, and its C_lift column if any, are
    used. The fused losses say so (coef_terms: bit 1 B_pos, bit 2 C_lift; they know their pass
    chain); coef_terms=-1 reads the values instead: one small reduction and one device-to-host
    copy per call (a host sync on a GPU). A column left out compiles its term away, which also
    frees registers. Tensors seen while torch.compile traces (fake) keep both terms then."""
    has_lift = row_coef.shape[1] == 6
    if coef_terms >= 0:
        return bool(coef_terms & 1), has_lift and bool(coef_terms & 2)
    if _is_fake(row_coef) or torch.compiler.is_compiling() or row_coef.shape[0] == 0:
        return True, has_lift
    flags = (row_coef[:, 4:] != 0).any(dim=0).tolist()
    return bool(flags[0]), has_lift and bool(flags[1])


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_fake(t):
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _check(transform, mining, pass_kind=None):
    if pass_kind is not None and pass_kind not in (0, 1, 2, 3):
        raise ValueError(f"pass_kind must be 0, 1, 2 or 3, got {pass_kind}")
    if transform not in (0, 1):
        raise ValueError(f"transform must be 0 or 1, got {transform}")
    if mining not in (0, 1):
        raise ValueError(f"mining must be 0 or 1, got {mining}")


def _row_tensor(t, n, width, dtype, device):
    """row_in / row_coef in the stats dtype; None stands for zeros (a pass that reads none)."""
    if t is None:
        return torch.zeros(1, width, device=device, dtype=dtype).expand(n, width)
    return t.to(dtype)


def engine_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining, params,
                   exclude_diag, wrap=lambda k: k):
    """Per-row statistics of one pass (docs/ENGINE.md): (N, 2) for extrema / lse2, (N, 3) for
    pos_softplus / lifted_pairs, in the stats dtype (fp32, fp64 for fp64 inputs)."""
    pass_kind, transform, mining = int(pass_kind), int(transform), int(mining)
    _check(transform, mining, pass_kind)
    if pass_kind == PASS_LIFTED_PAIRS:
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "pass_kind=3 (lifted_pairs)")
    n, d = x.shape
    m = y.shape[0]
    stats_dtype = _stats_dtype(x.dtype)
    out = torch.empty(n, 3 if pass_kind in (PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS) else 2, device=x.device,
                      dtype=stats_dtype)
    if n == 0:
        return out
    row_in = _row_tensor(row_in, n, 3, stats_dtype, x.device)
    tiles, options = _launch_tiles(x, d, "fwd", positives_only=pass_kind in (PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS))
    grid = (triton.cdiv(n, tiles["BLOCK_M"]),)
    wrap(_engine_fwd_kernel)[grid](
        x, y, x_labels, y_labels, row_in, out, n, m, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), x_labels.stride(0), y_labels.stride(0),
        row_in.stride(0), row_in.stride(1), out.stride(0), out.stride(1),
        *_param_args(params),
        PASS_KIND=pass_kind, TRANSFORM=transform,
        MINING=mining if pass_kind != PASS_EXTREMA else 0,  # extrema use the label masks only
        # (pass 3 is mining 0, checked above)
        EXCLUDE_DIAG=bool(exclude_diag),
        **tiles, **options, **_launch_config(x))
    return out


def engine_backward(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params,
                    exclude_diag, symmetric=False, wrap=lambda k: k, coef_terms=-1):
    """(grad_x, grad_y) in the input dtypes for dl/dv given by row_coef (docs/ENGINE.md): (N, 5),
    or (N, 6) with the lifted pairs' C_lift (the symmetric case only). symmetric (y is x): their
    sum as grad_x, grad_y zero. coef_terms: which of B_pos (1) and C_lift (2) row_coef uses, -1
    to read it from the values (see _coef_flags)."""
    transform, mining = int(transform), int(mining)
    _check(transform, mining)
    if row_coef.dim() != 2 or row_coef.shape[1] not in (5, 6):
        raise ValueError(f"row_coef must be (N, 5) or (N, 6), got {tuple(row_coef.shape)}")
    has_lift = row_coef.shape[1] == 6
    if has_lift:
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "row_coef with 6 columns (C_lift)")
    if symmetric and (x.shape != y.shape or x_labels.shape != y_labels.shape):
        raise ValueError(f"symmetric=True needs y of x's shape (y is x), got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    m = y.shape[0]
    acc_dtype = _stats_dtype(x.dtype)
    # Every program stores its whole (rows x D-slice) block, cast to the input dtype: no memset,
    # no cast kernel. The symmetric case's grad_y is zero (grad_x holds both sides).
    grad_x = (torch.empty if m > 0 else torch.zeros)(n, d, device=x.device, dtype=x.dtype)
    grad_y = (torch.zeros if symmetric or n == 0 else torch.empty)(m, d, device=y.device, dtype=y.dtype)
    if n > 0 and m > 0 and d > 0:
        row_in = _row_tensor(row_in, n, 3, acc_dtype, x.device)
        row_coef = row_coef.to(acc_dtype)
        has_b, has_lift = _coef_flags(row_coef, int(coef_terms))
        if not has_lift and row_coef.shape[1] == 6:
            row_coef = row_coef[:, :5]  # an all-zero C_lift column: the term is compiled away
        tiles, options = _launch_tiles(x, d, "bwd", lift=has_lift, symmetric=symmetric, has_b=has_b)
        cfg = _launch_config(x)
        pargs = _param_args(params)
        # symmetric: one launch over x's row blocks computes both sides (y is x, the same labels).
        sides = ((x, x, grad_x, True),) if symmetric else ((x, y, grad_x, True), (y, x, grad_y, False))
        for own, other, grad, own_is_x in sides:
            grid = (triton.cdiv(own.shape[0], tiles["BLOCK_M"]), triton.cdiv(d, tiles["BLOCK_DOUT"]))
            wrap(_engine_bwd_kernel)[grid](
                own, other, x_labels, x_labels if symmetric else y_labels, row_in, row_coef, grad,
                own.shape[0], other.shape[0], d,
                own.stride(0), own.stride(1), other.stride(0), other.stride(1),
                x_labels.stride(0), x_labels.stride(0) if symmetric else y_labels.stride(0),
                row_in.stride(0), row_in.stride(1),
                row_coef.stride(0), row_coef.stride(1), grad.stride(0), grad.stride(1),
                *pargs,
                OWN_IS_X=own_is_x, SYMMETRIC=bool(symmetric), TRANSFORM=transform, MINING=mining,
                EXCLUDE_DIAG=bool(exclude_diag), HAS_B=has_b, HAS_LIFT=has_lift,
                **tiles, **options, **cfg)
    return grad_x, grad_y
