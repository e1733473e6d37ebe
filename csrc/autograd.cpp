// Autograd for dmlkern::fixed_mm, dmlkern::fixed_cdist and dmlkern::fixed_softmax, in C++. The
// reference runs its every product (and softmax) through them, so at the batch sizes where it runs (small problems,
// dmlkern/fused/_common.py) their host cost is a step's: a Python autograd.Function costs more
// per call than a 64 x 128 x 100 product, in its forward and again in its backward.
// fixed_mm's backward is the op once more on transposed views (the CPU kernel reads them in
// place), on any device: grad_a = g @ b = fixed_mm(g, b.T), grad_b = g.T @ a = fixed_mm(g.T, a.T),
// each in its input's layout; with create_graph it records those calls, so higher orders follow.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

namespace dmlkern {

namespace {

at::Tensor call_fixed_mm(const at::Tensor& a, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmlkern::fixed_mm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

// A transposed view of a row-major matrix. Its gradient comes back in its layout, as torch.mm's
// backward does: computed as the transposed product, so the gradient accumulates into the
// row-major original (a weight W used as W.T) without a strided copy.
bool column_major(const at::Tensor& t) {
  return t.stride(0) == 1 && t.stride(1) != 1 && t.stride(1) >= t.size(0);
}

class FixedMmFunction : public torch::autograd::Function<FixedMmFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->save_for_backward({a, b});
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // this Function is the autograd
    return call_fixed_mm(a, b);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& a = saved[0];
    const at::Tensor& b = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) {
      grad_a = column_major(a) ? call_fixed_mm(b.t(), grad).t() : call_fixed_mm(grad, b.t());
    }
    if (ctx->needs_input_grad(1)) {
      grad_b = column_major(b) ? call_fixed_mm(a.t(), grad.t()).t() : call_fixed_mm(grad.t(), a.t());
    }
    return {grad_a, grad_b};
  }
};

at::Tensor call_fixed_cdist(const at::Tensor& a, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmlkern::fixed_cdist", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(a, b);
}

std::tuple<at::Tensor, at::Tensor> call_fixed_cdist_backward(const at::Tensor& grad, const at::Tensor& a,
                                                             const at::Tensor& b, const at::Tensor& dist) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dmlkern::fixed_cdist_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&)>();
  return op.call(grad, a, b, dist);
}

// dmlkern::fixed_cdist (torch.cdist(a, b, p=2)'s product form; the LpDistance of the reference):
// the backward op, or under create_graph torch's formula from differentiable ops, fixed_mm's
// products included, so that higher orders follow.
class FixedCdistFunction : public torch::autograd::Function<FixedCdistFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor dist;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // this Function is the autograd
      dist = call_fixed_cdist(a, b);
    }
    ctx->save_for_backward({a, b, dist});
    return dist;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& a = saved[0];
    const at::Tensor& b = saved[1];
    const at::Tensor& dist = saved[2];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_a, grad_b;
    if (at::GradMode::is_enabled()) {
      const at::Tensor ratio = (grad / dist).masked_fill(dist == 0, 0);
      grad_a = a * ratio.sum(1, true) - call_fixed_mm(ratio, b.t());
      grad_b = b * ratio.sum(0).unsqueeze(1) - call_fixed_mm(ratio.t(), a.t());
    } else {
      std::tie(grad_a, grad_b) = call_fixed_cdist_backward(grad, a, b, dist);
    }
    return {ctx->needs_input_grad(0) ? grad_a : at::Tensor(), ctx->needs_input_grad(1) ? grad_b : at::Tensor()};
  }
};

at::Tensor call_fixed_softmax(const at::Tensor& t, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmlkern::fixed_softmax", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(t, dim);
}

at::Tensor call_fixed_softmax_backward(const at::Tensor& y, const at::Tensor& grad, int64_t dim) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dmlkern::fixed_softmax_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(y, grad, dim);
}

// dmlkern::fixed_softmax: the backward op, or under create_graph torch's formula from
// differentiable ops (y is this Function's output: higher orders follow).
class FixedSoftmaxFunction : public torch::autograd::Function<FixedSoftmaxFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& t, int64_t dim) {
    at::Tensor y;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // this Function is the autograd
      y = call_fixed_softmax(t, dim);
    }
    ctx->save_for_backward({y});
    ctx->saved_data["dim"] = dim;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor y = ctx->get_saved_variables()[0];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const at::Tensor& grad = grads[0];
    const at::Tensor grad_t = at::GradMode::is_enabled() ? (grad - (y * grad).sum(dim, true)) * y
                                                         : call_fixed_softmax_backward(y, grad, dim);
    return {grad_t, at::Tensor()};
  }
};

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(int64_t) { return false; }

// The Autograd kernel of an op (args...) -> Tensor that Function F differentiates: where nothing
// is to be recorded (no grad mode, no tensor argument requiring grad), the op below autograd
// without a node.
template <typename F, auto call, typename... Args>
at::Tensor autograd_kernel(Args... args) {
  if (!at::GradMode::is_enabled() || !(requires_grad(args) || ...)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call(args...);
  }
  return F::apply(args...);
}

}  // namespace

TORCH_LIBRARY_IMPL(dmlkern, Autograd, m) {
  m.impl("fixed_mm", &autograd_kernel<FixedMmFunction, call_fixed_mm, const at::Tensor&, const at::Tensor&>);
  m.impl("fixed_cdist", &autograd_kernel<FixedCdistFunction, call_fixed_cdist, const at::Tensor&, const at::Tensor&>);
  m.impl("fixed_softmax", &autograd_kernel<FixedSoftmaxFunction, call_fixed_softmax, const at::Tensor&, int64_t>);
}

}  // namespace dmlkern
