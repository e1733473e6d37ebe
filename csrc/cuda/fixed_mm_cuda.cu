// dmlkern::fixed_mm on CUDA: a @ b.T as one cuBLAS product. cuBLAS gives the same bits on every
// run for a fixed shape, GPU and toolkit (with CUBLAS_WORKSPACE_CONFIG set where several streams
// share a handle, as torch.use_deterministic_algorithms asks), so no blocking of its own is needed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace dmlkern {

namespace {

at::Tensor fixed_mm_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_fixed_mm_args(a, b);
  const c10::cuda::CUDAGuard device_guard(a.device());
  return at::mm(a, b.t());
}

void fixed_mm_into_cuda(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  check_fixed_mm_out(a, b, out);
  const c10::cuda::CUDAGuard device_guard(a.device());
  at::mm_out(out, a, b.t());
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CUDA, m) {
  m.impl("fixed_mm", &fixed_mm_cuda);
  m.impl("fixed_mm_into", &fixed_mm_into_cuda);
}

}  // namespace dmlkern
