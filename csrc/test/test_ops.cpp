// C++ (libtorch) check of the dmlkern ops through the dispatcher, as a C++ user calls them:
// the pair engine's lse2 pass (the masked row log-sum-exps every fused loss and
// dmlkern.ops.masked_lse build on) and its backward, against torch::logsumexp on the full
// similarity matrix and autograd through it; and fixed_mm (a @ b.T), fixed_cdist and fixed_softmax
// with their C++ autograd.
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <vector>

namespace {

int failures = 0;

void expect_close(const torch::Tensor& got, const torch::Tensor& want, const char* what) {
  const bool same_shape = got.sizes() == want.sizes();
  if (!same_shape || !torch::allclose(got, want, 1e-9, 1e-9, /*equal_nan=*/true)) {
    std::cerr << "FAIL " << what << ": ";
    if (same_shape) {
      std::cerr << "max diff " << (got - want).abs().nan_to_num(0, 0, 0).max().item<double>() << "\n";
    } else {
      std::cerr << "shape " << got.sizes() << " vs " << want.sizes() << "\n";
    }
    ++failures;
  }
}

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAIL " << what << "\n";
    ++failures;
  }
}

// log sum_j keep(i, j) exp(vals(i, j)); -inf for an empty row, with gradient 0 there.
torch::Tensor masked_logsumexp(const torch::Tensor& vals, const torch::Tensor& keep) {
  auto empty = ~keep.any(1);
  auto v = vals.masked_fill(~keep, -INFINITY).masked_fill(empty.unsqueeze(1), 0);
  return torch::logsumexp(v, 1).masked_fill(empty, -INFINITY);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto& dispatcher = c10::Dispatcher::singleton();
  auto forward = dispatcher.findSchemaOrThrow("dmlkern::pair_engine_forward", "")
                     .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&,
                                          const torch::Tensor&, const torch::Tensor&,
                                          const torch::Tensor&, int64_t, int64_t, int64_t,
                                          c10::ArrayRef<double>, bool)>();
  auto backward = dispatcher.findSchemaOrThrow("dmlkern::pair_engine_backward", "")
                      .typed<std::tuple<torch::Tensor, torch::Tensor>(
                          const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                          const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                          int64_t, int64_t, c10::ArrayRef<double>, bool, bool)>();
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  // [sc_pos, off_pos, sc_neg, off_neg, eps]: masked_lse's [scale, 0, scale, 0, 0], and a general set.
  const std::vector<std::vector<double>> param_sets = {{2.5, 0.0, 2.5, 0.0, 0.0},
                                                       {-1.5, 0.75, 3.0, -0.5, 0.0}};
  for (const auto& params : param_sets) {
    for (bool self : {true, false}) {
      // 75 rows, 530 columns: neither is a multiple of the CPU tiles (128 x 512).
      auto x = torch::randn({75, 21}, f64);
      auto y = self ? x : torch::randn({530, 21}, f64);
      auto xl = torch::randint(0, 4, {x.size(0)}, torch::kLong);
      xl[0] = 99;  // a label of its own: row 0 has no positive (the self-pair is excluded)
      auto yl = self ? xl : torch::randint(0, 5, {y.size(0)}, torch::kLong);
      auto row_in = torch::zeros({x.size(0), 3}, f64);
      auto out = forward.call(x, y, xl, yl, row_in, /*pass_kind=*/1, /*transform=*/0,
                              /*mining=*/0, params, self);

      // Materialised: pos = same label (not i == j when self), neg = labels differ.
      auto xr = x.clone().requires_grad_(true);
      auto yr = self ? xr : y.clone().requires_grad_(true);
      auto sim = xr.matmul(yr.t());
      auto same = xl.unsqueeze(1) == yl.unsqueeze(0);
      auto pos = self ? same & ~torch::eye(x.size(0), y.size(0), torch::kBool) : same;
      auto want_pos = masked_logsumexp(params[0] * sim + params[1], pos);
      auto want_neg = masked_logsumexp(params[2] * sim + params[3], ~same);
      expect_close(out, torch::stack({want_pos, want_neg}, 1).detach(), "lse2 value");
      expect(std::isinf(out[0][0].item<double>()) && out[0][0].item<double>() < 0,
             "lse2: an empty positive set gives -inf");

      // Backward: row_coef = (A_pos, LSE_pos, A_neg, LSE_neg, 0) for upstream gradients A.
      auto a_pos = torch::rand({x.size(0)}, f64);
      auto a_neg = torch::rand({x.size(0)}, f64);
      auto fin_pos = torch::isfinite(want_pos);
      auto fin_neg = torch::isfinite(want_neg);
      ((want_pos.masked_select(fin_pos) * a_pos.masked_select(fin_pos)).sum() +
       (want_neg.masked_select(fin_neg) * a_neg.masked_select(fin_neg)).sum())
          .backward();
      auto coef = torch::stack({a_pos, out.select(1, 0), a_neg, out.select(1, 1),
                                torch::zeros({x.size(0)}, f64)},
                               1);
      auto grads = backward.call(x, y, xl, yl, row_in, coef, /*transform=*/0, /*mining=*/0,
                                 params, self, /*symmetric=*/false);
      if (self) {  // y is x: the caller adds the two, or asks for the sum (symmetric)
        expect_close(std::get<0>(grads) + std::get<1>(grads), xr.grad(), "lse2 grad (self)");
        auto sym = backward.call(x, y, xl, yl, row_in, coef, 0, 0, params, self, /*symmetric=*/true);
        expect_close(std::get<0>(sym), xr.grad(), "lse2 grad (self, symmetric)");
        expect_close(std::get<1>(sym), torch::zeros_like(x), "lse2 grad_y (self, symmetric)");
      } else {
        expect_close(std::get<0>(grads), xr.grad(), "lse2 grad x");
        expect_close(std::get<1>(grads), yr.grad(), "lse2 grad y");
      }
    }
  }
  // fixed_mm differentiates in C++ (csrc/autograd.cpp): its value and both gradients against
  // torch::matmul's, over several output tiles (256 x 2048 at most) with ragged edges.
  auto fixed_mm = dispatcher.findSchemaOrThrow("dmlkern::fixed_mm", "")
                      .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>();
  auto a = torch::randn({300, 19}, f64).requires_grad_(true);
  auto b = torch::randn({2100, 19}, f64).requires_grad_(true);
  auto up = torch::randn({300, 2100}, f64);
  auto got = fixed_mm.call(a, b);
  expect(got.requires_grad(), "fixed_mm: the output of inputs that require grad requires grad");
  auto got_grads = torch::autograd::grad({got}, {a, b}, {up});
  auto want = a.matmul(b.t());
  auto want_grads = torch::autograd::grad({want}, {a, b}, {up});
  expect_close(got.detach(), want.detach(), "fixed_mm value");
  expect_close(got_grads[0], want_grads[0], "fixed_mm grad a");
  expect_close(got_grads[1], want_grads[1], "fixed_mm grad b");

  // fixed_cdist (torch.cdist's product form) likewise, against torch::cdist (p=2).
  auto fixed_cdist = dispatcher.findSchemaOrThrow("dmlkern::fixed_cdist", "")
                         .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>();
  auto dist = fixed_cdist.call(a, b);
  auto dist_grads = torch::autograd::grad({dist}, {a, b}, {up});
  auto want_dist = torch::cdist(a, b);
  auto want_dist_grads = torch::autograd::grad({want_dist}, {a, b}, {up});
  expect_close(dist.detach(), want_dist.detach(), "fixed_cdist value");
  expect_close(dist_grads[0], want_dist_grads[0], "fixed_cdist grad a");
  expect_close(dist_grads[1], want_dist_grads[1], "fixed_cdist grad b");

  // fixed_softmax (torch.softmax with a thread-count independent backward) likewise, along the
  // last dim and another, against torch::softmax.
  auto fixed_softmax = dispatcher.findSchemaOrThrow("dmlkern::fixed_softmax", "")
                           .typed<torch::Tensor(const torch::Tensor&, int64_t)>();
  auto t = (3 * torch::randn({7, 33, 5}, f64)).requires_grad_(true);
  auto up3 = torch::randn({7, 33, 5}, f64);
  for (int64_t dim : {2, 1}) {
    auto y = fixed_softmax.call(t, dim);
    auto y_grad = torch::autograd::grad({y}, {t}, {up3});
    auto want_y = torch::softmax(t, dim);
    auto want_y_grad = torch::autograd::grad({want_y}, {t}, {up3});
    expect_close(y.detach(), want_y.detach(), "fixed_softmax value");
    expect_close(y_grad[0], want_y_grad[0], "fixed_softmax grad");
  }

  std::cout << (failures == 0 ? "dmlkern C++ ops: all checks passed\n" : "dmlkern C++ ops: FAILED\n");
  return failures == 0 ? 0 : 1;
}
