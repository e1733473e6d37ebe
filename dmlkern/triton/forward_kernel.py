"""The pair engine's forward kernel (docs/ENGINE.md, Forward): one program per block of BLOCK_M
rows of X streams the column tiles of Y, computes each similarity tile with tl.dot, turns it into
values v (TRANSFORM), applies the label / mining masks and folds the tile into the per-row
statistics PASS_KIND chooses: the extrema, two online log-sum-exps (base 2), the positive
softplus / sigmoid sums, the lifted pairs' sums, or the hinge sums and counts. Transform 2 (circle)
gives each pair its set's value. Nothing N x M is stored. The positives-only
passes skip the column tiles whose labels miss the block's label range."""
import triton
import triton.language as tl

from ..engine_spec import PASS_EXTREMA, PASS_HINGE, PASS_LIFTED_PAIRS, PASS_LSE2, PASS_POS_SOFTPLUS
from .tile_math import (CIRCLE, LN2, LOG2E, _circle_params, _circle_value, _circle_weights, _engine_masks,
                        _engine_params, _exp, _hinge_args, _label_range, _lifted_relu, _load_row_in,
                        _load_rows, _log1p_of, _logaddexp_sigmoid, _self_pairs, _sim_tile, _tile_meets, _value)

EXTREMA = tl.constexpr(PASS_EXTREMA)
LSE2 = tl.constexpr(PASS_LSE2)
POS_SOFTPLUS = tl.constexpr(PASS_POS_SOFTPLUS)
LIFTED_PAIRS = tl.constexpr(PASS_LIFTED_PAIRS)
HINGE = tl.constexpr(PASS_HINGE)


@triton.jit
def _floored_softplus_terms(z, floor):
    """(term, d term / dz) of the pos_softplus pass with a log_floor F (pair_engine.h,
    engine_floored_softplus / engine_floored_sigmoid): the term -log(e^-softplus(z) + e^F) from
    a = F + softplus(z), -F - log1p(e^-a) past a = 0 and softplus(z) - log1p(e^a) before, 0 where
    softplus(z) is (p = 1); its slope sigmoid(z) sigmoid(-a). t = e^-|z| and ta = e^-|a| serve
    both (two exps, two logs, one division). The plain softplus and sigmoid for F = -inf; softplus
    is exact (no cut-off above z = 20, as F.softplus has; PML's NT-Xent has none). NaN -> NaN."""
    t = _exp(-tl.abs(z))
    sp = tl.where(z > 0.0, z, 0.0) + _log1p_of(t, 1.0 + t)
    num = tl.where(z >= 0.0, 1.0, t)
    a = floor + sp
    ta = _exp(-tl.abs(a))
    l1p = _log1p_of(ta, 1.0 + ta)
    term = tl.where(a > 0.0, -floor - l1p, sp - l1p)
    plain = floor == float("-inf")
    term = tl.where(plain, sp, tl.where(sp == 0.0, 0.0, term))
    slope = tl.where(plain, num / (1.0 + t),
                     (num * tl.where(a > 0.0, ta, 1.0)) / ((1.0 + t) * (1.0 + ta)))
    return term, slope


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
def _engine_fwd_kernel(X, Y, XL, YL, RIN, OUT, N, M, D,
                       s_xn, s_xd, s_yn, s_yd, s_xl, s_yl, s_rn, s_rc, s_on, s_oc,
                       sc_pos_h, sc_pos_m, sc_pos_l, off_pos_h, off_pos_m, off_pos_l,
                       sc_neg_h, sc_neg_m, sc_neg_l, off_neg_h, off_neg_m, off_neg_l, eps_h, eps_m, eps_l,
                       relu_pos_h, relu_pos_m, relu_pos_l, shift_pos_h, shift_pos_m, shift_pos_l,
                       relu_neg_h, relu_neg_m, relu_neg_l, shift_neg_h, shift_neg_m, shift_neg_l,
                       log_floor_h, log_floor_m, log_floor_l,
                       PASS_KIND: tl.constexpr, TRANSFORM: tl.constexpr, MINING: tl.constexpr,
                       EXCLUDE_DIAG: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                       UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """OUT[rows] = the per-row statistics of pass PASS_KIND (docs/ENGINE.md's table) for this
    program's block of rows of X against every row of Y. Each EngineParams field arrives as three
    fp32 pieces (sc_pos_h + sc_pos_m + sc_pos_l, ...); RIN holds row_in (max_neg, min_pos, L)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: N * D may exceed 2**31
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    x_lab = tl.load(XL + rows * s_xl, mask=row_ok, other=0)
    sc_pos, off_pos, sc_neg, off_neg, eps, floor = _engine_params(
        sc_pos_h, sc_pos_m, sc_pos_l, off_pos_h, off_pos_m, off_pos_l, sc_neg_h, sc_neg_m, sc_neg_l,
        off_neg_h, off_neg_m, off_neg_l, eps_h, eps_m, eps_l, log_floor_h, log_floor_m, log_floor_l, ACC_DTYPE)
    if TRANSFORM == CIRCLE:  # lse2 with mining 0 only (checked by the host)
        cp = _circle_params(relu_pos_h, relu_pos_m, relu_pos_l, shift_pos_h, shift_pos_m, shift_pos_l,
                            relu_neg_h, relu_neg_m, relu_neg_l, shift_neg_h, shift_neg_m, shift_neg_l, ACC_DTYPE)

    max_neg, min_pos, big_l = _load_row_in(RIN, rows, row_ok, s_rn, s_rc, MINING,
                                           PASS_KIND == POS_SOFTPLUS or PASS_KIND == LIFTED_PAIRS or PASS_KIND == HINGE,
                                           ACC_DTYPE)
    if PASS_KIND == POS_SOFTPLUS or PASS_KIND == LIFTED_PAIRS:
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
    sp = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)                 # pos_softplus / lifted_pairs / hinge sums
    sg = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    cnt = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    cnt_n = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)              # hinge: the count over neg

    if ONE_K:
        x_blk = _load_rows(X, rows, row_ok, 0, D, s_xn, s_xd, BLOCK_K, UPCAST, ACC_DTYPE)
    for c0 in range(0, M, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        y_lab = tl.load(YL + cols * s_yl, mask=col_ok, other=0)
        if PASS_KIND == POS_SOFTPLUS or PASS_KIND == LIFTED_PAIRS:
            meets = _tile_meets(y_lab, col_ok, lab_lo, lab_hi)
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
            if TRANSFORM == CIRCLE:  # each set's own value (pos: same label, neg: not)
                wp, wn = _circle_weights(s, cp)
                v = _circle_value(s, x_lab[:, None] == y_lab[None, :], wp, wn, cp)
            pos, neg = _engine_masks(v, x_lab[:, None], y_lab[None, :], col_ok[None, :],
                                     _self_pairs(pid * BLOCK_M, c0, BLOCK_M, BLOCK_N),
                                     max_neg[:, None], min_pos[:, None], eps, MINING, EXCLUDE_DIAG)
            if PASS_KIND == EXTREMA:
                # As PML's miner (an ascending sort, NaN last): the max over neg is NaN if a kept
                # v is NaN, the min over pos skips NaN. tl.max may drop NaN: count the kept NaNs
                # (a NaN-propagating tl.reduce is leaner on a GPU but ~30x slower in the
                # interpreter the tests run).
                is_nan = v != v
                mx = tl.maximum(mx, tl.max(tl.where(neg, v, float("-inf")), axis=1))
                mn = tl.minimum(mn, tl.min(tl.where(pos & ~is_nan, v, float("inf")), axis=1))
                nan_neg += tl.sum(tl.where(neg & is_nan, 1.0, 0.0), axis=1)
            elif PASS_KIND == LSE2:
                m_p, s_p, m_n, s_n = _lse2_update(m_p, s_p, m_n, s_n, v, pos, neg, sc_pos * LOG2E, off_pos * LOG2E,
                                                  sc_neg * LOG2E, off_neg * LOG2E)
            elif PASS_KIND == POS_SOFTPLUS:
                z = big_l[:, None] - sc_pos * v - off_pos
                term, slope = _floored_softplus_terms(z, floor)
                sp += tl.sum(tl.where(pos, term, 0.0), axis=1)
                sg += tl.sum(tl.where(pos, slope, 0.0), axis=1)
                cnt += tl.sum(tl.where(pos, 1.0, 0.0).to(ACC_DTYPE), axis=1)
            elif PASS_KIND == HINGE:  # relu keeps NaN (where, not maximum); > 0 is false for NaN
                t_pos, t_neg = _hinge_args(v, big_l[:, None], sc_pos, off_pos, sc_neg, off_neg)
                sp += tl.sum(tl.where(pos, tl.where(t_pos < 0.0, 0.0, t_pos), 0.0), axis=1)
                cnt += tl.sum(tl.where(pos & (t_pos > 0.0), 1.0, 0.0).to(ACC_DTYPE), axis=1)
                sg += tl.sum(tl.where(neg, tl.where(t_neg < 0.0, 0.0, t_neg), 0.0), axis=1)
                cnt_n += tl.sum(tl.where(neg & (t_neg > 0.0), 1.0, 0.0).to(ACC_DTYPE), axis=1)
            else:  # lifted pairs, the symmetric case: column j's L is row_in[j, 2]
                l_col = tl.load(RIN + cols * s_rn + 2 * s_rc, mask=col_ok, other=0.0).to(ACC_DTYPE)
                lae, sig = _logaddexp_sigmoid(big_l[:, None], l_col[None, :])
                r = _lifted_relu(v, lae, sc_pos, off_pos)
                f = 0.5 * (r * r)
                sp += tl.sum(tl.where(pos, f, 0.0), axis=1)
                sg += tl.sum(tl.where(pos & (r != 0.0), r * sig, 0.0), axis=1)
                cnt += tl.sum(tl.where(pos & (f > 0.0), 1.0, 0.0).to(ACC_DTYPE), axis=1)

    out = OUT + rows * s_on
    if PASS_KIND == EXTREMA:
        tl.store(out, tl.where(nan_neg > 0.0, float("nan"), mx), mask=row_ok)
        tl.store(out + s_oc, mn, mask=row_ok)
    elif PASS_KIND == LSE2:
        tl.store(out, _lse2_final(m_p, s_p), mask=row_ok)
        tl.store(out + s_oc, _lse2_final(m_n, s_n), mask=row_ok)
    elif PASS_KIND == HINGE:  # (sum pos, count pos, sum neg, count neg)
        tl.store(out, sp, mask=row_ok)
        tl.store(out + s_oc, cnt, mask=row_ok)
        tl.store(out + 2 * s_oc, sg, mask=row_ok)
        tl.store(out + 3 * s_oc, cnt_n, mask=row_ok)
    else:
        tl.store(out, sp, mask=row_ok)
        tl.store(out + s_oc, sg, mask=row_ok)
        tl.store(out + 2 * s_oc, cnt, mask=row_ok)
