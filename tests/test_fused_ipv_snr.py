"""The blocked IntraPairVarianceLoss and SignalToNoiseRatioContrastiveLoss (fused/intra_pair_variance.py,
fused/snr_contrastive.py) against PML 2.9.0 itself: values and gradients (fp32, fp64, odd sizes,
ref_emb, float labels, several row blocks), degenerate batches, NaN rows, reducers, declines,
CrossBatchMemory, an fp64 gradcheck, a double backward, thread-count determinism and peak memory."""
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers

from _peak_rss import peak_rss_growth_mib
from _pml_helpers import compare, make_inputs, random_indices
from dmlkern import distances, losses, reducers
from dmlkern.fused import _common

IPV, SNR = "IntraPairVarianceLoss", "SignalToNoiseRatioContrastiveLoss"
DTYPES = [torch.float32, torch.float64]


def _pair(name, distance=None, reducer=None, **kw):
    """(ours, PML's): distance / reducer as (class name, kwargs)."""
    built = []
    for loss_lib, dist_lib, red_lib in ((losses, distances, reducers), (pml_losses, pml_distances, pml_reducers)):
        args = dict(kw)
        if distance is not None:
            args["distance"] = getattr(dist_lib, distance[0])(**distance[1])
        if reducer is not None:
            args["reducer"] = getattr(red_lib, reducer[0])(**reducer[1])
        built.append(getattr(loss_lib, name)(**args))
    return built


CONFIGS = {
    "ipv": (IPV, {}),
    "ipv_eps_sum": (IPV, dict(pos_eps=0.05, neg_eps=0.1, reducer=("SumReducer", {}))),
    "ipv_avg_nonzero": (IPV, dict(reducer=("AvgNonZeroReducer", {}))),
    "ipv_lp": (IPV, dict(pos_eps=0.05, neg_eps=0.1, distance=("LpDistance", {}))),
    "ipv_lp_avg_nonzero": (IPV, dict(distance=("LpDistance", {}), reducer=("AvgNonZeroReducer", {}))),
    "ipv_dot_normalised": (IPV, dict(distance=("DotProductSimilarity", {}))),
    "ipv_dot_raw": (IPV, dict(distance=("DotProductSimilarity", {"normalize_embeddings": False}))),
    "ipv_lp_squared": (IPV, dict(pos_eps=0.02, distance=("LpDistance", {"power": 2}))),
    "ipv_lp_squared_avg_nonzero": (IPV, dict(distance=("LpDistance", {"power": 2}),
                                             reducer=("AvgNonZeroReducer", {}))),
    "snr": (SNR, {}),
    "snr_margins_mean": (SNR, dict(pos_margin=0.3, neg_margin=1.2, reducer=("MeanReducer", {}))),
    "snr_sum": (SNR, dict(pos_margin=0.1, neg_margin=0.8, reducer=("SumReducer", {}))),
    "snr_raw_rows": (SNR, dict(distance=("SNRDistance", {"normalize_embeddings": False}))),
    "snr_l1_normalised": (SNR, dict(distance=("SNRDistance", {"p": 1}))),
}


def _check(name, kw, emb, labels, ref=None, ref_labels=None, backend="blocked"):
    ours, pml = _pair(name, **kw)
    compare(ours, pml, emb, labels, ref=ref, ref_labels=ref_labels)
    assert ours.last_backend == backend, ours.last_fallback
    return ours


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_pml(config, dtype):
    name, kw = CONFIGS[config]
    emb, labels, ref, ref_labels = make_inputs(1, 37, 9, 4, dtype, ref_rows=13)
    _check(name, kw, emb, labels)
    _check(name, kw, emb, labels, ref, ref_labels)  # ref_emb: every pair of the rows with it


@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_lp_squared", "ipv_dot_raw", "snr", "snr_margins_mean"])
def test_several_row_blocks(config, monkeypatch):
    """Blocks of a few rows (not a divisor of N): the sweep, the block-ordered gradient sums."""
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 7 * 41)
    name, kw = CONFIGS[config]
    emb, labels, ref, ref_labels = make_inputs(2, 41, 11, 5, torch.float64, ref_rows=29)
    _check(name, kw, emb, labels)
    _check(name, kw, emb, labels, ref, ref_labels)


@pytest.mark.parametrize("name", [IPV, SNR])
def test_float_labels_and_multiple_reducers(name):
    emb, labels, _, _ = make_inputs(3, 23, 8, 3, torch.float64)
    _check(name, {}, emb, labels.to(torch.float64) * 0.5 - 0.25)
    ours, pml = _pair(name)
    for loss, lib in ((ours, reducers), (pml, pml_reducers)):  # a reducer per sub-loss
        loss.reducer = lib.MultipleReducers({"pos_loss": lib.SumReducer(), "neg_loss": lib.AvgNonZeroReducer()})
    compare(ours, pml, emb, labels)
    assert ours.last_backend == "blocked"


@pytest.mark.parametrize("name", [IPV, SNR])
def test_embedding_regularizer(name):
    from pytorch_metric_learning import regularizers as pml_regularizers

    from dmlkern import regularizers

    emb, labels, _, _ = make_inputs(18, 19, 8, 3, torch.float64)
    ours = getattr(losses, name)(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    pml = getattr(pml_losses, name)(embedding_regularizer=pml_regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    compare(ours, pml, emb, labels)
    assert ours.last_backend == "blocked"


# ----------------------------------------------------------------------------- degenerate batches
DEGENERATE = {  # labels (rows; ref rows): PML's len <= 1 rule, one side without pairs, ...
    "one_sample": ([3], None, "zero"),
    "two_same": ([1, 1], None, "blocked"),  # two positive pairs (both orders), no negative
    "two_different": ([0, 1], None, "blocked"),  # no positive pair
    "one_class": ([2] * 6, None, "blocked"),
    "all_different": ([0, 1, 2, 3, 4], None, "blocked"),
    "ref_one_pair": ([0], [0], "zero"),  # one positive pair, no negative
    "ref_one_each": ([0], [0, 1], "zero"),  # one of each
    "ref_no_positive": ([0, 1], [2, 3, 4], "blocked"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_lp_squared", "snr", "snr_margins_mean",
                                    "ipv_avg_nonzero"])
def test_degenerate_batches(config, case, dtype):
    name, kw = CONFIGS[config]
    rows, ref_rows, backend = DEGENERATE[case]
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(len(rows), 8, generator=g, dtype=torch.float64).to(dtype)
    ref = None if ref_rows is None else torch.randn(len(ref_rows), 8, generator=g, dtype=torch.float64).to(dtype)
    _check(name, kw, emb, torch.tensor(rows), ref, None if ref_rows is None else torch.tensor(ref_rows), backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", ["ipv", "ipv_lp_squared", "snr", "snr_margins_mean", "snr_raw_rows"])
def test_duplicate_rows(config, dtype):
    """Equal rows (a sample twice, in the batch or in ref_emb): PML's SNR distance is exactly 0 there
    (AvgNonZeroReducer doesn't count the pair), not the formula's rounding residue."""
    name, kw = CONFIGS[config]
    emb, labels, ref, ref_labels = make_inputs(16, 21, 8, 3, dtype, ref_rows=9)
    emb = torch.cat([emb, emb[:4]])
    labels = torch.cat([labels, labels[:2], labels[2:4] + 1])  # positive and negative duplicates
    _check(name, kw, emb, labels)
    ref = torch.cat([ref, emb[:3]])
    _check(name, kw, emb, labels, ref, torch.cat([ref_labels, labels[:3]]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
def test_snr_rows_equal_up_to_rounding(dtype):
    """Rows whose normalised forms differ only by rounding (x and 3x): PML's var(x - y) > 0 counts
    the positive pair (pos_margin 0) where the formula's d rounds to 0 or below."""
    emb, labels, _, _ = make_inputs(17, 20, 8, 3, dtype)
    emb = torch.cat([emb, 3 * emb[:6], 7 * emb[:6]])
    labels = torch.cat([labels, labels[:6], labels[:6]])
    _check(SNR, {}, emb, labels)


@pytest.mark.parametrize("name", [IPV, SNR])
def test_empty_batch(name):
    ours, _ = _pair(name)
    x = torch.zeros(0, 8, requires_grad=True)
    value = ours(x, torch.zeros(0, dtype=torch.long))
    value.backward()
    assert value.item() == 0 and ours.last_backend == "zero"


@pytest.mark.parametrize("config", ["ipv", "ipv_avg_nonzero", "snr", "snr_margins_mean"])
def test_nan_rows_as_pml(config):
    """A NaN row: the reference runs (its reducers keep or drop each NaN pair loss); PML's value."""
    name, kw = CONFIGS[config]
    emb, labels, _, _ = make_inputs(4, 15, 8, 3, torch.float64)
    emb[4, 2] = float("nan")
    ours, pml = _pair(name, **kw)
    want = pml(emb, labels)
    got = ours(emb, labels)
    assert ours.last_backend == "reference" and "NaN" in ours.last_fallback
    torch.testing.assert_close(got, want, equal_nan=True)


# ----------------------------------------------------------------------------- declines and tuples
DECLINES = {  # (loss, kwargs): the reference runs, with PML's value
    "ipv_lp_power3": (IPV, dict(distance=("LpDistance", {"power": 3})), "distance"),
    "ipv_lp1": (IPV, dict(distance=("LpDistance", {"p": 1})), "distance"),
    "ipv_lp_raw": (IPV, dict(distance=("LpDistance", {"normalize_embeddings": False})), "distance"),
    "ipv_threshold": (IPV, dict(reducer=("ThresholdReducer", {"low": 0.001})), "ThresholdReducer"),
    "ipv_per_anchor": (IPV, dict(reducer=("PerAnchorReducer", {})), "PerAnchorReducer"),
    "ipv_avg_nonzero_high": (IPV, dict(reducer=("AvgNonZeroReducer", {"high": 0.5})), "AvgNonZeroReducer"),
    "snr_squared": (SNR, dict(distance=("SNRDistance", {"power": 2})), "power"),
    "snr_threshold": (SNR, dict(reducer=("ThresholdReducer", {"low": 0.1})), "ThresholdReducer"),
}


@pytest.mark.parametrize("case", list(DECLINES))
def test_declines_run_the_reference(case):
    name, kw, why = DECLINES[case]
    emb, labels, _, _ = make_inputs(6, 19, 8, 3, torch.float64)
    ours = _check(name, kw, emb, labels, backend="reference")
    assert why in ours.last_fallback


@pytest.mark.parametrize("name", [IPV, SNR])
def test_other_declines(name):
    emb, labels, _, _ = make_inputs(7, 17, 8, 3, torch.float64)
    ours, pml = _pair(name, reducer=("DoNothingReducer", {}))
    out = ours(emb, labels)
    assert isinstance(out, dict) and ours.last_backend == "reference" and "DoNothingReducer" in ours.last_fallback
    ours, pml = _pair(name)
    ours.backend = "reference"
    compare(ours, pml, emb, labels)
    assert ours.last_backend == "reference"
    ours, _ = _pair(name)
    ours(emb.to(torch.bfloat16), labels)
    assert ours.last_backend == "reference" and "bfloat16" in ours.last_fallback


def test_snr_rows_the_formula_cannot_take():
    """A constant row (zero variance) and one-column embeddings: PML's inf / NaN, from the reference."""
    emb, labels, _, _ = make_inputs(8, 12, 6, 3, torch.float64)
    emb[3] = 0.5
    ours, pml = _pair(SNR)
    torch.testing.assert_close(ours(emb, labels), pml(emb, labels), equal_nan=True)
    assert ours.last_backend == "reference" and "constant" in ours.last_fallback
    narrow = emb[:, :1]
    torch.testing.assert_close(ours(narrow, labels), pml(narrow, labels), equal_nan=True)
    assert ours.last_backend == "reference" and "width 1" in ours.last_fallback


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
@pytest.mark.parametrize("name", [IPV, SNR])
def test_indices_tuple_runs_the_reference(name, kind):
    emb, labels, _, _ = make_inputs(9, 20, 8, 4, torch.float64)
    tup = random_indices(9, kind, labels, n=15)
    ours, pml = _pair(name)
    compare(ours, pml, emb, labels, tup)
    assert ours.last_backend == "reference" and "indices_tuple" in ours.last_fallback
    compare(ours, pml, emb, None, tup)
    assert ours.last_backend == "reference"


@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_lp_squared", "snr"])
def test_cross_batch_memory(config):
    """CrossBatchMemory's lazy all-pairs tuple: the blocked path on the rolled queue."""
    name, kw = CONFIGS[config]
    ours_loss, pml_loss = _pair(name, **kw)
    ours = losses.CrossBatchMemory(ours_loss, 8, memory_size=23)
    pml = pml_losses.CrossBatchMemory(pml_loss, 8, memory_size=23)
    gen = torch.Generator().manual_seed(0)
    backends = []
    # A one-row batch once the queue holds others: PML keeps its self comparison, a distance of 0
    # that the unit-Euclidean transform gives as sqrt(2 - 2s) ~ 1e-8 (every fused Lp loss): not with Lp.
    sizes = (1, 7, 9, 6, 23, 8, 7) if "lp" in config else (1, 7, 9, 6, 23, 8, 1, 7)
    for n in sizes:
        x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 4, (n,), generator=gen)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ours(xa, labels), pml(xb, labels)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        ga = torch.autograd.grad(a, xa, allow_unused=True)[0] if a.requires_grad else None
        gb = torch.autograd.grad(b, xb, allow_unused=True)[0] if b.requires_grad else None
        torch.testing.assert_close(torch.zeros_like(x) if ga is None else ga,
                                   torch.zeros_like(x) if gb is None else gb, rtol=1e-10, atol=1e-10)
        backends.append(ours_loss.last_backend)
    assert backends[0] == "zero" and backends.count("blocked") == len(backends) - 1, backends


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_avg_nonzero", "ipv_lp_squared", "ipv_dot_raw", "snr",
                                    "snr_margins_mean", "snr_raw_rows"])
def test_gradcheck_fp64(config, monkeypatch):
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 5 * 11)
    name, kw = CONFIGS[config]
    ours, _ = _pair(name, **kw)
    emb, labels, ref, ref_labels = make_inputs(10, 11, 5, 3, torch.float64, ref_rows=7)
    x, r = emb.requires_grad_(), ref.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ours(x, labels), (x,))
    assert torch.autograd.gradcheck(lambda x, r: ours(x, labels, ref_emb=r, ref_labels=ref_labels), (x, r))
    assert ours.last_backend == "blocked"


@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_lp_squared", "snr"])
def test_double_backward_as_the_reference(config):
    """create_graph=True: the gradient with a graph (the materialised twin), as the reference's."""
    name, kw = CONFIGS[config]
    emb, labels, ref, ref_labels = make_inputs(11, 13, 6, 3, torch.float64, ref_rows=9)
    for with_ref in (False, True):
        results = []
        for backend in ("auto", "reference"):
            ours, _ = _pair(name, **kw)
            ours.backend = backend
            x, r = emb.clone().requires_grad_(), ref.clone().requires_grad_()
            value = ours(x, labels, ref_emb=r, ref_labels=ref_labels) if with_ref else ours(x, labels)
            leaves = (x, r) if with_ref else (x,)
            grads = torch.autograd.grad(value, leaves, create_graph=True)
            second = torch.autograd.grad(sum((g * g).sum() for g in grads), leaves)
            results.append(([g.detach() for g in grads], second, ours.last_backend))
        assert results[0][2] == "blocked" and results[1][2] == "reference"
        for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("config", ["ipv", "snr"])
def test_torch_func_grad(config):
    name, kw = CONFIGS[config]
    ours, _ = _pair(name, **kw)
    emb, labels, _, _ = make_inputs(12, 14, 6, 3, torch.float64)
    got = torch.func.grad(lambda x: ours(x, labels))(emb)
    x = emb.clone().requires_grad_()
    ours(x, labels).backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", ["ipv", "ipv_lp", "ipv_lp_squared", "snr"])
def test_bit_identical_across_thread_counts(config, dtype, monkeypatch):
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 1 << 14)  # several blocks of a few rows
    name, kw = CONFIGS[config]
    emb, labels, ref, ref_labels = make_inputs(13, 301, 48, 7, dtype, ref_rows=157)
    threads = torch.get_num_threads()

    def run():
        ours, _ = _pair(name, **kw)
        x, r = emb.clone().requires_grad_(), ref.clone().requires_grad_()
        value = ours(x, labels) + ours(x, labels, ref_emb=r, ref_labels=ref_labels)
        value.backward()
        assert ours.last_backend == "blocked"
        return value.detach(), x.grad, r.grad

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        results = [run(), run()]
    finally:
        torch.set_num_threads(threads)
    for other in results:
        for a, b in zip(one, other):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("name", [IPV, SNR])
def test_peak_memory_without_an_n_by_n_matrix(name):
    """N = 16384 rows, forward and backward: an N x N fp32 matrix alone would be 1 GiB; the blocked
    path holds a few 1M-value blocks (4 MiB each) and O(N D) rows."""
    setup = f"""
    torch.manual_seed(0)
    x = torch.randn(16384, 32, requires_grad=True)
    labels = torch.randint(0, 200, (16384,))
    loss = losses.{name}()
    """
    measured = """
    value = loss(x, labels)
    value.backward()
    assert loss.last_backend == "blocked", loss.last_fallback
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    """
    growth = peak_rss_growth_mib(setup, measured)
    assert growth < 256, f"peak RSS grew by {growth:.0f} MiB"


@pytest.mark.parametrize("config", ["ipv", "snr", "snr_raw_rows"])
def test_distance_statistics_as_pml(config):
    """A distance collecting statistics: the blocked path records PML's (from O(N D) norms)."""
    name, kw = CONFIGS[config]
    cls, args = kw.get("distance", ("CosineSimilarity" if name == IPV else "SNRDistance", {}))
    kw = dict(kw, distance=(cls, dict(args, collect_stats=True)))
    ours, pml = _pair(name, **kw)
    emb, labels, ref, ref_labels = make_inputs(14, 15, 6, 3, torch.float64, ref_rows=9)
    for call in (dict(), dict(ref_emb=ref, ref_labels=ref_labels)):
        compare(ours, pml, emb, labels, ref=call.get("ref_emb"), ref_labels=call.get("ref_labels"))
        assert ours.last_backend == "blocked"
        assert pml.distance._record_these_stats
        for attr in pml.distance._record_these_stats:
            assert getattr(ours.distance, attr) == pytest.approx(getattr(pml.distance, attr), rel=1e-12), attr


@pytest.mark.parametrize("config", ["ipv_lp", "snr"])
def test_without_autograd(config):
    name, kw = CONFIGS[config]
    emb, labels, _, _ = make_inputs(15, 19, 6, 3, torch.float64)
    ours, pml = _pair(name, **kw)
    x = emb.clone().requires_grad_()
    with_grad = ours(x, labels)
    with torch.no_grad():
        assert torch.equal(ours(x, labels), with_grad.detach())
    assert torch.equal(ours(emb, labels), with_grad.detach())
    assert ours.last_backend == "blocked"
