"""The pair engine's backward kernel (docs/ENGINE.md, Backward), FlashAttention-style: the
similarity tiles are recomputed, dl/dv follows the generic row_coef formula and is multiplied back
onto the other side's rows. A program owns a block of rows and is their only writer (no atomics,
deterministic); for a large D a second grid axis splits the output into BLOCK_DOUT slices.

What a tile contributes depends on the program's role, one helper each:
- `_dl_dv_row_side` (grad_x): the own rows are the pairs' rows i, their statistics loaded once
  per program;
- `_dl_dv_col_side` (grad_y): the own rows are the pairs' columns j, row i's statistics loaded
  per tile;
- `_dl_dv_symmetric` (y is x, grad_x + grad_y in one launch): both orders of each pair, since
  s_ij = s_ji, so each tile product is done once.
The B_pos and C_lift terms (positive pairs only) are compiled in only when the caller uses them
(HAS_B, HAS_LIFT) and computed only in the tiles whose labels meet the block's. The hinge backward
(HINGE: row_coef (N, 2) = (H_pos, H_neg), mining 0) has its own helper for every role,
`_dl_dv_hinge`, and none of the softmax terms. Transform 2 (circle) hands the helpers each pair's
value in its set and multiplies their dl/dv by the set's relu weight."""
import triton
import triton.language as tl

from .tile_math import (CIRCLE, LOG2E, MULTI_SIMILARITY, UNIT_DISTANCE, _circle_params, _circle_value, _circle_weights,
                        _engine_masks, _engine_params, _floored_sigmoid, _hinge_args, _label_range, _lifted_relu,
                        _load_row_in, _load_rows, _logaddexp_sigmoid, _self_pairs, _sim_tile, _tile_meets)


@triton.jit
def _softmax_coefs(a, lse, sc, off):
    """Per-row constants of a softmax term a·sc·exp(sc·v + off − lse) = c·exp2(sc·log2(e)·v + shift):
    c = a·sc and shift = (off − lse)·log2(e), c = 0 for a dead term (a = 0 or lse = −inf),
    which then contributes exactly 0 (never NaN)."""
    live = (a != 0.0) & (lse != float("-inf"))
    return tl.where(live, a * sc, 0.0), tl.where(live, (off - lse) * LOG2E, 0.0)


@triton.jit
def _load_row_stats(RIN, COEF, idx, ok, s_rn, s_rc, s_cn, s_cc, prm,
                    MINING: tl.constexpr, HAS_B: tl.constexpr, HAS_LIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Row i's mining thresholds, L and the backward's per-row constants: the softmax terms'
    (c, shift) for pos and neg (_softmax_coefs), B_pos and C_lift (0 unless HAS_B / HAS_LIFT), as
    the tuple (max_neg, min_pos, L, c_pos, shift_pos, c_neg, shift_neg, B_pos, C_lift). prm: the
    EngineParams values (_engine_params)."""
    sc_pos, off_pos, sc_neg, off_neg, _, _ = prm
    zeros = tl.zeros(idx.shape, dtype=ACC_DTYPE)
    max_neg, min_pos, big_l = _load_row_in(RIN, idx, ok, s_rn, s_rc, MINING, HAS_B or HAS_LIFT, ACC_DTYPE)
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
def _b_term(v, pos, b_pos, big_l, sc_pos, off_pos, floor):
    """The pos_softplus pass's term of dl/dv: -B_pos sc_pos sigmoid(z) w(z) on pos pairs,
    z = L - sc_pos v - off_pos, w the log_floor's weight (1 without one); exactly 0 where B_pos is 0."""
    z = big_l - sc_pos * v - off_pos
    return tl.where(pos & (b_pos != 0.0), -(b_pos * sc_pos) * _floored_sigmoid(z, floor), 0.0)


@triton.jit
def _lift_term(v, pos, c_lift, big_l, l_j, sc_pos, off_pos):
    """The lifted pairs' term of dl/dv: C_lift sc_pos relu(logaddexp(L_i, L_j) + sc_pos v + off_pos)
    on pos pairs, exactly 0 where C_lift is 0."""
    lae, _ = _logaddexp_sigmoid(big_l, l_j)
    live_l = pos & (c_lift != 0.0)
    return tl.where(live_l, c_lift * sc_pos * _lifted_relu(v, lae, sc_pos, off_pos), 0.0)


@triton.jit
def _row_pairs(v, self_pair, own_lab, rs, oth_ok, oth_lab, eps, sc2_pos, sc2_neg,
               MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr):
    """The pairs (i, j) = (own row a, column b) of a tile, with row i's statistics rs
    (_load_row_stats): their masks (pos, neg) and softmax terms of dl/dv, as (pos, neg, dv)."""
    max_neg, min_pos, c_pos, sh_pos, c_neg, sh_neg = rs[0], rs[1], rs[3], rs[4], rs[5], rs[6]
    pos, neg = _engine_masks(v, own_lab[:, None], oth_lab[None, :], oth_ok[None, :], self_pair,
                             max_neg[:, None], min_pos[:, None], eps, MINING, EXCLUDE_DIAG)
    dv = _softmax_terms(v, pos, neg, c_pos[:, None], sh_pos[:, None], c_neg[:, None], sh_neg[:, None],
                        sc2_pos, sc2_neg)
    return pos, neg, dv


@triton.jit
def _dl_dv_row_side(v, self_pair, own_lab, rs, oth, oth_ok, oth_lab, meets, RIN, s_rn, s_rc, prm, sc2_pos, sc2_neg,
                    MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, HAS_B: tl.constexpr, HAS_LIFT: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    """dl/dv of a tile for grad_x: the pairs (i, j) = (own row a, column b), with row i's
    statistics rs (_load_row_stats, per program); the lifted term reads column j's L per tile."""
    sc_pos, off_pos, sc_neg, off_neg, eps, floor = prm
    big_l, b_pos, c_lift = rs[2], rs[7], rs[8]  # L, B_pos, C_lift
    pos, neg, dv = _row_pairs(v, self_pair, own_lab, rs, oth_ok, oth_lab, eps, sc2_pos, sc2_neg, MINING, EXCLUDE_DIAG)
    if HAS_LIFT:  # y is x: column j's L
        l_col = tl.load(RIN + oth * s_rn + 2 * s_rc, mask=oth_ok, other=0.0).to(ACC_DTYPE)
    if HAS_B or HAS_LIFT:
        if meets:  # the tile holds positive pairs
            if HAS_B:
                dv += _b_term(v, pos, b_pos[:, None], big_l[:, None], sc_pos, off_pos, floor)
            if HAS_LIFT:
                lae, _ = _logaddexp_sigmoid(big_l[:, None], l_col[None, :])
                r = sc_pos * _lifted_relu(v, lae, sc_pos, off_pos)
                dv += tl.where(pos & (c_lift[:, None] != 0.0), c_lift[:, None] * r, 0.0)
    return dv


@triton.jit
def _dl_dv_col_side(v, self_pair, own_lab, own_l, oth, oth_ok, oth_lab, meets, RIN, COEF, s_rn, s_rc, s_cn, s_cc,
                    prm, sc2_pos, sc2_neg, MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_LIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dl/dv of a tile for grad_y, transposed: the pairs (i, j) = (column b, own row a), with row
    i's statistics loaded per tile; own_l is row j's L (the lifted term, y is x)."""
    sc_pos, off_pos, sc_neg, off_neg, eps, floor = prm
    t_max_neg, t_min_pos, t_big_l, t_c_pos, t_sh_pos, t_c_neg, t_sh_neg, t_b_pos, t_c_lift = _load_row_stats(
        RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, prm, MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
    pos, neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth_ok[None, :], self_pair,
                             t_max_neg[None, :], t_min_pos[None, :], eps, MINING, EXCLUDE_DIAG)
    dv = _softmax_terms(v, pos, neg, t_c_pos[None, :], t_sh_pos[None, :], t_c_neg[None, :], t_sh_neg[None, :],
                        sc2_pos, sc2_neg)
    if HAS_B or HAS_LIFT:
        if meets:  # the tile holds positive pairs
            if HAS_B:
                dv += _b_term(v, pos, t_b_pos[None, :], t_big_l[None, :], sc_pos, off_pos, floor)
            if HAS_LIFT:
                dv += _lift_term(v, pos, t_c_lift[None, :], t_big_l[None, :], own_l[:, None], sc_pos, off_pos)
    return dv


@triton.jit
def _dl_dv_symmetric(v, self_pair, own_lab, rs, oth, oth_ok, oth_lab, meets, RIN, COEF, s_rn, s_rc, s_cn, s_cc,
                     prm, sc2_pos, sc2_neg, MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, HAS_B: tl.constexpr,
                     HAS_LIFT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dl/ds(a, b) + dl/ds(b, a) of a tile when y is x (the same labels): the pair (i, j) = (a, b)
    with the own row's statistics rs plus the pair (b, a) with column b's, loaded per tile. The
    label masks are symmetric (the mining ones are recomputed for i = b); one relu(z) serves both
    orders of the lifted term (logaddexp is symmetric)."""
    sc_pos, off_pos, sc_neg, off_neg, eps, floor = prm
    big_l, b_pos, c_lift = rs[2], rs[7], rs[8]  # L, B_pos, C_lift
    pos, neg, dv = _row_pairs(v, self_pair, own_lab, rs, oth_ok, oth_lab, eps, sc2_pos, sc2_neg, MINING, EXCLUDE_DIAG)
    t_max_neg, t_min_pos, t_big_l, t_c_pos, t_sh_pos, t_c_neg, t_sh_neg, t_b_pos, t_c_lift = _load_row_stats(
        RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, prm, MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
    if MINING == MULTI_SIMILARITY:  # the masks depend on row i's thresholds: recompute them for i = b
        t_pos, t_neg = _engine_masks(v, oth_lab[None, :], own_lab[:, None], oth_ok[None, :], self_pair,
                                     t_max_neg[None, :], t_min_pos[None, :], eps, MINING, EXCLUDE_DIAG)
    else:
        t_pos = pos
        t_neg = neg
    dv += _softmax_terms(v, t_pos, t_neg, t_c_pos[None, :], t_sh_pos[None, :], t_c_neg[None, :], t_sh_neg[None, :],
                         sc2_pos, sc2_neg)
    if HAS_B or HAS_LIFT:
        if meets:  # the tile holds positive pairs
            if HAS_B:
                dv += _b_term(v, pos, b_pos[:, None], big_l[:, None], sc_pos, off_pos, floor)
                dv += _b_term(v, t_pos, t_b_pos[None, :], t_big_l[None, :], sc_pos, off_pos, floor)
            if HAS_LIFT:  # mining 0 (checked by the host)
                lae, _ = _logaddexp_sigmoid(big_l[:, None], t_big_l[None, :])
                r = sc_pos * _lifted_relu(v, lae, sc_pos, off_pos)
                dv += tl.where(pos & (c_lift[:, None] != 0.0), c_lift[:, None] * r, 0.0)
                dv += tl.where(pos & (t_c_lift[None, :] != 0.0), t_c_lift[None, :] * r, 0.0)
    return dv


@triton.jit
def _load_hinge_coefs(RIN, COEF, idx, ok, s_rn, s_rc, s_cn, s_cc, ACC_DTYPE: tl.constexpr):
    """Rows idx's (L, H_pos, H_neg) for the hinge backward (row_in column 2, row_coef (N, 2))."""
    big_l = tl.load(RIN + idx * s_rn + 2 * s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    h_pos = tl.load(COEF + idx * s_cn, mask=ok, other=0.0).to(ACC_DTYPE)
    h_neg = tl.load(COEF + idx * s_cn + s_cc, mask=ok, other=0.0).to(ACC_DTYPE)
    return big_l, h_pos, h_neg


@triton.jit
def _hinge_terms(v, pos, neg, big_l, h_pos, h_neg, sc_pos, off_pos, sc_neg, off_neg):
    """The hinge backward's dl/dv of row i's pairs: H_pos sc_pos [t_pos > 0] on pos, H_neg sc_neg
    [t_neg > 0] on neg (0 for a NaN t, and exactly 0 for a zero coefficient)."""
    t_pos, t_neg = _hinge_args(v, big_l, sc_pos, off_pos, sc_neg, off_neg)
    return (tl.where(pos & (h_pos != 0.0) & (t_pos > 0.0), h_pos * sc_pos, 0.0)
            + tl.where(neg & (h_neg != 0.0) & (t_neg > 0.0), h_neg * sc_neg, 0.0))


@triton.jit
def _dl_dv_hinge(v, self_pair, own_lab, hs, oth, oth_ok, oth_lab, RIN, COEF, s_rn, s_rc, s_cn, s_cc, prm,
                 OWN_IS_X: tl.constexpr, SYMMETRIC: tl.constexpr, MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """dl/dv of a tile for the hinge backward in each role: grad_x (the own rows are rows i, their
    hs = (L, H_pos, H_neg) loaded once per program), grad_y (rows i are the columns, loaded per
    tile) and symmetric (both orders of each pair). Without mining the masks are symmetric: one
    pair of masks serves both orders."""
    sc_pos, off_pos, sc_neg, off_neg, eps, _ = prm
    pos, neg = _engine_masks(v, own_lab[:, None], oth_lab[None, :], oth_ok[None, :], self_pair, 0.0, 0.0, eps,
                             MINING, EXCLUDE_DIAG)
    if OWN_IS_X:
        dv = _hinge_terms(v, pos, neg, hs[0][:, None], hs[1][:, None], hs[2][:, None], sc_pos, off_pos, sc_neg,
                          off_neg)
    if SYMMETRIC or not OWN_IS_X:
        t_l, t_hp, t_hn = _load_hinge_coefs(RIN, COEF, oth, oth_ok, s_rn, s_rc, s_cn, s_cc, ACC_DTYPE)
        col = _hinge_terms(v, pos, neg, t_l[None, :], t_hp[None, :], t_hn[None, :], sc_pos, off_pos, sc_neg, off_neg)
        if OWN_IS_X:
            dv += col
        else:
            dv = col
    return dv


@triton.jit
def _engine_bwd_kernel(OWN, OTHER, OWN_LAB, OTH_LAB, RIN, COEF, GRAD, N_OWN, N_OTHER, D,
                       s_on, s_od, s_tn, s_td, s_own_lab, s_oth_lab, s_rn, s_rc, s_cn, s_cc, s_gn, s_gd,
                       sc_pos_h, sc_pos_m, sc_pos_l, off_pos_h, off_pos_m, off_pos_l,
                       sc_neg_h, sc_neg_m, sc_neg_l, off_neg_h, off_neg_m, off_neg_l, eps_h, eps_m, eps_l,
                       relu_pos_h, relu_pos_m, relu_pos_l, shift_pos_h, shift_pos_m, shift_pos_l,
                       relu_neg_h, relu_neg_m, relu_neg_l, shift_neg_h, shift_neg_m, shift_neg_l,
                       log_floor_h, log_floor_m, log_floor_l,
                       OWN_IS_X: tl.constexpr, SYMMETRIC: tl.constexpr, TRANSFORM: tl.constexpr,
                       MINING: tl.constexpr, EXCLUDE_DIAG: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_LIFT: tl.constexpr, HINGE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
                       BLOCK_DOUT: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """GRAD[a, dout] = sum_b dl/ds(a, b) OTHER[b, dout] for this program's block of `own` rows a,
    where (i, j) = (a, b) for grad_x (OWN_IS_X) and (b, a) for grad_y; OWN_LAB / OTH_LAB are the
    own and other rows' labels. Row-i statistics (RIN: row_in, COEF: row_coef) belong to X's rows;
    HINGE: COEF is the hinge backward's (H_pos, H_neg).
    SYMMETRIC (y is x, the same labels; OWN_IS_X): grad_x + grad_y in one launch. Each
    EngineParams field arrives as three fp32 pieces (sc_pos_h + sc_pos_m + sc_pos_l, ...)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    own = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    own_ok = own < N_OWN
    douts = pid_d * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT).to(tl.int64)
    dout_ok = douts < D
    prm = _engine_params(sc_pos_h, sc_pos_m, sc_pos_l, off_pos_h, off_pos_m, off_pos_l, sc_neg_h, sc_neg_m, sc_neg_l,
                         off_neg_h, off_neg_m, off_neg_l, eps_h, eps_m, eps_l, log_floor_h, log_floor_m, log_floor_l,
                         ACC_DTYPE)
    sc2_pos = prm[0] * LOG2E
    sc2_neg = prm[2] * LOG2E
    if TRANSFORM == CIRCLE:  # the softmax backward with mining 0 only (checked by the host)
        cp = _circle_params(relu_pos_h, relu_pos_m, relu_pos_l, shift_pos_h, shift_pos_m, shift_pos_l,
                            relu_neg_h, relu_neg_m, relu_neg_l, shift_neg_h, shift_neg_m, shift_neg_l, ACC_DTYPE)
    own_lab = tl.load(OWN_LAB + own * s_own_lab, mask=own_ok, other=0)
    if HINGE:  # the own rows' (L, H_pos, H_neg) when they are rows i
        if OWN_IS_X:
            hs = _load_hinge_coefs(RIN, COEF, own, own_ok, s_rn, s_rc, s_cn, s_cc, ACC_DTYPE)
        else:
            zeros = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
            hs = (zeros, zeros, zeros)
    elif OWN_IS_X:  # the own rows are rows i: their statistics once per program
        rs = _load_row_stats(RIN, COEF, own, own_ok, s_rn, s_rc, s_cn, s_cc, prm, MINING, HAS_B, HAS_LIFT, ACC_DTYPE)
    elif HAS_LIFT:  # grad_y, y is x: the own row's L (row j's)
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
        if TRANSFORM == UNIT_DISTANCE:  # v = sqrt(d2) and dv/ds = -1/v from one rsqrt (d2 > 0; both 0 at d2 = 0)
            d2 = 2.0 - 2.0 * s
            d2_pos = d2 > 0.0  # NaN: False
            inv_v = tl.where(d2_pos, tl.rsqrt(tl.where(d2_pos, d2, 1.0)), 0.0)
            v = tl.where(d2_pos, d2 * inv_v, tl.where(d2 == d2, 0.0, d2))  # keeps NaN, clamps d2 < 0 to 0
        else:
            v = s
        self_pair = _self_pairs(pid * BLOCK_M, c0, BLOCK_M, BLOCK_N)
        oth_lab = tl.load(OTH_LAB + oth * s_oth_lab, mask=oth_ok, other=0)
        if TRANSFORM == CIRCLE:  # each pair's value in its set (pos: same label, neg: not); symmetric in (a, b)
            same = own_lab[:, None] == oth_lab[None, :]
            wp, wn = _circle_weights(s, cp)
            v = _circle_value(s, same, wp, wn, cp)
        if HAS_B or HAS_LIFT:
            # Positive pairs only: their terms skip a tile whose labels miss the block's label
            # range (most tiles, when the rows are sorted by label as NT-Xent and Lifted do).
            # Checked here, before the softmax terms: in the role helpers after them (as before the
            # split) 3 of the sm_90 B_pos / lifted configurations are leaner, 5 heavier, 2 mixed.
            meets = _tile_meets(oth_lab, oth_ok, own_lo, own_hi)
        else:
            meets = False  # no positive-pair terms
        if HINGE:
            dv = _dl_dv_hinge(v, self_pair, own_lab, hs, oth, oth_ok, oth_lab, RIN, COEF, s_rn, s_rc, s_cn, s_cc,
                              prm, OWN_IS_X, SYMMETRIC, MINING, EXCLUDE_DIAG, ACC_DTYPE)
        elif SYMMETRIC:
            dv = _dl_dv_symmetric(v, self_pair, own_lab, rs, oth, oth_ok, oth_lab, meets, RIN, COEF, s_rn, s_rc,
                                  s_cn, s_cc, prm, sc2_pos, sc2_neg, MINING, EXCLUDE_DIAG, HAS_B, HAS_LIFT, ACC_DTYPE)
        elif OWN_IS_X:
            dv = _dl_dv_row_side(v, self_pair, own_lab, rs, oth, oth_ok, oth_lab, meets, RIN, s_rn, s_rc, prm,
                                 sc2_pos, sc2_neg, MINING, EXCLUDE_DIAG, HAS_B, HAS_LIFT, ACC_DTYPE)
        else:
            dv = _dl_dv_col_side(v, self_pair, own_lab, own_l, oth, oth_ok, oth_lab, meets, RIN, COEF, s_rn, s_rc,
                                 s_cn, s_cc, prm, sc2_pos, sc2_neg, MINING, EXCLUDE_DIAG, HAS_B, HAS_LIFT, ACC_DTYPE)
        if TRANSFORM == UNIT_DISTANCE:  # dv/ds = -1/v, and 0 where v = 0 (or NaN, as the reference)
            dv = tl.where(d2_pos, -dv * inv_v, 0.0)
        if TRANSFORM == CIRCLE:  # dv/ds: the pair's relu weight; 0 off both sets (excluded self-pairs, past M)
            kept = oth_ok[None, :]
            if EXCLUDE_DIAG:
                kept = kept & ((same & self_pair) == 0)
            dv = tl.where(kept, dv * tl.where(same, wp, wn), 0.0)
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
