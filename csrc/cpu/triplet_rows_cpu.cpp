// dmlkern::triplet_rows on the CPU: the per-row work of the fused
// TripletMarginLoss (dmlkern/fused/triplet.py, which holds the plain-torch twin of both) on one
// row block of similarities s (B x M, from the deterministic fixed_mm).
//
// Row i turns its similarities into e (larger = farther: sqrt(max(2 - 2s, 0)), or -s), lists its
// positives, and for each positive p (column order) walks every column j: a negative j is kept
// when the miner's window holds for t = e_j - e_p, and costs relu(margin - t) (or F.softplus).
// Per row: the sum of the kept terms and the numbers of kept non-zero terms and of kept
// triplets, and, with with_grad, in the same sweep the gradient of the total, dL/ds of the row:
// dL/de_j = -sum_p w_pj, dL/de_p = sum_j w_pj, w = the term's slope where kept. A row with many
// positives (relu terms, no swap) sorts its negatives once instead (sorted_row).
//
// With swap (TripletMarginLoss(swap=True)), a triplet's e_an is min(e_an, e_pn) (PML's
// smallest_dist; the miner's window still on t = e_an - e_ap). The block then holds whole
// classes of the batch against itself, sorted by label (column row0 + k is row k), so row p of
// the block gives e_pn. The gradient of e_pn belongs to row p: so that each row keeps one
// writer, row i collects both of its roles, as the anchor of its positives q and as the
// positive of each anchor q (recomputing that triplet's term), a tie of the min giving each
// side half, as torch.minimum's backward.
//
// Each row is one thread's, its sums vectorised in one fixed order for a given CPU (the clone
// picked at load time: AVX-512 and AVX2 machines may differ in the last bits, the thread count
// changes nothing).
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace dmlkern {

namespace {

// The miner's type_of_triplets (PML's comparisons on t), or every triplet (no miner).
enum TripletWindow : int64_t { kEvery = 0, kAll = 1, kHard = 2, kSemihard = 3, kEasy = 4 };

template <int64_t W, typename T>
DMLK_CPU_INLINE bool in_window(T t, T wm) {
  if constexpr (W == kEvery) return true;
  if constexpr (W == kEasy) return t > wm;
  if constexpr (W == kHard) return (t <= wm) & (t <= T(0));
  if constexpr (W == kSemihard) return (t <= wm) & (t > T(0));
  return t <= wm;  // kAll
}

// F.softplus (threshold 20) as max(v, 0) + log1p(exp(-|v|)), and its slope, sigmoid(v).
template <typename T>
DMLK_CPU_INLINE T softplus(T v) {
  const T z = CpuExp()(v > T(0) ? -v : v);
  return v > T(20) ? v : (v > T(0) ? v : T(0)) + CpuLog1p()(z);
}

template <typename T>
DMLK_CPU_INLINE T sigmoid(T v) {
  const T z = CpuExp()(v > T(0) ? -v : v);
  return v >= T(0) ? T(1) / (T(1) + z) : z / (T(1) + z);
}

struct TripletArgs {
  int64_t rows, cols, row0;
  bool exclude_diag, smooth, euclidean;
  int64_t window;
  double margin, window_margin;
  bool swap;
  int64_t sorted_min_positives;  // rows with at least this many positives take the sorted path
};

constexpr int64_t kSortedMinPositives = 128;  // flags[4]'s default

TripletArgs parse(const at::Tensor& s, const at::Tensor& row_labels, const at::Tensor& col_labels, int64_t row0,
                  bool exclude_diag, at::ArrayRef<double> params, at::IntArrayRef flags) {
  TORCH_CHECK(s.dim() == 2, "triplet_rows: s must be 2-D (rows, columns), got ", s.sizes());
  check_cpu_dtype(s, "s");
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == s.size(0) && row_labels.scalar_type() == at::kLong,
              "triplet_rows: row_labels must be int64 of shape (", s.size(0), "), got ", row_labels.sizes(), " ",
              row_labels.scalar_type());
  TORCH_CHECK(col_labels.dim() == 1 && col_labels.size(0) == s.size(1) && col_labels.scalar_type() == at::kLong,
              "triplet_rows: col_labels must be int64 of shape (", s.size(1), "), got ", col_labels.sizes(), " ",
              col_labels.scalar_type());
  TORCH_CHECK(params.size() == 2, "triplet_rows: params must be [margin, window_margin]");
  TORCH_CHECK(flags.size() >= 3 && flags.size() <= 5,
              "triplet_rows: flags must be [smooth, euclidean, window(, swap(, sorted_min_positives))]");
  TORCH_CHECK(flags[2] >= kEvery && flags[2] <= kEasy, "triplet_rows: window must be in [0, 4], got ", flags[2]);
  TORCH_CHECK(!exclude_diag || row0 >= 0, "triplet_rows: row0 must be >= 0");
  const bool swap = flags.size() >= 4 && flags[3] != 0;
  const int64_t sorted_min = flags.size() == 5 ? flags[4] : kSortedMinPositives;
  TORCH_CHECK(sorted_min >= 0, "triplet_rows: sorted_min_positives must be >= 0, got ", sorted_min);
  TORCH_CHECK(!swap || exclude_diag, "triplet_rows: swap needs the batch against itself (exclude_diag)");
  return {s.size(0), s.size(1), row0, exclude_diag, flags[0] != 0, flags[1] != 0, flags[2], params[0], params[1],
          swap, sorted_min};
}

// e of one row of s into `out`.
template <typename T>
void farness_row(const TripletArgs& a, const T* s_row, T* __restrict__ out) {
  if (a.euclidean) {
#pragma omp simd
    for (int64_t j = 0; j < a.cols; ++j) {
      const T v = T(2) - T(2) * s_row[j];
      out[j] = CpuSqrt()(v < T(0) ? T(0) : v);  // NaN stays NaN
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < a.cols; ++j) out[j] = -s_row[j];
  }
}

// Row i's positives' columns (in order) into `pos`.
inline void list_positives(const TripletArgs& a, const int64_t* col_labels, int64_t label, int64_t i,
                           std::vector<int64_t>& pos) {
  pos.clear();
  const int64_t self = a.exclude_diag ? a.row0 + i : -1;
  for (int64_t j = 0; j < a.cols; ++j)
    if (col_labels[j] == label && j != self) pos.push_back(j);
}

// torch.minimum(x, y): NaN if either is.
template <typename T>
DMLK_CPU_INLINE T nan_min(T x, T y) {
  return (x < y || x != x) ? x : y;
}

// torch.minimum(x, y)'s backward: the share of the gradient x gets (y's is nan_min_share(y, x)):
// half at a tie, all of it where x < y or either is NaN.
template <typename T>
DMLK_CPU_INLINE T nan_min_share(T x, T y) {
  return x == y ? T(0.5) : (x > y ? T(0) : T(1));
}

// One positive (e_p) of a row against every column. Forward: the sums of the kept terms, of the
// kept non-zero terms and of the kept triplets, added to `out`. Grad: dL/de_j -= w_j for the
// kept negatives (ge; w = the term's slope), and returns sum_j w_j (dL/de_p). Both from one
// sweep when the gradient is wanted too. Swap: each violation on min(e_j, eq_j) (eq: row p's e),
// and ge gets the e_j side's share of each slope.
template <int64_t W, bool Smooth, bool Forward, bool Grad, bool Swap, typename T>
DMLK_CPU_CLONES T slot_pass(const T* __restrict__ e, const T* __restrict__ eq, const int64_t* __restrict__ col_labels,
                            int64_t label, T ep, int64_t cols, T margin, T wm, T* out, T* __restrict__ ge) {
  T sum = 0, nonzero = 0, kept = 0, wsum = 0;
#pragma omp simd reduction(+ : sum, nonzero, kept, wsum)
  for (int64_t j = 0; j < cols; ++j) {
    const bool keep = (col_labels[j] != label) & in_window<W>(e[j] - ep, wm);  // t = e_an - e_ap
    const T viol = margin - ((Swap ? nan_min(e[j], eq[j]) : e[j]) - ep);  // = (e_ap - e_an) + margin exactly
    if constexpr (Forward) {
      const T term = Smooth ? softplus(viol) : (viol < T(0) ? T(0) : viol);  // relu(NaN) = NaN
      const T add = keep ? term : T(0);
      sum += add;
      nonzero += add > T(0) ? T(1) : T(0);
      kept += keep ? T(1) : T(0);
    }
    if constexpr (Grad) {
      const T slope = Smooth ? sigmoid(viol) : (viol > T(0) ? T(1) : T(0));
      const T w = keep ? slope : T(0);
      ge[j] -= Swap ? w * nan_min_share(e[j], eq[j]) : w;  // (a positive column is never kept: w = 0 there)
      wsum += w;
    }
  }
  if constexpr (Forward) {
    out[0] += sum;
    out[1] += nonzero;  // <= cols per call: exact
    out[2] += kept;
  }
  return wsum;
}

// dL/de of a row (ge) into dL/ds in place: dd/ds = -1/d, and 0 where d = 0 (the engine's
// convention); e = -s for the cosine.
template <typename T>
void to_similarity_grad(const TripletArgs& a, const T* __restrict__ e, T* __restrict__ ge) {
#pragma omp simd
  for (int64_t j = 0; j < a.cols; ++j) {
    const T d = e[j];
    ge[j] = a.euclidean ? (d > T(0) ? -ge[j] / (d > T(0) ? d : T(1)) : T(0)) : -ge[j];
  }
}

// Runs body(i, label, e, pos) for every row i of the block, in parallel over groups of 8 rows,
// with the row's e (its row of e_block when given, else computed into a per-thread buffer) and
// its positives' columns.
template <typename T, typename F>
void for_each_row(const TripletArgs& a, const T* s, const int64_t* row_labels, const int64_t* col_labels,
                  F&& body, const T* e_block = nullptr) {
  parallel_blocks(ceil_div(a.rows, 8), [&](int64_t b0, int64_t b1) {
    std::vector<T> buffer(e_block != nullptr ? 0 : a.cols);
    std::vector<int64_t> pos;
    for (int64_t i = b0 * 8; i < std::min(a.rows, b1 * 8); ++i) {
      const int64_t label = row_labels[i];
      const T* e = e_block != nullptr ? e_block + i * a.cols : buffer.data();
      if (e_block == nullptr) farness_row(a, s + i * a.cols, buffer.data());
      list_positives(a, col_labels, label, i, pos);
      body(i, label, e, pos);
    }
  });
}

// A row with many positives (at least a.sorted_min_positives; relu terms, no swap), in
// O(M log M + P log M) instead of O(P M): its negatives sorted by e once, every positive's kept
// triplets are a run of them. t = e_n - e_p (as rounded) is non-decreasing in e_n, so each of
// the window's conditions on t, and the term's margin - t > 0 (t < margin), holds on a prefix or
// a suffix of the sorted run, found by binary search on the same comparisons; a run's terms sum
// to count (margin + e_p) - (sum of its e_n) from prefix sums (in double: the same terms rounded
// once, not per term). Gradient: dL/de_p = the run's count; each negative's -(number of runs
// holding it) from a difference array over the sorted positions. A NaN in the row: the direct
// path (its NaN terms as they are).
template <int64_t W, bool Grad, typename T>
bool sorted_row(const TripletArgs& a, const T* e, const int64_t* col_labels, int64_t label,
                const std::vector<int64_t>& pos, T margin, T wm, std::vector<std::pair<T, int64_t>>& neg,
                std::vector<double>& prefix, std::vector<int64_t>& runs, T& row_sum, int64_t& row_nonzero,
                int64_t& row_kept, T* ge) {
  neg.clear();
  for (int64_t j = 0; j < a.cols; ++j) {
    if (e[j] != e[j]) return false;
    if (col_labels[j] != label) neg.emplace_back(e[j], j);
  }
  std::sort(neg.begin(), neg.end());  // (value, column): a fixed order, ties by column
  const int64_t m = static_cast<int64_t>(neg.size());
  prefix.assign(m + 1, 0.0);
  for (int64_t k = 0; k < m; ++k) prefix[k + 1] = prefix[k] + static_cast<double>(neg[k].first);
  if constexpr (Grad) runs.assign(m + 1, 0);
  // the first sorted position where pred(t) is false, for pred true on a prefix
  auto first_false = [&](T ep, auto pred) {
    int64_t lo = 0, hi = m;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (pred(neg[mid].first - ep)) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  double total = 0.0;
  int64_t nonzero = 0, kept = 0;
  for (const int64_t p : pos) {
    const T ep = e[p];
    if (ep != ep) return false;
    int64_t lo = 0, hi = m;  // the window's run: kEvery, and the ends each window moves
    if constexpr (W == kAll) hi = first_false(ep, [&](T t) { return t <= wm; });
    if constexpr (W == kHard) hi = first_false(ep, [&](T t) { return (t <= wm) & (t <= T(0)); });
    if constexpr (W == kSemihard) {
      lo = first_false(ep, [&](T t) { return !(t > T(0)); });
      hi = std::max(lo, first_false(ep, [&](T t) { return t <= wm; }));
    }
    if constexpr (W == kEasy) lo = first_false(ep, [&](T t) { return !(t > wm); });
    const int64_t end = std::max(lo, std::min(hi, first_false(ep, [&](T t) { return t < margin; })));
    kept += hi - lo;
    const int64_t count = end - lo;  // the kept non-zero terms
    nonzero += count;
    total += static_cast<double>(count) * (static_cast<double>(margin) + static_cast<double>(ep)) -
             (prefix[end] - prefix[lo]);
    if constexpr (Grad) {
      ge[p] += T(count);
      runs[lo] += 1;
      runs[end] -= 1;
    }
  }
  if constexpr (Grad) {
    int64_t held = 0;
    for (int64_t k = 0; k < m; ++k) {
      held += runs[k];
      ge[neg[k].second] -= T(held);
    }
  }
  row_sum = T(total);
  row_nonzero = nonzero;
  row_kept = kept;
  return true;
}

// Per row: the forward sums (sums, counts) and, with Grad, dL/ds of the row (grad_s).
template <int64_t W, bool Smooth, bool Grad, typename T>
void rows_pass(const TripletArgs& a, const T* s, const int64_t* row_labels, const int64_t* col_labels, T* sums,
               int64_t* counts, T* grad_s) {
  const T margin = T(a.margin), wm = T(a.window_margin);
  // per-thread scratch of the sorted path (one row at a time per thread)
  thread_local std::vector<std::pair<T, int64_t>> neg;
  thread_local std::vector<double> prefix;
  thread_local std::vector<int64_t> runs;
  for_each_row(a, s, row_labels, col_labels, [&](int64_t i, int64_t label, const T* e,
                                                 const std::vector<int64_t>& pos) {
    T* ge = Grad ? grad_s + i * a.cols : nullptr;  // dL/de first, then dL/ds in place
    if constexpr (Grad) std::fill(ge, ge + a.cols, T(0));
    T row_sum = 0;
    int64_t row_nonzero = 0, row_kept = 0;
    bool done = false;
    if constexpr (!Smooth) {
      if (static_cast<int64_t>(pos.size()) >= a.sorted_min_positives && !pos.empty()) {
        done = sorted_row<W, Grad>(a, e, col_labels, label, pos, margin, wm, neg, prefix, runs, row_sum,
                                   row_nonzero, row_kept, ge);
        if constexpr (Grad) {
          if (!done) std::fill(ge, ge + a.cols, T(0));  // (a NaN: the direct path, from scratch)
        }
      }
    }
    for (size_t k = 0; !done && k < pos.size(); ++k) {
      const int64_t p = pos[k];
      T slot[3] = {0, 0, 0};
      const T* no_row = nullptr;
      const T wsum =
          slot_pass<W, Smooth, true, Grad, false>(e, no_row, col_labels, label, e[p], a.cols, margin, wm, slot, ge);
      if constexpr (Grad) ge[p] += wsum;
      row_sum += slot[0];
      row_nonzero += static_cast<int64_t>(slot[1]);
      row_kept += static_cast<int64_t>(slot[2]);
    }
    sums[i] = row_sum;
    counts[2 * i] = row_nonzero;
    counts[2 * i + 1] = row_kept;
    if constexpr (Grad) to_similarity_grad(a, e, ge);
  });
}

// swap, row i as the positive of anchor q (e_qi = eqi): each triplet (q, i, n)'s slope, recomputed
// as q's own pass computes it, times the e_in side's share of min(e_qn, e_in), into ge.
template <int64_t W, bool Smooth, typename T>
DMLK_CPU_CLONES void swap_positive_pass(const T* __restrict__ e, const T* __restrict__ eq,
                                        const int64_t* __restrict__ col_labels, int64_t label, T eqi, int64_t cols,
                                        T margin, T wm, T* __restrict__ ge) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) {
    const bool keep = (col_labels[j] != label) & in_window<W>(eq[j] - eqi, wm);
    const T viol = margin - (nan_min(eq[j], e[j]) - eqi);
    const T slope = Smooth ? sigmoid(viol) : (viol > T(0) ? T(1) : T(0));
    ge[j] -= (keep ? slope : T(0)) * nan_min_share(e[j], eq[j]);
  }
}

// rows_pass with swap: e of the whole block first (every row's positives' rows are read), then
// per row its anchor role against each positive q and, with Grad, its positive role for each q.
template <int64_t W, bool Smooth, bool Grad, typename T>
void swap_rows_pass(const TripletArgs& a, const T* s, const int64_t* row_labels, const int64_t* col_labels, T* sums,
                    int64_t* counts, T* grad_s) {
  const T margin = T(a.margin), wm = T(a.window_margin);
  std::vector<T> e_block(static_cast<size_t>(a.rows * a.cols));
  T* const e = e_block.data();
  parallel_blocks(ceil_div(a.rows, 8), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * 8; i < std::min(a.rows, b1 * 8); ++i) farness_row(a, s + i * a.cols, e + i * a.cols);
  });
  for_each_row(a, s, row_labels, col_labels, [&](int64_t i, int64_t label, const T* ei,
                                                 const std::vector<int64_t>& pos) {
    const int64_t self = a.row0 + i;
    T* ge = Grad ? grad_s + i * a.cols : nullptr;
    if constexpr (Grad) std::fill(ge, ge + a.cols, T(0));
    T row_sum = 0;
    int64_t row_nonzero = 0, row_kept = 0;
    for (const int64_t p : pos) {
      const int64_t q = p - a.row0;
      TORCH_CHECK(q >= 0 && q < a.rows && row_labels[q] == label,
                  "triplet_rows: with swap, every positive's row must be in the block (whole classes, the "
                  "batch against itself sorted by label): row ", self, "'s positive ", p, " is not");
      const T* eq = e + q * a.cols;
      T slot[3] = {0, 0, 0};
      const T wsum = slot_pass<W, Smooth, true, Grad, true>(ei, eq, col_labels, label, ei[p], a.cols, margin, wm,
                                                              slot, ge);
      row_sum += slot[0];
      row_nonzero += static_cast<int64_t>(slot[1]);
      row_kept += static_cast<int64_t>(slot[2]);
      if constexpr (Grad) {
        swap_positive_pass<W, Smooth>(ei, eq, col_labels, label, eq[self], a.cols, margin, wm, ge);
        ge[p] += wsum;  // (p is not a negative: both passes add 0 there)
      }
    }
    sums[i] = row_sum;
    counts[2 * i] = row_nonzero;
    counts[2 * i + 1] = row_kept;
    if constexpr (Grad) to_similarity_grad(a, ei, ge);
  }, static_cast<const T*>(e));
}

// The window and smooth_loss as template arguments (the loops stay branch-free).
template <typename F>
void dispatch_rule(const TripletArgs& a, F&& f) {
  auto with_smooth = [&](auto w) {
    if (a.smooth)
      f(w, std::true_type{});
    else
      f(w, std::false_type{});
  };
  switch (a.window) {
    case kEvery: return with_smooth(std::integral_constant<int64_t, kEvery>{});
    case kAll: return with_smooth(std::integral_constant<int64_t, kAll>{});
    case kHard: return with_smooth(std::integral_constant<int64_t, kHard>{});
    case kSemihard: return with_smooth(std::integral_constant<int64_t, kSemihard>{});
    default: return with_smooth(std::integral_constant<int64_t, kEasy>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> triplet_rows_cpu(const at::Tensor& s_in, const at::Tensor& row_labels_in,
                                                                const at::Tensor& col_labels_in, int64_t row0,
                                                                bool exclude_diag, at::ArrayRef<double> params,
                                                                at::IntArrayRef flags, bool with_grad) {
  const TripletArgs a = parse(s_in, row_labels_in, col_labels_in, row0, exclude_diag, params, flags);
  const at::Tensor s = s_in.contiguous(), rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  at::Tensor sums = at::empty({a.rows}, s.options());
  at::Tensor counts = at::empty({a.rows, 2}, s.options().dtype(at::kLong));
  at::Tensor grad_s = with_grad ? at::empty({a.rows, a.cols}, s.options()) : at::empty({0, 0}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "triplet_rows", [&] {
    dispatch_rule(a, [&](auto w, auto smooth) {
      constexpr int64_t kW = decltype(w)::value;
      constexpr bool kSmooth = decltype(smooth)::value;
      auto run = [&](auto grad) {
        constexpr bool kGrad = decltype(grad)::value;
        auto pass = a.swap ? &swap_rows_pass<kW, kSmooth, kGrad, scalar_t> : &rows_pass<kW, kSmooth, kGrad, scalar_t>;
        pass(a, s.data_ptr<scalar_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), sums.data_ptr<scalar_t>(),
             counts.data_ptr<int64_t>(), with_grad ? grad_s.data_ptr<scalar_t>() : nullptr);
      };
      if (with_grad)
        run(std::true_type{});
      else
        run(std::false_type{});
    });
  });
  return {sums, counts, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("triplet_rows", &triplet_rows_cpu);
}

}  // namespace dmlkern
