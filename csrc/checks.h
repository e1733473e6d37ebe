// Argument checks shared by every backend: clear messages that name the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/LegacyTypeDispatch.h>

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

// Statistics are kept in fp32, or fp64 for fp64 inputs.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dmlkern
