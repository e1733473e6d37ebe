// Shared maths of the tiled pair engine (docs/ENGINE.md): value transforms, label and
// mining masks, online log-sum-exp and the other per-row accumulators, and the backward
// weight of one pair. Host-device functions, so the CPU build (and its tests) exercise
// exactly the arithmetic the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define DMLK_HD __host__ __device__ __forceinline__
#else
#define DMLK_HD inline
#endif

namespace dmlkern {

template <typename T>
DMLK_HD T exp_(T x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);  // CUDA's float and double overloads
#else
  return std::exp(x);
#endif
}

template <typename T>
DMLK_HD T log_(T x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

template <typename T>
DMLK_HD T neg_infinity() {
  return -std::numeric_limits<T>::infinity();
}

// Online log-sum-exp: the running max `m` and the sum `s` of exp(v - m).
// A NaN value poisons `s`, so NaN embeddings propagate as in torch.logsumexp.
template <typename T>
struct OnlineLSE {
  T m;
  T s;
  DMLK_HD OnlineLSE() : m(neg_infinity<T>()), s(T(0)) {}

  DMLK_HD void push(T v) {
    if (v == neg_infinity<T>()) return;  // exp(-inf) adds nothing
    if (v > m) {
      s = s * exp_(m - v) + T(1);
      m = v;
    } else {
      s += exp_(v - m);  // NaN v lands here and makes s NaN
    }
  }

  DMLK_HD void merge(T other_m, T other_s) {
    if (other_s == T(0) && other_m == neg_infinity<T>()) return;
    if (m == neg_infinity<T>() && s == T(0)) {
      m = other_m;
      s = other_s;
      return;
    }
    if (other_m > m) {
      s = s * exp_(m - other_m) + other_s;
      m = other_m;
    } else {
      s += other_s * exp_(other_m - m);
    }
  }

  // log(sum); -inf for an empty row.
  DMLK_HD T value() const {
    if (s == T(0)) return neg_infinity<T>();
    return m + log_(s);
  }
};

}  // namespace dmlkern

// ===========================================================================
// The tiled pair engine (docs/ENGINE.md): per-pair maths shared by the CPU and
// CUDA backends of dmlkern::pair_engine_forward / pair_engine_backward.
// Everything below is branch-light (selects rather than early returns where a
// loop must vectorise) and takes its exp as a functor, so the CPU build can
// plug in a vectorisable exp while CUDA uses ::exp; the formulas are the same.
// ===========================================================================
// The engine's per-pair functions are always inlined: the CPU epilogues call them inside
// `omp simd` loops, which vectorise only once no call is left in the loop body.
#if defined(__CUDACC__)
#define DMLK_HDI __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define DMLK_HDI inline __attribute__((always_inline))
#else
#define DMLK_HDI inline
#endif

namespace dmlkern {

enum EnginePass : int64_t {
  kPassExtrema = 0,
  kPassLse2 = 1,
  kPassPosSoftplus = 2,
  kPassLiftedPairs = 3,  // symmetric case only (y is x, exclude_diag)
  kPassHinge = 4,        // mining 0 only
};
// kTransformCircle: CircleLoss's per-set values (engine_pos_value / engine_neg_value); lse2 with
// mining 0 only (checked).
enum EngineTransform : int64_t {
  kTransformDot = 0,
  kTransformUnitDistance = 1,
  kTransformCircle = 2,
};
enum EngineMining : int64_t { kMiningNone = 0, kMiningMultiSimilarity = 1 };

template <typename T>
DMLK_HDI T pos_infinity() {
  return std::numeric_limits<T>::infinity();
}

template <typename T>
DMLK_HDI T quiet_nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

template <typename T>
DMLK_HDI T sqrt_(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

template <typename T>
DMLK_HDI T log1p_(T x) {
#if defined(__CUDA_ARCH__)
  return ::log1p(x);
#else
  return std::log1p(x);
#endif
}

// |x| as a select; NaN stays NaN.
template <typename T>
DMLK_HDI T abs_(T x) {
  return x < T(0) ? -x : x;
}

// The exp the formulas below use unless a backend passes its own.
struct StdExp {
  template <typename T>
  DMLK_HDI T operator()(T x) const {
    return exp_(x);
  }
};

// log1p(t), called by the formulas below only for t in [0, 1] (or NaN); a backend may pass
// its own (the CPU a vectorisable polynomial).
struct StdLog1p {
  template <typename T>
  DMLK_HDI T operator()(T x) const {
    return log1p_(x);
  }
};

// params = [sc_pos, off_pos, sc_neg, off_neg, eps] in the statistics dtype, then transform 2's
// four constants (relu_pos, shift_pos, relu_neg, shift_neg; 0 when the op is given 5 floats):
// no other transform reads them. log_floor (the 10th float, -inf when absent) is the pos_softplus
// pass's floor: its term becomes -log(exp(-softplus(z)) + exp(log_floor)), PML's NT-Xent
// -log(p + tiny) (engine_floored_softplus).
template <typename T>
struct EngineParams {
  T sc_pos, off_pos, sc_neg, off_neg, eps;
  T relu_pos, shift_pos, relu_neg, shift_neg;
  T log_floor;
};

struct StdSqrt {
  template <typename T>
  DMLK_HD T operator()(T x) const {
    return sqrt_(x);
  }
};

// v(s): transform 0 is s; transform 1 is sqrt(max(2 - 2s, 0)), the Euclidean
// distance of unit vectors; transform 2 is s (its per-set values come from engine_pos_value /
// engine_neg_value). NaN s gives NaN v (the clamp keeps NaN). The CPU passes a
// branch-free sqrt (libm's sets errno, which keeps GCC from vectorising the loop).
template <int64_t TRANSFORM, typename T, typename SqrtF = StdSqrt>
DMLK_HDI T engine_value(T s, SqrtF sq = SqrtF()) {
  if constexpr (TRANSFORM == kTransformUnitDistance) {
    const T t = T(2) - T(2) * s;
    return sq(t < T(0) ? T(0) : t);
  } else {
    return s;
  }
}

// Transform 2 (circle) gives each set its own value of v = s:
//   v_pos = relu(relu_pos - s) (s - shift_pos),   v_neg = relu(s - relu_neg) (s - shift_neg),
// with the relu weights taken as constants in dv/ds (PML's CircleLoss detaches them):
// dv_pos/ds = relu(relu_pos - s), dv_neg/ds = relu(s - relu_neg). relu keeps NaN. For the other
// transforms both are v itself.
template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_pos_value(T v, const EngineParams<T>& p) {
  if constexpr (TRANSFORM == kTransformCircle) {
    const T w = p.relu_pos - v;
    return (w < T(0) ? T(0) : w) * (v - p.shift_pos);
  } else {
    return v;
  }
}

template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_neg_value(T v, const EngineParams<T>& p) {
  if constexpr (TRANSFORM == kTransformCircle) {
    const T w = v - p.relu_neg;
    return (w < T(0) ? T(0) : w) * (v - p.shift_neg);
  } else {
    return v;
  }
}

// dl/ds from dl/dv: dv/ds is 1 (transform 0) or -1/v, taken as 0 where v = 0 and
// where v is NaN (as the reference's where(v > 0, ...)). Transform 2 takes the pair's set:
// engine_set_dl_ds.
template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_dl_ds(T v, T dl_dv) {
  if constexpr (TRANSFORM == kTransformDot) {
    return dl_dv;
  } else {
    const bool live = v > T(0);
    return live ? -dl_dv / (live ? v : T(1)) : T(0);
  }
}

// engine_dl_ds with the pair's set (pos and neg exclude each other): transform 2 multiplies by
// its set's relu weight (a pair in neither set gives 0); the others ignore the set.
template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_set_dl_ds(T v, T dl_dv, bool kept_pos, bool kept_neg, const EngineParams<T>& p) {
  if constexpr (TRANSFORM == kTransformCircle) {
    const T wp = p.relu_pos - v, wn = v - p.relu_neg;
    return kept_pos ? dl_dv * (wp < T(0) ? T(0) : wp)
                    : (kept_neg ? dl_dv * (wn < T(0) ? T(0) : wn) : T(0));
  } else {
    return engine_dl_ds<TRANSFORM>(v, dl_dv);
  }
}

// Which pairs the masks keep (scalar bools: the CPU loops vectorise them as lane masks, so
// conditions combine with & and |, not short-circuit && and ||, which become branches).
// pos: same label and not an excluded self-pair; neg: labels differ. With the
// Multi-Similarity miner (MINING = 1, transform 0) pos also needs v - eps < max_neg and
// neg v + eps > min_pos (row_in[i, 0:2]); a NaN v fails both comparisons.
template <int64_t MINING, typename T>
DMLK_HDI bool engine_pos_kept(T v, bool same_label, bool excluded_self, T max_neg, T eps) {
  if constexpr (MINING == kMiningMultiSimilarity) {
    return same_label & !excluded_self & (v - eps < max_neg);
  } else {
    return same_label & !excluded_self;
  }
}

template <int64_t MINING, typename T>
DMLK_HDI bool engine_neg_kept(T v, bool same_label, T min_pos, T eps) {
  if constexpr (MINING == kMiningMultiSimilarity) {
    return !same_label & (v + eps > min_pos);
  } else {
    return !same_label;
  }
}

// softplus(z) = max(z, 0) + log1p(exp(-|z|)): exact everywhere (no cut-off at z > 20 as
// F.softplus has: up to 2e-9 off, and PML's NT-Xent has none), no overflow,
// softplus(-inf) = 0, NaN stays NaN.
template <typename T, typename ExpF>
DMLK_HDI T engine_softplus(T z, ExpF ex) {
  return (z > T(0) ? z : T(0)) + log1p_(ex(-abs_(z)));
}

// The pos_softplus term with a floor F on p = exp(-softplus(z)): -log(p + e^F) (PML's NT-Xent
// adds tiny to p), from a = F + softplus(z) without cancellation: -F - log1p(e^-a) past a = 0,
// softplus(z) - log1p(e^a) before; 0 where softplus(z) is (p = 1, e.g. a row without negatives:
// PML's 1 + tiny rounds to 1). F = -inf is the plain softplus, exactly. NaN stays NaN.
template <typename T, typename ExpF>
DMLK_HDI T engine_floored_softplus(T z, T F, ExpF ex) {
  const T sp = engine_softplus(z, ex);
  if (F == neg_infinity<T>() || sp == T(0)) return sp;
  const T a = F + sp;
  return a > T(0) ? -F - log1p_(ex(-a)) : sp - log1p_(ex(a));
}

// d engine_floored_softplus / dz = sigmoid(z) w, w = sigmoid(-(F + softplus(z))): one division,
// [z >= 0 ? 1 : e] / ((1 + e) (1 + e^{F + max(z, 0)} (1 + e))), e = e^{-|z|}. w is 1 for F = -inf
// and 0 where z = +inf (PML's p underflows there); NaN stays NaN.
template <typename T, typename ExpF>
DMLK_HDI T engine_floored_sigmoid(T z, T F, ExpF ex) {
  const T e = ex(-abs_(z));
  const T u = F == neg_infinity<T>() ? T(0) : ex(F + (z > T(0) ? z : T(0))) * (T(1) + e);
  return (z >= T(0) ? T(1) : e) / ((T(1) + e) * (T(1) + u));
}

// ---- forward accumulators, one per row (merge combines partial rows) ------

// Pass 0: max over neg of v (-inf if none), min over pos of v (+inf if none), as PML's
// MultiSimilarityMiner reads them from an ascending sort, where NaN sorts last: the max over
// neg is NaN if any kept v is NaN (it sticks), the min over pos skips NaN.
template <typename T>
struct ExtremaAcc {
  T max_neg;
  T min_pos;
  DMLK_HDI ExtremaAcc() : max_neg(neg_infinity<T>()), min_pos(pos_infinity<T>()) {}

  DMLK_HDI void push(T v, bool pos, bool neg) {
    if (neg && (v > max_neg || v != v)) max_neg = v;
    if (pos && v < min_pos) min_pos = v;  // false for a NaN v: skipped
  }
  DMLK_HDI void merge(T other_max_neg, T other_min_pos) {
    push(other_max_neg, false, true);
    push(other_min_pos, true, false);
  }
  // The row's output columns (docs/ENGINE.md), written the same way by every backend.
  DMLK_HDI void store(T* dst) const {
    dst[0] = max_neg;
    dst[1] = min_pos;
  }
};

// Pass 1: online LSEs of sc_pos * v + off_pos over pos kept and sc_neg * v + off_neg
// over neg kept (v: the set's value, engine_pos_value / engine_neg_value).
template <typename T>
struct Lse2Acc {
  OnlineLSE<T> pos;
  OnlineLSE<T> neg;
  template <int64_t TRANSFORM = kTransformDot>
  DMLK_HDI void push(T v, bool kept_pos, bool kept_neg, const EngineParams<T>& p) {
    if (kept_pos) pos.push(p.sc_pos * engine_pos_value<TRANSFORM>(v, p) + p.off_pos);
    if (kept_neg) neg.push(p.sc_neg * engine_neg_value<TRANSFORM>(v, p) + p.off_neg);
  }
  DMLK_HDI void merge(const Lse2Acc& o) {
    pos.merge(o.pos.m, o.pos.s);
    neg.merge(o.neg.m, o.neg.s);
  }
  DMLK_HDI void store(T* dst) const {
    dst[0] = pos.value();
    dst[1] = neg.value();
  }
};

// Pass 2: over pos kept, sums of softplus(z) and sigmoid(z) with
// z = L_i - sc_pos * v - off_pos, and the count; with a finite log_floor, the floored softplus and
// its derivative in L_i (engine_floored_sigmoid).
template <typename T>
DMLK_HDI T engine_softplus_arg(T v, T L, const EngineParams<T>& p) {
  return L - p.sc_pos * v - p.off_pos;
}

// Three per-row sums merged by addition, stored as the row's three output columns (passes 2
// and 3; the CUDA warp merge and the CPU's vectorised rows use merge()).
template <typename T>
struct RowSums3 {
  T sum[3];
  DMLK_HDI RowSums3() : sum{T(0), T(0), T(0)} {}
  DMLK_HDI void merge(T a, T b, T c) {
    sum[0] += a;
    sum[1] += b;
    sum[2] += c;
  }
  DMLK_HDI void store(T* dst) const {
    dst[0] = sum[0];
    dst[1] = sum[1];
    dst[2] = sum[2];
  }
};

// Columns: sum of softplus(z), sum of sigmoid(z), the count.
template <typename T>
struct PosSoftplusAcc : RowSums3<T> {
  template <typename ExpF>
  DMLK_HDI void push(T v, bool pos, T L, const EngineParams<T>& p, ExpF ex) {
    if (!pos) return;
    const T z = engine_softplus_arg(v, L, p);
    this->merge(engine_floored_softplus(z, p.log_floor, ex), engine_floored_sigmoid(z, p.log_floor, ex),
                T(1));
  }
};

// Pass 3 (lifted pairs, the symmetric case: row_in[j] is column j's statistic). For a pair
// with L_i = row_in[i, 2], L_j = row_in[j, 2]:
//   z = logaddexp(L_i, L_j) + sc_pos * v + off_pos,   relu(z),   f = relu(z)^2 / 2.
// logaddexp and sigmoid(L_i - L_j) (its derivative in L_i) come from one exp:
// t = exp(-|L_i - L_j|), logaddexp = max(L_i, L_j) + log1p(t), sigmoid = 1/(1+t) or t/(1+t).
// L_i = L_j = -inf gives logaddexp = -inf (t = 1 there, not exp(NaN)); a NaN L or v gives NaN.
template <typename T>
struct LiftedNegPart {
  T lae;  // logaddexp(L_i, L_j)
  T sig;  // sigmoid(L_i - L_j); 1/2 where L_i = L_j (also both -inf: then only multiplied by 0)
};

template <typename T, typename ExpF, typename Log1pF>
DMLK_HDI LiftedNegPart<T> engine_lifted_neg_part(T L_i, T L_j, ExpF ex, Log1pF l1p) {
  const T d = L_i == L_j ? T(0) : L_i - L_j;  // equal infinities: 0, not NaN
  const T t = ex(-abs_(d));
  const T mx = L_i > L_j ? L_i : L_j;
  const T r = T(1) / (T(1) + t);
  return {mx + l1p(t), d >= T(0) ? r : t * r};
}

// relu(z) of one pair as a select that keeps NaN (relu(-inf) = 0).
template <typename T>
DMLK_HDI T engine_lifted_relu(T v, T lae, const EngineParams<T>& p) {
  const T z = lae + (p.sc_pos * v + p.off_pos);
  return z < T(0) ? T(0) : z;
}

// One pair's contribution to the three output columns (zeros unless `pos`):
// f = relu(z)^2 / 2; w = relu(z) * sigmoid(L_i - L_j) = df/dL_i (exactly 0 where relu(z) = 0);
// nonzero = [f > 0] (what AvgNonZeroReducer counts; NaN f is not counted).
template <typename T>
struct LiftedTerms {
  T f, w, nonzero;
};

template <typename T, typename ExpF, typename Log1pF>
DMLK_HDI LiftedTerms<T> engine_lifted_terms(T v, bool pos, T L_i, T L_j, const EngineParams<T>& p,
                                            ExpF ex, Log1pF l1p) {
  const LiftedNegPart<T> np = engine_lifted_neg_part(L_i, L_j, ex, l1p);
  const T r = engine_lifted_relu(v, np.lae, p);
  const T f = T(0.5) * (r * r);
  return {pos ? f : T(0), (pos & (r != T(0))) ? r * np.sig : T(0),
          (pos & (f > T(0))) ? T(1) : T(0)};
}

// Columns: sum of f, sum of df/dL_i, the number of f > 0.
template <typename T>
struct LiftedPairsAcc : RowSums3<T> {
  template <typename ExpF, typename Log1pF>
  DMLK_HDI void push(T v, bool pos, T L_i, T L_j, const EngineParams<T>& p, ExpF ex, Log1pF l1p) {
    if (!pos) return;
    const LiftedTerms<T> t = engine_lifted_terms(v, true, L_i, L_j, p, ex, l1p);
    this->merge(t.f, t.w, t.nonzero);
  }
};

// Pass 4 (hinge): with t_pos = sc_pos v + off_pos + L_i and t_neg = sc_neg v + off_neg - L_i,
// a pair's relu(t) (NaN stays NaN) and whether t > 0 (false for NaN: what AvgNonZeroReducer
// counts), zeros outside its set.
template <typename T>
struct HingeTerms {
  T pos, pos_nonzero, neg, neg_nonzero;
};

template <typename T>
DMLK_HDI T engine_hinge_pos_arg(T v, T L, const EngineParams<T>& p) {
  return (p.sc_pos * v + p.off_pos) + L;
}

template <typename T>
DMLK_HDI T engine_hinge_neg_arg(T v, T L, const EngineParams<T>& p) {
  return (p.sc_neg * v + p.off_neg) - L;
}

template <typename T>
DMLK_HDI HingeTerms<T> engine_hinge_terms(T v, bool kept_pos, bool kept_neg, T L,
                                          const EngineParams<T>& p) {
  const T tp = engine_hinge_pos_arg(v, L, p), tn = engine_hinge_neg_arg(v, L, p);
  return {kept_pos ? (tp < T(0) ? T(0) : tp) : T(0), (kept_pos & (tp > T(0))) ? T(1) : T(0),
          kept_neg ? (tn < T(0) ? T(0) : tn) : T(0), (kept_neg & (tn > T(0))) ? T(1) : T(0)};
}

// Four per-row sums merged by addition (pass 4's output columns).
template <typename T>
struct RowSums4 {
  T sum[4];
  DMLK_HDI RowSums4() : sum{T(0), T(0), T(0), T(0)} {}
  DMLK_HDI void merge(T a, T b, T c, T d) {
    sum[0] += a;
    sum[1] += b;
    sum[2] += c;
    sum[3] += d;
  }
  DMLK_HDI void store(T* dst) const {
    dst[0] = sum[0];
    dst[1] = sum[1];
    dst[2] = sum[2];
    dst[3] = sum[3];
  }
};

// Columns: sum of relu(t_pos) over pos kept, the number of t_pos > 0, the same for neg.
template <typename T>
struct HingeAcc : RowSums4<T> {
  DMLK_HDI void push(T v, bool kept_pos, bool kept_neg, T L, const EngineParams<T>& p) {
    const HingeTerms<T> t = engine_hinge_terms(v, kept_pos, kept_neg, L, p);
    this->merge(t.pos, t.pos_nonzero, t.neg, t.neg_nonzero);
  }
};

// Output columns of a pass.
DMLK_HDI int engine_out_columns(int64_t pass_kind) {
  return pass_kind == kPassHinge ? 4
         : pass_kind == kPassPosSoftplus || pass_kind == kPassLiftedPairs ? 3
                                                                         : 2;
}

// The per-row accumulator of a pass.
template <int64_t PASS, typename T>
using PassAcc = std::conditional_t<
    PASS == kPassExtrema, ExtremaAcc<T>,
    std::conditional_t<
        PASS == kPassLse2, Lse2Acc<T>,
        std::conditional_t<PASS == kPassPosSoftplus, PosSoftplusAcc<T>,
                           std::conditional_t<PASS == kPassLiftedPairs, LiftedPairsAcc<T>,
                                              HingeAcc<T>>>>>;

// ---- backward --------------------------------------------------------------

// The lifted pairs term of dl/dv (pass 3's backward): [pos] C_lift sc_pos relu(z_ij), the
// derivative of C_lift * f_ij in v; exactly 0 where C_lift = 0. NaN z gives NaN.
template <typename T, typename ExpF, typename Log1pF>
DMLK_HDI T engine_lifted_pair_grad(T v, bool kept_pos, T c_lift, T L_i, T L_j,
                                   const EngineParams<T>& p, ExpF ex, Log1pF l1p) {
  const bool live = kept_pos & (c_lift != T(0));
  const T r = engine_lifted_relu(v, engine_lifted_neg_part(L_i, L_j, ex, l1p).lae, p);
  return live ? c_lift * p.sc_pos * r : T(0);
}

// dl/dv of one pair of row i (docs/ENGINE.md), with row i's row_coef
// (A_pos, LSE_pos, A_neg, LSE_neg, B_pos[, C_lift]) and L = row_in[i, 2]:
//   dl/dv = [pos] (A_pos sc_pos exp(sc_pos v + off_pos - LSE_pos) - B_pos sc_pos sigmoid(z) w(z)
//                  + C_lift sc_pos relu(logaddexp(L, L_j) + sc_pos v + off_pos))
//         + [neg]  A_neg sc_neg exp(sc_neg v + off_neg - LSE_neg)
// (z = L - sc_pos v - off_pos, sigmoid(z) w = engine_floored_sigmoid: w = 1 without a log_floor)
// (v: the set's value, engine_pos_value / engine_neg_value). A term whose coefficient is 0 (or
// whose LSE is -inf) is exactly 0, never NaN: its exp argument is replaced by -inf. pos and neg
// exclude each other, so the two LSE terms share one exp. HAS_B = false promises B_pos = 0
// (skips the sigmoid's exp); HAS_LIFT = false promises C_lift = 0 (skips the lifted term;
// L_j = row_in[j, 2] is only read with it, which needs the symmetric case).
template <int64_t TRANSFORM, bool HAS_B, bool HAS_LIFT = false, typename T, typename ExpF,
          typename Log1pF = StdLog1p>
DMLK_HDI T engine_pair_dl_dv(T v, bool kept_pos, bool kept_neg, T a_pos, T lse_pos, T a_neg,
                             T lse_neg, T b_pos, T L, const EngineParams<T>& p, ExpF ex,
                             T c_lift = T(0), T L_j = T(0), Log1pF l1p = Log1pF()) {
  const T vp = engine_pos_value<TRANSFORM>(v, p), vn = engine_neg_value<TRANSFORM>(v, p);
  const bool live_pos = kept_pos & (a_pos != T(0)) & (lse_pos != neg_infinity<T>());
  const bool live_neg = kept_neg & (a_neg != T(0)) & (lse_neg != neg_infinity<T>());
  const T arg_pos = p.sc_pos * vp + p.off_pos - lse_pos;
  const T arg_neg = p.sc_neg * vn + p.off_neg - lse_neg;
  const T arg = live_pos ? arg_pos : (live_neg ? arg_neg : neg_infinity<T>());
  const T coef = live_pos ? a_pos * p.sc_pos : a_neg * p.sc_neg;
  const T e = ex(arg);
  T dl_dv = (live_pos | live_neg) ? coef * e : T(0);
  if constexpr (HAS_B) {
    const bool live_b = kept_pos & (b_pos != T(0));
    const T z = live_b ? engine_softplus_arg(vp, L, p) : T(0);
    const T sig = engine_floored_sigmoid(z, p.log_floor, ex);
    dl_dv = dl_dv - (live_b ? b_pos * p.sc_pos * sig : T(0));
  }
  if constexpr (HAS_LIFT) {
    dl_dv = dl_dv + engine_lifted_pair_grad(vp, kept_pos, c_lift, L, L_j, p, ex, l1p);
  }
  return dl_dv;
}

// dl/ds of one pair of row i: engine_pair_dl_dv times dv/ds.
template <int64_t TRANSFORM, bool HAS_B, bool HAS_LIFT = false, typename T, typename ExpF,
          typename Log1pF = StdLog1p>
DMLK_HDI T engine_pair_grad(T v, bool kept_pos, bool kept_neg, T a_pos, T lse_pos, T a_neg,
                            T lse_neg, T b_pos, T L, const EngineParams<T>& p, ExpF ex,
                            T c_lift = T(0), T L_j = T(0), Log1pF l1p = Log1pF()) {
  const T dl_dv = engine_pair_dl_dv<TRANSFORM, HAS_B, HAS_LIFT>(
      v, kept_pos, kept_neg, a_pos, lse_pos, a_neg, lse_neg, b_pos, L, p, ex, c_lift, L_j, l1p);
  return engine_set_dl_ds<TRANSFORM>(v, dl_dv, kept_pos, kept_neg, p);
}

// The hinge backward (row_coef (N, 2) = (H_pos, H_neg), pass 4's): dl/ds of one pair of row i,
//   dl/dv = [pos] H_pos sc_pos [t_pos > 0] + [neg] H_neg sc_neg [t_neg > 0]
// with L = row_in[i, 2]; relu's derivative is [t > 0] (0 at t = 0 and at a NaN t, as torch's
// relu). A zero coefficient contributes exactly 0.
template <typename T>
DMLK_HDI T engine_hinge_dl_dv(T v, bool kept_pos, bool kept_neg, T h_pos, T h_neg, T L,
                              const EngineParams<T>& p) {
  const bool live_pos = kept_pos & (h_pos != T(0)) & (engine_hinge_pos_arg(v, L, p) > T(0));
  const bool live_neg = kept_neg & (h_neg != T(0)) & (engine_hinge_neg_arg(v, L, p) > T(0));
  return (live_pos ? h_pos * p.sc_pos : T(0)) + (live_neg ? h_neg * p.sc_neg : T(0));
}

template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_hinge_pair_grad(T v, bool kept_pos, bool kept_neg, T h_pos, T h_neg, T L,
                                  const EngineParams<T>& p) {
  return engine_dl_ds<TRANSFORM>(v, engine_hinge_dl_dv(v, kept_pos, kept_neg, h_pos,
                                                                  h_neg, L, p));
}

// The symmetric case of the hinge backward (mining 0: the masks are symmetric): row i's weight of
// the pair (i, j) plus row j's of the pair (j, i), one dv/ds.
template <int64_t TRANSFORM, typename T>
DMLK_HDI T engine_hinge_pair_grad_sym(T v, bool same_label, bool excluded_self, T h_pos_i,
                                      T h_neg_i, T L_i, T h_pos_j, T h_neg_j, T L_j,
                                      const EngineParams<T>& p) {
  const bool kp = same_label & !excluded_self, kn = !same_label;
  return engine_dl_ds<TRANSFORM>(
      v, engine_hinge_dl_dv(v, kp, kn, h_pos_i, h_neg_i, L_i, p) +
             engine_hinge_dl_dv(v, kp, kn, h_pos_j, h_neg_j, L_j, p));
}

// One row's backward inputs (row_in and row_coef of row k), for the symmetric pair weight.
template <typename T>
struct EngineRowCoef {
  T max_neg, min_pos, L, a_pos, lse_pos, a_neg, lse_neg, b_pos, c_lift;
};

// The symmetric case (y is x with the same labels; backward `symmetric = true`): s_ij = s_ji,
// so the weight of x[j] in grad_x[i] + grad_y[i] is dl/ds of the pair (i, j) with row i's
// coefficients plus dl/ds of the pair (j, i) with row j's: the same v, label test and
// self-pair, each half with its own row's masks (mining) and terms. Both halves share one
// dv/ds and, with HAS_LIFT, one logaddexp (symmetric in L_i, L_j). Exactly what the two
// engine_pair_grad calls of the two sides give, summed; the HAS_B / HAS_LIFT promises cover
// both rows (a zero coefficient still contributes exactly 0). Transform 2 comes with mining 0
// (checked): both halves are in the same set, so one dv/ds serves them.
template <int64_t TRANSFORM, int64_t MINING, bool HAS_B, bool HAS_LIFT, typename T, typename ExpF,
          typename Log1pF = StdLog1p>
DMLK_HDI T engine_pair_grad_sym(T v, bool same_label, bool excluded_self, const EngineRowCoef<T>& ri,
                                const EngineRowCoef<T>& rj, const EngineParams<T>& p, ExpF ex,
                                Log1pF l1p = Log1pF()) {
  const bool kp_i = engine_pos_kept<MINING>(v, same_label, excluded_self, ri.max_neg, p.eps);
  const bool kn_i = engine_neg_kept<MINING>(v, same_label, ri.min_pos, p.eps);
  const bool kp_j = engine_pos_kept<MINING>(v, same_label, excluded_self, rj.max_neg, p.eps);
  const bool kn_j = engine_neg_kept<MINING>(v, same_label, rj.min_pos, p.eps);
  T dl_dv = engine_pair_dl_dv<TRANSFORM, HAS_B>(v, kp_i, kn_i, ri.a_pos, ri.lse_pos, ri.a_neg,
                                                ri.lse_neg, ri.b_pos, ri.L, p, ex) +
            engine_pair_dl_dv<TRANSFORM, HAS_B>(v, kp_j, kn_j, rj.a_pos, rj.lse_pos, rj.a_neg,
                                                rj.lse_neg, rj.b_pos, rj.L, p, ex);
  if constexpr (HAS_LIFT) {
    const T r = engine_lifted_relu(engine_pos_value<TRANSFORM>(v, p),
                                   engine_lifted_neg_part(ri.L, rj.L, ex, l1p).lae, p);
    const bool live_i = kp_i & (ri.c_lift != T(0)), live_j = kp_j & (rj.c_lift != T(0));
    dl_dv = dl_dv + ((live_i ? ri.c_lift * p.sc_pos * r : T(0)) +
                     (live_j ? rj.c_lift * p.sc_pos * r : T(0)));
  }
  return engine_set_dl_ds<TRANSFORM>(v, dl_dv, kp_i, kn_i, p);
}

}  // namespace dmlkern
