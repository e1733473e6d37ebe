"""The ops dmlkern::unit_rows / unit_rows_backward (csrc/cpu/unit_rows_cpu.cpp): a block of
weight rows normalised and that normalisation's backward, against torch's formulas in fp64
(values, gradients through autograd), in row-major, column-major (a block of PML's (D, C) W) and
other strided layouts, in place, with zero and NaN rows, at 1 and 2 threads; and the class-weight
losses that call them, against the torch ops they replace."""
import pytest
import torch

from dmlkern.fused import class_softmax as cs
from dmlkern.ops import unit_rows_op

EPS = 1e-12  # F.normalize's, as the class losses use
TOL = {torch.float32: dict(atol=2e-7, rtol=2e-6), torch.float64: dict(atol=1e-15, rtol=1e-13)}

pytestmark = pytest.mark.skipif(not unit_rows_op._OP_READY, reason="needs the built extension (dmlkern._C)")


def _torch_unit(rows):
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(EPS)


def _layouts(r, d, dtype, seed):
    """{name: (R, D) rows} of the same values in several layouts."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(r, d, generator=g, dtype=dtype)
    wide = torch.randn(d, r + 37, generator=g, dtype=dtype)  # PML's (D, C) W, a column block of it
    wide[:, 5:5 + r] = base.t()
    spaced = torch.randn(2 * r, d + 3, generator=g, dtype=dtype)
    spaced[::2, 1:d + 1] = base
    return {"rows": base.clone(), "columns": wide[:, 5:5 + r].t(), "strided": spaced[::2, 1:d + 1]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r, d", [(1, 1), (3, 7), (1500, 128), (257, 33)])
def test_unit_rows_matches_torch(dtype, r, d):
    """Values and norms against torch's in fp64, one zero row and one NaN row among them (the NaN
    stays in its row), every layout, written into a fresh tensor and in place."""
    for name, rows in _layouts(r, d, dtype, seed=r * 31 + d).items():
        if r >= 3:
            rows[1] = 0
            rows[2, 0] = float("nan")
        want = _torch_unit(rows.double())
        want_norm = torch.linalg.vector_norm(rows.double(), dim=1, keepdim=True)
        out = torch.empty_like(rows)
        norm = unit_rows_op.unit_rows(rows, EPS, out)
        assert norm.shape == (r, 1) and norm.dtype == dtype
        torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[dtype], msg=name)
        torch.testing.assert_close(norm.double(), want_norm, equal_nan=True, **TOL[dtype], msg=name)
        if r >= 3:
            assert torch.isnan(out[2]).all() and not torch.isnan(out[torch.arange(r) != 2]).any()
            assert (out[1] == 0).all()
        in_place = rows.clone() if name == "rows" else rows.t().contiguous().t()  # (column-major)
        unit_rows_op.unit_rows(in_place, EPS, in_place)
        torch.testing.assert_close(in_place, out, equal_nan=True, rtol=0, atol=0, msg=f"{name} in place")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("r, d", [(1, 1), (3, 7), (1500, 128), (257, 33)])
def test_unit_rows_backward_is_the_autograd_gradient(dtype, r, d):
    """The backward against autograd through torch's rows / max(|row|, eps) in fp64 (a zero row's
    gradient is grad / eps, the clamp's), every layout, into out and in place into grad."""
    g = torch.Generator().manual_seed(7 * r + d)
    for name, rows in _layouts(r, d, dtype, seed=r + d).items():
        if r >= 3:
            rows[1] = 0
        upstream = torch.randn(r, d, generator=g, dtype=dtype)
        leaf = rows.double().requires_grad_()
        _torch_unit(leaf).backward(upstream.double())
        y = torch.empty_like(rows)
        norm = unit_rows_op.unit_rows(rows, EPS, y)
        out = torch.empty_like(rows)
        unit_rows_op.unit_rows_backward(upstream, y, norm, EPS, out)
        atol = TOL[dtype]["atol"] / EPS if r >= 3 else TOL[dtype]["atol"]  # the zero row's grad / eps
        torch.testing.assert_close(out.double(), leaf.grad, atol=atol, rtol=TOL[dtype]["rtol"] * 10, msg=name)
        grad = upstream.clone()
        unit_rows_op.unit_rows_backward(grad, y, norm, EPS, grad)
        assert torch.equal(grad, out), f"{name}: in place"


@pytest.mark.parametrize("layout", ["columns", "rows"])
def test_unit_rows_bits_do_not_depend_on_the_thread_count(layout):
    """Rows past the ops' parallel grain (1024 rows in W's column-major layout, 512 of 64 in a
    row-major batch), 5003 of them (not a multiple of the row-major sweep's 8): the same bits at 1
    and 2 threads, forward and backward, and the same bits in either layout."""
    rows = _layouts(5003, 64, torch.float32, seed=3)[layout]
    grad = torch.randn(5003, 64, generator=torch.Generator().manual_seed(4))
    results = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            y = torch.empty_like(rows)
            norm = unit_rows_op.unit_rows(rows, EPS, y)
            gx = unit_rows_op.unit_rows_backward(grad, y, norm, EPS, torch.empty_like(grad))
            results.append((y, norm, gx))
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    other = _layouts(5003, 64, torch.float32, seed=3)["columns" if layout == "rows" else "rows"]
    y = torch.empty_like(other)
    norm = unit_rows_op.unit_rows(other, EPS, y)
    assert torch.equal(y, results[0][0]) and torch.equal(norm, results[0][1])
    assert torch.equal(unit_rows_op.unit_rows_backward(grad, y, norm, EPS, torch.empty_like(grad)), results[0][2])


def test_unit_rows_rejects_bad_arguments():
    rows = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        unit_rows_op.unit_rows(rows.to(torch.int32), EPS, rows.to(torch.int32))
    with pytest.raises(RuntimeError, match="2-D"):
        unit_rows_op.unit_rows(rows[0], EPS, rows[0])
    with pytest.raises(RuntimeError, match="out must have rows' shape"):
        unit_rows_op.unit_rows(rows, EPS, torch.empty(4, 2))
    with pytest.raises(RuntimeError, match="y must have grad's shape"):
        unit_rows_op.unit_rows_backward(rows, torch.empty(3, 3), torch.ones(4, 1), EPS, rows.clone())
    with pytest.raises(RuntimeError, match="norms must hold one value per row"):
        unit_rows_op.unit_rows_backward(rows, rows, torch.ones(3, 1), EPS, rows.clone())


def test_unit_rows_opcheck():
    rows = _layouts(9, 5, torch.float32, seed=1)["columns"]
    torch.library.opcheck(torch.ops.dmlkern.unit_rows.default, (rows, EPS, torch.empty_like(rows)))
    y = torch.empty(9, 5)
    norm = unit_rows_op.unit_rows(rows, EPS, y)
    torch.library.opcheck(torch.ops.dmlkern.unit_rows_backward.default,
                          (torch.randn(9, 5), y, norm, EPS, torch.empty(9, 5)))


def test_runs_kernel_only_without_a_graph():
    rows = torch.randn(6, 4)
    assert unit_rows_op.runs_kernel(rows)
    assert not unit_rows_op.runs_kernel(rows.to(torch.bfloat16))
    leaf = rows.clone().requires_grad_()
    assert not unit_rows_op.runs_kernel(leaf)
    with torch.no_grad():
        assert unit_rows_op.runs_kernel(leaf)
    # under a graph the class path's helpers keep torch's differentiable ops
    y, norm = cs.unit_and_norm(leaf)
    assert y.grad_fn is not None


@pytest.mark.parametrize("loss_name", ["ArcFaceLoss", "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_class_losses_through_the_ops_match_the_torch_ops(monkeypatch, loss_name, dtype):
    """A class-weight loss over several blocks of weight rows (PML's (D, C) W: column-major
    blocks), with the ops (counted: each block calls both) and with the torch ops they replace:
    the same values and gradients up to rounding."""
    import dmlkern.losses as L

    monkeypatch.setattr(cs, "BLOCK_BYTES", 1)
    monkeypatch.setattr(cs, "MIN_BLOCK", 64)  # blocks of 64 classes: 5 blocks
    g = torch.Generator().manual_seed(11)
    n, c, d = 37, 300, 24
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    loss = getattr(L, loss_name)(num_classes=c, embedding_size=d).to(dtype)
    calls = {"unit_rows": 0, "unit_rows_backward": 0}

    def counted(name):
        real = getattr(unit_rows_op, name)

        def call(*args):
            calls[name] += 1
            return real(*args)
        return call

    results = {}
    for use_ops in (True, False):
        with monkeypatch.context() as m:
            if use_ops:
                for name in calls:
                    m.setattr(unit_rows_op, name, counted(name))
            else:
                m.setattr(unit_rows_op, "runs_kernel", lambda *t: False)
            xx = x.clone().requires_grad_()
            loss.zero_grad()
            value = loss(xx, labels)
            value.backward()
            results[use_ops] = (value.detach(), xx.grad, next(loss.parameters()).grad.clone())
    assert calls["unit_rows"] >= 10 and calls["unit_rows_backward"] >= 5, calls
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
                                            else {"atol": 1e-12, "rtol": 1e-12}))
