// The host side that the CPU and CUDA implementations of dmlkern::pair_margin_rows share: the
// argument checks, the rule and the outputs.
#pragma once
#include <ATen/core/Tensor.h>  // (not ATen.h, every op's header: a quarter of the compile time)

#include <optional>

#include "pair_margin_rows.h"

namespace dmlkern {
namespace pair_margin_rows {

// s (B, M) fp32 / fp64, labels int64 (B,) and (M,), coef (2,) of s's dtype, all on s's device;
// params [pos_margin, neg_margin, miner_pos_margin, miner_neg_margin]; flags [loss_euclidean,
// miner_euclidean].
inline void check_args(const at::Tensor& s, const at::Tensor& row_labels, const at::Tensor& col_labels,
                       int64_t row0, at::ArrayRef<double> params, at::IntArrayRef flags,
                       const std::optional<at::Tensor>& coef) {
  TORCH_CHECK(s.dim() == 2, "pair_margin_rows: s must be 2-D (rows, columns), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "pair_margin_rows: s must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == s.size(0) && row_labels.scalar_type() == at::kLong,
              "pair_margin_rows: row_labels must be int64 of shape (", s.size(0), "), got ", row_labels.sizes(), " ",
              row_labels.scalar_type());
  TORCH_CHECK(col_labels.dim() == 1 && col_labels.size(0) == s.size(1) && col_labels.scalar_type() == at::kLong,
              "pair_margin_rows: col_labels must be int64 of shape (", s.size(1), "), got ", col_labels.sizes(), " ",
              col_labels.scalar_type());
  TORCH_CHECK(row_labels.device() == s.device() && col_labels.device() == s.device(),
              "pair_margin_rows: row_labels and col_labels must be on s's device ", s.device());
  TORCH_CHECK(row0 >= 0, "pair_margin_rows: row0 must be >= 0, got ", row0);
  TORCH_CHECK(params.size() == 4,
              "pair_margin_rows: params must be [pos_margin, neg_margin, miner_pos_margin, miner_neg_margin]");
  TORCH_CHECK(flags.size() == 2, "pair_margin_rows: flags must be [loss_euclidean, miner_euclidean]");
  if (coef.has_value()) {
    TORCH_CHECK(coef->dim() == 1 && coef->size(0) == 2 && coef->scalar_type() == s.scalar_type() &&
                    coef->device() == s.device(),
                "pair_margin_rows: coef must be a (2,) tensor of s's dtype and device, got ", coef->sizes(), " ",
                coef->scalar_type(), " on ", coef->device());
  }
}

template <typename T>
Rule<T> make_rule(at::ArrayRef<double> params, at::IntArrayRef flags) {
  return {static_cast<T>(params[0]), static_cast<T>(params[1]), static_cast<T>(params[2]),
          static_cast<T>(params[3]), flags[0] != 0, flags[1] != 0};
}

// The op's outputs: without coef the totals (sums (2,), counts (4,): terms > 0 a side, kept pairs
// a side) and an empty dL/ds; with coef empty totals and dL/ds (B, M).
struct Outputs {
  at::Tensor sums, counts, grad_s;
};

inline Outputs make_outputs(const at::Tensor& s, bool with_grad) {
  const auto longs = s.options().dtype(at::kLong);
  if (with_grad) return {s.new_empty({0}), s.new_empty({0}, longs), s.new_empty(s.sizes())};
  return {s.new_empty({2}), s.new_empty({4}, longs), s.new_empty({0, 0})};
}

// The partials' scratch: rows x chunks, then one per row (PairPartial<T>, as bytes).
template <typename T>
at::Tensor make_parts(const at::Tensor& s, int64_t chunks) {
  return s.new_empty({(s.size(0) * chunks + s.size(0)) * static_cast<int64_t>(sizeof(PairPartial<T>))},
                     s.options().dtype(at::kByte));
}

}  // namespace pair_margin_rows
}  // namespace dmlkern
