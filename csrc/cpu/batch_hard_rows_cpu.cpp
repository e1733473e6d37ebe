// dmlkern::batch_hard_rows on the CPU: BatchEasyHardMiner's (BatchHardMiner's) per-row picks on
// one row block of its distance matrix (dmlkern/fused/blocked_miners.py, which holds the
// plain-torch twin): per row, the positive and the negative chosen by PML's rules, in one sweep
// of the row instead of torch's candidate masks, torch.where fills and min / max passes.
//
// A side's candidates: the positives (same label, the column row0 + i excluded with
// exclude_diag) or the negatives (another label), narrowed by the semihard threshold (strictly
// beyond the other side's pick: > for a min, < for a max) and the allowed range (lo <= x <= hi),
// each written as PML writes it, a candidate dropped where the opposite comparison holds (x <= thr
// for a min; x < lo or x > hi): a NaN distance, or a NaN threshold, drops nothing.
// The pick is torch.min / torch.max over the row with the non-candidates filled with
// finfo.max / finfo.min, as the twin (and PML) compute it, bit for bit: the first index of the
// extreme, a candidate NaN wins (the first one), a row without candidates gives (fill, 0) and
// ok = false. A max is taken as the min of -x (negation is exact, ties stay ties).
//
// Each row is one thread's (at::parallel_for over rows): the result doesn't depend on the
// thread count. A row is swept in chunks: per chunk the vectorised minimum (and whether it holds
// a candidate NaN); the first chunk holding the row's minimum (or its first NaN) is then
// searched for the first index.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace dmlkern {

namespace {

constexpr int64_t kChunk = 512;

enum SideMode : int64_t { kSkip = 0, kMin = 1, kMax = 2 };
enum PickOrder : int64_t { kIndependent = 0, kNegativesFirst = 1, kPositivesFirst = 2 };

// One side's rule for a row: its candidates and the sign that turns its pick into a minimum.
template <typename T>
struct Side {
  bool on = false, positive = false, has_thr = false, has_range = false;
  T sign = T(1), thr = T(0), lo = T(0), hi = T(0);  // thr in the y = sign * x domain

  // Whether x passes the semihard threshold and the allowed range (not the labels).
  DMLK_CPU_INLINE bool in_window(T x) const {
    const bool thr_ok = (!has_thr) | !(sign * x <= thr);  // drops x <= thr for a min, x >= thr for a max
    const bool range_ok = (!has_range) | !((x < lo) | (x > hi));
    return thr_ok & range_ok;
  }
  DMLK_CPU_INLINE bool valid(T x, bool same, bool self) const {
    const bool cand = positive ? (same & !self) : !same;
    return on & cand & in_window(x);
  }
};

struct Pick {
  int64_t index = 0;
  bool ok = false;
};

template <typename T>
struct SideState {
  T best = std::numeric_limits<T>::infinity();  // the row's min of y so far (y <= +inf, no NaN)
  int64_t best_chunk = 0, nan_chunk = -1;
  bool any = false;
};

// The first index in [c0, c1) where the side's filled y equals `best` (or, with nan, its first
// candidate NaN).
template <typename T, typename L>
DMLK_CPU_INLINE int64_t first_in_chunk(const Side<T>& s, const T* row, const L* cl, L label, int64_t self,
                                       int64_t c0, int64_t c1, T best, bool nan, T fill) {
  for (int64_t j = c0; j < c1; ++j) {
    const T x = row[j];
    const bool v = s.valid(x, cl[j] == label, j == self);
    if (nan) {
      if (v && std::isnan(x)) return j;
    } else if ((v ? s.sign * x : fill) == best) {
      return j;
    }
  }
  return c0;  // not reached: the chunk holds the value it was picked for
}

// Both sides' picks of one row in one sweep (a side with on = false is swept but not read).
// Window: a side has a semihard threshold or an allowed range. The chunk's loop runs on int32
// offsets (the self column's compare on 32-bit lanes), fields of p and n copied to locals: so
// it vectorises (the first version, on int64 offsets and the sides' fields, ran scalar, 15x slower).
template <bool Window, typename T, typename L>
DMLK_CPU_CLONES void pick_row(const T* __restrict__ row, const L* __restrict__ cl, L label, int64_t self,
                              int64_t cols, const Side<T>& p, const Side<T>& n, Pick& out_p, Pick& out_n) {
  const T fill = std::numeric_limits<T>::max();  // a non-candidate's y (finfo.max / -finfo.min)
  const T sign_p = p.sign, sign_n = n.sign;
  const Side<T> wp = p, wn = n;  // local copies: loop invariants for the vectoriser
  SideState<T> sp, sn;
  for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
    const int32_t len = static_cast<int32_t>(c0 + kChunk < cols ? kChunk : cols - c0);
    const int32_t self_k = self >= c0 && self < c0 + len ? static_cast<int32_t>(self - c0) : -1;
    const T* __restrict__ x_c = row + c0;
    const L* __restrict__ l_c = cl + c0;
    T mp = std::numeric_limits<T>::infinity(), mn = mp;
    int32_t any_p = 0, any_n = 0, nan_p = 0, nan_n = 0;
#pragma omp simd reduction(min : mp, mn) reduction(+ : any_p, any_n, nan_p, nan_n)
    for (int32_t k = 0; k < len; ++k) {
      const T x = x_c[k];
      const bool same = l_c[k] == label, num = x == x;
      bool vp = same & (k != self_k), vn = !same;
      if constexpr (Window) {
        vp = vp & wp.in_window(x);
        vn = vn & wn.in_window(x);
      }
      any_p += vp;
      any_n += vn;
      nan_p += vp & !num;
      nan_n += vn & !num;
      const T yp = (vp & num) ? sign_p * x : fill;
      const T yn = (vn & num) ? sign_n * x : fill;
      mp = yp < mp ? yp : mp;
      mn = yn < mn ? yn : mn;
    }
    const int64_t chunk = c0 / kChunk;
    sp.any |= any_p != 0;
    sn.any |= any_n != 0;
    if (nan_p && sp.nan_chunk < 0) sp.nan_chunk = chunk;
    if (nan_n && sn.nan_chunk < 0) sn.nan_chunk = chunk;
    if (mp < sp.best) sp.best = mp, sp.best_chunk = chunk;  // strict: the first chunk of a tie
    if (mn < sn.best) sn.best = mn, sn.best_chunk = chunk;
  }
  auto finish = [&](const Side<T>& s, const SideState<T>& st, Pick& out) {
    if (!s.on) return;
    const bool nan = st.nan_chunk >= 0;
    const int64_t c0 = (nan ? st.nan_chunk : st.best_chunk) * kChunk;
    const int64_t c1 = c0 + kChunk < cols ? c0 + kChunk : cols;
    out.index = first_in_chunk(s, row, cl, label, self, c0, c1, st.best, nan, fill);
    out.ok = st.any;
  };
  finish(p, sp, out_p);
  finish(n, sn, out_n);
}

template <typename T>
Side<T> make_side(int64_t mode, bool positive, at::ArrayRef<double> range) {
  Side<T> s;
  s.on = mode != kSkip;
  s.positive = positive;
  s.sign = mode == kMax ? T(-1) : T(1);
  s.has_range = !range.empty();
  if (s.has_range) s.lo = T(range[0]), s.hi = T(range[1]);  // torch compares in the matrix's dtype
  return s;
}

// The value torch.min / max returns at index j of the filled row.
template <typename T, typename L>
T picked_value(const Side<T>& s, const T* row, const L* cl, L label, int64_t self, int64_t j) {
  const T x = row[j];
  if (s.valid(x, cl[j] == label, j == self)) return x;
  return s.sign > T(0) ? std::numeric_limits<T>::max() : std::numeric_limits<T>::lowest();
}

// Every row of the block: rows i0 .. i1 - 1 of this thread.
template <bool Window, typename T, typename L>
void block_rows(const T* m, const L* row_labels, const L* col_labels, int64_t cols, int64_t row0, bool exclude_diag,
                const Side<T>& pos, const Side<T>& neg, int64_t order, T* val, int64_t* idx, bool* okp, int64_t i0,
                int64_t i1) {
  const Side<T> off;
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = m + i * cols;
    const L label = row_labels[i];
    const int64_t self = exclude_diag ? row0 + i : -1;
    Side<T> sides[2] = {pos, neg};  // this row's rules (a semihard threshold is the row's)
    Pick picks[2], unused;
    auto finish = [&](int k) {
      val[2 * i + k] = sides[k].on ? picked_value(sides[k], row, col_labels, label, self, picks[k].index) : T(0);
      idx[2 * i + k] = picks[k].index;
      okp[2 * i + k] = picks[k].ok;
    };
    if (order == kIndependent) {
      pick_row<Window>(row, col_labels, label, self, cols, sides[0], sides[1], picks[0], picks[1]);
      finish(0), finish(1);
      continue;
    }
    const int first = order == kNegativesFirst ? 1 : 0, second = 1 - first;
    if (first == 0)
      pick_row<Window>(row, col_labels, label, self, cols, sides[0], off, picks[0], unused);
    else
      pick_row<Window>(row, col_labels, label, self, cols, off, sides[1], unused, picks[1]);
    finish(first);
    sides[second].has_thr = true;
    sides[second].thr = sides[second].sign * val[2 * i + first];  // NaN: drops nothing, as PML
    if (second == 0)
      pick_row<true>(row, col_labels, label, self, cols, sides[0], off, picks[0], unused);
    else
      pick_row<true>(row, col_labels, label, self, cols, off, sides[1], unused, picks[1]);
    finish(second);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_hard_rows_cpu(const at::Tensor& mat_in,
                                                                   const at::Tensor& row_labels_in,
                                                                   const at::Tensor& col_labels_in, int64_t row0,
                                                                   bool exclude_diag, at::IntArrayRef modes,
                                                                   at::ArrayRef<double> pos_range,
                                                                   at::ArrayRef<double> neg_range) {
  TORCH_CHECK(mat_in.dim() == 2, "batch_hard_rows: mat must be 2-D (rows, columns), got ", mat_in.sizes());
  check_cpu_dtype(mat_in, "mat");
  TORCH_CHECK(row_labels_in.scalar_type() == at::kLong && col_labels_in.scalar_type() == at::kLong,
              "batch_hard_rows: row_labels and col_labels must be int64, got ", row_labels_in.scalar_type(), " and ",
              col_labels_in.scalar_type());
  TORCH_CHECK(row_labels_in.dim() == 1 && row_labels_in.size(0) == mat_in.size(0),
              "batch_hard_rows: row_labels must have shape (", mat_in.size(0), "), got ", row_labels_in.sizes());
  TORCH_CHECK(col_labels_in.dim() == 1 && col_labels_in.size(0) == mat_in.size(1),
              "batch_hard_rows: col_labels must have shape (", mat_in.size(1), "), got ", col_labels_in.sizes());
  TORCH_CHECK(modes.size() == 3, "batch_hard_rows: modes must be [pos_mode, neg_mode, order]");
  TORCH_CHECK(modes[0] >= kSkip && modes[0] <= kMax && modes[1] >= kSkip && modes[1] <= kMax,
              "batch_hard_rows: a side's mode must be 0 (skip), 1 (min) or 2 (max)");
  TORCH_CHECK(modes[2] >= kIndependent && modes[2] <= kPositivesFirst, "batch_hard_rows: order must be 0, 1 or 2");
  TORCH_CHECK(modes[2] == kIndependent || (modes[0] != kSkip && modes[1] != kSkip),
              "batch_hard_rows: a semihard order needs both sides");
  TORCH_CHECK(pos_range.empty() || pos_range.size() == 2, "batch_hard_rows: pos_range must be [] or [lo, hi]");
  TORCH_CHECK(neg_range.empty() || neg_range.size() == 2, "batch_hard_rows: neg_range must be [] or [lo, hi]");
  TORCH_CHECK(!exclude_diag || row0 >= 0, "batch_hard_rows: row0 must be >= 0");
  const at::Tensor mat = mat_in.contiguous(), rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  const int64_t rows = mat.size(0), cols = mat.size(1), order = modes[2];
  TORCH_CHECK(cols < (int64_t(1) << 31), "batch_hard_rows: at most 2^31 - 1 columns");
  at::Tensor values = at::zeros({rows, 2}, mat.options());
  at::Tensor indices = at::zeros({rows, 2}, mat.options().dtype(at::kLong));
  at::Tensor ok = at::zeros({rows, 2}, mat.options().dtype(at::kBool));
  if (rows == 0 || cols == 0) return {values, indices, ok};  // (the caller never passes an empty block)
  const bool window = !pos_range.empty() || !neg_range.empty();
  AT_DISPATCH_FLOATING_TYPES(mat.scalar_type(), "batch_hard_rows", [&] {
    using T = scalar_t;
    const Side<T> pos = make_side<T>(modes[0], true, pos_range), neg = make_side<T>(modes[1], false, neg_range);
    auto run = [&](auto label_tag, auto window_tag) {
      using L = decltype(label_tag);
      constexpr bool kWindow = decltype(window_tag)::value;
      const T* m = mat.data_ptr<T>();
      const L* row_labels = rl.data_ptr<L>();
      const L* col_labels = cl.data_ptr<L>();
      T* val = values.data_ptr<T>();
      int64_t* idx = indices.data_ptr<int64_t>();
      bool* okp = ok.data_ptr<bool>();
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        block_rows<kWindow>(m, row_labels, col_labels, cols, row0, exclude_diag, pos, neg, order, val, idx, okp,
                            i0, i1);
      });
    };
    if (window)
      run(int64_t{}, std::true_type{});
    else
      run(int64_t{}, std::false_type{});
  });
  return {values, indices, ok};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("batch_hard_rows", &batch_hard_rows_cpu);
}

}  // namespace dmlkern
