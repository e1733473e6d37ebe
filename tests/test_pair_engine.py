"""The tiled pair engine (docs/ENGINE.md) on every backend against its materialising reference:
each pass's statistics, the backward kernel, and autograd through chains of passes."""
import math

import pytest
import torch

from dmlkern import reference
from dmlkern.ops import pair_engine as pe
from dmlkern.triton import interpret_mode
from _kernel_cases import (HAS_CUDA, KERNEL_BACKENDS, KERNEL_DTYPE_CASES, TOLERANCES, dtypes_for,
                           kernel_dtype_cases)

# (N, M, D, labels); M None = y is x (self-pairs excluded). None are tile multiples.
SHAPES = [(1, None, 5, 1), (37, None, 19, 5), (70, 130, 33, 4), (9, 600, 8, 2)]
# Per transform. Transform 2 (circle): CircleLoss(m=0.3, gamma=6)'s params with offsets, its
# relu weights (relu_pos, relu_neg) cutting through the values of s these inputs reach.
PARAMS = {0: [-2.0, 1.0, 5.0, -2.5, 0.1], 1: [1.0, -0.1, -1.0, 0.9, 0.0],
          2: [-6.0, 0.5, 6.0, -0.25, 0.0, 0.6, 0.7, -0.3, 0.3]}
CONFIGS = [(0, 0), (0, 1), (1, 0)]  # (transform, mining); mining needs transform 0
CIRCLE = 2  # transform 2: the lse2 pass and its backward, mining 0 only
PASS_NAMES = {0: "extrema", 1: "lse2", 2: "pos_softplus", 3: "lifted_pairs", 4: "hinge"}
TRANSFORM_NAMES = {0: "dot", 1: "dist", 2: "circle"}
MINING_NAMES = {0: "all", 1: "mined"}
CONFIG_PARAMS = [pytest.param(t, m, id=f"{TRANSFORM_NAMES[t]}-{MINING_NAMES[m]}") for t, m in CONFIGS]
# The backward's configurations: every (transform, mining) the lse2 pass takes.
LSE2_CONFIG_PARAMS = CONFIG_PARAMS + [pytest.param(CIRCLE, 0, id="circle-all")]
FORWARD_CONFIGS = [pytest.param(p, t, m, id=f"{PASS_NAMES[p]}-{TRANSFORM_NAMES[t]}-{MINING_NAMES[m]}")
                   for p in (0, 1, 2) for t, m in CONFIGS] + [pytest.param(1, CIRCLE, 0, id="lse2-circle-all")]
TRANSFORM_PARAMS = [pytest.param(t, id=TRANSFORM_NAMES[t]) for t in (0, 1)]


def _shape_id(shape):
    return "x".join(map(str, shape))


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
    """Mining statistics from the reference extrema pass, plus a finite L column (transform 2 takes no
    mining: the extrema of s then)."""
    ext = reference.engine_forward(x.double(), y.double(), xl, yl, torch.zeros(len(x), 3, dtype=torch.float64),
                                   0, 0 if transform == CIRCLE else transform, 0, params[:5], self_pairs)
    g = torch.Generator().manual_seed(3)
    L = torch.randn(len(x), generator=g, dtype=torch.float64)
    return torch.cat([ext, L[:, None].to(ext.device)], dim=1).to(dtype_stats)


def _row_in_and_lse(x, y, xl, yl, self_pairs, transform, mining, dtype_stats):
    """(params, row_in of _row_in, the reference lse2 statistics) for a backward's coefficients."""
    params = PARAMS[transform]
    row_in = _row_in(x, y, xl, yl, self_pairs, transform, mining, params, dtype_stats)
    lse = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 1, transform, mining, params,
                                   self_pairs)
    return params, row_in, lse


def _close(got, want, atol, rtol, what):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("pass_kind, transform, mining", FORWARD_CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_forward_passes_match_reference(backend, device, dtype, atol, rtol, shape, transform, mining, pass_kind):
    _needs_engine(backend)
    x, y, xl, yl, self_pairs = _inputs(shape, dtype, device, seed=sum(shape[:1]) + 1)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    params = PARAMS[transform]
    row_in = _row_in(x, y, xl, yl, self_pairs, transform, mining, params, stats)
    got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=pass_kind, transform=transform,
                            mining=mining, params=params, exclude_diag=self_pairs, backend=backend)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), pass_kind,
                                    transform, mining, params, self_pairs)
    assert got.dtype == stats and got.shape == want.shape
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(want).cpu())
    _close(got, want, atol, rtol, f"pass {pass_kind}")


@pytest.mark.parametrize("transform, mining", LSE2_CONFIG_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_backward_kernel_matches_reference(backend, device, dtype, atol, rtol, shape, transform, mining):
    _needs_engine(backend)
    x, y, xl, yl, self_pairs = _inputs(shape, dtype, device, seed=11)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    params, row_in, lse = _row_in_and_lse(x, y, xl, yl, self_pairs, transform, mining, stats)
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
        assert got[k].dtype == dtype and got[k].shape == want[k].shape, side
        assert not torch.isnan(got[k]).any(), side
        _close(got[k], want[k], atol, rtol, side)


# (transform, mining, exclude_diag, coef width). Self-pairs kept only with transforms 0 and 2: the
# distance's dv/ds = -1/v at v_ii ~ 0 is ill-conditioned in fp32 (a rounding of s_ii moves it by
# orders of magnitude). Width 6 adds the lifted C_lift column.
SYMMETRIC_CONFIGS = [pytest.param(t, mi, ex, w, id=f"{TRANSFORM_NAMES[t]}-{MINING_NAMES[mi]}-"
                                  f"{'no_self' if ex else 'self'}-coef{w}")
                     for t, mi, ex, w in [(t, mi, ex, 5) for (t, mi) in CONFIGS + [(CIRCLE, 0)]
                                          for ex in (True, False) if ex or t != 1] + [(1, 0, True, 6)]]


@pytest.mark.parametrize("transform, mining, exclude_diag, width", SYMMETRIC_CONFIGS)
@pytest.mark.parametrize("n,d,k", [(1, 5, 1), (37, 19, 5), (130, 33, 4), (600, 8, 7)],
                         ids=["1x5", "37x19", "130x33", "600x8"])
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_symmetric_backward_is_the_sum_of_both_sides(backend, device, dtype, atol, rtol, n, d, k, transform, mining,
                                                     exclude_diag, width):
    """symmetric=True (y is x, same labels): grad_x is grad_x + grad_y of the two-sided
    reference and grad_y is zero, with or without the self-pairs, for every transform / mining
    and with the lifted C_lift column. 600 rows cross the CPU's 512-column tile and end in a
    partial row block (every kernel backend computes this one-sided, from both halves of each tile)."""
    _needs_engine(backend)
    if backend == "triton" and device == "cpu" and n > 200:
        pytest.skip("600 rows target the C++ CPU tile (512 columns) and take minutes in the Triton "
                    "interpreter; the 37- and 130-row cases already cross its 64-row tiles")
    x, _, xl, _, _ = _inputs((n, None, d, k), dtype, device, seed=n + 2)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    params, row_in, lse = _row_in_and_lse(x, x, xl, xl, exclude_diag, transform, mining, stats)
    g = torch.Generator().manual_seed(9)
    a = torch.rand(n, 4, generator=g, dtype=torch.float64)
    a[::3, 0] = 0.0
    cols = [a[:, 0], lse[:, 0].cpu(), a[:, 1], lse[:, 1].cpu(), a[:, 2]] + ([a[:, 3]] if width == 6 else [])
    coef = torch.stack(cols, dim=1).to(device, stats)
    gx, gy = pe.engine_backward_raw(x, x, xl, xl, row_in, coef, transform=transform, mining=mining,
                                    params=params, exclude_diag=exclude_diag, backend=backend,
                                    symmetric=True)
    wx, wy = reference.engine_backward(x.double(), x.double(), xl, xl, row_in.double(), coef.double(),
                                       transform, mining, params, exclude_diag)
    assert gx.dtype == dtype and gy.shape == x.shape
    assert not torch.isnan(gx).any()
    _close(gx, wx + wy, atol, rtol, "symmetric grad")
    assert torch.equal(gy, torch.zeros_like(gy))


# (transform, mining, coef width, B_pos column non-zero, C_lift column non-zero)
ZERO_COLUMN_CASES = [pytest.param(t, mi, w, b, c, id=f"{TRANSFORM_NAMES[t]}-{MINING_NAMES[mi]}-B{int(b)}"
                                  + (f"-C{int(c)}" if w == 6 else ""))
                     for t, mi, w, b, c in [(t, mi, 5, b, False) for t, mi in ((0, 1), (CIRCLE, 0)) for b in (False, True)]
                     + [(t, 0, 6, b, c) for t in (0, 1) for b, c in ((False, True), (True, True), (True, False))]]


@pytest.mark.parametrize("transform, mining, width, with_b, with_c", ZERO_COLUMN_CASES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["two-sided", "symmetric"])
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_backward_terms_with_zero_columns(backend, device, dtype, atol, rtol, symmetric, transform, mining, width,
                                          with_b, with_c):
    """The B_pos and C_lift terms with their columns all zero (skipped: the Triton kernel compiles
    them away, HAS_B / HAS_LIFT) and non-zero, two-sided and symmetric, with and without mining;
    the symmetric one-launch backward with the lifted term and with B_pos on both ends."""
    _needs_engine(backend)
    n, d, k = 70, 19, 4  # crosses the 64-row and the 32-column tiles
    x, _, xl, _, _ = _inputs((n, None, d, k), dtype, device, seed=21)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    params, row_in, lse = _row_in_and_lse(x, x, xl, xl, True, transform, mining, stats)
    g = torch.Generator().manual_seed(13)
    a = torch.rand(n, 4, generator=g, dtype=torch.float64)
    a[::4, 1] = 0.0
    cols = [a[:, 0], lse[:, 0].cpu(), a[:, 1], lse[:, 1].cpu(), a[:, 2] * with_b]
    if width == 6:
        cols.append(a[:, 3] * with_c)
    coef = torch.stack(cols, dim=1).to(device, stats)
    gx, gy = pe.engine_backward_raw(x, x, xl, xl, row_in, coef, transform=transform, mining=mining,
                                    params=params, exclude_diag=True, backend=backend, symmetric=symmetric)
    wx, wy = reference.engine_backward(x.double(), x.double(), xl, xl, row_in.double(), coef.double(),
                                       transform, mining, params, True, symmetric=symmetric)
    assert not torch.isnan(gx).any() and not torch.isnan(gy).any()
    _close(gx, wx, atol, rtol, "grad_x")
    _close(gy, wy, atol, rtol, "grad_y")


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS + [pytest.param(CIRCLE, id="circle")])
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_lse2_pass_with_nan_and_empty_sets(backend, device, dtype, atol, rtol, transform):
    """lse2: a NaN row of x makes its own statistics NaN and every other row's where it is kept
    (a column's NaN value reaches only the set it belongs to); empty sets are -inf."""
    _needs_engine(backend)
    x, _, xl, _, _ = _inputs((40, None, 9, 6), dtype, device, seed=17)
    x[7] = float("nan")
    xl[3] = 99  # a row without positives
    params = PARAMS[transform]
    got = pe.engine_forward(x, x, xl, xl, pass_kind=1, transform=transform, mining=0, params=params,
                            exclude_diag=True, backend=backend)
    want = reference.engine_forward(x.double(), x.double(), xl, xl, torch.zeros(40, 3, dtype=torch.float64),
                                    1, transform, 0, params, True)
    assert torch.isnan(want[:, 1]).sum() > 1 and not torch.isnan(want[:, 0]).all()
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu())
    assert torch.equal(torch.isinf(got).cpu(), torch.isinf(want).cpu())
    _close(got, want, atol, rtol, "lse2")


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


# fp16 chains overflow exp at these scales; covered per pass above.
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", kernel_dtype_cases(exclude=(torch.float16,)))
def test_autograd_through_chained_passes(backend, device, dtype, atol, rtol):
    _needs_engine(backend)
    x, y, xl, yl, self_pairs = _inputs((45, 71, 13, 4), dtype, device, seed=2)
    results = []
    for b in (backend, "reference"):
        xx = x.detach().clone().requires_grad_(True)
        yy = y.detach().clone().requires_grad_(True)
        val = _ntxent_like(xx, yy, xl, yl, False, b)
        val.backward()
        results.append((val.detach(), xx.grad, yy.grad))
    for what, got, want in zip(("value", "grad_x", "grad_y"), results[0], results[1]):
        _close(got, want, atol, rtol, f"chained passes {what}")


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


OPCHECK_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp-cpu"),
    pytest.param("cpp", "cuda", id="cpp-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
    # Under TRITON_INTERPRET the kernels can't run on the fake tensors opcheck passes: GPU only.
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]


def _engine_ops(backend):
    if backend == "cpp":
        return torch.ops.dmlkern.pair_engine_forward.default, torch.ops.dmlkern.pair_engine_backward.default
    return torch.ops.dmlkern.pair_engine_forward_triton.default, torch.ops.dmlkern.pair_engine_backward_triton.default


def test_triton_tiles_take_a_symbolic_width():
    """Traced with dynamic shapes (opcheck's test_aot_dispatch_dynamic, torch.compile(dynamic=True)),
    the Triton launch gets D as a SymInt: the tile choice specialises it (a hashable cache key,
    int constexprs) and equals the choice for the plain int. GPU only to run, not to check."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from dmlkern.triton import tiles
    env = ShapeEnv()
    x = torch.empty(4, 96)
    for kernel in ("fwd", "bwd"):
        d = env.create_symintnode(env.create_symbol(96, ConstantSource(f"d_{kernel}"), dynamic_dim=DimDynamic.DYNAMIC),
                                  hint=96)
        assert isinstance(d, torch.SymInt)
        assert tiles._launch_tiles(x, d, kernel) == tiles._launch_tiles(x, 96, kernel)


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck(backend, device):
    """torch.library.opcheck (schema, autograd registration, fake tensor, AOT dispatch) of the
    forward op for every pass and of the backward op, two-sided and symmetric. Passes 0 and 3
    are not differentiable through the op (by design: they raise), so their inputs need no grad."""
    _needs_engine(backend)
    forward, backward = _engine_ops(backend)
    g = torch.Generator().manual_seed(5)
    dtype = torch.float64 if torch.float64 in dtypes_for(backend, device) else torch.float32

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    x, y = rand(13, 6), rand(10, 6)
    xu = torch.nn.functional.normalize(x, dim=1)
    xl = torch.randint(0, 3, (13,), generator=g).to(device)
    yl = torch.randint(0, 3, (10,), generator=g).to(device)
    row_in = rand(13, 3)
    for pass_kind in (1, 2, 4):
        torch.library.opcheck(forward, (x.requires_grad_(True), y.requires_grad_(True), xl, yl, row_in, pass_kind,
                                        0, 0, PARAMS[0], False))
    x, y = x.detach(), y.detach()
    torch.library.opcheck(backward, (x, y, xl, yl, row_in, rand(13, 2), 0, 0, HINGE_PARAMS[0], False))
    torch.library.opcheck(backward, (xu, xu, xl, xl, row_in, rand(13, 2), 1, 0, HINGE_PARAMS[1], True, True))
    torch.library.opcheck(forward, (x, y, xl, yl, row_in, 0, 0, 0, PARAMS[0], False))
    torch.library.opcheck(forward, (xu, xu, xl, xl, row_in, 3, 1, 0, LIFTED_PARAMS[1], True))
    torch.library.opcheck(backward, (x, y, xl, yl, row_in, rand(13, 5), 0, 1, PARAMS[0], False))
    if backend == "cpp":  # a column-major y: read as it is, its gradient in that layout (the fake's too)
        torch.library.opcheck(backward, (x, y.t().contiguous().t(), xl, yl, row_in, rand(13, 5), 0, 1, PARAMS[0],
                                         False))
    torch.library.opcheck(backward, (xu, xu, xl, xl, row_in, rand(13, 6), 1, 0, LIFTED_PARAMS[1], True, True))


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


@pytest.mark.parametrize("transform,mining,pass_kind", [(t, m, p) for t, m in CONFIGS for p in (1, 2)]
                         + [(CIRCLE, 0, 1)])
def test_reference_backward_is_the_autograd_gradient(transform, mining, pass_kind):
    """The backward formula of docs/ENGINE.md (reference.engine_backward with the row
    coefficients of ops.pair_engine) equals autograd through the materialised forward (transform 2:
    its relu weights detached there, as PML's CircleLoss does)."""
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


def test_cpp_fp32_pair_weights_underflow_to_zero():
    """The CPU backward's vectorised fp32 exp: a pair weight exp(u - LSE) in fp32's normal range is
    exp's (exp(-80) ~ 1.8e-35); below it the engine's tasks flush to zero (subnormals slow x86
    products ~7x: engine_cpu.h, FlushSubnormalsGuard), so exp(-100), a subnormal, is 0, as is
    everything from exp(-104) on and the pairs a zero coefficient leaves out (exponent -inf)."""
    _needs_engine("cpp")
    u = [0.0, -80.0, -100.0, -120.0, -2.0]
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[u[0], 0.0], [u[1], 1.0], [u[2], 1.0], [u[3], 1.0], [u[4], 0.0]])
    xl = torch.zeros(1, dtype=torch.long)
    yl = torch.tensor([0, 0, 0, 0, 1])  # the last pair is a negative, with A_neg = 0
    coef = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])  # A_pos = 1, LSE_pos = 0: weight exp(u_j)
    gx, gy = pe.engine_backward_raw(x, y, xl, yl, torch.zeros(1, 3), coef, transform=0, mining=0,
                                    params=[1.0, 0.0, 1.0, 0.0, 0.0], exclude_diag=False, backend="cpp")
    small = math.exp(-80.0)  # ~1.8e-35, a normal float32
    assert gy[1, 0].item() == pytest.approx(small, rel=1e-5)
    assert gx[0, 1].item() == pytest.approx(small, rel=1e-5)  # exp(-100) and exp(-120) add 0
    assert gy[2, 0].item() == 0.0 and gy[3, 0].item() == 0.0 and gy[4, 0].item() == 0.0
    assert gy[0, 0].item() == 1.0 and gx[0, 0].item() == pytest.approx(small * -80.0, rel=1e-5)


# ----------------------------------------------------------------------------- pass 3: lifted pairs
# The symmetric case only (y is x, exclude_diag). (N, D, classes); none are tile multiples, 600
# crosses the CPU's 512-column tile.
LIFTED_SHAPES = [(1, 5, 1), (37, 19, 5), (70, 33, 4), (600, 8, 3)]
LIFTED_PARAMS = {0: [-2.0, 1.0, 5.0, -2.5, 0.0], 1: [1.0, -0.1, -1.0, 0.9, 0.0]}  # sc_pos = -2 / 1


def _lifted_inputs(n, d, classes, dtype, device, seed, case):
    """x (unit rows), labels and row_in with L in column 2. case: "random" (some rows' L is
    -inf, as rows without negatives), "one_class" (every L -inf), "nan" (a NaN row of x),
    "sorted" (rows sorted by label, ~15 per class: the CPU skips the tiles without positives)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    L = 2 * torch.randn(n, generator=g, dtype=torch.float64)
    if case == "random":
        L[::5] = float("-inf")
    elif case == "one_class":
        labels = torch.zeros_like(labels)
        L = torch.full_like(L, float("-inf"))
    elif case == "nan":
        x[n // 2] = float("nan")
        L[n // 3] = float("nan")
    elif case == "sorted":
        labels = torch.sort(torch.randint(0, max(classes, n // 15), (n,), generator=g)).values
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    row_in = torch.stack([torch.zeros_like(L), torch.zeros_like(L), L], dim=1)
    return x.to(device, dtype), labels.to(device), row_in.to(device, stats)


def _brute_force_lifted(x, labels, L, transform, params):
    """Pass 3 from its definition (docs/ENGINE.md), pair by pair in Python, fp64."""
    sc_pos, off_pos = params[0], params[1]
    x = x.double()
    n = x.shape[0]
    out = torch.zeros(n, 3, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if i == j or labels[i] != labels[j]:
                continue
            s = float(x[i] @ x[j])
            v = s if transform == 0 else max(2 - 2 * s, 0.0) ** 0.5
            li, lj = float(L[i]), float(L[j])
            lae = float("-inf") if li == lj == float("-inf") else max(li, lj) + math.log1p(
                math.exp(-abs(li - lj)))
            z = lae + sc_pos * v + off_pos
            r = max(z, 0.0)
            out[i, 0] += r * r / 2
            if r > 0:
                out[i, 1] += r / (1 + math.exp(lj - li))
                out[i, 2] += 1
    return out


@pytest.mark.parametrize("transform", [0, 1])
def test_reference_lifted_pairs_is_the_brute_force_formula(transform):
    x, labels, row_in = _lifted_inputs(23, 6, 3, torch.float64, "cpu", seed=7, case="random")
    params = LIFTED_PARAMS[transform]
    got = reference.engine_forward(x, x, labels, labels, row_in, 3, transform, 0, params, True)
    want = _brute_force_lifted(x, labels, row_in[:, 2], transform, params)
    assert (want[:, 2] > 0).any() and (want[:, 2] < (labels[:, None] == labels[None, :]).sum(1) - 1).any(), \
        "the case must hold both zero and non-zero pair terms"
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", [0, 1])
def test_reference_lifted_backward_is_the_autograd_gradient(transform):
    """The C_lift column of engine_backward (with grad_x + grad_y for y = x) and the L gradient
    2 * out[:, 1] equal autograd of T = sum_i out[i, 0] through the materialised pass 3."""
    x, labels, row_in = _lifted_inputs(29, 7, 3, torch.float64, "cpu", seed=8, case="random")
    params = LIFTED_PARAMS[transform]
    xx = x.clone().requires_grad_(True)
    L = row_in[:, 2].clone().requires_grad_(True)
    rin = torch.stack([row_in[:, 0], row_in[:, 1], L], dim=1)
    out = reference.engine_forward(xx, xx, labels, labels, rin, 3, transform, 0, params, True)
    g = 0.7
    (g * out[:, 0].sum()).backward()
    zero = torch.zeros_like(L)
    coef = torch.stack([zero, zero, zero, zero, zero, torch.full_like(zero, g)], dim=1).detach()
    gx, gy = reference.engine_backward(x, x, labels, labels, row_in, coef, transform, 0, params, True)
    torch.testing.assert_close(gx + gy, xx.grad)
    torch.testing.assert_close(2 * g * out[:, 1].detach(), torch.where(torch.isneginf(row_in[:, 2]), 0.0, L.grad))


def _close_to_scale(got, want, atol, rtol, what):
    """_close with atol scaled by the largest |want| (sums of hundreds of terms of either sign
    lose absolute, not relative, precision in fp32)."""
    scale = max(1.0, float(want.double().nan_to_num(0.0, 0.0, 0.0).abs().max()))
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=rtol, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
@pytest.mark.parametrize("case", ["random", "one_class", "nan", "sorted"])
@pytest.mark.parametrize("shape", LIFTED_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_lifted_pairs_pass_matches_reference(backend, device, dtype, atol, rtol, shape, case, transform):
    """Pass 3's statistics and the backward with a C_lift column (next to the other terms)."""
    _needs_engine(backend)
    n, d, classes = shape
    if backend == "triton" and device == "cpu" and n > 100:
        pytest.skip("600 rows target the C++ CPU tile (512 columns) and take ~1 min per case in the "
                    "Triton interpreter; the 70-row case already crosses its 64-row tiles")
    x, labels, row_in = _lifted_inputs(n, d, classes, dtype, device, seed=n + d, case=case)
    g = torch.Generator().manual_seed(5)
    coef = torch.rand(n, 6, generator=g, dtype=torch.float64)
    coef[:, 1] = 2 * row_in[:, 2].double().cpu().nan_to_num(0.0).clamp(min=0) + 1  # finite LSEs
    coef[:, 3] = coef[:, 1] + 0.5
    coef[::3, 5] = 0.0  # rows without the lifted term
    coef[1::4, 4] = 0.0
    coef = coef.to(device, row_in.dtype)
    params = LIFTED_PARAMS[transform]
    got = pe.engine_forward(x, x, labels, labels, row_in, pass_kind=3, transform=transform,
                            params=params, exclude_diag=True, backend=backend)
    xd = x.double()
    want = reference.engine_forward(xd, xd, labels, labels, row_in.double(), 3, transform, 0, params, True)
    assert got.dtype == row_in.dtype and got.shape == (n, 3)
    if case == "one_class":
        assert torch.equal(want, torch.zeros_like(want))  # z = -inf: f = 0, no NaN
    if case == "nan" and n > 1:
        assert torch.isnan(want[:, 0]).any() and not torch.isnan(want[:, 0]).all()
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu())
    _close_to_scale(got, want, atol, rtol, "forward")
    gx, gy = pe.engine_backward_raw(x, x, labels, labels, row_in, coef, transform=transform, mining=0,
                                    params=params, exclude_diag=True, backend=backend)
    wx, wy = reference.engine_backward(xd, xd, labels, labels, row_in.double(), coef.double(), transform, 0,
                                       params, True)
    if case != "nan":
        assert not torch.isnan(gx).any() and not torch.isnan(gy).any()
    _close_to_scale(gx, wx, atol, rtol, "grad_x")
    _close_to_scale(gy, wy, atol, rtol, "grad_y")
    # symmetric=True: the sum of both sides (one-sided in the C++ backends, which then
    # skip the C_lift term in the tiles without positives for both halves at once).
    gs, gz = pe.engine_backward_raw(x, x, labels, labels, row_in, coef, transform=transform, mining=0,
                                    params=params, exclude_diag=True, backend=backend, symmetric=True)
    assert torch.equal(gz, torch.zeros_like(gz))
    _close_to_scale(gs, wx + wy, atol, rtol, "symmetric grad")


def _asymmetric_calls(x, labels, row_in, coef):
    """(what the error must name, forward args, backward args) of calls that are not symmetric."""
    p = LIFTED_PARAMS[1]
    other = x.flip(0)
    other_labels = labels.flip(0)
    return [
        ("y", (x, other, labels, labels, row_in, 3, 1, 0, p, True), (x, other, labels, labels, row_in, coef, 1, 0, p, True)),
        ("y_labels", (x, x, labels, other_labels, row_in, 3, 1, 0, p, True),
         (x, x, labels, other_labels, row_in, coef, 1, 0, p, True)),
        ("exclude_diag", (x, x, labels, labels, row_in, 3, 1, 0, p, False),
         (x, x, labels, labels, row_in, coef, 1, 0, p, False)),
        ("mining", (x, x, labels, labels, row_in, 3, 0, 1, p, True), (x, x, labels, labels, row_in, coef, 0, 1, p, True)),
    ]


def _raw_engine(backend):
    """(forward, backward, the error a bad argument raises) of a backend's engine functions."""
    if backend == "cpp":
        return torch.ops.dmlkern.pair_engine_forward, torch.ops.dmlkern.pair_engine_backward, RuntimeError
    if backend == "triton":
        from dmlkern.triton import pair_engine as tk
        return tk.engine_forward, tk.engine_backward, ValueError
    return reference.engine_forward, reference.engine_backward, ValueError


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_lifted_pairs_rejects_the_asymmetric_case(backend):
    if backend != "reference":
        _needs_engine(backend)
    x = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    row_in = torch.zeros(6, 3, dtype=torch.float64)
    coef = torch.ones(6, 6, dtype=torch.float64)
    fwd, bwd, error = _raw_engine(backend)
    for name, fwd_args, bwd_args in _asymmetric_calls(x, labels, row_in, coef):
        with pytest.raises(error, match=rf"\b{name}\b"):
            fwd(*fwd_args)
        with pytest.raises(error, match=rf"\b{name}\b"):
            bwd(*bwd_args)
        # The Python entry points check first, for every backend.
        a = fwd_args
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            pe.engine_forward(a[0], a[1], a[2], a[3], a[4], pass_kind=3, transform=a[6], mining=a[7], params=a[8],
                              exclude_diag=a[9], backend=backend)
        b = bwd_args
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            pe.engine_backward_raw(*b[:6], transform=b[6], mining=b[7], params=b[8], exclude_diag=b[9],
                                   backend=backend)
    # The same rows in another tensor are the symmetric case.
    fwd(x, x.clone(), labels, labels.clone(), row_in, 3, 1, 0, LIFTED_PARAMS[1], True)


def test_lifted_pairs_pass_is_not_differentiable_through_the_op():
    _needs_engine("cpp")
    x = torch.nn.functional.normalize(torch.randn(8, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2])
    out = pe.engine_forward(x, x, labels, labels, pass_kind=3, transform=1, params=LIFTED_PARAMS[1],
                            exclude_diag=True, backend="cpp")
    with pytest.raises(RuntimeError, match="lifted_pairs"):
        out[:, 0].sum().backward()


def _far_strided_copy(src, column_stride):
    """src (n, d) as a view whose columns lie column_stride elements apart in one storage, so
    that element offsets pass 2**31 (int32 offsets would wrap). The storage is allocated, not
    written: only the pages holding src's values are touched (a few MiB resident, not GiB)."""
    n, d = src.shape
    storage = torch.empty((d - 1) * column_stride + n, dtype=src.dtype, device=src.device)
    view = storage.as_strided((n, d), (1, column_stride))
    view.copy_(src)
    return view


@pytest.mark.parametrize("symmetric", [False, True], ids=["two-sided", "symmetric"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_int64_offsets_past_two_to_the_31(backend, device, symmetric):
    """Forward and backward (two-sided and symmetric) on an fp32 view whose last column starts
    past element 2**31 of its storage (8 GiB allocated, untouched), against the reference on a
    contiguous copy: the kernels index with int64 (int32 K offsets would read out of bounds
    here: a segfault in the Triton interpreter, an illegal address on a GPU)."""
    _needs_engine(backend)
    rtol, atol = TOLERANCES[torch.float32]
    n, m, d, k = 37, 29, 5, 4
    x, y, xl, yl, _ = _inputs((n, m, d, k), torch.float32, device, seed=31)
    far = _far_strided_copy(x, column_stride=2 ** 29 + 3)  # column 4 starts at element 2**31 + 12
    assert far.storage_offset() + (d - 1) * far.stride(1) > 2 ** 31 and torch.equal(far, x)
    params = PARAMS[0]
    # symmetric: y is the far view itself (self-pairs excluded); two-sided: a separate y.
    other, other_labels, exclude_diag = (far, xl, True) if symmetric else (y, yl, False)
    ref_other = x if symmetric else other
    got = pe.engine_forward(far, other, xl, other_labels, pass_kind=1, params=params,
                            exclude_diag=exclude_diag, backend=backend)
    want = reference.engine_forward(x.double(), ref_other.double(), xl, other_labels,
                                    torch.zeros(n, 3, dtype=torch.float64, device=device), 1, 0, 0,
                                    params, exclude_diag)
    _close(got, want, atol, rtol, "forward")
    coef = torch.stack([torch.full_like(want[:, 0], 0.5), want[:, 0], torch.full_like(want[:, 0], 0.25),
                        want[:, 1], torch.zeros_like(want[:, 0])], dim=1)
    gx, gy = pe.engine_backward_raw(far, other, xl, other_labels, torch.zeros(n, 3, device=device), coef.float(),
                                    transform=0, mining=0, params=params, exclude_diag=exclude_diag,
                                    backend=backend, symmetric=symmetric)
    wx, wy = reference.engine_backward(x.double(), ref_other.double(), xl, other_labels,
                                       torch.zeros(n, 3, dtype=torch.float64, device=device), coef,
                                       0, 0, params, exclude_diag)
    _close(gx, wx + wy if symmetric else wx, atol, rtol, "grad_x")
    if not symmetric:
        _close(gy, wy, atol, rtol, "grad_y")


def _labelled_rows(n, d, seed, layout):
    """(unit rows in fp64, labels, the generator) with labels laid out as the positives-only
    passes meet them: sorted pairs (NT-Xent after its sort), SimCLR's unsorted two views, or
    sorted classes of ~20 rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    if layout == "sorted_pairs":
        labels = torch.arange(n) // 2
    elif layout == "two_views":
        labels = torch.cat([torch.arange(n // 2)] * 2)
    else:
        labels = torch.sort(torch.randint(0, n // 20, (n,), generator=g)).values
    return x, labels, g


@pytest.mark.parametrize("mining, exclude_diag", [(0, True), (1, True), (0, False)],
                         ids=["all-no_self", "mined-no_self", "all-self"])
@pytest.mark.parametrize("layout", ["sorted_pairs", "two_views", "sorted_classes"])
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", kernel_dtype_cases(per_backend=2))
def test_pos_softplus_pass_skips_tiles_without_positives(backend, device, dtype, atol, rtol, layout, mining,
                                                         exclude_diag):
    """Pass 2 sums over positives only, and the kernels skip the column tiles that hold none
    (CPU: outside the block's first..last label column; Triton: label ranges that miss the
    block's). The rows span several row blocks and column tiles of each backend (C++: 700 rows,
    column blocks of 512; Triton, interpreted: 334 rows, tiles of 64 or 32); labels as
    the fused NT-Xent gives them (sorted: two per label, or ~20 per class) and SimCLR's
    unsorted two views; with and without mining and self-pairs, a NaN row (NaN sums where it
    is a positive, none with mining, which drops NaN pairs), against the reference."""
    _needs_engine(backend)
    n = 334 if backend == "triton" else 700  # even: two views
    x, labels, _ = _labelled_rows(n, 9, 41, layout)
    x[n // 3] = float("nan")  # its positives get NaN, the other rows stay finite
    xd, ld = x.to(device, dtype), labels.to(device)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    params = PARAMS[0]
    row_in = _row_in(xd, xd, ld, ld, exclude_diag, 0, mining, params, stats)
    got = pe.engine_forward(xd, xd, ld, ld, row_in, pass_kind=2, mining=mining, params=params,
                            exclude_diag=exclude_diag, backend=backend)
    want = reference.engine_forward(xd.double(), xd.double(), ld, ld, row_in.double(), 2, 0, mining,
                                    params, exclude_diag)
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu())
    assert not torch.isnan(want[: n // 4]).any() and (mining == 1 or torch.isnan(want).any())
    _close(got, want, atol, rtol, "pos_softplus")


@pytest.mark.parametrize("transform, symmetric, width", [(0, False, 5), (0, True, 5), (1, True, 6)],
                         ids=["dot-two-sided", "dot-symmetric", "dist-symmetric-coef6"])
@pytest.mark.parametrize("layout", ["sorted_pairs", "sorted_classes"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_backward_positive_terms_skip_tiles_without_positives(backend, device, layout, transform, symmetric, width):
    """The backward's positives-only terms (B_pos, and C_lift in the symmetric case) run only in
    the tiles whose labels meet the row block's (Triton; the C++ CPU engine by its exact per-tile
    test, PositiveTiles): with labels sorted as the fused NT-Xent and Lifted give them, most tiles skip them. 300
    rows span several row blocks and column tiles; two-sided (B_pos) and symmetric (B_pos, or
    transform 1 with C_lift), in fp32, against the reference."""
    _needs_engine(backend)
    rtol, atol = TOLERANCES[torch.float32]
    n = 300
    x, labels, g = _labelled_rows(n, 12, 43, layout)
    xd, ld = x.to(device, torch.float32), labels.to(device)
    a = torch.rand(n, 4, generator=g, dtype=torch.float64)
    params = PARAMS[transform]
    row_in = _row_in(xd, xd, ld, ld, True, transform, 0, params, torch.float32)
    lse = reference.engine_forward(x, x, labels, labels, row_in.double().cpu(), 1, transform, 0, params, True)
    cols = [a[:, 0], lse[:, 0], a[:, 1], lse[:, 1], a[:, 2]] + ([a[:, 3]] if width == 6 else [])
    coef = torch.stack(cols, dim=1).to(device, torch.float32)
    gx, gy = pe.engine_backward_raw(xd, xd, ld, ld, row_in, coef, transform=transform, mining=0, params=params,
                                    exclude_diag=True, backend=backend, symmetric=symmetric)
    wx, wy = reference.engine_backward(xd.double(), xd.double(), ld, ld, row_in.double(), coef.double(),
                                       transform, 0, params, True)
    if symmetric:
        _close(gx, wx + wy, atol, rtol, "symmetric grad")
    else:
        _close(gx, wx, atol, rtol, "grad_x")
        _close(gy, wy, atol, rtol, "grad_y")


# ----------------------------------------------------------------------------- pass 4: hinge
# (sc_pos, off_pos, sc_neg, off_neg, eps) per transform: ContrastiveLoss's on a similarity and on
# the distance, with margins that leave some terms of each set at 0 and some above.
HINGE_PARAMS = {0: [-1.0, 0.1, 1.0, -0.1, 0.0], 1: [1.0, -1.35, -1.0, 1.45, 0.0]}


def _hinge_row_in(n, case, stats, device, seed):
    """row_in with L in column 2 (MarginLoss's -beta or beta per row); "nan": one L is NaN."""
    g = torch.Generator().manual_seed(seed)
    L = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    if case == "nan" and n > 2:
        L[n // 2] = float("nan")
    zero = torch.zeros_like(L)
    return torch.stack([zero, zero, L], dim=1).to(device, stats)


def _hinge_coef(n, device, stats, seed):
    """(H_pos, H_neg) with zeros in some rows of each column (a zero must contribute nothing)."""
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(n, 2, generator=g, dtype=torch.float64) - 0.3
    coef[::3, 0] = 0.0
    coef[1::4, 1] = 0.0
    return coef.to(device, stats)


@pytest.mark.parametrize("case", ["finite", "nan"])
@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_hinge_pass_matches_reference(backend, device, dtype, atol, rtol, shape, transform, case):
    """Pass 4's sums and counts, then its backward (row_coef (N, 2)) two-sided and, when y is x,
    symmetric, against the reference twin. "nan": a NaN row of x and a NaN L make their sums NaN
    (counts skip them), and the backward's relu derivative [t > 0] is 0 there."""
    _needs_engine(backend)
    x, y, xl, yl, self_pairs = _inputs(shape, dtype, device, seed=sum(shape[:1]) + 7)
    n = x.shape[0]
    if case == "nan" and n > 2:
        x = x.clone()
        x[1] = float("nan")
        y = x if self_pairs else y
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    row_in = _hinge_row_in(n, case, stats, device, seed=n)
    params = HINGE_PARAMS[transform]
    got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=4, transform=transform, params=params,
                            exclude_diag=self_pairs, backend=backend)
    xd, yd = x.double(), y.double()
    want = reference.engine_forward(xd, yd, xl, yl, row_in.double(), 4, transform, 0, params, self_pairs)
    assert got.dtype == stats and got.shape == (n, 4)
    if case == "finite" and n > 30:  # both sets hold terms at 0 and above 0
        pos_pairs = (xl[:, None] == yl[None, :]).sum() - (n if self_pairs else 0)
        assert 0 < want[:, 1].sum() < pos_pairs and 0 < want[:, 3].sum() < (xl[:, None] != yl[None, :]).sum()
    if case == "nan" and n > 2:
        assert torch.isnan(want[:, 0]).any() and torch.isnan(want[:, 2]).any() and not torch.isnan(want[:, 1::2]).any()
    assert torch.equal(torch.isnan(got).cpu(), torch.isnan(want).cpu())
    _close_to_scale(got, want, atol, rtol, "hinge forward")
    coef = _hinge_coef(n, device, stats, seed=n + 1)
    gx, gy = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=transform, mining=0, params=params,
                                    exclude_diag=self_pairs, backend=backend)
    wx, wy = reference.engine_backward(xd, yd, xl, yl, row_in.double(), coef.double(), transform, 0, params,
                                       self_pairs)
    assert gx.dtype == dtype and gy.shape == y.shape
    _close_to_scale(gx, wx, atol, rtol, "hinge grad_x")
    _close_to_scale(gy, wy, atol, rtol, "hinge grad_y")
    if self_pairs:
        gs, gz = pe.engine_backward_raw(x, x, xl, xl, row_in, coef, transform=transform, mining=0, params=params,
                                        exclude_diag=True, backend=backend, symmetric=True)
        assert torch.equal(gz, torch.zeros_like(gz))
        _close_to_scale(gs, wx + wy, atol, rtol, "hinge symmetric grad")


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_hinge_pass_crosses_tiles_symmetric(backend, transform):
    """The hinge pass and its symmetric backward at 600 rows (past the CPU's 512-column tile, a
    partial row block; several Triton tiles), self-pairs excluded and kept, fp32."""
    _needs_engine(backend)
    if backend == "triton" and not (interpret_mode() or HAS_CUDA):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    device = "cuda" if HAS_CUDA else "cpu"
    n = 600 if backend == "cpp" else 150  # the interpreter is slow; 150 rows cross its 64-row tiles
    rtol, atol = TOLERANCES[torch.float32]
    x, _, xl, _, _ = _inputs((n, None, 12, 7), torch.float32, device, seed=3)
    row_in = _hinge_row_in(n, "finite", torch.float32, device, seed=4)
    coef = _hinge_coef(n, device, torch.float32, seed=5)
    params = HINGE_PARAMS[transform]
    for exclude_diag in (True, False) if transform == 0 else (True,):
        got = pe.engine_forward(x, x, xl, xl, row_in, pass_kind=4, transform=transform, params=params,
                                exclude_diag=exclude_diag, backend=backend)
        want = reference.engine_forward(x.double(), x.double(), xl, xl, row_in.double(), 4, transform, 0, params,
                                        exclude_diag)
        _close_to_scale(got, want, atol, rtol, "hinge forward")
        gs, _ = pe.engine_backward_raw(x, x, xl, xl, row_in, coef, transform=transform, mining=0, params=params,
                                       exclude_diag=exclude_diag, backend=backend, symmetric=True)
        wx, wy = reference.engine_backward(x.double(), x.double(), xl, xl, row_in.double(), coef.double(),
                                           transform, 0, params, exclude_diag)
        _close_to_scale(gs, wx + wy, atol, rtol, "hinge symmetric grad")


@pytest.mark.parametrize("transform", TRANSFORM_PARAMS)
def test_reference_hinge_backward_is_the_autograd_gradient(transform):
    """docs/ENGINE.md's hinge backward (row_coef (N, 2) from ops.pair_engine.row_coefficients) and
    its L gradient H_pos * count_pos - H_neg * count_neg equal autograd through the materialised
    forward, two-sided with self-pairs excluded."""
    x, y, xl, yl, _ = _inputs((23, 31, 7, 3), torch.float64, "cpu", seed=4)
    params = HINGE_PARAMS[transform]
    row_in = _hinge_row_in(23, "finite", torch.float64, "cpu", seed=6).requires_grad_(True)
    xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    out = reference.engine_forward(xx, yy, xl, yl, row_in, 4, transform, 0, params, True)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    g[:, 1::2] = 0.0  # the counts are constants
    (out * g).sum().backward()
    coef, grad_row_in = pe.row_coefficients(4, out.detach(), g)
    gx, gy = reference.engine_backward(x, y, xl, yl, row_in.detach(), coef, transform, 0, params, True)
    torch.testing.assert_close(gx, xx.grad)
    torch.testing.assert_close(gy, yy.grad)
    torch.testing.assert_close(grad_row_in, row_in.grad)
    assert row_in.grad[:, 2].abs().max() > 0


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_hinge_gradcheck_fp64(backend, device):
    """torch.autograd.gradcheck of the hinge pass's sums through the op (x, y and row_in's L), both
    transforms, y separate and y is x (the symmetric backward)."""
    _needs_engine(backend)
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(11, 4, generator=g, dtype=torch.float64), dim=1).to(device)
    y = torch.nn.functional.normalize(torch.randn(9, 4, generator=g, dtype=torch.float64), dim=1).to(device)
    xl = torch.randint(0, 3, (11,), generator=g).to(device)
    yl = torch.randint(0, 3, (9,), generator=g).to(device)
    big_l = (0.3 * torch.randn(11, generator=g, dtype=torch.float64)).to(device)

    def sums(a, b, L, transform, same):
        zero = torch.zeros_like(L)
        out = pe.engine_forward(a, a if same else b, xl, xl if same else yl, torch.stack([zero, zero, L], dim=1),
                                pass_kind=4, transform=transform, params=HINGE_PARAMS[transform],
                                exclude_diag=same, backend=backend)
        return out[:, 0::2]

    for transform in (0, 1):
        for same in (False, True):
            inputs = (x.clone().requires_grad_(True), y.clone().requires_grad_(True), big_l.clone().requires_grad_(True))
            assert torch.autograd.gradcheck(lambda a, b, L: sums(a, b, L, transform, same), inputs, eps=1e-7,
                                            atol=1e-6, fast_mode=backend == "triton"), (transform, same)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_hinge_rejects_mining(backend):
    """The hinge pass and its backward keep every pair: mining=1 raises, naming the argument, on
    every backend and in the Python entry points."""
    if backend != "reference":
        _needs_engine(backend)
    x = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    row_in = torch.zeros(6, 3, dtype=torch.float64)
    coef = torch.ones(6, 2, dtype=torch.float64)
    p = HINGE_PARAMS[0]
    fwd, bwd, error = _raw_engine(backend)
    with pytest.raises(error, match=r"\bmining\b"):
        fwd(x, x, labels, labels, row_in, 4, 0, 1, p, True)
    with pytest.raises(error, match=r"\bmining\b"):
        bwd(x, x, labels, labels, row_in, coef, 0, 1, p, True)
    with pytest.raises(ValueError, match=r"\bmining\b"):
        pe.engine_forward(x, x, labels, labels, row_in, pass_kind=4, mining=1, params=p, backend=backend)
    with pytest.raises(ValueError, match=r"\bmining\b"):
        pe.engine_backward_raw(x, x, labels, labels, row_in, coef, transform=0, mining=1, params=p,
                               exclude_diag=True, backend=backend)



def _circle_bad_calls(x, labels, row_in):
    """(the argument the error must name, forward args or None, backward args or None): transform 2
    takes the lse2 pass and its softmax backward, mining 0 and 9 params only."""
    p = PARAMS[CIRCLE]
    coef5, coef6, coef2 = (torch.ones(6, w, dtype=torch.float64) for w in (5, 6, 2))
    return [
        ("mining", (x, x, labels, labels, row_in, 1, CIRCLE, 1, p, True),
         (x, x, labels, labels, row_in, coef5, CIRCLE, 1, p, True)),
        ("pass_kind", (x, x, labels, labels, row_in, 2, CIRCLE, 0, p, True), None),
        ("pass_kind", (x, x, labels, labels, row_in, 4, CIRCLE, 0, p, True), None),
        ("row_coef", None, (x, x, labels, labels, row_in, coef6, CIRCLE, 0, p, True)),
        ("row_coef", None, (x, x, labels, labels, row_in, coef2, CIRCLE, 0, p, True)),
        ("params", (x, x, labels, labels, row_in, 1, CIRCLE, 0, p[:5], True),
         (x, x, labels, labels, row_in, coef5, CIRCLE, 0, p[:5], True)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_circle_transform_rejects_other_configurations(backend):
    """Transform 2 with mining 1, another pass, the lifted or hinge backward, or without its 4
    constants raises an error naming the argument, on every backend and in the Python entry points."""
    if backend != "reference":
        _needs_engine(backend)
    x = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    row_in = torch.zeros(6, 3, dtype=torch.float64)
    fwd, bwd, error = _raw_engine(backend)
    for name, fwd_args, bwd_args in _circle_bad_calls(x, labels, row_in):
        if fwd_args is not None:
            with pytest.raises(error, match=rf"\b{name}\b"):
                fwd(*fwd_args)
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                pe.engine_forward(*fwd_args[:5], pass_kind=fwd_args[5], transform=CIRCLE, mining=fwd_args[7],
                                  params=fwd_args[8], exclude_diag=True, backend=backend)
        if bwd_args is not None:
            with pytest.raises(error, match=rf"\b{name}\b"):
                bwd(*bwd_args)
            with pytest.raises(ValueError, match=rf"\b{name}\b"):
                pe.engine_backward_raw(*bwd_args[:6], transform=CIRCLE, mining=bwd_args[7], params=bwd_args[8],
                                       exclude_diag=True, backend=backend)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nine_params_leave_the_other_transforms_unchanged(backend, device):
    """The circle constants (params 6 to 9) are read by transform 2 only: the other transforms' ops
    give the same bits with 5 params as with 9, whatever the four are (ops.pair_engine sends them
    5)."""
    _needs_engine(backend)
    fwd, bwd, _ = _raw_engine(backend)
    x, y, xl, yl, _ = _inputs((37, 45, 19, 4), torch.float32, device, seed=8)
    for transform in (0, 1):
        base = PARAMS[transform]
        row_in = _row_in(x, y, xl, yl, False, transform, 0, base, torch.float32).to(device)
        out5, out9 = (fwd(x, y, xl, yl, row_in, 1, transform, 0, p, False) for p in (base, base + [1.3, -0.2, 0.7, 5.0]))
        assert torch.equal(out5, out9)
        coef = torch.stack([out5[:, 0] * 0 + 0.5, out5[:, 0], out5[:, 1] * 0 + 0.25, out5[:, 1],
                            torch.zeros_like(out5[:, 0])], dim=1)
        g5, g9 = (bwd(x, y, xl, yl, row_in, coef, transform, 0, p, False) for p in (base, base + [1.3, -0.2, 0.7, 5.0]))
        assert torch.equal(g5[0], g9[0]) and torch.equal(g5[1], g9[1])


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_circle_backward_is_the_detached_weight_derivative(backend, device):
    """fp64: the op's gradient of transform 2's lse2 statistics is the derivative of the same
    statistics with the relu weights frozen at the input (central differences), not the true
    derivative (gradcheck fails: the weights' own derivative is left out, as in PML)."""
    _needs_engine(backend)
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    x, y, xl, yl, _ = _inputs((7, 9, 4, 2), torch.float64, device, seed=12)
    p = PARAMS[CIRCLE]
    w = torch.rand(7, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)

    def total(a, b, frozen=None):
        if frozen is None:
            out = pe.engine_forward(a, b, xl, yl, pass_kind=1, transform=CIRCLE, params=p, backend=backend)
        else:  # the same sets' values with the weights of the frozen similarities
            s, s0 = a @ b.T, frozen
            same = xl[:, None] == yl[None, :]
            v_pos = torch.relu(p[5] - s0) * (s - p[6])
            v_neg = torch.relu(s0 - p[7]) * (s - p[8])
            big = torch.full_like(s, float("-inf"))
            out = torch.stack([torch.logsumexp(torch.where(same, p[0] * v_pos + p[1], big), dim=1),
                               torch.logsumexp(torch.where(~same, p[2] * v_neg + p[3], big), dim=1)], dim=1)
        return (out.nan_to_num(neginf=0.0) * w).sum()

    xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    total(xx, yy).backward()
    s0 = (x @ y.T).detach()
    for got, arg in ((xx.grad, 0), (yy.grad, 1)):
        num = torch.zeros_like(got)
        for idx in range(got.numel()):
            e = torch.zeros_like(got).view(-1)
            e[idx] = 1e-6
            e = e.view_as(got)
            plus = (x + e, y) if arg == 0 else (x, y + e)
            minus = (x - e, y) if arg == 0 else (x, y - e)
            num.view(-1)[idx] = (total(*plus, frozen=s0) - total(*minus, frozen=s0)) / 2e-6
        torch.testing.assert_close(got, num, rtol=1e-6, atol=1e-7)
    inputs = (x.clone().requires_grad_(True), y.clone().requires_grad_(True))
    assert not torch.autograd.gradcheck(total, inputs, raise_exception=False, fast_mode=backend == "triton")


def _two_sided_case(n, m, d, k, dtype, seed, transform=0, mining=1):
    """Inputs and (A, LSE, ...) coefficients of a two-sided backward, and its fp64 reference."""
    x, y, xl, yl, _ = _inputs((n, m, d, k), torch.float64, "cpu", seed)
    params, row_in, lse = _row_in_and_lse(x, y, xl, yl, False, transform, mining, torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.rand(n, 3, generator=g, dtype=torch.float64)
    coef = torch.stack([a[:, 0], lse[:, 0], a[:, 1], lse[:, 1], a[:, 2]], dim=1)
    want = reference.engine_backward(x, y, xl, yl, row_in, coef, transform, mining, params, False)
    return (x.to(dtype), y.to(dtype), xl, yl, row_in.to(dtype), coef.to(dtype)), params, want


@pytest.mark.parametrize("n, m", [(131, 9000), (1100, 1500)], ids=["131x9000", "1100x1500"])
@pytest.mark.parametrize("transform, mining", LSE2_CONFIG_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_two_sided_backward_sweep_with_row_and_column_major_y(dtype, transform, mining, n, m):
    """The C++ two-sided backward's one sweep (x's gradient from per-chunk partials) over the
    column tiles of y (9000 columns: 18, two per chunk and an odd last one) and its row blocks
    (1100 rows: 512, 512 and 76, each adding its product to a block of y's gradient), with y
    row-major and column-major (a transposed view, read without a copy: its gradient comes back
    in the same layout): the reference's gradients, and the same bits at 1 and 2 threads."""
    _needs_engine("cpp")
    (x, y, xl, yl, row_in, coef), params, want = _two_sided_case(n, m, 24, 40, dtype, 21, transform, mining)
    atol, rtol = TOLERANCES[dtype]
    y_cols = y.t().contiguous().t()
    assert not y_cols.is_contiguous()
    results = {}
    for layout, yy in (("rows", y), ("columns", y_cols)):
        for threads in (1, 2):
            prev = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results[layout, threads] = pe.engine_backward_raw(
                    x, yy, xl, yl, row_in, coef, transform=transform, mining=mining, params=params,
                    exclude_diag=False, backend="cpp")
            finally:
                torch.set_num_threads(prev)
        gx, gy = results[layout, 1]
        assert gy.stride() == yy.stride() if layout == "columns" else gy.is_contiguous()
        _close(gx, want[0], atol, rtol, f"grad_x ({layout})")
        _close(gy, want[1], atol, rtol, f"grad_y ({layout})")
        for a, b in zip(results[layout, 1], results[layout, 2]):
            assert torch.equal(a, b), f"{layout}: bits differ between 1 and 2 threads"


def test_cpp_two_sided_backward_past_the_sweep_budget():
    """Past the sweep's partial budget (chunks x N x D x 4 bytes > 64 MiB) the C++ backward takes two
    passes, one per side: still the reference's gradients."""
    _needs_engine("cpp")
    (x, y, xl, yl, row_in, coef), params, want = _two_sided_case(2400, 1100, 2400, 30, torch.float32, 4)
    assert 3 * x.shape[0] * x.shape[1] * 4 > 64 << 20  # 3 chunks of 512 columns
    gx, gy = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=1, params=params,
                                    exclude_diag=False, backend="cpp")
    atol, rtol = TOLERANCES[torch.float32]
    _close(gx, want[0], atol, rtol, "grad_x")
    _close(gy, want[1], atol, rtol, "grad_y")


@pytest.mark.parametrize("y_layout", ["columns", "rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_backward_into_a_block_of_a_wider_gradient(dtype, y_layout):
    """pair_engine_backward_into writes grad_y into the caller's buffer: a block of a wider
    gradient, (D, C) read by columns (strides (1, C): a block of PML's W's gradient, as the class
    path passes it) or (C, D) by rows, for y of either layout; grad_x and grad_y have
    pair_engine_backward's bits, at 1 and 2 threads, and the buffer's other elements stay as they
    were."""
    _needs_engine("cpp")
    (x, y, xl, yl, row_in, coef), params, want = _two_sided_case(131, 9000, 24, 40, dtype, 21)
    if y_layout == "columns":
        y = y.t().contiguous().t()
    gx_want, gy_want = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=1, params=params,
                                              exclude_diag=False, backend="cpp")
    for layout, threads in (("columns", 1), ("columns", 2), ("rows", 1), ("rows", 2)):
        wide = torch.full((24, 9137) if layout == "columns" else (9137, 24), float("nan"), dtype=dtype)
        block = wide.t()[100:9100] if layout == "columns" else wide[100:9100]
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gx = pe.engine_backward_into(block, x, y, xl, yl, row_in, coef, transform=0, mining=1, params=params,
                                         exclude_diag=False, backend="cpp")
        finally:
            torch.set_num_threads(prev)
        assert torch.equal(gx, gx_want) and torch.equal(block, gy_want), f"{layout}, {threads} threads: other bits"
        rest = torch.ones_like(wide, dtype=torch.bool)
        (rest.t()[100:9100] if layout == "columns" else rest[100:9100]).fill_(False)
        assert wide[rest].isnan().all(), "elements outside the block were written"
    _close(gy_want, want[1], *TOLERANCES[dtype], "grad_y")


def test_cpp_backward_into_two_passes():
    """Past the sweep's partial budget (the two passes, grad_y zero-filled then summed tile by tile)
    pair_engine_backward_into gives pair_engine_backward's bits in a strided block too."""
    _needs_engine("cpp")
    (x, y, xl, yl, row_in, coef), params, _ = _two_sided_case(2400, 1100, 2400, 30, torch.float32, 4)
    gx_want, gy_want = pe.engine_backward_raw(x, y, xl, yl, row_in, coef, transform=0, mining=1, params=params,
                                              exclude_diag=False, backend="cpp")
    block = torch.full((2400, 1500), float("nan")).t()[300:1400]
    gx = pe.engine_backward_into(block, x, y, xl, yl, row_in, coef, transform=0, mining=1, params=params,
                                 exclude_diag=False, backend="cpp")
    assert torch.equal(gx, gx_want) and torch.equal(block, gy_want)


def test_cpp_backward_into_rejects_bad_buffers_and_opcheck():
    """pair_engine_backward_into's buffer: y's shape, x's dtype, no overlap with itself or an
    operand, each a clear error; torch.library.opcheck of the op (its fake, the declared mutation)."""
    _needs_engine("cpp")
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(13, 6, generator=g, dtype=torch.float64), torch.randn(10, 6, generator=g, dtype=torch.float64)
    xl, yl = torch.randint(0, 3, (13,), generator=g), torch.randint(0, 3, (10,), generator=g)
    row_in, coef = torch.randn(13, 3, generator=g, dtype=torch.float64), torch.rand(13, 5, generator=g,
                                                                                     dtype=torch.float64)
    args = (x, y, xl, yl, row_in, coef, 0, 1, PARAMS[0], False)
    op = torch.ops.dmlkern.pair_engine_backward_into
    for buf, match in ((torch.empty(6, 10, dtype=torch.float64), r"grad_y must have y's shape"),
                       (torch.empty(10, 6), r"grad_y must have x's dtype"),
                       (torch.empty(1, 6, dtype=torch.float64).expand(10, 6), "internal overlap|single memory location"),
                       (y, "unsupported operation|memory location")):
        with pytest.raises(RuntimeError, match=match):
            op(*args, buf)
    torch.library.opcheck(op.default, (*args, torch.empty(10, 6, dtype=torch.float64)))
    torch.library.opcheck(op.default, (*args, torch.empty(6, 10, dtype=torch.float64).t()))


# ----------------------------------------------------------------------------- C++ symmetric tiles
# From 8 square blocks (128 rows below 16384, 256 from there) the C++ engine multiplies only the
# tiles (a, b), a <= b, of a batch against itself (y is x, the same labels), in rounds of disjoint
# blocks. 1029 rows: 9 blocks (an odd count, so each round has a bye) ending in a 5-row block;
# 1280: 10 full blocks.
SYM_TILE_ROWS = [1029, 1280]
# (pass, transform, mining, params scale). lse2 without mining takes one sweep with a fixed shift per
# set while its values' window is at most 128 wide in fp32, 1024 in fp64 (PARAMS: 10 and 2; scaled
# by 10 it is Multi-Similarity's 100, past the 64 that every row's LSE keeps); scaled by 40 it is
# not in fp32 (the two sweeps of the other passes).
SYM_FORWARD_CONFIGS = [pytest.param(0, 0, 0, 1, id="extrema"), pytest.param(1, 0, 0, 1, id="lse2-dot-all"),
                       pytest.param(1, 0, 0, 10, id="lse2-dot-ms"),
                       pytest.param(1, 0, 0, 40, id="lse2-dot-wide"), pytest.param(1, 0, 1, 1, id="lse2-dot-mined"),
                       pytest.param(1, 1, 0, 1, id="lse2-dist-all"), pytest.param(1, CIRCLE, 0, 1, id="lse2-circle-all"),
                       pytest.param(4, 0, 0, 1, id="hinge-dot"), pytest.param(4, 1, 0, 1, id="hinge-dist")]


def _sym_tile_inputs(n, dtype, seed, nan_row=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, 24, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 40, (n,), generator=g)
    if nan_row:
        x[n // 3, 5] = float("nan")
    return x.to(dtype), labels


def _sym_row_in(x, labels, pass_kind, transform, mining, params, stats):
    if pass_kind == 4:
        return _hinge_row_in(len(x), "finite", stats, "cpu", seed=7)
    return _row_in(x, x, labels, labels, True, transform, mining, params, stats)


def _cpp_threads(threads, f):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return f()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("pass_kind, transform, mining, scale", SYM_FORWARD_CONFIGS)
@pytest.mark.parametrize("n", SYM_TILE_ROWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_symmetric_tiles_forward(dtype, n, pass_kind, transform, mining, scale):
    """The forward passes that walk every column (extrema, lse2, hinge) on the symmetric tile
    schedule: the reference's statistics, with and without the self-pairs, and the same bits at 1
    and 2 threads."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x, labels = _sym_tile_inputs(n, dtype, seed=n + pass_kind)
    params = HINGE_PARAMS[transform] if pass_kind == 4 else PARAMS[transform]
    params = [scale * v for v in params[:4]] + params[4:]
    row_in = _sym_row_in(x, labels, pass_kind, transform, mining, params, stats)
    for exclude_diag in (True, False) if transform != 1 else (True,):
        def run():
            return pe.engine_forward(x, x, labels, labels, row_in, pass_kind=pass_kind, transform=transform,
                                     mining=mining, params=params, exclude_diag=exclude_diag, backend="cpp")
        got = _cpp_threads(1, run)
        want = reference.engine_forward(x.double(), x.double(), labels, labels, row_in.double(), pass_kind,
                                        transform, mining, params, exclude_diag)
        _close_to_scale(got, want, atol, rtol, f"forward (exclude_diag={exclude_diag})")
        assert torch.equal(got, _cpp_threads(2, run)), "bits differ between 1 and 2 threads"


@pytest.mark.parametrize("kind", ["lse2-dot-fixed", "lse2-dist-fixed", "lse2-dot-low-lse", "lse2-dot-b-sorted", "lse2-dot-mined",
                                  "lse2-dist-lifted", "lse2-circle", "hinge-dist"])
@pytest.mark.parametrize("n", SYM_TILE_ROWS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_symmetric_tiles_backward(dtype, n, kind):
    """The symmetric backward on the tile schedule (grad[a] += W_ab x[b] and grad[b] += W_ab^T x[a]
    from one tile): grad_x + grad_y of the two-sided reference, grad_y zero, the same bits at 1 and
    2 threads. Covers the lse2 weights with a fixed shift (mining 0: one exp per pair; with a B_pos
    column and rows sorted by label, only the tiles without a positive pair),
    without it (LSE coefficients far below every value, as no forward gives them: A·exp(U − LSE)
    would overflow), the mined lse2 weights,
    the lifted C_lift column (its tiles with and without a shared label), the circle transform and
    the hinge backward."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x, labels = _sym_tile_inputs(n, dtype, seed=2 * n)
    if kind in ("lse2-dist-lifted", "lse2-dot-b-sorted"):  # sorted classes of ~20 rows: most tiles share no label
        labels = torch.sort(torch.randint(0, n // 20, (n,), generator=torch.Generator().manual_seed(1))).values
    transform, mining = {"lse2-dot-fixed": (0, 0), "lse2-dist-fixed": (1, 0), "lse2-dot-low-lse": (0, 0), "lse2-dot-b-sorted": (0, 0),
                         "lse2-dot-mined": (0, 1), "lse2-dist-lifted": (1, 0), "lse2-circle": (CIRCLE, 0),
                         "hinge-dist": (1, 0)}[kind]
    g = torch.Generator().manual_seed(9)
    if kind == "hinge-dist":
        params = HINGE_PARAMS[1]
        row_in = _hinge_row_in(n, "finite", stats, "cpu", seed=4)
        coef = _hinge_coef(n, "cpu", stats, seed=5)
    else:
        params, row_in, lse = _row_in_and_lse(x, x, labels, labels, True, transform, mining, stats)
        a = torch.rand(n, 4, generator=g, dtype=torch.float64)
        a[::3, 0] = 0.0
        if kind in ("lse2-dot-fixed", "lse2-dist-fixed", "lse2-dot-low-lse"):
            a[:, 2] = 0.0  # no B_pos term
        if kind == "lse2-dot-low-lse":  # LSE_pos far below any value (the forward can't give it): two exps
            drop = 100.0 if dtype == torch.float32 else 600.0
            lse = lse.clone()
            lse[::5, 0] -= drop
            a[::5, 0] *= math.exp(-drop - 5.0)
        cols = [a[:, 0], lse[:, 0], a[:, 1], lse[:, 1], a[:, 2]] + ([a[:, 3]] if kind == "lse2-dist-lifted" else [])
        coef = torch.stack(cols, dim=1).to(stats)

    def run():
        return pe.engine_backward_raw(x, x, labels, labels, row_in, coef, transform=transform, mining=mining,
                                      params=params, exclude_diag=True, backend="cpp", symmetric=True)
    gx, gy = _cpp_threads(1, run)
    wx, wy = reference.engine_backward(x.double(), x.double(), labels, labels, row_in.double(), coef.double(),
                                       transform, mining, params, True)
    _close_to_scale(gx, wx + wy, atol, rtol, "symmetric grad")
    assert torch.equal(gy, torch.zeros_like(gy))
    gx2, _ = _cpp_threads(2, run)
    assert torch.equal(gx, gx2), "bits differ between 1 and 2 threads"


def _far_rows_inputs(n, dtype):
    """Unit rows where class 0 (every 7th row) sits near v and the others near -v: with a
    Multi-Similarity-like beta of 60 (PARAMS[0] scaled by 12) a class-0 row's negative LSE lies ~110
    below the window's top U (past the 64 the fixed shift keeps), the others' do not."""
    g = torch.Generator().manual_seed(3)
    v = torch.nn.functional.normalize(torch.randn(24, generator=g, dtype=torch.float64), dim=0)
    labels = torch.randint(1, 30, (n,), generator=g)
    labels[::7] = 0
    noise = torch.randn(n, 24, generator=g, dtype=torch.float64)
    x = torch.where((labels == 0)[:, None], v, -v) + 0.05 * noise
    return torch.nn.functional.normalize(x, dim=1).to(dtype), labels


@pytest.mark.parametrize("case", ["clone", "other", "columns"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_two_sided_fixed_shift_rows_below_the_window(dtype, case):
    """The two-sided lse2 forward (y not x: a copy of x with its self-pairs excluded, other rows,
    other rows read by columns) takes the fixed shift as the symmetric one does, a row whose LSE
    lies more than 64 (fp32; 512 fp64) below U recomputed with a running maximum: the reference's
    statistics, the same bits at 1 and 2 threads."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x, labels = _far_rows_inputs(1029, dtype)
    if case == "clone":
        y, y_labels, exclude_diag = x.clone(), labels.clone(), True
    else:
        y, y_labels, exclude_diag = x[:700].flip(0).clone(), labels[:700].flip(0).clone(), False
        if case == "columns":
            y = y.t().contiguous().t()
    scale = 12.0 if dtype == torch.float32 else 100.0
    params = [scale * p for p in PARAMS[0][:4]] + PARAMS[0][4:]
    row_in = torch.zeros(len(x), 3, dtype=stats)
    want = reference.engine_forward(x.double(), y.double(), labels, y_labels, row_in.double(), 1, 0, 0, params,
                                    exclude_diag)
    top = params[2] + params[3]
    below = want[:, 1] < top - (64.0 if dtype == torch.float32 else 512.0)
    assert below.any() and not below.all(), "the case does not test what it says"

    def forward():
        return pe.engine_forward(x, y, labels, y_labels, row_in, pass_kind=1, params=params,
                                 exclude_diag=exclude_diag, backend="cpp")
    got = _cpp_threads(1, forward)
    _close_to_scale(got, want, atol, rtol, "forward")
    assert torch.equal(got, _cpp_threads(2, forward)), "bits differ between 1 and 2 threads"


@pytest.mark.parametrize("transform", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_lse2_column_chunks(dtype, transform):
    """The lse2 pass with a fixed shift against a y taller than x runs column-parallel (tasks of a
    512-row block and a chunk of 512-column tiles, the chunks' sums merged in order): 530 rows (a
    second, short row block) against 17 full tiles and a short one (9 chunks of two tiles, the
    last one short), labels shared across chunks: the reference's statistics, and the
    same bits at 1, 2 and 3 threads."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(23)
    n, m = 530, 17 * 512 + 45
    x = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=dtype), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, 8, generator=g, dtype=dtype), dim=1)
    xl, yl = torch.randint(0, 50, (n,), generator=g), torch.randint(0, 50, (m,), generator=g)
    params = PARAMS[0]
    row_in = torch.zeros(n, 3, dtype=dtype)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 1, transform, 0, params,
                                    False)

    def forward():
        return pe.engine_forward(x, y, xl, yl, row_in, pass_kind=1, transform=transform, params=params,
                                 backend="cpp")
    got = _cpp_threads(1, forward)
    _close_to_scale(got, want, atol, rtol, "forward")
    for threads in (2, 3):
        assert torch.equal(_cpp_threads(threads, forward), got), f"bits differ between 1 and {threads} threads"


@pytest.mark.parametrize("layout", ["rows", "columns"])
@pytest.mark.parametrize("case", ["nan", "long"])
def test_cpp_two_sided_window_from_a_late_row(case, layout):
    """y's largest row norm is read in chunks of rows (in parallel, each stopping at its first row
    past the bound), so the window's decision must come from a row far into y: a row 40x longer
    than the others (no window fits; one taken from the other rows would overflow exp by e^195),
    or a NaN row (NaN reaches the statistics the reference's reach). The reference's statistics,
    NaN where it has NaN, the same bits at 1 and 2 threads, rows or columns of y alike."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[torch.float32]
    g = torch.Generator().manual_seed(11)
    x = torch.nn.functional.normalize(torch.randn(150, 128, generator=g), dim=1)
    y = torch.nn.functional.normalize(torch.randn(1100, 128, generator=g), dim=1)
    xl, yl = torch.randint(0, 40, (150,), generator=g), torch.randint(0, 40, (1100,), generator=g)
    if case == "nan":
        y[1037, 5] = float("nan")
    else:
        y[1037] = 40.0 * x[3]  # with the scale 5 below: x[3]'s value 5 * 40 - 2.5 for this negative
        yl[1037] = (xl[3] + 1) % 40
    if layout == "columns":
        y = y.t().contiguous().t()
    params = [-2.0, 1.0, 5.0, -2.5, 0.1]  # |sc| = 5: unit rows take the fixed shift
    row_in = torch.zeros(len(x), 3)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 1, 0, 0, params, False)

    def forward():
        return pe.engine_forward(x, y, xl, yl, row_in, pass_kind=1, params=params, backend="cpp")
    got = _cpp_threads(1, forward)
    if case == "nan":
        assert torch.isnan(want).any() and not torch.isnan(want).all(), "the case does not test what it says"
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    _close_to_scale(got, want, atol, rtol, "forward")
    torch.testing.assert_close(_cpp_threads(2, forward), got, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"bits differ between 1 and 2 threads: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_symmetric_tiles_fixed_shift_rows_below_the_window(dtype):
    """A window wider than the 64 (fp32; 512 fp64) every row's LSE keeps still takes the fixed
    shift; a row whose LSE lies further below U is recomputed with a running maximum (the forward),
    and the backward then keeps two exps: the reference's statistics and gradients, the same bits at
    1 and 2 threads."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    x, labels = _far_rows_inputs(1029, dtype)
    # windows of 120 and 1000: a class-0 row's terms fall below e^-104 (fp32's exp gives 0 there) and
    # e^-745 (fp64's): without the recomputation its negative LSE would be -inf
    scale = 12.0 if dtype == torch.float32 else 100.0
    params = [scale * p for p in PARAMS[0][:4]] + PARAMS[0][4:]
    row_in = torch.zeros(len(x), 3, dtype=stats)
    want = reference.engine_forward(x.double(), x.double(), labels, labels, row_in.double(), 1, 0, 0, params, True)
    top = params[2] + params[3]  # U of the negatives: sc_neg * 1 + off_neg on unit rows
    width = 64.0 if dtype == torch.float32 else 512.0
    below = want[:, 1] < top - width
    assert below[labels == 0].all() and not below[labels != 0].any(), "the case does not test what it says"

    def forward():
        return pe.engine_forward(x, x, labels, labels, row_in, pass_kind=1, params=params, exclude_diag=True,
                                 backend="cpp")
    got = _cpp_threads(1, forward)
    _close_to_scale(got, want, atol, rtol, "forward")
    assert torch.equal(got, _cpp_threads(2, forward)), "bits differ between 1 and 2 threads"
    g = torch.Generator().manual_seed(4)
    a = torch.rand(len(x), 2, generator=g, dtype=torch.float64)
    for lse, what in ((want, "rows below the window: two exps"), (want[labels != 0], "rows in the window: one exp")):
        keep = slice(None) if lse is want else labels != 0
        xs, ls = x[keep], labels[keep]
        coef = torch.stack([a[keep][:, 0], lse[:, 0], a[keep][:, 1], lse[:, 1], torch.zeros(len(xs), dtype=torch.float64)],
                           dim=1).to(stats)
        if lse is not want:  # the reference's LSE of the kept rows only
            lse = reference.engine_forward(xs.double(), xs.double(), ls, ls, row_in[keep].double(), 1, 0, 0, params, True)
            coef[:, 1], coef[:, 3] = lse[:, 0].to(stats), lse[:, 1].to(stats)

        def backward():
            return pe.engine_backward_raw(xs, xs, ls, ls, row_in[keep], coef, transform=0, mining=0, params=params,
                                          exclude_diag=True, backend="cpp", symmetric=True)
        gx, _ = _cpp_threads(1, backward)
        wx, wy = reference.engine_backward(xs.double(), xs.double(), ls, ls, row_in[keep].double(), coef.double(), 0,
                                           0, params, True)
        _close_to_scale(gx, wx + wy, atol, rtol, what)
        assert torch.equal(gx, _cpp_threads(2, backward)[0]), "bits differ between 1 and 2 threads"


def test_cpp_symmetric_tiles_nan_row():
    """A NaN embedding row on the symmetric tile schedule: the lse2 pass and its backward put NaN
    where the reference does (its row and, through the sums, every row it meets)."""
    _needs_engine("cpp")
    x, labels = _sym_tile_inputs(1029, torch.float32, seed=5, nan_row=True)
    params = PARAMS[0]
    row_in = torch.zeros(len(x), 3)
    got = pe.engine_forward(x, x, labels, labels, row_in, pass_kind=1, params=params, exclude_diag=True,
                            backend="cpp")
    want = reference.engine_forward(x.double(), x.double(), labels, labels, row_in.double(), 1, 0, 0, params, True)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    coef = torch.stack([torch.full_like(want[:, 0], 0.5), want[:, 0], torch.full_like(want[:, 0], 0.25),
                        want[:, 1], torch.zeros_like(want[:, 0])], dim=1)
    gx, _ = pe.engine_backward_raw(x, x, labels, labels, row_in, coef.float(), transform=0, mining=0,
                                   params=params, exclude_diag=True, backend="cpp", symmetric=True)
    wx, wy = reference.engine_backward(x.double(), x.double(), labels, labels, row_in.double(), coef, 0, 0,
                                       params, True)
    assert torch.equal(torch.isnan(gx), torch.isnan(wx + wy))


def test_cpp_symmetric_tiles_of_256_rows():
    """From 16384 rows the symmetric blocks are 256 rows: 16411 rows (65 blocks, a bye each round,
    a 27-row last block) on the symmetric schedule against the same call on a copy of x (not the
    same tensor, so the row-block walk over every tile), for the lse2 pass and the hinge pass and
    their backwards; fp64, D=3 (the products are not what is tested)."""
    _needs_engine("cpp")
    n = 16411
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 2000, (n,), generator=g)
    other = x.clone()
    for pass_kind, transform, params in ((1, 0, PARAMS[0]), (4, 1, HINGE_PARAMS[1])):
        row_in = torch.zeros(n, 3, dtype=torch.float64)
        kw = dict(pass_kind=pass_kind, transform=transform, params=params, exclude_diag=True, backend="cpp")
        got = pe.engine_forward(x, x, labels, labels, row_in, **kw)
        want = pe.engine_forward(x, other, labels, labels, row_in, **kw)
        _close_to_scale(got, want, 1e-12, 1e-10, f"pass {pass_kind} forward")
        if pass_kind == 4:
            coef = _hinge_coef(n, "cpu", torch.float64, seed=5)
        else:
            coef = torch.stack([torch.full_like(want[:, 0], 0.5), want[:, 0], torch.full_like(want[:, 0], 0.25),
                                want[:, 1], torch.zeros_like(want[:, 0])], dim=1)
        bw = dict(transform=transform, mining=0, params=params, exclude_diag=True, backend="cpp")
        gs, _ = pe.engine_backward_raw(x, x, labels, labels, row_in, coef, symmetric=True, **bw)
        wx, wy = pe.engine_backward_raw(x, other, labels, labels, row_in, coef, **bw)
        _close_to_scale(gs, wx + wy, 1e-12, 1e-10, f"pass {pass_kind} backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("transform", [0, 1], ids=["dot", "dist"])
@pytest.mark.parametrize("labels", ["sorted", "scrambled"])
@pytest.mark.parametrize("params", [[0.0, 0.0, 5.0, -2.5, 0.0], PARAMS[0]], ids=["class", "pairs"])
def test_cpp_rows_sharing_no_label_with_a_tile(labels, transform, dtype, params):
    """A row whose label lies outside the range of a tile's column labels takes the negatives-only
    loops of the fixed-shift forward and of the backward (the class path's case: a row's class is
    one column of one tile). y's labels sorted: 1300 columns (tiles of 512, 512, 276) with labels
    0..129, label 60 left out (rows of label 60 lie inside a tile's range with no positive there),
    x's labels from -5 to 134 (rows with no positive at all); dead rows (A_neg = 0) and live
    positive sets (A_pos != 0, the "pairs" params) alike. "scrambled" relabels the classes out of
    order (the same pairs; all but a few rows inside every tile's range: the full loops). The reference's
    statistics and gradients, in the sweep and column-parallel layout of the class path."""
    _needs_engine("cpp")
    atol, rtol = TOLERANCES[dtype]
    g = torch.Generator().manual_seed(31)
    n, m = 300, 1300
    x = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=dtype), dim=1)
    y = torch.nn.functional.normalize(torch.randn(m, 16, generator=g, dtype=dtype), dim=1)
    yl = torch.arange(m) * 130 // m
    yl = torch.where(yl == 60, 61, yl)
    xl = torch.randint(-5, 135, (n,), generator=g)
    if labels == "scrambled":
        perm = torch.randperm(200, generator=g)
        xl, yl = perm[xl + 5], perm[yl + 5]
    outside = [int(((xl < t.min()) | (xl > t.max())).sum()) for t in yl.split(512)]  # rows outside each tile's range
    if labels == "scrambled":
        assert all(k < n // 10 for k in outside), "the scrambled labels leave rows outside a tile's range"
    else:
        assert all(k > n // 2 for k in outside) and bool((xl == 60).any()), "the case does not test what it says"
    row_in = torch.zeros(n, 3, dtype=dtype)
    want = reference.engine_forward(x.double(), y.double(), xl, yl, row_in.double(), 1, transform, 0, params, False)
    got = pe.engine_forward(x, y, xl, yl, row_in, pass_kind=1, transform=transform, params=params, backend="cpp")
    _close_to_scale(got, want, atol, rtol, "forward")
    a = torch.rand(n, 3, generator=g, dtype=torch.float64)
    a[::4, 1] = 0.0  # dead negative sets: the full loop's zeros
    coef = torch.stack([a[:, 0], want[:, 0], a[:, 1], want[:, 1], torch.zeros(n, dtype=torch.float64)], dim=1)
    gx, gy = pe.engine_backward_raw(x, y, xl, yl, row_in, coef.to(dtype), transform=transform, mining=0,
                                    params=params, exclude_diag=False, backend="cpp")
    wx, wy = reference.engine_backward(x.double(), y.double(), xl, yl, row_in.double(), coef, transform, 0,
                                       params, False)
    _close_to_scale(gx, wx, atol, rtol, "grad_x")
    _close_to_scale(gy, wy, atol, rtol, "grad_y")
