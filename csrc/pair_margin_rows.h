// dmlkern::pair_margin_rows: the per-thread bodies of the CUDA C++ kernel for ContrastiveLoss on a
// PairMarginMiner's pairs (csrc/cuda/pair_margin_rows_cuda.cu), host-device functions so that the
// CPU build runs the very same bodies in loops (csrc/cpu/pair_margin_rows_cpu.cpp) and the tests
// check them without a GPU.
//
// One row block of unit-row similarities s (B, M). The miner's value w and the loss's value v are
// each d = sqrt(max(2 - 2s, 0)) or s. The miner keeps the positive pairs (same label, not the self
// pair) with w > its pos_margin and the negative pairs with w < its neg_margin (a similarity: w <
// pos_margin, w > neg_margin); the loss's terms are relu(v - pos_margin) and relu(neg_margin - v)
// (a similarity: relu(pos_margin - v), relu(v - neg_margin)). Bodies, each one GPU thread's work
// with one writer per output (no atomics, a fixed order of additions):
//   pair_chunk:  a chunk of one row's columns: each side's sum of terms, terms > 0 and kept pairs;
//   merge_parts: partials added in order (a row's chunks, then the block's rows);
//   pair_grad:   dL/ds of one pair: coef[side] where its kept term is > 0, times dv/ds.
// The formulas are fused/pair_margin_contrastive.py's torch sweep and triton/pair_margin_rows.py's.
#pragma once

#include <cstdint>

#include "pair_engine.h"  // DMLK_HD, sqrt_

namespace dmlkern {
namespace pair_margin_rows {

template <typename T>
struct Rule {
  T pos_margin, neg_margin;              // the loss's
  T miner_pos_margin, miner_neg_margin;  // the miner's
  bool loss_euclidean, miner_euclidean;  // v, w = d (else s)
};

template <typename T>
struct PairPartial {
  T sum[2];         // positive side, negative side: the kept pairs' terms
  int64_t live[2];  // the kept terms > 0
  int64_t kept[2];  // the kept pairs
};

// The side that keeps pair (row, col) (0 positive, 1 negative, -1 neither) and its term.
template <typename T>
DMLK_HD int pair_side(T s, bool same, bool self, const Rule<T>& rule, T& term, T& d) {
  const T inner = T(2) - T(2) * s;
  d = sqrt_(inner < T(0) ? T(0) : inner);
  const T w = rule.miner_euclidean ? d : s;
  const T v = rule.loss_euclidean ? d : s;
  if (same) {
    if (self || !(rule.miner_euclidean ? w > rule.miner_pos_margin : w < rule.miner_pos_margin)) return -1;
    const T t = rule.loss_euclidean ? v - rule.pos_margin : rule.pos_margin - v;
    term = t > T(0) ? t : T(0);
    return 0;
  }
  if (!(rule.miner_euclidean ? w < rule.miner_neg_margin : w > rule.miner_neg_margin)) return -1;
  const T t = rule.loss_euclidean ? rule.neg_margin - v : v - rule.neg_margin;
  term = t > T(0) ? t : T(0);
  return 1;
}

// Columns [c0, c1) of a row (s_row, its label; self_col the column of its own pair, or -1). (Each
// side's sums in scalars: a run-time index into PairPartial's arrays would put them in local
// memory on a GPU.)
template <typename T>
DMLK_HD PairPartial<T> pair_chunk(const T* s_row, const int64_t* col_labels, int64_t label, int64_t self_col,
                                  int64_t c0, int64_t c1, const Rule<T>& rule) {
  T pos_sum = T(0), neg_sum = T(0);
  int64_t pos_live = 0, neg_live = 0, pos_kept = 0, neg_kept = 0;
  for (int64_t j = c0; j < c1; ++j) {
    T term = T(0), d = T(0);
    const int side = pair_side(s_row[j], col_labels[j] == label, j == self_col, rule, term, d);
    const int64_t live = term > T(0) ? 1 : 0;
    if (side == 0) {
      pos_sum += term;
      pos_live += live;
      pos_kept += 1;
    } else if (side == 1) {
      neg_sum += term;
      neg_live += live;
      neg_kept += 1;
    }
  }
  return {{pos_sum, neg_sum}, {pos_live, neg_live}, {pos_kept, neg_kept}};
}

// parts[0] + ... + parts[n - 1], in order.
template <typename T>
DMLK_HD PairPartial<T> merge_parts(const PairPartial<T>* parts, int64_t n) {
  PairPartial<T> out{{T(0), T(0)}, {0, 0}, {0, 0}};
  for (int64_t k = 0; k < n; ++k) {
    const PairPartial<T>& p = parts[k];
    out.sum[0] += p.sum[0];
    out.sum[1] += p.sum[1];
    out.live[0] += p.live[0];
    out.live[1] += p.live[1];
    out.kept[0] += p.kept[0];
    out.kept[1] += p.kept[1];
  }
  return out;
}

// The block's totals into the outputs.
template <typename T>
DMLK_HD void write_totals(const PairPartial<T>& total, T* sums, int64_t* counts) {
  sums[0] = total.sum[0];
  sums[1] = total.sum[1];
  counts[0] = total.live[0];
  counts[1] = total.live[1];
  counts[2] = total.kept[0];
  counts[3] = total.kept[1];
}

// dL/ds of pair (row, col): coef_pos / coef_neg (the upstream slopes of the sides' terms, signed
// for v) where its kept term is > 0, times dv/ds = -1/d for a Euclidean loss (0 at d = 0).
template <typename T>
DMLK_HD T pair_grad(T s, bool same, bool self, const Rule<T>& rule, T coef_pos, T coef_neg) {
  T term = T(0), d = T(0);
  const int side = pair_side(s, same, self, rule, term, d);
  if (side < 0 || !(term > T(0))) return T(0);
  const T g = side == 0 ? coef_pos : coef_neg;
  if (!rule.loss_euclidean) return g;
  return d == T(0) ? T(0) : -g / d;
}

// Chunks per row: 1024 columns each (a thread per (row, chunk) to fill a GPU).
constexpr int64_t kChunkColumns = 1024;

inline int64_t chunks_per_row(int64_t cols) {
  const int64_t chunks = (cols + kChunkColumns - 1) / kChunkColumns;
  return chunks < 1 ? 1 : chunks;
}

}  // namespace pair_margin_rows
}  // namespace dmlkern
