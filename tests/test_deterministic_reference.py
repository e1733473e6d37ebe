"""The reference path's CPU products and softmax are bit-identical on repeat and at 1, 2 and 4
threads (fp32, fp64): DotProductSimilarity / CosineSimilarity through fixed_mm, LpDistance (p=2)
through fixed_cdist (torch.cdist's product form over fixed_mm), and `_determinism.softmax` (torch's
CPU softmax backward rounds by its thread split). So the reference losses the small-problem
shortcuts run are too; values and gradients stay torch's within rounding."""
import os
import subprocess
import sys

import pytest
import torch

from dmlkern import distances, losses, miners
from dmlkern._determinism import softmax
from dmlkern.ops import fixed_cdist, fixed_mm_op, fixed_softmax_op
from test_determinism import _assert_reproducible

needs_op = pytest.mark.skipif(not fixed_mm_op._OP_READY, reason="the dmlkern._C extension with fixed_mm is not built")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _value_and_grads(fn, inputs, up):
    xs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, up)]


# (N, M, D): torch's direct form (both sides <= 25 rows), its product form, odd sizes past a tile.
CDIST_SHAPES = [(7, 25, 5), (26, 3, 5), (100, 100, 128), (301, 203, 37)]


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CDIST_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fixed_cdist_matches_torch_cdist(shape, dtype):
    n, m, d = shape
    a, b, up = _rand(n, d, dtype=dtype, seed=1), _rand(m, d, dtype=dtype, seed=2), _rand(n, m, dtype=dtype, seed=3)
    got = _value_and_grads(fixed_cdist, (a, b), up)
    want = _value_and_grads(lambda x, y: torch.cdist(x, y, p=2), (a, b), up)
    for g, w in zip(got, want):
        if max(n, m) <= 25:
            assert torch.equal(g, w)  # torch.cdist itself there
        else:
            torch.testing.assert_close(g, w, **TOL[dtype])


@needs_op
def test_fixed_cdist_at_zero_distance():
    """Rows equal to a reference row (integer entries: every sum exact, the distance exactly 0):
    the gradient there is 0 as torch.cdist's (its subgradient), finite, the rest torch's."""
    a = torch.randint(-3, 4, (40, 6), generator=torch.Generator().manual_seed(5)).double()
    b = torch.cat([a[:10], a[5:15] + 1, a[:3]])
    up = _rand(40, 23, seed=6)
    got = _value_and_grads(fixed_cdist, (a, b), up)
    want = _value_and_grads(lambda x, y: torch.cdist(x, y, p=2), (a, b), up)
    assert (got[0] == 0).sum() >= 13
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@needs_op
def test_fixed_cdist_gradcheck_and_nan():
    a, b = _rand(30, 4, seed=7).requires_grad_(True), _rand(27, 4, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(fixed_cdist, (a, b))
    assert torch.autograd.gradgradcheck(fixed_cdist, (a, b))
    x = _rand(30, 4, seed=9)
    x[3, 1] = float("nan")
    assert torch.equal(fixed_cdist(x, x).isnan(), torch.cdist(x, x).isnan())


@needs_op
def test_fixed_cdist_ops():
    """opcheck of the two ops (schema, fake tensors, torch.compile's view of them), and the
    backward op's gradient against the create_graph path's (the same formula from torch ops)."""
    a, b = _rand(40, 9, seed=1), _rand(31, 9, seed=2)
    dist = torch.ops.dmlkern.fixed_cdist(a, b)
    torch.library.opcheck(torch.ops.dmlkern.fixed_cdist.default, (a, b))
    torch.library.opcheck(torch.ops.dmlkern.fixed_cdist_backward.default, (_rand(40, 31, seed=3), a, b, dist))
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    up = _rand(40, 31, seed=4)
    plain = torch.autograd.grad(fixed_cdist(a_, b_), (a_, b_), up)
    graph = torch.autograd.grad(fixed_cdist(a_, b_), (a_, b_), up, create_graph=True)
    for p, g in zip(plain, graph):
        assert torch.equal(p, g.detach())
    with pytest.raises(RuntimeError, match="grad and dist must be"):
        torch.ops.dmlkern.fixed_cdist_backward(up[:, :30], a, b, dist)


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(100, 100, 128), (301, 203, 37)], ids=lambda s: "x".join(map(str, s)))
def test_fixed_cdist_across_threads(shape, dtype):
    n, m, d = shape
    a, b, up = _rand(n, d, dtype=dtype, seed=1), _rand(m, d, dtype=dtype, seed=2), _rand(n, m, dtype=dtype, seed=3)
    _assert_reproducible(f"fixed_cdist {shape} {dtype}", lambda: _value_and_grads(fixed_cdist, (a, b), up))


# (shape, dim): torch's own backward differs between 1 and 2 threads at the fp32 100 x 100 and
# 256 x 1000 inputs here (on other inputs from 33 x 33).
# One long row: a backward that split a row's sum over threads would differ there.
SOFTMAX_CASES = [((33, 33), 1), ((100, 100), 1), ((256, 1000), 1), ((64, 100, 10), 2), ((20, 50, 7), 1),
                 ((1, 200003), 1), ((37, 5), 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-dim{c[1]}")
def test_softmax(case, dtype):
    shape, dim = case
    t, up = _rand(*shape, dtype=dtype, seed=4) * 3, _rand(*shape, dtype=dtype, seed=5)
    got = _value_and_grads(lambda x: softmax(x, dim), (t,), up)
    want = _value_and_grads(lambda x: torch.softmax(x, dim), (t,), up)
    if dim == len(shape) - 1:
        assert torch.equal(got[0], want[0])  # torch's forward
    else:  # torch's forward along the last dim (csrc/cpu/fixed_softmax_cpu.cpp): rounded otherwise
        torch.testing.assert_close(got[0], want[0], **TOL[dtype])
    torch.testing.assert_close(got[1], want[1], **TOL[dtype])
    _assert_reproducible(f"softmax {shape} {dtype}", lambda: _value_and_grads(lambda x: softmax(x, dim), (t,), up))


@pytest.mark.parametrize("case", [((9, 40), 1), ((4, 6, 5), 2), ((4, 6, 5), 0), ((3, 7), -1)], ids=str)
def test_softmax_double_backward(case):
    shape, dim = case
    t = _rand(*shape, seed=6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: softmax(x, dim), (t,))
    assert torch.autograd.gradgradcheck(lambda x: softmax(x, dim), (t,))


needs_softmax_op = pytest.mark.skipif(not fixed_softmax_op._OP_READY,
                                      reason="the dmlkern._C extension with fixed_softmax is not built")


@needs_softmax_op
def test_softmax_runs_the_op(monkeypatch):
    """CPU fp32 / fp64 take dmlkern::fixed_softmax (its C++ autograd node), other dtypes torch's."""
    t = _rand(5, 6).requires_grad_(True)
    assert type(softmax(t, 1).grad_fn).__name__ == "CppFunction"
    assert type(softmax(t.detach().float().requires_grad_(True), 1).grad_fn).__name__ == "CppFunction"
    assert type(softmax(t.detach().bfloat16().requires_grad_(True), 1).grad_fn).__name__ == "SoftmaxBackward0"


@needs_softmax_op
def test_softmax_op_edges():
    """Empty and NaN inputs as torch.softmax; opcheck; dtype and shape errors that name the argument."""
    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    softmax(empty, 1).sum().backward()
    assert empty.grad.shape == (0, 4)
    t = _rand(4, 5)
    t[1, 2] = float("nan")
    t.requires_grad_(True)
    up = _rand(4, 5, seed=1)
    got = _value_and_grads(lambda x: softmax(x, 1), (t.detach(),), up)
    want = _value_and_grads(lambda x: torch.softmax(x, 1), (t.detach(),), up)
    for g, w in zip(got, want):
        assert torch.equal(g.isnan(), w.isnan()) and g.isnan()[1].all() and not g.isnan()[0].any()
        torch.testing.assert_close(g.nan_to_num(), w.nan_to_num(), rtol=1e-12, atol=1e-12)
    for args in [(_rand(6, 9, dtype=torch.float32).requires_grad_(True), 1), (_rand(3, 6, 9).requires_grad_(True), -1)]:
        torch.library.opcheck(torch.ops.dmlkern.fixed_softmax.default, args)
    torch.library.opcheck(torch.ops.dmlkern.fixed_softmax_backward.default, (_rand(6, 9).softmax(1), _rand(6, 9), 1))
    with pytest.raises(RuntimeError, match="float32 or float64 t, got Long"):
        torch.ops.dmlkern.fixed_softmax(torch.ones(3, 4, dtype=torch.int64), 1)
    with pytest.raises(RuntimeError, match="grad must have y's shape"):
        torch.ops.dmlkern.fixed_softmax_backward(_rand(3, 4), _rand(3, 5), 1)


DISTANCES = {
    "lp": lambda: distances.LpDistance(),
    "lp_squared_raw": lambda: distances.LpDistance(normalize_embeddings=False, power=2),
    "dot_raw": lambda: distances.DotProductSimilarity(normalize_embeddings=False),
    "cosine": lambda: distances.CosineSimilarity(),
}


def _torch_mat(name, q, r):
    """The matrix from torch's own ops (what PML's distances compute)."""
    dist = DISTANCES[name]()
    qn, rn = dist.maybe_normalize(q), dist.maybe_normalize(r)
    mat = torch.cdist(qn, rn, p=2) if name.startswith("lp") else qn @ rn.T
    return mat ** dist.power


@needs_op
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DISTANCES))
def test_distances(name, dtype):
    q, r, up = _rand(127, 64, dtype=dtype, seed=1), _rand(90, 64, dtype=dtype, seed=2), _rand(127, 90, dtype=dtype, seed=3)
    dist = DISTANCES[name]()
    got = _value_and_grads(dist, (q, r), up)
    want = _value_and_grads(lambda a, b: _torch_mat(name, a, b), (q, r), up)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[dtype])
    _assert_reproducible(f"{name} {dtype}", lambda: _value_and_grads(dist, (q, r), up))
    # torch.func.vmap over a batch of queries: torch's ops there (the op has no batching rule)
    batched = torch.func.vmap(lambda a: dist(a, r))(q.view(127, 1, 64))
    torch.testing.assert_close(batched.view(127, 90), got[0], **TOL[dtype])


@pytest.mark.parametrize("name", list(DISTANCES))
def test_distances_under_cpu_autocast(name):
    """Under CPU autocast torch's ops run, as in PML: its bf16 matmul (cdist stays fp32)."""
    from pytorch_metric_learning import distances as pml_distances

    q = _rand(40, 16, dtype=torch.float32, seed=1)
    kwargs = {"lp": {}, "lp_squared_raw": dict(normalize_embeddings=False, power=2),
              "dot_raw": dict(normalize_embeddings=False), "cosine": {}}[name]
    theirs = getattr(pml_distances, type(DISTANCES[name]()).__name__)(**kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = DISTANCES[name]()(q), theirs(q)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want)


def test_distances_under_forward_mode_ad():
    """Dual tensors (torch.autograd.forward_ad): torch's ops, whose tangents PML's users get (the
    dot-product distances; torch.cdist's product form has no forward AD in torch itself)."""
    import torch.autograd.forward_ad as fwAD

    q, r, tq = _rand(30, 6, seed=1), _rand(28, 6, seed=2), _rand(30, 6, seed=3)
    for name in ("dot_raw", "cosine"):
        with fwAD.dual_level():
            out = DISTANCES[name]()(fwAD.make_dual(q, tq), r)
            tangent = fwAD.unpack_dual(out).tangent
        assert tangent is not None, name
        _, want = torch.func.jvp(lambda a: _torch_mat(name, a, r), (q,), (tq,))
        torch.testing.assert_close(tangent, want, rtol=1e-12, atol=1e-12)


CLASS_LOSSES = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss",
                 "ProxyNCALoss", "SubCenterArcFaceLoss", "SoftTripleLoss", "SoftmaxLoss"]
PAIR_LOSSES = {  # the pair losses the small-problem shortcut runs on the reference, and NCA
    "SupConLoss": lambda: (losses.SupConLoss(), None),
    "NPairsLoss": lambda: (losses.NPairsLoss(), None),
    "NCALoss": lambda: (losses.NCALoss(), None),
    "ContrastiveLoss+PairMarginMiner": lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner()),
    "TripletMarginLoss+BatchHardMiner": lambda: (losses.TripletMarginLoss(), miners.BatchHardMiner()),
    "TripletMarginLoss+TripletMarginMiner": lambda: (losses.TripletMarginLoss(), miners.TripletMarginMiner()),
    "TripletMarginLoss(triplets_per_anchor=3)": lambda: (losses.TripletMarginLoss(triplets_per_anchor=3), None),
}
# (N, classes, D): below the pair shortcut's 128 x 128 pairs; class logits up to 2^18 (N x C).
PAIR_SIZES = [(100, 10, 128), (127, 30, 37)]
CLASS_SIZES = [(100, 100, 128), (127, 30, 37), (256, 1000, 64)]
REFERENCE_CASES = ([(name, size) for name in CLASS_LOSSES for size in CLASS_SIZES]
                   + [(name, size) for name in PAIR_LOSSES for size in PAIR_SIZES])


@needs_op
@pytest.mark.parametrize("name,size", REFERENCE_CASES, ids=lambda v: v if isinstance(v, str) else "n%d_c%d_d%d" % v)
def test_reference_losses_across_threads(name, size):
    n, classes, d = size
    g = torch.Generator().manual_seed(n)
    x, labels = torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(0)
    if name in CLASS_LOSSES:
        loss_fn, miner = getattr(losses, name)(num_classes=classes, embedding_size=d), None
    else:
        loss_fn, miner = PAIR_LOSSES[name]()
    loss_fn.backend = "reference"

    def call():
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # triplets_per_anchor's random triplets
        value = loss_fn(xx, labels, None if miner is None else miner(xx, labels))
        assert loss_fn.last_backend == "reference", loss_fn.last_backend
        return [value.detach(), *torch.autograd.grad(value, [xx, *loss_fn.parameters()])]

    _assert_reproducible(f"{name} {size}", call)


@needs_op
def test_on_mkl_avx2_code_path():
    """The tests above on MKL's AVX2 code path (AMD CPUs'; tests/test_determinism.py)."""
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2", DMLKERN_TRITON_OPS="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
           "across_threads and (n100 or 301x203) or test_softmax"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
