"""The fused CircleLoss (dmlkern/fused/circle.py: one lse2 pass on the engine's transform 2) against
PML 2.9.0 itself: values and gradients in fp32 / fp64, odd sizes across several tiles and row
blocks, ref_emb, degenerate batches (one sample, one class, no positives), NaN embeddings, other
reducers and the per-row dict, the module's attributes read at call time, the fp64 gradient as the
derivative with PML's detached weights frozen (gradcheck), bit-reproducibility at 1, 2 and 4
threads, last_backend, torch.compile, and peak memory at N = 16384."""
import pytest
import torch

from dmlkern import _tracing, losses
from dmlkern import distances as dist
from dmlkern.reducers import DoNothingReducer, MeanReducer, SumReducer, ThresholdReducer
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES
from test_fused_losses import engine_backend_choice  # noqa: F401 (a fixture)
from test_determinism import _assert_reproducible
from test_nca_tuplet_fused import _call, _case

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="parity with PML needs PML 2.9.0")
from pytorch_metric_learning import reducers as pml_reducers  # noqa: E402

CPU_DTYPES = [torch.float64, torch.float32]
# (N, classes, M of ref_emb or None, D): odd sizes crossing the Triton 64-row / 32-column tiles and
# the CPU's 128-row blocks; one sample; one class (no negatives); all distinct labels (no
# positives); two rows of two classes; ref_emb batches.
CASES = [(37, 5, None, 13), (131, 11, None, 7), (1, 1, None, 8), (12, 1, None, 8), (9, 9, None, 8),
         (2, 2, None, 8), (70, 6, 53, 16), (33, 4, 33, 5)]
# Several CPU column tiles (512) and row blocks: C++ only (minutes in the Triton interpreter).
LARGE_CASE = (601, 23, None, 9)
# (m, gamma): PML's default, the paper's face-recognition setting, a small scale.
PARAMS = [(0.4, 80), (0.25, 256), (0.3, 2)]


def _pair(m=0.4, gamma=80, **kw):
    pml_kw = {k: v[1] if isinstance(v, tuple) else v for k, v in kw.items()}
    ours_kw = {k: v[0] if isinstance(v, tuple) else v for k, v in kw.items()}
    return losses.CircleLoss(m=m, gamma=gamma, **ours_kw), pml_losses.CircleLoss(m=m, gamma=gamma, **pml_kw)


def _grad_atol(dtype, gamma, want):
    """The dtype's atol, or more: logits of size ~gamma carry rounding errors ~gamma eps, which are
    relative errors of the softmax weights, i.e. of the gradient at its scale (fp32, gamma = 80:
    PML's own fp32 gradient is 3e-6 off the fp64 one at a scale of 1.8, the Triton path's exp2 1.6e-5)."""
    finite = want[torch.isfinite(want)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return max(TOLERANCES[dtype][1], 4 * gamma * torch.finfo(dtype).eps * scale)


def _assert_matches_pml(ours, theirs, x, labels, ref, ref_labels, expected, what, device="cpu"):
    on = (lambda t: None if t is None else t.to(device))
    got_v, got_g = _call(ours, on(x), on(labels), on(ref), on(ref_labels))
    assert ours.last_backend in (expected, "zero"), f"{what}: ran {ours.last_backend} ({ours.last_fallback})"
    want_v, want_g = _call(theirs, x, labels, ref, ref_labels)
    rtol, atol = TOLERANCES[x.dtype]
    torch.testing.assert_close(got_v.cpu(), want_v, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda s: f"{what} value: {s}")
    for k, (a, b) in enumerate(zip(got_g, want_g)):
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=_grad_atol(x.dtype, float(ours.gamma), b),
                                   equal_nan=True, msg=lambda s: f"{what} grad {k}: {s}")
    return ours.last_backend


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_circle_matches_pml(engine_backend_choice, monkeypatch, backend, device, static):  # noqa: F811
    """static_shapes: the branch-free path torch.compile and CUDA take (degenerate batches zeroed
    with torch.where), run eagerly."""
    expected = engine_backend_choice(backend, device)
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    cases = CASES + ([LARGE_CASE] if backend == "cpp" else [])
    ran = set()
    for dtype in CPU_DTYPES:
        for n, classes, m, d in cases:
            x, labels, ref, ref_labels = _case(n, classes, m, d, dtype)
            for mm, gamma in PARAMS:
                ours, theirs = _pair(mm, gamma)
                ran.add(_assert_matches_pml(ours, theirs, x, labels, ref, ref_labels, expected,
                                            f"{dtype} m={mm} gamma={gamma} n={n} classes={classes} ref={m}", device))
    assert expected in ran


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_degenerate_batches_give_pmls_zero(engine_backend_choice, backend, device):  # noqa: F811
    """One sample: PML's `len <= 1` rule, the zero loss from the shapes (last_backend "zero");
    one class (no negatives) and all labels distinct (no positives): every row is zeroed, as PML's
    product with its mask (value 0, gradient 0)."""
    expected = engine_backend_choice(backend, device)
    for n, classes, want in [(1, 1, "zero"), (12, 1, expected), (9, 9, expected)]:
        x, labels, _, _ = _case(n, classes, None, 8, torch.float64)
        ours, theirs = _pair()
        got_v, (got_g,) = _call(ours, x.to(device), labels.to(device), None, None)
        want_v, (want_g,) = _call(theirs, x, labels, None, None)
        assert ours.last_backend == want, (n, classes, ours.last_backend)
        assert float(got_v) == float(want_v) == 0.0
        assert torch.equal(got_g.cpu(), torch.zeros_like(want_g)) and torch.equal(want_g, torch.zeros_like(want_g))


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nan_embeddings_propagate_as_pml(engine_backend_choice, monkeypatch, backend, device, static):  # noqa: F811
    """A NaN embedding row: PML's value and gradients (NaN where PML's are, equal elsewhere), with
    and without ref_emb, also in a batch whose rows lack negatives (PML's NaN times its zero mask).
    The branch-free path (CUDA, torch.compile; static_shapes) can't see the NaN: its value is NaN
    as PML's, and its gradients are NaN wherever PML's are, and may be NaN where AvgNonZero's
    empty mean gives PML zero gradients (README, deviations)."""
    expected = engine_backend_choice(backend, device)
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    for dtype in CPU_DTYPES:
        for n, classes, m in [(23, 4, None), (20, 3, 17), (10, 1, None)]:
            x, labels, ref, ref_labels = _case(n, classes, m, 6, dtype, seed=4)
            x[3] = float("nan")
            ours, theirs = _pair(0.25, 64)
            want_v, want_g = _call(theirs, x, labels, ref, ref_labels)
            assert torch.isnan(want_v) or torch.isnan(want_g[0]).any(), "not vacuous: PML gives NaN here"
            if static or device == "cuda":
                on = (lambda t: None if t is None else t.to(device))
                got_v, got_g = _call(ours, on(x), on(labels), on(ref), on(ref_labels))
                assert ours.last_backend == expected
                assert bool(torch.isnan(got_v)) == bool(torch.isnan(want_v)), f"nan {dtype} n={n}: {got_v} {want_v}"
                for a, b in zip(got_g, want_g):
                    assert torch.isnan(a.cpu())[torch.isnan(b)].all(), f"nan {dtype} n={n}: a NaN gradient lost"
                continue
            _assert_matches_pml(ours, theirs, x, labels, ref, ref_labels, expected, f"nan {dtype} n={n}", device)
            assert ours.last_backend == expected


REDUCERS = [(DoNothingReducer, pml_reducers.DoNothingReducer, {}), (MeanReducer, pml_reducers.MeanReducer, {}),
            (SumReducer, pml_reducers.SumReducer, {}),
            (ThresholdReducer, pml_reducers.ThresholdReducer, {"low": 5.0})]


def test_other_reducers_and_the_per_row_dict_match_pml(engine_backend_choice):  # noqa: F811
    """Element losses (N, 1) with PML's indices (every row, zeros for incomplete rows) for any
    reducer, with and without ref_emb."""
    engine_backend_choice("cpp", "cpu")
    for dtype in CPU_DTYPES:
        x, labels, ref, ref_labels = _case(41, 9, 23, 6, dtype, seed=3)
        labels[0] = 100  # a row without positives
        rtol, atol = TOLERANCES[dtype]
        for r, rl in [(None, None), (ref, ref_labels)]:
            for ours_cls, pml_cls, kw in REDUCERS:
                ours, theirs = _pair(0.4, 30, reducer=(ours_cls(**kw), pml_cls(**kw)))
                what = f"{ours_cls.__name__} {dtype} ref={r is not None}"
                if ours_cls is DoNothingReducer:
                    got, want = ours(x, labels, None, r, rl)["loss"], theirs(x, labels, None, r, rl)["loss"]
                    assert got["reduction_type"] == want["reduction_type"] == "element", what
                    assert torch.equal(got["indices"], want["indices"]), what
                    assert got["losses"].shape == want["losses"].shape, what
                    torch.testing.assert_close(got["losses"], want["losses"], rtol=rtol, atol=atol)
                    assert ours.last_backend == "cpp", what
                else:
                    _assert_matches_pml(ours, theirs, x, labels, r, rl, "cpp", what)


def test_attributes_are_read_at_call_time(engine_backend_choice):  # noqa: F811
    """PML reads gamma, op, on, delta_p and delta_n from the module on every call (set from m at
    construction): changing them afterwards changes PML's loss, and the fused one alike."""
    engine_backend_choice("cpp", "cpu")
    x, labels, _, _ = _case(50, 5, None, 8, torch.float64, seed=1)
    ours, theirs = _pair(0.4, 80)
    for fn in (ours, theirs):
        fn.gamma, fn.op, fn.on, fn.delta_p, fn.delta_n = 32, 1.3, -0.2, 0.75, 0.35
    _assert_matches_pml(ours, theirs, x, labels, None, None, "cpp", "changed attributes")
    assert ours.last_backend == "cpp"


class _FrozenWeightLoss(torch.autograd.Function):
    """Forward: PML's Circle loss with the relu weights computed from the similarities at x0
    (frozen), the rest at the input; backward: the fused loss's gradient at the input. gradcheck
    compares that gradient with the numerical derivative of the frozen-weight loss at x0 — the
    derivative PML's autograd takes (it detaches the weights)."""

    @staticmethod
    def forward(ctx, x, labels, x0, module, fused):
        ctx.save_for_backward(x)
        ctx.fused = fused
        xn, x0n = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x0, dim=1)
        s, s0 = xn @ xn.T, x0n @ x0n.T
        same = labels[:, None] == labels[None, :]
        pos = same & ~torch.eye(len(x), dtype=torch.bool)
        neg = ~same
        lp = -module.gamma * torch.relu(module.op - s0) * (s - module.delta_p)
        ln = module.gamma * torch.relu(s0 - module.on) * (s - module.delta_n)
        big = torch.full_like(s, float("-inf"))
        lse_p = torch.logsumexp(torch.where(pos, lp, big), dim=1)
        lse_n = torch.logsumexp(torch.where(neg, ln, big), dim=1)
        complete = pos.any(dim=1) & neg.any(dim=1)
        rows = torch.nn.functional.softplus(torch.where(complete, lse_p + lse_n, 0.0)) * complete
        kept = rows > 0
        return rows[kept].mean()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(ctx.fused(xx), xx)
        return grad * g, None, None, None, None


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_gradcheck_fp64_with_pmls_detached_weights(engine_backend_choice, backend, device):  # noqa: F811
    """fp64 gradcheck of the fused gradient against the loss with PML's detached relu weights held
    at the point (_FrozenWeightLoss), with and without self-pairs' rows of one class; a plain
    gradcheck of the fused loss fails: its gradient is PML's, not the full derivative."""
    expected = engine_backend_choice(backend, device)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(11, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (11,), generator=g)
    fn = losses.CircleLoss(m=0.3, gamma=4)

    def fused(x):
        return fn(x.to(device), labels.to(device)).cpu()

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: _FrozenWeightLoss.apply(x, labels, x0, fn, fused), (x,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)
    assert fn.last_backend == expected
    assert not torch.autograd.gradcheck(fused, (x,), eps=1e-6, atol=1e-7, rtol=1e-5, raise_exception=False,
                                        fast_mode=expected == "triton")


@pytest.mark.parametrize("size", ["one_block", "odd_blocks", "past_grain_size"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bit_reproducible_at_1_2_4_threads(engine_backend_choice, dtype, size):  # noqa: F811
    """Values and gradients bit for bit at 1, 2 and 4 threads (twice each): one CPU row block,
    several with odd sizes and ref_emb, and 40000 rows against 64 references, past torch's CPU
    grain size (32768 elements) where it splits elementwise ops and sums by the thread count."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(12)
    n, d, classes, m = {"one_block": (61, 24, 20, None), "odd_blocks": (301, 37, 60, 203),
                        "past_grain_size": (40000, 8, 50, 64)}[size]
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref = None if m is None else torch.randn(m, d, generator=g, dtype=dtype)
    ref_labels = None if m is None else torch.randint(0, classes, (m,), generator=g)
    fn = losses.CircleLoss()

    def call():
        value, grads = _call(fn, x, labels, ref, ref_labels)
        assert fn.last_backend == "cpp" and torch.isfinite(value) and value > 0
        return [value] + grads

    _assert_reproducible(f"circle {dtype} {size}", call)


def test_unfusable_configurations_use_the_reference(engine_backend_choice):  # noqa: F811
    """An unnormalised cosine and backend "reference" run the reference, saying why (last_fallback);
    an indices_tuple (with or without labels) runs its pairs only."""
    engine_backend_choice("cpp", "cpu")
    x, labels, _, _ = _case(20, 3, None, 8, torch.float64, seed=2)
    pairs = tuple(torch.tensor(t) for t in ([0, 1], [2, 3], [4, 5]))
    unnormalized = dist.CosineSimilarity()
    unnormalized.normalize_embeddings = False  # PML's CosineSimilarity refuses it at construction
    on_reference = losses.CircleLoss()
    on_reference.backend = "reference"
    for loss_fn, args, reason in [
        (losses.CircleLoss(distance=unnormalized), (x, labels), "non-default distance"),
        (on_reference, (x, labels), "backend='reference'"),
    ]:
        loss_fn(*args)
        assert (loss_fn.last_backend, reason in (loss_fn.last_fallback or "")) == ("reference", True), reason
    fn = losses.CircleLoss()
    fn(x, labels)
    assert fn.last_backend == "cpp" and fn.last_fallback is None
    for args in [(x, labels, pairs), (x, None, pairs)]:  # a tuple: only its pairs (listed_pairs.listed_circle)
        fn(*args)
        assert fn.last_backend == "listed", fn.last_fallback


def test_compiles_fullgraph(engine_backend_choice):  # noqa: F811
    """torch.compile(fullgraph=True) traces the fused path (static shapes: no data-dependent
    branch) and matches the eager loss, value and gradient, also for a batch without negatives."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(8)
    fn = losses.CircleLoss(m=0.25, gamma=64)
    for classes in (4, 1):
        x = torch.randn(30, 8, generator=g)
        labels = torch.randint(0, classes, (30,), generator=g)
        torch._dynamo.reset()
        want_v, want_g = _call(fn, x, labels, None, None)
        assert fn.last_backend == "cpp"
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got_v, got_g = _call(compiled, x, labels, None, None)
        torch.testing.assert_close(got_v, want_v)
        torch.testing.assert_close(got_g[0], want_g[0])
