// CPU tiled pair engine (docs/ENGINE.md): dmlkern::pair_engine_forward / _backward.
//
// Row blocks run in parallel (at::parallel_for); each walks column tiles whose
// similarities come from BLAS (at::mm_out into a per-task tile buffer), then a per-tile
// epilogue folds the tile into per-row statistics (forward) or turns it in place into
// dl/ds and multiplies it back (backward: grad_own[block] += W @ other[tile]). grad_x and
// grad_y are separate passes over own-row blocks, so every output row has exactly one
// writer: no atomics; with single-threaded tile products (SerialBlasGuard) the bits do not
// depend on the thread count either. Nothing of size N x M is ever allocated. The symmetric
// backward (y is x: grad_x + grad_y) is one pass over x's row blocks whose epilogue writes both
// halves' weights of each tile (grad_sym): 2 products per tile instead of 4.
//
// The per-pair maths is pair_engine.h (shared with CUDA). The epilogue loops are plain
// `omp simd` loops over one tile row; with GCC on x86-64 they are compiled for AVX-512,
// AVX2 and baseline (target_clones, chosen at load time) and use a vectorisable fp32 exp
// (exp_poly below, ~1 ulp), because on CPU the epilogue costs about as much as the tile
// product. fp64 uses std::exp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// The epilogue loops vectorise only as straight-line code: floating-point compares must
// be if-converted into vector selects (the code never reads FP exception flags). Placed
// before every include so the inline functions the loops call get the same options.
// (libm's sqrt would still branch to set errno whatever the pragma says: see sqrt_select.)
#pragma GCC optimize("no-trapping-math")
#define DMLK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DMLK_CPU_CLONES
#endif
#if defined(__GNUC__)
#define DMLK_CPU_INLINE inline __attribute__((always_inline))
#else
#define DMLK_CPU_INLINE inline
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cstdint>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../pair_engine.h"

namespace dmlkern {

namespace {

// The same rows: the same tensor (or view of the same memory), else equal values (NaN equal
// to NaN).
bool same_rows(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_same(b)) return true;
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() || a.device() != b.device())
    return false;
  if (a.data_ptr() == b.data_ptr() && a.strides() == b.strides()) return true;
  if (!at::isFloatingType(a.scalar_type())) return at::equal(a, b);
  return (a.eq(b) | (a.isnan() & b.isnan())).all().item<bool>();
}

}  // namespace

// Argument checks of both ops, shared with the CUDA backend (declared there). pass_kind < 0
// skips its check (the backward has none); row_coef may be null (the forward has none);
// symmetric is the backward's flag (false for the forward).
void check_pair_engine_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                            const at::Tensor& y_labels, const at::Tensor& row_in,
                            const at::Tensor* row_coef, int64_t pass_kind, int64_t transform,
                            int64_t mining, at::ArrayRef<double> params, bool exclude_diag,
                            bool symmetric) {
  check_pair_inputs(x, y, x_labels, y_labels);
  // Only shapes: the kernels then read x and x_labels alone (comparing values would sync a GPU).
  TORCH_CHECK(!symmetric || (x.sizes() == y.sizes() && x_labels.sizes() == y_labels.sizes()),
              "dmlkern: symmetric=True needs y of x's shape and y_labels of x_labels' (y is x), got x ",
              x.sizes(), " and y ", y.sizes());
  const int64_t n = x.size(0);
  TORCH_CHECK(row_in.dim() == 2 && row_in.size(0) == n && row_in.size(1) == 3,
              "dmlkern: row_in must be (N, 3) = (", n, ", 3), got ", row_in.sizes());
  TORCH_CHECK(at::isFloatingType(row_in.scalar_type()),
              "dmlkern: row_in must be floating point (the stats dtype), got ",
              row_in.scalar_type());
  TORCH_CHECK(row_in.device() == x.device(), "dmlkern: row_in must be on the device of x");
  if (row_coef != nullptr) {
    TORCH_CHECK(row_coef->dim() == 2 && row_coef->size(0) == n &&
                    (row_coef->size(1) == 5 || row_coef->size(1) == 6),
                "dmlkern: row_coef must be (N, 5) or (N, 6) with N = ", n, ", got ",
                row_coef->sizes());
    TORCH_CHECK(at::isFloatingType(row_coef->scalar_type()),
                "dmlkern: row_coef must be floating point (the stats dtype), got ",
                row_coef->scalar_type());
    TORCH_CHECK(row_coef->device() == x.device(), "dmlkern: row_coef must be on the device of x");
  }
  if (pass_kind >= 0 || row_coef == nullptr) {
    TORCH_CHECK(pass_kind >= kPassExtrema && pass_kind <= kPassLiftedPairs,
                "dmlkern: pass_kind must be 0 (extrema), 1 (lse2), 2 (pos_softplus) or 3 "
                "(lifted_pairs), got ",
                pass_kind);
  }
  TORCH_CHECK(transform == kTransformDot || transform == kTransformUnitDistance,
              "dmlkern: transform must be 0 (dot product) or 1 (unit-vector distance), got ",
              transform);
  TORCH_CHECK(mining == kMiningNone || mining == kMiningMultiSimilarity,
              "dmlkern: mining must be 0 (none) or 1 (Multi-Similarity miner), got ", mining);
  TORCH_CHECK(mining == kMiningNone || transform == kTransformDot,
              "dmlkern: mining=1 (Multi-Similarity miner) needs transform 0, got transform ",
              transform);
  TORCH_CHECK(params.size() == 5,
              "dmlkern: params must hold 5 floats [sc_pos, off_pos, sc_neg, off_neg, eps], got ",
              params.size());
  TORCH_CHECK(x.size(0) + y.size(0) <= std::numeric_limits<int32_t>::max(),
              "dmlkern: N + M must fit in int32");
  // Pass 3 and the C_lift column read row_in[j] for column j: only the symmetric case has it.
  const bool lifted_fwd = pass_kind == kPassLiftedPairs && row_coef == nullptr;
  const bool lifted_bwd = row_coef != nullptr && row_coef->size(1) == 6;
  if (lifted_fwd || lifted_bwd) {
    const char* what = lifted_fwd ? "pass_kind=3 (lifted_pairs)" : "row_coef with 6 columns (C_lift)";
    TORCH_CHECK(exclude_diag, "dmlkern: ", what,
                " needs the symmetric case: exclude_diag must be true");
    TORCH_CHECK(same_rows(x, y), "dmlkern: ", what,
                " needs the symmetric case: y must be x (the same rows)");
    TORCH_CHECK(same_rows(x_labels, y_labels), "dmlkern: ", what,
                " needs the symmetric case: y_labels must be x_labels");
    TORCH_CHECK(mining == kMiningNone, "dmlkern: ", what, " needs mining=0, got mining=", mining);
  }
}

namespace {

constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile products run with BLAS pinned to one thread on the calling thread, for the
// lifetime of this guard (one per parallel_for body). Why: MKL threads each product itself
// (MKL_VERBOSE shows Dyn:0 and NThr = the torch thread count even for the products inside
// at::parallel_for's workers, and for the inline body when there is one row block, e.g.
// N-pairs' anchors), and MKL splits a product by its thread count
// (reproducible only at a fixed count): on MKL's AVX2 code path (AMD EPYC) values and gradients
// differed by an ulp between 1, 2 and 4 threads. Pinned, every product is single-threaded
// whatever the thread count, so results are bit-identical across thread counts (each output
// row still has one writer); the engine parallelises over row blocks itself, and a 128 x 512
// tile product is too small for MKL's threads to pay (they cost more than they saved). Looked
// up at run time (torch exports it when built with MKL) as MKL_Set_Num_Threads_Local, the C
// entry point mkl_service.h's mkl_set_num_threads_local macro names (the lowercase symbol is
// the Fortran one, taking int*): a no-op without MKL (other BLAS: see the README's determinism
// contract), and no environment variable needed.
class SerialBlasGuard {
 public:
  SerialBlasGuard() : previous_(set_local() != nullptr ? set_local()(1) : -1) {}
  ~SerialBlasGuard() {
    if (previous_ >= 0) set_local()(previous_);  // 0 restores MKL's global setting
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal set_local() {
#if defined(__unix__) || defined(__APPLE__)
    static const SetLocal f =
        reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return f;
#else
    return nullptr;
#endif
  }
  int previous_;
};

template <int64_t V>
using IC = std::integral_constant<int64_t, V>;

// exp(x) for fp32 as straight-line selects (Cephes expf: x = n ln2 + r, degree-6
// polynomial, scaled by 2^n in two halves so gradual underflow and overflow come out
// right): ~1 ulp, exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN. Vectorises.
DMLK_CPU_INLINE float exp_poly(float x) {
  const bool nan = x != x;
  float xc = x > 88.8f ? 88.8f : x;  // exp(88.8) overflows to inf below
  xc = xc < -104.0f ? -104.0f : xc;  // exp(-104) underflows to 0 below
  xc = nan ? 0.0f : xc;
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  float r = xc - fn * 0.693359375f;
  r = r + fn * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  // x <= -104 (also -inf, what masked-out pairs pass): exp is 0. Scale by 2^0 and clear the
  // bits instead of computing an underflowing product (a slow microcode assist on x86).
  const int32_t under = -static_cast<int32_t>(xc <= -104.0f);
  const int32_t n = static_cast<int32_t>(fn) & ~under;
  const int32_t n1 = n >> 1, n2 = n - n1;  // both in [-75, 64]: normal scale factors
  const float s1 = std::bit_cast<float>((n1 + 127) << 23);
  const float s2 = std::bit_cast<float>((n2 + 127) << 23);
  const float res = std::bit_cast<float>(std::bit_cast<int32_t>(p * s1 * s2) & ~under);
  return nan ? x : res;
}

// log1p(t) for fp32 t in [0, 1] (or NaN) as straight-line selects: Cephes logf's polynomial
// on t itself below sqrt(2) - 1 (no rounding of 1 + t), else on (1 + t) / 2 - 1 plus log 2;
// <= 1.4 ulp (every float in [0, 1] checked), log1p(0) = 0, NaN -> NaN. The lifted pairs'
// logaddexp needs no other range.
DMLK_CPU_INLINE float log1p_poly(float t) {
  const bool hi = t >= 0.41421356237f;
  const float x = hi ? 0.5f * t - 0.5f : t;  // (1 + t) / 2 - 1 (exact for t >= 0.5)
  const float e = hi ? 1.0f : 0.0f;
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (x + y) + e * 0.693359375f;
}

// sqrt(t) for fp32 t >= 0 (or +inf, NaN) as straight-line selects: inverse-sqrt bit trick,
// two Newton steps, one Heron step; <= 1 ulp from sqrtf (checked over 2.4M values).
DMLK_CPU_INLINE float sqrt_select(float t) {
  const bool tiny = t < 0x1p-100f;  // zero and denormals: rescale into the normal range
  const float ts = tiny ? t * 0x1p100f : t;
  float y = std::bit_cast<float>(0x5f375a86 - (std::bit_cast<int32_t>(ts) >> 1));
  y = y * (1.5f - 0.5f * ((ts * y) * y));
  y = y * (1.5f - 0.5f * ((ts * y) * y));
  float r = ts * y;
  r = 0.5f * (r + ts / r);
  r = tiny ? r * 0x1p-50f : r;
  // t itself for 0, +inf and NaN. A bitwise blend, not ?: (GCC would fold a later v > 0
  // through a select into a boolean select it cannot vectorise).
  const int32_t keep_t = -static_cast<int32_t>((t == 0.0f) | (t == pos_infinity<float>()) | (t != t));
  return std::bit_cast<float>((keep_t & std::bit_cast<int32_t>(t)) |
                              (~keep_t & std::bit_cast<int32_t>(r)));
}

struct CpuSqrt {
  DMLK_CPU_INLINE float operator()(float x) const { return sqrt_select(x); }
  DMLK_CPU_INLINE double operator()(double x) const { return std::sqrt(x); }
};

struct CpuExp {
  DMLK_CPU_INLINE float operator()(float x) const { return exp_poly(x); }
  DMLK_CPU_INLINE double operator()(double x) const { return std::exp(x); }
};

struct CpuLog1p {  // only called on [0, 1]
  DMLK_CPU_INLINE float operator()(float x) const { return log1p_poly(x); }
  DMLK_CPU_INLINE double operator()(double x) const { return std::log1p(x); }
};

// Per-row inputs as contiguous columns (structure of arrays) in the stats dtype.
template <typename T>
struct RowColumns {
  at::Tensor in_t, coef_t;  // (3, N), (5 or 6, N) owners
  const T* max_neg = nullptr;
  const T* min_pos = nullptr;
  const T* L = nullptr;
  const T* a_pos = nullptr;
  const T* lse_pos = nullptr;
  const T* a_neg = nullptr;
  const T* lse_neg = nullptr;
  const T* b_pos = nullptr;
  const T* c_lift = nullptr;  // row_coef's column 5, when given

  RowColumns(const at::Tensor& row_in, const at::Tensor* row_coef, at::ScalarType st) {
    in_t = row_in.to(st).t().contiguous();
    const T* in = in_t.data_ptr<T>();
    const int64_t n = row_in.size(0);
    max_neg = in;
    min_pos = in + n;
    L = in + 2 * n;
    if (row_coef != nullptr) {
      coef_t = row_coef->to(st).t().contiguous();
      const T* c = coef_t.data_ptr<T>();
      a_pos = c;
      lse_pos = c + n;
      a_neg = c + 2 * n;
      lse_neg = c + 3 * n;
      b_pos = c + 4 * n;
      if (row_coef->size(1) == 6) c_lift = c + 5 * n;
    }
  }

  // Whether any of the rows c0 .. c0 + nc - 1 has a non-zero B_pos / C_lift coefficient: the
  // tiles where those rows are the columns must compute that term.
  std::pair<bool, bool> column_terms(int64_t c0, int64_t nc) const {
    bool any_b = false, any_lift = false;
    for (int64_t c = c0; c < c0 + nc; ++c) {
      any_b = any_b || b_pos[c] != T(0);
      any_lift = any_lift || (c_lift != nullptr && c_lift[c] != T(0));
    }
    return {any_b, any_lift};
  }
};

template <typename T>
EngineParams<T> make_params(at::ArrayRef<double> params) {
  return EngineParams<T>{static_cast<T>(params[0]), static_cast<T>(params[1]),
                         static_cast<T>(params[2]), static_cast<T>(params[3]),
                         static_cast<T>(params[4])};
}

// Dense int32 codes of the labels (equal labels <-> equal codes), so the epilogue
// compares 32-bit lanes next to fp32 lanes.
std::pair<at::Tensor, at::Tensor> label_codes(const at::Tensor& x_labels, const at::Tensor& y_labels) {
  const int64_t n = x_labels.size(0);
  const auto all = at::cat({x_labels, y_labels});
  const auto inverse = std::get<1>(at::_unique2(all, /*sorted=*/false, /*return_inverse=*/true,
                                                /*return_counts=*/false));
  const auto codes = inverse.reshape({-1}).to(at::kInt).contiguous();
  return {codes.narrow(0, 0, n), codes.narrow(0, n, all.size(0) - n)};
}

// The column of the excluded self-pair i == j in a tile starting at column c0, or -1.
int diag_column(bool exclude_diag, int64_t i, int64_t c0, int64_t nc) {
  return exclude_diag && i >= c0 && i < c0 + nc ? static_cast<int>(i - c0) : -1;
}

// ---------------------------------------------------------------------------
// Forward epilogues: one tile row (row i, columns c0 + c) into the row's accumulator.

template <typename T, int64_t TR>
DMLK_CPU_INLINE void extrema_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                                 ExtremaAcc<T>& acc) {
  T mx = neg_infinity<T>(), mn = pos_infinity<T>();
  int nan_neg = 0;  // the max over neg propagates NaN; the min over pos skips it (ExtremaAcc)
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(| : nan_neg)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<kMiningNone>(v, same, c == diag, T(0), T(0));
    const bool kn = engine_neg_kept<kMiningNone>(v, same, T(0), T(0));
    mx = (kn && v > mx) ? v : mx;
    mn = (kp && v < mn) ? v : mn;
    nan_neg |= static_cast<int>(kn && v != v);
  }
  acc.merge(nan_neg ? quiet_nan<T>() : mx, mn);
}

// Two sweeps: the tile row's maxima, then the sums of exp(u - max) (one exp per pair:
// pos and neg exclude each other), merged into the row's online LSEs.
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void lse2_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                              T max_neg, T min_pos, const EngineParams<T>& p, Lse2Acc<T>& acc) {
  T mp = neg_infinity<T>(), mn = neg_infinity<T>();
#pragma omp simd reduction(max : mp, mn)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg, p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos, p.eps);
    const T up = p.sc_pos * v + p.off_pos, un = p.sc_neg * v + p.off_neg;
    mp = (kp && up > mp) ? up : mp;  // NaN never wins here; it poisons the sums below
    mn = (kn && un > mn) ? un : mn;
  }
  // No finite kept value: any finite shift (the sum is then 0, or NaN from NaN values).
  const T shp = mp == neg_infinity<T>() ? T(0) : mp;
  const T shn = mn == neg_infinity<T>() ? T(0) : mn;
  const CpuExp ex;
  T sp = T(0), sn = T(0);
#pragma omp simd reduction(+ : sp, sn)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg, p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos, p.eps);
    const T up = p.sc_pos * v + p.off_pos, un = p.sc_neg * v + p.off_neg;
    const T e = ex(kp ? up - shp : (kn ? un - shn : neg_infinity<T>()));
    sp += kp ? e : T(0);
    sn += kn ? e : T(0);
  }
  acc.pos.merge(mp, sp);
  acc.neg.merge(mn, sn);
}

template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void pos_softplus_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                                      T max_neg, T min_pos, T L, const EngineParams<T>& p,
                                      PosSoftplusAcc<T>& acc) {
  for (int c = 0; c < nc; ++c) {  // positives are few: scalar, exact libm exp / log1p
    if (lab[c] != li) continue;
    const T v = engine_value<TR>(s[c], CpuSqrt());
    acc.push(v, engine_pos_kept<MI>(v, true, c == diag, max_neg, p.eps), L, p, StdExp{});
  }
}

// Pass 3 on one tile row (columns j = c0 + c, L_col = row_in[c0.., 2]): every lane computes
// the pair's terms, the label mask selects them (one exp and one log1p per pair).
template <typename T>
DMLK_CPU_INLINE void lifted_pairs_row(const T* v, int nc, const int32_t* lab, int32_t li, int diag,
                                      T L_i, const T* L_col, const EngineParams<T>& p,
                                      LiftedPairsAcc<T>& acc) {
  const CpuExp ex;
  const CpuLog1p l1p;
  T sf = T(0), sw = T(0), cnt = T(0);
#pragma omp simd reduction(+ : sf, sw, cnt)
  for (int c = 0; c < nc; ++c) {
    const bool pos = engine_pos_kept<kMiningNone>(v[c], lab[c] == li, c == diag, T(0), T(0));
    const LiftedTerms<T> t = engine_lifted_terms(v[c], pos, L_i, L_col[c], p, ex, l1p);
    sf += t.f;
    sw += t.w;
    cnt += t.nonzero;
  }
  acc.merge(sf, sw, cnt);
}

template <int64_t PASS, typename T>
using AccOf = std::conditional_t<
    PASS == kPassExtrema, ExtremaAcc<T>,
    std::conditional_t<PASS == kPassLse2, Lse2Acc<T>,
                       std::conditional_t<PASS == kPassPosSoftplus, PosSoftplusAcc<T>,
                                          LiftedPairsAcc<T>>>>;

// One (nr x nc) similarity tile of rows r0.., columns c0.. into acc[0..nr). The tile is
// this task's scratch: transform 1 turns each row into values v in place first, so the
// row sweeps below (which read it twice for lse2) take one sqrt per pair.
template <typename T, int64_t PASS, int64_t TR, int64_t MI>
DMLK_CPU_CLONES void forward_tile(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                  const int32_t* xlab, const int32_t* ylab,
                                  const RowColumns<T>& rows, EngineParams<T> p, bool exclude_diag,
                                  AccOf<PASS, T>* acc) {
  constexpr int64_t kDot = kTransformDot;  // the rows hold v from here on
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    T* s = tile + r * nc;
    const int diag = diag_column(exclude_diag, i, c0, nc);
    const int inc = static_cast<int>(nc);
    if constexpr (TR != kTransformDot) {
#pragma omp simd
      for (int c = 0; c < inc; ++c) s[c] = engine_value<TR>(s[c], CpuSqrt());
    }
    if constexpr (PASS == kPassExtrema) {
      extrema_row<T, kDot>(s, inc, ylab + c0, xlab[i], diag, acc[r]);
    } else if constexpr (PASS == kPassLse2) {
      lse2_row<T, kDot, MI>(s, inc, ylab + c0, xlab[i], diag, rows.max_neg[i], rows.min_pos[i],
                            p, acc[r]);
    } else if constexpr (PASS == kPassPosSoftplus) {
      pos_softplus_row<T, kDot, MI>(s, inc, ylab + c0, xlab[i], diag, rows.max_neg[i],
                                    rows.min_pos[i], rows.L[i], p, acc[r]);
    } else {  // the symmetric case: column j's L is row j's
      lifted_pairs_row<T>(s, inc, ylab + c0, xlab[i], diag, rows.L[i], rows.L + c0, p, acc[r]);
    }
  }
}

template <typename T, int64_t PASS, int64_t TR, int64_t MI>
void forward_impl(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab,
                  const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
                  bool exclude_diag, at::Tensor& out) {
  const int64_t n = x.size(0), m = y.size(0);
  T* o = out.data_ptr<T>();
  const int64_t cols = out.size(1);
  // Passes 2 and 3 sum over positive pairs only: a row block visits only the columns from the
  // first to the last one sharing a label with one of its rows (all of them for shuffled
  // labels; a few tiles when the rows are sorted by label, as the fused NT-Xent and Lifted
  // Structure losses do).
  constexpr bool kPositivesOnly = PASS == kPassPosSoftplus || PASS == kPassLiftedPairs;
  at::parallel_for(0, ceil_div(n, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch guard: without it autograd
    // would record every tile product of an input that requires grad (an N x M leak).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlasGuard serial_blas;  // bit-identical across thread counts (see the class)
    auto buffer = at::empty({kRowBlock * std::min(kColBlock, std::max<int64_t>(m, 1))}, x.options());
    std::vector<AccOf<PASS, T>> acc(kRowBlock);
    std::vector<int64_t> block_of_code(kPositivesOnly ? n + m : 0, -1);  // label codes are < n + m
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, nr = std::min(kRowBlock, n - r0);
      for (int64_t r = 0; r < nr; ++r) acc[r] = AccOf<PASS, T>();
      const auto xb = x.narrow(0, r0, nr);
      int64_t c_begin = 0, c_end = m;
      if constexpr (kPositivesOnly) {
        for (int64_t r = 0; r < nr; ++r) block_of_code[xlab[r0 + r]] = b;
        c_begin = m;
        c_end = 0;
        for (int64_t c = 0; c < m; ++c) {
          if (block_of_code[ylab[c]] == b) {
            c_begin = std::min(c_begin, c);
            c_end = c + 1;
          }
        }
      }
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, c_end - c0);
        auto tile = buffer.narrow(0, 0, nr * nc).view({nr, nc});
        if (x.size(1) == 0) {
          tile.zero_();
        } else {
          at::mm_out(tile, xb, y.narrow(0, c0, nc).t());
        }
        forward_tile<T, PASS, TR, MI>(tile.data_ptr<T>(), nr, nc, r0, c0, xlab, ylab, rows, p,
                                      exclude_diag, acc.data());
      }
      for (int64_t r = 0; r < nr; ++r) acc[r].store(o + (r0 + r) * cols);
    }
  });
}

// Calls f(IC<transform>, IC<mining>) for the three valid combinations.
template <typename F>
void dispatch_config(int64_t transform, int64_t mining, F&& f) {
  if (transform == kTransformUnitDistance) {
    f(IC<kTransformUnitDistance>{}, IC<kMiningNone>{});
  } else if (mining == kMiningMultiSimilarity) {
    f(IC<kTransformDot>{}, IC<kMiningMultiSimilarity>{});
  } else {
    f(IC<kTransformDot>{}, IC<kMiningNone>{});
  }
}

at::Tensor pair_engine_forward_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                   const at::Tensor& x_labels, const at::Tensor& y_labels,
                                   const at::Tensor& row_in, int64_t pass_kind, int64_t transform,
                                   int64_t mining, at::ArrayRef<double> params, bool exclude_diag) {
  check_pair_engine_args(x_in, y_in, x_labels, y_labels, row_in, nullptr, pass_kind, transform,
                         mining, params, exclude_diag, /*symmetric=*/false);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "dmlkern: the CPU backend takes float32 or float64 x, got ", x_in.scalar_type());
  const auto st = stats_dtype(x_in.scalar_type());
  const int64_t n = x_in.size(0);
  auto out = at::empty({n, engine_out_columns(pass_kind)}, x_in.options().dtype(st));
  if (n == 0) return out;
  const auto x = x_in.contiguous();
  const auto y = y_in.contiguous();
  const auto [xl, yl] = label_codes(x_labels, y_labels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_engine_forward_cpu", [&] {
    const RowColumns<scalar_t> rows(row_in, nullptr, st);
    const auto p = make_params<scalar_t>(params);
    const int32_t* xlab = xl.data_ptr<int32_t>();
    const int32_t* ylab = yl.data_ptr<int32_t>();
    dispatch_config(transform, mining, [&](auto tr, auto mi) {
      constexpr int64_t TR = decltype(tr)::value, MI = decltype(mi)::value;
      if (pass_kind == kPassExtrema) {
        forward_impl<scalar_t, kPassExtrema, TR, kMiningNone>(x, y, xlab, ylab, rows, p,
                                                              exclude_diag, out);
      } else if (pass_kind == kPassLse2) {
        forward_impl<scalar_t, kPassLse2, TR, MI>(x, y, xlab, ylab, rows, p, exclude_diag, out);
      } else if (pass_kind == kPassPosSoftplus) {
        forward_impl<scalar_t, kPassPosSoftplus, TR, MI>(x, y, xlab, ylab, rows, p, exclude_diag,
                                                         out);
      } else {  // mining is 0 (checked): one kernel per transform
        forward_impl<scalar_t, kPassLiftedPairs, TR, kMiningNone>(x, y, xlab, ylab, rows, p,
                                                                  exclude_diag, out);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// Backward epilogues: a similarity tile row turned in place into dl/ds.

// grad_x side: the tile row is x row i against y columns c0 + c (row i's coefficients).
// HAS_LIFT: row i's C_lift term, with column j's L_j = L_col[c] (the symmetric case).
template <typename T, int64_t TR, int64_t MI, bool HAS_B, bool HAS_LIFT>
DMLK_CPU_INLINE void grad_row_own_x(T* w, int nc, const int32_t* lab, int32_t li, int diag,
                                    T max_neg, T min_pos, T a_pos, T lse_pos, T a_neg,
                                    T lse_neg, T b_pos, T L, T c_lift, const T* L_col,
                                    const EngineParams<T>& p) {
  const CpuExp ex;
  const CpuLog1p l1p;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg, p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos, p.eps);
    const T L_j = HAS_LIFT ? L_col[c] : T(0);
    w[c] = engine_pair_grad<TR, HAS_B, HAS_LIFT>(v, kp, kn, a_pos, lse_pos, a_neg, lse_neg, b_pos,
                                                 L, p, ex, c_lift, L_j, l1p);
  }
}

// grad_y side: the tile row is y row j against x columns i = c0 + c, each with its own
// row coefficients (the column arrays are offset to c0 by the caller). HAS_LIFT: the
// columns' C_lift terms, with the own row's L_j (the symmetric case: row_in[j, 2]).
template <typename T, int64_t TR, int64_t MI, bool HAS_B, bool HAS_LIFT>
DMLK_CPU_INLINE void grad_row_own_y(T* w, int nc, const int32_t* lab, int32_t lj, int diag,
                                    const T* max_neg, const T* min_pos, const T* a_pos,
                                    const T* lse_pos, const T* a_neg, const T* lse_neg,
                                    const T* b_pos, const T* L, const T* c_lift, T L_j,
                                    const EngineParams<T>& p) {
  const CpuExp ex;
  const CpuLog1p l1p;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const bool same = lab[c] == lj;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg[c], p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos[c], p.eps);
    const T cl = HAS_LIFT ? c_lift[c] : T(0);
    w[c] = engine_pair_grad<TR, HAS_B, HAS_LIFT>(v, kp, kn, a_pos[c], lse_pos[c], a_neg[c],
                                                 lse_neg[c], b_pos[c], L[c], p, ex, cl, L_j, l1p);
  }
}

// One tile row with the (HAS_B, HAS_LIFT) variant the coefficients need (HAS_LIFT only
// without mining: C_lift is checked to come with mining = 0).
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void grad_row_x(bool has_b, bool has_lift, T* w, int nc, const int32_t* lab,
                                int32_t li, int diag, const RowColumns<T>& rows, int64_t i,
                                int64_t c0, const EngineParams<T>& p) {
  const T mx = rows.max_neg[i], mn = rows.min_pos[i], ap = rows.a_pos[i], lp = rows.lse_pos[i];
  const T an = rows.a_neg[i], ln = rows.lse_neg[i], b = rows.b_pos[i], L = rows.L[i];
  if constexpr (MI == kMiningNone) {
    if (has_lift) {
      const T cl = rows.c_lift[i];
      if (has_b) {
        grad_row_own_x<T, TR, MI, true, true>(w, nc, lab, li, diag, mx, mn, ap, lp, an, ln, b, L,
                                              cl, rows.L + c0, p);
      } else {
        grad_row_own_x<T, TR, MI, false, true>(w, nc, lab, li, diag, mx, mn, ap, lp, an, ln, b, L,
                                               cl, rows.L + c0, p);
      }
      return;
    }
  }
  if (has_b) {
    grad_row_own_x<T, TR, MI, true, false>(w, nc, lab, li, diag, mx, mn, ap, lp, an, ln, b, L,
                                           T(0), nullptr, p);
  } else {
    grad_row_own_x<T, TR, MI, false, false>(w, nc, lab, li, diag, mx, mn, ap, lp, an, ln, b, L,
                                            T(0), nullptr, p);
  }
}

template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void grad_row_y(bool has_b, bool has_lift, T* w, int nc, const int32_t* lab,
                                int32_t lj, int diag, const RowColumns<T>& rows, int64_t j,
                                int64_t c0, const EngineParams<T>& p) {
  const T *mx = rows.max_neg + c0, *mn = rows.min_pos + c0, *ap = rows.a_pos + c0;
  const T *lp = rows.lse_pos + c0, *an = rows.a_neg + c0, *ln = rows.lse_neg + c0;
  const T *b = rows.b_pos + c0, *L = rows.L + c0;
  if constexpr (MI == kMiningNone) {
    if (has_lift) {
      const T* cl = rows.c_lift + c0;
      if (has_b) {
        grad_row_own_y<T, TR, MI, true, true>(w, nc, lab, lj, diag, mx, mn, ap, lp, an, ln, b, L,
                                              cl, rows.L[j], p);
      } else {
        grad_row_own_y<T, TR, MI, false, true>(w, nc, lab, lj, diag, mx, mn, ap, lp, an, ln, b, L,
                                               cl, rows.L[j], p);
      }
      return;
    }
  }
  if (has_b) {
    grad_row_own_y<T, TR, MI, true, false>(w, nc, lab, lj, diag, mx, mn, ap, lp, an, ln, b, L,
                                           nullptr, T(0), p);
  } else {
    grad_row_own_y<T, TR, MI, false, false>(w, nc, lab, lj, diag, mx, mn, ap, lp, an, ln, b, L,
                                            nullptr, T(0), p);
  }
}

template <typename T, int64_t TR, int64_t MI, bool OWN_IS_X>
DMLK_CPU_CLONES void grad_tile(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                               const int32_t* xlab, const int32_t* ylab,
                               const RowColumns<T>& rows, EngineParams<T> p, bool exclude_diag,
                               bool tile_has_pos) {
  const int inc = static_cast<int>(nc);
  if constexpr (OWN_IS_X) {
    for (int64_t r = 0; r < na; ++r) {
      const int64_t i = a0 + r;
      const bool has_lift = tile_has_pos && rows.c_lift != nullptr && rows.c_lift[i] != T(0);
      grad_row_x<T, TR, MI>(rows.b_pos[i] != T(0), has_lift, tile + r * nc, inc, ylab + c0,
                            xlab[i], diag_column(exclude_diag, i, c0, nc), rows, i, c0, p);
    }
  } else {
    const auto [has_b, any_lift] = rows.column_terms(c0, nc);
    const bool has_lift = any_lift && tile_has_pos;
    for (int64_t r = 0; r < na; ++r) {
      const int64_t j = a0 + r;
      grad_row_y<T, TR, MI>(has_b, has_lift, tile + r * nc, inc, xlab + c0, ylab[j],
                            diag_column(exclude_diag, j, c0, nc), rows, j, c0, p);
    }
  }
}

// grad_own[a] = sum_b W_ab other[b] with W_ab = epilogue(S_ab), S_ab = own[a] other[b]^T: per
// row block and column tile one product for S and one for the gradient; one block of `own`
// rows per task, so each output row has one writer. With a C_lift column, a tile without a
// positive pair (no label of the block's rows among its columns) is flagged so the epilogue
// skips the lifted term: with rows sorted by label, most tiles.
// epilogue(tile, na, nc, a0, c0, tile_has_pos) turns the tile into W in place.
template <typename T, typename Epilogue>
void grad_tiles(const at::Tensor& own, const at::Tensor& other, const int32_t* own_lab,
                const int32_t* other_lab, bool lift, at::Tensor& grad_own, Epilogue epilogue) {
  const int64_t n_own = own.size(0), n_other = other.size(0);
  at::parallel_for(0, ceil_div(n_own, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch guard (see forward_impl).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlasGuard serial_blas;  // bit-identical across thread counts (see the class)
    auto buffer = at::empty({kRowBlock * std::min(kColBlock, n_other)}, own.options());
    std::vector<int64_t> block_of_code(lift ? n_own + n_other : 0, -1);  // label codes < N + M
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t a0 = b * kRowBlock, na = std::min(kRowBlock, n_own - a0);
      const auto own_blk = own.narrow(0, a0, na);
      auto grad_blk = grad_own.narrow(0, a0, na);
      if (lift) {
        for (int64_t r = 0; r < na; ++r) block_of_code[own_lab[a0 + r]] = b;
      }
      for (int64_t c0 = 0; c0 < n_other; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n_other - c0);
        const auto other_blk = other.narrow(0, c0, nc);
        auto tile = buffer.narrow(0, 0, na * nc).view({na, nc});
        at::mm_out(tile, own_blk, other_blk.t());
        bool tile_has_pos = !lift;
        for (int64_t c = 0; c < nc && !tile_has_pos; ++c)
          tile_has_pos = block_of_code[other_lab[c0 + c]] == b;
        epilogue(tile.template data_ptr<T>(), na, nc, a0, c0, tile_has_pos);
        grad_blk.addmm_(tile, other_blk);
      }
    }
  });
}

// own = x (pairs (a, b) = (i, j)) or own = y (pairs (j, i)).
template <typename T, int64_t TR, int64_t MI, bool OWN_IS_X>
void grad_side(const at::Tensor& own, const at::Tensor& other, const int32_t* xlab,
               const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
               bool exclude_diag, at::Tensor& grad_own) {
  grad_tiles<T>(own, other, OWN_IS_X ? xlab : ylab, OWN_IS_X ? ylab : xlab, rows.c_lift != nullptr,
                grad_own, [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
                  grad_tile<T, TR, MI, OWN_IS_X>(tile, na, nc, a0, c0, xlab, ylab, rows, p,
                                                 exclude_diag, has_pos);
                });
}

// ---------------------------------------------------------------------------
// symmetric = true (y is x, the same labels): one side. The tile row i against columns
// j = c0 + c becomes, in place, row i's weight of the pair (i, j) plus row j's of the pair
// (j, i) (engine_pair_grad_sym): one pass over the tile, one exp per half and pair (two more
// with HAS_B), one logaddexp per pair with HAS_LIFT.
template <typename T, int64_t TR, int64_t MI, bool HAS_B, bool HAS_LIFT>
DMLK_CPU_INLINE void grad_row_sym(T* w, int nc, const int32_t* lab, int32_t li, int diag,
                                  const EngineRowCoef<T>& ri, const T* max_neg, const T* min_pos,
                                  const T* a_pos, const T* lse_pos, const T* a_neg,
                                  const T* lse_neg, const T* b_pos, const T* L, const T* c_lift,
                                  const EngineParams<T>& p) {
  const CpuExp ex;
  const CpuLog1p l1p;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const EngineRowCoef<T> rj{max_neg[c], min_pos[c], L[c],      a_pos[c], lse_pos[c],
                              a_neg[c],   lse_neg[c], b_pos[c], HAS_LIFT ? c_lift[c] : T(0)};
    w[c] = engine_pair_grad_sym<TR, MI, HAS_B, HAS_LIFT>(v, lab[c] == li, c == diag, ri, rj, p, ex,
                                                         l1p);
  }
}

// One tile (rows a0.., columns c0.. of x against x). HAS_B and HAS_LIFT per row: the row's
// own coefficient or any column's of the tile (their union covers both halves); the lifted
// term also needs a positive pair in the tile (tile_has_pos, symmetric like the labels).
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_CLONES void grad_tile_sym(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                                   const int32_t* lab, const RowColumns<T>& rows,
                                   EngineParams<T> p, bool exclude_diag, bool tile_has_pos) {
  const int inc = static_cast<int>(nc);
  const auto [tile_b, tile_lift] = rows.column_terms(c0, nc);
  const T *mx = rows.max_neg + c0, *mn = rows.min_pos + c0, *ap = rows.a_pos + c0;
  const T *lp = rows.lse_pos + c0, *an = rows.a_neg + c0, *ln = rows.lse_neg + c0;
  const T *b = rows.b_pos + c0, *L = rows.L + c0;
  const T* cl = rows.c_lift != nullptr ? rows.c_lift + c0 : nullptr;
  for (int64_t r = 0; r < na; ++r) {
    const int64_t i = a0 + r;
    const EngineRowCoef<T> ri{rows.max_neg[i], rows.min_pos[i], rows.L[i],
                              rows.a_pos[i],   rows.lse_pos[i], rows.a_neg[i],
                              rows.lse_neg[i], rows.b_pos[i],   cl != nullptr ? rows.c_lift[i] : T(0)};
    const bool has_b = tile_b || ri.b_pos != T(0);
    const bool has_lift = tile_has_pos && cl != nullptr && (tile_lift || ri.c_lift != T(0));
    T* w = tile + r * nc;
    const int32_t* clab = lab + c0;
    const int diag = diag_column(exclude_diag, i, c0, nc);
    if constexpr (MI == kMiningNone) {  // C_lift is checked to come with mining = 0
      if (has_lift) {
        if (has_b) {
          grad_row_sym<T, TR, MI, true, true>(w, inc, clab, lab[i], diag, ri, mx, mn, ap, lp, an,
                                              ln, b, L, cl, p);
        } else {
          grad_row_sym<T, TR, MI, false, true>(w, inc, clab, lab[i], diag, ri, mx, mn, ap, lp, an,
                                               ln, b, L, cl, p);
        }
        continue;
      }
    }
    if (has_b) {
      grad_row_sym<T, TR, MI, true, false>(w, inc, clab, lab[i], diag, ri, mx, mn, ap, lp, an, ln,
                                           b, L, nullptr, p);
    } else {
      grad_row_sym<T, TR, MI, false, false>(w, inc, clab, lab[i], diag, ri, mx, mn, ap, lp, an, ln,
                                            b, L, nullptr, p);
    }
  }
}

// grad[a] = sum_b W_ab x[b] with W_ab the symmetric weights of the tile S_ab = x[a] x[b]^T: two
// products per tile where the two-sided backward takes four.
template <typename T, int64_t TR, int64_t MI>
void grad_sym(const at::Tensor& x, const int32_t* lab, const RowColumns<T>& rows,
              EngineParams<T> p, bool exclude_diag, at::Tensor& grad) {
  grad_tiles<T>(x, x, lab, lab, rows.c_lift != nullptr, grad,
                [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
                  grad_tile_sym<T, TR, MI>(tile, na, nc, a0, c0, lab, rows, p, exclude_diag, has_pos);
                });
}

std::tuple<at::Tensor, at::Tensor> pair_engine_backward_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& x_labels,
    const at::Tensor& y_labels, const at::Tensor& row_in, const at::Tensor& row_coef,
    int64_t transform, int64_t mining, at::ArrayRef<double> params, bool exclude_diag,
    bool symmetric) {
  check_pair_engine_args(x_in, y_in, x_labels, y_labels, row_in, &row_coef, -1, transform, mining,
                         params, exclude_diag, symmetric);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "dmlkern: the CPU backend takes float32 or float64 x, got ", x_in.scalar_type());
  auto grad_x = at::zeros(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  auto grad_y = at::zeros(y_in.sizes(), y_in.options().memory_format(at::MemoryFormat::Contiguous));
  // D = 0 leaves nothing to multiply (and the gradients are empty).
  if (x_in.size(0) == 0 || y_in.size(0) == 0 || x_in.size(1) == 0) return {grad_x, grad_y};
  const auto st = stats_dtype(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto y = y_in.contiguous();
  const auto [xl, yl] = label_codes(x_labels, y_labels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_engine_backward_cpu", [&] {
    const RowColumns<scalar_t> rows(row_in, &row_coef, st);
    const auto p = make_params<scalar_t>(params);
    const int32_t* xlab = xl.data_ptr<int32_t>();
    const int32_t* ylab = yl.data_ptr<int32_t>();
    dispatch_config(transform, mining, [&](auto tr, auto mi) {
      constexpr int64_t TR = decltype(tr)::value, MI = decltype(mi)::value;
      if (symmetric) {  // y is x (equal values) and y_labels x_labels: x's rows and codes only
        grad_sym<scalar_t, TR, MI>(x, xlab, rows, p, exclude_diag, grad_x);
        return;
      }
      grad_side<scalar_t, TR, MI, true>(x, y, xlab, ylab, rows, p, exclude_diag, grad_x);
      grad_side<scalar_t, TR, MI, false>(y, x, xlab, ylab, rows, p, exclude_diag, grad_y);
    });
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pair_engine_forward", &pair_engine_forward_cpu);
  m.impl("pair_engine_backward", &pair_engine_backward_cpu);
}

}  // namespace dmlkern
