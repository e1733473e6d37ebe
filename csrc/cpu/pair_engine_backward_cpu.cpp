// CPU backward of the pair engine (docs/ENGINE.md): dmlkern::pair_engine_backward. Each tile
// is turned in place into dl/ds and multiplied back (grad_own[block] += W @ other[tile]);
// grad_x and grad_y are separate passes over own-row blocks, so every output row has one
// writer. The symmetric backward (y is x: grad_x + grad_y) is one pass over x's row blocks
// whose epilogue writes both halves' weights of each tile (grad_sym): 2 products per tile
// instead of 4. The row-block loop and tiling are engine_cpu.h's.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace dmlkern {

namespace {

// ---------------------------------------------------------------------------
// Backward epilogues: a similarity tile row turned in place into dl/ds.

// A per-row input as one tile row's epilogue reads it, indexed by column: the tile row's own
// row gives one value for every column (Broadcast), the columns' rows one value each (T*).
template <typename T>
struct Broadcast {
  T value;
  DMLK_CPU_INLINE T operator[](int) const { return value; }
};

// dl/ds of the pairs (i, j) of one tile row, with row i's coefficients and L_j = row_in[j, 2]
// (read only with HAS_LIFT: the symmetric case). grad_x side: the tile row is x row i against
// y columns j = c0 + c, so the coefficients are Broadcast and L_j per column. grad_y side: y
// row j against x columns i = c0 + c, so the coefficients are per column (arrays offset to c0
// by the caller) and L_j is Broadcast.
template <typename T, int64_t TR, int64_t MI, bool HAS_B, bool HAS_LIFT, typename Coef,
          typename Lj>
DMLK_CPU_INLINE void grad_row_own(T* w, int nc, const int32_t* lab, int32_t l_own, int diag,
                                  Coef max_neg, Coef min_pos, Coef a_pos, Coef lse_pos, Coef a_neg,
                                  Coef lse_neg, Coef b_pos, Coef L, Coef c_lift, Lj L_j,
                                  const EngineParams<T>& p) {
  const CpuExp ex;
  const CpuLog1p l1p;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const bool same = lab[c] == l_own;
    const bool kp = engine_pos_kept<MI>(v, same, c == diag, max_neg[c], p.eps);
    const bool kn = engine_neg_kept<MI>(v, same, min_pos[c], p.eps);
    const T cl = HAS_LIFT ? c_lift[c] : T(0);
    const T lj = HAS_LIFT ? L_j[c] : T(0);
    w[c] = engine_pair_grad<TR, HAS_B, HAS_LIFT>(v, kp, kn, a_pos[c], lse_pos[c], a_neg[c],
                                                 lse_neg[c], b_pos[c], L[c], p, ex, cl, lj, l1p);
  }
}

// One tile row with the (HAS_B, HAS_LIFT) variant its coefficients need.
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void grad_row_x(bool has_b, bool has_lift, T* w, int nc, const int32_t* lab,
                                int32_t li, int diag, const RowColumns<T>& rows, int64_t i,
                                int64_t c0, const EngineParams<T>& p) {
  using B = Broadcast<T>;
  const B mx{rows.max_neg[i]}, mn{rows.min_pos[i]}, ap{rows.a_pos[i]}, lp{rows.lse_pos[i]};
  const B an{rows.a_neg[i]}, ln{rows.lse_neg[i]}, b{rows.b_pos[i]}, L{rows.L[i]};
  dispatch_grad_terms<TR, MI>(has_b, has_lift, [&](auto hb, auto hl) DMLK_LAMBDA_INLINE {
    constexpr bool HAS_LIFT = decltype(hl)::value;
    grad_row_own<T, TR, MI, decltype(hb)::value, HAS_LIFT>(
        w, nc, lab, li, diag, mx, mn, ap, lp, an, ln, b, L, B{HAS_LIFT ? rows.c_lift[i] : T(0)},
        HAS_LIFT ? rows.L + c0 : nullptr, p);
  });
}

template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_INLINE void grad_row_y(bool has_b, bool has_lift, T* w, int nc, const int32_t* lab,
                                int32_t lj, int diag, const RowColumns<T>& rows, int64_t j,
                                int64_t c0, const EngineParams<T>& p) {
  const T *mx = rows.max_neg + c0, *mn = rows.min_pos + c0, *ap = rows.a_pos + c0;
  const T *lp = rows.lse_pos + c0, *an = rows.a_neg + c0, *ln = rows.lse_neg + c0;
  const T *b = rows.b_pos + c0, *L = rows.L + c0;
  dispatch_grad_terms<TR, MI>(has_b, has_lift, [&](auto hb, auto hl) DMLK_LAMBDA_INLINE {
    constexpr bool HAS_LIFT = decltype(hl)::value;
    grad_row_own<T, TR, MI, decltype(hb)::value, HAS_LIFT>(
        w, nc, lab, lj, diag, mx, mn, ap, lp, an, ln, b, L, HAS_LIFT ? rows.c_lift + c0 : nullptr,
        Broadcast<T>{HAS_LIFT ? rows.L[j] : T(0)}, p);
  });
}

// Which tiles hold a pair of equal labels. The terms that live on positive pairs only (B_pos,
// NT-Xent's positives; C_lift, Lifted Structure's) skip the others: the same bits, since they
// add exact zeros there. One per task: meet() marks the rows' label codes with a fresh id, then
// looks the columns' up, O(rows + columns) per tile; exact, also for shuffled labels.
class PositiveTiles {
 public:
  explicit PositiveTiles(int64_t n_codes) : mark_(n_codes, 0) {}

  bool meet(const int32_t* row_lab, int64_t na, const int32_t* col_lab, int64_t nc) {
    ++id_;
    for (int64_t r = 0; r < na; ++r) mark_[checked(row_lab[r])] = id_;
    for (int64_t c = 0; c < nc; ++c) {
      if (mark_[checked(col_lab[c])] == id_) return true;
    }
    return false;
  }

 private:
  // label_codes' contract (codes in [0, N + M)), checked: a code past it would write out of
  // bounds (a compare per label per tile, next to the tile's products)
  size_t checked(int32_t code) const {
    TORCH_CHECK(code >= 0 && static_cast<size_t>(code) < mark_.size(), "pair_engine_backward: label code ", code,
                " outside [0, ", mark_.size(), ")");
    return static_cast<size_t>(code);
  }

  std::vector<int64_t> mark_;
  int64_t id_ = 0;
};

// Whether any row has a B_pos term (the non-zero b_pos of the n rows).
template <typename T>
bool any_b_pos(const RowColumns<T>& rows, int64_t n) {
  return std::any_of(rows.b_pos, rows.b_pos + n, [](T b) { return b != T(0); });
}

// A tile row of x whose pairs are all negatives (no B_pos or C_lift term; mining 0, transforms 0
// and 1) with a live negative set: dl/ds = a_neg sc_neg exp(sc_neg v + off_neg - lse_neg) dv/ds,
// grad_row_own's terms for such a row, without its label test and selects.
template <typename T, int64_t TR>
DMLK_CPU_INLINE void grad_row_negatives(T* w, int nc, T a_neg, T lse_neg, const EngineParams<T>& p) {
  const CpuExp ex;
  const T coef = a_neg * p.sc_neg;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    w[c] = engine_dl_ds<TR>(v, coef * ex(p.sc_neg * v + p.off_neg - lse_neg));
  }
}

// One tile (own rows a0.., other columns c0..). With tile_has_pos false the B_pos and C_lift
// terms are skipped (PositiveTiles). An x row sharing no label with the tile's columns
// (code_range; the class path's rows but in their class's tile) takes grad_row_negatives.
template <typename T, int64_t TR, int64_t MI, bool OWN_IS_X>
DMLK_CPU_CLONES void grad_tile(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                               const int32_t* xlab, const int32_t* ylab,
                               const RowColumns<T>& rows, EngineParams<T> p, bool exclude_diag,
                               bool tile_has_pos) {
  const int inc = static_cast<int>(nc);
  if constexpr (OWN_IS_X) {
    constexpr bool kNegativesLoop = MI == kMiningNone && TR != kTransformCircle;
    const CodeRange col_codes = kNegativesLoop ? code_range(ylab + c0, nc) : CodeRange{0, -1};
    for (int64_t r = 0; r < na; ++r) {
      const int64_t i = a0 + r;
      const bool has_b = tile_has_pos && rows.b_pos[i] != T(0);
      const bool has_lift = tile_has_pos && rows.c_lift != nullptr && rows.c_lift[i] != T(0);
      if constexpr (kNegativesLoop) {
        // a pair in neither set (dead: a_neg = 0 or an empty set) keeps the full loop's zeros
        const bool live_neg = rows.a_neg[i] != T(0) && rows.lse_neg[i] != neg_infinity<T>();
        if (!has_b && !has_lift && live_neg && !col_codes.holds(xlab[i])) {
          grad_row_negatives<T, TR>(tile + r * nc, inc, rows.a_neg[i], rows.lse_neg[i], p);
          continue;
        }
      }
      grad_row_x<T, TR, MI>(has_b, has_lift, tile + r * nc, inc, ylab + c0, xlab[i],
                            diag_column(exclude_diag, i, c0, nc), rows, i, c0, p);
    }
  } else {
    const auto [any_b, any_lift] = rows.column_terms(c0, nc);
    const bool has_b = any_b && tile_has_pos, has_lift = any_lift && tile_has_pos;
    for (int64_t r = 0; r < na; ++r) {
      const int64_t j = a0 + r;
      grad_row_y<T, TR, MI>(has_b, has_lift, tile + r * nc, inc, xlab + c0, ylab[j],
                            diag_column(exclude_diag, j, c0, nc), rows, j, c0, p);
    }
  }
}

// grad_own[a] = sum_b W_ab other[b] with W_ab = epilogue(S_ab), S_ab = own[a] other[b]^T: per
// row block and column tile one product for S and one for the gradient; one block of `own`
// rows per task, so each output row has one writer.
// epilogue(tile, na, nc, a0, c0, tile_has_pos) turns the tile into W in place; with find_pos
// the flag says whether the tile holds a pair of equal labels (PositiveTiles), else it is true.
// other_first: S_ab comes from the product other[b] own[a]^T, transposed (the operands in the
// forward's order when own is y: the same similarity bits where BLAS picks another kernel for the
// transposed product, as MKL does for some tiny shapes).
template <typename T, typename Epilogue>
void grad_tiles(const at::Tensor& own, const at::Tensor& other, const int32_t* own_lab,
                const int32_t* other_lab, bool find_pos, at::Tensor& grad_own, Epilogue epilogue,
                bool other_first = false) {
  const int64_t n_own = own.size(0), n_other = other.size(0);
  parallel_row_blocks(n_own, [&](int64_t b0, int64_t b1) {
    auto buffer = at::empty({kRowBlock * std::min(kColBlock, n_other)}, own.options());
    auto buffer_t = other_first ? at::empty_like(buffer) : at::Tensor();
    PositiveTiles positives(find_pos ? n_own + n_other : 0);  // label codes < N + M
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t a0 = b * kRowBlock, na = std::min(kRowBlock, n_own - a0);
      const auto own_blk = own.narrow(0, a0, na);
      auto grad_blk = grad_own.narrow(0, a0, na);
      for (int64_t c0 = 0; c0 < n_other; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n_other - c0);
        const auto other_blk = other.narrow(0, c0, nc);
        auto tile = buffer.narrow(0, 0, na * nc).view({na, nc});
        if (other_first) {
          auto tile_t = buffer_t.narrow(0, 0, nc * na).view({nc, na});
          at::mm_out(tile_t, other_blk, own_blk.t());
          tile.copy_(tile_t.t());
        } else {
          at::mm_out(tile, own_blk, other_blk.t());
        }
        const bool tile_has_pos = !find_pos || positives.meet(own_lab + a0, na, other_lab + c0, nc);
        epilogue(tile.template data_ptr<T>(), na, nc, a0, c0, tile_has_pos);
        grad_blk.addmm_(tile, other_blk);
      }
    }
  });
}

// The non-symmetric backward in one sweep over the tiles S = x[a] y[b]^T (the forward's
// operand order and column blocks; taller row blocks, whose elements MKL rounds as the forward's,
// checked in fp32 and fp64 on a Xeon's AVX-512 path): each tile becomes W once
// (x-side epilogue) and feeds both gradients, grad_y[b] += W^T x[a] and
// grad_x[a] += W y[b]: 3 products and one epilogue per tile where the two passes take 4 and 2.
// Tasks own chunks of y blocks (so grad_y rows have one writer); grad_x goes to one partial per
// chunk, summed in chunk order at the end. The chunks are a fixed grouping of y's blocks (at
// most kColChunks, engine_cpu.h), so the bits do not depend on the thread count. The partials
// cost chunks x N x D: used while that stays within kChunkPartialBytes (sweep_chunks > 0). The
// tiles are tall (kTallRowBlock rows): a block of grad_y sums one product per row block, each of
// depth na. 512-row tiles took the ArcFace backward at N=1024, C=262144 from ~4.8 to ~4.2 T_mm
// on a 2-core Xeon.
inline int64_t sweep_chunks(const at::Tensor& x, const at::Tensor& y) {
  const int64_t chunks = col_chunks(y.size(0));
  const int64_t bytes = chunks * x.size(0) * x.size(1) * x.element_size();
  return bytes <= kChunkPartialBytes ? chunks : 0;
}

// epilogue(tile, na, nc, a0, c0, tile_has_pos) turns the tile (x rows a0.., y columns c0..) into
// W in place (tile_has_pos as grad_tiles'). grad_y may come uninitialised (every row is written,
// the first product without adding). A block of grad_y is summed over the row blocks in a
// per-thread buffer in y's layout (a fresh grad_y's: the same products, so the same bits into any
// grad_y) and written once:
// grad_y may be a block of a (D, C) weights' gradient, whose columns lie C apart, too far for the
// caches and the TLB to keep a block that is read and written once per row block.
template <typename T, typename Epilogue>
void grad_sweep(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab, const int32_t* ylab,
                bool find_pos, int64_t chunks, at::Tensor& grad_x, at::Tensor& grad_y,
                Epilogue epilogue) {
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const bool y_column_major = is_column_major(y);
  auto partial = at::empty({chunks, n, d}, grad_x.options());
  parallel_blocks(chunks, [&](int64_t k0, int64_t k1) {
    auto buffer = at::empty({std::min(kTallRowBlock, n) * std::min(kColBlock, m)}, x.options());
    const int64_t acc_rows = std::min(kColBlock, m);
    auto grad_y_acc = y_column_major ? at::empty({d, acc_rows}, grad_y.options()).t()
                                     : at::empty({acc_rows, d}, grad_y.options());
    PositiveTiles positives(find_pos ? n + m : 0);  // label codes < N + M
    for (int64_t k = k0; k < k1; ++k) {
      auto part = partial[k];
      const auto [b_begin, b_end] = chunk_columns(m, chunks, k);
      for (int64_t c0 = b_begin; c0 < b_end; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, m - c0);
        const auto y_blk = y.narrow(0, c0, nc);
        auto grad_y_blk = grad_y_acc.narrow(0, 0, nc);
        for (int64_t a0 = 0; a0 < n; a0 += kTallRowBlock) {
          const int64_t na = std::min(kTallRowBlock, n - a0);
          const auto x_blk = x.narrow(0, a0, na);
          auto tile = buffer.narrow(0, 0, na * nc).view({na, nc});
          at::mm_out(tile, x_blk, y_blk.t());
          const bool tile_has_pos = !find_pos || positives.meet(xlab + a0, na, ylab + c0, nc);
          epilogue(tile.template data_ptr<T>(), na, nc, a0, c0, tile_has_pos);
          if (a0 == 0) {
            at::mm_out(grad_y_blk, tile.t(), x_blk);
          } else {
            grad_y_blk.addmm_(tile.t(), x_blk);
          }
          auto part_blk = part.narrow(0, a0, na);
          if (c0 == b_begin) {
            at::mm_out(part_blk, tile, y_blk);
          } else {
            part_blk.addmm_(tile, y_blk);
          }
        }
        grad_y.narrow(0, c0, nc).copy_(grad_y_blk);
      }
    }
  });
  grad_x.copy_(partial[0]);
  for (int64_t k = 1; k < chunks; ++k) grad_x.add_(partial[k]);
}

// own = x (pairs (a, b) = (i, j)) or own = y (pairs (j, i)).
template <typename T, int64_t TR, int64_t MI, bool OWN_IS_X>
void grad_side(const at::Tensor& own, const at::Tensor& other, const int32_t* xlab,
               const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
               bool exclude_diag, at::Tensor& grad_own) {
  // Transform 2 amplifies a rounding of s by up to ~2 gamma in its logits (gamma = 80 by
  // default): its grad_y tiles take the forward's operand order.
  const int64_t n = OWN_IS_X ? own.size(0) : other.size(0);  // x's rows carry b_pos
  const bool find_pos = rows.c_lift != nullptr || any_b_pos(rows, n);
  grad_tiles<T>(
      own, other, OWN_IS_X ? xlab : ylab, OWN_IS_X ? ylab : xlab, find_pos, grad_own,
      [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
        grad_tile<T, TR, MI, OWN_IS_X>(tile, na, nc, a0, c0, xlab, ylab, rows, p, exclude_diag,
                                       has_pos);
      },
      /*other_first=*/!OWN_IS_X && TR == kTransformCircle);
}

// ---------------------------------------------------------------------------
// symmetric = true (y is x, the same labels): one side. The tile row i against columns
// j = c0 + c becomes, in place, row i's weight of the pair (i, j) plus row j's of the pair
// (j, i) (engine_pair_grad_sym): one pass over the tile, one exp per half and pair (two more
// with HAS_B), one logaddexp per pair with HAS_LIFT.
template <typename T, int64_t TR, int64_t MI, bool HAS_B, bool HAS_LIFT>
DMLK_CPU_INLINE void grad_row_sym(T* w, int nc, const int32_t* lab, int32_t li, int diag,
                                  const EngineRowCoef<T>& ri, const T* max_neg, const T* min_pos,
                                  const T* a_pos, const T* lse_pos, const T* a_neg,
                                  const T* lse_neg, const T* b_pos, const T* L, const T* c_lift,
                                  const EngineParams<T>& p) {
  const CpuExp ex;
  const CpuLog1p l1p;
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const EngineRowCoef<T> rj{max_neg[c], min_pos[c], L[c],      a_pos[c], lse_pos[c],
                              a_neg[c],   lse_neg[c], b_pos[c], HAS_LIFT ? c_lift[c] : T(0)};
    w[c] = engine_pair_grad_sym<TR, MI, HAS_B, HAS_LIFT>(v, lab[c] == li, c == diag, ri, rj, p, ex,
                                                         l1p);
  }
}

// One tile (rows a0.., columns c0.. of x against x). HAS_B and HAS_LIFT per row: the row's
// own coefficient or any column's of the tile (their union covers both halves); the lifted
// term also needs a positive pair in the tile (tile_has_pos, symmetric like the labels).
template <typename T, int64_t TR, int64_t MI>
DMLK_CPU_CLONES void grad_tile_sym(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                                   const int32_t* lab, const RowColumns<T>& rows,
                                   EngineParams<T> p, bool exclude_diag, bool tile_has_pos) {
  const int inc = static_cast<int>(nc);
  const auto [tile_b, tile_lift] = rows.column_terms(c0, nc);
  const T *mx = rows.max_neg + c0, *mn = rows.min_pos + c0, *ap = rows.a_pos + c0;
  const T *lp = rows.lse_pos + c0, *an = rows.a_neg + c0, *ln = rows.lse_neg + c0;
  const T *b = rows.b_pos + c0, *L = rows.L + c0;
  const T* cl = rows.c_lift != nullptr ? rows.c_lift + c0 : nullptr;
  for (int64_t r = 0; r < na; ++r) {
    const int64_t i = a0 + r;
    const EngineRowCoef<T> ri{rows.max_neg[i], rows.min_pos[i], rows.L[i],
                              rows.a_pos[i],   rows.lse_pos[i], rows.a_neg[i],
                              rows.lse_neg[i], rows.b_pos[i],   cl != nullptr ? rows.c_lift[i] : T(0)};
    const bool has_b = tile_b || ri.b_pos != T(0);
    const bool has_lift = tile_has_pos && cl != nullptr && (tile_lift || ri.c_lift != T(0));
    T* w = tile + r * nc;
    const int32_t* clab = lab + c0;
    const int diag = diag_column(exclude_diag, i, c0, nc);
    dispatch_grad_terms<TR, MI>(has_b, has_lift, [&](auto hb, auto hl) DMLK_LAMBDA_INLINE {
      constexpr bool HAS_LIFT = decltype(hl)::value;
      grad_row_sym<T, TR, MI, decltype(hb)::value, HAS_LIFT>(
          w, inc, clab, lab[i], diag, ri, mx, mn, ap, lp, an, ln, b, L, HAS_LIFT ? cl : nullptr, p);
    });
  }
}

// The symmetric backward: grad[a] = sum_b W_ab x[b], with W_ab the symmetric weights of the tile
// S_ab = x[a] x[b]^T (epilogue(tile, na, nc, a0, c0, tile_has_pos) in place; with find_pos the
// flag says whether the tile holds a pair of equal labels, else it is true). From kSymMinBlocks
// blocks, the tiles a <= b only (engine_cpu.h's parallel_sym_tiles): W_ab also gives
// grad[b] += W_ab^T x[a], 3 products per tile pair where both tiles take 4. Fewer blocks:
// grad_tiles over every tile (2 products per tile).
template <typename T, typename Epilogue>
void grad_sym_tiles(const at::Tensor& x, const int32_t* lab, bool find_pos, at::Tensor& grad,
                    Epilogue epilogue) {
  const int64_t n = x.size(0);
  if (!use_sym_tiles(n, x.size(1))) {
    grad_tiles<T>(x, x, lab, lab, find_pos, grad, epilogue);
    return;
  }
  const int64_t bs = sym_block(n);
  std::vector<std::optional<PositiveTiles>> per_thread(find_pos ? at::get_num_threads() : 0);
  parallel_sym_tiles(n, bs * bs, x.options(), [&](int64_t a0, int64_t na, int64_t b0, int64_t nb,
                                                  at::Tensor& scratch) {
    const auto xa = x.narrow(0, a0, na), xb = x.narrow(0, b0, nb);
    auto tile = scratch.narrow(0, 0, na * nb).view({na, nb});
    at::mm_out(tile, xa, xb.t());
    bool tile_has_pos = !find_pos;
    if (find_pos) {
      const size_t t = static_cast<size_t>(at::get_thread_num());
      std::optional<PositiveTiles> local;
      auto& positives = t < per_thread.size() ? per_thread[t] : local;
      if (!positives) positives.emplace(2 * n);  // label codes < 2n
      tile_has_pos = positives->meet(lab + a0, na, lab + b0, nb);
    }
    epilogue(tile.template data_ptr<T>(), na, nb, a0, b0, tile_has_pos);
    grad.narrow(0, a0, na).addmm_(tile, xb);
    if (a0 != b0) grad.narrow(0, b0, nb).addmm_(tile.t(), xa);
  });
}

// The symmetric lse2 backward with a fixed shift (engine_cpu.h's FixedShift; mining 0, no C_lift
// term, no B_pos term in the tile): dl/dv of the pair (i, j) plus the pair (j, i) is sc * (c_i + c_j) * exp(u - U)
// in its set, one exp per pair (c_pos, c_neg: per row, below).
template <typename T, int64_t TR>
DMLK_CPU_CLONES void grad_tile_sym_fixed(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                                         const int32_t* lab, const T* c_pos, const T* c_neg,
                                         EngineParams<T> p, FixedShift<T> u, bool exclude_diag) {
  const CpuExpUpTo88 ex;  // u - U: at most ~0, never NaN (finite rows: fixed_shift)
  const int inc = static_cast<int>(nc);
  const int32_t* clab = lab + c0;
  const T *cp = c_pos + c0, *cn = c_neg + c0;
  for (int64_t r = 0; r < na; ++r) {
    const int64_t i = a0 + r;
    const T cp_i = c_pos[i], cn_i = c_neg[i];
    const int32_t li = lab[i];
    const int diag = diag_column(exclude_diag, i, c0, nc);
    T* w = tile + r * nc;
#pragma omp simd
    for (int c = 0; c < inc; ++c) {
      const T v = engine_value<TR>(w[c], CpuSqrt());
      const bool same = clab[c] == li;
      const bool kp = same & (c != diag), kn = !same;
      const T e = ex(same ? p.sc_pos * v + p.off_pos - u.pos : p.sc_neg * v + p.off_neg - u.neg);
      const T coef = same ? (kp ? p.sc_pos * (cp_i + cp[c]) : T(0)) : p.sc_neg * (cn_i + cn[c]);
      w[c] = engine_set_dl_ds<TR>(v, coef * e, kp, kn, p);
    }
  }
}

// c = A exp(U - LSE) per row and set (0 where the set's term is dead: A = 0 or an empty set), as
// a (2, N) tensor. Nothing (each half then takes its own exp) when a live LSE lies more than the
// window below U (an LSE the forward can't have given: it is at least the row's largest u), or a
// c is not finite or could overflow in sc * (c_i + c_j).
template <typename T>
std::optional<at::Tensor> fixed_shift_coefs(const RowColumns<T>& rows, int64_t n,
                                            FixedShift<T> u, const EngineParams<T>& p) {
  auto out = at::empty({2, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* c = out.template data_ptr<T>();
  const double limit = static_cast<double>(std::numeric_limits<T>::max()) / 4.0;
  const double sc = std::max(std::abs(double(p.sc_pos)), std::abs(double(p.sc_neg)));
  const auto coef = [&](T a, T lse, T shift, double& value) {
    const bool live = a != T(0) && lse != neg_infinity<T>();
    const double below = double(shift) - double(lse);
    value = live ? double(a) * std::exp(below) : 0.0;
    return (!live || below <= kFixedShiftWidth<T>) && std::isfinite(value) &&
           2.0 * sc * std::abs(value) < limit;
  };
  for (int64_t k = 0; k < n; ++k) {
    double cp = 0.0, cn = 0.0;
    if (!coef(rows.a_pos[k], rows.lse_pos[k], u.pos, cp) ||
        !coef(rows.a_neg[k], rows.lse_neg[k], u.neg, cn)) {
      return std::nullopt;
    }
    c[k] = static_cast<T>(cp);
    c[n + k] = static_cast<T>(cn);
  }
  return out;
}

template <typename T, int64_t TR, int64_t MI>
void grad_sym(const at::Tensor& x, const int32_t* lab, const RowColumns<T>& rows,
              EngineParams<T> p, bool exclude_diag, at::Tensor& grad) {
  const int64_t n = x.size(0);
  if constexpr (MI == kMiningNone && TR != kTransformCircle) {
    // B_pos (NT-Xent's positive softplus) lives on positive pairs only: the tiles holding one
    // take the two-exp epilogue, the others (most, with rows sorted by label) the fixed shift.
    const bool any_b = any_b_pos(rows, n);
    if (const auto u = rows.c_lift == nullptr ? fixed_shift<T, TR>(x, p) : std::nullopt) {
      if (const auto c = fixed_shift_coefs<T>(rows, n, *u, p)) {
        const T* cp = c->template data_ptr<T>();
        grad_sym_tiles<T>(
            x, lab, any_b, grad,
            [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
              if (any_b && has_pos) {
                grad_tile_sym<T, TR, MI>(tile, na, nc, a0, c0, lab, rows, p, exclude_diag, true);
              } else {
                grad_tile_sym_fixed<T, TR>(tile, na, nc, a0, c0, lab, cp, cp + n, p, *u,
                                           exclude_diag);
              }
            });
        return;
      }
    }
  }
  grad_sym_tiles<T>(x, lab, rows.c_lift != nullptr, grad,
                    [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
                      grad_tile_sym<T, TR, MI>(tile, na, nc, a0, c0, lab, rows, p, exclude_diag,
                                               has_pos);
                    });
}

// ---------------------------------------------------------------------------
// The hinge backward (row_coef (N, 2) = (H_pos, H_neg), mining 0): dl/ds of a tile row in place.
// Coefficients as in grad_row_own: Broadcast for the tile row's own row, arrays per column.
template <typename T, int64_t TR, typename Coef>
DMLK_CPU_INLINE void hinge_grad_row(T* w, int nc, const int32_t* lab, int32_t l_own, int diag,
                                    Coef h_pos, Coef h_neg, Coef L, const EngineParams<T>& p) {
#pragma omp simd
  for (int c = 0; c < nc; ++c) {
    const T v = engine_value<TR>(w[c], CpuSqrt());
    const bool same = lab[c] == l_own;
    const bool kp = engine_pos_kept<kMiningNone>(v, same, c == diag, T(0), T(0));
    const bool kn = engine_neg_kept<kMiningNone>(v, same, T(0), T(0));
    w[c] = engine_hinge_pair_grad<TR>(v, kp, kn, h_pos[c], h_neg[c], L[c], p);
  }
}

template <typename T, int64_t TR, bool OWN_IS_X>
DMLK_CPU_CLONES void hinge_grad_tile(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                                     const int32_t* xlab, const int32_t* ylab,
                                     const RowColumns<T>& rows, EngineParams<T> p,
                                     bool exclude_diag) {
  const int inc = static_cast<int>(nc);
  for (int64_t r = 0; r < na; ++r) {
    const int64_t a = a0 + r;
    const int diag = diag_column(exclude_diag, a, c0, nc);
    if constexpr (OWN_IS_X) {  // row i = a against columns j
      using B = Broadcast<T>;
      hinge_grad_row<T, TR>(tile + r * nc, inc, ylab + c0, xlab[a], diag, B{rows.h_pos[a]},
                            B{rows.h_neg[a]}, B{rows.L[a]}, p);
    } else {  // row j = a of y against columns i
      hinge_grad_row<T, TR>(tile + r * nc, inc, xlab + c0, ylab[a], diag, rows.h_pos + c0,
                            rows.h_neg + c0, rows.L + c0, p);
    }
  }
}

// The symmetric case: row i's weight of (i, j) plus row j's of (j, i) (engine_hinge_pair_grad_sym).
template <typename T, int64_t TR>
DMLK_CPU_CLONES void hinge_grad_tile_sym(T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0,
                                         const int32_t* lab, const RowColumns<T>& rows,
                                         EngineParams<T> p, bool exclude_diag) {
  const int inc = static_cast<int>(nc);
  const T *hp = rows.h_pos + c0, *hn = rows.h_neg + c0, *L = rows.L + c0;
  const int32_t* clab = lab + c0;
  for (int64_t r = 0; r < na; ++r) {
    const int64_t i = a0 + r;
    const T hp_i = rows.h_pos[i], hn_i = rows.h_neg[i], L_i = rows.L[i];
    const int32_t li = lab[i];
    const int diag = diag_column(exclude_diag, i, c0, nc);
    T* w = tile + r * nc;
#pragma omp simd
    for (int c = 0; c < inc; ++c) {
      const T v = engine_value<TR>(w[c], CpuSqrt());
      w[c] = engine_hinge_pair_grad_sym<TR>(v, clab[c] == li, c == diag, hp_i, hn_i, L_i, hp[c],
                                            hn[c], L[c], p);
    }
  }
}

template <typename T, int64_t TR>
void hinge_backward(const at::Tensor& x, const at::Tensor& y, const int32_t* xlab,
                    const int32_t* ylab, const RowColumns<T>& rows, EngineParams<T> p,
                    bool exclude_diag, bool symmetric, int64_t chunks, at::Tensor& grad_x,
                    at::Tensor& grad_y) {
  if (symmetric) {
    grad_sym_tiles<T>(x, xlab, false, grad_x,
                      [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool) {
                        hinge_grad_tile_sym<T, TR>(tile, na, nc, a0, c0, xlab, rows, p,
                                                   exclude_diag);
                      });
    return;
  }
  const auto x_side = [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool) {
    hinge_grad_tile<T, TR, true>(tile, na, nc, a0, c0, xlab, ylab, rows, p, exclude_diag);
  };
  if (chunks > 0) {
    grad_sweep<T>(x, y, xlab, ylab, false, chunks, grad_x, grad_y, x_side);
    return;
  }
  grad_tiles<T>(x, y, xlab, ylab, false, grad_x, x_side);
  grad_tiles<T>(y, x, ylab, xlab, false, grad_y,
                [&](T* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool) {
                  hinge_grad_tile<T, TR, false>(tile, na, nc, a0, c0, xlab, ylab, rows, p,
                                                exclude_diag);
                });
}

// Both ops' body: grad_y_out, when given, is the caller's buffer (y's shape, x's dtype, any
// strides, checked) that takes grad_y in place of a fresh one.
std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& x_labels,
    const at::Tensor& y_labels, const at::Tensor& row_in, const at::Tensor& row_coef,
    int64_t transform, int64_t mining, at::ArrayRef<double> params, bool exclude_diag,
    bool symmetric, const std::optional<at::Tensor>& grad_y_out) {
  check_pair_engine_args(x_in, y_in, x_labels, y_labels, row_in, &row_coef, -1, transform, mining,
                         params, exclude_diag, symmetric);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_cpu_dtype(x_in);
  // The sweep writes every element of both (uninitialised then); the other paths add to zeros.
  // sweep_chunks: the one-sweep backward's chunks, 0 for the two passes (or the symmetric one)
  const int64_t chunks = !symmetric && x_in.size(0) > 0 && x_in.size(1) > 0 && y_in.size(0) > 0
                             ? sweep_chunks(x_in, y_in)
                             : 0;
  const bool sweep = chunks > 0;
  // grad_y in y's layout (a column-major y is read as it is: engine_operand).
  const auto like = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  auto grad_x = at::empty(x_in.sizes(), like);
  auto grad_y = grad_y_out.has_value()     ? *grad_y_out
                : is_column_major(y_in) ? at::empty({y_in.size(1), y_in.size(0)}, like).t()
                                        : at::empty(y_in.sizes(), like);
  if (!sweep) {
    grad_x.zero_();
    grad_y.zero_();
  }
  // D = 0 leaves nothing to multiply (and the gradients are empty).
  if (x_in.size(0) == 0 || y_in.size(0) == 0 || x_in.size(1) == 0) return {grad_x, grad_y};
  const auto st = stats_dtype(x_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto y = engine_operand(y_in);
  const auto [xl, yl] = label_codes(x_labels, y_labels);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pair_engine_backward_cpu", [&] {
    const RowColumns<scalar_t> rows(row_in, &row_coef, st);
    const auto p = make_params<scalar_t>(params);
    const int32_t* xlab = xl.data_ptr<int32_t>();
    const int32_t* ylab = yl.data_ptr<int32_t>();
    if (is_hinge_coef(row_coef)) {  // mining 0 (checked)
      if (transform == kTransformUnitDistance) {
        hinge_backward<scalar_t, kTransformUnitDistance>(x, y, xlab, ylab, rows, p, exclude_diag,
                                                         symmetric, chunks, grad_x, grad_y);
      } else {
        hinge_backward<scalar_t, kTransformDot>(x, y, xlab, ylab, rows, p, exclude_diag,
                                                symmetric, chunks, grad_x, grad_y);
      }
      return;
    }
    dispatch_config(transform, mining, [&](auto tr, auto mi) {
      constexpr int64_t TR = decltype(tr)::value, MI = decltype(mi)::value;
      if (symmetric) {  // y is x (equal values) and y_labels x_labels: x's rows and codes only
        grad_sym<scalar_t, TR, MI>(x, xlab, rows, p, exclude_diag, grad_x);
        return;
      }
      if (sweep) {  // C_lift needs symmetric: no lifted term
        grad_sweep<scalar_t>(
            x, y, xlab, ylab, any_b_pos(rows, x.size(0)), chunks, grad_x, grad_y,
            [&](scalar_t* tile, int64_t na, int64_t nc, int64_t a0, int64_t c0, bool has_pos) {
              grad_tile<scalar_t, TR, MI, true>(tile, na, nc, a0, c0, xlab, ylab, rows, p,
                                                exclude_diag, has_pos);
            });
        return;
      }
      grad_side<scalar_t, TR, MI, true>(x, y, xlab, ylab, rows, p, exclude_diag, grad_x);
      grad_side<scalar_t, TR, MI, false>(y, x, xlab, ylab, rows, p, exclude_diag, grad_y);
    });
  });
  return {grad_x, grad_y};
}

std::tuple<at::Tensor, at::Tensor> pair_engine_backward_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
    const at::Tensor& y_labels, const at::Tensor& row_in, const at::Tensor& row_coef,
    int64_t transform, int64_t mining, at::ArrayRef<double> params, bool exclude_diag,
    bool symmetric) {
  return backward_cpu(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params,
                      exclude_diag, symmetric, std::nullopt);
}

at::Tensor pair_engine_backward_into_cpu(const at::Tensor& x, const at::Tensor& y,
                                         const at::Tensor& x_labels, const at::Tensor& y_labels,
                                         const at::Tensor& row_in, const at::Tensor& row_coef,
                                         int64_t transform, int64_t mining,
                                         at::ArrayRef<double> params, bool exclude_diag,
                                         at::Tensor& grad_y) {
  check_grad_y_out("pair_engine_backward_into", "grad_y", "y", x, y, grad_y);
  return std::get<0>(backward_cpu(x, y, x_labels, y_labels, row_in, row_coef, transform, mining,
                                  params, exclude_diag, false, grad_y));
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pair_engine_backward", &pair_engine_backward_cpu);
  m.impl("pair_engine_backward_into", &pair_engine_backward_into_cpu);
}

}  // namespace dmlkern
