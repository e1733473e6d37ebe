"""The pos_softplus pass's log_floor (EngineParams' 10th value): each positive pair's term is
-log(exp(-softplus(z)) + e^F), PML's NT-Xent -log(p + tiny). Every backend against the reference
(values and gradients, odd sizes, floors of three dtypes), the reference against the formula
written out, and a floor of -inf is the plain pass bit for bit."""
import math

import pytest
import torch

from dmlkern import reference
from dmlkern.ops import pair_engine as pe
from _kernel_cases import KERNEL_BACKENDS, KERNEL_DTYPE_CASES, NO_EXTENSION

TAU = 0.02
BASE = [-1 / TAU, 0.0, -1 / TAU, 0.0, 0.0]  # z = L + v / t: the logits of the cosine at t = 0.02
CIRCLE_ZEROS = [0.0] * 4
FLOORS = {name: math.log(torch.finfo(dt).tiny) for name, dt in
          (("fp16_tiny", torch.float16), ("fp32_tiny", torch.float32), ("fp64_tiny", torch.float64))}
FLOOR_PARAMS = [pytest.param(f, id=name) for name, f in FLOORS.items()]
SHAPES = [pytest.param((37, None, 19, 5), id="37-self"), pytest.param((29, 70, 13, 4), id="29x70")]


def _params(floor):
    return BASE + CIRCLE_ZEROS + [floor]


def _inputs(shape, dtype, device, floor, seed=0):
    """Unit rows and row_in whose L puts z = L + v / t on both sides of -F (some pairs' p below
    tiny, some far above)."""
    n, m, d, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    xl = torch.randint(0, k, (n,), generator=g)
    y, yl = (x, xl) if m is None else (
        torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1),
        torch.randint(0, k, (m,), generator=g))
    L = -floor + 60 * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    row_in = torch.stack([torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), L], dim=1)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(device, dtype)
    return (x, x if m is None else y.to(device, dtype), xl.to(device), yl.to(device), row_in.to(device, stats),
            m is None)


def _close(got, want, atol, rtol, what):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def test_reference_is_plus_tiny_inside_the_log():
    """The reference's floored sums are PML's -log(p + tiny) written out on the dense matrix."""
    floor = FLOORS["fp32_tiny"]
    x, y, xl, yl, row_in, self_pairs = _inputs((23, None, 7, 3), torch.float64, "cpu", floor, seed=1)
    out = reference.engine_forward(x, y, xl, yl, row_in, 2, 0, 0, _params(floor), self_pairs)
    z = row_in[:, 2:3] - BASE[0] * (x @ y.T)
    p = torch.exp(-torch.nn.functional.softplus(z, threshold=1e4))
    pos = (xl[:, None] == yl[None, :]) & ~torch.eye(len(x), dtype=torch.bool)
    want = torch.where(pos, -torch.log(p + math.exp(floor)), 0.0).sum(dim=1)
    assert (torch.where(pos, p, 1.0) < torch.finfo(torch.float32).tiny).any(), "no pair below the floor"
    torch.testing.assert_close(out[:, 0], want, rtol=1e-12, atol=1e-12)
    # Its derivative in L (column 1) against autograd of that formula.
    L = row_in[:, 2].clone().requires_grad_()
    zz = L[:, None] - BASE[0] * (x @ y.T)
    pp = torch.exp(-torch.nn.functional.softplus(zz, threshold=1e4))
    torch.where(pos, -torch.log(pp + math.exp(floor)), 0.0).sum().backward()
    torch.testing.assert_close(out[:, 1], L.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("floor", FLOOR_PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_floored_pass_and_backward_match_reference(backend, device, dtype, atol, rtol, shape, floor):
    x, y, xl, yl, row_in, self_pairs = _inputs(shape, dtype, device, floor)
    params = _params(floor)
    got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=params, exclude_diag=self_pairs,
                            backend=backend)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 2, 0, 0, params, self_pairs)
    plain = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 2, 0, 0, BASE, self_pairs)
    assert (want[:, 0] < plain[:, 0] - 1).any(), "the floor must change some row's sum"
    # A row's sum is up to ~70 positives of ~90: the tolerance is relative to each term's size.
    _close(got, want, atol * 100, rtol, "floored pos_softplus")
    g = torch.Generator().manual_seed(5)
    coef = torch.zeros(len(x), 5, dtype=torch.float64)
    coef[:, 4] = torch.rand(len(x), generator=g, dtype=torch.float64)
    coef[::4, 4] = 0.0  # a zero B_pos contributes exactly nothing
    coef = coef.to(device, row_in.dtype)
    got_g = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=0, params=params,
                                   exclude_diag=self_pairs, backend=backend)
    want_g = reference.engine_backward(x.double(), y.double(), xl, yl, row_in.double(), coef.double(), 0, 0,
                                       params, self_pairs)
    plain_g = reference.engine_backward(x.double(), y.double(), xl, yl, row_in.double(), coef.double(), 0, 0,
                                        BASE, self_pairs)
    assert not torch.allclose(want_g[0], plain_g[0]), "the floor must change the gradient"
    scale = want_g[0].abs().max().item() + want_g[1].abs().max().item()
    for side, a, b in zip(("grad_x", "grad_y"), got_g, want_g):
        _close(a, b, atol * scale, rtol, side)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_floor_of_minus_inf_is_the_plain_pass_bit_for_bit(backend, device):
    """10 params with log_floor = -inf give what the 5 give: the NT-Xent-free callers stay as they were."""
    x, y, xl, yl, row_in, self_pairs = _inputs((37, 70, 19, 5), torch.float32, device, 87.0)
    plain = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=BASE, exclude_diag=self_pairs,
                              backend=backend)
    inf = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=_params(float("-inf")),
                            exclude_diag=self_pairs, backend=backend)
    assert torch.equal(plain, inf)
    coef = torch.rand(len(x), 5, generator=torch.Generator().manual_seed(2)).to(device)
    for a, b in zip(pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=0, params=BASE,
                                           exclude_diag=self_pairs, backend=backend),
                    pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=0,
                                           params=_params(float("-inf")), exclude_diag=self_pairs, backend=backend)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS)
def test_nan_row_propagates_as_in_the_reference(backend, device):
    floor = FLOORS["fp32_tiny"]
    x, y, xl, yl, row_in, self_pairs = _inputs((29, 70, 13, 4), torch.float32, device, floor)
    x[3, 2] = float("nan")
    got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=_params(floor), exclude_diag=self_pairs,
                            backend=backend)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 2, 0, 0, _params(floor),
                                    self_pairs)
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu()) and torch.isnan(want).any()


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=NO_EXTENSION), "triton", "reference"])
def test_gradcheck_fp64_through_the_floor(backend):
    """fp64 gradcheck of the floored sums in x, y and L where the terms straddle the floor
    (F = -3: p crosses e^F within the batch)."""
    from dmlkern.triton import interpret_mode
    if backend == "triton" and (torch.cuda.is_available() or not interpret_mode()):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 and no GPU")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    xl, yl = torch.randint(0, 2, (7,), generator=g), torch.randint(0, 2, (9,), generator=g)
    L = (2 * torch.randn(7, generator=g, dtype=torch.float64)).requires_grad_()
    params = [2.0, 0.5, 2.0, 0.0, 0.0] + CIRCLE_ZEROS + [-3.0]

    def sums(a, b, l):
        row_in = torch.stack([torch.zeros_like(l), torch.zeros_like(l), l], dim=1)
        return pe.engine_forward(a, b, xl, yl, row_in, pass_kind=2, params=params, backend=backend)[:, 0]

    assert torch.autograd.gradcheck(sums, (x, y, L))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=NO_EXTENSION), "reference"])
def test_a_nan_or_plus_inf_floor_is_rejected(backend, bad):
    x = torch.randn(4, 3)
    lab = torch.zeros(4, dtype=torch.long)
    with pytest.raises((ValueError, RuntimeError), match="log_floor"):
        pe.engine_forward(x, x, lab, lab, torch.zeros(4, 3), pass_kind=2, params=BASE + CIRCLE_ZEROS + [bad],
                          backend=backend)


@pytest.mark.parametrize("backend, device", KERNEL_BACKENDS + [pytest.param("reference", "cpu", id="reference")])
def test_a_pair_whose_p_is_one_is_exactly_zero(backend, device):
    """L = -inf (a row without negatives) gives p = 1, where PML's -log(1 + tiny) rounds to 0:
    the floored term is exactly 0 (not -log1p(tiny) < 0), and so is its slope, at every floor."""
    for floor in FLOORS.values():
        x, y, xl, yl, row_in, self_pairs = _inputs((29, 70, 13, 4), torch.float32, device, floor)
        row_in[::2, 2] = float("-inf")
        got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=_params(floor), exclude_diag=self_pairs,
                                backend=backend)
        assert (got[::2, 2] > 0).any(), "the rows must have positives"
        assert torch.equal(got[::2, :2], torch.zeros_like(got[::2, :2])), (floor, got[::2, :2])
