"""The host-side work of a fused loss call (docs/ENGINE.md, "Host overhead"): eager calls run
the kernels through a plain autograd.Function that gives exactly the registered op's numbers,
and on CUDA's branch-free path the first engine kernel is launched before the label
statistics and the other small ops."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from dmlkern.bench.host_overhead import OpCounter
from dmlkern.bench.worker import build
from dmlkern.fused import _common
from dmlkern.ops import pair_engine as pe
from _kernel_cases import KERNEL_BACKENDS

PARAMS = [-2.0, 1.0, 5.0, -2.5, 0.1]


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["two-sided", "y-is-x"])
@pytest.mark.parametrize("pass_kind", [pe.PASS_LSE2, pe.PASS_POS_SOFTPLUS])
def test_direct_path_matches_the_registered_op(backend, device, symmetric, pass_kind, monkeypatch):
    if backend not in pe.available_backends():
        pytest.fail(f"the {backend} pair engine is not registered in this build")
    x = _unit(37, 19, 0).to(device)
    y = _unit(70, 19, 1).to(device)
    g = torch.Generator().manual_seed(2)
    xl = torch.randint(0, 4, (37,), generator=g).to(device)
    yl = torch.randint(0, 4, (70,), generator=g).to(device)
    row_in = torch.randn(37, 3, generator=g).to(device)
    weights = torch.rand(37, 2, generator=g).to(device)

    def run():
        xx = x.clone().requires_grad_(True)
        yy = xx if symmetric else y.clone().requires_grad_(True)
        out = pe.engine_forward(xx, yy, xl, xl if symmetric else yl, row_in, pass_kind=pass_kind, params=PARAMS,
                                exclude_diag=symmetric, backend=backend)
        (out[:, :2].nan_to_num(neginf=0.0) * weights).sum().backward()
        return type(out.grad_fn).__name__, out.detach(), xx.grad, None if symmetric else yy.grad

    direct = run()
    monkeypatch.setattr(pe, "_direct_call_ok", lambda *tensors: False)
    registered = run()
    assert "Direct" in direct[0] and "Direct" not in registered[0], (direct[0], registered[0])
    for got, want in zip(direct[1:], registered[1:]):
        if want is None:
            assert got is None
        else:  # the same kernels on the same coefficients: bit for bit
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_direct_path_only_for_plain_eager_tensors():
    x = torch.randn(4, 3)
    assert pe._direct_call_ok(x, x)
    with OpCounter():  # a dispatch mode (as opcheck and make_fx use) sees the registered op
        assert not pe._direct_call_ok(x, x)
    with FakeTensorMode():
        fake = torch.randn(4, 3)
    assert not pe._direct_call_ok(fake, fake)


# The fused losses whose kernels the benchmark times, and the most ops each may issue before
# its first engine kernel: normalising the rows (3), row_in (1), and NT-Xent and Lifted's sort
# by label (their gathers), ProxyAnchor's two normalisations and its labels' range check
# (aminmax and one read, as PML's F.one_hot), the Euclidean losses' check for rows shorter than
# 1e-12 (a norm, a comparison, any, one read), the miner's snapshot of its inputs (two copies) and its
# pairs' placeholders (one empty allocation). The label statistics come later.
OPS_BEFORE_FIRST_KERNEL = {"multi_similarity": 4, "multi_similarity_miner": 7, "generalized_lifted": 8,
                           "supcon": 4, "ntxent": 6, "lifted": 10, "proxy_anchor": 10, "masked_lse": 1}


@pytest.mark.parametrize("loss", sorted(OPS_BEFORE_FIRST_KERNEL))
def test_first_engine_kernel_comes_before_the_small_ops(loss, monkeypatch):
    if "cpp" not in pe.available_backends():
        pytest.fail("the C++ pair engine is not registered in this build")
    monkeypatch.setenv("DMLKERN_BACKEND", "cpp")
    monkeypatch.setattr(_common, "branch_free", lambda like: True)  # as for CUDA tensors
    spec = {"loss": loss, "provider": "dmlkern", "n": 48, "d": 16, "dtype": "fp32", "seed": 0}
    fn, backend, x, _ = build(spec, torch, torch.device("cpu"))
    with OpCounter() as counter:
        fn().backward()
    assert backend() == "cpp", backend()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert counter.before is not None, "no engine op ran"
    assert counter.before <= OPS_BEFORE_FIRST_KERNEL[loss], (counter.before, counter.ops)


def test_host_overhead_report(capsys):
    if "cpp" not in pe.available_backends():
        pytest.fail("the C++ pair engine is not registered in this build")
    from dmlkern.bench import host_overhead

    saved = _common.branch_free
    host_overhead.main(["--losses", "multi_similarity,ntxent", "--n", "16", "--d", "8", "--reps", "2", "--detail"])
    assert _common.branch_free is saved  # the CPU path is restored for whatever runs next
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]
            if line and not line.startswith(" ")}
    assert set(rows) == {"multi_similarity", "ntxent"}, rows
    for name, (_, backend, ops, before, views, host_us) in rows.items():
        assert backend == "cpp" and int(ops) > int(before) >= 1 and float(host_us) > 0, (name, rows[name])


def test_small_batches_report(capsys, monkeypatch):
    """python -m dmlkern.bench.small_batches: at the default thresholds (the suite runs with 0,
    conftest.py) an N=16 call runs the reference, the 'fused' column the fused path; the rules'
    thresholds are back in place afterwards."""
    from dmlkern.bench import small_batches
    from dmlkern.fused import class_softmax

    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", _common.DEFAULT_SMALL_PROBLEM_PAIRS)
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_LOGITS", class_softmax.DEFAULT_SMALL_PROBLEM_LOGITS)
    small_batches.main(["--losses", "supcon,arcface", "--n", "16", "--d", "8", "--classes", "10", "--reps", "1",
                        "--rounds", "1"])
    assert _common.SMALL_PROBLEM_PAIRS == _common.DEFAULT_SMALL_PROBLEM_PAIRS
    assert class_softmax.SMALL_PROBLEM_LOGITS == class_softmax.DEFAULT_SMALL_PROBLEM_LOGITS
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    rows = {cells[0].strip(): [c.strip() for c in cells] for cells in rows[2:]}  # (after the header and its rule)
    assert set(rows) == {"supcon", "arcface"}, rows
    for name, (_, n, pml, ours, ran, fused, fused_ran, over_pml, over_fused) in rows.items():
        assert n == "16" and ran == "reference" and fused_ran in ("cpp", "blocked"), rows[name]
        assert min(float(pml), float(ours), float(fused)) > 0
        assert float(over_pml) == pytest.approx(float(ours) / float(pml), abs=0.02), rows[name]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unit_rows_is_f_normalize_with_a_shorter_backward(dtype, monkeypatch):
    """_common.unit_rows: F.normalize's forward ops; its backward the op unit_rows_backward on CPU
    fp32 / fp64 (torch ops otherwise), as F.normalize's gradient, also for zero, sub-eps and NaN rows."""
    from dmlkern.ops import unit_rows_op

    kernel_calls = []
    if unit_rows_op._OP_READY:
        real = unit_rows_op.unit_rows_backward
        monkeypatch.setattr(unit_rows_op, "unit_rows_backward", lambda *a: kernel_calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64)
    x[2] = 0.0  # a zero row: 0 / eps
    x[3] *= 1e-14  # below eps: the clamp is active, gradient g / eps
    x[5, 1] = float("nan")  # NaN propagates
    x = x.to(dtype)
    grad = torch.randn(9, 6, generator=g, dtype=torch.float64).to(dtype)
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours = _common.unit_rows(ours)
    y_theirs = torch.nn.functional.normalize(theirs, dim=1)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=0, equal_nan=True)  # the same forward ops
    (y_ours * grad).sum().backward()
    (y_theirs * grad).sum().backward()
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=tol, atol=tol, equal_nan=True)
    assert len(kernel_calls) == (1 if unit_rows_op._OP_READY and dtype != torch.bfloat16 else 0)
    if dtype == torch.float64:
        rows = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_common.unit_rows, (rows,))
