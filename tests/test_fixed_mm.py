"""dmlkern.ops.fixed_mm(a, b) = a @ b.T: values in every layout the gradients use, gradients
(gradcheck, torch.func, torch.compile), opcheck, bit-identical results at 1, 2 and 4 threads and
on repeat (also on MKL's AVX2 code path), argument errors, and the fallback to torch's product.
The CPU kernel cuts the output into tiles of at most 256 rows by 2048 columns (narrower where the
output has few rows): the sizes below cross several of them both ways, with ragged edges."""
import os
import subprocess
import sys

import pytest
import torch

from dmlkern.ops import fixed_mm, fixed_mm_op
from test_determinism import _assert_reproducible

needs_op = pytest.mark.skipif(not fixed_mm_op._OP_READY, reason="the dmlkern._C extension with fixed_mm is not built")
pytestmark = needs_op

DTYPES = [torch.float32, torch.float64]
# (N, M, D): single elements, empty sides, odd sizes inside one tile, several tiles each way.
SHAPES = [(1, 1, 1), (7, 5, 3), (0, 4, 3), (4, 0, 3), (6, 5, 0), (300, 37, 33), (600, 4500, 37),
          (100, 2000, 33), (40, 5000, 64), (5000, 40, 64)]


def _pair(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)


def _value_and_grads(a, b, up):
    """[a @ b.T, grad of a, grad of b] through fixed_mm for the upstream gradient `up`."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = fixed_mm(a, b)
    return [out.detach(), *torch.autograd.grad(out, (a, b), up)]


def _layouts(a, b):
    """The same values as (a, b) in other strides: transposed views (what the backward passes),
    strided slices, and a stride-0 expansion (a gradient of a sum)."""
    yield "contiguous", a, b
    yield "a transposed view", a.t().contiguous().t(), b
    yield "b transposed view", a, b.t().contiguous().t()
    yield "strided slices", torch.cat([a, a], 1)[:, ::2], torch.cat([b, b], 1)[:, 1::2]
    if a.numel():
        yield "a expanded", a[:1, :].expand_as(a), b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values(shape, dtype):
    a, b = _pair(*shape, dtype)
    for what, a_, b_ in _layouts(a, b):
        out = fixed_mm(a_, b_)
        assert out.shape == (shape[0], shape[1]) and out.dtype == dtype and out.is_contiguous(), what
        torch.testing.assert_close(out, a_ @ b_.t(), msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(torch.ops.dmlkern.fixed_mm(a_, b_), out, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 5, 3), (3, 9, 1)], ids=str)
def test_gradcheck(shape):
    a, b = (t.requires_grad_() for t in _pair(*shape, torch.float64))
    assert torch.autograd.gradcheck(fixed_mm, (a, b))
    assert torch.autograd.gradgradcheck(fixed_mm, (a, b))


def test_gradcheck_across_tiles():
    """fast_mode (random projections): the full Jacobian of 600 x 4500 outputs would take hours."""
    a, b = (t.requires_grad_() for t in _pair(600, 4500, 3, torch.float64))
    assert torch.autograd.gradcheck(fixed_mm, (a, b), fast_mode=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_matmul(dtype):
    a, b = _pair(600, 4500, 37, dtype, seed=1)
    up = torch.randn(600, 4500, generator=torch.Generator().manual_seed(2), dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    for what, a_, b_ in _layouts(a, b):
        a_, b_ = a_.detach().requires_grad_(), b_.detach().requires_grad_()
        got = torch.autograd.grad(fixed_mm(a_, b_), (a_, b_), up)
        want = torch.autograd.grad(a_ @ b_.t(), (a_, b_), up)
        for name, g, w in zip("ab", got, want):  # sums over 4500 / 600 terms: fp32 rounding
            torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what}, grad of {name}: {m}")
        if what in ("contiguous", "a transposed view", "b transposed view"):
            # each gradient in its input's layout, as torch.mm's: a weight W used as W.T gets a
            # row-major gradient (no strided accumulate into W.grad)
            assert [g.stride() for g in got] == [a_.stride(), b_.stride()], what
    # one input requiring grad
    a_ = a.clone().requires_grad_()
    (g,) = torch.autograd.grad(fixed_mm(a_, b), a_, up)
    torch.testing.assert_close(g, up @ b, **tol)


def test_torch_func_and_double_backward():
    a, b = _pair(300, 2100, 37, torch.float64)

    def f(mm):
        return lambda a, b: mm(a, b).sin().sum()

    got = torch.func.grad(f(fixed_mm), argnums=(0, 1))(a, b)
    want = torch.func.grad(f(lambda a, b: a @ b.t()), argnums=(0, 1))(a, b)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    hvp = torch.func.grad(lambda a: torch.func.grad(f(fixed_mm))(a, b).square().sum())(a)
    torch.testing.assert_close(hvp, torch.func.grad(lambda a: torch.func.grad(f(lambda a, b: a @ b.t()))(a, b)
                                                    .square().sum())(a))


def test_eager_double_backward():
    """create_graph=True outside torch.func: the C++ autograd's backward records its own calls."""
    a, b = (t.requires_grad_() for t in _pair(300, 2100, 37, torch.float64))

    def hessian_vector(mm):
        (grad_a,) = torch.autograd.grad(mm(a, b).sin().sum(), a, create_graph=True)
        return torch.autograd.grad(grad_a.square().sum(), (a, b))

    for got, want in zip(hessian_vector(fixed_mm), hessian_vector(lambda a, b: a @ b.t())):
        torch.testing.assert_close(got, want)
    small = [t.detach()[:6].requires_grad_() for t in (a, b)]
    assert torch.autograd.gradgradcheck(fixed_mm, small)


def test_opcheck():
    for shape, dtype in (((7, 5, 3), torch.float64), ((600, 2500, 16), torch.float32)):
        a, b = _pair(*shape, dtype)
        for _, a_, b_ in list(_layouts(a, b))[:3]:
            torch.library.opcheck(torch.ops.dmlkern.fixed_mm.default,
                                  (a_.detach().requires_grad_(), b_.detach().requires_grad_()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_gives_the_same_bits(dtype):
    """out=: the bits of the plain call in a contiguous buffer, for every operand layout, the out
    tensor returned; in a strided column block of a larger buffer (the rest untouched) the BLAS
    may round otherwise (MKL picks fp64 kernels by the output's layout), but with the same bits
    at 1 and 2 threads; torch's product where no kernel runs (fp16)."""
    before = torch.get_num_threads()
    try:
        for shape in ((300, 4500, 37), (7, 5, 3), (0, 4, 3)):
            a, b = _pair(*shape, dtype)
            for name, a_, b_ in _layouts(a, b):
                want = fixed_mm(a_, b_)
                out = torch.empty_like(want)
                assert fixed_mm(a_, b_, out=out) is out and torch.equal(out, want), name
                blocks = []
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    wide = torch.full((shape[0], shape[1] + 9), 7.0, dtype=dtype)
                    fixed_mm(a_, b_, out=wide[:, 4:4 + shape[1]])
                    assert (wide[:, :4] == 7).all() and (wide[:, 4 + shape[1]:] == 7).all(), name
                    blocks.append(wide[:, 4:4 + shape[1]])
                torch.testing.assert_close(blocks[0], want, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
                assert torch.equal(blocks[0], blocks[1]), name
    finally:
        torch.set_num_threads(before)
    a, b = (t.half() for t in _pair(9, 6, 4, torch.float32))
    out = torch.empty(9, 6, dtype=torch.half)
    assert torch.equal(fixed_mm(a, b, out=out), a @ b.t())


def test_out_errors():
    a, b = _pair(6, 5, 3, torch.float32)
    for out, match in ((torch.empty(5, 6), r"out must be .*\(N, M\) = \(6, 5\)"),
                       (torch.empty(6, 5, dtype=torch.float64), "out must have a's dtype")):
        with pytest.raises((ValueError, TypeError), match=match):
            fixed_mm(a, b, out=out)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.dmlkern.fixed_mm_into(a, b, out)
    x = torch.randn(5, 5)
    with pytest.raises(RuntimeError, match="memory location"):  # out overlapping an operand
        torch.ops.dmlkern.fixed_mm_into(x, x.t(), x)
    with pytest.raises(RuntimeError, match="not differentiable"):
        fixed_mm(a.requires_grad_(), b, out=torch.empty(6, 5))
    with torch.no_grad():
        fixed_mm(a, b, out=torch.empty(6, 5))


def test_opcheck_out():
    for shape, dtype in (((7, 5, 3), torch.float64), ((600, 2500, 16), torch.float32)):
        a, b = _pair(*shape, dtype)
        torch.library.opcheck(torch.ops.dmlkern.fixed_mm_into.default,
                              (a, b, torch.empty(shape[0], shape[1], dtype=dtype)))


def test_compile_matches_eager_bits():
    """torch.compile (aot_eager: the op under the compiled graph) forward and backward give the
    eager bits."""
    a, b = _pair(600, 4500, 37, torch.float32)
    step = lambda a, b: fixed_mm(a, b).square().sum()  # noqa: E731
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        value = fn(a_, b_)
        results.append([value.detach(), *torch.autograd.grad(value, (a_, b_))])
    for e, c in zip(*results):
        assert torch.equal(e, c)


# (N, M, D) for bit-identity: tiles both ways; one row tile with many (narrow) column tiles; many
# row tiles; and (1024 x 128) @ (128 x 4096), where torch.matmul's bits change with the thread
# count on MKL (measured on the AVX2 path).
REPRO_SHAPES = [(600, 4500, 37), (100, 2000, 33), (40, 5000, 64), (5000, 40, 64), (1024, 4096, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", REPRO_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bit_identical_across_threads(shape, dtype):
    """Value, grad_a (g @ b: K = M) and grad_b (g.T @ a: transposed operands) at 1, 2, 4 threads
    and on repeat, bit for bit. (Plain a @ b.T fails 8 of these 10 cases on MKL's AVX-512 path
    and all 10 on its AVX2 path, measured on a 2-core Xeon.)"""
    a, b = _pair(*shape, dtype, seed=3)
    up = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(4), dtype=dtype)
    _assert_reproducible(f"fixed_mm {shape} {dtype}", lambda: _value_and_grads(a, b, up))


def test_bit_identical_on_mkl_avx2_code_path():
    """The AMD EPYC case emulated on any x86 CPU: MKL's AVX2 code path splits a product by its
    thread count (tests/test_determinism.py). (Without MKL the variable is ignored.)"""
    # (CPU tests only: DMLKERN_TRITON_OPS=0 spares the process the Triton ops' registration, ~1-2 s)
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2", DMLKERN_TRITON_OPS="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
           "bit_identical_across_threads"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_half_dtypes_fall_back_to_matmul(dtype):
    a, b = (t.to(dtype).requires_grad_() for t in _pair(30, 20, 8, torch.float32))
    assert not fixed_mm_op.runs_kernel(a)
    out = fixed_mm(a, b)
    assert torch.equal(out, a @ b.t()) and out.dtype == dtype
    grads = torch.autograd.grad(out.float().sum(), (a, b))
    assert grads[0].dtype == dtype and grads[1].shape == b.shape


def test_without_extension_falls_back_to_matmul(monkeypatch):
    def boom(*args):
        raise AssertionError("the op ran")

    monkeypatch.setattr(fixed_mm_op, "_OP_READY", False)
    monkeypatch.setattr(torch.ops.dmlkern, "fixed_mm", boom)
    a, b = _pair(300, 2100, 8, torch.float32)
    assert torch.equal(fixed_mm(a, b), a @ b.t())
    a.requires_grad_()
    (g,) = torch.autograd.grad(fixed_mm(a, b).sum(), a)
    assert g.shape == a.shape


def test_meta_tensors():
    a, b = torch.empty(5, 3, device="meta"), torch.empty(4, 3, device="meta")
    assert fixed_mm(a, b).shape == (5, 4)


@pytest.mark.parametrize("call", ["python", "op"])
def test_errors(call):
    f = fixed_mm if call == "python" else torch.ops.dmlkern.fixed_mm
    x = torch.randn(4, 3)
    cases = [
        ((torch.randn(3), x), "a must be .*2-D"),
        ((x, torch.randn(2, 2, 3)), "b must be .*2-D"),
        ((x, torch.randn(5, 4)), "same width D"),
        ((x.long(), x.long()), "a must be .*floating"),
        ((x, x.double()), "same dtype"),
    ]
    if call == "op":
        cases.append(((x.half(), x.half()), "CPU backend takes float32 or float64 a"))
    else:
        cases.append(((x, torch.empty(4, 3, device="meta")), "same device"))
    for args, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            f(*args)
    if call == "python":  # Python's own exception types
        with pytest.raises(ValueError):
            f(x, torch.randn(5, 4))
        with pytest.raises(TypeError):
            f(x, x.double())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cuda(dtype):
    assert fixed_mm_op.runs_kernel(torch.empty(1, device="cuda", dtype=dtype)), "the CUDA kernel is not built"
    a, b = (t.cuda().to(dtype) for t in _pair(600, 4500, 37, torch.float32))
    up = torch.randn(600, 4500, device="cuda", dtype=dtype)
    first, second = _value_and_grads(a, b, up), _value_and_grads(a, b, up)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    torch.testing.assert_close(first[0], a @ b.t())
    out = torch.empty_like(first[0])
    assert torch.equal(fixed_mm(a, b, out=out), first[0])


def test_forward_mode_ad_carries_the_tangents():
    """The op's registered autograd has no forward derivative (torch.library would drop the
    tangents silently): under forward-mode AD fixed_mm is torch's product, tangents included."""
    g = torch.Generator().manual_seed(3)
    a, b, ta, tb = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((7, 5), (9, 5), (7, 5), (9, 5)))
    want = ta @ b.T + a @ tb.T
    value, got = torch.func.jvp(fixed_mm, (a, b), (ta, tb))
    torch.testing.assert_close(value, a @ b.T)
    torch.testing.assert_close(got, want)
    with torch.autograd.forward_ad.dual_level():
        out = fixed_mm(torch.autograd.forward_ad.make_dual(a, ta), torch.autograd.forward_ad.make_dual(b, tb))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(out).tangent, want)
