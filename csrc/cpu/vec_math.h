// CPU vector maths for the engine's epilogue loops: the compile options and clone targets
// they need, and fp32 exp / log1p / sqrt written as straight-line selects so that `omp simd`
// loops calling them vectorise (libm's calls branch). fp64 uses libm.
//
// The loops are compiled for AVX-512, AVX2 and baseline (DMLK_CPU_CLONES: target_clones,
// chosen at load time), with GCC on x86-64 Linux.
#pragma once
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// The epilogue loops vectorise only as straight-line code: floating-point compares must
// be if-converted into vector selects (the code never reads FP exception flags). This
// header is the first include of every CPU source, so that the pragma covers every inline
// function the loops call.
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

#include <bit>
#include <cmath>
#include <cstdint>

#include "../pair_engine.h"

namespace dmlkern {

// exp(xc) for fp32 xc in [-104, 88.8] (not NaN) as straight-line selects (Cephes expf: xc =
// n ln2 + r, degree-6 polynomial, scaled by 2^n in two halves so gradual underflow comes out
// right): ~1 ulp; exp(-104) and below is 0. Vectorises.
DMLK_CPU_INLINE float exp_poly_in_range(float xc) {
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
  // xc <= -104 (also -inf, what masked-out pairs pass, clamped by the callers): exp is 0. Scale by
  // 2^0 and clear the bits instead of computing an underflowing product (a slow microcode assist
  // on x86).
  const int32_t under = -static_cast<int32_t>(xc <= -104.0f);
  const int32_t n = static_cast<int32_t>(fn) & ~under;
  const int32_t n1 = n >> 1, n2 = n - n1;  // both in [-75, 64]: normal scale factors
  const float s1 = std::bit_cast<float>((n1 + 127) << 23);
  const float s2 = std::bit_cast<float>((n2 + 127) << 23);
  return std::bit_cast<float>(std::bit_cast<int32_t>(p * s1 * s2) & ~under);
}

// exp(x) for any fp32 x: exp_poly_in_range after clamping (exp(88.8) overflows to inf there),
// exp(-inf) = 0, exp(+inf) = inf, NaN -> NaN. Vectorises.
DMLK_CPU_INLINE float exp_poly(float x) {
  const bool nan = x != x;
  float xc = x > 88.8f ? 88.8f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  xc = nan ? 0.0f : xc;
  const float res = exp_poly_in_range(xc);
  return nan ? x : res;
}

// exp(x) for an fp32 x known to be at most 88.8 and not NaN (a fixed shift's exponents, which lie
// at or below ~0): exp_poly's bits, without its NaN and overflow selects.
DMLK_CPU_INLINE float exp_poly_upto88(float x) {
  return exp_poly_in_range(x < -104.0f ? -104.0f : x);
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

// exp of arguments at most 88.8 and not NaN (exp_poly_upto88): the fixed shift's sums.
struct CpuExpUpTo88 {
  DMLK_CPU_INLINE float operator()(float x) const { return exp_poly_upto88(x); }
  DMLK_CPU_INLINE double operator()(double x) const { return std::exp(x); }
};

struct CpuLog1p {  // only called on [0, 1]
  DMLK_CPU_INLINE float operator()(float x) const { return log1p_poly(x); }
  DMLK_CPU_INLINE double operator()(double x) const { return std::log1p(x); }
};

}  // namespace dmlkern
