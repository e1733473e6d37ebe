"""The fused NCALoss and TupletMarginLoss (dmlkern/fused/nca.py, tuplet.py) against PML 2.9.0
itself (values and gradients, fp32 / fp64, odd sizes, degenerate batches, ref_emb, the distance
variants), their per-row / per-pair dicts, NCA's dropped rows, gradcheck, thread-count
reproducibility past torch's grain size, the configurations left to the reference, and
torch.compile. The tables of tests/test_fused_losses.py (LOSSES, MEMORY_LOSSES) cover both
losses' default-like configurations on every backend as well."""
import pytest
import torch

from dmlkern import _tracing, losses
from dmlkern import distances as dist
from dmlkern.reducers import DoNothingReducer, MeanReducer, SumReducer
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES
from test_fused_losses import engine_backend_choice  # noqa: F401 (a fixture)

pml_losses = pytest.importorskip("pytorch_metric_learning.losses", reason="parity with PML needs PML 2.9.0")
from pytorch_metric_learning import distances as pml_dist, reducers as pml_reducers  # noqa: E402

CPU_DTYPES = [torch.float64, torch.float32]

# (N, classes, M of ref_emb or None, D): odd sizes; one sample; one class; all distinct labels
# (no positives); two classes of one row each; a ref_emb batch.
CASES = [(37, 5, None, 13), (129, 11, None, 7), (1, 1, None, 8), (12, 1, None, 8), (9, 9, None, 8),
         (2, 2, None, 8), (70, 6, 53, 16), (33, 4, 33, 5)]


def _nca_pair(variant):
    """(ours, PML's) NCALoss of one distance variant."""
    if variant == "default":  # LpDistance(power=2), normalised
        return losses.NCALoss(softmax_scale=3), pml_losses.NCALoss(softmax_scale=3)
    if variant == "cosine":
        return (losses.NCALoss(softmax_scale=5, distance=dist.CosineSimilarity()),
                pml_losses.NCALoss(softmax_scale=5, distance=pml_dist.CosineSimilarity()))
    assert variant == "euclidean"  # LpDistance(), power 1: the engine's distance transform
    return (losses.NCALoss(softmax_scale=2, distance=dist.LpDistance()),
            pml_losses.NCALoss(softmax_scale=2, distance=pml_dist.LpDistance()))


def _tuplet_pair(scale=32):
    return losses.TupletMarginLoss(margin=5.73, scale=scale), pml_losses.TupletMarginLoss(margin=5.73, scale=scale)


def _call(fn, x, labels, ref, ref_labels):
    """(value, [grad x, grad ref]) of one call, on fresh leaves."""
    x = x.detach().clone().requires_grad_(True)
    ref = None if ref is None else ref.detach().clone().requires_grad_(True)
    value = fn(x, labels, None, ref, ref_labels)
    wrt = [x] + ([] if ref is None else [ref])
    if not value.requires_grad:
        return value.detach(), [torch.zeros_like(w) for w in wrt]
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _case(n, classes, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 7 + classes)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.arange(n) % classes if classes == n else torch.randint(0, classes, (n,), generator=g)
    ref = ref_labels = None
    if m is not None:
        ref = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
        ref_labels = torch.randint(0, classes, (m,), generator=g)
    return x, labels, ref, ref_labels


def _no_row_has_a_positive(labels, ref_labels, self_ref):
    ref_labels = labels if ref_labels is None else ref_labels
    same = labels[:, None] == ref_labels[None, :]
    if self_ref:
        same.fill_diagonal_(False)
    return not bool(same.any())


def _assert_matches_pml(ours, theirs, x, labels, ref, ref_labels, expected, what, nca):
    dtype = x.dtype
    got_v, got_g = _call(ours, x, labels, ref, ref_labels)
    assert ours.last_backend in (expected, "zero"), f"{what}: ran {ours.last_backend} ({ours.last_fallback})"
    want_v, want_g = _call(theirs, x, labels, ref, ref_labels)
    if nca and len(x) > 1 and _no_row_has_a_positive(labels, ref_labels, ref is None) and torch.isnan(want_v):
        # the reference's documented deviation: PML's mean over no row is NaN, ours the zero loss
        assert got_v == 0 and all(torch.all(gr == 0) for gr in got_g), what
        return
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got_v, want_v, rtol=rtol, atol=atol, msg=lambda s: f"{what} value: {s}")
    for k, (a, b) in enumerate(zip(got_g, want_g)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{what} grad {k}: {s}")


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("variant", ["default", "cosine", "euclidean"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nca_matches_pml(engine_backend_choice, monkeypatch, backend, device, variant, static):  # noqa: F811
    """static_shapes: the path torch.compile and CUDA take (the mean over the kept rows, already
    reduced), run eagerly."""
    expected = engine_backend_choice(backend, device)
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    for dtype in CPU_DTYPES:
        for n, classes, m, d in CASES:
            x, labels, ref, ref_labels = _case(n, classes, m, d, dtype)
            ours, theirs = _nca_pair(variant)
            _assert_matches_pml(ours, theirs, *_on(device, x, labels, ref, ref_labels), expected,
                                f"nca {variant} {dtype} n={n} classes={classes} ref={m}", nca=True)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_tuplet_margin_matches_pml(engine_backend_choice, backend, device):  # noqa: F811
    expected = engine_backend_choice(backend, device)
    for dtype in CPU_DTYPES:
        for n, classes, m, d in CASES:
            x, labels, ref, ref_labels = _case(n, classes, m, d, dtype)
            for scale in (32, 64):  # 64: PML's default
                ours, theirs = _tuplet_pair(scale)
                _assert_matches_pml(ours, theirs, *_on(device, x, labels, ref, ref_labels), expected,
                                    f"tuplet scale={scale} {dtype} n={n} classes={classes} ref={m}", nca=False)


def test_per_row_and_per_pair_dicts_match_pml(engine_backend_choice):  # noqa: F811
    """With DoNothingReducer the loss dict itself: NCA's kept rows (indices) and losses, and
    TupletMargin's pairs (a, p) in PML's row-major order, reduction types as PML's."""
    engine_backend_choice("cpp", "cpu")
    for dtype in CPU_DTYPES:
        x, labels, ref, ref_labels = _case(41, 9, 23, 6, dtype, seed=3)
        labels[0] = 100  # a row without positives: dropped
        for r, rl in [(None, None), (ref, ref_labels)]:
            for ours, theirs, kind in [
                (losses.NCALoss(softmax_scale=2, reducer=DoNothingReducer()),
                 pml_losses.NCALoss(softmax_scale=2, reducer=pml_reducers.DoNothingReducer()), "element"),
                (losses.TupletMarginLoss(scale=20, reducer=DoNothingReducer()),
                 pml_losses.TupletMarginLoss(scale=20, reducer=pml_reducers.DoNothingReducer()), "pos_pair"),
            ]:
                got, want = ours(x, labels, None, r, rl)["loss"], theirs(x, labels, None, r, rl)["loss"]
                what = f"{type(ours).__name__} {dtype} ref={r is not None}"
                assert ours.last_backend == "cpp", what
                assert got["reduction_type"] == want["reduction_type"] == kind, what
                got_idx = got["indices"] if kind == "pos_pair" else (got["indices"],)
                want_idx = want["indices"] if kind == "pos_pair" else (want["indices"],)
                for a, b in zip(got_idx, want_idx):
                    assert torch.equal(a, b), what
                assert got["losses"].shape == want["losses"].shape, what
                rtol, atol = TOLERANCES[dtype]
                torch.testing.assert_close(got["losses"], want["losses"], rtol=rtol, atol=atol)
                if kind == "element" and r is None:
                    assert 0 not in got["indices"].tolist(), "a row without positives is dropped"


def test_nca_without_any_positive_returns_pmls_empty_entry(engine_backend_choice):  # noqa: F811
    """No row has a positive: with DoNothingReducer PML returns an empty element entry (the loss
    dict as it is), not a reduced zero; ProxyNCA with every sample's probability underflowing too."""
    engine_backend_choice("cpp", "cpu")
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2])
    got = losses.NCALoss(reducer=DoNothingReducer())(x, labels)["loss"]
    want = pml_losses.NCALoss(reducer=pml_reducers.DoNothingReducer())(x, labels)["loss"]
    assert got["reduction_type"] == want["reduction_type"] == "element"
    assert got["losses"].shape == want["losses"].shape == (0,) and torch.equal(got["indices"], want["indices"])
    ours = losses.ProxyNCALoss(3, 4, softmax_scale=1e4, reducer=DoNothingReducer()).double()
    theirs = pml_losses.ProxyNCALoss(3, 4, softmax_scale=1e4, reducer=pml_reducers.DoNothingReducer()).double()
    with torch.no_grad():  # each sample's proxy opposite it, the others not: its probability is 0
        ours.proxies.copy_(-x[labels] + 0.3 * x[labels.roll(1)])
        theirs.proxies.copy_(ours.proxies)
    got, want = ours(x, labels)["loss"], theirs(x, labels)["loss"]
    assert ours.last_backend == "cpp"
    assert want["losses"].shape == (0,), "the case must drop every sample in PML"
    assert got["reduction_type"] == want["reduction_type"] and got["losses"].shape == (0,)
    assert torch.equal(got["indices"], want["indices"])


@pytest.mark.parametrize("route", ["tuple", "zero_row", "reference"])
def test_nca_without_any_positive_on_the_reference_path_returns_pmls_empty_entry(route):
    """The same on the reference path: a miner's (empty) tuple, an all-zero row (the Euclidean
    kernels decline it) or backend="reference"; for ProxyNCA, backend="reference"."""
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels, tup = torch.tensor([0, 1, 2]), None
    if route == "tuple":
        tup = (torch.tensor([], dtype=torch.long),) * 3
    elif route == "zero_row":
        x[1] = 0
    ours = losses.NCALoss(reducer=DoNothingReducer())
    if route == "reference":
        ours.backend = "reference"
    got = ours(x, labels, tup)["loss"]
    want = pml_losses.NCALoss(reducer=pml_reducers.DoNothingReducer())(x, labels, tup)["loss"]
    assert ours.last_backend == "reference"
    assert got["reduction_type"] == want["reduction_type"] == "element"
    assert got["losses"].shape == want["losses"].shape == (0,) and torch.equal(got["indices"], want["indices"])
    if route != "reference":
        return
    ours = losses.ProxyNCALoss(3, 4, softmax_scale=1e4, reducer=DoNothingReducer()).double()
    ours.backend = "reference"
    theirs = pml_losses.ProxyNCALoss(3, 4, softmax_scale=1e4, reducer=pml_reducers.DoNothingReducer()).double()
    with torch.no_grad():
        ours.proxies.copy_(-x[labels] + 0.3 * x[labels.roll(1)])
        theirs.proxies.copy_(ours.proxies)
    got, want = ours(x, labels)["loss"], theirs(x, labels)["loss"]
    assert ours.last_backend == "reference" and want["losses"].shape == (0,)
    assert got["reduction_type"] == want["reduction_type"] and got["losses"].shape == (0,)
    assert torch.equal(got["indices"], want["indices"])


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.id in ("cpp-cpu", "triton-interpret")])
def test_tuplet_anchor_without_negatives_and_a_nan_row(engine_backend_choice, backend, device):  # noqa: F811
    """Anchors with positives but no negative (and one with a negative but no positive): PML's
    masked logsumexp gives each listed pair 0, also for a NaN row's pair (-inf - NaN would be NaN)."""
    expected = engine_backend_choice(backend, device)
    x = torch.tensor([[0.1, 0.3], [float("nan"), 0.2], [-0.2, 0.5]], dtype=torch.float64)
    labels, ref, ref_labels = torch.tensor([0, 0, 1]), torch.tensor([[0.3, -0.1]], dtype=torch.float64), torch.tensor([0])
    ours = losses.TupletMarginLoss(reducer=SumReducer())
    got = ours(x, labels, None, ref, ref_labels)
    want = pml_losses.TupletMarginLoss(reducer=pml_reducers.SumReducer())(x, labels, None, ref, ref_labels)
    assert ours.last_backend == expected
    assert float(want) == 0 and float(got) == 0


def _antipodal_batch():
    """Rows 0-5 of classes 0..5 and rows 6-11 near their antipodes with the same labels: each row's
    only positive at s ~ -1, its negatives much closer."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 8, generator=g, dtype=torch.float64)
    x = torch.cat([base, -base]) + 0.01 * torch.randn(12, 8, generator=g, dtype=torch.float64)
    return x, torch.arange(12) % 6


def _pml_kept_rows(scale, x, labels):
    fn = pml_losses.NCALoss(softmax_scale=scale, reducer=pml_reducers.DoNothingReducer())
    return fn(x, labels)["loss"]["indices"]


def _exact_nca(x, labels, scale, kept):
    """PML's NCA mean over the rows `kept`, in fp64 from log-sum-exps: no subnormal probability
    (PML's own values are off by up to ~4% of a probability near fp32's smallest subnormal)."""
    xn = torch.nn.functional.normalize(x, dim=1)
    logits = (scale * (2 * xn @ xn.T - 2)).masked_fill(torch.eye(len(x), dtype=torch.bool), float("-inf"))
    same = labels[:, None] == labels[None, :]
    losses_ = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~same, float("-inf")), 1)
    return losses_[kept].mean() if len(kept) else 0 * x.sum()


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_nca_drops_underflowing_rows_as_pml(engine_backend_choice, monkeypatch, backend, device, static):  # noqa: F811
    """Rows whose positive probability underflows to exactly 0 in the dtype (a large
    softmax_scale, positives on the far side of the sphere): PML leaves them out. The kept rows are
    PML's (eager: the per-row dict's indices, an empty entry when none is kept, as PML's); value and
    gradient are the exact fp64 mean over them (none kept: the reference's zero, where PML gives NaN)."""
    expected = engine_backend_choice(backend, device)
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    x, labels = _antipodal_batch()
    for dtype in CPU_DTYPES:
        for scale in (0.5, 34.0, 250.0):
            what = f"{dtype} scale={scale}"
            xd = x.to(dtype)
            kept = _pml_kept_rows(scale, xd, labels)
            if not static:
                fn = losses.NCALoss(softmax_scale=scale, reducer=DoNothingReducer())
                got = fn(xd.to(device), labels.to(device))["loss"]
                assert fn.last_backend == expected and torch.equal(got["indices"].cpu(), kept), what
                assert got["reduction_type"] == "element" and got["losses"].shape == kept.shape, what  # (none: PML's empty entry)
            ours = losses.NCALoss(softmax_scale=scale)
            got_v, (got_g,) = _call(ours, xd.to(device), labels.to(device), None, None)
            assert ours.last_backend == expected, what
            xx = x.clone().requires_grad_(True)
            want_v = _exact_nca(xx, labels, scale, kept)
            (want_g,) = torch.autograd.grad(want_v, xx)
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(got_v.double().cpu(), want_v.detach(), rtol=rtol, atol=atol,
                                       msg=lambda s: f"{what} value: {s}")
            torch.testing.assert_close(got_g.double().cpu(), want_g, rtol=rtol, atol=atol,
                                       msg=lambda s: f"{what} grad: {s}")


def test_nca_underflow_actually_drops_rows():
    """The case above is not vacuous: PML drops some rows at scale 34 in fp32, none in fp64; some
    at 250 in fp64, all in fp32."""
    x, labels = _antipodal_batch()

    def kept(scale, dtype):
        return len(_pml_kept_rows(scale, x.to(dtype), labels))

    assert 0 < kept(34.0, torch.float32) < 12 and kept(34.0, torch.float64) == 12
    assert 0 < kept(250.0, torch.float64) < 12 and kept(250.0, torch.float32) == 0
    assert kept(0.5, torch.float32) == 12


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_gradcheck_fp64_variants(engine_backend_choice, backend, device):  # noqa: F811
    """fp64 gradcheck of NCA's three distances and TupletMargin, with and without ref_emb."""
    expected = engine_backend_choice(backend, device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 3, (11,), generator=g).to(device)
    ref = torch.randn(7, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    ref_labels = torch.randint(0, 3, (7,), generator=g).to(device)
    fns = [_nca_pair(v)[0] for v in ("default", "cosine", "euclidean")] + [_tuplet_pair(8)[0]]
    for fn in fns:
        for inputs, call in [((x,), lambda x: fn(x, labels)),
                             ((x, ref), lambda x, r: fn(x, labels, None, r, ref_labels))]:
            assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                            fast_mode=expected == "triton"), type(fn).__name__
            assert fn.last_backend == expected, (type(fn).__name__, fn.last_backend)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_bit_reproducible_past_the_grain_size(engine_backend_choice, dtype):  # noqa: F811
    """1 and 2 torch threads, bit for bit, past torch's CPU grain size (32768 elements): NCA's
    per-row epilogue at N = 40000 rows against a few references, TupletMargin's 64512 positive
    pairs (their gathers, index_add backward and the mean)."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(12)
    cases = [(losses.NCALoss(softmax_scale=4), torch.randn(40000, 8, generator=g, dtype=dtype),
              torch.randint(0, 50, (40000,), generator=g), torch.randn(64, 8, generator=g, dtype=dtype),
              torch.randint(0, 50, (64,), generator=g)),
             (losses.TupletMarginLoss(scale=16), torch.randn(1024, 16, generator=g, dtype=dtype),
              torch.arange(1024) % 16, None, None),
             (losses.TupletMarginLoss(scale=16, reducer=SumReducer()), torch.randn(1024, 16, generator=g, dtype=dtype),
              torch.arange(1024) % 16, None, None)]
    threads = torch.get_num_threads()
    for fn, x, labels, ref, ref_labels in cases:
        runs = []
        try:
            for t in (1, 2, 1, 2):
                torch.set_num_threads(t)
                runs.append(_call(fn, x, labels, ref, ref_labels))
                assert fn.last_backend == "cpp"
        finally:
            torch.set_num_threads(threads)
        for v, grads in runs[1:]:
            assert torch.equal(v, runs[0][0]), f"{type(fn).__name__}: value"
            assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1])), f"{type(fn).__name__}: gradient"


def test_unfusable_configurations_use_the_reference(engine_backend_choice):  # noqa: F811
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,), generator=g)
    pairs = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    stats_loss = losses.TupletMarginLoss()
    stats_loss.collect_stats = True
    for loss_fn, args, reason in [
        (losses.NCALoss(), (x, labels, pairs), "an indices_tuple"),
        (losses.NCALoss(distance=dist.LpDistance(p=1)), (x, labels), "non-default distance"),
        (losses.NCALoss(distance=dist.LpDistance(normalize_embeddings=False, power=3)), (x, labels),
         "non-default distance"),
        (losses.NCALoss(distance=dist.SNRDistance()), (x, labels), "non-default distance"),
        (losses.NCALoss(), (x, labels, None, x, labels.clone()), "separate ref_labels"),
        (stats_loss, (x, labels), "collect_stats"),
    ]:
        loss_fn.last_fallback = None
        loss_fn(*args)
        assert loss_fn.last_backend == "reference", (type(loss_fn).__name__, reason)
        assert reason in (loss_fn.last_fallback or ""), (type(loss_fn).__name__, loss_fn.last_fallback)


def test_nca_other_reducers_under_static_shapes_use_the_reference(engine_backend_choice, monkeypatch):  # noqa: F811
    """The kept rows are a data-dependent shape: under torch.compile only MeanReducer is fused."""
    engine_backend_choice("cpp", "cpu")
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    x = torch.randn(20, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (20,))
    fn = losses.NCALoss(reducer=SumReducer())
    fn(x, labels)
    assert fn.last_backend == "reference" and "under torch.compile" in fn.last_fallback
    fn = losses.NCALoss(reducer=MeanReducer())
    fn(x, labels)
    assert fn.last_backend == "cpp"


def test_tuplet_duplicate_rows_follow_the_reference(engine_backend_choice):  # noqa: F811
    """A positive pair of identical rows (s = 1 up to rounding): the reference clamps s to [-1, 1]
    before acos (PML: NaN past 1), and so do the fused pairs: finite values, equal to the
    reference's to acos's conditioning there (s one rounding apart moves acos(s) by ~sqrt(2 eps),
    the loss by ~scale sin(margin) sqrt(2 eps))."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(6)
    for dtype in CPU_DTYPES:
        x = torch.randn(16, 8, generator=g, dtype=dtype)
        x[1] = x[0]
        x[5] = 3 * x[4]
        labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3, 0, 1, 2, 3])
        fn = losses.TupletMarginLoss(scale=16, reducer=DoNothingReducer())
        got = fn(x, labels)["loss"]["losses"]
        assert fn.last_backend == "cpp"
        fn.backend = "reference"
        want = fn(x, labels)["loss"]["losses"]
        assert torch.isfinite(got).all()
        atol = 16 * fn.margin * (4 * torch.finfo(dtype).eps) ** 0.5
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_nca_compiles_fullgraph_and_tuplet_compiles(engine_backend_choice):  # noqa: F811
    """NCA with MeanReducer traces with fullgraph=True (static shapes: the mean over the kept
    rows); TupletMargin's pair list has data-dependent sizes (graph breaks), but compiles and
    matches the eager loss."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    labels[0] = 9  # a row without positives
    for fn, fullgraph in [(losses.NCALoss(softmax_scale=2), True), (losses.TupletMarginLoss(scale=16), False)]:
        torch._dynamo.reset()
        want_v, want_g = _call(fn, x, labels, None, None)
        assert fn.last_backend == "cpp"
        compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
        got_v, got_g = _call(compiled, x, labels, None, None)
        torch.testing.assert_close(got_v, want_v)
        torch.testing.assert_close(got_g[0], want_g[0])


REDUCER_PAIRS = {  # (ours, PML's): PML reduces NCA's empty entry with each
    "mean": lambda R: R.MeanReducer(), "sum": lambda R: R.SumReducer(),
    "class_weighted": lambda R: R.ClassWeightedReducer(torch.ones(10)), "per_anchor": lambda R: R.PerAnchorReducer(),
    "avg_non_zero": lambda R: R.AvgNonZeroReducer(), "threshold": lambda R: R.ThresholdReducer(low=0),
}


@pytest.mark.parametrize("route", ["fused", "reference"])
@pytest.mark.parametrize("reducer", sorted(REDUCER_PAIRS))
def test_nca_without_a_kept_row_gives_ref_emb_pmls_gradient(engine_backend_choice, route, reducer):  # noqa: F811
    """No row kept (no positive anywhere): PML reduces the empty entry, and
    ref_emb's gradient is zeros where that reduction runs on the distances' graph (a mean, NaN in
    PML, dmlkern's zero; a sum) and None where the reducer returns its zero from the embeddings
    (AvgNonZero, Threshold). dmlkern's ref_emb gets the same: zeros, or None."""
    from dmlkern import reducers as our_reducers
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    labels = torch.arange(5)
    ref, ref_labels = torch.randn(3, 4, dtype=torch.float64, generator=g), torch.arange(5, 8)
    out = {}
    for name, loss in (("ours", losses.NCALoss(reducer=REDUCER_PAIRS[reducer](our_reducers))),
                       ("pml", pml_losses.NCALoss(reducer=REDUCER_PAIRS[reducer](pml_reducers)))):
        if name == "ours" and route == "reference":
            loss.backend = "reference"
        xx, rr = x.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        value = loss(xx, labels, ref_emb=rr, ref_labels=ref_labels)
        value.backward()
        out[name] = (value.detach(), xx.grad, rr.grad)
        if name == "ours":
            assert loss.last_backend == ("cpp" if route == "fused" else "reference")
    (v, gx, gr), (pv, pgx, pgr) = out["ours"], out["pml"]
    assert v.item() == (0.0 if pv.isnan() else pv.item())
    assert torch.equal(gx, pgx) and torch.all(gx == 0)
    assert (gr is None) == (pgr is None), (gr, pgr)
    if pgr is not None:
        assert gr.shape == pgr.shape and torch.equal(gr, pgr)


@pytest.mark.parametrize("route", ["fused", "reference"])
@pytest.mark.parametrize("reducer", sorted(REDUCER_PAIRS))
def test_proxy_nca_without_a_kept_sample_gives_the_proxies_pmls_gradient(engine_backend_choice, route, reducer):  # noqa: F811
    """ProxyNCA with every sample's probability underflowing: the proxies' gradient is zeros where
    PML's reducer answers on the graph, None where it answers with its zero from the embeddings
    (as for NCA's ref_emb above): an optimiser then steps the proxies as it would under PML."""
    from dmlkern import reducers as our_reducers
    engine_backend_choice("cpp", "cpu")
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2])
    out = {}
    for name, lib, red in (("ours", losses, our_reducers), ("pml", pml_losses, pml_reducers)):
        loss = lib.ProxyNCALoss(3, 4, softmax_scale=1e4, reducer=REDUCER_PAIRS[reducer](red)).double()
        if name == "ours" and route == "reference":
            loss.backend = "reference"
        with torch.no_grad():  # each sample's proxy opposite it: its probability is 0
            loss.proxies.copy_(-x[labels] + 0.3 * x[labels.roll(1)])
        xx = x.clone().requires_grad_(True)
        value = loss(xx, labels)
        value.backward()
        out[name] = (value.detach(), xx.grad, loss.proxies.grad)
        if name == "ours":
            assert loss.last_backend == ("cpp" if route == "fused" else "reference")
    (v, gx, gp), (pv, pgx, pgp) = out["ours"], out["pml"]
    assert v.item() == (0.0 if pv.isnan() else pv.item())
    assert torch.equal(gx, pgx) and torch.all(gx == 0)
    assert (gp is None) == (pgp is None), (gp, pgp)
    if pgp is not None:
        assert torch.equal(gp, pgp)


@pytest.mark.parametrize("reducer", sorted(REDUCER_PAIRS) + ["do_nothing"])
def test_nca_with_an_empty_ref_emb_is_pmls(reducer):
    """An empty ref_emb (rows against no reference): PML's per-row dict of no row (DoNothingReducer
    returns it as it is), its reduction's value (NaN for a mean: dmlkern's zero) and ref_emb's
    (0, D) gradient where that reduction is on the graph (None with AvgNonZero / Threshold)."""
    from dmlkern import reducers as our_reducers
    make = REDUCER_PAIRS.get(reducer, lambda R: R.DoNothingReducer())
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(5)
    out = {}
    for name, lib, red in (("ours", losses, our_reducers), ("pml", pml_losses, pml_reducers)):
        xx, rr = x.clone().requires_grad_(True), torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
        out[name] = lib.NCALoss(reducer=make(red))(xx, labels, ref_emb=rr, ref_labels=labels[:0]), rr
    (got, ref), (want, pml_ref) = out["ours"], out["pml"]
    if reducer == "do_nothing":
        got, want = got["loss"], want["loss"]
        assert got["reduction_type"] == want["reduction_type"] == "element"
        assert got["losses"].shape == want["losses"].shape == (0,) and torch.equal(got["indices"], want["indices"])
        return
    assert got.item() == (0.0 if want.isnan() else want.item())
    got.backward()
    want.backward()
    assert (ref.grad is None) == (pml_ref.grad is None)
    if pml_ref.grad is not None:
        assert ref.grad.shape == pml_ref.grad.shape == (0, 4)


def test_nca_with_an_empty_ref_emb_compiles_fullgraph():
    """Under torch.compile(fullgraph=True) an empty ref_emb keeps the grad-carrying zero (the
    reference's per-row dict would branch on data)."""
    loss = losses.NCALoss()
    fn = torch.compile(lambda x, lab, ref, ref_lab: loss(x, lab, ref_emb=ref, ref_labels=ref_lab), fullgraph=True,
                       backend="aot_eager")
    x = torch.randn(5, 4, requires_grad=True)
    value = fn(x, torch.arange(5), torch.randn(0, 4), torch.arange(0))
    value.backward()
    assert value.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
