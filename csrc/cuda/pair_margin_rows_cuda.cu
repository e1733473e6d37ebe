// dmlkern::pair_margin_rows on CUDA: ContrastiveLoss on a PairMarginMiner's pairs, one row block,
// for the C++ backend on a GPU (dmlkern/fused/pair_margin_contrastive.py; the Triton backend runs
// triton/pair_margin_rows.py instead). The forward is three launches, a thread each per
//   (row, chunk of columns): pair_chunk, each side's sums and counts;
//   row: merge_parts, the row's chunks added in order;
//   block (one thread): the rows added in order;
// the backward one launch, a thread per (row, column): pair_grad. Each output has one writer and
// a fixed order of additions: no atomics, deterministic. The bodies are csrc/pair_margin_rows.h,
// which the CPU build runs in loops (the tests' twin).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../pair_margin_rows_host.h"
#include "launch.h"

namespace dmlkern {

namespace {

using namespace pair_margin_rows;

template <typename T>
__global__ void pair_chunk_kernel(const T* __restrict__ s, const int64_t* __restrict__ row_labels,
                                  const int64_t* __restrict__ col_labels, int64_t rows, int64_t cols, int64_t chunks,
                                  int64_t row0, bool exclude_diag, Rule<T> rule, PairPartial<T>* __restrict__ parts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * chunks) return;
  const int64_t r = i / chunks, c0 = min((i % chunks) * kChunkColumns, cols);
  parts[i] = pair_chunk(s + r * cols, col_labels, row_labels[r], exclude_diag ? row0 + r : -1, c0,
                        min(c0 + kChunkColumns, cols), rule);
}

template <typename T>
__global__ void merge_rows_kernel(const PairPartial<T>* __restrict__ parts, int64_t rows, int64_t chunks,
                                  PairPartial<T>* __restrict__ row_parts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) row_parts[r] = merge_parts(parts + r * chunks, chunks);
}

template <typename T>
__global__ void block_total_kernel(const PairPartial<T>* __restrict__ row_parts, int64_t rows, T* sums,
                                   int64_t* counts) {
  write_totals(merge_parts(row_parts, rows), sums, counts);
}

template <typename T>
__global__ void pair_grad_kernel(const T* __restrict__ s, const int64_t* __restrict__ row_labels,
                                 const int64_t* __restrict__ col_labels, int64_t rows, int64_t cols, int64_t row0,
                                 bool exclude_diag, Rule<T> rule, const T* __restrict__ coef, T* __restrict__ g) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, j = i % cols;
  g[i] = pair_grad(s[i], col_labels[j] == row_labels[r], exclude_diag && j == row0 + r, rule, coef[0], coef[1]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_margin_rows_cuda(
    const at::Tensor& s_in, const at::Tensor& row_labels_in, const at::Tensor& col_labels_in, int64_t row0,
    bool exclude_diag, at::ArrayRef<double> params, at::IntArrayRef flags, const std::optional<at::Tensor>& coef) {
  check_args(s_in, row_labels_in, col_labels_in, row0, params, flags, coef);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = s_in.contiguous(), rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const Outputs out = make_outputs(s, coef.has_value());
  const int64_t rows = s.size(0), cols = s.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pair_margin_rows_cuda", [&] {
    const Rule<scalar_t> rule = make_rule<scalar_t>(params, flags);
    if (coef.has_value()) {
      if (rows * cols == 0) return;
      const at::Tensor c = coef->contiguous();
      pair_grad_kernel<scalar_t><<<item_blocks(rows * cols), kItemThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), rows, cols, row0, exclude_diag,
          rule, c.data_ptr<scalar_t>(), out.grad_s.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t chunks = chunks_per_row(cols);
    const at::Tensor scratch = make_parts<scalar_t>(s, chunks);
    auto* parts = reinterpret_cast<PairPartial<scalar_t>*>(scratch.data_ptr<uint8_t>());
    PairPartial<scalar_t>* row_parts = parts + rows * chunks;
    if (rows > 0) {
      pair_chunk_kernel<scalar_t><<<item_blocks(rows * chunks), kItemThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), rows, cols, chunks, row0,
          exclude_diag, rule, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_rows_kernel<scalar_t><<<item_blocks(rows), kItemThreads, 0, stream>>>(parts, rows, chunks, row_parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    block_total_kernel<scalar_t><<<1, 1, 0, stream>>>(row_parts, rows, out.sums.data_ptr<scalar_t>(),
                                                      out.counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.sums, out.counts, out.grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CUDA, m) {
  m.impl("pair_margin_rows", &pair_margin_rows_cuda);
}

}  // namespace dmlkern
