// The CPU engine's host side, shared by its forward (pair_engine_forward_cpu.cpp) and backward
// (pair_engine_backward_cpu.cpp): tile sizes, the row-block loop, the per-row inputs as
// columns, label codes.
//
// Row blocks run in parallel (at::parallel_for); each walks column tiles whose similarities
// come from BLAS (at::mm_out into a per-task tile buffer), then a per-tile epilogue consumes
// the tile. A batch against itself may instead run only the tiles a <= b, in rounds of disjoint
// blocks (parallel_sym_tiles). Every output row has exactly one writer at a time: no atomics;
// with single-threaded tile products (SerialBlasGuard) the bits do not depend on the thread
// count either. Nothing of size N x M is ever allocated.
#pragma once
#include "vec_math.h"  // first: its pragma must precede every other include

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unique2.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "../engine_host.h"

namespace dmlkern {

constexpr int64_t kRowBlock = 128;
constexpr int64_t kColBlock = 512;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The column-parallel schedules (the backward's one sweep, the forward's lse2 pass against a wide
// y): tall tiles of kTallRowBlock x kColBlock, and tasks that own chunks of y's column blocks.
// 512-row tiles (1 MiB in fp32) run MKL's depth-D products near its full rate; 128-row ones ran
// at ~60-70 % of it on a 2-core Xeon. The chunks are a fixed grouping of the column blocks (at
// most kColChunks, none empty): the bits do not depend on the thread count. Each chunk keeps
// per-row partials, merged in chunk order, within kChunkPartialBytes.
constexpr int64_t kTallRowBlock = 512;
constexpr int64_t kColChunks = 16;
constexpr int64_t kChunkPartialBytes = int64_t(64) << 20;

// How many chunks the column blocks of m columns form: at most min(kColChunks, max_chunks), at
// least 1 (also for m = 0).
inline int64_t col_chunks(int64_t m, int64_t max_chunks = kColChunks) {
  const int64_t blocks = ceil_div(m, kColBlock);
  const int64_t cap = std::max<int64_t>(1, std::min(kColChunks, max_chunks));
  return blocks == 0 ? 1 : ceil_div(blocks, ceil_div(blocks, cap));
}

// The columns [first, second) of chunk k of `chunks` (col_chunks) over m columns: whole blocks.
inline std::pair<int64_t, int64_t> chunk_columns(int64_t m, int64_t chunks, int64_t k) {
  const int64_t per_chunk = ceil_div(ceil_div(m, kColBlock), chunks) * kColBlock;
  return {std::min(m, k * per_chunk), std::min(m, (k + 1) * per_chunk)};
}

// The tile products run with BLAS pinned to one thread on the calling thread, for the
// lifetime of this guard (one per parallel_for body). Why: MKL threads each product itself
// (MKL_VERBOSE shows Dyn:0 and NThr = the torch thread count even for the products inside
// at::parallel_for's workers, and for the inline body when there is one row block, e.g.
// N-pairs' anchors), and MKL splits a product by its thread count
// (reproducible only at a fixed count): on MKL's AVX2 code path (AMD EPYC) values and gradients
// differed by an ulp between 1, 2 and 4 threads. Pinned, every product is single-threaded
// whatever the thread count, so results are bit-identical across thread counts (each output
// row still has one writer); the engine parallelises over row blocks itself, and a 128 x 512
// tile product is too small for MKL's threads to pay (they cost more than they saved). Looked
// up at run time (torch exports it when built with MKL) as MKL_Set_Num_Threads_Local, the C
// entry point mkl_service.h's mkl_set_num_threads_local macro names (the lowercase symbol is
// the Fortran one, taking int*): a no-op without MKL (other BLAS: see the README's determinism
// contract), and no environment variable needed.
class SerialBlasGuard {
 public:
  SerialBlasGuard() : previous_(set_local() != nullptr ? set_local()(1) : -1) {}
  ~SerialBlasGuard() {
    if (previous_ >= 0) set_local()(previous_);  // 0 restores MKL's global setting
  }
  SerialBlasGuard(const SerialBlasGuard&) = delete;
  SerialBlasGuard& operator=(const SerialBlasGuard&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal set_local() {
#if defined(__unix__) || defined(__APPLE__)
    static const SetLocal f =
        reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    return f;
#else
    return nullptr;
#endif
  }
  int previous_;
};

// Subnormal numbers flushed to zero (FTZ) and read as zero (DAZ) on the calling thread, for the
// lifetime of this guard (x86; elsewhere nothing changes). Why: where a row's logits span more
// than ~90 (raw class weights: L-Softmax, Softmax), most of a backward tile's weights
// exp(s - lse) are subnormal, and an x86 core takes a microcode assist for each subnormal operand
// or result: MKL's products on such tiles ran ~7x slower (the L-Softmax backward at N=1024,
// C=131072 on a Xeon, one thread: 7.0 s against 0.97 s). A value below 2^-126 (fp32; 2^-1022 in
// fp64) is then 0: no sum of the engine's values moves by more than that, and every thread runs
// in the same mode, so the bits still do not depend on the thread count.
class FlushSubnormalsGuard {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormalsGuard() : previous_(_mm_getcsr()) { _mm_setcsr(previous_ | kFtzDaz); }
  ~FlushSubnormalsGuard() { _mm_setcsr(previous_); }
#else
  FlushSubnormalsGuard() {}
#endif
  FlushSubnormalsGuard(const FlushSubnormalsGuard&) = delete;
  FlushSubnormalsGuard& operator=(const FlushSubnormalsGuard&) = delete;

 private:
#if defined(__x86_64__) || defined(_M_X64)
  static constexpr unsigned kFtzDaz = 0x8040;  // MXCSR's flush-to-zero and denormals-are-zero bits
  unsigned previous_;
#endif
};

// Runs body(b0, b1) on ranges of the blocks 0 .. n_blocks - 1, in parallel. Each task runs
// below autograd (worker threads do not inherit the caller's dispatch guard: autograd would
// record every tile product of an input that requires grad, an N x M leak), with serial BLAS
// (bit-identical across thread counts, see SerialBlasGuard) and with subnormals flushed
// (FlushSubnormalsGuard). parallel_row_blocks: over the row blocks of n_rows rows (the engine);
// fixed_mm's blocks are output tiles.
template <typename F>
void parallel_blocks(int64_t n_blocks, F&& body) {
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlasGuard serial_blas;
    const FlushSubnormalsGuard flush_subnormals;
    body(b0, b1);
  });
}

template <typename F>
void parallel_row_blocks(int64_t n_rows, F&& body) {
  parallel_blocks(ceil_div(n_rows, kRowBlock), std::forward<F>(body));
}

// ---------------------------------------------------------------------------
// The symmetric case (y is x, the same labels): S is symmetric, so only the tiles (a, b), a <= b,
// of square blocks are multiplied, each serving rows a against columns b and rows b against
// columns a (half the products). The tiles run in rounds where no block appears twice (a
// round-robin tournament over the blocks, after a round of the diagonal tiles), so each row
// still has one writer at a time, and it takes its tiles in an order fixed by N alone: the bits
// do not depend on the thread count. Used from kSymMinBlocks blocks on (a round has half as many
// tiles as there are blocks: fewer would leave threads idle); the block size depends on N only.
constexpr int64_t kSymMinBlocks = 8;

inline int64_t sym_block(int64_t n) { return n >= 64 * 256 ? 256 : 128; }

inline bool use_sym_tiles(int64_t n, int64_t d) {
  return d > 0 && ceil_div(n, sym_block(n)) >= kSymMinBlocks;
}

// The tiles of each round: pairs of block indices (a, b), a < b.
inline std::vector<std::vector<std::pair<int64_t, int64_t>>> sym_rounds(int64_t n_blocks) {
  const int64_t p = n_blocks + (n_blocks & 1);  // with an odd count, block p - 1 is a bye
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds(p - 1);
  for (int64_t r = 0; r < p - 1; ++r) {
    auto add = [&](int64_t a, int64_t b) {
      if (a < n_blocks && b < n_blocks) rounds[r].emplace_back(std::min(a, b), std::max(a, b));
    };
    add(r, p - 1);
    for (int64_t k = 1; k < p / 2; ++k) add((r + k) % (p - 1), (r - k + p - 1) % (p - 1));
  }
  return rounds;
}

// Runs tile(a0, na, b0, nb, scratch) on every tile of the symmetric schedule: the diagonal
// tiles first (a0 == b0), then the rounds, each in parallel. scratch: this thread's buffer of
// scratch_elems elements of `options`, reused from tile to tile (a fresh buffer per tile would
// page-fault where glibc returns large blocks to the system, e.g. under MALLOC_MMAP_THRESHOLD_).
template <typename F>
void parallel_sym_tiles(int64_t n, int64_t scratch_elems, const at::TensorOptions& options,
                        F&& tile) {
  const int64_t bs = sym_block(n), n_blocks = ceil_div(n, bs);
  std::vector<at::Tensor> scratch(at::get_num_threads());
  auto run = [&](int64_t a, int64_t b) {
    const size_t t = static_cast<size_t>(at::get_thread_num());
    at::Tensor local;  // a thread outside the pool (none expected) gets its own
    at::Tensor& buf = t < scratch.size() ? scratch[t] : local;
    if (!buf.defined()) buf = at::empty({scratch_elems}, options);
    const int64_t a0 = a * bs, b0 = b * bs;
    tile(a0, std::min(bs, n - a0), b0, std::min(bs, n - b0), buf);
  };
  parallel_blocks(n_blocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) run(b, b);
  });
  for (const auto& round : sym_rounds(n_blocks)) {
    parallel_blocks(static_cast<int64_t>(round.size()), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run(round[t].first, round[t].second);
    });
  }
}

// The lse2 pass and its backward (mining 0, transforms 0 and 1) with a fixed shift per set: when
// the values u = sc * v + off of every pair lie within a known window below U (from the rows'
// largest norm), exp(u - U) neither overflows nor leaves the normal range, so the forward's sums
// need no running maximum (one sweep), and in the symmetric case the pair (i, j) and the pair
// (j, i) share their exp: in the forward row i's sum and column j's sum (row j's) take the same
// term, and the backward's two halves are e * (c_i + c_j) with c_k = A_k exp(U - LSE_k) per row.
template <typename T>
struct FixedShift {
  T pos, neg;
};

// The window below U in which a row's LSE keeps its precision: e^-64 (fp32) and e^-512 (fp64) are
// far inside the normal range, so the largest term of such a row keeps its relative precision, and
// the terms that leave the normal range (below e^-87 in fp32) weigh < e^-23 of the row's sum.
template <typename T>
constexpr double kFixedShiftWidth = sizeof(T) == 4 ? 64.0 : 512.0;

// The widest window that takes the fixed shift (Multi-Similarity's beta = 50 on unit rows: 100). A
// row whose LSE lies more than kFixedShiftWidth below U is recomputed with a running maximum in
// the forward (lse2_rows_below_window); the backward then keeps two exps (fixed_shift_coefs).
template <typename T>
constexpr double kFixedShiftMaxWidth = 2.0 * kFixedShiftWidth<T>;

// The largest squared row norm of t (2-D, any strides: a column-major y is read as it is), in
// double: no temporary of t's size. NaN when a row holds NaN, inf when one overflows. Read by
// rows, a chunk stops at its first row above `stop` (returning inf): the caller only needs to
// know that the bound is exceeded. Each row's sum runs over k in order whatever the layout and
// the thread count (a max of such sums: the same bits); several rows at a time, so their sums'
// additions overlap (one row's chain of dependent adds would bound it by their latency: ~100 us
// for a 1000 x 128 block, more than its product).
template <typename T>
double max_sq_row_norm(const at::Tensor& t,
                       double stop = std::numeric_limits<double>::infinity()) {
  const int64_t n = t.size(0), d = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  const T* data = t.data_ptr<T>();
  constexpr int64_t kRows = 8;
  auto nan_max = [](double b, double v) { return v > b || v != v ? v : b; };  // NaN wins
  // The squared norms of the `count` rows from base (any layout: in a column-major t, s0 == 1,
  // the entries of a column are contiguous); a compile-time count keeps the sums in registers.
  auto add_rows = [&](const T* base, auto count, double* sq) {
    for (int64_t k = 0; k < d; ++k)
      for (int64_t j = 0; j < int64_t(count); ++j) {
        const double v = double(base[j * s0 + k * s1]);
        sq[j] += v * v;
      }
  };
  // A column-major t (s0 == 1: the class path's unit weight rows) holds the k-th entries of
  // consecutive rows side by side: kColumnRows rows at a time, each k one contiguous run (eight
  // rows would read 32 bytes per k, each k on another page).
  constexpr int64_t kColumnRows = 64;
  auto add_column_rows = [&](const T* base, int64_t count, double* sq) {
    for (int64_t k = 0; k < d; ++k) {
      const T* col = base + k * s1;
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) {
        const double v = double(col[j]);
        sq[j] += v * v;
      }
    }
  };
  const bool by_columns = s0 == 1 && d > 1;
  const int64_t group = by_columns ? kColumnRows : kRows;
  auto chunk_max = [&](int64_t i0, int64_t i1) {
    double b = 0.0;
    for (int64_t i = i0; i < i1; i += group) {
      const int64_t r = std::min(group, i1 - i);
      double sq[kColumnRows] = {};
      if (by_columns) {
        add_column_rows(data + i, r, sq);
      } else if (r == kRows) {
        add_rows(data + i * s0, std::integral_constant<int64_t, kRows>{}, sq);
      } else {
        add_rows(data + i * s0, r, sq);
      }
      for (int64_t j = 0; j < r; ++j) b = nan_max(b, sq[j]);
      if (b > stop) return std::numeric_limits<double>::infinity();
      if (b != b) return b;
    }
    return b;
  };
  // Chunks of >= 2^15 entries (whole groups), their maxima combined in chunk order.
  const int64_t grain = std::max<int64_t>(group, ((int64_t(1) << 15) / std::max<int64_t>(d, 1)) / group * group);
  const int64_t n_chunks = ceil_div(n, grain);
  if (n_chunks <= 1) return chunk_max(0, n);
  std::vector<double> part(n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) part[c] = chunk_max(c * grain, std::min(n, (c + 1) * grain));
  });
  double b = 0.0;
  for (double v : part) b = nan_max(b, v);
  return b;
}

// kFixedShiftMaxWidth with the relative slack of fixed_shift_for (below).
template <typename T>
constexpr double kFixedShiftMaxWidthSlack = kFixedShiftMaxWidth<T> * (1.0 + 1e-6);

// U per set, or nothing when a window is wider than kFixedShiftMaxWidth (or not finite: NaN or inf
// rows keep the two sweeps, which propagate them as the reference does). b bounds |s| over the
// pairs: the largest squared row norm of x against itself, the product of x's and y's largest row
// norms otherwise. A relative slack of 1e-6 lets unit rows (norms 1 up to rounding) take the widest
// window exactly (scale 64: ArcFace's and CosFace's default).
template <typename T, int64_t TR>
std::optional<FixedShift<T>> fixed_shift_for(double b, const EngineParams<T>& p) {
  // transform 1's v = sqrt(max(2 - 2s, 0)) lies in [0, sqrt(2 + 2b)].
  const double v_lo = TR == kTransformDot ? -b : 0.0;
  const double v_hi = TR == kTransformDot ? b : std::sqrt(2.0 + 2.0 * b);
  auto upper = [&](double sc, double off) -> std::optional<double> {
    const double width = std::abs(sc) * (v_hi - v_lo);
    if (!(width <= kFixedShiftMaxWidthSlack<T>)) return std::nullopt;
    return std::max(sc * v_lo, sc * v_hi) + off;
  };
  const auto up = upper(p.sc_pos, p.off_pos), un = upper(p.sc_neg, p.off_neg);
  if (!up || !un) return std::nullopt;
  return FixedShift<T>{static_cast<T>(*up), static_cast<T>(*un)};
}

// The fixed shift of x against itself (the symmetric case).
template <typename T, int64_t TR>
std::optional<FixedShift<T>> fixed_shift(const at::Tensor& x, const EngineParams<T>& p) {
  return fixed_shift_for<T, TR>(max_sq_row_norm<T>(x), p);
}

// The largest b (fixed_shift_for's bound) whose window fits both sets: the window's width grows
// with b. Negative when no b fits (the Lp transform at a scale above 64 / sqrt(2) in fp32).
template <typename T, int64_t TR>
double max_fitting_bound(const EngineParams<T>& p) {
  const double sc = std::max(std::abs(double(p.sc_pos)), std::abs(double(p.sc_neg)));
  if (sc == 0.0) return std::numeric_limits<double>::infinity();
  const double v_width = kFixedShiftMaxWidthSlack<T> / sc;  // the widest range of v that fits
  return TR == kTransformDot ? v_width / 2.0 : (v_width * v_width - 2.0) / 2.0;
}

// The fixed shift of x against y (the two-sided case). The scale is checked first and y's norms
// (the class path's weight block: C rows) are read only as far as the window can still fit: for
// raw class weights it rarely does.
template <typename T, int64_t TR>
std::optional<FixedShift<T>> fixed_shift(const at::Tensor& x, const at::Tensor& y,
                                         const EngineParams<T>& p) {
  const double b_max = max_fitting_bound<T, TR>(p);
  if (!(b_max >= 0.0)) return std::nullopt;
  const double bx = max_sq_row_norm<T>(x);
  if (!std::isfinite(bx)) return std::nullopt;  // NaN or inf rows: no window
  // sqrt(bx) * sqrt(by) <= b_max needs by <= b_max^2 / bx; the 1e-9 slack leaves the exact
  // decision to fixed_shift_for.
  const double stop = bx > 0.0 ? b_max * b_max / bx * (1.0 + 1e-9) : std::numeric_limits<double>::infinity();
  return fixed_shift_for<T, TR>(std::sqrt(bx) * std::sqrt(max_sq_row_norm<T>(y, stop)), p);
}

// Whether the engine's y is x itself and y_labels x_labels (the ops' autograd passes the same
// tensors for a batch against itself): then S is symmetric.
inline bool same_operands(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                          const at::Tensor& y_labels) {
  auto same = [](const at::Tensor& a, const at::Tensor& b) {
    return a.is_same(b) || (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() &&
                            a.strides() == b.strides() && a.scalar_type() == b.scalar_type());
  };
  return same(x, y) && same(x_labels, y_labels);
}

// Per-row inputs as contiguous columns (structure of arrays) in the stats dtype.
template <typename T>
struct RowColumns {
  at::Tensor in_t, coef_t;  // (3, N), (5, 6 or 2, N) owners
  const T* max_neg = nullptr;
  const T* min_pos = nullptr;
  const T* L = nullptr;
  const T* a_pos = nullptr;
  const T* lse_pos = nullptr;
  const T* a_neg = nullptr;
  const T* lse_neg = nullptr;
  const T* b_pos = nullptr;
  const T* c_lift = nullptr;  // row_coef's column 5, when given
  const T* h_pos = nullptr;   // the hinge backward's row_coef (N, 2): H_pos, H_neg
  const T* h_neg = nullptr;

  RowColumns(const at::Tensor& row_in, const at::Tensor* row_coef, at::ScalarType st) {
    in_t = row_in.to(st).t().contiguous();
    const T* in = in_t.data_ptr<T>();
    const int64_t n = row_in.size(0);
    max_neg = in;
    min_pos = in + n;
    L = in + 2 * n;
    if (row_coef != nullptr) {
      coef_t = row_coef->to(st).t().contiguous();
      const T* c = coef_t.data_ptr<T>();
      if (is_hinge_coef(*row_coef)) {
        h_pos = c;
        h_neg = c + n;
        return;
      }
      a_pos = c;
      lse_pos = c + n;
      a_neg = c + 2 * n;
      lse_neg = c + 3 * n;
      b_pos = c + 4 * n;
      if (row_coef->size(1) == 6) c_lift = c + 5 * n;
    }
  }

  // Whether any of the rows c0 .. c0 + nc - 1 has a non-zero B_pos / C_lift coefficient: the
  // tiles where those rows are the columns must compute that term.
  std::pair<bool, bool> column_terms(int64_t c0, int64_t nc) const {
    bool any_b = false, any_lift = false;
    for (int64_t c = c0; c < c0 + nc; ++c) {
      any_b = any_b || b_pos[c] != T(0);
      any_lift = any_lift || (c_lift != nullptr && c_lift[c] != T(0));
    }
    return {any_b, any_lift};
  }
};

// int32 codes of the labels (equal labels <-> equal codes) in [0, N + M), so the epilogue
// compares 32-bit lanes next to fp32 lanes and the backward's PositiveTiles can index a table of
// N + M entries by them. Labels spanning fewer than N + M values (class ids 0..C-1 in a batch of
// most classes): label - min, one pass; up to 4096 labels: their rank among the distinct values
// (a sort of a small copy); others: at::_unique2's dense codes (whose hash table costs ~40 us a
// call at small batches, twice per forward + backward).
inline std::pair<at::Tensor, at::Tensor> label_codes(const at::Tensor& x_labels,
                                                     const at::Tensor& y_labels) {
  const int64_t total = x_labels.size(0) + y_labels.size(0);
  if (x_labels.scalar_type() == at::kLong && y_labels.scalar_type() == at::kLong && total > 0 &&
      total <= (int64_t(1) << 30)) {
    const at::Tensor xl = x_labels.contiguous(), yl = y_labels.contiguous();
    const int64_t* xs = xl.data_ptr<int64_t>();
    const int64_t* ys = yl.data_ptr<int64_t>();
    int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
    for (int64_t i = 0; i < xl.size(0); ++i) lo = std::min(lo, xs[i]), hi = std::max(hi, xs[i]);
    for (int64_t i = 0; i < yl.size(0); ++i) lo = std::min(lo, ys[i]), hi = std::max(hi, ys[i]);
    // (the span in uint64: exact for any hi >= lo, where int64 could overflow)
    const bool offset = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo) < static_cast<uint64_t>(total);
    if (offset || total <= 4096) {
      std::vector<int64_t> distinct;
      if (!offset) {
        distinct.assign(xs, xs + xl.size(0));
        distinct.insert(distinct.end(), ys, ys + yl.size(0));
        std::sort(distinct.begin(), distinct.end());
        distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
      }
      auto codes_of = [&](const at::Tensor& labels, const int64_t* values) {
        at::Tensor codes = at::empty({labels.size(0)}, labels.options().dtype(at::kInt));
        int32_t* out = codes.data_ptr<int32_t>();
        for (int64_t i = 0; i < labels.size(0); ++i) {
          out[i] = static_cast<int32_t>(
              offset ? values[i] - lo
                     : std::lower_bound(distinct.begin(), distinct.end(), values[i]) - distinct.begin());
        }
        return codes;
      };
      return {codes_of(xl, xs), codes_of(yl, ys)};
    }
  }
  const int64_t n = x_labels.size(0);
  const auto all = at::cat({x_labels, y_labels});
  const auto inverse = std::get<1>(at::_unique2(all, /*sorted=*/false, /*return_inverse=*/true,
                                                /*return_counts=*/false));
  const auto codes = inverse.reshape({-1}).to(at::kInt).contiguous();
  return {codes.narrow(0, 0, n), codes.narrow(0, n, all.size(0) - n)};
}

// The smallest and largest label code of a tile's columns. Codes keep the labels' order
// (label_codes), so a row whose code lies outside the range shares no label with the tile's
// columns: its pairs there are all negatives, and the epilogues take their negatives-only loops
// (the class path's rows: a row's class is one column of one tile of the block, or none).
struct CodeRange {
  int32_t lo, hi;
  bool holds(int32_t code) const { return code >= lo && code <= hi; }
};

inline CodeRange code_range(const int32_t* codes, int64_t n) {
  CodeRange r{std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()};
  for (int64_t c = 0; c < n; ++c) r.lo = std::min(r.lo, codes[c]), r.hi = std::max(r.hi, codes[c]);
  return r;
}

// The column of the excluded self-pair i == j in a tile starting at column c0, or -1.
inline int diag_column(bool exclude_diag, int64_t i, int64_t c0, int64_t nc) {
  return exclude_diag && i >= c0 && i < c0 + nc ? static_cast<int>(i - c0) : -1;
}

// An operand as the engine reads it: row-major, or column-major as it is (a transposed view,
// e.g. the unit rows of a column block of PML's (D, C) weight): the tile products take either
// layout, so the caller need not make a transposing copy.
inline bool is_column_major(const at::Tensor& t) {
  return t.dim() == 2 && t.size(0) > 1 && t.stride(0) == 1 && t.stride(1) >= t.size(0);
}

inline at::Tensor engine_operand(const at::Tensor& t) {
  return is_column_major(t) ? t : t.contiguous();
}

inline void check_cpu_dtype(const at::Tensor& x, const char* name = "x") {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dmlkern: the CPU backend takes float32 or float64 ", name, ", got ", x.scalar_type());
}

}  // namespace dmlkern
