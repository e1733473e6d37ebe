// CUDA tiled pair engine (docs/ENGINE.md): dmlkern::pair_engine_forward / _backward.
// A block owns kTileRows rows and walks column tiles of kTileCols, staging kTileK-wide
// slices of both sides in shared memory (fp32 accumulation for fp16 / bf16 / fp32, fp64
// for fp64). Each lane owns one column of the
// tile for its warp's rows and keeps per-row statistics, merged across the warp at the end.
// The backward block owns kTileRows rows of grad_x (or grad_y) and is their only writer:
// no atomics, deterministic. The symmetric backward (y is x: grad_x + grad_y) is one launch
// over x's rows whose tile weights hold both halves (SYM). All per-pair maths is
// pair_engine.h, shared with the CPU build.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../engine_host.h"
#include "../pair_engine.h"

namespace dmlkern {

namespace {

constexpr int kTileRows = 32;  // rows of the "own" side per block
constexpr int kTileCols = 32;  // one column per lane
constexpr int kTileK = 32;     // reduction slice staged in shared memory
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = kTileRows / kWarps;
static_assert(kTileRows == kTileCols, "engine_tile_dots stages both sides with one loop");

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// dots[r] = <own[a0 + warp * kRowsPerWarp + r], other[c0 + lane]> for one tile; rows or
// columns past the end, and k past d, are staged as 0. Every thread of the block must call it.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void engine_tile_dots(
    const scalar_t* __restrict__ own, int64_t own_s0, int64_t own_s1, int64_t n_own,
    const scalar_t* __restrict__ other, int64_t other_s0, int64_t other_s1, int64_t n_other,
    int64_t d, int64_t a0, int64_t c0, acc_t (&own_sh)[kTileRows][kTileK + 1],
    acc_t (&other_sh)[kTileCols][kTileK + 1], acc_t (&dots)[kRowsPerWarp]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int r = 0; r < kRowsPerWarp; ++r) dots[r] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTileRows * kTileK; idx += blockDim.x) {
      const int r = idx / kTileK, k = idx % kTileK;
      const int64_t kk = k0 + k;
      const int64_t a = a0 + r, c = c0 + r;
      own_sh[r][k] = (a < n_own && kk < d) ? static_cast<acc_t>(own[a * own_s0 + kk * own_s1]) : acc_t(0);
      other_sh[r][k] =
          (c < n_other && kk < d) ? static_cast<acc_t>(other[c * other_s0 + kk * other_s1]) : acc_t(0);
    }
    __syncthreads();
    for (int k = 0; k < kTileK; ++k) {
      const acc_t o = other_sh[lane][k];
      for (int r = 0; r < kRowsPerWarp; ++r) dots[r] += own_sh[warp * kRowsPerWarp + r][k] * o;
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int offset) {
  return __shfl_xor_sync(0xffffffffu, v, offset);
}

// Merges the 32 lanes' statistics of one row; every lane ends with the row's total.
template <typename T>
__device__ __forceinline__ void warp_merge(ExtremaAcc<T>& a) {
  for (int offset = 16; offset > 0; offset /= 2)
    a.merge(shfl_xor(a.max_neg, offset), shfl_xor(a.min_pos, offset));
}
template <typename T>
__device__ __forceinline__ void warp_merge(Lse2Acc<T>& a) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T pm = shfl_xor(a.pos.m, offset), ps = shfl_xor(a.pos.s, offset);
    const T nm = shfl_xor(a.neg.m, offset), ns = shfl_xor(a.neg.s, offset);
    a.pos.merge(pm, ps);
    a.neg.merge(nm, ns);
  }
}
template <typename T>
__device__ __forceinline__ void warp_merge(RowSums4<T>& a) {  // pass 4
  for (int offset = 16; offset > 0; offset /= 2) {
    const T s0 = shfl_xor(a.sum[0], offset), s1 = shfl_xor(a.sum[1], offset);
    const T s2 = shfl_xor(a.sum[2], offset), s3 = shfl_xor(a.sum[3], offset);
    a.merge(s0, s1, s2, s3);
  }
}
template <typename T>
__device__ __forceinline__ void warp_merge(RowSums3<T>& a) {  // passes 2 and 3
  for (int offset = 16; offset > 0; offset /= 2) {
    const T s0 = shfl_xor(a.sum[0], offset), s1 = shfl_xor(a.sum[1], offset);
    const T s2 = shfl_xor(a.sum[2], offset);
    a.merge(s0, s1, s2);
  }
}

// Forward: row_in_t is row_in as (3, n) columns (max_neg, min_pos, L); out is (n, kCols).
// Pass 3 (the symmetric case) reads column j's L as row_in_t[2n + j].
template <typename scalar_t, int64_t PASS, int64_t TR, int64_t MI>
__global__ void __launch_bounds__(kThreads) pair_engine_fwd_kernel(
    const scalar_t* __restrict__ x, int64_t xs0, int64_t xs1, const scalar_t* __restrict__ y,
    int64_t ys0, int64_t ys1, const int64_t* __restrict__ xlab, const int64_t* __restrict__ ylab,
    int64_t n, int64_t m, int64_t d,
    const typename AccOf<scalar_t>::type* __restrict__ row_in_t,
    EngineParams<typename AccOf<scalar_t>::type> p, bool exclude_diag,
    typename AccOf<scalar_t>::type* __restrict__ out) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int kCols =
      PASS == kPassHinge ? 4 : (PASS == kPassPosSoftplus || PASS == kPassLiftedPairs ? 3 : 2);
  __shared__ acc_t xs[kTileRows][kTileK + 1];
  __shared__ acc_t ys[kTileCols][kTileK + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;

  PassAcc<PASS, acc_t> stats[kRowsPerWarp];
  int64_t lab_i[kRowsPerWarp];
  acc_t max_neg[kRowsPerWarp], min_pos[kRowsPerWarp], L[kRowsPerWarp];
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = r0 + warp * kRowsPerWarp + r;
    const bool live = i < n;
    lab_i[r] = live ? xlab[i] : 0;
    max_neg[r] = live ? row_in_t[i] : acc_t(0);
    min_pos[r] = live ? row_in_t[n + i] : acc_t(0);
    L[r] = live ? row_in_t[2 * n + i] : acc_t(0);
  }

  // Passes 2 and 3 sum over positives only: a column tile whose labels all miss the block's
  // label range [lab_lo, lab_hi] is skipped (as the CPU and Triton do; few tiles remain when the
  // rows are sorted by label). The block decides together, so no barrier is skipped by some.
  constexpr bool kPositivesOnly = PASS == kPassPosSoftplus || PASS == kPassLiftedPairs;
  __shared__ int64_t lab_lo, lab_hi;
  if constexpr (kPositivesOnly) {
    if (threadIdx.x == 0) {
      lab_lo = lab_hi = xlab[r0];  // the block's first row exists
      for (int64_t i = r0 + 1; i < r0 + kTileRows && i < n; ++i) {
        const int64_t lab = xlab[i];
        lab_lo = lab < lab_lo ? lab : lab_lo;
        lab_hi = lab > lab_hi ? lab : lab_hi;
      }
    }
    __syncthreads();
  }

  acc_t dots[kRowsPerWarp];
  for (int64_t c0 = 0; c0 < m; c0 += kTileCols) {
    const int64_t j = c0 + lane;
    if constexpr (kPositivesOnly) {
      const bool meets = j < m && ylab[j] >= lab_lo && ylab[j] <= lab_hi;
      if (!__syncthreads_or(meets)) continue;  // every thread takes the same branch
    }
    engine_tile_dots<scalar_t, acc_t>(x, xs0, xs1, n, y, ys0, ys1, m, d, r0, c0, xs, ys, dots);
    if (j >= m) continue;  // after the block-wide staging: no barrier is skipped
    const int64_t lab_j = ylab[j];
    const acc_t L_j = PASS == kPassLiftedPairs ? row_in_t[2 * n + j] : acc_t(0);
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t i = r0 + warp * kRowsPerWarp + r;
      if (i >= n) continue;
      const acc_t v = engine_value<TR>(dots[r]);
      const bool same = lab_i[r] == lab_j;
      const bool excluded = exclude_diag && i == j;
      if constexpr (PASS == kPassExtrema) {  // label masks only: mining is ignored
        stats[r].push(v, engine_pos_kept<kMiningNone>(v, same, excluded, acc_t(0), acc_t(0)),
                      engine_neg_kept<kMiningNone>(v, same, acc_t(0), acc_t(0)));
      } else {
        const bool kp = engine_pos_kept<MI>(v, same, excluded, max_neg[r], p.eps);
        if constexpr (PASS == kPassLse2) {
          stats[r].template push<TR>(v, kp, engine_neg_kept<MI>(v, same, min_pos[r], p.eps), p);
        } else if constexpr (PASS == kPassPosSoftplus) {
          stats[r].push(v, kp, L[r], p, StdExp());
        } else if constexpr (PASS == kPassHinge) {
          stats[r].push(v, kp, engine_neg_kept<MI>(v, same, min_pos[r], p.eps), L[r], p);
        } else {
          stats[r].push(v, kp, L[r], L_j, p, StdExp(), StdLog1p());
        }
      }
    }
  }

  for (int r = 0; r < kRowsPerWarp; ++r) {
    warp_merge(stats[r]);
    const int64_t i = r0 + warp * kRowsPerWarp + r;
    if (lane == 0 && i < n) stats[r].store(out + i * kCols);
  }
}

// Row k's backward inputs from the column layouts below.
template <bool LIFT, typename T>
__device__ __forceinline__ EngineRowCoef<T> load_row_coef(const T* __restrict__ row_in_t,
                                                          const T* __restrict__ row_coef_t,
                                                          int64_t nx, int64_t k) {
  return {row_in_t[k],           row_in_t[nx + k],       row_in_t[2 * nx + k],
          row_coef_t[k],         row_coef_t[nx + k],     row_coef_t[2 * nx + k],
          row_coef_t[3 * nx + k], row_coef_t[4 * nx + k], LIFT ? row_coef_t[5 * nx + k] : T(0)};
}

// dl/ds of the tile entry (a, b) with value v: the pair (i, j) = (a, b) (OWN_IS_X) or (b, a),
// with row i's coefficients (layouts: pair_engine_grad_kernel). HINGE: row_coef_t is the hinge
// backward's (H_pos, H_neg) (mining 0).
template <int64_t TR, int64_t MI, bool OWN_IS_X, bool LIFT, bool HINGE, typename T>
__device__ __forceinline__ T pair_weight(T v, int64_t a, int64_t b, const int64_t* __restrict__ xlab,
                                         const int64_t* __restrict__ ylab, int64_t nx,
                                         const T* __restrict__ row_in_t,
                                         const T* __restrict__ row_coef_t, const EngineParams<T>& p,
                                         bool exclude_diag) {
  const int64_t i = OWN_IS_X ? a : b, j = OWN_IS_X ? b : a;
  const bool same = xlab[i] == ylab[j];
  const bool excluded = exclude_diag && i == j;
  const bool kp = engine_pos_kept<MI>(v, same, excluded, row_in_t[i], p.eps);
  const bool kn = engine_neg_kept<MI>(v, same, row_in_t[nx + i], p.eps);
  if constexpr (HINGE) {
    return engine_hinge_pair_grad<TR>(v, kp, kn, row_coef_t[i], row_coef_t[nx + i],
                                      row_in_t[2 * nx + i], p);
  }
  const T a_pos = row_coef_t[i], lse_pos = row_coef_t[nx + i];
  const T a_neg = row_coef_t[2 * nx + i], lse_neg = row_coef_t[3 * nx + i];
  const T b_pos = row_coef_t[4 * nx + i], L = row_in_t[2 * nx + i];
  const T c_lift = LIFT ? row_coef_t[5 * nx + i] : T(0);
  if (LIFT && c_lift != T(0)) {
    const T L_j = row_in_t[2 * nx + j];
    return engine_pair_grad<TR, true, true>(v, kp, kn, a_pos, lse_pos, a_neg, lse_neg, b_pos, L, p,
                                            StdExp(), c_lift, L_j, StdLog1p());
  }
  // The B_pos term lives on positive pairs (same labels): the other pairs skip its exps.
  return same && b_pos != T(0)
             ? engine_pair_grad<TR, true>(v, kp, kn, a_pos, lse_pos, a_neg, lse_neg, b_pos, L, p,
                                          StdExp())
             : engine_pair_grad<TR, false>(v, kp, kn, a_pos, lse_pos, a_neg, lse_neg, b_pos, L, p,
                                           StdExp());
}

// The symmetric case (own = other = x): row a's weight of the pair (a, b) plus row b's of the
// pair (b, a), s_ab = s_ba (engine_pair_grad_sym).
template <int64_t TR, int64_t MI, bool LIFT, bool HINGE, typename T>
__device__ __forceinline__ T pair_weight_sym(T v, int64_t a, int64_t b,
                                             const int64_t* __restrict__ lab, int64_t nx,
                                             const T* __restrict__ row_in_t,
                                             const T* __restrict__ row_coef_t,
                                             const EngineParams<T>& p, bool exclude_diag) {
  const bool same = lab[a] == lab[b];
  const bool excluded = exclude_diag && a == b;
  if constexpr (HINGE) {
    return engine_hinge_pair_grad_sym<TR>(v, same, excluded, row_coef_t[a], row_coef_t[nx + a],
                                          row_in_t[2 * nx + a], row_coef_t[b], row_coef_t[nx + b],
                                          row_in_t[2 * nx + b], p);
  }
  const EngineRowCoef<T> ra = load_row_coef<LIFT>(row_in_t, row_coef_t, nx, a);
  const EngineRowCoef<T> rb = load_row_coef<LIFT>(row_in_t, row_coef_t, nx, b);
  if (LIFT && (ra.c_lift != T(0) || rb.c_lift != T(0))) {
    return engine_pair_grad_sym<TR, MI, true, true>(v, same, excluded, ra, rb, p, StdExp(),
                                                    StdLog1p());
  }
  return same && (ra.b_pos != T(0) || rb.b_pos != T(0))
             ? engine_pair_grad_sym<TR, MI, true, false>(v, same, excluded, ra, rb, p, StdExp())
             : engine_pair_grad_sym<TR, MI, false, false>(v, same, excluded, ra, rb, p, StdExp());
}

// Backward: grad_own[a] = sum_b dl/ds(a, b) other[b] for the block's kTileRows own rows.
// OWN_IS_X: the pair (i, j) is (a, b) (grad_x), else (b, a) (grad_y). row_in_t (3, nx) and
// row_coef_t (5, nx), (6, nx) with C_lift (LIFT) or (2, nx) (HINGE: H_pos, H_neg) hold the
// per-x-row inputs as columns; grad_own is (n_own, d) contiguous in the accumulation dtype. LIFT reads L_j as
// row_in_t[2 nx + j] (the symmetric case). SYM (backward symmetric = true, own = other = x,
// OWN_IS_X): w_sh holds both halves, row a's weight of the pair (a, b) plus row b's of
// (b, a) (engine_pair_grad_sym), so one launch gives grad_x + grad_y from one tile product.
template <typename scalar_t, int64_t TR, int64_t MI, bool OWN_IS_X, bool LIFT, bool HINGE,
          bool SYM = false>
__global__ void __launch_bounds__(kThreads) pair_engine_grad_kernel(
    const scalar_t* __restrict__ own, int64_t os0, int64_t os1, int64_t n_own,
    const scalar_t* __restrict__ other, int64_t ts0, int64_t ts1, int64_t n_other, int64_t d,
    const int64_t* __restrict__ xlab, const int64_t* __restrict__ ylab, int64_t nx,
    const typename AccOf<scalar_t>::type* __restrict__ row_in_t,
    const typename AccOf<scalar_t>::type* __restrict__ row_coef_t,
    EngineParams<typename AccOf<scalar_t>::type> p, bool exclude_diag,
    typename AccOf<scalar_t>::type* __restrict__ grad_own) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t own_sh[kTileRows][kTileK + 1];
  __shared__ acc_t other_sh[kTileCols][kTileK + 1];
  __shared__ acc_t w_sh[kTileRows][kTileCols + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  acc_t dots[kRowsPerWarp];
  for (int64_t c0 = 0; c0 < n_other; c0 += kTileCols) {
    engine_tile_dots<scalar_t, acc_t>(own, os0, os1, n_own, other, ts0, ts1, n_other, d, a0, c0,
                                      own_sh, other_sh, dots);
    const int64_t b = c0 + lane;
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t a = a0 + warp * kRowsPerWarp + r;
      acc_t w = acc_t(0);
      if (a < n_own && b < n_other) {
        const acc_t v = engine_value<TR>(dots[r]);
        if constexpr (SYM) {
          w = pair_weight_sym<TR, MI, LIFT, HINGE>(v, a, b, xlab, nx, row_in_t, row_coef_t, p,
                                                   exclude_diag);
        } else {
          w = pair_weight<TR, MI, OWN_IS_X, LIFT, HINGE>(v, a, b, xlab, ylab, nx, row_in_t,
                                                         row_coef_t, p, exclude_diag);
        }
      }
      w_sh[warp * kRowsPerWarp + r][lane] = w;
    }
    __syncthreads();
    // grad_own[a0 + rr, k] += sum_c w_sh[rr][c] * other[c0 + c, k], one k per lane.
    for (int64_t k0 = 0; k0 < d; k0 += 32) {
      const int64_t k = k0 + lane;
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int rr = warp * kRowsPerWarp + r;
        const int64_t a = a0 + rr;
        if (a >= n_own || k >= d) continue;
        acc_t sum = acc_t(0);
        for (int c = 0; c < kTileCols && c0 + c < n_other; ++c)
          sum += w_sh[rr][c] * static_cast<acc_t>(other[(c0 + c) * ts0 + k * ts1]);
        grad_own[a * d + k] += sum;
      }
    }
    __syncthreads();  // w_sh is rewritten by the next tile
  }
}

int num_blocks(int64_t rows) {
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "dmlkern: too many rows for one launch");
  return static_cast<int>(blocks);
}

void check_cuda_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "dmlkern: the CUDA backend takes float32, float64, float16 or bfloat16 x, got ", t);
}

template <typename scalar_t, int64_t PASS, int64_t TR, int64_t MI>
void launch_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xl,
                    const at::Tensor& yl, const at::Tensor& row_in_t,
                    EngineParams<typename AccOf<scalar_t>::type> p, bool exclude_diag,
                    at::Tensor& out, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  pair_engine_fwd_kernel<scalar_t, PASS, TR, MI><<<num_blocks(x.size(0)), kThreads, 0, stream>>>(
      x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), y.data_ptr<scalar_t>(), y.stride(0),
      y.stride(1), xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(), x.size(0), y.size(0),
      x.size(1), row_in_t.data_ptr<acc_t>(), p, exclude_diag, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor pair_engine_forward_cuda(const at::Tensor& x, const at::Tensor& y,
                                    const at::Tensor& x_labels, const at::Tensor& y_labels,
                                    const at::Tensor& row_in, int64_t pass_kind, int64_t transform,
                                    int64_t mining, at::ArrayRef<double> params, bool exclude_diag) {
  check_pair_engine_args(x, y, x_labels, y_labels, row_in, nullptr, pass_kind, transform, mining,
                         params, exclude_diag, /*symmetric=*/false);
  check_cuda_dtype(x);
  // Kernels are plain compute: nothing here may be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  const auto st = stats_dtype(x.scalar_type());
  auto out = at::empty({n, engine_out_columns(pass_kind)}, x.options().dtype(st));
  if (n == 0) return out;
  const auto xl = x_labels.contiguous();
  const auto yl = y_labels.contiguous();
  const auto row_in_t = row_in.to(st).t().contiguous();  // (3, n) columns
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_engine_forward_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const auto p = make_params<acc_t>(params);
    dispatch_forward_pass(pass_kind, transform, mining, [&](auto pass, auto tr, auto mi) {
      launch_forward<scalar_t, decltype(pass)::value, decltype(tr)::value, decltype(mi)::value>(
          x, y, xl, yl, row_in_t, p, exclude_diag, out, stream);
    });
  });
  return out;
}

// symmetric: one launch over x's row blocks (SYM) writes grad_x + grad_y into grad_x; grad_y
// stays zero.
template <typename scalar_t, int64_t TR, int64_t MI, bool LIFT, bool HINGE>
void launch_backward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& xl,
                     const at::Tensor& yl, const at::Tensor& row_in_t, const at::Tensor& row_coef_t,
                     EngineParams<typename AccOf<scalar_t>::type> p, bool exclude_diag,
                     bool symmetric, at::Tensor& grad_x, at::Tensor& grad_y, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t n = x.size(0), d = x.size(1);
  // One kernel launch for the block rows of `own` against `other`; the labels stay (x's, y's).
  const auto launch = [&](auto kernel, const at::Tensor& own, const at::Tensor& other,
                          const at::Tensor& ylab, at::Tensor& grad_own) {
    kernel<<<num_blocks(own.size(0)), kThreads, 0, stream>>>(
        own.data_ptr<scalar_t>(), own.stride(0), own.stride(1), own.size(0),
        other.data_ptr<scalar_t>(), other.stride(0), other.stride(1), other.size(0), d,
        xl.data_ptr<int64_t>(), ylab.data_ptr<int64_t>(), n, row_in_t.data_ptr<acc_t>(),
        row_coef_t.data_ptr<acc_t>(), p, exclude_diag, grad_own.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (symmetric) {
    launch(pair_engine_grad_kernel<scalar_t, TR, MI, true, LIFT, HINGE, true>, x, x, xl, grad_x);
    return;
  }
  launch(pair_engine_grad_kernel<scalar_t, TR, MI, true, LIFT, HINGE>, x, y, yl, grad_x);
  launch(pair_engine_grad_kernel<scalar_t, TR, MI, false, LIFT, HINGE>, y, x, yl, grad_y);
}

std::tuple<at::Tensor, at::Tensor> pair_engine_backward_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
    const at::Tensor& y_labels, const at::Tensor& row_in, const at::Tensor& row_coef,
    int64_t transform, int64_t mining, at::ArrayRef<double> params, bool exclude_diag,
    bool symmetric) {
  check_pair_engine_args(x, y, x_labels, y_labels, row_in, &row_coef, -1, transform, mining,
                         params, exclude_diag, symmetric);
  check_cuda_dtype(x);
  // Kernels are plain compute: nothing here may be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const auto st = stats_dtype(x.scalar_type());
  auto grad_x = at::zeros({n, d}, x.options().dtype(st));
  auto grad_y = at::zeros({m, d}, y.options().dtype(st));
  if (n > 0 && m > 0 && d > 0) {
    const auto xl = x_labels.contiguous();
    const auto yl = y_labels.contiguous();
    const auto row_in_t = row_in.to(st).t().contiguous();      // (3, n)
    const auto row_coef_t = row_coef.to(st).t().contiguous();  // (5, 6 or 2, n)
    const bool lift = row_coef.size(1) == 6;  // C_lift
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_engine_backward_cuda", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      const auto p = make_params<acc_t>(params);
      if (is_hinge_coef(row_coef)) {  // the hinge backward, mining 0 (checked)
        const auto launch_hinge = [&](auto tr) {
          launch_backward<scalar_t, decltype(tr)::value, kMiningNone, false, true>(
              x, y, xl, yl, row_in_t, row_coef_t, p, exclude_diag, symmetric, grad_x, grad_y,
              stream);
        };
        if (transform == kTransformUnitDistance) {
          launch_hinge(IC<kTransformUnitDistance>{});
        } else {
          launch_hinge(IC<kTransformDot>{});
        }
        return;
      }
      dispatch_config(transform, mining, [&](auto tr, auto mi) {
        constexpr int64_t TR = decltype(tr)::value, MI = decltype(mi)::value;
        dispatch_lift<TR, MI>(lift, [&](auto lift_term) {
          launch_backward<scalar_t, TR, MI, decltype(lift_term)::value, false>(
              x, y, xl, yl, row_in_t, row_coef_t, p, exclude_diag, symmetric, grad_x, grad_y,
              stream);
        });
      });
    });
  }
  return {grad_x.to(x.scalar_type()), grad_y.to(y.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CUDA, m) {
  m.impl("pair_engine_forward", &pair_engine_forward_cuda);
  m.impl("pair_engine_backward", &pair_engine_backward_cuda);
}

}  // namespace dmlkern
