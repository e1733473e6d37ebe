// dmlkern::unit_rows / unit_rows_backward on the CPU: a block of class-weight rows normalised
// (rows / max(|row|, eps)) and that normalisation's backward, each in two sweeps over the block
// (torch ops take five and nine: a product, a sum, a division; the backward's product, sum,
// addcmul and division). The class-weight losses call them once per block of weight rows forward
// and backward (dmlkern/fused/class_softmax.py), and every fused loss's row normalisation its
// backward on the batch's row-major rows (fused/_common.py, _UnitRows: one output where torch's
// ops allocate five, page-faulted afresh past ~1 MiB); the block is often a column-major view of PML's
// (D, C) W, whose rows are C apart: each sweep then runs along W's contiguous rows (one class
// per lane), else along each row. A row's sums run over its entries in order, in double, without
// fused multiply-adds (no_fp_contract.h: the vectorised sweeps would contract them, the strided
// ones not): the bits depend neither on the layout, nor on the chunks and the thread count, nor on
// the vector width (the sweeps are compiled for AVX-512, AVX2 and baseline).
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

#include <vector>

#include "no_fp_contract.h"  // last: the sums below without fused multiply-adds

namespace dmlkern {

namespace {

// Rows per parallel chunk: 1024 of a column-major block (each chunk's sweeps run along W's rows),
// ~2^15 entries of a row-major one (a batch's embeddings: 256 rows of 128). A row's sums do not
// depend on the chunks.
inline int64_t unit_rows_grain(const at::Tensor& t) {
  return t.stride(0) == 1 ? 1024 : std::max<int64_t>(8, (int64_t(1) << 15) / std::max<int64_t>(t.size(1), 1));
}

void check_unit_rows_args(const at::Tensor& rows, const at::Tensor& out, const char* op) {
  TORCH_CHECK(rows.dim() == 2, "dmlkern: ", op, ": rows must be 2-D (R, D), got ", rows.sizes());
  TORCH_CHECK(rows.device().is_cpu() && out.device().is_cpu(), "dmlkern: ", op, ": CPU tensors only");
  check_cpu_dtype(rows, "rows");
  TORCH_CHECK(out.sizes() == rows.sizes() && out.scalar_type() == rows.scalar_type(), "dmlkern: ", op,
              ": out must have rows' shape ", rows.sizes(), " and dtype ", rows.scalar_type(), ", got ",
              out.sizes(), " ", out.scalar_type());
}

// For each row r in [r0, r1): sums[r - r0] = sum_d a[r, d] * b[r, d] in double, over d in order.
template <typename T>
DMLK_CPU_CLONES void row_dot_sums(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1,
                  int64_t r0, int64_t r1, int64_t d, double* sums) {
  const int64_t n = r1 - r0;
  for (int64_t r = 0; r < n; ++r) sums[r] = 0.0;
  if (as0 == 1 && bs0 == 1) {  // column-major: one class per lane, along W's rows
    for (int64_t k = 0; k < d; ++k) {
      const T* pa = a + k * as1 + r0;
      const T* pb = b + k * bs1 + r0;
#pragma omp simd
      for (int64_t r = 0; r < n; ++r) sums[r] += double(pa[r]) * double(pb[r]);
    }
    return;
  }
  // Along each row: kRows rows at a time, so their chains of dependent adds overlap (one row's
  // chain alone is bound by the add latency: ~4x slower for 128-wide rows); each row's sum still
  // runs over k in order.
  constexpr int64_t kRows = 8;
  int64_t r = 0;
  for (; r + kRows <= n; r += kRows) {
    const T* pa = a + (r0 + r) * as0;
    const T* pb = b + (r0 + r) * bs0;
    double acc[kRows] = {};
    for (int64_t k = 0; k < d; ++k) {
      for (int64_t j = 0; j < kRows; ++j) acc[j] += double(pa[j * as0 + k * as1]) * double(pb[j * bs0 + k * bs1]);
    }
    for (int64_t j = 0; j < kRows; ++j) sums[r + j] = acc[j];
  }
  for (; r < n; ++r) {
    const T* pa = a + (r0 + r) * as0;
    const T* pb = b + (r0 + r) * bs0;
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) s += double(pa[k * as1]) * double(pb[k * bs1]);
    sums[r] = s;
  }
}

// out[r, d] = f(r, a[r, d], b[r, d]) over the rows [r0, r1), in the layout of a.
template <typename T, typename F>
DMLK_CPU_CLONES void row_map(const T* a, int64_t as0, int64_t as1, const T* b, int64_t bs0, int64_t bs1, T* o,
             int64_t os0, int64_t os1, int64_t r0, int64_t r1, int64_t d, F f) {
  if (as0 == 1 && bs0 == 1 && os0 == 1) {
    for (int64_t k = 0; k < d; ++k) {
      const T* pa = a + k * as1;
      const T* pb = b + k * bs1;
      T* po = o + k * os1;
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) po[r] = f(r - r0, pa[r], pb[r]);
    }
    return;
  }
  if (as1 == 1 && bs1 == 1 && os1 == 1) {  // row-major: along each row, contiguous
    for (int64_t r = r0; r < r1; ++r) {
      const T* pa = a + r * as0;
      const T* pb = b + r * bs0;
      T* po = o + r * os0;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) po[k] = f(r - r0, pa[k], pb[k]);
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = 0; k < d; ++k) o[r * os0 + k * os1] = f(r - r0, a[r * as0 + k * as1], b[r * bs0 + k * bs1]);
  }
}

// Writes rows / max(|row|, eps) into out (any strides; out may be rows itself) and returns the
// norms (R, 1) in rows' dtype.
at::Tensor unit_rows_cpu(const at::Tensor& rows, double eps, at::Tensor& out) {
  check_unit_rows_args(rows, out, "unit_rows");
  const int64_t n = rows.size(0), d = rows.size(1);
  auto norms = at::empty({n, 1}, rows.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return norms;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "unit_rows_cpu", [&] {
    using T = scalar_t;
    const T* x = rows.data_ptr<T>();
    T* o = out.data_ptr<T>();
    T* nm = norms.data_ptr<T>();
    const int64_t s0 = rows.stride(0), s1 = rows.stride(1);
    at::parallel_for(0, n, unit_rows_grain(rows), [&](int64_t r0, int64_t r1) {
      std::vector<double> sq(r1 - r0);
      row_dot_sums<T>(x, s0, s1, x, s0, s1, r0, r1, d, sq.data());
      std::vector<T> den(r1 - r0);
      for (int64_t r = r0; r < r1; ++r) {
        const T norm = static_cast<T>(std::sqrt(sq[r - r0]));
        nm[r] = norm;
        den[r - r0] = std::max(norm, static_cast<T>(eps));  // NaN stays NaN (torch's clamp_min)
      }
      const T* dn = den.data();
      row_map<T>(x, s0, s1, x, s0, s1, o, out.stride(0), out.stride(1), r0, r1, d,
                 [dn](int64_t r, T v, T) { return v / dn[r]; });
    });
  });
  return norms;
}

// The gradient of rows given that of y = unit_rows(rows) (grad), into out (grad's shape; may be
// grad itself): (grad - y (y . grad) [norm >= eps]) / max(norm, eps).
void unit_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& y, const at::Tensor& norms, double eps,
                            at::Tensor& out) {
  check_unit_rows_args(grad, out, "unit_rows_backward");
  TORCH_CHECK(y.sizes() == grad.sizes() && y.scalar_type() == grad.scalar_type(),
              "dmlkern: unit_rows_backward: y must have grad's shape and dtype, got ", y.sizes(), " ",
              y.scalar_type());
  TORCH_CHECK(norms.numel() == grad.size(0) && norms.scalar_type() == grad.scalar_type(),
              "dmlkern: unit_rows_backward: norms must hold one value per row in grad's dtype, got ",
              norms.sizes(), " ", norms.scalar_type());
  const int64_t n = grad.size(0), d = grad.size(1);
  if (n == 0) return;
  const at::Tensor nc = norms.reshape({n}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "unit_rows_backward_cpu", [&] {
    using T = scalar_t;
    const T* g = grad.data_ptr<T>();
    const T* u = y.data_ptr<T>();
    const T* nm = nc.data_ptr<T>();
    T* o = out.data_ptr<T>();
    const T e = static_cast<T>(eps);
    at::parallel_for(0, n, unit_rows_grain(grad), [&](int64_t r0, int64_t r1) {
      std::vector<double> dots(r1 - r0);
      row_dot_sums<T>(u, y.stride(0), y.stride(1), g, grad.stride(0), grad.stride(1), r0, r1, d, dots.data());
      std::vector<T> radial(r1 - r0), den(r1 - r0);
      for (int64_t r = r0; r < r1; ++r) {
        const T norm = nm[r];
        radial[r - r0] = norm >= e ? static_cast<T>(dots[r - r0]) : T(0);
        den[r - r0] = std::max(norm, e);
      }
      const T* rd = radial.data();
      const T* dn = den.data();
      row_map<T>(g, grad.stride(0), grad.stride(1), u, y.stride(0), y.stride(1), o, out.stride(0), out.stride(1),
                 r0, r1, d, [rd, dn](int64_t r, T gv, T uv) { return (gv - uv * rd[r]) / dn[r]; });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("unit_rows", &unit_rows_cpu);
  m.impl("unit_rows_backward", &unit_rows_backward_cpu);
}

}  // namespace dmlkern
