// What the CPU and CUDA hosts of the pair engine share: the argument checks (checks.h), the
// kernel parameters, and the fan-out from the ops' run-time arguments to the compile-time
// configurations the kernels are instantiated for. Host-only C++, included by .cpp and .cu
// files alike.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <type_traits>

#include "checks.h"
#include "pair_engine.h"

// The fan-out helpers run inside the CPU's per-tile epilogues (target_clones functions): they
// and the lambdas they call must be inlined there, or the loops behind them would be compiled
// for the baseline ISA only. Lambdas take the attribute after their parameter list.
#if defined(__GNUC__)
#define DMLK_HOST_INLINE inline __attribute__((always_inline))
#define DMLK_LAMBDA_INLINE __attribute__((always_inline))
#else
#define DMLK_HOST_INLINE inline
#define DMLK_LAMBDA_INLINE
#endif

namespace dmlkern {

template <int64_t V>
using IC = std::integral_constant<int64_t, V>;

template <bool B>
using BC = std::bool_constant<B>;

// The op's params [sc_pos, off_pos, sc_neg, off_neg, eps] (5, checked), with transform 2's
// [relu_pos, shift_pos, relu_neg, shift_neg] after them (9) and the pos_softplus pass's log_floor
// (10; -inf when absent), in the statistics type T.
template <typename T>
EngineParams<T> make_params(at::ArrayRef<double> params) {
  const auto at = [&](size_t k) { return k < params.size() ? static_cast<T>(params[k]) : T(0); };
  const T log_floor = params.size() > 9 ? static_cast<T>(params[9]) : neg_infinity<T>();
  return EngineParams<T>{at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(8), log_floor};
}

// Calls f(IC<transform>, IC<mining>) for the four valid combinations (mining needs
// transform 0).
template <typename F>
void dispatch_config(int64_t transform, int64_t mining, F&& f) {
  if (transform == kTransformUnitDistance) {
    f(IC<kTransformUnitDistance>{}, IC<kMiningNone>{});
  } else if (transform == kTransformCircle) {
    f(IC<kTransformCircle>{}, IC<kMiningNone>{});
  } else if (mining == kMiningMultiSimilarity) {
    f(IC<kTransformDot>{}, IC<kMiningMultiSimilarity>{});
  } else {
    f(IC<kTransformDot>{}, IC<kMiningNone>{});
  }
}

// Calls f(IC<pass>, IC<transform>, IC<mining>) for a forward pass. Extrema ignores mining;
// lifted_pairs and hinge come with mining 0 (checked): those get kMiningNone, one kernel per
// transform. Transform 2 comes with lse2 only (checked).
template <typename F>
void dispatch_forward_pass(int64_t pass_kind, int64_t transform, int64_t mining, F&& f) {
  dispatch_config(transform, mining, [&](auto tr, auto mi) {
    if constexpr (decltype(tr)::value == kTransformCircle) {
      f(IC<kPassLse2>{}, tr, mi);
    } else if (pass_kind == kPassExtrema) {
      f(IC<kPassExtrema>{}, tr, IC<kMiningNone>{});
    } else if (pass_kind == kPassLse2) {
      f(IC<kPassLse2>{}, tr, mi);
    } else if (pass_kind == kPassPosSoftplus) {
      f(IC<kPassPosSoftplus>{}, tr, mi);
    } else if (pass_kind == kPassLiftedPairs) {
      f(IC<kPassLiftedPairs>{}, tr, IC<kMiningNone>{});
    } else {
      f(IC<kPassHinge>{}, tr, IC<kMiningNone>{});
    }
  });
}

// The hinge backward: row_coef (N, 2) = (H_pos, H_neg) (checked to come with mining 0).
inline bool is_hinge_coef(const at::Tensor& row_coef) { return row_coef.size(1) == 2; }

// Calls f(BC<LIFT>) for the backward's C_lift term. C_lift is checked to come with mining 0
// and without transform 2, so those configurations are never instantiated with it.
template <int64_t TR, int64_t MI, typename F>
DMLK_HOST_INLINE void dispatch_lift(bool lift, F&& f) {
  if constexpr (MI == kMiningNone && TR != kTransformCircle) {
    if (lift) {
      f(BC<true>{});
      return;
    }
  }
  f(BC<false>{});
}

// Calls f(BC<HAS_B>, BC<HAS_LIFT>): the backward's B_pos and C_lift terms, each compiled in
// only where its coefficients are non-zero (HAS_LIFT as in dispatch_lift).
template <int64_t TR, int64_t MI, typename F>
DMLK_HOST_INLINE void dispatch_grad_terms(bool has_b, bool has_lift, F&& f) {
  dispatch_lift<TR, MI>(has_lift, [&](auto lift) DMLK_LAMBDA_INLINE {
    if (has_b) {
      f(BC<true>{}, lift);
    } else {
      f(BC<false>{}, lift);
    }
  });
}

}  // namespace dmlkern
