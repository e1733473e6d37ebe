"""The blocked RankedListLoss, FastAPLoss, HistogramLoss and SmoothAPLoss (dmlkern/fused/ranking.py):
against PML 2.9.0 itself (values and gradients), on several row blocks, degenerate batches, NaN,
thread-count determinism, fp64 gradcheck, peak memory and the declines."""
import warnings

import pytest
import torch
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses

import dmlkern.fused.ranking as ranking
from dmlkern import distances, losses
from _blocked_checks import block_size  # noqa: F401 (the fixture)
from _blocked_checks import (DEGENERATE, TOL, assert_distance_statistics_match, assert_matches_pml,
                             assert_same_bits_across_threads,
                             blocked_call_peak_mib, value_grad as _value_grad)
from _peak_rss import peak_rss_growth_mib

warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # PML's HistogramLoss indexing

# name -> (class, kwargs, distance (class name, kwargs) or None, label kind)
CONFIGS = {
    "ranked_list": ("RankedListLoss", dict(margin=0.4, Tn=1.0), None, "random"),
    "ranked_list_args": ("RankedListLoss", dict(margin=0.6, Tn=2.0, imbalance=0.3, alpha=1.1, Tp=0.5), None,
                         "random"),
    "ranked_list_cos": ("RankedListLoss", dict(margin=0.3, Tn=1.0, alpha=0.5), ("CosineSimilarity", {}), "random"),
    "fast_ap": ("FastAPLoss", {}, None, "random"),
    "fast_ap_pow1": ("FastAPLoss", dict(num_bins=7), ("LpDistance", dict(power=1)), "random"),
    "histogram": ("HistogramLoss", {}, None, "random"),
    "histogram_bins": ("HistogramLoss", dict(n_bins=21), None, "random"),
    "histogram_delta": ("HistogramLoss", dict(delta=0.05), None, "random"),
    "histogram_euclid": ("HistogramLoss", dict(n_bins=10), ("LpDistance", {}), "random"),
    "smooth_ap": ("SmoothAPLoss", {}, None, "sorted"),
    "smooth_ap_t": ("SmoothAPLoss", dict(temperature=0.05), None, "interleaved"),
}


def _labels(kind, n, classes, g):
    if kind == "random":
        return torch.randint(0, classes, (n,), generator=g)
    per_class = n // classes
    ids = torch.arange(classes).repeat_interleave(per_class)
    return ids if kind == "sorted" else ids.view(classes, per_class).T.reshape(-1)


def _pair(config):
    cls, kw, dist, _ = CONFIGS[config]
    ours_kw, pml_kw = dict(kw), dict(kw)
    if dist is not None:
        ours_kw["distance"] = getattr(distances, dist[0])(**dist[1])
        pml_kw["distance"] = getattr(pml_distances, dist[0])(**dist[1])
    return getattr(losses, cls)(**ours_kw), getattr(pml_losses, cls)(**pml_kw)


def _check_against_pml(config, x, labels, pml_labels=None, backends=("blocked",)):
    ours, pml = _pair(config)
    assert_matches_pml(ours, pml, x, labels, pml_labels, backends)
    return ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_against_pml(config, dtype, block_size):
    g = torch.Generator().manual_seed(3)
    kind = CONFIGS[config][3]
    n, classes = (37, 5) if kind == "random" else (36, 4)  # odd N; SmoothAP: 4 classes of 9
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    if config == "histogram_euclid":
        x = 1 + 0.2 * x  # unit-Euclidean distances below 1: inside PML's bins [-1, 1]
    _check_against_pml(config, x.to(dtype), _labels(kind, n, classes, g))


@pytest.mark.parametrize("config", ["fast_ap", "fast_ap_pow1", "histogram", "histogram_bins"])
def test_binned_sums_without_scatter(config, monkeypatch):
    """The per-bin masked row sums that replace scatter_add off the CPU (its atomics' order varies)."""
    monkeypatch.setattr(ranking, "_SCATTER_DEVICE_TYPES", ())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(29, 8, generator=g, dtype=torch.float64)
    _check_against_pml(config, x, _labels("random", 29, 4, g))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 4, 0])
    ours, _ = _pair(config)
    torch.autograd.gradcheck(lambda x: ours(x, labels), (x[:11].clone().requires_grad_(True),))
    monkeypatch.setattr(ranking, "_GPU_BLOCK_VALUES", 500)  # several row chunks
    _check_against_pml(config, x, _labels("random", 29, 4, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("config", ["ranked_list", "fast_ap", "histogram", "smooth_ap"])
def test_float_labels(config):
    """Float labels (PML compares them by value; dmlkern maps them to ids first)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    ids = _labels(CONFIGS[config][3], 24, 4, g)
    float_labels = torch.tensor([0.5, -3.25, 7.0, 1e3], dtype=torch.float64)[ids]
    # (PML's SmoothAPLoss takes integer labels only: bincount)
    _check_against_pml(config, x, float_labels, pml_labels=ids if config == "smooth_ap" else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,classes", DEGENERATE)
@pytest.mark.parametrize("config", ["ranked_list", "fast_ap", "histogram"])
def test_degenerate_batches(config, n, classes, dtype):
    g = torch.Generator().manual_seed(n + classes)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.arange(n) % classes
    _check_against_pml(config, x, labels, backends=("blocked", "zero"))


@pytest.mark.parametrize("config", ["fast_ap", "smooth_ap"])
def test_miner_weights_from_indices_tuple(config):
    """FastAP and SmoothAP read a listed indices_tuple as per-query weights: still blocked."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    labels = _labels(CONFIGS[config][3], 24, 4, g)
    pairs = (torch.tensor([0, 0, 5, 7]), torch.tensor([1, 2, 9, 7]), torch.tensor([3, 3, 3]), torch.tensor([4, 8, 1]))
    for tup in (pairs, (torch.tensor([0, 5]), torch.tensor([1, 5]), torch.tensor([2, 6]))):
        ours, pml = _pair(config)
        value, grad = _value_grad(lambda x, labels: ours(x, labels, tup), x, labels)
        assert ours.last_backend == "blocked", ours.last_fallback
        want_value, want_grad = _value_grad(lambda x, labels: pml(x, labels, tup), x, labels)
        torch.testing.assert_close(value, want_value, **TOL[torch.float64])
        torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("n,classes", [(1, 1), (4, 1), (4, 4), (6, 2)])
def test_smooth_ap_degenerate_batches(n, classes):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    _check_against_pml("smooth_ap", x, torch.arange(classes).repeat_interleave(n // classes))


def test_empty_batch():
    for config in ("ranked_list", "fast_ap", "histogram", "smooth_ap"):
        ours, _ = _pair(config)
        x = torch.zeros(0, 5, requires_grad=True)
        value = ours(x, torch.zeros(0, dtype=torch.long))
        value.backward()
        assert float(value) == 0 and ours.last_backend == "zero"


@pytest.mark.parametrize("config", ["ranked_list", "ranked_list_cos", "fast_ap", "smooth_ap"])
def test_nan_propagates_as_in_pml(config):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(24, 8, generator=g, dtype=torch.float64)
    x[3, 2] = float("nan")
    ours = _check_against_pml(config, x, _labels(CONFIGS[config][3], 24, 4, g), backends=("blocked", "zero"))
    assert ours.last_fallback is None


def test_histogram_nan_declines_and_raises_as_pml():
    """PML's density index is garbage for a NaN value (its scatter raises): the blocked path
    declines and the reference raises the same error."""
    x = torch.randn(12, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    labels = torch.arange(12) % 3
    for loss_fn in _pair("histogram"):
        with pytest.raises(RuntimeError, match="out of bounds"):
            loss_fn(x, labels)
    ours = _pair("histogram")[0]
    with pytest.raises(RuntimeError, match="out of bounds"):
        ours(x, labels)
    assert ours.last_backend == "reference" and "NaN" in ours.last_fallback


def test_histogram_out_of_range_declines():
    """Unit-Euclidean distances above 1 fall outside PML's bins [-1, 1]: PML raises, so must we."""
    x = torch.randn(12, 4, dtype=torch.float64)
    labels = torch.arange(12) % 3
    ours, pml = _pair("histogram_euclid")
    with pytest.raises(RuntimeError):
        pml(x, labels)
    with pytest.raises(RuntimeError):
        ours(x, labels)
    assert ours.last_backend == "reference" and "outside" in ours.last_fallback


@pytest.mark.parametrize("config", ["ranked_list", "fast_ap", "histogram", "smooth_ap"])
def test_deterministic_across_thread_counts(config):
    """Bit-identical values and gradients on repeat and at 1 or 2 threads (blocks past torch's
    grain size, several blocks)."""
    g = torch.Generator().manual_seed(11)
    n = 704  # 2 to 16 blocks of over 32768 values
    x = torch.randn(n, 16, generator=g)
    labels = _labels(CONFIGS[config][3], n, 8, g)
    assert_same_bits_across_threads(lambda: _pair(config)[0], x, labels)


@pytest.mark.parametrize("config", ["ranked_list", "ranked_list_cos", "fast_ap", "fast_ap_pow1", "histogram"])
def test_gradcheck_fp64(config):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 4, 0])
    ours, _ = _pair(config)
    torch.autograd.gradcheck(lambda x: ours(x, labels), (x,))
    assert ours.last_backend == "blocked"
    torch.autograd.gradgradcheck(lambda x: ours(x, labels), (x,))  # create_graph: the one-block twin


@pytest.mark.parametrize("config", ["ranked_list", "fast_ap", "histogram", "smooth_ap"])
def test_torch_func_grad(config):
    """torch.func.grad runs the blocked backward (split-form Function, vjp per block)."""
    g = torch.Generator().manual_seed(17)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    labels = _labels(CONFIGS[config][3], 24, 4, g)
    ours, _ = _pair(config)
    grad = torch.func.grad(lambda x: ours(x, labels))(x)
    assert ours.last_backend == "blocked"
    torch.testing.assert_close(grad, _value_grad(ours, x, labels)[1], **TOL[torch.float64])


def test_gradcheck_smooth_ap_rows():
    """SmoothAP's loss is float32 (as PML's): the fp64 check is on the per-anchor AP, whose
    backward is hand-written."""
    x = torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1).requires_grad_(True)
    spec = ranking._SmoothAPSpec(group=4, temperature=0.1, n=12)
    torch.autograd.gradcheck(lambda x: ranking.row_stats(x, spec), (x,))
    torch.autograd.gradgradcheck(lambda x: ranking.row_stats(x, spec), (x,))


@pytest.mark.parametrize("config", ["ranked_list", "fast_ap"])
def test_distance_statistics(config):
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
    assert_distance_statistics_match(lambda: _pair(config), x, torch.arange(20) % 4)


def test_declines():
    x = 0.1 * torch.randn(16, 6, dtype=torch.float64)  # (raw dot products inside HistogramLoss's bins)
    labels = torch.arange(16) % 4
    pairs = (torch.tensor([0, 4]), torch.tensor([4, 0]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    cases = [
        (losses.HistogramLoss(), dict(indices_tuple=pairs), "indices_tuple"),
        (losses.FastAPLoss(distance=distances.LpDistance(power=3)), {}, "power"),
        (losses.RankedListLoss(margin=0.4, Tn=1.0, distance=distances.LpDistance(normalize_embeddings=False)),
         {}, "distance"),
        (losses.HistogramLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False)), {}, "distance"),
    ]
    for loss_fn, kw, why in cases:
        loss_fn(x, labels, **kw)
        assert loss_fn.last_backend == "reference" and why in loss_fn.last_fallback, (loss_fn, loss_fn.last_fallback)
    for config in ("ranked_list", "fast_ap", "histogram", "smooth_ap"):
        ours, _ = _pair(config)
        with pytest.raises(ValueError, match="ref_emb"):  # as PML, before either path runs
            ours(x, labels, ref_emb=x.clone(), ref_labels=labels)
        assert ours.last_backend is None
    half = losses.RankedListLoss(margin=0.4, Tn=1.0)
    half(x.half(), labels)
    assert half.last_backend == "reference" and "dtype" in half.last_fallback
    unequal = losses.SmoothAPLoss()
    with pytest.raises(ValueError):
        unequal(x, torch.tensor([0] * 6 + [1] * 5 + [2] * 5))
    assert unequal.last_backend == "reference" and "unequal" in unequal.last_fallback


@pytest.mark.parametrize("ctor", ["losses.RankedListLoss(margin=0.4, Tn=1.0)", "losses.FastAPLoss()",
                                  "losses.HistogramLoss()"])
def test_memory_is_linear_in_n(ctor):
    """fwd+bwd at N=8192 grows peak RSS by < 96 MiB (one N x N fp32 matrix: 256 MiB; measured
    26-28 MiB on a 2-core AMD EPYC, after a warm-up call), measured in a fresh process (N=8192:
    a quarter of N=16384's CI time)."""
    growth_mib = blocked_call_peak_mib(ctor, 8192)
    print(f"{ctor}: peak RSS +{growth_mib:.0f} MiB")
    assert growth_mib < 96, f"peak RSS grew by {growth_mib:.0f} MiB"


def test_smooth_ap_memory_below_pml():
    """SmoothAP at N=256 (8 classes of 32): PML builds several (N, N, N) tensors (64 MiB each in
    fp32); the blocked path stays under 32 MiB (1/8 of PML)."""
    setup = """
        import pytorch_metric_learning.losses as pml_losses
        torch.manual_seed(0)
        x = torch.randn(256, 32, requires_grad=True)
        labels = torch.arange(8).repeat_interleave(32)
        loss_fn = {ctor}
        loss_fn(x, labels).backward()  # warm-up: thread pool and allocator start outside the measured call
        x.grad = None
    """
    run = """
        loss = loss_fn(x, labels)
        loss.backward()
        assert getattr(loss_fn, "last_backend", "blocked") == "blocked"
    """
    ours = peak_rss_growth_mib(setup=setup.format(ctor="losses.SmoothAPLoss()"), measured=run)
    pml = peak_rss_growth_mib(setup=setup.format(ctor="pml_losses.SmoothAPLoss()"), measured=run)
    print(f"SmoothAP N=256: peak RSS +{ours:.0f} MiB (PML +{pml:.0f} MiB)")
    assert ours < 32 and ours < pml / 8, (ours, pml)


@pytest.mark.parametrize("case", ["fused_cosine", "reference_raw_dot"])
def test_ranked_list_unselected_weights_do_not_overflow_into_nan_gradients(case):
    """PML takes exp(Tn (alpha - v)) of the selected negatives only (a masked assignment); an
    unselected entry (v <= 0) can overflow there (the cosine at Tn = 80: e^160; a large negative raw
    dot product), and a select's zero gradient times inf is NaN. dmlkern's gradients are PML's, finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    labels = torch.randint(0, 3, (16,), generator=g)
    if case == "fused_cosine":
        kw, dist = dict(margin=0.4, Tn=80, imbalance=0.5, alpha=1.0, Tp=0), ("CosineSimilarity", {})
    else:
        x = 10 * x
        kw, dist = dict(margin=0.4, Tn=10, imbalance=0.0, alpha=1.0, Tp=0), ("DotProductSimilarity",
                                                                             dict(normalize_embeddings=False))
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # both warn of large temperatures
        for lmod, dmod in ((pml_losses, pml_distances), (losses, distances)):
            loss = lmod.RankedListLoss(distance=getattr(dmod, dist[0])(**dist[1]), **kw)
            xx = x.clone().requires_grad_()
            value = loss(xx, labels)
            value.backward()
            out.append((value.detach(), xx.grad))
    assert torch.isfinite(out[0][1]).all(), "PML's gradient is finite here"
    expected = "blocked" if case == "fused_cosine" else "reference"
    assert loss.last_backend == expected, loss.last_fallback
    for theirs, ours in zip(*out):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])
