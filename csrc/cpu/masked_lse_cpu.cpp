// CPU masked log-sum-exp: row blocks in parallel (at::parallel_for), each
// walking column tiles whose similarities come from BLAS (at::mm) on a small
// tile buffer. Nothing of size N x M is ever allocated.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../pair_engine.h"

namespace dmlkern {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor masked_lse_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& x_labels,
                          const at::Tensor& y_labels, double scale, int64_t mask_mode,
                          bool exclude_diag) {
  check_pair_inputs(x, y, x_labels, y_labels, mask_mode);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "dmlkern: the CPU backend takes float32 or float64 x, got ", x.scalar_type());
  const int64_t n = x.size(0), m = y.size(0);
  auto lse = at::empty({n}, x.options().dtype(stats_dtype(x.scalar_type())));
  if (n == 0) return lse;
  auto xl = x_labels.contiguous();
  auto yl = y_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_lse_cpu", [&] {
    using acc_t = scalar_t;  // fp32 or fp64 on CPU: accumulate in the input type
    const int64_t* xlab = xl.data_ptr<int64_t>();
    const int64_t* ylab = yl.data_ptr<int64_t>();
    acc_t* out = lse.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(scale);
    at::parallel_for(0, ceil_div(n, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch guard (see masked_lse_cpu).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::vector<OnlineLSE<acc_t>> rows(kRowBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kRowBlock, nr = std::min(kRowBlock, n - r0);
        for (int64_t r = 0; r < nr; ++r) rows[r] = OnlineLSE<acc_t>();
        const auto xb = x.narrow(0, r0, nr);
        for (int64_t c0 = 0; c0 < m; c0 += kColBlock) {
          const int64_t nc = std::min(kColBlock, m - c0);
          const auto tile = at::mm(xb, y.narrow(0, c0, nc).t()).contiguous();
          const scalar_t* t = tile.data_ptr<scalar_t>();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = r0 + r;
            for (int64_t c = 0; c < nc; ++c) {
              const int64_t j = c0 + c;
              if (pair_kept(mask_mode, xlab[i], ylab[j], i, j, exclude_diag))
                rows[r].push(s * static_cast<acc_t>(t[r * nc + c]));
            }
          }
        }
        for (int64_t r = 0; r < nr; ++r) out[r0 + r] = rows[r].value();
      }
    });
  });
  return lse;
}

// grad_own[a] = sum_b w(a, b) * other[b], one block of `own` rows per task, so
// every output row is written by exactly one task (deterministic, no atomics).
// For grad_x, own = x; for grad_y, own = y and the pair (i, j) is (b, a).
template <typename scalar_t>
void lse_grad_side(const at::Tensor& own, const at::Tensor& other, bool own_is_x,
                   const int64_t* xlab, const int64_t* ylab, const scalar_t* grad_lse,
                   const scalar_t* lse, scalar_t scale, int64_t mask_mode, bool exclude_diag,
                   at::Tensor& grad_own) {
  const int64_t n_own = own.size(0), n_other = other.size(0);
  at::parallel_for(0, ceil_div(n_own, kRowBlock), 1, [&](int64_t b0, int64_t b1) {
    // Worker threads do not inherit the caller's dispatch guard: without this, autograd
    // would record every tile product of an input that requires grad (an N x M leak).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t a0 = b * kRowBlock, na = std::min(kRowBlock, n_own - a0);
      const auto own_blk = own.narrow(0, a0, na);
      auto grad_blk = grad_own.narrow(0, a0, na);
      for (int64_t c0 = 0; c0 < n_other; c0 += kColBlock) {
        const int64_t nc = std::min(kColBlock, n_other - c0);
        const auto other_blk = other.narrow(0, c0, nc);
        auto w = at::mm(own_blk, other_blk.t()).contiguous();  // (na, nc) similarities
        scalar_t* wp = w.data_ptr<scalar_t>();
        for (int64_t r = 0; r < na; ++r) {
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t i = own_is_x ? a0 + r : c0 + c;
            const int64_t j = own_is_x ? c0 + c : a0 + r;
            const bool kept = pair_kept(mask_mode, xlab[i], ylab[j], i, j, exclude_diag);
            wp[r * nc + c] =
                lse_pair_grad<scalar_t>(grad_lse[i], lse[i], scale * wp[r * nc + c], kept, scale);
          }
        }
        grad_blk.addmm_(w, other_blk);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_lse_backward_cpu(
    const at::Tensor& grad_lse, const at::Tensor& x, const at::Tensor& y,
    const at::Tensor& x_labels, const at::Tensor& y_labels, const at::Tensor& lse, double scale,
    int64_t mask_mode, bool exclude_diag) {
  check_pair_inputs(x, y, x_labels, y_labels, mask_mode);
  // Kernels are plain compute: the tile products inside must never be recorded by autograd.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(grad_lse.dim() == 1 && grad_lse.size(0) == x.size(0),
              "dmlkern: grad_lse must be 1-D of length N");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0), "dmlkern: lse must be 1-D of length N");
  auto grad_x = at::zeros_like(x, at::MemoryFormat::Contiguous);
  auto grad_y = at::zeros_like(y, at::MemoryFormat::Contiguous);
  if (x.size(0) == 0 || y.size(0) == 0) return {grad_x, grad_y};
  auto xl = x_labels.contiguous();
  auto yl = y_labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_lse_backward_cpu", [&] {
    auto g = grad_lse.to(x.scalar_type()).contiguous();
    auto l = lse.to(x.scalar_type()).contiguous();
    const auto s = static_cast<scalar_t>(scale);
    lse_grad_side<scalar_t>(x, y, true, xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(),
                            g.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), s, mask_mode,
                            exclude_diag, grad_x);
    lse_grad_side<scalar_t>(y, x, false, xl.data_ptr<int64_t>(), yl.data_ptr<int64_t>(),
                            g.data_ptr<scalar_t>(), l.data_ptr<scalar_t>(), s, mask_mode,
                            exclude_diag, grad_y);
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("masked_lse", &masked_lse_cpu);
  m.impl("masked_lse_backward", &masked_lse_backward_cpu);
}

}  // namespace dmlkern
