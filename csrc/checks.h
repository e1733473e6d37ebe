// Argument checks shared by every backend (CPU and CUDA hosts): clear messages that name the
// argument.
#pragma once
#include <ATen/core/Tensor.h>  // (not ATen.h, every op's header: a quarter of the compile time)
#include <ATen/TensorOperators.h>
#include <ATen/ops/equal.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>
#include <limits>

#include "pair_engine.h"

namespace dmlkern {

inline void check_pair_inputs(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                              const at::Tensor& y_labels) {
  TORCH_CHECK(x.dim() == 2, "dmlkern: x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(y.dim() == 2, "dmlkern: y must be 2-D (M, D), got ", y.dim(), "-D");
  TORCH_CHECK(x.size(1) == y.size(1), "dmlkern: x and y must have the same width D, got ",
              x.size(1), " and ", y.size(1));
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "dmlkern: x and y must have the same dtype, got ",
              x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK(x.device() == y.device(), "dmlkern: x and y must be on the same device");
  TORCH_CHECK(x_labels.scalar_type() == at::kLong && y_labels.scalar_type() == at::kLong,
              "dmlkern: x_labels and y_labels must be int64");
  TORCH_CHECK(x_labels.dim() == 1 && x_labels.size(0) == x.size(0),
              "dmlkern: x_labels must be 1-D of length N=", x.size(0));
  TORCH_CHECK(y_labels.dim() == 1 && y_labels.size(0) == y.size(0),
              "dmlkern: y_labels must be 1-D of length M=", y.size(0));
  TORCH_CHECK(x_labels.device() == x.device() && y_labels.device() == x.device(),
              "dmlkern: x_labels and y_labels must be on the device of x");
}

// dmlkern::fixed_mm(a, b) = a @ b.T on every backend: a (N, D), b (M, D) of one floating dtype
// and device.
inline void check_fixed_mm_args(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2, "dmlkern: fixed_mm: a must be 2-D (N, D), got ", a.dim(), "-D");
  TORCH_CHECK(b.dim() == 2, "dmlkern: fixed_mm: b must be 2-D (M, D), got ", b.dim(), "-D");
  TORCH_CHECK(a.size(1) == b.size(1), "dmlkern: fixed_mm: a (N, D) and b (M, D) must have the same "
              "width D, got a ", a.sizes(), " and b ", b.sizes());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()),
              "dmlkern: fixed_mm: a must be floating point, got ", a.scalar_type());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(),
              "dmlkern: fixed_mm: a and b must have the same dtype, got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "dmlkern: fixed_mm: a and b must be on the same device, got ",
              a.device(), " and ", b.device());
}

// fixed_mm_into's `out`: (N, M), a's dtype and device, sharing no memory with a or b (the tiles
// read a and b while others are written).
inline void check_fixed_mm_out(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  check_fixed_mm_args(a, b);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(0),
              "dmlkern: fixed_mm: out must be (N, M) = (", a.size(0), ", ", b.size(0), "), got ",
              out.sizes());
  TORCH_CHECK(out.scalar_type() == a.scalar_type(), "dmlkern: fixed_mm: out must have a's dtype ",
              a.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == a.device(), "dmlkern: fixed_mm: out must be on a's device ", a.device(),
              ", got ", out.device());
  at::assert_no_overlap(out, a);
  at::assert_no_overlap(out, b);
}

// The *_into ops' buffer (`name`, e.g. pair_engine_backward_into's grad_y) for the gradient of
// `y` (named `y_name`): y's shape, x's dtype and device, no overlap with itself or an operand
// (every element is written).
inline void check_grad_y_out(const char* op, const char* name, const char* y_name,
                             const at::Tensor& x, const at::Tensor& y, const at::Tensor& grad_y) {
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "dmlkern: ", op, ": ", name, " must have ", y_name,
              "'s shape ", y.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "dmlkern: ", op, ": ", name,
              " must have x's dtype ", x.scalar_type(), ", got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), "dmlkern: ", op, ": ", name,
              " must be on x's device ", x.device(), ", got ", grad_y.device());
  at::assert_no_internal_overlap(grad_y);
  at::assert_no_overlap(grad_y, x);
  at::assert_no_overlap(grad_y, y);
}

// Statistics are kept in fp32, or fp64 for fp64 inputs.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The same rows: the same tensor (or view of the same memory), else equal values (NaN equal
// to NaN).
inline bool same_rows(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_same(b)) return true;
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type() || a.device() != b.device())
    return false;
  if (a.data_ptr() == b.data_ptr() && a.strides() == b.strides()) return true;
  if (!at::isFloatingType(a.scalar_type())) return at::equal(a, b);
  return (a.eq(b) | (a.isnan() & b.isnan())).all().item<bool>();
}

// Argument checks of both ops on every backend. pass_kind < 0 skips its check (the backward
// has none); row_coef may be null (the forward has none); symmetric is the backward's flag
// (false for the forward).
inline void check_pair_engine_args(const at::Tensor& x, const at::Tensor& y,
                                   const at::Tensor& x_labels, const at::Tensor& y_labels,
                                   const at::Tensor& row_in, const at::Tensor* row_coef,
                                   int64_t pass_kind, int64_t transform, int64_t mining,
                                   at::ArrayRef<double> params, bool exclude_diag,
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
                    (row_coef->size(1) == 2 || row_coef->size(1) == 5 || row_coef->size(1) == 6),
                "dmlkern: row_coef must be (N, 5), (N, 6) or (N, 2) (the hinge backward) with N = ",
                n, ", got ", row_coef->sizes());
    TORCH_CHECK(at::isFloatingType(row_coef->scalar_type()),
                "dmlkern: row_coef must be floating point (the stats dtype), got ",
                row_coef->scalar_type());
    TORCH_CHECK(row_coef->device() == x.device(), "dmlkern: row_coef must be on the device of x");
  }
  if (pass_kind >= 0 || row_coef == nullptr) {
    TORCH_CHECK(pass_kind >= kPassExtrema && pass_kind <= kPassHinge,
                "dmlkern: pass_kind must be 0 (extrema), 1 (lse2), 2 (pos_softplus), 3 "
                "(lifted_pairs) or 4 (hinge), got ",
                pass_kind);
  }
  TORCH_CHECK(transform == kTransformDot || transform == kTransformUnitDistance ||
                  transform == kTransformCircle,
              "dmlkern: transform must be 0 (dot product), 1 (unit-vector distance) or 2 (circle), got ",
              transform);
  TORCH_CHECK(mining == kMiningNone || mining == kMiningMultiSimilarity,
              "dmlkern: mining must be 0 (none) or 1 (Multi-Similarity miner), got ", mining);
  TORCH_CHECK(mining == kMiningNone || transform == kTransformDot,
              "dmlkern: mining=1 (Multi-Similarity miner) needs transform 0, got transform ",
              transform);
  TORCH_CHECK(params.size() == 5 || params.size() == 9 || params.size() == 10,
              "dmlkern: params must hold 5 floats [sc_pos, off_pos, sc_neg, off_neg, eps], 9 (then "
              "relu_pos, shift_pos, relu_neg, shift_neg) or 10 (then log_floor), got ",
              params.size());
  TORCH_CHECK(params.size() < 10 || params[9] < std::numeric_limits<double>::infinity(),
              "dmlkern: params[9] (log_floor) must be finite or -inf, got ", params.size() < 10 ? 0.0 : params[9]);
  // Transform 2 (circle): the lse2 pass and the softmax backward (mining 0: checked above), its 4
  // constants.
  if (transform == kTransformCircle) {
    TORCH_CHECK(params.size() >= 9,
                "dmlkern: transform=2 (circle) needs 9 params (relu_pos, shift_pos, relu_neg, "
                "shift_neg after the 5), got ",
                params.size());
    TORCH_CHECK(row_coef != nullptr || pass_kind == kPassLse2,
                "dmlkern: transform=2 (circle) needs pass_kind=1 (lse2), got pass_kind=", pass_kind);
    TORCH_CHECK(row_coef == nullptr || row_coef->size(1) == 5,
                "dmlkern: transform=2 (circle) needs row_coef with 5 columns (the lse2 backward), got ",
                row_coef == nullptr ? 0 : row_coef->size(1));
  }
  TORCH_CHECK(x.size(0) + y.size(0) <= std::numeric_limits<int32_t>::max(),
              "dmlkern: N + M must fit in int32");
  // The hinge pass and its backward keep every pair (no mining).
  const bool hinge_fwd = pass_kind == kPassHinge && row_coef == nullptr;
  const bool hinge_bwd = row_coef != nullptr && row_coef->size(1) == 2;
  TORCH_CHECK(!(hinge_fwd || hinge_bwd) || mining == kMiningNone, "dmlkern: ",
              hinge_fwd ? "pass_kind=4 (hinge)" : "row_coef with 2 columns (the hinge backward)",
              " needs mining=0, got mining=", mining);
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

}  // namespace dmlkern
