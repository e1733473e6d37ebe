"""The @triton.jit helpers both pair-engine kernels use (docs/ENGINE.md): the fp32-split
parameters, tile loads and the similarity product, the value transform, the label / mining masks,
and exp2-based numerics (each exponential is one ex2.approx.ftz with log2(e) folded into its
argument). Forward-only helpers live in forward_kernel.py, backward-only ones in
backward_kernel.py."""
import triton
import triton.language as tl

from ..engine_spec import MINING_MULTI_SIMILARITY, TRANSFORM_CIRCLE, TRANSFORM_UNIT_DISTANCE

# Triton kernels read only constexpr globals: engine_spec's ids and the constants they use.
UNIT_DISTANCE = tl.constexpr(TRANSFORM_UNIT_DISTANCE)
CIRCLE = tl.constexpr(TRANSFORM_CIRCLE)
MULTI_SIMILARITY = tl.constexpr(MINING_MULTI_SIMILARITY)
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exponentials run as exp2
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _param(hi, mid, lo, ACC_DTYPE: tl.constexpr):
    """Rebuild a parameter in ACC_DTYPE from its fp32 pieces (exact in fp64; in fp32 it is
    the float32 rounding of the parameter, as torch uses for a Python scalar)."""
    return ((tl.full([], 0.0, ACC_DTYPE) + hi + mid) + lo).to(ACC_DTYPE)

@triton.jit
def _engine_params(sc_pos_h, sc_pos_m, sc_pos_l, off_pos_h, off_pos_m, off_pos_l,
                   sc_neg_h, sc_neg_m, sc_neg_l, off_neg_h, off_neg_m, off_neg_l,
                   eps_h, eps_m, eps_l, log_floor_h, log_floor_m, log_floor_l, ACC_DTYPE: tl.constexpr):
    """EngineParams (sc_pos, off_pos, sc_neg, off_neg, eps, log_floor) in ACC_DTYPE, from the three
    fp32 pieces (_h + _m + _l) the host splits each one into (pair_engine._param_args)."""
    return (_param(sc_pos_h, sc_pos_m, sc_pos_l, ACC_DTYPE), _param(off_pos_h, off_pos_m, off_pos_l, ACC_DTYPE),
            _param(sc_neg_h, sc_neg_m, sc_neg_l, ACC_DTYPE), _param(off_neg_h, off_neg_m, off_neg_l, ACC_DTYPE),
            _param(eps_h, eps_m, eps_l, ACC_DTYPE), _param(log_floor_h, log_floor_m, log_floor_l, ACC_DTYPE))


@triton.jit
def _circle_params(relu_pos_h, relu_pos_m, relu_pos_l, shift_pos_h, shift_pos_m, shift_pos_l,
                   relu_neg_h, relu_neg_m, relu_neg_l, shift_neg_h, shift_neg_m, shift_neg_l, ACC_DTYPE: tl.constexpr):
    """Transform 2's EngineParams (relu_pos, shift_pos, relu_neg, shift_neg) in ACC_DTYPE."""
    return (_param(relu_pos_h, relu_pos_m, relu_pos_l, ACC_DTYPE), _param(shift_pos_h, shift_pos_m, shift_pos_l, ACC_DTYPE),
            _param(relu_neg_h, relu_neg_m, relu_neg_l, ACC_DTYPE), _param(shift_neg_h, shift_neg_m, shift_neg_l, ACC_DTYPE))


@triton.jit
def _circle_weights(s, cp):
    """Transform 2's relu weights of s, (relu(relu_pos - s), relu(s - relu_neg)) (NaN kept): each
    set's dv/ds. cp: _circle_params."""
    wp = cp[0] - s
    wn = s - cp[2]
    return tl.where(wp < 0.0, 0.0, wp), tl.where(wn < 0.0, 0.0, wn)


@triton.jit
def _circle_value(s, same, wp, wn, cp):
    """Transform 2's value of each pair in its set: wp (s - shift_pos) where the labels are the same
    (the positives), wn (s - shift_neg) elsewhere (the negatives). One tile serves every formula
    that reads a positive's value on pos and a negative's on neg."""
    return tl.where(same, wp * (s - cp[1]), wn * (s - cp[3]))



@triton.jit
def _value(s, TRANSFORM: tl.constexpr):
    """v(s): s (transform 0) or sqrt(max(2 - 2s, 0)) (transform 1). NaN stays NaN."""
    v = s
    if TRANSFORM == UNIT_DISTANCE:
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
    if MINING == MULTI_SIMILARITY:
        pos = pos & (v - eps < max_neg)
        neg = neg & (v + eps > min_pos)
    return pos, neg


@triton.jit
def _label_range(lab, ok):
    """(min, max) of the labels where ok; (max int64, min int64) if none, which meets no range."""
    return (tl.min(tl.where(ok, lab, 9223372036854775807)),
            tl.max(tl.where(ok, lab, -9223372036854775807 - 1)))


@triton.jit
def _tile_meets(lab, ok, lo, hi):
    """Whether a tile's labels (where ok) meet the label range [lo, hi] of a block (_label_range):
    only then can the tile hold a positive pair."""
    t_lo, t_hi = _label_range(lab, ok)
    return (t_lo <= hi) & (t_hi >= lo)


@triton.jit
def _load_row_in(RIN, idx, ok, s_rn, s_rc, MINING: tl.constexpr, NEEDS_L: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Rows idx of row_in in ACC_DTYPE: (max_neg, min_pos), the mining thresholds (0 unless
    MINING), and L (0 unless NEEDS_L)."""
    zeros = tl.zeros(idx.shape, dtype=ACC_DTYPE)
    if MINING == MULTI_SIMILARITY:
        max_neg = tl.load(RIN + idx * s_rn, mask=ok, other=0.0).to(ACC_DTYPE)
        min_pos = tl.load(RIN + idx * s_rn + s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        max_neg = zeros
        min_pos = zeros
    if NEEDS_L:
        big_l = tl.load(RIN + idx * s_rn + 2 * s_rc, mask=ok, other=0.0).to(ACC_DTYPE)
    else:
        big_l = zeros
    return max_neg, min_pos, big_l


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
def _floored_sigmoid(z, floor):
    """d/dz of the pos_softplus pass's floored term (pair_engine.h, engine_floored_sigmoid),
    sigmoid(z) / (1 + e^{F + max(z, 0)} (1 + t)), t = e^{-|z|}, in one division; sigmoid(z) for
    F = -inf. NaN -> NaN."""
    t = _exp(-tl.abs(z))
    u = tl.where(floor == float("-inf"), 0.0, _exp(floor + tl.where(z > 0.0, z, 0.0)) * (1.0 + t))
    return tl.where(z >= 0.0, 1.0, t) / ((1.0 + t) * (1.0 + u))


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
def _hinge_args(v, big_l, sc_pos, off_pos, sc_neg, off_neg):
    """The hinge pass's (t_pos, t_neg) = (sc_pos v + off_pos + L_i, sc_neg v + off_neg - L_i)."""
    return (sc_pos * v + off_pos) + big_l, (sc_neg * v + off_neg) - big_l
