// C++ (libtorch) check of the dmlkern ops through the dispatcher, as a C++ user calls
// them: values and gradients of masked_lse against torch::logsumexp on the full matrix.
#include <torch/torch.h>

#include <iostream>

namespace {

int failures = 0;

void expect_close(const torch::Tensor& got, const torch::Tensor& want, const char* what) {
  if (!torch::allclose(got, want, 1e-9, 1e-9, /*equal_nan=*/true)) {
    std::cerr << "FAIL " << what << ": max diff "
              << (got - want).abs().nan_to_num(0, 0, 0).max().item<double>() << "\n";
    ++failures;
  }
}

// Materialising reference; empty rows are -inf with gradient 0.
torch::Tensor reference_lse(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& xl,
                            const torch::Tensor& yl, double scale, int64_t mode, bool exclude_diag) {
  auto keep = torch::ones({x.size(0), y.size(0)}, torch::kBool);
  if (mode == 1) keep = xl.unsqueeze(1) == yl.unsqueeze(0);
  if (mode == 2) keep = xl.unsqueeze(1) != yl.unsqueeze(0);
  if (exclude_diag) keep = keep & ~torch::eye(x.size(0), y.size(0), torch::kBool);
  auto empty = ~keep.any(1);
  auto sim = (scale * x.matmul(y.t())).masked_fill(~keep, -INFINITY).masked_fill(empty.unsqueeze(1), 0);
  return torch::logsumexp(sim, 1).masked_fill(empty, -INFINITY);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("dmlkern::masked_lse", "")
                .typed<torch::Tensor(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                     const torch::Tensor&, double, int64_t, bool)>();
  auto op_bwd = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("dmlkern::masked_lse_backward", "")
                    .typed<std::tuple<torch::Tensor, torch::Tensor>(
                        const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                        const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, double,
                        int64_t, bool)>();
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  for (int64_t mode = 0; mode <= 2; ++mode) {
    for (bool self : {true, false}) {
      auto x = torch::randn({75, 21}, f64);
      auto y = self ? x : torch::randn({530, 21}, f64);
      auto xl = torch::randint(0, 4, {x.size(0)}, torch::kLong);
      auto yl = self ? xl : torch::randint(0, 5, {y.size(0)}, torch::kLong);
      auto lse = op.call(x, y, xl, yl, 2.5, mode, self);

      auto xr = x.clone().requires_grad_(true);
      auto yr = self ? xr : y.clone().requires_grad_(true);
      auto want = reference_lse(xr, yr, xl, yl, 2.5, mode, self);
      expect_close(lse, want.detach(), "masked_lse value");

      auto up = torch::rand({x.size(0)}, f64);
      auto finite = torch::isfinite(want);
      (want.masked_select(finite) * up.masked_select(finite)).sum().backward();
      auto grads = op_bwd.call(up.masked_fill(~finite, 0), x, y, xl, yl, lse, 2.5, mode, self);
      if (self) {
        expect_close(std::get<0>(grads) + std::get<1>(grads), xr.grad(), "masked_lse grad (self)");
      } else {
        expect_close(std::get<0>(grads), xr.grad(), "masked_lse grad x");
        expect_close(std::get<1>(grads), yr.grad(), "masked_lse grad y");
      }
    }
  }
  std::cout << (failures == 0 ? "dmlkern C++ ops: all checks passed\n" : "dmlkern C++ ops: FAILED\n");
  return failures == 0 ? 0 : 1;
}
