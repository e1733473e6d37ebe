"""The masked row log-sum-exp op on every backend against the materialising reference."""
import subprocess
import sys
import textwrap

import pytest
import torch

from dmlkern import reference
from dmlkern.ops import masked_lse
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES, dtypes_for

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
    g = torch.Generator().manual_seed(7)
    up = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.device)
    finite = torch.isfinite(out)
    (out.double()[finite] * up[finite]).sum().backward()
    return out.double(), x.grad.double(), None if y_ is None else y_.grad.double()


def _close(a, b, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(str(v) for v in s))
@pytest.mark.parametrize("mask", ["all", "same", "diff"])
def test_matches_reference(backend, device, shape, mask):
    for dtype in dtypes_for(backend, device):
        x, y, xl, yl = _inputs(*shape, dtype, device, seed=hash((shape, mask)) % 1000)
        scale = 3.0
        got = _run(x, y, xl, yl, mask, scale, backend)
        want = _run(x, y, xl, yl, mask, scale, "reference")
        # Same -inf pattern (empty rows), finite values equal, gradients equal (0 on empty rows).
        assert torch.equal(torch.isneginf(got[0]).cpu(), torch.isneginf(want[0]).cpu())
        _close(got[0], want[0], dtype, f"lse {dtype}")
        _close(got[1], want[1], dtype, f"grad x {dtype}")
        if y is not None:
            _close(got[2], want[2], dtype, f"grad y {dtype}")
        assert not torch.isnan(got[1]).any()


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_empty_rows_give_neg_inf_and_zero_grad(backend, device):
    # Every label distinct: "same" keeps no pair once self-pairs are excluded.
    x = torch.randn(20, 16, dtype=torch.float32, device=device, requires_grad=True)
    labels = torch.arange(20, device=device)
    lse = masked_lse(x, None, labels, scale=2.0, mask="same", backend=backend)
    assert torch.isneginf(lse).all()
    lse.sum().backward()  # -inf is the true value; the gradient of the empty sum is 0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nan_propagates_like_reference(backend, device):
    x = torch.randn(17, 8, dtype=torch.float32, device=device)
    x[3, 2] = float("nan")
    labels = torch.arange(17, device=device) % 3
    got = masked_lse(x, None, labels, mask="all", backend=backend)
    want = reference.masked_lse(x, x, labels, labels, 1.0, "all", True)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got).all()  # row 3 is NaN, and every other row sees x_3


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


def test_gradcheck_fp64_cpp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    xl = torch.randint(0, 3, (13,), generator=g)
    yl = torch.randint(0, 3, (11,), generator=g)
    for mask in ("all", "same", "diff"):
        assert torch.autograd.gradcheck(
            lambda a, b: masked_lse(a, b, xl, yl, scale=0.7, mask=mask, backend="cpp").nan_to_num(neginf=0.0),
            (x, y))
        assert torch.autograd.gradcheck(
            lambda a: masked_lse(a, None, xl, scale=0.7, mask=mask, backend="cpp").nan_to_num(neginf=0.0),
            (x,))


def test_opcheck_cpp_cpu():
    x = torch.randn(21, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    xl = torch.randint(0, 3, (21,))
    yl = torch.randint(0, 3, (17,))
    for mode in (0, 1, 2):
        torch.library.opcheck(torch.ops.dmlkern.masked_lse.default, (x, y, xl, yl, 1.3, mode, False))
    torch.library.opcheck(torch.ops.dmlkern.masked_lse.default, (x, x, xl, xl, 1.3, 2, True))


def test_torch_compile_fullgraph_cpp_cpu():
    x = torch.randn(33, 12, requires_grad=True)
    labels = torch.randint(0, 4, (33,))

    def loss_fn(emb, lab):
        emb = torch.nn.functional.normalize(emb, dim=1)
        return masked_lse(emb, None, lab, scale=5.0, mask="diff", backend="cpp").mean()

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
    # The C++ op checks its own arguments too (callers may bypass the Python wrapper).
    import dmlkern.ops.masked_lse  # noqa: F401  (loads the extension)
    with pytest.raises(RuntimeError, match="x_labels must be 1-D of length N=8"):
        torch.ops.dmlkern.masked_lse(x, x, labels[:3], labels, 1.0, 1, True)


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
