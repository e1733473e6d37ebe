"""Every fused loss on the C++ CPU engine gives bit-identical values and gradients on repeated
calls and at 1, 2 and 4 torch threads: fp32 and fp64, with and without ref_emb, one row block
(< 128 rows, where at::parallel_for runs inline and BLAS would otherwise pick its own threads)
and several with odd sizes. Also the sizes past torch's CPU grain size (32768 elements) where
torch splits sums, index backward and some elementwise ops by the thread count."""
import pytest
import torch

from dmlkern import losses, miners
from dmlkern._determinism import fixed_order_mean, fixed_order_sum, logaddexp
from dmlkern.reducers import SumReducer
from test_fused_losses import LOSSES, NO_REF_EMB

THREADS = (1, 2, 4)
REPEATS = 2
DTYPES = [torch.float32, torch.float64]
# (N, D, classes, M): one row block; several blocks, odd sizes. N-pairs' anchors (one per class)
# are one block in both.
SIZES = {"one_block": (61, 24, 20, 47), "odd_blocks": (301, 37, 60, 203)}


def _results(name, loss_fn, x, labels, ref, ref_labels):
    """[value, gradients of x, ref and the loss's parameters] of one fused call."""
    x = x.detach().clone().requires_grad_(True)
    ref = None if ref is None else ref.detach().clone().requires_grad_(True)
    mined = None
    if name == "multi_similarity_miner":
        mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, ref, ref_labels)
    value = loss_fn(x, labels, mined, ref, ref_labels)
    assert loss_fn.last_backend == "cpp", f"{name}: ran {loss_fn.last_backend}"
    wrt = [x] + ([ref] if ref is not None else []) + list(loss_fn.parameters())
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return [value.detach()] + [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _assert_reproducible(what, call):
    """call() at each thread count, REPEATS times: every result equal to the first, bit for bit."""
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in THREADS:
            torch.set_num_threads(t)
            runs += [(t, call()) for _ in range(REPEATS)]
    finally:
        torch.set_num_threads(threads)
    first = runs[0][1]
    for t, got in runs[1:]:
        for i, (a, b) in enumerate(zip(got, first)):
            part = "value" if i == 0 else f"gradient {i}"
            assert torch.equal(a, b), (f"{what}: {part} at {t} threads differs from the first run "
                                       f"(1 thread), max |diff| {(a - b).abs().max().item():.3g}")


def _inputs(size, dtype, seed=5):
    n, d, classes, m = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref = torch.randn(m, d, generator=g, dtype=dtype)
    ref_labels = torch.randint(0, classes, (m,), generator=g)
    return x, labels, ref, ref_labels


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fused_loss_bit_reproducible(name, dtype, size):
    x, labels, ref, ref_labels = _inputs(size, dtype)
    torch.manual_seed(0)
    loss_fn = LOSSES[name](SIZES[size][2], x.shape[1]).to(dtype)
    for with_ref in [False] + ([] if name in NO_REF_EMB else [True]):
        r, rl = (ref, ref_labels) if with_ref else (None, None)
        _assert_reproducible(f"{name} {dtype} {size} ref_emb={with_ref}",
                             lambda: _results(name, loss_fn, x, labels, r, rl))


def test_npairs_one_row_block():
    """The AMD EPYC break: N-pairs' ~60 anchors are one row block, so at::parallel_for ran the
    engine inline and MKL threaded the tile products itself (its split depends on the thread
    count). fp64 as in the failing run, and fp32."""
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(41)
        x = torch.randn(37, 261, generator=g, dtype=dtype).T  # non-contiguous, as the original test
        labels = torch.randint(0, 60, (261,), generator=g)
        loss_fn = losses.NPairsLoss()
        _assert_reproducible(f"npairs {dtype}", lambda: _results("npairs", loss_fn, x, labels, None, None))


def test_supcon_many_samples_per_class_fp32():
    """The gather of per-class sums back to 600 rows (200 per class): its backward summed the
    rows of a class with parallel atomic adds (index_put_ accumulate, fp32)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(600, 64, generator=g)
    labels = torch.randint(0, 3, (600,), generator=g)
    loss_fn = losses.SupConLoss(temperature=0.1)
    _assert_reproducible("supcon fp32", lambda: _results("supcon", loss_fn, x, labels, None, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_epilogues(dtype):
    """Past torch's grain size: ProxyAnchor with 40000 classes (its per-proxy softplus and the
    DivisorReducer's sum over 40000 entries), Lifted Structure with a reducer that needs the
    64512 positive pairs listed (their gathers, logaddexp and the SumReducer's sum)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, 40000, (64,), generator=g)
    torch.manual_seed(0)
    proxy = losses.ProxyAnchorLoss(40000, 16).to(dtype)
    _assert_reproducible(f"proxy_anchor 40000 classes {dtype}",
                         lambda: _results("proxy_anchor", proxy, x, labels, None, None))
    x = torch.randn(1024, 16, generator=g, dtype=dtype)
    labels = torch.arange(1024) % 16  # 64 per class: 63 pairs per row, 64512 in all
    lifted = losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.1, reducer=SumReducer())
    _assert_reproducible(f"lifted pair list {dtype}", lambda: _results("lifted", lifted, x, labels, None, None))


CLASS_LOSSES = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss", "NormalizedSoftmaxLoss",
                 "ProxyNCALoss", "SoftmaxLoss", "SubCenterArcFaceLoss", "SoftTripleLoss"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", CLASS_LOSSES)
def test_class_loss_bit_reproducible(monkeypatch, name, dtype):
    """The class path (fused/class_softmax.py) over 5 column blocks of 1000 classes: x's gradient
    summed over the blocks, the weights' written per block, the target rows' added in place."""
    import dmlkern.fused.class_softmax as class_softmax

    monkeypatch.setattr(class_softmax, "BLOCK_BYTES", 1)
    monkeypatch.setattr(class_softmax, "MIN_BLOCK", 1000)
    g = torch.Generator().manual_seed(17)
    x = torch.randn(301, 37, generator=g, dtype=dtype)
    labels = torch.randint(0, 4999, (301,), generator=g)
    torch.manual_seed(0)
    loss_fn = getattr(losses, name)(num_classes=4999, embedding_size=37).to(dtype)
    _assert_reproducible(f"{name} {dtype}", lambda: _results(name, loss_fn, x, labels, None, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fixed_order_helpers(dtype):
    """fixed_order_sum / _mean and logaddexp: bit-identical at each thread count past the grain
    size, within rounding of torch's ops, and logaddexp's special values."""
    g = torch.Generator().manual_seed(11)
    for n in (4096, 4097, 40001, 200003):
        v = torch.randn(n, generator=g, dtype=dtype)
        w = torch.randn(n, generator=g, dtype=dtype) * 5
        w[::7] = -float("inf")

        def call():
            a, b = v.clone().requires_grad_(True), w.clone().requires_grad_(True)
            out = [fixed_order_sum(a * 3), fixed_order_mean(b[1::7]), logaddexp(a, b)]
            return [o.detach() for o in out] + list(torch.autograd.grad(out[0] + out[2].sum(), (a, b)))

        _assert_reproducible(f"helpers {dtype} n={n}", call)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fixed_order_sum(v), v.sum(), **tol)
        torch.testing.assert_close(fixed_order_mean(v), v.mean(), **tol)
        torch.testing.assert_close(logaddexp(v, w), torch.logaddexp(v, w), **tol)
    inf, nan = float("inf"), float("nan")
    a = torch.tensor([-inf, -inf, inf, 0.0, nan], dtype=dtype, requires_grad=True)
    b = torch.tensor([-inf, 0.0, inf, 0.0, 1.0], dtype=dtype)
    out = logaddexp(a, b)
    torch.testing.assert_close(out, torch.logaddexp(a, b), equal_nan=True)
    (grad,) = torch.autograd.grad(out[1:4].sum(), a)
    assert grad[1].item() == 0.0 and grad[3].item() == 0.5  # an empty set's 0; a tie's half


def test_on_mkl_avx2_code_path():
    """The AMD EPYC case emulated on any x86 CPU: on MKL's AVX2 code path (what it runs on AMD
    CPUs) a product's bits depend on MKL's thread count, which was torch's inside and outside
    at::parallel_for (every loss here failed at 2 threads before the engine pinned its products
    to one BLAS thread; on the AVX-512 path only the gemv of the miner's rule did). (Without MKL
    the variable is ignored.)"""
    import os
    import subprocess
    import sys

    # (CPU tests only: DMLKERN_TRITON_OPS=0 spares the process the Triton ops' registration, ~1-2 s)
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2", DMLKERN_TRITON_OPS="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
           "bit_reproducible or npairs_one_row_block or supcon_many or mined_row"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mined_row_similarities(dtype):
    """The MS miner's one-row similarities (the `len <= 1` rule on mined pairs) are not a BLAS gemv,
    whose fp32 result here changes with the thread count (5000 x 128)."""
    from dmlkern.fused.multi_similarity import _row_dots

    g = torch.Generator().manual_seed(13)
    y, v = torch.randn(5000, 128, generator=g, dtype=dtype), torch.randn(128, generator=g, dtype=dtype)
    _assert_reproducible(f"row similarities {dtype}", lambda: [_row_dots(v, y)])
    torch.testing.assert_close(_row_dots(v, y), y @ v)
