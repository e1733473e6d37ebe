// dmlkern::fixed_softmax / fixed_softmax_backward on the CPU: torch.softmax and a backward whose
// bits do not depend on the thread count. torch's CPU softmax backward splits its rows over
// threads and rounds by the split (fp32 100 x 100 differs between 1 and 2 threads); here each
// row's dot product y . grad is one serial sum in double, in index order, and the rows are shared
// between threads whole. The forward is torch's along the last dim (below).
// The reference's softmaxes (ProxyNCA, NCA, SoftTriple) run through them (dmlkern._determinism).
#include "engine_cpu.h"  // first: it sets the vector maths' compile options

#include <torch/library.h>

namespace dmlkern {

namespace {

// torch's softmax along the last dim, where each row is one vectorised loop whatever the split.
// Along another dim torch's kernel splits the inner dim over threads, and its scalar remainder
// rounds otherwise (fp64 37 x 5 over dim 0, AVX2: 1 and 2 threads differ): moved to the last dim.
at::Tensor fixed_softmax_cpu(const at::Tensor& t, int64_t dim) {
  check_cpu_dtype(t, "t");
  const int64_t d = at::maybe_wrap_dim(dim, t.dim());
  if (t.dim() == 0 || d == t.dim() - 1) return at::_softmax(t, d, false);
  return at::_softmax(t.movedim(d, -1).contiguous(), -1, false).movedim(-1, d).contiguous();
}

// grad * y - y * (y . grad) along dim: (grad - dot) * y, torch's formula.
at::Tensor fixed_softmax_backward_cpu(const at::Tensor& y, const at::Tensor& grad, int64_t dim) {
  check_cpu_dtype(y, "y");
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(),
              "dmlkern: fixed_softmax_backward: grad must have y's shape ", y.sizes(), " and dtype ",
              y.scalar_type(), ", got ", grad.sizes(), " ", grad.scalar_type());
  if (y.numel() == 0) return at::empty_like(y);
  const int64_t d = at::maybe_wrap_dim(dim, y.dim());
  // Rows along dim, contiguous (no copy when dim is the last and the inputs are contiguous).
  const at::Tensor yc = y.movedim(d, -1).contiguous(), gc = grad.movedim(d, -1).contiguous();
  at::Tensor out = at::empty_like(yc);
  const int64_t len = yc.size(-1), rows = yc.numel() / len;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "fixed_softmax_backward_cpu", [&] {
    using T = scalar_t;
    const T* py = yc.data_ptr<T>();
    const T* pg = gc.data_ptr<T>();
    T* po = out.data_ptr<T>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / len), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* yr = py + r * len;
        const T* gr = pg + r * len;
        double dot = 0.0;
        for (int64_t j = 0; j < len; ++j) dot += double(yr[j]) * double(gr[j]);
        const T dt = static_cast<T>(dot);
        T* o = po + r * len;
        for (int64_t j = 0; j < len; ++j) o[j] = (gr[j] - dt) * yr[j];
      }
    });
  });
  return out.movedim(-1, d);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, CPU, m) {
  m.impl("fixed_softmax", &fixed_softmax_cpu);
  m.impl("fixed_softmax_backward", &fixed_softmax_backward_cpu);
}

}  // namespace dmlkern
