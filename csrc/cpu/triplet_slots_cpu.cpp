// dmlkern::triplet_slot_rows on the CPU: the CUDA kernels' per-thread bodies (triplet_slots.h)
// run in loops, one iteration per GPU thread, so the tests check the CUDA maths without a GPU.
// The fused loss runs dmlkern::triplet_rows on the CPU (csrc/cpu/triplet_rows_cpu.cpp); this
// implementation is the CUDA one's twin. Every output has one writer: bits independent of the
// thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../triplet_slots_host.h"

namespace dmlkern {

namespace {

using namespace triplet_slots;

template <typename T>
void run(const at::Tensor& s, const at::Tensor& slots, const at::Tensor& row_labels, const at::Tensor& col_labels,
         const Rule<T>& rule, const Outputs& out) {
  const int64_t rows = s.size(0), cols = s.size(1), num_slots = slots.size(1), chunks = out.chunks;
  const T* sp = s.data_ptr<T>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* rl = row_labels.data_ptr<int64_t>();
  const int64_t* cl = col_labels.data_ptr<int64_t>();
  SlotPartial<T>* parts = parts_of<T>(out);
  const int64_t chunk = (cols + chunks - 1) / chunks;
  // slot_chunk: one (row, slot, chunk) an iteration
  at::parallel_for(0, rows * num_slots * chunks, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = i % chunks, rk = i / chunks, r = rk / num_slots;
      const int64_t c0 = std::min(c * chunk, cols), c1 = std::min(c0 + chunk, cols);
      parts[i] = slot_chunk(sp, rows, cols, r, cl, rl[r], slot_column(slot_p + r * num_slots, rk % num_slots, cols),
                            c0, c1, rule);
    }
  });
  T* grad_pos = out.grad_pos.numel() > 0 ? out.grad_pos.data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      row_totals(parts, r, num_slots, chunks, out.sums.data_ptr<T>(), out.counts.data_ptr<int64_t>(), grad_pos);
  });
  if (out.grad_s.numel() == 0) return;
  T* g = out.grad_s.data_ptr<T>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < cols; ++j)
        g[r * cols + j] = negative_grad(sp, rows, r, slot_p + r * num_slots, num_slots, cl, rl[r], j, cols, rule);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_slot_rows_cpu(
    const at::Tensor& s_in, const at::Tensor& slots_in, const at::Tensor& row_labels_in,
    const at::Tensor& col_labels_in, at::ArrayRef<double> params, at::IntArrayRef flags, bool with_grad) {
  check_args(s_in, slots_in, row_labels_in, col_labels_in, params, flags);
  const at::Tensor s = s_in.contiguous(), slots = slots_in.contiguous();
  const at::Tensor rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const Outputs out = make_outputs(s, slots.size(1), with_grad);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "triplet_slot_rows", [&] {
    run<scalar_t>(s, slots, rl, cl, make_rule<scalar_t>(params, flags), out);
  });
  return {out.sums, out.counts, out.grad_s, out.grad_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("triplet_slot_rows", &triplet_slot_rows_cpu);
}

}  // namespace dmlkern
