// The one place where dmlkern's operator schemas are declared. Each backend
// (csrc/cpu, csrc/cuda) registers implementations with TORCH_LIBRARY_IMPL;
// Python adds fake tensors and autograd (dmlkern/ops). No Python here, so the
// same file builds into the libtorch-only shared library (CMakeLists.txt).
#include <torch/library.h>

TORCH_LIBRARY(dmlkern, m) {
  // lse[i] = log sum_j mask(i, j) * exp(scale * <x_i, y_j>), tile by tile.
  // mask_mode: 0 all pairs, 1 same label, 2 different label; exclude_diag drops
  // j == i (set when y is x). Returns fp32 (fp64 for fp64 inputs); -inf for empty rows.
  m.def(
      "masked_lse(Tensor x, Tensor y, Tensor x_labels, Tensor y_labels, float scale, "
      "int mask_mode, bool exclude_diag) -> Tensor");
  // Recomputes the tiles from the saved lse: returns (grad_x, grad_y).
  m.def(
      "masked_lse_backward(Tensor grad_lse, Tensor x, Tensor y, Tensor x_labels, "
      "Tensor y_labels, Tensor lse, float scale, int mask_mode, bool exclude_diag) "
      "-> (Tensor, Tensor)");
}
