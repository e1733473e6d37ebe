// dmlkern::triplet_slot_rows on CUDA: the row sweep of the fused TripletMarginLoss for the C++
// backend on a GPU (dmlkern/fused/triplet.py, `_direct_rows`; the Triton backend runs
// triton/triplet_rows.py instead). Three launches, a thread each per
//   (row, slot, chunk): slot_chunk, one positive against a chunk of the row's columns;
//   row: row_totals, the row's partials added in order;
//   (row, column): negative_grad, the column's dL/ds over the row's positives (with grad only).
// Each output has one writer and a fixed order of additions: no atomics, deterministic. The
// bodies are csrc/triplet_slots.h, which the CPU build runs in loops (the tests' twin).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../triplet_slots_host.h"
#include "launch.h"

namespace dmlkern {

namespace {

using namespace triplet_slots;

template <typename T>
__global__ void slot_chunk_kernel(const T* __restrict__ s, const int64_t* __restrict__ slots,
                                  const int64_t* __restrict__ row_labels, const int64_t* __restrict__ col_labels,
                                  int64_t rows, int64_t cols, int64_t num_slots, int64_t chunks, int64_t chunk,
                                  Rule<T> rule, SlotPartial<T>* __restrict__ parts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * num_slots * chunks) return;
  const int64_t c = i % chunks, rk = i / chunks, r = rk / num_slots;
  const int64_t c0 = min(c * chunk, cols), c1 = min(c0 + chunk, cols);
  const int64_t p = slot_column(slots + r * num_slots, rk % num_slots, cols);
  parts[i] = slot_chunk(s, rows, cols, r, col_labels, row_labels[r], p, c0, c1, rule);
}

template <typename T>
__global__ void row_totals_kernel(const SlotPartial<T>* __restrict__ parts, int64_t rows, int64_t num_slots,
                                  int64_t chunks, T* sums, int64_t* counts, T* grad_pos) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) row_totals(parts, r, num_slots, chunks, sums, counts, grad_pos);
}

template <typename T>
__global__ void negative_grad_kernel(const T* __restrict__ s, const int64_t* __restrict__ slots,
                                     const int64_t* __restrict__ row_labels, const int64_t* __restrict__ col_labels,
                                     int64_t rows, int64_t cols, int64_t num_slots, Rule<T> rule, T* __restrict__ g) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, j = i % cols;
  g[i] = negative_grad(s, rows, r, slots + r * num_slots, num_slots, col_labels, row_labels[r], j, cols, rule);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_slot_rows_cuda(
    const at::Tensor& s_in, const at::Tensor& slots_in, const at::Tensor& row_labels_in,
    const at::Tensor& col_labels_in, at::ArrayRef<double> params, at::IntArrayRef flags, bool with_grad) {
  check_args(s_in, slots_in, row_labels_in, col_labels_in, params, flags);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const at::Tensor s = s_in.contiguous(), slots = slots_in.contiguous();
  const at::Tensor rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const Outputs out = make_outputs(s, slots.size(1), with_grad);
  const int64_t rows = s.size(0), cols = s.size(1), num_slots = slots.size(1), chunks = out.chunks;
  const int64_t chunk = (cols + chunks - 1) / chunks;
  if (rows == 0) return {out.sums, out.counts, out.grad_s, out.grad_pos};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "triplet_slot_rows_cuda", [&] {
    const Rule<scalar_t> rule = make_rule<scalar_t>(params, flags);
    SlotPartial<scalar_t>* parts = parts_of<scalar_t>(out);
    const int64_t n_parts = rows * num_slots * chunks;
    if (n_parts > 0) {
      slot_chunk_kernel<scalar_t><<<item_blocks(n_parts), kItemThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), rows,
          cols, num_slots, chunks, chunk, rule, parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    row_totals_kernel<scalar_t><<<item_blocks(rows), kItemThreads, 0, stream>>>(
        parts, rows, num_slots, chunks, out.sums.data_ptr<scalar_t>(), out.counts.data_ptr<int64_t>(),
        out.grad_pos.numel() > 0 ? out.grad_pos.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (with_grad && cols > 0) {
      negative_grad_kernel<scalar_t><<<item_blocks(rows * cols), kItemThreads, 0, stream>>>(
          s.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), rows,
          cols, num_slots, rule, out.grad_s.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out.sums, out.counts, out.grad_s, out.grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CUDA, m) {
  m.impl("triplet_slot_rows", &triplet_slot_rows_cuda);
}

}  // namespace dmlkern
