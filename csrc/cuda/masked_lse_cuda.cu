// CUDA masked log-sum-exp, the C++ twin of the Triton kernel (dmlkern/triton).
// A block owns kTileRows rows; it walks column tiles of kTileCols, staging
// kTileK-wide slices of x and y in shared memory. Each lane owns one column of
// the tile for its warp's rows and keeps online statistics, merged across the
// warp at the end. The pair maths is pair_engine.h, shared with the CPU build.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../pair_engine.h"

namespace dmlkern {
namespace {

constexpr int kTileRows = 32;  // rows of the "own" side per block
constexpr int kTileCols = 32;  // one column per lane
constexpr int kTileK = 32;     // reduction slice staged in shared memory
constexpr int kWarps = 8;
constexpr int kRowsPerWarp = kTileRows / kWarps;
static_assert(kTileRows == kTileCols, "tile_dots stages both sides with one loop");

template <typename acc_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Accumulates acc[r] = <own[a0 + warp*kRowsPerWarp + r], other[c0 + lane]> for one tile.
template <typename scalar_t, typename acc_t>
__device__ void tile_dots(const scalar_t* __restrict__ own, int64_t own_stride, int64_t n_own,
                          const scalar_t* __restrict__ other, int64_t other_stride, int64_t n_other,
                          int64_t own_dstride, int64_t other_dstride, int64_t d, int64_t a0,
                          int64_t c0, acc_t (&own_s)[kTileRows][kTileK + 1],
                          acc_t (&other_s)[kTileCols][kTileK + 1], acc_t (&acc)[kRowsPerWarp]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTileRows * kTileK; idx += blockDim.x) {
      const int r = idx / kTileK, k = idx % kTileK;
      const int64_t a = a0 + r, kk = k0 + k;
      own_s[r][k] = (a < n_own && kk < d) ? acc_t(own[a * own_stride + kk * own_dstride]) : acc_t(0);
      const int64_t c = c0 + r;
      other_s[r][k] =
          (c < n_other && kk < d) ? acc_t(other[c * other_stride + kk * other_dstride]) : acc_t(0);
    }
    __syncthreads();
    for (int k = 0; k < kTileK; ++k) {
      const acc_t o = other_s[lane][k];
      for (int r = 0; r < kRowsPerWarp; ++r) acc[r] += own_s[warp * kRowsPerWarp + r][k] * o;
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void masked_lse_fwd_kernel(const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1,
                                      const scalar_t* __restrict__ y, int64_t ys0, int64_t ys1,
                                      const int64_t* __restrict__ xlab,
                                      const int64_t* __restrict__ ylab, int64_t n, int64_t m,
                                      int64_t d, typename AccOf<scalar_t>::type scale,
                                      int64_t mask_mode, bool exclude_diag,
                                      typename AccOf<scalar_t>::type* __restrict__ lse) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t xs[kTileRows][kTileK + 1];
  __shared__ acc_t ys[kTileCols][kTileK + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  OnlineLSE<acc_t> stats[kRowsPerWarp];
  acc_t acc[kRowsPerWarp];
  for (int64_t c0 = 0; c0 < m; c0 += kTileCols) {
    tile_dots<scalar_t, acc_t>(x, xs0, n, y, ys0, m, xs1, ys1, d, r0, c0, xs, ys, acc);
    const int64_t j = c0 + lane;
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = r0 + warp * kRowsPerWarp + r;
      if (i < n && j < m && pair_kept(mask_mode, xlab[i], ylab[j], i, j, exclude_diag))
        stats[r].push(scale * acc[r]);
    }
  }
  for (int r = 0; r < kRowsPerWarp; ++r) {
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t om = __shfl_xor_sync(0xffffffff, stats[r].m, offset);
      const acc_t os = __shfl_xor_sync(0xffffffff, stats[r].s, offset);
      stats[r].merge(om, os);
    }
    const int64_t i = r0 + warp * kRowsPerWarp + r;
    if (lane == 0 && i < n) lse[i] = stats[r].value();
  }
}

// grad_own[a] = sum_b w(a, b) other[b]. The block owns kTileRows `own` rows and
// is their only writer (deterministic, no atomics). own_is_x picks whether the
// pair (i, j) is (a, b) (grad_x) or (b, a) (grad_y).
template <typename scalar_t>
__global__ void masked_lse_grad_kernel(
    const scalar_t* __restrict__ own, int64_t os0, int64_t os1, int64_t n_own,
    const scalar_t* __restrict__ other, int64_t ts0, int64_t ts1, int64_t n_other, int64_t d,
    bool own_is_x, const int64_t* __restrict__ xlab, const int64_t* __restrict__ ylab,
    const typename AccOf<scalar_t>::type* __restrict__ grad_lse,
    const typename AccOf<scalar_t>::type* __restrict__ lse, typename AccOf<scalar_t>::type scale,
    int64_t mask_mode, bool exclude_diag, typename AccOf<scalar_t>::type* __restrict__ grad_own) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t own_s[kTileRows][kTileK + 1];
  __shared__ acc_t other_s[kTileCols][kTileK + 1];
  __shared__ acc_t w_s[kTileRows][kTileCols + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  acc_t acc[kRowsPerWarp];
  for (int64_t c0 = 0; c0 < n_other; c0 += kTileCols) {
    tile_dots<scalar_t, acc_t>(own, os0, n_own, other, ts0, n_other, os1, ts1, d, a0, c0, own_s,
                               other_s, acc);
    const int64_t b = c0 + lane;
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t a = a0 + warp * kRowsPerWarp + r;
      acc_t w = acc_t(0);
      if (a < n_own && b < n_other) {
        const int64_t i = own_is_x ? a : b, j = own_is_x ? b : a;
        const bool kept = pair_kept(mask_mode, xlab[i], ylab[j], i, j, exclude_diag);
        w = lse_pair_grad<acc_t>(grad_lse[i], lse[i], scale * acc[r], kept, scale);
      }
      w_s[warp * kRowsPerWarp + r][lane] = w;
    }
    __syncthreads();
    // grad_own[a0 + r, k] += sum_c w_s[r][c] * other[c0 + c, k], one k per lane.
    for (int64_t k0 = 0; k0 < d; k0 += 32) {
      const int64_t k = k0 + lane;
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int rr = warp * kRowsPerWarp + r;
        const int64_t a = a0 + rr;
        if (a >= n_own || k >= d) continue;
        acc_t sum = acc_t(0);
        for (int c = 0; c < kTileCols && c0 + c < n_other; ++c)
          sum += w_s[rr][c] * acc_t(other[(c0 + c) * ts0 + k * ts1]);
        grad_own[a * d + k] += sum;
      }
    }
    __syncthreads();
  }
}

int64_t num_blocks(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

at::Tensor masked_lse_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                           const at::Tensor& y_labels, double scale, int64_t mask_mode,
                           bool exclude_diag) {
  check_pair_inputs(x, y, x_labels, y_labels, mask_mode);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  auto lse = at::empty({n}, x.options().dtype(stats_dtype(x.scalar_type())));
  if (n == 0) return lse;
  auto xl = x_labels.contiguous();
  auto yl = y_labels.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_lse_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    masked_lse_fwd_kernel<scalar_t><<<num_blocks(n), kWarps * 32, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), y.data_ptr<scalar_t>(), y.stride(0),
        y.stride(1), xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(), n, m, d,
        static_cast<acc_t>(scale), mask_mode, exclude_diag, lse.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor> masked_lse_backward_cuda(
    const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& x_labels, const at::Tensor& y_labels, const at::Tensor& lse, double scale,
    int64_t mask_mode, bool exclude_diag) {
  check_pair_inputs(x, y, x_labels, y_labels, mask_mode);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const auto acc_type = stats_dtype(x.scalar_type());
  auto grad_x = at::zeros({n, d}, x.options().dtype(acc_type));
  auto grad_y = at::zeros({m, d}, y.options().dtype(acc_type));
  if (n > 0 && m > 0) {
    auto xl = x_labels.contiguous();
    auto yl = y_labels.contiguous();
    auto g = grad_lse.to(acc_type).contiguous();
    auto l = lse.to(acc_type).contiguous();
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_lse_bwd_cuda", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      const auto s = static_cast<acc_t>(scale);
      masked_lse_grad_kernel<scalar_t><<<num_blocks(n), kWarps * 32, 0, stream>>>(
          x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), n, y.data_ptr<scalar_t>(), y.stride(0),
          y.stride(1), m, d, true, xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(),
          g.data_ptr<acc_t>(), l.data_ptr<acc_t>(), s, mask_mode, exclude_diag,
          grad_x.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      masked_lse_grad_kernel<scalar_t><<<num_blocks(m), kWarps * 32, 0, stream>>>(
          y.data_ptr<scalar_t>(), y.stride(0), y.stride(1), m, x.data_ptr<scalar_t>(), x.stride(0),
          x.stride(1), n, d, false, xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(),
          g.data_ptr<acc_t>(), l.data_ptr<acc_t>(), s, mask_mode, exclude_diag,
          grad_y.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CUDA, m) {
  m.impl("masked_lse", &masked_lse_cuda);
  m.impl("masked_lse_backward", &masked_lse_backward_cuda);
}

}  // namespace dmlkern
