"""Triton tiled pair engine (docs/ENGINE.md): one forward and one backward kernel for every
fused loss. Ground truth: dmlkern/reference/pair_engine.py.

Forward: one program per block of BLOCK_M rows of X streams column tiles of Y, computes the
similarity tile with tl.dot (_sim_tile), turns it into values v (TRANSFORM), applies
the label / mining masks and folds the tile into per-row statistics chosen by PASS_KIND
(extrema, two online log-sum-exps, the positive softplus / sigmoid sums, or the lifted pairs'
sums). Nothing N x M is stored.

Backward (FlashAttention-style): the tiles are recomputed; dl/dv follows the generic row_coef
formula, its B_pos and C_lift terms compiled in only when their columns hold a non-zero value
(HAS_B, HAS_LIFT, checked on the host). A program owns a block of rows of X (grad_x) or of Y
(grad_y) and is their only writer (no atomics, deterministic); a second grid axis splits the
output D into BLOCK_DOUT slices so the accumulator stays small for large D. symmetric=True (y is
x) is one launch over X's row blocks that adds both ends' dl/ds per tile (SYMMETRIC): half the
tile products of the two-sided backward.

Scalar parameters travel as three fp32 pieces each (hi + mid + lo == the Python float
exactly): Triton passes Python floats as fp32, which would round the fp64 path's parameters.
"""
import struct

import torch
import triton
import triton.language as tl

from ..reference.pair_engine import check_symmetric
from . import interpret_mode

__all__ = ["engine_forward", "engine_backward"]

PASS_EXTREMA, PASS_LSE2, PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS = 0, 1, 2, 3


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
def _sim_tile(A, B, a_idx, b_idx, a_ok, b_ok, D, s_an, s_ad, s_bn, s_bd,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """<A[a], B[b]> for a tile of rows a and b, accumulated in ACC_DTYPE (D in BLOCK_K slices)."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC_DTYPE)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # k * stride may pass 2**31 (strided views)
        k_ok = ks < D
        a = tl.load(A + a_idx[:, None] * s_an + ks[None, :] * s_ad, mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + b_idx[:, None] * s_bn + ks[None, :] * s_bd, mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong: compute in fp32 there
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc += tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _engine_masks(v, i_lab, j_lab, i_idx, j_idx, i_ok, j_ok, max_neg, min_pos, eps,
                  MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr):
    """(pos kept, neg kept); the i-side arguments broadcast along one tile axis, j along the
    other. pos: same label, and not the self-pair i == j when EXCLUDE_DIAG; neg: labels
    differ. max_neg / min_pos are row i's mining thresholds (ignored unless MINING)."""
    ok = i_ok & j_ok
    pos = ok & (i_lab == j_lab)
    if EXCLUDE_DIAG:
        pos = pos & (i_idx != j_idx)
    neg = ok & (i_lab != j_lab)
    if MINING == 1:
        pos = pos & (v - eps < max_neg)
        neg = neg & (v + eps > min_pos)
    return pos, neg


@triton.jit
def _softplus(z):
    """torch.nn.functional.softplus (threshold 20: z itself above it), without overflow:
    max(z, 0) + log1p(exp(-|z|)). softplus(-inf) = 0, softplus(inf) = inf, NaN -> NaN."""
    t = tl.exp(-tl.abs(z))
    u = 1.0 + t
    # log1p(t) without libdevice: log(u) * t / (u - 1) is accurate to a few ulp (Goldberg).
    log1p = tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))
    sp = tl.where(z > 0.0, z, 0.0) + log1p
    return tl.where(z > 20.0, z, sp)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) without overflow; sigmoid(-inf) = 0, NaN -> NaN."""
    t = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + t)
    return tl.where(z >= 0.0, r, t * r)


@triton.jit
def _logaddexp_sigmoid(a, b):
    """(logaddexp(a, b), sigmoid(a - b)) from one exp (pair_engine.h, engine_lifted_neg_part):
    -inf for a = b = -inf (the sigmoid is then 1/2 and only ever multiplied by 0); NaN -> NaN."""
    d = tl.where(a == b, 0.0, a - b)
    t = tl.exp(-tl.abs(d))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))  # as in _softplus
    r = 1.0 / u
    return tl.where(a > b, a, b) + log1p, tl.where(d >= 0.0, r, t * r)


@triton.jit
def _lifted_relu(v, lae, sc_pos, off_pos):
    """relu(logaddexp(L_i, L_j) + sc_pos * v + off_pos), keeping NaN."""
    z = lae + (sc_pos * v + off_pos)
    return tl.where(z < 0.0, 0.0, z)


@triton.jit
def _lse_update(m_i, s_i, z, keep):
    """Fold a [BM, BN] tile of kept values z into the online (max, scaled sum) of each row."""
    z = tl.where(keep, z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    # Reference point of the exponentials: 0 when the max is +-inf, so that no
    # exp(-inf - -inf) or exp(inf - inf) NaN appears (an +inf value then gives +inf).
    m_ref = tl.where((m_new == float("-inf")) | (m_new == float("inf")), 0.0, m_new)
    s_i = s_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
    return m_new, s_i


@triton.jit
def _lse2_update(m_p, s_p, m_n, s_n, v, pos, neg, sc_pos, off_pos, sc_neg, off_neg):
    """_lse_update of both sets with one exp per element: pos and neg are disjoint, so one tile
    z = sc v + off (the pos or the neg parameters) and one exp(z - m) (the pos or the neg
    reference point) serve both, each summed under its own mask (a kept NaN makes that row's
    sum NaN; the other set never sees it)."""
    z = v * tl.where(pos, sc_pos, sc_neg) + tl.where(pos, off_pos, off_neg)
    m_p_new = tl.maximum(m_p, tl.max(tl.where(pos, z, float("-inf")), axis=1))
    m_n_new = tl.maximum(m_n, tl.max(tl.where(neg, z, float("-inf")), axis=1))
    # Reference points as in _lse_update: 0 when the max is +-inf.
    m_p_ref = tl.where((m_p_new == float("-inf")) | (m_p_new == float("inf")), 0.0, m_p_new)
    m_n_ref = tl.where((m_n_new == float("-inf")) | (m_n_new == float("inf")), 0.0, m_n_new)
    e = tl.exp(z - tl.where(pos, m_p_ref[:, None], m_n_ref[:, None]))
    s_p = s_p * tl.exp(m_p - m_p_ref) + tl.sum(tl.where(pos, e, 0.0), axis=1)
    s_n = s_n * tl.exp(m_n - m_n_ref) + tl.sum(tl.where(neg, e, 0.0), axis=1)
    return m_p_new, s_p, m_n_new, s_n


@triton.jit
def _lse_final(m_i, s_i):
    """-inf for an empty set; NaN when a kept value was NaN (s_i is NaN then)."""
    empty = s_i == 0.0
    return tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, s_i)))


@triton.jit
def _load_row_stats(RIN, COEF, idx, ok, s_rn, s_rc, s_cn, s_cc, MINING: tl.constexpr,
                    HAS_LIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Row i's mining thresholds, L and row_coef (A_pos, LSE_pos, A_neg, LSE_neg, B_pos[, C_lift])."""
    if MINING == 1:
        max_neg = tl.load(RIN + idx * s_rn, mask=ok, other=0.0).to(ACC_DTYPE)
        min_pos = tl.load(RIN + idx * s_rn + s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        max_neg = tl.zeros(idx.shape, dtype=ACC_DTYPE)
        min_pos = tl.zeros(idx.shape, dtype=ACC_DTYPE)
    big_l = tl.load(RIN + idx * s_rn + 2 * s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    a_pos = tl.load(COEF + idx * s_cn, mask=ok, other=0.0).to(ACC_DTYPE)
    lse_pos = tl.load(COEF + idx * s_cn + s_cc, mask=ok, other=float("-inf")).to(ACC_DTYPE)
    a_neg = tl.load(COEF + idx * s_cn + 2 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    lse_neg = tl.load(COEF + idx * s_cn + 3 * s_cc, mask=ok, other=float("-inf")).to(ACC_DTYPE)
    b_pos = tl.load(COEF + idx * s_cn + 4 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    if HAS_LIFT:
        c_lift = tl.load(COEF + idx * s_cn + 5 * s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        c_lift = tl.zeros(idx.shape, dtype=ACC_DTYPE)
    return max_neg, min_pos, big_l, a_pos, lse_pos, a_neg, lse_neg, b_pos, c_lift


@triton.jit
def _dl_dv(v, pos, neg, big_l, a_pos, lse_pos, a_neg, lse_neg, b_pos,
           sc_pos, off_pos, sc_neg, off_neg, HAS_B: tl.constexpr):
    """dl/dv of a tile without the lifted term (docs/ENGINE.md); a term with a zero coefficient
    or an LSE of -inf is exactly 0 (never NaN); NaN coefficients or values propagate like the
    reference. pos and neg are disjoint: one exp per element serves both softmax terms. HAS_B
    (chosen on the host): the pos_softplus pass's B_pos sigmoid term; without it, B_pos is 0."""
    live_p = pos & (a_pos != 0.0) & (lse_pos != float("-inf"))
    live_n = neg & (a_neg != 0.0) & (lse_neg != float("-inf"))
    u = tl.where(pos, sc_pos * v + off_pos - tl.where(live_p, lse_pos, 0.0),
                 sc_neg * v + off_neg - tl.where(live_n, lse_neg, 0.0))
    coef = tl.where(pos, a_pos * sc_pos, a_neg * sc_neg)
    dv = tl.where(live_p | live_n, coef * tl.exp(u), 0.0)
    if HAS_B:
        live_b = pos & (b_pos != 0.0)
        dv -= tl.where(live_b, b_pos * sc_pos * _sigmoid(big_l - sc_pos * v - off_pos), 0.0)
    return dv


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
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        first_lab = tl.load(XL + pid * BLOCK_M * s_xl)  # the block's first row always exists
        lab_lo = tl.min(tl.where(row_ok, x_lab, first_lab))
        lab_hi = tl.max(tl.where(row_ok, x_lab, first_lab))

    # Row statistics (the ones a pass does not use stay constant and are compiled away).
    mx = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)   # extrema: max over neg
    mn = tl.full([BLOCK_M], float("inf"), dtype=ACC_DTYPE)    # extrema: min over pos
    nan_neg = tl.zeros([BLOCK_M], dtype=tl.int32)             # extrema: kept NaN counts
    nan_pos = tl.zeros([BLOCK_M], dtype=tl.int32)
    m_p = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)  # lse2: online (max, sum)
    s_p = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    m_n = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    s_n = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    sp = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)                 # pos_softplus / lifted_pairs sums
    sg = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    cnt = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)

    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        y_lab = tl.load(YL + cols * s_yl, mask=col_ok, other=0)
        if PASS_KIND == 2 or PASS_KIND == 3:
            first_col_lab = tl.load(YL + c0 * s_yl)
            meets = ((tl.min(tl.where(col_ok, y_lab, first_col_lab)) <= lab_hi)
                     & (tl.max(tl.where(col_ok, y_lab, first_col_lab)) >= lab_lo))
        else:
            meets = True
        if meets:
            s = _sim_tile(X, Y, rows, cols, row_ok, col_ok, D, s_xn, s_xd, s_yn, s_yd,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
            v = _value(s, TRANSFORM)
            pos, neg = _engine_masks(v, x_lab[:, None], y_lab[None, :], rows[:, None], cols[None, :],
                                     row_ok[:, None], col_ok[None, :], max_neg[:, None], min_pos[:, None],
                                     eps, MINING, EXCLUDE_DIAG)
            if PASS_KIND == 0:
                mx = tl.maximum(mx, tl.max(tl.where(neg, v, float("-inf")), axis=1))
                mn = tl.minimum(mn, tl.min(tl.where(pos, v, float("inf")), axis=1))
                is_nan = v != v  # tl.maximum / tl.max may drop NaN: count kept NaNs explicitly
                nan_neg += tl.sum(tl.where(neg & is_nan, 1, 0), axis=1)
                nan_pos += tl.sum(tl.where(pos & is_nan, 1, 0), axis=1)
            elif PASS_KIND == 1:
                m_p, s_p, m_n, s_n = _lse2_update(m_p, s_p, m_n, s_n, v, pos, neg, sc_pos, off_pos, sc_neg, off_neg)
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
        nan = tl.full([BLOCK_M], float("nan"), dtype=ACC_DTYPE)
        tl.store(out, tl.where(nan_neg > 0, nan, mx), mask=row_ok)
        tl.store(out + s_oc, tl.where(nan_pos > 0, nan, mn), mask=row_ok)
    elif PASS_KIND == 1:
        tl.store(out, _lse_final(m_p, s_p), mask=row_ok)
        tl.store(out + s_oc, _lse_final(m_n, s_n), mask=row_ok)
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
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    if OWN_IS_X:
        own_lab = tl.load(XL + own * s_xl, mask=own_ok, other=0)
        max_neg, min_pos, big_l, a_pos, lse_pos, a_neg, lse_neg, b_pos, c_lift = _load_row_stats(
            RIN, COEF, own, own_ok, s_rn, s_rc, s_cn, s_cc, MINING, HAS_LIFT, ACC_DTYPE)
    else:
        own_lab = tl.load(YL + own * s_yl, mask=own_ok, other=0)
        if HAS_LIFT:  # y is x: the own row's L
            own_l = tl.load(RIN + own * s_rn + 2 * s_rc, mask=own_ok, other=0.0).to(ACC_DTYPE)
        else:
            own_l = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    grad = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=ACC_DTYPE)
    for c0 in range(0, N_OTHER, BLOCK_N):
        oth = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        oth_ok = oth < N_OTHER
        s = _sim_tile(OWN, OTHER, own, oth, own_ok, oth_ok, D, s_on, s_od, s_tn, s_td,
                      BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, ACC_DTYPE, INPUT_PRECISION)
        v = _value(s, TRANSFORM)
        if OWN_IS_X:
            oth_lab = tl.load(YL + oth * s_yl, mask=oth_ok, other=0)
            pos, neg = _engine_masks(v, own_lab[:, None], oth_lab[None, :], own[:, None], oth[None, :],
                                     own_ok[:, None], oth_ok[None, :], max_neg[:, None], min_pos[:, None],
                                     eps, MINING, EXCLUDE_DIAG)
            dv = _dl_dv(v, pos, neg, big_l[:, None], a_pos[:, None], lse_pos[:, None],
                        a_neg[:, None], lse_neg[:, None], b_pos[:, None], sc_pos, off_pos, sc_neg, off_neg, HAS_B)
            if SYMMETRIC:  # the pairs (i, j) = (b, a): column b's statistics (labels: XL = YL)
                t_max_neg, t_min_pos, t_big_l, t_a_pos, t_lse_pos, t_a_neg, t_lse_neg, t_b_pos, t_c_lift = \
                    _load_row_stats(RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, MINING, HAS_LIFT, ACC_DTYPE)
                if MINING == 1:  # the masks depend on row i's thresholds: recompute them for i = b
                    t_pos, t_neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth[None, :], own[:, None],
                                                 oth_ok[None, :], own_ok[:, None], t_max_neg[None, :],
                                                 t_min_pos[None, :], eps, MINING, EXCLUDE_DIAG)
                else:  # label masks are symmetric
                    t_pos = pos
                    t_neg = neg
                dv += _dl_dv(v, t_pos, t_neg, t_big_l[None, :], t_a_pos[None, :], t_lse_pos[None, :],
                             t_a_neg[None, :], t_lse_neg[None, :], t_b_pos[None, :],
                             sc_pos, off_pos, sc_neg, off_neg, HAS_B)
                if HAS_LIFT:  # mining 0: one relu(z) for both orders (logaddexp is symmetric)
                    lae, _ = _logaddexp_sigmoid(big_l[:, None], t_big_l[None, :])
                    r = _lifted_relu(v, lae, sc_pos, off_pos)
                    dv += tl.where(pos & (c_lift[:, None] != 0.0), c_lift[:, None] * sc_pos * r, 0.0)
                    dv += tl.where(pos & (t_c_lift[None, :] != 0.0), t_c_lift[None, :] * sc_pos * r, 0.0)
            elif HAS_LIFT:  # y is x: column j's L
                oth_l = tl.load(RIN + oth * s_rn + 2 * s_rc, mask=oth_ok, other=0.0).to(ACC_DTYPE)
                dv += _lift_term(v, pos, c_lift[:, None], big_l[:, None], oth_l[None, :], sc_pos, off_pos)
        else:
            oth_lab = tl.load(XL + oth * s_xl, mask=oth_ok, other=0)
            t_max_neg, t_min_pos, t_big_l, t_a_pos, t_lse_pos, t_a_neg, t_lse_neg, t_b_pos, t_c_lift = \
                _load_row_stats(RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, MINING, HAS_LIFT, ACC_DTYPE)
            pos, neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth[None, :], own[:, None],
                                     oth_ok[None, :], own_ok[:, None], t_max_neg[None, :], t_min_pos[None, :],
                                     eps, MINING, EXCLUDE_DIAG)
            dv = _dl_dv(v, pos, neg, t_big_l[None, :], t_a_pos[None, :], t_lse_pos[None, :],
                        t_a_neg[None, :], t_lse_neg[None, :], t_b_pos[None, :], sc_pos, off_pos, sc_neg, off_neg,
                        HAS_B)
            if HAS_LIFT:
                dv += _lift_term(v, pos, t_c_lift[None, :], t_big_l[None, :], own_l[:, None], sc_pos, off_pos)
        if TRANSFORM == 1:  # dv/ds = -1/v, and 0 where v = 0 (or NaN, as the reference)
            pos_v = v > 0.0
            dv = tl.where(pos_v, -dv / tl.where(pos_v, v, 1.0), 0.0)
        other_d = tl.load(OTHER + oth[:, None] * s_tn + douts[None, :] * s_td,
                          mask=oth_ok[:, None] & dout_ok[None, :], other=0.0)
        if UPCAST:
            other_d = other_d.to(ACC_DTYPE)
        else:
            dv = dv.to(other_d.dtype)  # half-precision inputs: tensor-core product, fp32 accumulate
        grad += tl.dot(dv, other_d, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(GRAD + own[:, None] * s_gn + douts[None, :] * s_gd, grad,
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
    return [piece for p in params for piece in _split(p)]


def _tiles(x, d, lift=False, symmetric=False):
    """Tile sizes and warps per input dtype, chosen so that the sm_90 builds of both kernels
    keep within 255 registers with (almost) no spills (scripts/triton_compile_check.py prints
    them): 64 x 64 tiles over 8 warps for fp32 / fp16 / bf16 (fp32 with K-slices of at most 32),
    32 x 32 tiles over 4 warps for fp64. The backward with the lifted pairs' term (lift) halves
    the fp32 / fp64 column tiles: at full size ptxas spilled 176-352 bytes per thread there, at
    half size 0-24 (fp16 / bf16: <= 24 either way). The one-launch symmetric backward holds the
    row and the column statistics and two dl/dv terms per tile: it halves the column tiles for
    fp32 and fp64 too (fp32, D=128: 0-16 bytes of spills at 64 x 32; fp64: none; bf16 keeps
    64 x 64 with 8-20 bytes, 0 at 64 x 32 -- kept at 64 like the lifted case, unmeasured on a GPU)."""
    if x.dtype == torch.float64:
        return dict(block_m=32, block_n=16 if lift or symmetric else 32, block_k=min(_block_k(d), 32),
                    block_dout=64, num_warps=4)
    block_k = _block_k(d) if x.element_size() == 2 else min(_block_k(d), 32)
    block_n = 32 if (lift or symmetric) and x.dtype == torch.float32 else 64
    return dict(block_m=64, block_n=block_n, block_k=block_k, block_dout=128, num_warps=8)


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


def _launch_tiles(t):
    """The launch keywords besides the BLOCK_* constexprs."""
    return {k: t[k] for k in ("num_warps", "num_stages") if k in t}


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
    t = _with_overrides(_tiles(x, d), "fwd")
    grid = (triton.cdiv(n, t["block_m"]),)
    wrap(_engine_fwd_kernel)[grid](
        x, y, x_labels, y_labels, row_in, out, n, m, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), x_labels.stride(0), y_labels.stride(0),
        row_in.stride(0), row_in.stride(1), out.stride(0), out.stride(1),
        *_param_args(params),
        PASS_KIND=pass_kind, TRANSFORM=transform,
        MINING=mining if pass_kind != PASS_EXTREMA else 0,  # extrema use the label masks only
        # (pass 3 is mining 0, checked above)
        EXCLUDE_DIAG=bool(exclude_diag),
        BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], **_launch_tiles(t),
        **_launch_config(x))
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
    grad_x = torch.zeros(n, d, device=x.device, dtype=acc_dtype)
    grad_y = torch.zeros(m, d, device=y.device, dtype=acc_dtype)
    if n > 0 and m > 0 and d > 0:
        row_in = _row_tensor(row_in, n, 3, acc_dtype, x.device)
        row_coef = row_coef.to(acc_dtype)
        has_b, has_lift = _coef_flags(row_coef, int(coef_terms))
        if not has_lift and row_coef.shape[1] == 6:
            row_coef = row_coef[:, :5]  # an all-zero C_lift column: the term is compiled away
        t = _with_overrides(_tiles(x, d, lift=has_lift, symmetric=symmetric), "bwd")
        block_dout = max(16, min(t["block_dout"], triton.next_power_of_2(d)))
        cfg = _launch_config(x)
        pargs = _param_args(params)
        # symmetric: one launch over x's row blocks computes both sides (y is x, the same labels).
        sides = ((x, x, grad_x, True),) if symmetric else ((x, y, grad_x, True), (y, x, grad_y, False))
        for own, other, grad, own_is_x in sides:
            grid = (triton.cdiv(own.shape[0], t["block_m"]), triton.cdiv(d, block_dout))
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
                BLOCK_M=t["block_m"], BLOCK_N=t["block_n"], BLOCK_K=t["block_k"], BLOCK_DOUT=block_dout,
                **_launch_tiles(t), **cfg)
    return grad_x.to(x.dtype), grad_y.to(y.dtype)
