// Shared maths of the tiled pair engine: label masks, online log-sum-exp and the
// backward weight of one pair. Host-device functions, so the CPU build (and its
// tests) exercise exactly the arithmetic the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DMLK_HD __host__ __device__ __forceinline__
#else
#define DMLK_HD inline
#endif

namespace dmlkern {

// Which (i, j) pairs a masked reduction keeps.
enum MaskMode : int64_t {
  kMaskAll = 0,        // every pair
  kMaskSameLabel = 1,  // positives: labels equal
  kMaskDiffLabel = 2,  // negatives: labels differ
};

DMLK_HD bool pair_kept(int64_t mode, int64_t label_i, int64_t label_j, int64_t i, int64_t j,
                       bool exclude_diag) {
  if (exclude_diag && i == j) return false;  // self-pair when y is x
  if (mode == kMaskSameLabel) return label_i == label_j;
  if (mode == kMaskDiffLabel) return label_i != label_j;
  return true;
}

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

// d lse_i / d s_ij times the upstream gradient: g_i * scale * softmax_ij.
// Zero for masked pairs and for empty rows (lse = -inf), never NaN from 0/0.
template <typename T>
DMLK_HD T lse_pair_grad(T grad_lse_i, T lse_i, T scaled_sim, bool kept, T scale) {
  if (!kept || lse_i == neg_infinity<T>()) return T(0);
  return grad_lse_i * scale * exp_(scaled_sim - lse_i);
}

}  // namespace dmlkern
