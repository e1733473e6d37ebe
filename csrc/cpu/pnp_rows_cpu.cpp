// dmlkern::pnp_ranks / pnp_ranks_backward on the CPU: the per-row work of the fused PNPLoss
// (dmlkern/fused/pnp.py, which holds the plain-torch twin of both) on one row block of
// similarities s (B x M, from the deterministic fixed_mm).
//
// Row i's rank of its class member j (column cols[i][j]) is
//   r_ij = sum over columns k of m_ik / (1 + exp(clamp(-(s_ik - s_ij) / anneal, -50, 50))),
// m_ik = 1 where k's label differs from row i's, else 0 (a product, as PML's: NaN stays NaN).
// The backward takes g = dL/dr (B x P) and returns dL/ds: with e the clamped exponential, the
// slope of a term in s_ik - s_ij is e / (1 + e)^2 / anneal inside the clamp and 0 outside, so
// dL/ds_ik += g_ij m_ik slope and dL/ds_i,cols[i][j] -= the same summed over k.
//
// Each row is one thread's, its sums vectorised in one fixed order for a given CPU (the clone
// picked at load time: AVX-512 and AVX2 machines may differ in the last bits, the thread count
// changes nothing). Slots with real[i][j] false (padding, or a row alone in its class) are skipped.
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <vector>

#include "../checks.h"

namespace dmlkern {

namespace {

constexpr double kClamp = 50.0;  // PML's bound on the sigmoid's exponent

struct PnpArgs {
  int64_t rows, cols, slots;
  double anneal;
};

PnpArgs parse(const char* op, const at::Tensor& s, const at::Tensor& cols, const at::Tensor& real,
              const at::Tensor& row_labels, const at::Tensor& col_labels, double anneal) {
  TORCH_CHECK(s.dim() == 2, op, ": s must be 2-D (rows, columns), got ", s.sizes());
  check_cpu_dtype(s, "s");
  TORCH_CHECK(cols.dim() == 2 && cols.size(0) == s.size(0) && cols.scalar_type() == at::kLong, op,
              ": cols must be int64 of shape (", s.size(0), ", P), got ", cols.sizes(), " ", cols.scalar_type());
  TORCH_CHECK(real.sizes() == cols.sizes() && real.scalar_type() == at::kBool, op,
              ": real must be bool of cols' shape ", cols.sizes(), ", got ", real.sizes(), " ", real.scalar_type());
  TORCH_CHECK(row_labels.dim() == 1 && row_labels.size(0) == s.size(0) && row_labels.scalar_type() == at::kLong, op,
              ": row_labels must be int64 of shape (", s.size(0), "), got ", row_labels.sizes(), " ",
              row_labels.scalar_type());
  TORCH_CHECK(col_labels.dim() == 1 && col_labels.size(0) == s.size(1) && col_labels.scalar_type() == at::kLong, op,
              ": col_labels must be int64 of shape (", s.size(1), "), got ", col_labels.sizes(), " ",
              col_labels.scalar_type());
  TORCH_CHECK(anneal > 0, op, ": anneal must be > 0, got ", anneal);
  if (cols.numel() > 0) {
    const at::Tensor used = cols.masked_select(real);
    TORCH_CHECK(used.numel() == 0 || (used.min().item<int64_t>() >= 0 && used.max().item<int64_t>() < s.size(1)), op,
                ": cols must index s's columns where real");
  }
  return {s.size(0), s.size(1), cols.size(1), anneal};
}

// The clamped exponent's exp, and whether the exponent was inside the clamp (NaN: not inside).
template <typename T>
DMLK_CPU_INLINE T clamped_exp(T z, bool& inside) {
  inside = (z >= T(-kClamp)) & (z <= T(kClamp));
  const T zc = z < T(-kClamp) ? T(-kClamp) : (z > T(kClamp) ? T(kClamp) : z);  // NaN stays NaN
  return CpuExp()(zc);
}

// r for one slot: sum_k m_k / (1 + exp(clamp(-(s_k - sj) / anneal))).
template <typename T>
DMLK_CPU_CLONES T slot_rank(const T* __restrict__ s_row, const T* __restrict__ negative, T sj, T anneal, int64_t m) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < m; ++k) {
    bool inside;
    const T e = clamped_exp(-(s_row[k] - sj) / anneal, inside);
    acc += T(1) / (T(1) + e) * negative[k];
  }
  return acc;
}

// dL/ds_k += g m_k slope_k for one slot; returns the sum of those (dL/ds_j gets minus it).
template <typename T>
DMLK_CPU_CLONES T slot_grad(const T* __restrict__ s_row, const T* __restrict__ negative, T sj, T anneal, T g,
                            int64_t m, T* __restrict__ gs) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < m; ++k) {
    bool inside;
    const T e = clamped_exp(-(s_row[k] - sj) / anneal, inside);
    const T w = g * ((inside ? e / ((T(1) + e) * (T(1) + e)) : T(0)) / anneal) * negative[k];
    gs[k] += w;
    total += w;
  }
  return total;
}

// body(i, s_row, negative) for every row, in parallel over groups of 8 rows, with the row's
// 0/1 negative mask in a per-thread buffer.
template <typename T, typename F>
void for_each_row(const PnpArgs& a, const T* s, const int64_t* row_labels, const int64_t* col_labels, F&& body) {
  parallel_blocks(ceil_div(a.rows, 8), [&](int64_t b0, int64_t b1) {
    std::vector<T> negative(a.cols);
    for (int64_t i = b0 * 8; i < std::min(a.rows, b1 * 8); ++i) {
      const int64_t label = row_labels[i];
      for (int64_t k = 0; k < a.cols; ++k) negative[k] = col_labels[k] != label ? T(1) : T(0);
      body(i, s + i * a.cols, negative.data());
    }
  });
}

at::Tensor pnp_ranks_cpu(const at::Tensor& s_in, const at::Tensor& cols_in, const at::Tensor& real_in,
                         const at::Tensor& row_labels_in, const at::Tensor& col_labels_in, double anneal) {
  const PnpArgs a = parse("pnp_ranks", s_in, cols_in, real_in, row_labels_in, col_labels_in, anneal);
  const at::Tensor s = s_in.contiguous(), cols = cols_in.contiguous(), real = real_in.contiguous();
  const at::Tensor rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous();
  at::Tensor ranks = at::zeros({a.rows, a.slots}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pnp_ranks", [&] {
    const int64_t* c = cols.data_ptr<int64_t>();
    const bool* r = real.data_ptr<bool>();
    scalar_t* out = ranks.data_ptr<scalar_t>();
    for_each_row<scalar_t>(a, s.data_ptr<scalar_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(),
                           [&](int64_t i, const scalar_t* s_row, const scalar_t* negative) {
                             for (int64_t j = 0; j < a.slots; ++j)
                               if (r[i * a.slots + j])
                                 out[i * a.slots + j] = slot_rank<scalar_t>(s_row, negative, s_row[c[i * a.slots + j]],
                                                                            scalar_t(a.anneal), a.cols);
                           });
  });
  return ranks;
}

at::Tensor pnp_ranks_backward_cpu(const at::Tensor& s_in, const at::Tensor& cols_in, const at::Tensor& real_in,
                                  const at::Tensor& row_labels_in, const at::Tensor& col_labels_in, double anneal,
                                  const at::Tensor& g_rank_in) {
  const PnpArgs a = parse("pnp_ranks_backward", s_in, cols_in, real_in, row_labels_in, col_labels_in, anneal);
  TORCH_CHECK(g_rank_in.sizes() == cols_in.sizes() && g_rank_in.scalar_type() == s_in.scalar_type(),
              "pnp_ranks_backward: g_rank must have cols' shape ", cols_in.sizes(), " and s's dtype, got ",
              g_rank_in.sizes(), " ", g_rank_in.scalar_type());
  const at::Tensor s = s_in.contiguous(), cols = cols_in.contiguous(), real = real_in.contiguous();
  const at::Tensor rl = row_labels_in.contiguous(), cl = col_labels_in.contiguous(), g = g_rank_in.contiguous();
  at::Tensor grad_s = at::zeros({a.rows, a.cols}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "pnp_ranks_backward", [&] {
    const int64_t* c = cols.data_ptr<int64_t>();
    const bool* r = real.data_ptr<bool>();
    const scalar_t* gr = g.data_ptr<scalar_t>();
    scalar_t* out = grad_s.data_ptr<scalar_t>();
    for_each_row<scalar_t>(a, s.data_ptr<scalar_t>(), rl.data_ptr<int64_t>(), cl.data_ptr<int64_t>(),
                           [&](int64_t i, const scalar_t* s_row, const scalar_t* negative) {
                             scalar_t* gs = out + i * a.cols;
                             for (int64_t j = 0; j < a.slots; ++j) {
                               if (!r[i * a.slots + j]) continue;
                               const int64_t col = c[i * a.slots + j];
                               const scalar_t to_ij = slot_grad<scalar_t>(s_row, negative, s_row[col],
                                                                          scalar_t(a.anneal), gr[i * a.slots + j],
                                                                          a.cols, gs);
                               gs[col] -= to_ij;
                             }
                           });
  });
  return grad_s;
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("pnp_ranks", &pnp_ranks_cpu);
  m.impl("pnp_ranks_backward", &pnp_ranks_backward_cpu);
}

}  // namespace dmlkern
