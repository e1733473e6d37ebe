// dmlkern::fixed_mm on the CPU: a @ b.T with bits that do not depend on the thread count.
// torch.matmul's do: MKL splits one product by its thread count. Here the output is cut into
// tiles of up to kMmRowBlock rows x kMmColBlock columns (narrower for outputs of few rows; the
// cut depends on the shape only, never on the thread count), the tiles run in parallel
// (parallel_blocks), and each is one single-threaded BLAS product (SerialBlasGuard) written
// straight into its rows and columns of the output (at::mm_out takes the strided tile and
// transposed or column-major operands without copies). Each output element has one writer and
// one product computing it: the same bits at any thread count.
// dmlkern::fixed_cdist / fixed_cdist_backward (the reference's LpDistance) are torch.cdist's
// product form and its backward with their products computed the same way.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include <ATen/ops/ones.h>

#include "../checks.h"

namespace dmlkern {

namespace {

// Output tiles of at most kMmRowBlock rows by kMmColBlock columns. Measured at one thread (CPU
// time against torch.matmul, fp32): 128-row tiles (the engine's kRowBlock) cost 1.17x on
// (1024 x 128) @ (128 x 65536), 256 x 2048 tiles 1.04-1.10x, the gradient shapes 0.94-1.0x; 256
// rows still give 4 tiles where the output is 1024 x 128 (grad_a of a wide product).
constexpr int64_t kMmRowBlock = 256;
constexpr int64_t kMmColBlock = 2048;
// An output of few rows gets narrower tiles, down to kMmMinColBlock columns, up to kMmMinTiles
// tiles in all, so that the cores still share it (100 x 2048: 8 tiles of 256 columns, not one).
constexpr int64_t kMmMinColBlock = 256;
constexpr int64_t kMmMinTiles = 8;
constexpr int64_t kMmColQuantum = 16;  // tile columns start 64-byte aligned (fp32) in the output
// An output of still fewer tiles (narrow: the gradient of x, N x D, of a wide product; or small:
// a 128 x 128 similarity matrix) gets more row tiles, down to kMmMinRowBlock rows, up to
// kMmMinTiles tiles, once the product has kMmSplitWork multiply-adds (~20 us on one core): one
// core would otherwise do all of it.
constexpr int64_t kMmMinRowBlock = 32;
constexpr int64_t kMmSplitWork = int64_t{1} << 20;

struct Tiling {
  int64_t rows, cols;              // per tile (the last row / column of tiles may have fewer)
  int64_t row_blocks, col_blocks;  // tiles down and across
};

// The tiles of an n x m output of depth d, from the shape alone; the blocks of each dimension as
// even as the quantum allows (300 rows: 150 + 150, not 256 + 44), so the threads' shares are
// balanced.
Tiling tiling(int64_t n, int64_t m, int64_t d) {
  Tiling t{};
  t.row_blocks = ceil_div(n, kMmRowBlock);
  const int64_t wanted = std::max(ceil_div(m, kMmColBlock),
                                  std::min(ceil_div(kMmMinTiles, t.row_blocks), ceil_div(m, kMmMinColBlock)));
  t.cols = ceil_div(ceil_div(m, wanted), kMmColQuantum) * kMmColQuantum;
  t.col_blocks = ceil_div(m, t.cols);
  if (t.row_blocks * t.col_blocks < kMmMinTiles && n * m * d >= kMmSplitWork) {
    t.row_blocks = std::max(t.row_blocks, std::min(ceil_div(kMmMinTiles, t.col_blocks), ceil_div(n, kMmMinRowBlock)));
  }
  t.rows = ceil_div(n, t.row_blocks);
  t.row_blocks = ceil_div(n, t.rows);
  return t;
}

// Writes a @ b.T into out (checked by the callers), tile by tile.
void fill_fixed_mm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t n = a.size(0), m = b.size(0);
  if (n == 0 || m == 0) return;
  const Tiling tl = tiling(n, m, a.size(1));
  if (tl.row_blocks * tl.col_blocks == 1) {  // one tile, on this thread: parallel_blocks' guards only
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlasGuard serial_blas;
    at::mm_out(out, a, b.t());
    return;
  }
  parallel_blocks(tl.row_blocks * tl.col_blocks, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / tl.col_blocks * tl.rows, c0 = t % tl.col_blocks * tl.cols;
      const int64_t rows = std::min(tl.rows, n - r0), cols = std::min(tl.cols, m - c0);
      at::Tensor tile = out.narrow(0, r0, rows).narrow(1, c0, cols);
      at::mm_out(tile, a.narrow(0, r0, rows), b.narrow(0, c0, cols).t());
    }
  });
}

at::Tensor fixed_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_fixed_mm_args(a, b);
  check_cpu_dtype(a, "a");
  auto out = at::empty({a.size(0), b.size(0)}, a.options());
  fill_fixed_mm(a, b, out);
  return out;
}

void fixed_mm_into_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  check_fixed_mm_out(a, b, out);
  check_cpu_dtype(a, "a");
  fill_fixed_mm(a, b, out);
}

// torch's _euclidean_dist with the product through fill_fixed_mm (the same operands, so the same
// rounding structure as torch.cdist's product form).
at::Tensor fixed_cdist_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_fixed_mm_args(a, b);
  check_cpu_dtype(a, "a");
  const at::Tensor a_ = at::cat({a * -2, a.pow(2).sum(-1, true), at::ones({a.size(0), 1}, a.options())}, -1);
  const at::Tensor b_ = at::cat({b, at::ones({b.size(0), 1}, b.options()), b.pow(2).sum(-1, true)}, -1);
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  fill_fixed_mm(a_, b_, out);
  return out.clamp_min_(0).sqrt_();
}

// torch's _euclidean_dist_backward: ratio = grad / dist (0 where dist is 0), grad_a = a * rowsum
// - ratio @ b, grad_b = b * colsum - ratio.T @ a, the products through fill_fixed_mm.
std::tuple<at::Tensor, at::Tensor> fixed_cdist_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& b, const at::Tensor& dist) {
  check_fixed_mm_args(a, b);
  check_cpu_dtype(a, "a");
  TORCH_CHECK(grad.sizes() == dist.sizes() && dist.dim() == 2 && dist.size(0) == a.size(0) &&
                  dist.size(1) == b.size(0),
              "dmlkern: fixed_cdist_backward: grad and dist must be (N, M) = (", a.size(0), ", ", b.size(0),
              "), got ", grad.sizes(), " and ", dist.sizes());
  const at::Tensor ratio = (grad / dist).masked_fill_(dist == 0, 0);
  at::Tensor ratio_b = at::empty({a.size(0), a.size(1)}, a.options());
  fill_fixed_mm(ratio, b.t(), ratio_b);
  at::Tensor ratio_t_a = at::empty({b.size(0), b.size(1)}, b.options());
  fill_fixed_mm(ratio.t(), a.t(), ratio_t_a);
  return {a * ratio.sum(1, true) - ratio_b, b * ratio.sum(0).unsqueeze(1) - ratio_t_a};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("fixed_mm", &fixed_mm_cpu);
  m.impl("fixed_mm_into", &fixed_mm_into_cpu);
  m.impl("fixed_cdist", &fixed_cdist_cpu);
  m.impl("fixed_cdist_backward", &fixed_cdist_backward_cpu);
}

}  // namespace dmlkern
