// dmlkern::pair_margin_rows on the CPU: the CUDA kernels' per-thread bodies (pair_margin_rows.h)
// run in loops, one iteration per GPU thread, so the tests check the CUDA maths without a GPU (the
// fused loss's backward on the CPU also runs it when it recomputes blocks). dmlkern::pair_margin_live:
// the fused loss's CPU forward, the same pair_side per pair, rows in parallel, listing the live
// pairs for the backward. Every output has one writer: bits independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

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

// pair_margin_live's rows: groups of kGroupRows, each one iteration with its own list, so that the
// lists come out in row order whatever the thread count.
constexpr int64_t kGroupRows = 16;

// One row: its partial (row_part) and, with list_live, its live pairs (kept, term > 0: the only
// ones with a gradient) appended as (column, side). A pair outside [t_pos, t_neg] on s (a necessary condition
// of the miner's window, from the caller) is passed over before pair_side's exact test on w.
template <typename T>
void live_row(const T* s_row, const int64_t* cl, int64_t label, int64_t self_col, int64_t cols, const Rule<T>& rule,
              T t_pos, T t_neg, bool list_live, PairPartial<T>& row_part, std::vector<int64_t>& live_cols,
              std::vector<int8_t>& live_sides) {
  T pos_sum = T(0), neg_sum = T(0);
  int64_t pos_live = 0, neg_live = 0, pos_kept = 0, neg_kept = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const T s = s_row[j];
    const bool same = cl[j] == label;
    if (same ? !(s < t_pos) : !(s > t_neg)) continue;
    T term = T(0), d = T(0);
    const int side = pair_side(s, same, j == self_col, rule, term, d);
    if (side < 0) continue;
    const bool live = term > T(0);
    if (side == 0) {
      pos_sum += term;
      pos_live += live;
      pos_kept += 1;
    } else {
      neg_sum += term;
      neg_live += live;
      neg_kept += 1;
    }
    if (live && list_live) {
      live_cols.push_back(j);
      live_sides.push_back(static_cast<int8_t>(side));
    }
  }
  row_part = {{pos_sum, neg_sum}, {pos_live, neg_live}, {pos_kept, neg_kept}};
}

// The CPU forward of the fused loss (fused/pair_margin_contrastive.py): pair_margin_rows' totals
// and, with list_live, the block's live pairs in row order, (L, 2) int64 (row in the block, column)
// and (L,) int8 sides, for the backward to gather rows from (else L = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_margin_live_cpu(
    const at::Tensor& s_in, const at::Tensor& row_labels_in, const at::Tensor& col_labels_in, int64_t row0,
    bool exclude_diag, at::ArrayRef<double> params, at::IntArrayRef flags, at::ArrayRef<double> thresholds,
    bool list_live) {
  check_args(s_in, row_labels_in, col_labels_in, row0, params, flags, std::nullopt);
  TORCH_CHECK(thresholds.size() == 2, "pair_margin_live: thresholds must be [t_pos, t_neg]");
  const at::Tensor s = s_in.contiguous(), rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const Outputs out = make_outputs(s, false);
  const int64_t rows = s.size(0), cols = s.size(1), groups = (rows + kGroupRows - 1) / kGroupRows;
  std::vector<std::vector<int64_t>> group_cols(groups), group_rows(groups);
  std::vector<std::vector<int8_t>> group_sides(groups);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pair_margin_live", [&] {
    const Rule<scalar_t> rule = make_rule<scalar_t>(params, flags);
    const scalar_t t_pos = static_cast<scalar_t>(thresholds[0]), t_neg = static_cast<scalar_t>(thresholds[1]);
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t* rlp = rl.data_ptr<int64_t>();
    const int64_t* clp = cl.data_ptr<int64_t>();
    std::vector<PairPartial<scalar_t>> row_parts(rows);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t r = g * kGroupRows; r < std::min(rows, (g + 1) * kGroupRows); ++r) {
          live_row(sp + r * cols, clp, rlp[r], exclude_diag ? row0 + r : -1, cols, rule, t_pos, t_neg, list_live,
                   row_parts[r], group_cols[g], group_sides[g]);
          group_rows[g].resize(group_cols[g].size(), r);
        }
      }
    });
    write_totals(merge_parts(row_parts.data(), rows), out.sums.data_ptr<scalar_t>(), out.counts.data_ptr<int64_t>());
  });
  int64_t total = 0;
  for (const auto& c : group_cols) total += static_cast<int64_t>(c.size());
  at::Tensor pairs = s.new_empty({total, 2}, s.options().dtype(at::kLong));
  at::Tensor sides = s.new_empty({total}, s.options().dtype(at::kChar));
  int64_t* pp = pairs.data_ptr<int64_t>();
  int8_t* sp8 = sides.data_ptr<int8_t>();
  for (int64_t g = 0, k = 0; g < groups; ++g) {
    for (size_t q = 0; q < group_cols[g].size(); ++q, ++k) {
      pp[2 * k] = group_rows[g][q];
      pp[2 * k + 1] = group_cols[g][q];
      sp8[k] = group_sides[g][q];
    }
  }
  return {out.sums, out.counts, pairs, sides};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pair_margin_rows", &pair_margin_rows_cpu);
  m.impl("pair_margin_live", &pair_margin_live_cpu);
}

}  // namespace dmlkern
