"""The masked row log-sum-exp op on every backend against the materialising reference.

masked_lse is an epilogue on the pair engine's lse2 pass (dmlkern/ops/masked_lse.py), so these
tests run the engine's C++ (CPU, CUDA) and Triton kernels through the op's public semantics."""
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from dmlkern import reference
from dmlkern.engine_spec import EngineParams
from dmlkern.ops import masked_lse
from dmlkern.triton import interpret_mode
from _kernel_cases import HAS_CUDA, KERNEL_BACKENDS, KERNEL_DTYPE_CASES

# The module (dmlkern.ops.masked_lse the attribute is the function).
MASKED_LSE_MODULE = sys.modules["dmlkern.ops.masked_lse_op"]

# (N, M, D, distinct labels); M=None means y is x (self-pairs excluded). None are tile multiples.
SHAPES = [
    (1, None, 3, 1),      # one sample: its only pair is itself, so every row is empty
    (37, None, 19, 5),
    (70, 130, 33, 4),
    (131, None, 70, 3),   # D above one K-slice, rows above one block
    (9, 600, 8, 2),       # M above the CPU column tile
]


def _inputs(n, m, d, n_labels, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = torch.nn.functional.normalize(x, dim=1)
    xl = torch.randint(0, n_labels, (n,), generator=g)
    if m is None:
        return x.to(device, dtype), None, xl.to(device), None
    y = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    yl = torch.randint(0, n_labels + 1, (m,), generator=g)  # a label only y has: empty rows
    return x.to(device, dtype), y.to(device, dtype), xl.to(device), yl.to(device)


def _run(x, y, xl, yl, mask, scale, backend):
    """lse and its gradients for a random upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    y_ = None if y is None else y.detach().clone().requires_grad_(True)
    if backend == "reference":  # fp64 ground truth
        x64 = x.double()
        y64 = x64 if y_ is None else y_.double()
        out = reference.masked_lse(x64, y64, xl.long(), (xl if yl is None else yl).long(),
                                   scale, mask, exclude_diag=y_ is None)
    else:
        out = masked_lse(x, y_, xl, yl, scale=scale, mask=mask, backend=backend)
        # fp32 statistics (fp64 for fp64 inputs), one per row of x, a tensor of its own.
        assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
        assert out.shape == (x.shape[0],) and out.is_contiguous()
    g = torch.Generator().manual_seed(7)
    up = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.device)
    finite = torch.isfinite(out)
    (out.double()[finite] * up[finite]).sum().backward()
    return out.double(), x.grad.double(), None if y_ is None else y_.grad.double()


def _close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mask", ["all", "same", "diff"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s))
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_matches_reference(backend, device, dtype, atol, rtol, shape, mask):
    x, y, xl, yl = _inputs(*shape, dtype, device, seed=zlib.crc32(repr((shape, mask)).encode()) % 1000)  # stable across runs
    scale = 3.0
    got = _run(x, y, xl, yl, mask, scale, backend)
    want = _run(x, y, xl, yl, mask, scale, "reference")
    # Same -inf pattern (empty rows), finite values equal, gradients equal (0 on empty rows).
    assert torch.equal(torch.isneginf(got[0]).cpu(), torch.isneginf(want[0]).cpu())
    _close(got[0], want[0], atol, rtol, "lse")
    _close(got[1], want[1], atol, rtol, "grad x")
    if y is not None:
        _close(got[2], want[2], atol, rtol, "grad y")
    assert not torch.isnan(got[1]).any()


@pytest.mark.parametrize("mask", ["all", "same", "diff"])
@pytest.mark.parametrize("y_is", ["none", "x"])
@pytest.mark.parametrize("backend, device, dtype, atol, rtol", KERNEL_DTYPE_CASES)
def test_self_pairs_with_their_own_y_labels(backend, device, dtype, atol, rtol, y_is, mask):
    """y None (or x itself) with separate y_labels: a self-pair's two labels may differ, and it
    is still excluded under every mask (the engine's negatives alone would keep it)."""
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(45, 12, generator=g, dtype=torch.float64), dim=1)
    xl = torch.randint(0, 3, (45,), generator=g)
    yl = torch.randint(0, 3, (45,), generator=g)
    assert (xl != yl).any() and (xl == yl).any()
    xx = x.to(device, dtype, copy=True).requires_grad_(True)
    out = masked_lse(xx, None if y_is == "none" else xx, xl.to(device), yl.to(device), scale=4.0,
                     mask=mask, backend=backend)
    xr = x.clone().requires_grad_(True)
    want = reference.masked_lse(xr, xr, xl, yl, 4.0, mask, exclude_diag=True)
    assert torch.equal(torch.isneginf(out).cpu(), torch.isneginf(want))
    _close(out.double(), want, atol, rtol, "lse")
    up = torch.rand(45, generator=g, dtype=torch.float64)
    finite = torch.isfinite(want)
    (out.double().cpu()[finite] * up[finite]).sum().backward()
    (want[finite] * up[finite]).sum().backward()
    _close(xx.grad.double(), xr.grad, atol, rtol, "grad x")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_rows_give_neg_inf_and_zero_grad(backend, device):
    # Every label distinct: "same" keeps no pair once self-pairs are excluded.
    x = torch.randn(20, 16, dtype=torch.float32, device=device, requires_grad=True)
    labels = torch.arange(20, device=device)
    lse = masked_lse(x, None, labels, scale=2.0, mask="same", backend=backend)
    assert torch.isneginf(lse).all()
    lse.sum().backward()  # -inf is the true value; the gradient of the empty sum is 0
    assert torch.equal(x.grad, torch.zeros_like(x))
    # One label: "diff" keeps nothing. One sample: "all" keeps nothing (its only pair is itself).
    for mask, rows in (("diff", 20), ("all", 1)):
        xx = x.detach()[:rows].clone().requires_grad_(True)
        lse = masked_lse(xx, None, torch.zeros(rows, dtype=torch.long, device=device), scale=2.0,
                         mask=mask, backend=backend)
        assert torch.isneginf(lse).all(), mask
        lse.sum().backward()
        assert torch.equal(xx.grad, torch.zeros_like(xx)), mask
    # A separate y whose labels never meet row 0's: -inf there, finite elsewhere, no NaN gradient.
    xx = x.detach().clone().requires_grad_(True)
    y = torch.randn(7, 16, device=device, requires_grad=True)
    xl = torch.arange(20, device=device) % 3
    xl[0] = 9
    lse = masked_lse(xx, y, xl, torch.arange(7, device=device) % 3, mask="same", backend=backend)
    assert torch.isneginf(lse[0]) and torch.isfinite(lse[1:]).all()
    lse[1:].sum().backward()
    assert torch.equal(xx.grad[0], torch.zeros_like(xx.grad[0]))
    assert torch.isfinite(xx.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask", ["all", "same", "diff"])
def test_nan_propagates_like_reference(backend, device, mask):
    x = torch.randn(17, 8, dtype=torch.float32, device=device)
    x[3, 2] = float("nan")
    labels = torch.arange(17, device=device) % 3
    got = masked_lse(x, None, labels, mask=mask, backend=backend)
    want = reference.masked_lse(x, x, labels, labels, 1.0, mask, True)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    if mask == "all":
        assert torch.isnan(got).all()  # row 3 is NaN, and every other row sees x_3
    else:  # row 3, and the rows whose kept pairs include x_3
        assert torch.isnan(got).any() and not torch.isnan(got).all()
        finite = ~torch.isnan(want)
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(40, 64, dtype=torch.float32, device=device)
    x = base[:, ::2]  # stride 2 along D
    y = torch.randn(32, 29, dtype=torch.float32, device=device).t()  # (29, 32), column-major
    xl = torch.arange(40, device=device) % 4
    yl = torch.arange(29, device=device) % 4
    got = masked_lse(x, y, xl, yl, scale=1.5, mask="diff", backend=backend)
    want = reference.masked_lse(x, y, xl, yl, 1.5, "diff", False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask", ["all", "same", "diff"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_gradcheck_fp64(backend, device, mask):
    g = torch.Generator().manual_seed(0)
    # The Triton interpreter is slow: smaller inputs and gradcheck's random-projection mode.
    n, m = (13, 11) if backend == "cpp" else (7, 6)
    fast = backend == "triton" and device == "cpu"
    x = torch.randn(n, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    y = torch.randn(m, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    xl = torch.randint(0, 3, (n,), generator=g).to(device)
    yl = torch.randint(0, 3, (m,), generator=g).to(device)
    assert torch.autograd.gradcheck(
        lambda a, b: masked_lse(a, b, xl, yl, scale=0.7, mask=mask, backend=backend).nan_to_num(neginf=0.0),
        (x, y), fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda a: masked_lse(a, None, xl, scale=0.7, mask=mask, backend=backend).nan_to_num(neginf=0.0),
        (x,), fast_mode=fast)


def test_opcheck_cpp_cpu():
    """The engine op with the arguments masked_lse gives it (lse2 pass, params [scale, 0, scale,
    0, 0]; one label for every row for mask "all"): schema, fake tensor, autograd registration."""
    x = torch.randn(21, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    xl = torch.randint(0, 3, (21,))
    yl = torch.randint(0, 3, (17,))
    row_in = torch.zeros(21, 3, dtype=torch.float64)
    params = [1.3, 0.0, 1.3, 0.0, 0.0]
    op = torch.ops.dmlkern.pair_engine_forward.default
    torch.library.opcheck(op, (x, y, xl, yl, row_in, 1, 0, 0, params, False))
    torch.library.opcheck(op, (x, y, torch.zeros_like(xl), torch.zeros_like(yl), row_in, 1, 0, 0, params, False))
    torch.library.opcheck(op, (x, x, xl, xl, row_in, 1, 0, 0, params, True))


def test_runs_on_the_pair_engine_with_the_chosen_backend(monkeypatch):
    """backend= and DMLKERN_BACKEND pick the engine backend masked_lse calls; "reference" calls
    none (the materialising path)."""
    calls = []
    engine = MASKED_LSE_MODULE.engine_forward

    def spy(*args, **kwargs):
        calls.append((kwargs["backend"], kwargs["pass_kind"], tuple(kwargs["params"])))
        return engine(*args, **kwargs)

    monkeypatch.setattr(MASKED_LSE_MODULE, "engine_forward", spy)
    x = torch.randn(12, 5)
    lab = torch.arange(12) % 3
    want = reference.masked_lse(x, x, lab, lab, 2.0, "diff", True)

    def run(backend="auto"):
        calls.clear()
        got = masked_lse(x, None, lab, scale=2.0, mask="diff", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        return [c[0] for c in calls]

    monkeypatch.delenv("DMLKERN_BACKEND", raising=False)
    assert run() == ["cpp"]  # auto on CPU tensors
    assert calls == [("cpp", 1, tuple(EngineParams(2.0, 0.0, 2.0, 0.0, 0.0)))]
    assert run("reference") == []
    monkeypatch.setenv("DMLKERN_BACKEND", "reference")
    assert run() == []
    assert run("cpp") == ["cpp"]  # an explicit backend wins over the variable
    if interpret_mode() and not HAS_CUDA:
        monkeypatch.setenv("DMLKERN_BACKEND", "triton")
        assert run() == ["triton"]
    else:
        with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
            run("triton")
    monkeypatch.setenv("DMLKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="DMLKERN_BACKEND must be one of"):
        run()


@pytest.mark.parametrize("mask", ["all", "same", "diff"])
def test_torch_compile_fullgraph_cpp_cpu(mask):
    x = torch.randn(33, 12, requires_grad=True)
    labels = torch.randint(0, 4, (33,))

    def loss_fn(emb, lab):
        emb = torch.nn.functional.normalize(emb, dim=1)
        return masked_lse(emb, None, lab, scale=5.0, mask=mask, backend="cpp").mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, labels)
    got.backward()
    grad_compiled = x.grad.clone()
    x.grad = None
    want = loss_fn(x, labels)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_compiled, x.grad)


def test_bad_inputs_name_the_argument():
    x = torch.randn(8, 4)
    labels = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        masked_lse(torch.randn(8), None, labels, mask="same")
    with pytest.raises(ValueError, match="same width"):
        masked_lse(x, torch.randn(5, 3), labels, torch.zeros(5, dtype=torch.long), mask="same")
    with pytest.raises(ValueError, match="x_labels must be 1-D of length 8"):
        masked_lse(x, None, labels[:5], mask="same")
    with pytest.raises(TypeError, match="x_labels must be an integer"):
        masked_lse(x, None, labels.float(), mask="same")
    with pytest.raises(TypeError, match="same dtype"):
        masked_lse(x, torch.randn(5, 4, dtype=torch.float64), labels, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must be one of"):
        masked_lse(x, None, labels, mask="positives")
    with pytest.raises(ValueError, match="backend must be one of"):
        masked_lse(x, None, labels, backend="cuda-please")
    # The C++ engine op masked_lse runs on checks its own arguments too (libtorch callers).
    with pytest.raises(RuntimeError, match="x_labels must be 1-D of length N=8"):
        torch.ops.dmlkern.pair_engine_forward(x, x, labels[:3], labels, torch.zeros(8, 3), 1, 0, 0,
                                              [1.0, 0.0, 1.0, 0.0, 0.0], True)


@pytest.mark.slow
def test_memory_is_linear_in_n_cpp_cpu():
    """fwd+bwd at N=16384 must not allocate anything N x N (one fp32 N x N matrix is 1 GiB)."""
    script = textwrap.dedent("""
        import resource, torch
        from dmlkern.ops import masked_lse
        torch.manual_seed(0)
        n, d = 16384, 128
        x = torch.nn.functional.normalize(torch.randn(n, d), dim=1).requires_grad_(True)
        labels = torch.randint(0, n // 8, (n,))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lse = masked_lse(x, None, labels, scale=10.0, mask="diff", backend="cpp")
        lse.sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(lse).all() and torch.isfinite(x.grad).all()
        print((after - before) / 1024.0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
