// CPU forward of the pair engine (docs/ENGINE.md): dmlkern::pair_engine_forward. Each row
// block folds its column tiles into per-row statistics (one accumulator per row, pair_engine.h);
// the row-block loop and tiling are engine_cpu.h's.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace dmlkern {

namespace {

// ---------------------------------------------------------------------------
// Forward epilogues: one tile row (row i, columns c0 + c) into the row's accumulator.

template <typename T, int64_t TR>
DMLK_CPU_INLINE void extrema_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                                 ExtremaAcc<T>& acc) {
  T mx = neg_infinity<T>(), mn = pos_infinity<T>();
  int nan_neg = 0;  // the max over neg propagates NaN; the min over pos skips it (ExtremaAcc)
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(| : nan_neg)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<kMiningNone>(v, same, c == diag, T(0), T(0));
    const bool kn = engine_neg_kept<kMiningNone>(v, same, T(0), T(0));
    mx = (kn && v > mx) ? v : mx;
    mn = (kp && v < mn) ? v : mn;
    nan_neg |= static_cast<int>(kn && v != v);
  }
  acc.merge(nan_neg ? quiet_nan<T>() : mx, mn);
}

// Two sweeps: the tile row's maxima, then the sums of exp(u - max) (one exp per pair:
// pos and neg exclude each other), merged into the row's online LSEs.
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void lse2_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                              T max_neg, T min_pos, const EngineParams<T>& p, Lse2Acc<T>& acc) {
  T mp = neg_infinity<T>(), mn = neg_infinity<T>();
#pragma omp simd reduction(max : mp, mn)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg, p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos, p.eps);
    const T up = p.sc_pos * engine_pos_value<TR>(v, p) + p.off_pos;
    const T un = p.sc_neg * engine_neg_value<TR>(v, p) + p.off_neg;
    mp = (kp && up > mp) ? up : mp;  // NaN never wins here; it poisons the sums below
    mn = (kn && un > mn) ? un : mn;
  }
  // No finite kept value: any finite shift (the sum is then 0, or NaN from NaN values).
  const T shp = mp == neg_infinity<T>() ? T(0) : mp;
  const T shn = mn == neg_infinity<T>() ? T(0) : mn;
  const CpuExp ex;
  T sp = T(0), sn = T(0);
#pragma omp simd reduction(+ : sp, sn)
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(s[c], CpuSqrt());
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg, p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos, p.eps);
    const T up = p.sc_pos * engine_pos_value<TR>(v, p) + p.off_pos;
    const T un = p.sc_neg * engine_neg_value<TR>(v, p) + p.off_neg;
    const T e = ex(kp ? up - shp : (kn ? un - shn : neg_infinity<T>()));
    sp += kp ? e : T(0);
    sn += kn ? e : T(0);
  }
  acc.pos.merge(mp, sp);
  acc.neg.merge(mn, sn);
}

template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void pos_softplus_row(const T* s, int nc, const int32_t* lab, int32_t li, int diag,
                                      T max_neg, T min_pos, T L, const EngineParams<T>& p,
                                      PosSoftplusAcc<T>& acc) {
  for (int c = 0; c < nc; ++c) {  // positives are few: scalar, exact libm exp / log1p
    if (lab[c] != li) continue;
    const T v = engine_value<TR>(s[c], CpuSqrt());
    acc.push(v, engine_pos_kept<MI>(v, true, c == diag, max_neg, p.eps), L, p, StdExp{});
  }
}

// Pass 3 on one tile row (columns j = c0 + c, L_col = row_in[c0.., 2]): every lane computes
// the pair's terms, the label mask selects them (one exp and one log1p per pair).
template <typename T>
DMLK_CPU_INLINE void lifted_pairs_row(const T* v, int nc, const int32_t* lab, int32_t li, int diag,
                                      T L_i, const T* L_col, const EngineParams<T>& p,
                                      LiftedPairsAcc<T>& acc) {
  const CpuExp ex;
  const CpuLog1p l1p;
  T sf = T(0), sw = T(0), cnt = T(0);
#pragma omp simd reduction(+ : sf, sw, cnt)
  for (int c = 0; c < nc; ++c) {
    const bool pos = engine_pos_kept<kMiningNone>(v[c], lab[c] == li, c == diag, T(0), T(0));
    const LiftedTerms<T> t = engine_lifted_terms(v[c], pos, L_i, L_col[c], p, ex, l1p);
    sf += t.f;
    sw += t.w;
    cnt += t.nonzero;
  }
  acc.merge(sf, sw, cnt);
}

// Pass 4 on one tile row: both hinges of every lane, the label mask selects them (no exp).
template <typename T>
DMLK_CPU_INLINE void hinge_row(const T* v, int nc, const int32_t* lab, int32_t li, int diag, T L,
                               const EngineParams<T>& p, HingeAcc<T>& acc) {
  T sp = T(0), cp = T(0), sn = T(0), cn = T(0);
#pragma omp simd reduction(+ : sp, cp, sn, cn)
  for (int c = 0; c < nc; ++c) {
    const bool same = lab[c] == li;
    const bool kp = engine_pos_kept<kMiningNone>(v[c], same, c == diag, T(0), T(0));
    const bool kn = engine_neg_kept<kMiningNone>(v[c], same, T(0), T(0));
    const HingeTerms<T> t = engine_hinge_terms(v[c], kp, kn, L, p);
    sp += t.pos;
    cp += t.pos_nonzero;
    sn += t.neg;
    cn += t.neg_nonzero;
  }
  acc.merge(sp, cp, sn, cn);
}

// One (nr x nc) similarity tile of rows r0.., columns c0.. into acc[0..nr). The tile is
// this task's scratch: transform 1 turns each row into values v in place first, so the
// row sweeps below (which read it twice for lse2) take one sqrt per pair. Transform 2's values
// differ per set: the lse2 sweeps compute them.
template <typename T, int64_t PASS, int64_t TR, int64_t MI>
DMLK_CPU_CLONES void forward_tile(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                  const int32_t* xlab, const int32_t* ylab,
                                  const RowColumns<T>& rows, EngineParams<T> p, bool exclude_diag,
                                  PassAcc<PASS, T>* acc) {
  constexpr int64_t kDot = kTransformDot;  // the rows hold v from here on
  constexpr int64_t kSetTr = TR == kTransformCircle ? TR : kDot;  // per-set values in lse2
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r0 + r;
    T* s = tile + r * nc;
    const int diag = diag_column(exclude_diag, i, c0, nc);
    const int inc = static_cast<int>(nc);
    if constexpr (TR == kTransformUnitDistance) {
#pragma omp simd
      for (int c = 0; c < inc; ++c) s[c] = engine_value<TR>(s[c], CpuSqrt());
    }
    if constexpr (PASS == kPassExtrema) {
      extrema_row<T, kDot>(s, inc, ylab + c0, xlab[i], diag, acc[r]);
    } else if constexpr (PASS == kPassLse2) {
      lse2_row<T, kSetTr, MI>(s, inc, ylab + c0, xlab[i], diag, rows.max_neg[i], rows.min_pos[i],
                            p, acc[r]);
    } else if constexpr (PASS == kPassPosSoftplus) {
      pos_softplus_row<T, kDot, MI>(s, inc, ylab + c0, xlab[i], diag, rows.max_neg[i],
                                    rows.min_pos[i], rows.L[i], p, acc[r]);
    } else if constexpr (PASS == kPassLiftedPairs) {  // the symmetric case: column j's L is row j's
      lifted_pairs_row<T>(s, inc, ylab + c0, xlab[i], diag, rows.L[i], rows.L + c0, p, acc[r]);
    } else {
      hinge_row<T>(s, inc, ylab + c0, xlab[i], diag, rows.L[i], p, acc[r]);
    }
  }
}

// A pair's term under a fixed shift: e^(u - U) of its set (same label: the positives). u - U is
// at most ~0 and never NaN (the shift's bound holds for finite rows only: fixed_shift), so the exp
// skips its NaN and overflow selects.
template <typename T>
DMLK_CPU_INLINE T fixed_shift_exp(T v, bool same, const EngineParams<T>& p, FixedShift<T> u,
                                  const CpuExpUpTo88& ex) {
  return ex(same ? p.sc_pos * v + p.off_pos - u.pos : p.sc_neg * v + p.off_neg - u.neg);
}

// After the lse2 pass with a fixed shift (out holds every row's two LSEs): the rows whose set has a
// member but whose LSE lies more than kFixedShiftWidth below U (their terms may have left the
// normal range: possible once the window is wider than that) are recomputed with a running
// maximum, 1 x M products per row, in row blocks of the list (fixed by the data: the bits do not
// depend on the thread count). y is x and ylab xlab in the symmetric case.
template <typename T, int64_t TR, int64_t MI>
void lse2_rows_below_window(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab,
                            const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
                            bool exclude_diag, FixedShift<T> u, at::Tensor& out) {
  const int64_t n = x.size(0), m = y.size(0);
  T* o = out.data_ptr<T>();
  const int64_t cols = out.size(1);
  std::vector<int64_t> count(n + m, 0);  // y's label counts (label codes are < n + m)
  for (int64_t j = 0; j < m; ++j) ++count[ylab[j]];
  const auto below = [](T lse, T top) {
    return !(lse >= top - static_cast<T>(kFixedShiftWidth<T>));  // NaN too: recomputed alike
  };
  std::vector<int64_t> redo;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t same = count[xlab[i]];
    const bool own = exclude_diag && i < m && ylab[i] == xlab[i];  // the excluded self-pair
    const bool has_pos = same > (own ? 1 : 0), has_neg = same < m;
    if ((has_pos && below(o[i * cols], u.pos)) || (has_neg && below(o[i * cols + 1], u.neg))) redo.push_back(i);
  }
  if (redo.empty()) return;
  const int64_t n_redo = static_cast<int64_t>(redo.size());
  const auto index = at::from_blob(redo.data(), {n_redo}, at::kLong).clone();
  parallel_row_blocks(n_redo, [&](int64_t b0, int64_t b1) {
    auto buffer = at::empty({kRowBlock * std::min(kColBlock, m)}, x.options());
    std::vector<PassAcc<kPassLse2, T>> acc(kRowBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k0 = b * kRowBlock, nr = std::min(kRowBlock, n_redo - k0);
      const auto xb = x.index_select(0, index.narrow(0, k0, nr));
      for (int64_t r = 0; r < nr; ++r) acc[r] = PassAcc<kPassLse2, T>();
      for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, m - c0);
        auto tile = buffer.narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(tile, xb, y.narrow(0, c0, nc).t());
        T* t = tile.data_ptr<T>();
        for (int64_t r = 0; r < nr; ++r) {  // one row at a time: its global index finds its self-pair
          forward_tile<T, kPassLse2, TR, MI>(t + r * nc, 1, nc, redo[k0 + r], c0, xlab, ylab, rows, p,
                                             exclude_diag, acc.data() + r);
        }
      }
      for (int64_t r = 0; r < nr; ++r) acc[r].store(o + redo[k0 + r] * cols);
    }
  });
}

// The lse2 pass with a fixed shift on one tile (rows r0.., columns c0..; transforms 0 and 1,
// mining 0): one sweep per row, each pair's exp(u - U) summed per set, merged at U. A row sharing
// no label with the tile's columns (code_range) sums its negatives alone: no label test, no
// positives' sum (an empty sum, 0, as the full loop gives it).
template <typename T, int64_t TR>
DMLK_CPU_CLONES void lse2_fixed_tile(const T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                     const int32_t* xlab, const int32_t* ylab, EngineParams<T> p,
                                     bool exclude_diag, FixedShift<T> u, Lse2Acc<T>* acc) {
  const CpuExpUpTo88 ex;
  const int inc = static_cast<int>(nc);
  const int32_t* col_lab = ylab + c0;
  const CodeRange col_codes = code_range(col_lab, nc);
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = tile + r * nc;
    const int64_t i = r0 + r;
    const int32_t li = xlab[i];
    T sp = T(0), sn = T(0);
    if (!col_codes.holds(li)) {
#pragma omp simd reduction(+ : sn)
      for (int c = 0; c < inc; ++c) {
        const T v = engine_value<TR>(s[c], CpuSqrt());
        sn += fixed_shift_exp(v, false, p, u, ex);
      }
    } else {
      const int diag = diag_column(exclude_diag, i, c0, nc);
#pragma omp simd reduction(+ : sp, sn)
      for (int c = 0; c < inc; ++c) {
        const T v = engine_value<TR>(s[c], CpuSqrt());
        const bool same = col_lab[c] == li;
        const T e = fixed_shift_exp(v, same, p, u, ex);
        sp += same && c != diag ? e : T(0);
        sn += same ? T(0) : e;
      }
    }
    acc[r].pos.merge(u.pos, sp);
    acc[r].neg.merge(u.neg, sn);
  }
}

// The lse2 pass with a fixed shift against a y of at least as many rows as x (the class-weight
// losses: a batch against its C weight rows), column-parallel (engine_cpu.h): tasks (tall row
// block, chunk of y's column blocks), each folding its tiles into its chunk's sums per row, merged
// in chunk order (with one shift, a merge is an addition). Row-block tasks would leave a batch of
// one row block (N <= 128) to one core, and MKL runs 128-row tiles well below its rate.
template <typename T, int64_t TR>
void lse2_fixed_wide(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab, const int32_t* ylab,
                     EngineParams<T> p, bool exclude_diag, FixedShift<T> u, at::Tensor& out) {
  const int64_t n = x.size(0), m = y.size(0);
  if (n == 0) return;
  const int64_t rows = std::min(kTallRowBlock, n), row_blocks = ceil_div(n, rows);
  const int64_t chunks = col_chunks(m, kChunkPartialBytes / (n * int64_t(sizeof(Lse2Acc<T>))));
  std::vector<Lse2Acc<T>> partial(chunks * n);  // chunk k's sums of row i at k * n + i
  parallel_blocks(row_blocks * chunks, [&](int64_t t0, int64_t t1) {
    auto buffer = at::empty({rows * std::min(kColBlock, std::max<int64_t>(m, 1))}, x.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / chunks * rows, k = t % chunks, nr = std::min(rows, n - r0);
      const auto xb = x.narrow(0, r0, nr);
      const auto [c_begin, c_end] = chunk_columns(m, chunks, k);
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, c_end - c0);
        auto tile = buffer.narrow(0, 0, nr * nc).view({nr, nc});
        at::mm_out(tile, xb, y.narrow(0, c0, nc).t());
        lse2_fixed_tile<T, TR>(tile.data_ptr<T>(), nr, nc, r0, c0, xlab, ylab, p, exclude_diag, u,
                               partial.data() + k * n + r0);
      }
    }
  });
  T* o = out.data_ptr<T>();
  const int64_t cols = out.size(1);
  for (int64_t i = 0; i < n; ++i) {
    Lse2Acc<T> acc = partial[i];
    for (int64_t k = 1; k < chunks; ++k) acc.merge(partial[k * n + i]);
    acc.store(o + i * cols);
  }
}

template <typename T, int64_t PASS, int64_t TR, int64_t MI>
void forward_impl(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab,
                  const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
                  bool exclude_diag, at::Tensor& out) {
  const int64_t n = x.size(0), m = y.size(0);
  T* o = out.data_ptr<T>();
  const int64_t cols = out.size(1);
  // lse2 without mining: one sweep per tile row where a fixed shift bounds every value
  // (engine_cpu.h, FixedShift), the rows whose LSE falls below its window recomputed after;
  // column-parallel against a y at least as tall as x (lse2_fixed_wide).
  std::optional<FixedShift<T>> shift;
  if constexpr (PASS == kPassLse2 && MI == kMiningNone && TR != kTransformCircle) {
    if (x.size(1) > 0) shift = fixed_shift<T, TR>(x, y, p);
    if (shift && m >= n) {
      lse2_fixed_wide<T, TR>(x, y, xlab, ylab, p, exclude_diag, *shift, out);
      lse2_rows_below_window<T, TR, MI>(x, y, xlab, ylab, rows, p, exclude_diag, *shift, out);
      return;
    }
  }
  // Passes 2 and 3 sum over positive pairs only: a row block visits only the columns from the
  // first to the last one sharing a label with one of its rows (all of them for shuffled
  // labels; a few tiles when the rows are sorted by label, as the fused NT-Xent and Lifted
  // Structure losses do).
  constexpr bool kPositivesOnly = PASS == kPassPosSoftplus || PASS == kPassLiftedPairs;
  parallel_row_blocks(n, [&](int64_t b0, int64_t b1) {
    auto buffer = at::empty({kRowBlock * std::min(kColBlock, std::max<int64_t>(m, 1))}, x.options());
    std::vector<PassAcc<PASS, T>> acc(kRowBlock);
    std::vector<int64_t> block_of_code(kPositivesOnly ? n + m : 0, -1);  // label codes are < n + m
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRowBlock, nr = std::min(kRowBlock, n - r0);
      for (int64_t r = 0; r < nr; ++r) acc[r] = PassAcc<PASS, T>();
      const auto xb = x.narrow(0, r0, nr);
      int64_t c_begin = 0, c_end = m;
      if constexpr (kPositivesOnly) {
        for (int64_t r = 0; r < nr; ++r) block_of_code[xlab[r0 + r]] = b;
        c_begin = m;
        c_end = 0;
        for (int64_t c = 0; c < m; ++c) {
          if (block_of_code[ylab[c]] == b) {
            c_begin = std::min(c_begin, c);
            c_end = c + 1;
          }
        }
      }
      for (int64_t c0 = c_begin; c0 < c_end; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, c_end - c0);
        auto tile = buffer.narrow(0, 0, nr * nc).view({nr, nc});
        if (x.size(1) == 0) {
          tile.zero_();
        } else {
          at::mm_out(tile, xb, y.narrow(0, c0, nc).t());
        }
        if constexpr (PASS == kPassLse2 && MI == kMiningNone && TR != kTransformCircle) {
          if (shift) {
            lse2_fixed_tile<T, TR>(tile.data_ptr<T>(), nr, nc, r0, c0, xlab, ylab, p, exclude_diag,
                                   *shift, acc.data());
            continue;
          }
        }
        forward_tile<T, PASS, TR, MI>(tile.data_ptr<T>(), nr, nc, r0, c0, xlab, ylab, rows, p,
                                      exclude_diag, acc.data());
      }
      for (int64_t r = 0; r < nr; ++r) acc[r].store(o + (r0 + r) * cols);
    }
  });
  if constexpr (PASS == kPassLse2 && MI == kMiningNone && TR != kTransformCircle) {
    if (shift) lse2_rows_below_window<T, TR, MI>(x, y, xlab, ylab, rows, p, exclude_diag, *shift, out);
  }
}

// The lse2 pass with a fixed shift on an off-diagonal tile of the symmetric case (no self-pair):
// each pair's exp(u - U) once, into row i's sums and into column j's (rows b's) in cols (2 x nb,
// zeroed: pos, then neg).
template <typename T, int64_t TR>
DMLK_CPU_CLONES void lse2_fixed_sym_tile(const T* tile, int64_t na, int64_t nb, const int32_t* row_lab,
                                         const int32_t* col_lab, EngineParams<T> p, FixedShift<T> u,
                                         Lse2Acc<T>* acc_rows, T* cols) {
  const CpuExpUpTo88 ex;
  const int inb = static_cast<int>(nb);
  T *c_pos = cols, *c_neg = cols + nb;
  for (int64_t r = 0; r < na; ++r) {
    const T* s = tile + r * nb;
    const int32_t li = row_lab[r];
    T sp = T(0), sn = T(0);
#pragma omp simd reduction(+ : sp, sn)
    for (int c = 0; c < inb; ++c) {
      const T v = engine_value<TR>(s[c], CpuSqrt());
      const bool same = col_lab[c] == li;
      const T e = fixed_shift_exp(v, same, p, u, ex);
      const T ep = same ? e : T(0), en = same ? T(0) : e;
      sp += ep;
      sn += en;
      c_pos[c] += ep;
      c_neg[c] += en;
    }
    acc_rows[r].pos.merge(u.pos, sp);
    acc_rows[r].neg.merge(u.neg, sn);
  }
}

// The extrema pass on an off-diagonal tile of the symmetric case (no self-pair): each pair's v
// once, into row i's extrema and into column j's (rows b's) in cols (3 x nb, starting at -inf /
// +inf / 0): max over negatives (a kept NaN flagged in the third row), min over positives.
template <typename T, int64_t TR>
DMLK_CPU_CLONES void extrema_sym_tile(const T* tile, int64_t na, int64_t nb, const int32_t* row_lab,
                                      const int32_t* col_lab, ExtremaAcc<T>* acc_rows, T* cols) {
  const int inb = static_cast<int>(nb);
  T *c_mx = cols, *c_mn = cols + nb, *c_nan = cols + 2 * nb;
  for (int64_t r = 0; r < na; ++r) {
    const T* s = tile + r * nb;
    const int32_t li = row_lab[r];
    T mx = neg_infinity<T>(), mn = pos_infinity<T>();
    int nan_neg = 0;
#pragma omp simd reduction(max : mx) reduction(min : mn) reduction(| : nan_neg)
    for (int c = 0; c < inb; ++c) {
      const T v = engine_value<TR>(s[c], CpuSqrt());
      const bool kp = col_lab[c] == li, kn = !kp;
      mx = (kn && v > mx) ? v : mx;
      mn = (kp && v < mn) ? v : mn;
      nan_neg |= static_cast<int>(kn && v != v);
      c_mx[c] = (kn && v > c_mx[c]) ? v : c_mx[c];
      c_mn[c] = (kp && v < c_mn[c]) ? v : c_mn[c];
      c_nan[c] = (kn && v != v) ? T(1) : c_nan[c];
    }
    acc_rows[r].merge(nan_neg ? quiet_nan<T>() : mx, mn);
  }
}

// The hinge pass on an off-diagonal tile of the symmetric case: each pair's v once, its terms with
// row i's L into acc_rows[r] and with row j's L into column j's sums in cols (4 x nb, zeroed).
template <typename T, int64_t TR>
DMLK_CPU_CLONES void hinge_sym_tile(const T* tile, int64_t na, int64_t nb, const int32_t* row_lab,
                                    const int32_t* col_lab, const T* row_L, const T* col_L,
                                    EngineParams<T> p, HingeAcc<T>* acc_rows, T* cols) {
  const int inb = static_cast<int>(nb);
  T *c_sp = cols, *c_cp = cols + nb, *c_sn = cols + 2 * nb, *c_cn = cols + 3 * nb;
  for (int64_t r = 0; r < na; ++r) {
    const T* s = tile + r * nb;
    const int32_t li = row_lab[r];
    const T L_i = row_L[r];
    T sp = T(0), cp = T(0), sn = T(0), cn = T(0);
#pragma omp simd reduction(+ : sp, cp, sn, cn)
    for (int c = 0; c < inb; ++c) {
      const T v = engine_value<TR>(s[c], CpuSqrt());
      const bool kp = col_lab[c] == li, kn = !kp;
      const HingeTerms<T> t = engine_hinge_terms(v, kp, kn, L_i, p);
      sp += t.pos;
      cp += t.pos_nonzero;
      sn += t.neg;
      cn += t.neg_nonzero;
      const HingeTerms<T> u = engine_hinge_terms(v, kp, kn, col_L[c], p);
      c_sp[c] += u.pos;
      c_cp[c] += u.pos_nonzero;
      c_sn[c] += u.neg;
      c_cn[c] += u.neg_nonzero;
    }
    acc_rows[r].merge(sp, cp, sn, cn);
  }
}

// An off-diagonal tile of the symmetric case reduced per row (rows a0..) and per column (rows
// b0..'s) in one sweep: extrema, hinge, or lse2 with a fixed shift. cols: 4 x nb scratch.
template <typename T, int64_t PASS, int64_t TR>
void both_sides_tile(const T* t, int64_t na, int64_t nb, int64_t a0, int64_t b0, const int32_t* lab,
                     const RowColumns<T>& rows, EngineParams<T> p,
                     const std::optional<FixedShift<T>>& shift, PassAcc<PASS, T>* acc, T* cols) {
  if constexpr (PASS == kPassLse2) {
    std::fill(cols, cols + 2 * nb, T(0));
    lse2_fixed_sym_tile<T, TR>(t, na, nb, lab + a0, lab + b0, p, *shift, acc + a0, cols);
    for (int64_t c = 0; c < nb; ++c) {
      acc[b0 + c].pos.merge(shift->pos, cols[c]);
      acc[b0 + c].neg.merge(shift->neg, cols[nb + c]);
    }
  } else if constexpr (PASS == kPassExtrema) {
    std::fill(cols, cols + nb, neg_infinity<T>());
    std::fill(cols + nb, cols + 2 * nb, pos_infinity<T>());
    std::fill(cols + 2 * nb, cols + 3 * nb, T(0));
    extrema_sym_tile<T, TR>(t, na, nb, lab + a0, lab + b0, acc + a0, cols);
    for (int64_t c = 0; c < nb; ++c) {
      acc[b0 + c].merge(cols[2 * nb + c] != T(0) ? quiet_nan<T>() : cols[c], cols[nb + c]);
    }
  } else if constexpr (PASS == kPassHinge) {
    std::fill(cols, cols + 4 * nb, T(0));
    hinge_sym_tile<T, TR>(t, na, nb, lab + a0, lab + b0, rows.L + a0, rows.L + b0, p, acc + a0,
                          cols);
    for (int64_t c = 0; c < nb; ++c) {
      acc[b0 + c].merge(cols[c], cols[nb + c], cols[2 * nb + c], cols[3 * nb + c]);
    }
  }
}

// The symmetric case (y is x, the same labels; engine_cpu.h's parallel_sym_tiles): one product per
// tile pair (a, b): the extrema and hinge passes, and the lse2 pass with a fixed shift, reduce the
// tile's terms per column too; the others run the epilogue again on its transpose for rows b.
// Each row's accumulator lives across the rounds.
template <typename T, int64_t PASS, int64_t TR, int64_t MI>
void forward_sym_impl(const at::Tensor& x, const int32_t* lab, const RowColumns<T>& rows,
                      EngineParams<T> p, bool exclude_diag, at::Tensor& out) {
  const int64_t n = x.size(0), bs = sym_block(n);
  std::vector<PassAcc<PASS, T>> acc(n);
  std::optional<FixedShift<T>> shift;
  if constexpr (PASS == kPassLse2 && MI == kMiningNone && TR != kTransformCircle) {
    shift = fixed_shift<T, TR>(x, p);
  }
  parallel_sym_tiles(n, 2 * bs * bs, x.options(), [&](int64_t a0, int64_t na, int64_t b0,
                                                      int64_t nb, at::Tensor& scratch) {
    auto tile = scratch.narrow(0, 0, na * nb).view({na, nb});
    at::mm_out(tile, x.narrow(0, a0, na), x.narrow(0, b0, nb).t());
    // Extrema, hinge, and lse2 with a fixed shift: an off-diagonal tile's terms reduced per row and
    // per column in one sweep (the diagonal tiles below).
    constexpr bool kColumnSums = (PASS == kPassExtrema || PASS == kPassHinge ||
                                  (PASS == kPassLse2 && MI == kMiningNone)) &&
                                 TR != kTransformCircle;
    if constexpr (kColumnSums) {
      if (a0 != b0 && (PASS != kPassLse2 || shift)) {
        both_sides_tile<T, PASS, TR>(tile.template data_ptr<T>(), na, nb, a0, b0, lab, rows, p, shift,
                                     acc.data(), scratch.template data_ptr<T>() + bs * bs);
        return;
      }
    }
    if (a0 != b0) {  // rows b against columns a: the transpose, before the epilogue overwrites it
      auto tile_t = scratch.narrow(0, bs * bs, nb * na).view({nb, na});
      tile_t.copy_(tile.t());
      forward_tile<T, PASS, TR, MI>(tile_t.data_ptr<T>(), nb, na, b0, a0, lab, lab, rows, p,
                                    exclude_diag, acc.data() + b0);
    }
    forward_tile<T, PASS, TR, MI>(tile.data_ptr<T>(), na, nb, a0, b0, lab, lab, rows, p,
                                  exclude_diag, acc.data() + a0);
  });
  T* o = out.data_ptr<T>();
  const int64_t cols = out.size(1);
  for (int64_t i = 0; i < n; ++i) acc[i].store(o + i * cols);
  if constexpr (PASS == kPassLse2 && MI == kMiningNone && TR != kTransformCircle) {
    if (shift) lse2_rows_below_window<T, TR, MI>(x, x, lab, lab, rows, p, exclude_diag, *shift, out);
  }
}

at::Tensor pair_engine_forward_cpu(const at::Tensor& x_in, const at::Tensor& y_in,
                                   const at::Tensor& x_labels, const at::Tensor& y_labels,
                                   const at::Tensor& row_in, int64_t pass_kind, int64_t transform,
                                   int64_t mining, at::ArrayRef<double> params, bool exclude_diag) {
  check_pair_engine_args(x_in, y_in, x_labels, y_labels, row_in, nullptr, pass_kind, transform,
                         mining, params, exclude_diag, /*symmetric=*/false);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu_dtype(x_in);
  const auto st = stats_dtype(x_in.scalar_type());
  const int64_t n = x_in.size(0);
  auto out = at::empty({n, engine_out_columns(pass_kind)}, x_in.options().dtype(st));
  if (n == 0) return out;
  const auto x = x_in.contiguous();
  const auto y = engine_operand(y_in);
  const auto [xl, yl] = label_codes(x_labels, y_labels);
  const bool symmetric =
      same_operands(x_in, y_in, x_labels, y_labels) && use_sym_tiles(n, x.size(1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_engine_forward_cpu", [&] {
    const RowColumns<scalar_t> rows(row_in, nullptr, st);
    const auto p = make_params<scalar_t>(params);
    const int32_t* xlab = xl.data_ptr<int32_t>();
    const int32_t* ylab = yl.data_ptr<int32_t>();
    dispatch_forward_pass(pass_kind, transform, mining, [&](auto pass, auto tr, auto mi) {
      constexpr int64_t PASS = decltype(pass)::value, TR = decltype(tr)::value;
      constexpr int64_t MI = decltype(mi)::value;
      // Passes 2 and 3 visit only the positives' columns: they keep the row-block walk.
      constexpr bool kAllColumns = PASS == kPassExtrema || PASS == kPassLse2 || PASS == kPassHinge;
      if (kAllColumns && symmetric) {
        forward_sym_impl<scalar_t, PASS, TR, MI>(x, xlab, rows, p, exclude_diag, out);
      } else {
        forward_impl<scalar_t, PASS, TR, MI>(x, y, xlab, ylab, rows, p, exclude_diag, out);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) { m.impl("pair_engine_forward", &pair_engine_forward_cpu); }

}  // namespace dmlkern
