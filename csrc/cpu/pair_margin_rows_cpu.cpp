// dmlkern::pair_margin_rows on the CPU: the CUDA kernels' per-thread bodies (pair_margin_rows.h)
// run in loops, one iteration per GPU thread, so the tests check the CUDA maths without a GPU.
// The fused loss runs its torch sweep on the CPU (fused/pair_margin_contrastive.py); this
// implementation is the CUDA one's twin. Every output has one writer: bits independent of the
// thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../pair_margin_rows_host.h"

namespace dmlkern {

namespace {

using namespace pair_margin_rows;

template <typename T>
void run(const at::Tensor& s, const at::Tensor& row_labels, const at::Tensor& col_labels, int64_t row0,
         bool exclude_diag, const Rule<T>& rule, const std::optional<at::Tensor>& coef, const Outputs& out) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const T* sp = s.data_ptr<T>();
  const int64_t* rl = row_labels.data_ptr<int64_t>();
  const int64_t* cl = col_labels.data_ptr<int64_t>();
  if (coef.has_value()) {  // pair_grad: one (row, column) an iteration
    const at::Tensor c = coef->cpu();
    const T coef_pos = c.data_ptr<T>()[0], coef_neg = c.data_ptr<T>()[1];
    T* g = out.grad_s.data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t self_col = exclude_diag ? row0 + r : -1;
        for (int64_t j = 0; j < cols; ++j)
          g[r * cols + j] = pair_grad(sp[r * cols + j], cl[j] == rl[r], j == self_col, rule, coef_pos, coef_neg);
      }
    });
    return;
  }
  const int64_t chunks = chunks_per_row(cols);
  const at::Tensor scratch = make_parts<T>(s, chunks);
  PairPartial<T>* parts = reinterpret_cast<PairPartial<T>*>(scratch.data_ptr<uint8_t>());
  PairPartial<T>* row_parts = parts + rows * chunks;
  at::parallel_for(0, rows * chunks, 16, [&](int64_t i0, int64_t i1) {  // pair_chunk: one (row, chunk)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / chunks, c0 = std::min((i % chunks) * kChunkColumns, cols);
      parts[i] = pair_chunk(sp + r * cols, cl, rl[r], exclude_diag ? row0 + r : -1, c0,
                            std::min(c0 + kChunkColumns, cols), rule);
    }
  });
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {  // a row's chunks, in order
    for (int64_t r = r0; r < r1; ++r) row_parts[r] = merge_parts(parts + r * chunks, chunks);
  });
  write_totals(merge_parts(row_parts, rows), out.sums.data_ptr<T>(), out.counts.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_margin_rows_cpu(
    const at::Tensor& s_in, const at::Tensor& row_labels_in, const at::Tensor& col_labels_in, int64_t row0,
    bool exclude_diag, at::ArrayRef<double> params, at::IntArrayRef flags, const std::optional<at::Tensor>& coef) {
  check_args(s_in, row_labels_in, col_labels_in, row0, params, flags, coef);
  const at::Tensor s = s_in.contiguous(), rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const Outputs out = make_outputs(s, coef.has_value());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pair_margin_rows", [&] {
    run<scalar_t>(s, rl, cl, row0, exclude_diag, make_rule<scalar_t>(params, flags), coef, out);
  });
  return {out.sums, out.counts, out.grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pair_margin_rows", &pair_margin_rows_cpu);
}

}  // namespace dmlkern
