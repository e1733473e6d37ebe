// The host side that the CPU and CUDA implementations of dmlkern::triplet_slot_rows share: the
// argument checks, the rule, and the outputs with the (slot, chunk) partials' scratch.
#pragma once
#include <ATen/core/Tensor.h>  // (not ATen.h, every op's header: a quarter of the compile time)

#include "triplet_slots.h"

namespace dmlkern {
namespace triplet_slots {

// dmlkern::triplet_slot_rows (both backends): s (B, M) fp32 / fp64, slots (B, P) int64, labels
// int64 (B,) and (M,), all on s's device; params [margin, window_margin]; flags [smooth,
// euclidean, window, swap, row0] with window in [0, 4] (with swap the block's rows are columns
// row0 .. row0 + B of the batch against itself).
inline void check_args(const at::Tensor& s, const at::Tensor& slots, const at::Tensor& row_labels,
                       const at::Tensor& col_labels, at::ArrayRef<double> params, at::IntArrayRef flags) {
  TORCH_CHECK(s.dim() == 2, "triplet_slot_rows: s must be 2-D (rows, columns), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "triplet_slot_rows: s must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == s.size(0) && slots.scalar_type() == at::kLong,
              "triplet_slot_rows: slots must be int64 of shape (", s.size(0), ", P), got ", slots.sizes(), " ",
              slots.scalar_type());
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == s.size(0) && row_labels.scalar_type() == at::kLong,
              "triplet_slot_rows: row_labels must be int64 of shape (", s.size(0), "), got ", row_labels.sizes(), " ",
              row_labels.scalar_type());
  TORCH_CHECK(col_labels.dim() == 1 && col_labels.size(0) == s.size(1) && col_labels.scalar_type() == at::kLong,
              "triplet_slot_rows: col_labels must be int64 of shape (", s.size(1), "), got ", col_labels.sizes(), " ",
              col_labels.scalar_type());
  TORCH_CHECK(slots.device() == s.device() && row_labels.device() == s.device() && col_labels.device() == s.device(),
              "triplet_slot_rows: slots, row_labels and col_labels must be on s's device ", s.device());
  TORCH_CHECK(params.size() == 2, "triplet_slot_rows: params must be [margin, window_margin]");
  TORCH_CHECK(flags.size() == 5, "triplet_slot_rows: flags must be [smooth, euclidean, window, swap, row0]");
  TORCH_CHECK(flags[2] >= 0 && flags[2] <= 4, "triplet_slot_rows: window must be in [0, 4], got ", flags[2]);
  TORCH_CHECK(flags[3] == 0 || (s.size(0) <= s.size(1) && flags[4] >= 0 && flags[4] + s.size(0) <= s.size(1)),
              "triplet_slot_rows: with swap, row0 + rows must be within the columns (the block is rows row0 .. "
              "row0 + B of the batch against itself), got row0 ", flags[4], ", s ", s.sizes());
}

template <typename T>
Rule<T> make_rule(at::ArrayRef<double> params, at::IntArrayRef flags) {
  return {static_cast<T>(params[0]), static_cast<T>(params[1]), flags[2], flags[0] != 0, flags[1] != 0, flags[3] != 0,
          flags[4]};
}

// The op's outputs and the partials' scratch (rows x slots x chunks SlotPartial<T>, as bytes).
struct Outputs {
  at::Tensor sums, counts, grad_s, grad_pos, parts;
  int64_t chunks;
};

inline Outputs make_outputs(const at::Tensor& s, int64_t num_slots, bool with_grad) {
  const int64_t rows = s.size(0), cols = s.size(1);
  const int64_t chunks = chunks_per_row(rows, num_slots, cols);
  const int64_t part_bytes = s.scalar_type() == at::kDouble ? sizeof(SlotPartial<double>) : sizeof(SlotPartial<float>);
  return {s.new_empty({rows}), s.new_empty({rows, 2}, s.options().dtype(at::kLong)),
          with_grad ? s.new_empty({rows, cols}) : s.new_empty({0, 0}),  // (two tensors: outputs never alias)
          with_grad ? s.new_empty({rows, num_slots}) : s.new_empty({0, 0}),
          s.new_empty({rows * num_slots * chunks * part_bytes}, s.options().dtype(at::kByte)), chunks};
}

template <typename T>
SlotPartial<T>* parts_of(const Outputs& out) {
  return reinterpret_cast<SlotPartial<T>*>(out.parts.data_ptr<uint8_t>());
}

}  // namespace triplet_slots
}  // namespace dmlkern
