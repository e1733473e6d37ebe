"""The tiled pair engine (docs/ENGINE.md) on every backend against its materialising reference:
each pass's statistics, the backward kernel, and autograd through chains of passes."""
import itertools
import math

import pytest
import torch

from dmlkern import reference
from dmlkern.ops import pair_engine as pe
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES, dtypes_for

# (N, M, D, labels); M None = y is x (self-pairs excluded). None are tile multiples.
SHAPES = [(1, None, 5, 1), (37, None, 19, 5), (70, 130, 33, 4), (9, 600, 8, 2)]
PARAMS = {0: [-2.0, 1.0, 5.0, -2.5, 0.1], 1: [1.0, -0.1, -1.0, 0.9, 0.0]}  # per transform
CONFIGS = [(0, 0), (0, 1), (1, 0)]  # (transform, mining); mining needs transform 0


def _needs_engine(backend):
    if backend not in pe.available_backends():
        pytest.fail(f"the {backend} pair engine is not registered in this build")


def _inputs(shape, dtype, device, seed):
    n, m, d, k = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    xl = torch.randint(0, k, (n,), generator=g)
    if m is None:
        y, yl = x, xl
    else:
        y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
        yl = torch.randint(0, k + 1, (m,), generator=g)
    x = x.to(device, dtype)
    y = x if m is None else y.to(device, dtype)
    return x, y, xl.to(device), yl.to(device), m is None


def _row_in(x, y, xl, yl, self_pairs, transform, mining, params, dtype_stats):
    """Mining statistics from the reference extrema pass, plus a finite L column."""
    ext = reference.engine_forward(x.double(), y.double(), xl, yl, torch.zeros(len(x), 3, dtype=torch.float64),
                                   0, transform, 0, params, self_pairs)
    g = torch.Generator().manual_seed(3)
    L = torch.randn(len(x), generator=g, dtype=torch.float64)
    return torch.cat([ext, L[:, None].to(ext.device)], dim=1).to(dtype_stats)


def _close(got, want, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_passes_match_reference(backend, device, shape):
    _needs_engine(backend)
    for dtype in dtypes_for(backend, device):
        x, y, xl, yl, self_pairs = _inputs(shape, dtype, device, seed=sum(shape[:1]) + 1)
        stats = torch.float64 if dtype == torch.float64 else torch.float32
        for (transform, mining), pass_kind in itertools.product(CONFIGS, (0, 1, 2)):
            params = PARAMS[transform]
            row_in = _row_in(x, y, xl, yl, self_pairs, transform, mining, params, stats)
            got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=pass_kind, transform=transform,
                                    mining=mining, params=params, exclude_diag=self_pairs, backend=backend)
            want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), pass_kind,
                                            transform, mining, params, self_pairs)
            what = f"{dtype} pass={pass_kind} transform={transform} mining={mining}"
            assert got.dtype == stats and got.shape == want.shape, what
            assert torch.equal(torch.isinf(got).cpu(), torch.isinf(want).cpu()), what
            _close(got, want, dtype, what)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_kernel_matches_reference(backend, device, shape):
    _needs_engine(backend)
    for dtype in dtypes_for(backend, device):
        x, y, xl, yl, self_pairs = _inputs(shape, dtype, device, seed=11)
        stats = torch.float64 if dtype == torch.float64 else torch.float32
        for transform, mining in CONFIGS:
            params = PARAMS[transform]
            row_in = _row_in(x, y, xl, yl, self_pairs, transform, mining, params, stats)
            lse = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 1, transform,
                                           mining, params, self_pairs)
            g = torch.Generator().manual_seed(5)
            n = x.shape[0]
            a = torch.rand(n, 3, generator=g, dtype=torch.float64)
            a[::3, 0] = 0.0  # zero coefficients must contribute exactly nothing
            coef = torch.stack([a[:, 0], lse[:, 0].cpu(), a[:, 1], lse[:, 1].cpu(), a[:, 2]], dim=1)
            coef = coef.to(device, stats)
            got = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=transform, mining=mining,
                                         params=params, exclude_diag=self_pairs, backend=backend)
            want = reference.engine_backward(x.double(), y.double(), xl, yl, row_in.double(), coef.double(),
                                             transform, mining, params, self_pairs)
            for k, side in enumerate(("grad_x", "grad_y")):
                assert got[k].dtype == dtype and got[k].shape == want[k].shape
                assert not torch.isnan(got[k]).any(), side
                _close(got[k], want[k], dtype, f"{side} {dtype} transform={transform} mining={mining}")


def _ntxent_like(x, y, xl, yl, self_pairs, backend, tau=0.2):
    """A chain of passes like the fused NT-Xent: lse2 feeds pos_softplus through row_in."""
    params = [1 / tau, 0.0, 1 / tau, 0.0, 0.0]
    lse = pe.engine_forward(x, y, xl, yl, pass_kind=1, params=params, exclude_diag=self_pairs, backend=backend)
    L = lse[:, 1]
    row_in = torch.stack([torch.zeros_like(L), torch.zeros_like(L), L], dim=1)
    sp = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=2, params=params, exclude_diag=self_pairs,
                           backend=backend)
    pos_lse = torch.where(torch.isneginf(lse[:, 0]), 0.0, lse[:, 0])
    return sp[:, 0].sum() / sp[:, 2].sum().clamp(min=1) + 0.1 * pos_lse.sum()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_autograd_through_chained_passes(backend, device):
    _needs_engine(backend)
    for dtype in dtypes_for(backend, device):
        if dtype == torch.float16:
            continue  # fp16 chains overflow exp at these scales; covered per pass above
        x, y, xl, yl, self_pairs = _inputs((45, 71, 13, 4), dtype, device, seed=2)
        results = []
        for b in (backend, "reference"):
            xx = x.detach().clone().requires_grad_(True)
            yy = y.detach().clone().requires_grad_(True)
            val = _ntxent_like(xx, yy, xl, yl, False, b)
            val.backward()
            results.append((val.detach(), xx.grad, yy.grad))
        for got, want in zip(results[0], results[1]):
            _close(got, want, dtype, f"chained passes {dtype}")


def test_gradcheck_fp64_cpp():
    _needs_engine("cpp")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    xl = torch.randint(0, 3, (11,), generator=g)
    yl = torch.randint(0, 3, (9,), generator=g)

    def lse2(a, b, transform):
        out = pe.engine_forward(a, b, xl, yl, pass_kind=1, transform=transform, params=PARAMS[transform],
                                backend="cpp")
        return out.nan_to_num(neginf=0.0)

    assert torch.autograd.gradcheck(lambda a, b: lse2(a, b, 0), (x, y))
    # The distance transform on unit vectors (away from v = 0, where it is not differentiable).
    xu = torch.nn.functional.normalize(x.detach(), dim=1).requires_grad_(True)
    yu = torch.nn.functional.normalize(y.detach(), dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: lse2(a, b, 1), (xu, yu))
    assert torch.autograd.gradcheck(lambda a, b: _ntxent_like(a, b, xl, yl, False, "cpp"), (x, y))


def test_opcheck_cpp():
    _needs_engine("cpp")
    x = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    xl = torch.randint(0, 3, (13,))
    yl = torch.randint(0, 3, (10,))
    row_in = torch.randn(13, 3, dtype=torch.float64)
    for pass_kind in (1, 2):
        torch.library.opcheck(torch.ops.dmlkern.pair_engine_forward.default,
                              (x, y, xl, yl, row_in, pass_kind, 0, 0, PARAMS[0], False))
    torch.library.opcheck(torch.ops.dmlkern.pair_engine_forward.default,
                          (x, y, xl, yl, row_in, 0, 0, 0, PARAMS[0], False),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpp_rejects_bad_arguments():
    _needs_engine("cpp")
    x = torch.randn(5, 3)
    lab = torch.zeros(5, dtype=torch.long)
    row_in = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="row_in"):
        torch.ops.dmlkern.pair_engine_forward(x, x, lab, lab, torch.zeros(4, 3), 1, 0, 0, PARAMS[0], True)
    with pytest.raises(RuntimeError, match="params"):
        torch.ops.dmlkern.pair_engine_forward(x, x, lab, lab, row_in, 1, 0, 0, [1.0], True)
    with pytest.raises(RuntimeError, match="pass_kind"):
        torch.ops.dmlkern.pair_engine_forward(x, x, lab, lab, row_in, 7, 0, 0, PARAMS[0], True)
    with pytest.raises(RuntimeError, match="mining"):
        torch.ops.dmlkern.pair_engine_forward(x, x, lab, lab, row_in, 1, 1, 1, PARAMS[0], True)


@pytest.mark.parametrize("transform,mining", CONFIGS)
@pytest.mark.parametrize("pass_kind", [1, 2])
def test_reference_backward_is_the_autograd_gradient(transform, mining, pass_kind):
    """The backward formula of docs/ENGINE.md (reference.engine_backward with the row
    coefficients of ops.pair_engine) equals autograd through the materialised forward."""
    x, y, xl, yl, _ = _inputs((23, 31, 7, 3), torch.float64, "cpu", seed=4)
    params = PARAMS[transform]
    row_in = _row_in(x, y, xl, yl, False, transform, mining, params, torch.float64)
    xx = x.clone().requires_grad_(True)
    yy = y.clone().requires_grad_(True)
    out = reference.engine_forward(xx, yy, xl, yl, row_in, pass_kind, transform, mining, params, False)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    if pass_kind == 2:
        g[:, 1:] = 0.0  # only the softplus sum is differentiable
    finite = torch.isfinite(out)
    (torch.where(finite, out, 0.0) * g).sum().backward()
    coef, _ = pe.row_coefficients(pass_kind, out.detach(), torch.where(finite, g, 0.0))
    gx, gy = reference.engine_backward(x, y, xl, yl, row_in, coef, transform, mining, params, False)
    torch.testing.assert_close(gx, xx.grad)
    torch.testing.assert_close(gy, yy.grad)


def test_cpp_fp32_pair_weights_underflow_like_exp():
    """The CPU backward's vectorised fp32 exp: a pair weight exp(u - LSE) below fp32's normal
    range underflows gradually (exp(-100) is a subnormal), and is exactly 0 from exp(-104) on and
    for pairs a zero coefficient leaves out (their exponent is -inf)."""
    _needs_engine("cpp")
    u = [0.0, -100.0, -120.0, -2.0]
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[u[0], 0.0], [u[1], 1.0], [u[2], 1.0], [u[3], 0.0]])
    xl = torch.zeros(1, dtype=torch.long)
    yl = torch.tensor([0, 0, 0, 1])  # the last pair is a negative, with A_neg = 0
    coef = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])  # A_pos = 1, LSE_pos = 0: weight exp(u_j)
    gx, gy = pe.engine_backward_raw(x, y, xl, yl, torch.zeros(1, 3), coef, transform=0, mining=0,
                                    params=[1.0, 0.0, 1.0, 0.0, 0.0], exclude_diag=False, backend="cpp")
    tiny = math.exp(-100.0)  # ~3.7e-44, a float32 subnormal
    assert 0.95 * tiny < gx[0, 1].item() < 1.05 * tiny
    assert 0.95 * tiny < gy[1, 0].item() < 1.05 * tiny
    assert gy[2, 0].item() == 0.0 and gy[3, 0].item() == 0.0
    assert gy[0, 0].item() == 1.0 and gx[0, 0].item() == pytest.approx(tiny * -100.0, rel=0.05)
