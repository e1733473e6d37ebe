// dmlkern::grouped_class_lse and grouped_class_lse_backward on the CPU: the class path's block
// kernel for classes of K weight rows (SubCenterArcFace's sub-centres, SoftTriple's centres;
// GroupedBlock in dmlkern/fused/class_softmax.py is its torch twin and the yardstick of its tests).
//
// Per x row i and class c0 + q of the block (rows q K .. q K + K - 1 of w), v_iq reduces the K
// cosines s_ick = <x_i, w_qK+k>: their max (reduce 0; the gradient goes to the first k attaining
// it, as torch.max) or SoftTriple's soft assignment (reduce 1: q = softmax_k(s_k inv_gamma), v =
// sum_k q_k s_k). The forward gives lse_i = log sum over the classes other than labels[i] of
// exp(scale v_iq) (-inf when there is none); the backward, given the full lse and its gradient,
// dL/ds_ick = grad_i exp(scale v_iq - lse_i) scale dv_iq/ds_ick (0 at the own class) and from it
// grad_x = dL/ds w, grad_w = dL/ds^T x.
//
// Tiles are transposed, S^T = w[tile] x[block]^T (weight rows by x rows, at::mm_out into a
// per-task buffer): a class's K cosines are K contiguous rows of the tile, so every epilogue loop
// runs over the block's x rows with unit stride (`omp simd`), one class and one k at a time, with
// per-row accumulators. A column tile holds whole classes (kColBlock rows rounded down to a
// multiple of K). The forward runs tasks (x row block, chunk of column tiles) in parallel, each
// folding its tiles into a running max and sum per row, merged over the chunks in order. The
// backward is the engine's one-sweep structure (pair_engine_backward_cpu.cpp, grad_sweep): tasks
// own chunks of column tiles, so grad_w rows have one writer, and each recomputed tile turned in
// place into dL/ds feeds both gradients (grad_w[tile] += G^T x[block], a per-chunk partial of
// grad_x += G w[tile]); the partials are summed in chunk order. The chunks are cut by the shape
// alone and every tile product is single-threaded (SerialBlasGuard): the bits do not depend on
// the thread count. Extra memory: the tiles, per-row scratch and the partials (at most
// kPartialBytes, in row groups beyond that): O((N + tile) D), no N x R buffer.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace dmlkern {

namespace {

constexpr int64_t kReduceMax = 0;
constexpr int64_t kReduceSoft = 1;
constexpr int64_t kChunks = 16;                       // column-tile chunks (a fixed grouping)
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // the backward's grad_x partials, at most

// torch.maximum: NaN if either is NaN.
template <typename T>
DMLK_CPU_INLINE T nan_max(T a, T b) {
  return (a >= b || a != a) ? a : b;
}

// The cut of the R weight rows into column tiles of whole classes, and of the tiles into chunks:
// from the shape alone.
struct Tiling {
  int64_t tile_rows, tiles, per_chunk, chunks;
};

Tiling tiling(int64_t rows, int64_t group) {
  Tiling t{};
  t.tile_rows = std::max<int64_t>(1, kColBlock / group) * group;
  t.tiles = ceil_div(rows, t.tile_rows);
  t.per_chunk = std::max<int64_t>(1, ceil_div(t.tiles, kChunks));
  t.chunks = ceil_div(t.tiles, t.per_chunk);  // none left empty
  return t;
}

// Per-task scratch: the tile S^T (tile_rows x kRowBlock), the forward's logits of a tile (one row
// per class), the soft assignment's q of one class (K rows) and per-row arrays.
template <typename T>
struct Scratch {
  at::Tensor tile;
  std::vector<T> logits, q, v, top, total, a, tile_max, shift, open;
  Scratch(const Tiling& tl, int64_t group, const at::Tensor& like)
      : tile(at::empty({tl.tile_rows * kRowBlock}, like.options())),
        logits(tl.tile_rows / group * kRowBlock),
        q(group * kRowBlock),
        v(kRowBlock), top(kRowBlock), total(kRowBlock), a(kRowBlock), tile_max(kRowBlock),
        shift(kRowBlock), open(kRowBlock) {}
};

// The value v of one class (s: its K rows of na cosines each) into v; reduce 1 also leaves
// q_k = softmax_k(s_k inv_gamma) in q (K rows of na), as SoftAssignment computes them.
template <typename T, int64_t RK>
DMLK_CPU_INLINE void class_value(const T* s, int64_t group, int na, T inv_gamma, Scratch<T>& w) {
  T* __restrict v = w.v.data();
  if constexpr (RK == kReduceMax) {
#pragma omp simd
    for (int i = 0; i < na; ++i) v[i] = s[i];
    for (int64_t k = 1; k < group; ++k) {
      const T* __restrict sk = s + k * na;
#pragma omp simd
      for (int i = 0; i < na; ++i) v[i] = nan_max(v[i], sk[i]);
    }
  } else {
    T* __restrict top = w.top.data();
    T* __restrict total = w.total.data();
    T* __restrict q = w.q.data();
    const CpuExp ex;
#pragma omp simd
    for (int i = 0; i < na; ++i) top[i] = s[i] * inv_gamma;
    for (int64_t k = 1; k < group; ++k) {
      const T* __restrict sk = s + k * na;
#pragma omp simd
      for (int i = 0; i < na; ++i) top[i] = nan_max(top[i], sk[i] * inv_gamma);
    }
#pragma omp simd
    for (int i = 0; i < na; ++i) total[i] = T(0);
    for (int64_t k = 0; k < group; ++k) {
      const T* __restrict sk = s + k * na;
      T* __restrict qk = q + k * na;
#pragma omp simd
      for (int i = 0; i < na; ++i) {
        qk[i] = ex(sk[i] * inv_gamma - top[i]);
        total[i] += qk[i];
      }
    }
    for (int64_t k = 0; k < group; ++k) {
      const T* __restrict sk = s + k * na;
      T* __restrict qk = q + k * na;
      if (k == 0) {
#pragma omp simd
        for (int i = 0; i < na; ++i) {
          qk[i] = qk[i] / total[i];
          v[i] = qk[i] * sk[i];
        }
      } else {
#pragma omp simd
        for (int i = 0; i < na; ++i) {
          qk[i] = qk[i] / total[i];
          v[i] = v[i] + qk[i] * sk[i];
        }
      }
    }
  }
}

// Forward epilogue of one tile (nq classes from class q0 of the block, na x rows): the tile's
// logits, their max per row, then the sums of exp(logit - max) merged into the running (max, sum).
template <typename T, int64_t RK>
DMLK_CPU_CLONES void forward_tile(const T* st, int64_t nq, int64_t group, int na, int64_t q0,
                                  const int32_t* own, T scale, T inv_gamma, Scratch<T>& w,
                                  T* run_max, T* run_sum) {
  T* __restrict tmax = w.tile_max.data();
  const T* __restrict v = w.v.data();
  const T ninf = neg_infinity<T>();
#pragma omp simd
  for (int i = 0; i < na; ++i) tmax[i] = ninf;
  for (int64_t q = 0; q < nq; ++q) {
    class_value<T, RK>(st + q * group * na, group, na, inv_gamma, w);
    T* __restrict lg = w.logits.data() + q * na;
    const int32_t qg = static_cast<int32_t>(q0 + q);
#pragma omp simd
    for (int i = 0; i < na; ++i) {
      const T l = own[i] == qg ? ninf : scale * v[i];
      lg[i] = l;
      tmax[i] = l > tmax[i] ? l : tmax[i];  // NaN never wins here; it poisons the sums below
    }
  }
  T* __restrict shift = w.shift.data();
  const CpuExp ex;
#pragma omp simd
  for (int i = 0; i < na; ++i) {
    const T m = tmax[i] > run_max[i] ? tmax[i] : run_max[i];
    const T sh = m == ninf ? T(0) : m;  // no finite logit yet: any finite shift (the sum is 0)
    run_sum[i] = run_sum[i] * ex(run_max[i] - sh);
    run_max[i] = m;
    shift[i] = sh;
  }
  for (int64_t q = 0; q < nq; ++q) {
    const T* __restrict lg = w.logits.data() + q * na;
#pragma omp simd
    for (int i = 0; i < na; ++i) run_sum[i] += ex(lg[i] - shift[i]);
  }
}

// Backward epilogue of one tile: S^T turned in place into dL/ds (GroupedBlock.backward's g).
template <typename T, int64_t RK>
DMLK_CPU_CLONES void backward_tile(T* st, int64_t nq, int64_t group, int na, int64_t q0,
                                   const int32_t* own, const T* grad, const T* lse, T scale,
                                   T inv_gamma, Scratch<T>& w) {
  const CpuExp ex;
  const T* __restrict v = w.v.data();
  T* __restrict a = w.a.data();
  for (int64_t q = 0; q < nq; ++q) {
    T* s = st + q * group * na;
    class_value<T, RK>(s, group, na, inv_gamma, w);
    const int32_t qg = static_cast<int32_t>(q0 + q);
    // the class's softmax weight over the other classes (0 at the own class) times grad * scale
#pragma omp simd
    for (int i = 0; i < na; ++i) {
      const T weight = own[i] == qg ? T(0) : ex(scale * v[i] - lse[i]);
      a[i] = weight * (grad[i] * scale);
    }
    if constexpr (RK == kReduceMax) {  // all of it to the first k attaining the max
      T* __restrict open = w.open.data();  // 1 until the row's first k attaining the max
#pragma omp simd
      for (int i = 0; i < na; ++i) open[i] = T(1);
      for (int64_t k = 0; k < group; ++k) {
        T* __restrict sk = s + k * na;
#pragma omp simd
        for (int i = 0; i < na; ++i) {
          const bool hit = (open[i] != T(0)) & (sk[i] == v[i]);
          sk[i] = hit ? a[i] : T(0);
          open[i] = hit ? T(0) : open[i];
        }
      }
    } else {  // dv/ds_k = q_k ((s_k - v) inv_gamma + 1)
      const T* __restrict q = w.q.data();
      for (int64_t k = 0; k < group; ++k) {
        T* __restrict sk = s + k * na;
        const T* __restrict qk = q + k * na;
#pragma omp simd
        for (int i = 0; i < na; ++i) sk[i] = qk[i] * ((sk[i] - v[i]) * inv_gamma + T(1)) * a[i];
      }
    }
  }
}

// S^T of weight rows w_blk against x rows x_blk into `tile` (an empty width gives zeros).
inline void tile_product(at::Tensor& tile, const at::Tensor& w_blk, const at::Tensor& x_blk) {
  if (x_blk.size(1) == 0) {
    tile.zero_();
  } else {
    at::mm_out(tile, w_blk, x_blk.t());
  }
}

// w (R, D) as a transposed view of a (D, R') matrix (strides (1, ld)): the rows of a block of
// PML's W (D, C K), unit rows computed from them keep that layout. The tile products read it in
// place (BLAS takes transposed operands) and grad_w is returned in the same layout.
inline bool column_major(const at::Tensor& w) { return w.stride(0) == 1 && w.stride(1) != 1; }

// w as the tile products read it: row-major or column-major with a valid leading dimension as
// given, anything else made contiguous.
inline at::Tensor blas_rows(const at::Tensor& w) {
  const bool rows_ok = w.stride(1) == 1 && w.stride(0) >= std::max<int64_t>(1, w.size(1));
  const bool cols_ok = w.stride(0) == 1 && w.stride(1) >= std::max<int64_t>(1, w.size(0));
  return rows_ok || cols_ok ? w : w.contiguous();
}

// own[i] = labels[i] - class0 where that is a class of the block (0 .. classes - 1), else -1.
std::vector<int32_t> own_classes(const at::Tensor& labels, int64_t class0, int64_t classes) {
  const auto lab = labels.contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  std::vector<int32_t> own(lab.size(0));
  for (int64_t i = 0; i < lab.size(0); ++i) {
    // in unsigned arithmetic, so that no label overflows the subtraction
    const uint64_t q = static_cast<uint64_t>(l[i]) - static_cast<uint64_t>(class0);
    own[i] = q < static_cast<uint64_t>(classes) ? static_cast<int32_t>(q) : -1;
  }
  return own;
}

template <typename T, int64_t RK>
void forward_impl(const at::Tensor& x, const at::Tensor& w, const int32_t* own, int64_t group,
                  T scale, T inv_gamma, at::Tensor& out) {
  const int64_t n = x.size(0), r = w.size(0);
  const Tiling tl = tiling(r, group);
  const int64_t row_blocks = ceil_div(n, kRowBlock);
  auto part_max = at::empty({tl.chunks, n}, out.options());
  auto part_sum = at::empty({tl.chunks, n}, out.options());
  T* pm = part_max.data_ptr<T>();
  T* ps = part_sum.data_ptr<T>();
  parallel_blocks(row_blocks * tl.chunks, [&](int64_t t0, int64_t t1) {
    Scratch<T> scratch(tl, group, x);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / tl.chunks, k = task % tl.chunks;
      const int64_t a0 = b * kRowBlock, na = std::min(kRowBlock, n - a0);
      const auto x_blk = x.narrow(0, a0, na);
      T* run_max = pm + k * n + a0;
      T* run_sum = ps + k * n + a0;
      for (int64_t i = 0; i < na; ++i) {
        run_max[i] = neg_infinity<T>();
        run_sum[i] = T(0);
      }
      const int64_t t_end = std::min(tl.tiles, (k + 1) * tl.per_chunk);
      for (int64_t t = k * tl.per_chunk; t < t_end; ++t) {
        const int64_t w0 = t * tl.tile_rows, nw = std::min(tl.tile_rows, r - w0);
        auto tile = scratch.tile.narrow(0, 0, nw * na).view({nw, na});
        tile_product(tile, w.narrow(0, w0, nw), x_blk);
        forward_tile<T, RK>(tile.template data_ptr<T>(), nw / group, group, static_cast<int>(na),
                            w0 / group, own + a0, scale, inv_gamma, scratch, run_max, run_sum);
      }
    }
  });
  // the chunks' (max, sum) per row, merged in chunk order
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    T m = neg_infinity<T>();
    for (int64_t k = 0; k < tl.chunks; ++k) m = std::max(m, pm[k * n + i]);
    const T sh = m == neg_infinity<T>() ? T(0) : m;
    T sum = T(0);
    for (int64_t k = 0; k < tl.chunks; ++k) sum += ps[k * n + i] * std::exp(pm[k * n + i] - sh);
    o[i] = m + std::log(sum);  // no other class: -inf + log(0) = -inf
  }
}

// out[e] = sum_k part[k][e] for e0 <= e < e1, in k order.
template <typename T>
DMLK_CPU_CLONES void sum_partials(const T* part, int64_t chunks, int64_t part_size, int64_t e0,
                                  int64_t e1, T* out) {
  const T* __restrict p0 = part;
  T* __restrict o = out;
#pragma omp simd
  for (int64_t e = e0; e < e1; ++e) o[e] = p0[e];
  for (int64_t k = 1; k < chunks; ++k) {
    const T* __restrict pk = part + k * part_size;
#pragma omp simd
    for (int64_t e = e0; e < e1; ++e) o[e] += pk[e];
  }
}

template <typename T, int64_t RK>
void backward_impl(const at::Tensor& x, const at::Tensor& w, const int32_t* own, int64_t group,
                   T scale, T inv_gamma, const T* grad, const T* lse, at::Tensor& grad_x,
                   at::Tensor& grad_w) {
  const int64_t n = x.size(0), r = w.size(0), d = x.size(1);
  const Tiling tl = tiling(r, group);
  // grad_x's partials (chunks x rows x D) stay within kPartialBytes: rows in groups of whole row
  // blocks (the forward's, so a recomputed tile has the forward's bits), each group one sweep.
  const int64_t per_row = tl.chunks * d * x.element_size();
  const int64_t group_rows = std::min(
      ceil_div(n, kRowBlock) * kRowBlock,
      std::max<int64_t>(1, kPartialBytes / std::max<int64_t>(per_row, 1) / kRowBlock) * kRowBlock);
  auto partial = at::empty({tl.chunks, std::min(group_rows, n), d}, x.options());
  // A tile's grad_w is summed over the group's row blocks in a per-task buffer in w's layout (the
  // same products as a fresh grad_w's, so the same bits) and then written (added, past the first
  // group) once: grad_w may be a block of a (D, C K) weights' gradient, whose columns lie C K
  // apart, too far for the caches and the TLB.
  const bool w_column_major = column_major(w);
  for (int64_t g0 = 0; g0 < n; g0 += group_rows) {
    const int64_t gn = std::min(group_rows, n - g0);
    parallel_blocks(tl.chunks, [&](int64_t k0, int64_t k1) {
      Scratch<T> scratch(tl, group, x);
      auto acc = w_column_major ? at::empty({d, tl.tile_rows}, grad_w.options()).t()
                                : at::empty({tl.tile_rows, d}, grad_w.options());
      for (int64_t k = k0; k < k1; ++k) {
        auto part = partial[k];
        const int64_t t_begin = k * tl.per_chunk;
        const int64_t t_end = std::min(tl.tiles, t_begin + tl.per_chunk);
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int64_t w0 = t * tl.tile_rows, nw = std::min(tl.tile_rows, r - w0);
          const auto w_blk = w.narrow(0, w0, nw);
          auto grad_w_blk = acc.narrow(0, 0, nw);
          for (int64_t a0 = g0; a0 < g0 + gn; a0 += kRowBlock) {
            const int64_t na = std::min(kRowBlock, g0 + gn - a0);
            const auto x_blk = x.narrow(0, a0, na);
            auto tile = scratch.tile.narrow(0, 0, nw * na).view({nw, na});
            tile_product(tile, w_blk, x_blk);
            backward_tile<T, RK>(tile.template data_ptr<T>(), nw / group, group,
                                 static_cast<int>(na), w0 / group, own + a0, grad + a0, lse + a0,
                                 scale, inv_gamma, scratch);
            if (a0 == g0) {
              at::mm_out(grad_w_blk, tile, x_blk);
            } else {
              grad_w_blk.addmm_(tile, x_blk);
            }
            auto part_blk = part.narrow(0, a0 - g0, na);
            if (t == t_begin) {
              at::mm_out(part_blk, tile.t(), w_blk);
            } else {
              part_blk.addmm_(tile.t(), w_blk);
            }
          }
          if (g0 == 0) {
            grad_w.narrow(0, w0, nw).copy_(grad_w_blk);
          } else {
            grad_w.narrow(0, w0, nw).add_(grad_w_blk);
          }
        }
      }
    });
    // grad_x = the chunks' partials summed in chunk order (one parallel loop, not chunks - 1 adds)
    const T* pp = partial.data_ptr<T>();
    T* gx = grad_x.data_ptr<T>() + g0 * d;
    const int64_t part_size = partial.size(1) * d;
    parallel_blocks(ceil_div(gn, kRowBlock), [&](int64_t b0, int64_t b1) {
      const int64_t e0 = b0 * kRowBlock * d, e1 = std::min(b1 * kRowBlock, gn) * d;
      sum_partials(pp, tl.chunks, part_size, e0, e1, gx);
    });
  }
}

template <typename F>
void dispatch_reduce(int64_t reduce, F&& f) {
  if (reduce == kReduceMax) {
    f(std::integral_constant<int64_t, kReduceMax>{});
  } else {
    f(std::integral_constant<int64_t, kReduceSoft>{});
  }
}

// Argument checks of both ops (grad and lse: the backward's, else null).
void check_grouped_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                        const at::Tensor& labels, int64_t group, int64_t reduce,
                        const at::Tensor* grad, const at::Tensor* lse) {
  TORCH_CHECK(x.dim() == 2, "dmlkern: ", op, ": x must be 2-D (N, D), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, "dmlkern: ", op,
              ": w must be 2-D (R, D) (the block's weight rows), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(1), "dmlkern: ", op, ": x (N, D) and w (R, D) must have the same "
              "width D, got x ", x.sizes(), " and w ", w.sizes());
  TORCH_CHECK(x.device().is_cpu(), "dmlkern: ", op, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "dmlkern: ", op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "dmlkern: ", op,
              ": w must have x's dtype ", x.scalar_type(), ", got ", w.scalar_type());
  TORCH_CHECK(w.device() == x.device(), "dmlkern: ", op, ": w must be on x's device ", x.device(),
              ", got ", w.device());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "dmlkern: ", op, ": labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "dmlkern: ", op,
              ": labels must be 1-D of length N=", x.size(0), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == x.device(), "dmlkern: ", op, ": labels must be on x's device ",
              x.device(), ", got ", labels.device());
  TORCH_CHECK(group >= 1, "dmlkern: ", op, ": group (weight rows per class) must be >= 1, got ",
              group);
  TORCH_CHECK(w.size(0) % group == 0, "dmlkern: ", op, ": group=", group,
              " must divide the number of weight rows R=", w.size(0));
  TORCH_CHECK(w.size(0) / group <= std::numeric_limits<int32_t>::max(), "dmlkern: ", op,
              ": the block's number of classes must fit in int32, got ", w.size(0) / group);
  TORCH_CHECK(reduce == kReduceMax || reduce == kReduceSoft, "dmlkern: ", op,
              ": reduce must be 0 (max over the group) or 1 (soft assignment), got ", reduce);
  for (const auto& [name, t] : {std::pair{"grad", grad}, std::pair{"lse", lse}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0), "dmlkern: ", op, ": ", name,
                " must be 1-D of length N=", x.size(0), ", got ", t->sizes());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "dmlkern: ", op, ": ", name,
                " must be floating point, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "dmlkern: ", op, ": ", name, " must be on x's device ",
                x.device(), ", got ", t->device());
  }
}

at::Tensor grouped_class_lse_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                 const at::Tensor& labels, int64_t class0, int64_t group,
                                 int64_t reduce, double scale, double inv_gamma) {
  check_grouped_args("grouped_class_lse", x_in, w_in, labels, group, reduce, nullptr, nullptr);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = x_in.size(0);
  auto out = at::empty({n}, x_in.options().dtype(stats_dtype(x_in.scalar_type())));
  if (n == 0) return out;
  if (w_in.size(0) == 0) return out.fill_(-std::numeric_limits<double>::infinity());
  const auto x = x_in.contiguous();
  const auto w = blas_rows(w_in);
  const auto own = own_classes(labels, class0, w.size(0) / group);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_class_lse_cpu", [&] {
    dispatch_reduce(reduce, [&](auto rk) {
      forward_impl<scalar_t, decltype(rk)::value>(x, w, own.data(), group,
                                                  static_cast<scalar_t>(scale),
                                                  static_cast<scalar_t>(inv_gamma), out);
    });
  });
  return out;
}

// Both backward ops' body: grad_w_out, when given, is the caller's buffer (w's shape, x's dtype,
// any strides, checked) that takes grad_w in place of a fresh one.
std::tuple<at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels, int64_t class0,
    int64_t group, int64_t reduce, double scale, double inv_gamma, const at::Tensor& grad_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& grad_w_out) {
  check_grouped_args("grouped_class_lse_backward", x_in, w_in, labels, group, reduce, &grad_in,
                     &lse_in);
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t n = x_in.size(0), r = w_in.size(0), d = x_in.size(1);
  const auto like = x_in.options().memory_format(at::MemoryFormat::Contiguous);
  // The sweep writes every element of both (uninitialised then).
  const bool sweep = n > 0 && r > 0 && d > 0;
  auto grad_x = sweep ? at::empty(x_in.sizes(), like) : at::zeros(x_in.sizes(), like);
  // grad_w in w's layout: a weights' gradient block of PML's W (D, C K) is a transposed view too
  auto grad_w = grad_w_out.has_value() ? *grad_w_out
                : column_major(w_in)   ? at::empty({d, r}, like).t()
                                       : at::empty({r, d}, like);
  if (!sweep) return {grad_x, grad_w.zero_()};
  const auto x = x_in.contiguous();
  const auto w = blas_rows(w_in);
  const auto own = own_classes(labels, class0, r / group);
  const auto grad = grad_in.to(x.scalar_type()).contiguous();
  const auto lse = lse_in.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_class_lse_backward_cpu", [&] {
    dispatch_reduce(reduce, [&](auto rk) {
      backward_impl<scalar_t, decltype(rk)::value>(
          x, w, own.data(), group, static_cast<scalar_t>(scale), static_cast<scalar_t>(inv_gamma),
          grad.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), grad_x, grad_w);
    });
  });
  return {grad_x, grad_w};
}

std::tuple<at::Tensor, at::Tensor> grouped_class_lse_backward_cpu(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t class0,
    int64_t group, int64_t reduce, double scale, double inv_gamma, const at::Tensor& grad,
    const at::Tensor& lse) {
  return backward_cpu(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse,
                      std::nullopt);
}

at::Tensor grouped_class_lse_backward_into_cpu(const at::Tensor& x, const at::Tensor& w,
                                               const at::Tensor& labels, int64_t class0,
                                               int64_t group, int64_t reduce, double scale,
                                               double inv_gamma, const at::Tensor& grad,
                                               const at::Tensor& lse, at::Tensor& grad_w) {
  check_grad_y_out("grouped_class_lse_backward_into", "grad_w", "w", x, w, grad_w);
  return std::get<0>(
      backward_cpu(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse, grad_w));
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("grouped_class_lse", &grouped_class_lse_cpu);
  m.impl("grouped_class_lse_backward", &grouped_class_lse_backward_cpu);
  m.impl("grouped_class_lse_backward_into", &grouped_class_lse_backward_into_cpu);
}

}  // namespace dmlkern
