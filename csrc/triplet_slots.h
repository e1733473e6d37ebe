// dmlkern::triplet_slot_rows: the per-thread bodies of the CUDA C++ TripletMarginLoss row sweep
// (csrc/cuda/triplet_slots_cuda.cu), host-device functions so that the CPU build runs the very
// same bodies in loops (csrc/cpu/triplet_slots_cpu.cpp) and the tests check them without a GPU.
//
// One row block of similarities s (B, M); row r's positives are listed in slots (B, P) (their
// columns, -1 for none). e is the distance (larger = farther): sqrt(max(2 - 2s, 0)) or -s. For a
// positive p and a negative n (a column of another label) t = e_n - e_p; the triplet is kept
// when the miner's window holds for t and costs relu(margin - t), or F.softplus (threshold 20);
// w is that term's slope on a kept triplet. With swap (PML's `swap`) the term's e_n is
// min(e_n, e_qn), q the positive's own row: the block holds whole classes of the batch against
// itself sorted by label (column row0 + k is the block's row k), and a negative's dL/ds also
// collects its row's role as the positive of the triplets (q, r, n) (the e_rn side's share of
// each min, as torch.minimum's backward: half at a tie). Three bodies, each the work of one GPU thread with
// one writer per output, so no atomics and a fixed order of additions:
//   slot_chunk:    one positive against the columns of one chunk: the kept terms' sum, the kept
//                  non-zero terms, the kept triplets and sum_n w (the chunk's part of the
//                  positive's dL/de);
//   negative_grad: one negative column against the row's positives: dL/ds of that column;
//   row_totals:    one row's chunks and slots added in order.
// The formulas are fused/triplet.py's torch twin (`_term`, `_term_slope`, `_grad_s`) and the
// Triton kernel's (triton/triplet_rows.py); the window ids are fused/triplet.py's WINDOW_IDS.
#pragma once

#include <cstdint>

#include "pair_engine.h"  // DMLK_HD, exp_, sqrt_, log1p_ (host-device maths)

namespace dmlkern {
namespace triplet_slots {

enum Window : int64_t { kEvery = 0, kAll = 1, kHard = 2, kSemihard = 3, kEasy = 4 };

template <typename T>
struct Rule {
  T margin, window_margin;
  int64_t window;
  bool smooth, euclidean, swap;
  int64_t row0;  // with swap: the block's first row of the batch (its column)
};

// e from s: sqrt(max(2 - 2s, 0)) (NaN stays NaN, as torch.clamp's), or -s.
template <typename T>
DMLK_HD T farness(T s, bool euclidean) {
  if (!euclidean) return -s;
  const T inner = T(2) - T(2) * s;
  return sqrt_(inner < T(0) ? T(0) : inner);
}

// The miner's condition on t (PML's comparisons), or every triplet.
template <typename T>
DMLK_HD bool in_window(T t, T wm, int64_t window) {
  switch (window) {
    case kEvery: return true;
    case kHard: return (t <= wm) && (t <= T(0));
    case kSemihard: return (t <= wm) && (t > T(0));
    case kEasy: return t > wm;
    default: return t <= wm;  // kAll
  }
}

// relu(v) (NaN kept, as torch.relu) and its slope 1[v > 0]; or F.softplus(v) (beta 1, threshold
// 20) from exp and log1p, and its slope sigmoid(v).
template <typename T>
struct TermSlope {
  T term, slope;
};

template <typename T>
DMLK_HD TermSlope<T> term_slope(T v, bool smooth) {
  if (!smooth) return {(v > T(0) || v != v) ? v : T(0), v > T(0) ? T(1) : T(0)};
  const T z = exp_(v > T(20) ? T(20) : v);  // (NaN stays NaN)
  return {v > T(20) ? v : log1p_(z), v > T(20) ? T(1) : z / (z + T(1))};
}

// A slot's column, or -1 where there is none (also for a column outside [0, cols): the kernels
// never read past a row).
DMLK_HD int64_t slot_column(const int64_t* slots_row, int64_t k, int64_t cols) {
  const int64_t p = slots_row[k];
  return (p >= 0 && p < cols) ? p : -1;
}

// torch.minimum (NaN if either is NaN) and the share of its gradient that x gets: half at a tie,
// none where x > y (fused/triplet.py's `_min_share`).
template <typename T>
DMLK_HD T min_nan(T x, T y) {
  return y != y ? y : (y < x ? y : x);
}

template <typename T>
DMLK_HD T min_share(T x, T y) {
  return x == y ? T(0.5) : (x > y ? T(0) : T(1));
}

// With swap, the block row that holds positive column p's own distances (column row0 + k is row
// k; clamped, as the torch twin's, so that no read leaves the block).
DMLK_HD int64_t positive_row(int64_t p, int64_t row0, int64_t rows) {
  const int64_t q = p - row0;
  return q < 0 ? 0 : (q >= rows ? rows - 1 : q);
}

template <typename T>
struct SlotPartial {
  T sum;              // the kept terms
  int32_t nonzero;    // kept terms > 0
  int32_t kept;       // kept triplets
  T w;                // the kept terms' slopes: this chunk's part of the positive's dL/de
};

// Positive column p of block row r (of s (rows, cols), its label) against the row's columns [c0, c1).
template <typename T>
DMLK_HD SlotPartial<T> slot_chunk(const T* s, int64_t rows, int64_t cols, int64_t r, const int64_t* col_labels,
                                  int64_t label, int64_t p, int64_t c0, int64_t c1, const Rule<T>& rule) {
  SlotPartial<T> out{T(0), 0, 0, T(0)};
  if (p < 0) return out;
  const T* s_row = s + r * cols;
  const T* q_row = rule.swap ? s + positive_row(p, rule.row0, rows) * cols : nullptr;
  const T ep = farness(s_row[p], rule.euclidean);
  for (int64_t j = c0; j < c1; ++j) {
    if (col_labels[j] == label) continue;
    const T en = farness(s_row[j], rule.euclidean);
    const T t = en - ep;
    if (!in_window(t, rule.window_margin, rule.window)) continue;
    // margin - t = (e_p - e_n) + margin exactly; with swap e_n is min(e_n, e_qn)
    const T viol = rule.swap ? rule.margin - (min_nan(en, farness(q_row[j], rule.euclidean)) - ep) : rule.margin - t;
    const TermSlope<T> ts = term_slope(viol, rule.smooth);
    out.sum += ts.term;
    out.nonzero += ts.term > T(0) ? 1 : 0;
    out.kept += 1;
    out.w += ts.slope;
  }
  return out;
}

// dL/ds of column j of block row r: 0 unless j is a negative; there dL/de_j = -sum over the
// row's positives (slots in order) of the kept triplets' slopes (with swap times e_rj's share of
// min(e_rj, e_qj), and the triplets (q, r, j) likewise), and dL/ds = -dL/de (e = -s) or
// -dL/de / e (dd/ds = -1/d; 0 where d = 0, the engine's convention). The positives' own dL/ds
// the caller forms from their dL/de (row_totals).
template <typename T>
DMLK_HD T negative_grad(const T* s, int64_t rows, int64_t r, const int64_t* slots_row, int64_t num_slots,
                        const int64_t* col_labels, int64_t label, int64_t j, int64_t cols, const Rule<T>& rule) {
  if (col_labels[j] == label) return T(0);
  const T* s_row = s + r * cols;
  const T ej = farness(s_row[j], rule.euclidean);
  const int64_t own = rule.row0 + r < cols ? rule.row0 + r : cols - 1;  // with swap: row r's column
  T w = T(0);
  for (int64_t k = 0; k < num_slots; ++k) {
    const int64_t p = slot_column(slots_row, k, cols);
    if (p < 0) continue;
    const T ep = farness(s_row[p], rule.euclidean);
    const T t = ej - ep;
    if (!rule.swap) {
      if (in_window(t, rule.window_margin, rule.window)) w += term_slope(rule.margin - t, rule.smooth).slope;
      continue;
    }
    const T* q_row = s + positive_row(p, rule.row0, rows) * cols;
    const T eqj = farness(q_row[j], rule.euclidean);
    const T share = min_share(ej, eqj);
    const T e_min = min_nan(ej, eqj);
    if (in_window(t, rule.window_margin, rule.window))  // (r, q, j): r the anchor
      w += term_slope(rule.margin - (e_min - ep), rule.smooth).slope * share;
    const T eqr = farness(q_row[own], rule.euclidean);
    if (in_window(eqj - eqr, rule.window_margin, rule.window))  // (q, r, j): r the positive
      w += term_slope(rule.margin - (e_min - eqr), rule.smooth).slope * share;
  }
  if (!rule.euclidean) return w;
  return ej > T(0) ? w / ej : T(0);
}

// Row r's totals from its (slot, chunk) partials (parts[(r P + k) C + c]), added slot by slot,
// chunk by chunk: sum, the two counts, and with grad_pos each slot's dL/de (= sum_n w).
template <typename T>
DMLK_HD void row_totals(const SlotPartial<T>* parts, int64_t r, int64_t num_slots, int64_t chunks, T* sums,
                        int64_t* counts, T* grad_pos) {
  T sum = T(0);
  int64_t nonzero = 0, kept = 0;
  for (int64_t k = 0; k < num_slots; ++k) {
    const SlotPartial<T>* slot = parts + (r * num_slots + k) * chunks;
    T w = T(0);
    for (int64_t c = 0; c < chunks; ++c) {
      sum += slot[c].sum;
      nonzero += slot[c].nonzero;
      kept += slot[c].kept;
      w += slot[c].w;
    }
    if (grad_pos != nullptr) grad_pos[r * num_slots + k] = w;
  }
  sums[r] = sum;
  counts[2 * r] = nonzero;
  counts[2 * r + 1] = kept;
}

// Chunks per row: columns in chunks of at least kChunkColumns (so that a block of few long rows
// still has a thread per (row, slot, chunk) to fill a GPU), fewer where rows x slots x chunks
// would pass kMaxParts partials (a row with thousands of smooth-loss positives).
constexpr int64_t kChunkColumns = 1024;
constexpr int64_t kMaxParts = int64_t(1) << 22;

inline int64_t chunks_per_row(int64_t rows, int64_t num_slots, int64_t cols) {
  int64_t chunks = (cols + kChunkColumns - 1) / kChunkColumns;
  const int64_t row_slots = rows * num_slots;
  if (row_slots > 0 && chunks > kMaxParts / row_slots) chunks = kMaxParts / row_slots;
  return chunks < 1 ? 1 : chunks;
}

}  // namespace triplet_slots
}  // namespace dmlkern
