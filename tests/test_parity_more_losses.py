"""The losses of issue 18 (reference implementations) against PML 2.9.0 itself: values and
gradients (embeddings and the losses' own parameters), fp32 and fp64, default and other
arguments, miners' tuples (dmlkern's lazy ones on our side, PML's on theirs), reducers,
degenerate batches, pickling / deepcopy."""
import copy
import pickle
import warnings

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from dmlkern import distances, losses, miners, reducers
from dmlkern._validation import InvalidInputError

from _pml_helpers import assert_close, compare, make_inputs, random_indices

warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # PML's HistogramLoss indexing

DTYPES = [torch.float32, torch.float64]


def _pair(name, seed=0, **kw):
    """(ours, PML's) built from the same seed (the losses with parameters draw them at init)."""
    def build(lib, dist_lib, red_lib):
        args = {k: (v(dist_lib, red_lib) if callable(v) else v) for k, v in kw.items()}
        torch.manual_seed(seed)
        return getattr(lib, name)(**args)
    return build(losses, distances, reducers), build(pml_losses, pml_distances, pml_reducers)


def lp(**kw):
    return lambda d, r: d.LpDistance(**kw)


def red(cls, **kw):
    return lambda d, r: getattr(r, cls)(**kw)


def _params(loss):
    return [p for p in loss.parameters()]


def _labels_balanced(classes, per_class, interleaved=False):
    return torch.arange(classes).repeat(per_class) if interleaved else torch.arange(classes).repeat_interleave(per_class)


def _clustered(n, d, dtype, seed=0):
    """Rows close together (unit directions, small spread): every d_ap - d_an well inside
    DynamicSoftMargin's histogram range."""
    g = torch.Generator().manual_seed(seed)
    return (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) * 0.2
            + torch.randn(1, d, generator=g, dtype=torch.float64)).to(dtype)


# id -> (loss name, constructor kwargs, input kind)
CASES = {
    "intra_pair": ("IntraPairVarianceLoss", {}, "labels"),
    "intra_pair_lp_eps": ("IntraPairVarianceLoss", dict(pos_eps=0.05, neg_eps=0.1, distance=lp()), "labels"),
    "intra_pair_mean": ("IntraPairVarianceLoss", dict(reducer=red("MeanReducer")), "labels"),
    "snr": ("SignalToNoiseRatioContrastiveLoss", {}, "labels"),
    "snr_margins_sum": ("SignalToNoiseRatioContrastiveLoss", dict(pos_margin=0.1, neg_margin=0.8,
                                                                  reducer=red("SumReducer")), "labels"),
    "tcm": ("ThresholdConsistentMarginLoss", {}, "labels"),
    "tcm_args": ("ThresholdConsistentMarginLoss", dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.3,
                                                       margin_minus=0.1), "labels"),
    "instance": ("InstanceLoss", {}, "labels"),
    "instance_gamma": ("InstanceLoss", dict(gamma=16, reducer=red("AvgNonZeroReducer")), "labels"),
    "fast_ap": ("FastAPLoss", {}, "labels"),
    "fast_ap_bins_pow1": ("FastAPLoss", dict(num_bins=5, distance=lp(power=1)), "labels"),
    "fast_ap_sum": ("FastAPLoss", dict(reducer=red("SumReducer")), "labels"),
    "histogram": ("HistogramLoss", {}, "labels"),
    "histogram_bins": ("HistogramLoss", dict(n_bins=20), "labels"),
    "histogram_delta": ("HistogramLoss", dict(delta=0.05, n_bins=40), "labels"),
    "ranked_list": ("RankedListLoss", dict(margin=0.4, Tn=1.0), "labels"),
    "ranked_list_args": ("RankedListLoss", dict(margin=0.6, Tn=2.0, imbalance=0.3, alpha=1.1, Tp=0.5), "labels"),
    "pnp_O": ("PNPLoss", {}, "labels"),
    "pnp_Ds": ("PNPLoss", dict(variant="Ds", anneal=0.05), "labels"),
    "pnp_Dq": ("PNPLoss", dict(variant="Dq", alpha=2), "labels"),
    "pnp_Iu": ("PNPLoss", dict(variant="Iu"), "labels"),
    "pnp_Ib": ("PNPLoss", dict(variant="Ib", b=3), "labels"),
    "smooth_ap": ("SmoothAPLoss", {}, "balanced"),
    "smooth_ap_interleaved": ("SmoothAPLoss", dict(temperature=0.05), "interleaved"),
    "smooth_ap_3x8": ("SmoothAPLoss", {}, "balanced_3x8"),
    "p2sgrad": ("P2SGradLoss", dict(descriptors_dim=8, num_classes=4), "labels"),
    "manifold": ("ManifoldLoss", dict(l=8, K=5), "unlabelled"),
    "manifold_args": ("ManifoldLoss", dict(l=8, K=3, lambdaC=0.5, alpha=0.6, margin=0.01), "unlabelled"),
    "manifold_meta": ("ManifoldLoss", dict(l=8, K=4), "meta_classes"),
    "manifold_meta_list": ("ManifoldLoss", dict(l=8, K=3), "meta_classes_list"),
    "dynamic_soft_margin": ("DynamicSoftMarginLoss", {}, "clustered"),
    "dynamic_soft_margin_args": ("DynamicSoftMarginLoss", dict(min_val=-1.0, num_bins=20, momentum=0.1), "clustered"),
    "vicreg": ("VICRegLoss", {}, "views"),
    "vicreg_args": ("VICRegLoss", dict(invariance_lambda=5, variance_mu=2, covariance_v=3, eps=1e-3), "views"),
}


def _inputs(kind, dtype):
    """(embeddings, labels, extra forward kwargs)."""
    emb, labels, _, _ = make_inputs(7, 24, 8, 4, dtype)
    if kind == "balanced":
        return emb, _labels_balanced(4, 6), {}
    if kind == "interleaved":
        return emb, _labels_balanced(4, 6, interleaved=True), {}
    if kind == "balanced_3x8":
        return emb, _labels_balanced(3, 8), {}
    if kind == "unlabelled":
        return emb, None, {}
    if kind == "meta_classes":
        return emb, None, {"indices_tuple": torch.arange(24) % 4}
    if kind == "meta_classes_list":
        return emb, None, {"indices_tuple": [i % 3 for i in range(24)]}
    if kind == "clustered":
        return _clustered(24, 8, dtype), labels, {}
    if kind == "views":
        ref = emb.flip(0) + 0.3 * make_inputs(8, 24, 8, 4, dtype)[0]
        return emb, None, {"ref": ref}
    return emb, labels, {}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_value_and_gradients(case, dtype):
    name, kw, kind = CASES[case]
    ours, pml = _pair(name, **kw)
    emb, labels, call = _inputs(kind, dtype)
    compare(ours, pml, emb, labels, ours_params=_params(ours), pml_params=_params(pml), seed=3, **call)


# ----------------------------------------------------------------------------- indices_tuple
# losses that take a tuple: pairs / triplets, hand-built (with duplicates) or from a miner
TUPLE_LOSSES = {
    "IntraPairVarianceLoss": {},
    "SignalToNoiseRatioContrastiveLoss": {},
    "ThresholdConsistentMarginLoss": {},
    "FastAPLoss": {},  # the tuple gives per-query weights
    "HistogramLoss": {},
    "DynamicSoftMarginLoss": {},
}


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
@pytest.mark.parametrize("name", list(TUPLE_LOSSES))
def test_hand_built_indices_tuple(name, kind):
    emb, labels, _, _ = make_inputs(11, 20, 8, 4, torch.float64)
    if name == "DynamicSoftMarginLoss":
        emb = _clustered(20, 8, torch.float64, seed=11)
    tup = random_indices(11, kind, labels, n=15)
    ours, pml = _pair(name, **TUPLE_LOSSES[name])
    compare(ours, pml, emb, labels, tup)
    if name not in ("FastAPLoss", "DynamicSoftMarginLoss"):  # these read labels (without: another loss)
        ours, pml = _pair(name, **TUPLE_LOSSES[name])
        compare(ours, pml, emb, None, tup)


@pytest.mark.parametrize("miner", ["MultiSimilarityMiner", "TripletMarginMiner"])
@pytest.mark.parametrize("name", ["IntraPairVarianceLoss", "FastAPLoss", "HistogramLoss", "SmoothAPLoss",
                                  "ThresholdConsistentMarginLoss"])
def test_miner_tuples_lazy_on_our_side(name, miner):
    emb, _, _, _ = make_inputs(12, 24, 8, 4, torch.float32)
    labels = _labels_balanced(4, 6)
    ours_tuple = getattr(miners, miner)()(emb, labels)
    assert isinstance(ours_tuple, tuple)
    pml_tuple = getattr(pml_miners, miner)()(emb, labels)
    ours, pml = _pair(name)
    compare(ours, pml, emb, labels, ours_tuple)  # run_loss passes the same tuple to both...
    compare(ours, pml, emb, labels, pml_tuple)   # ...so PML's own tuple too
    for x, y in zip(ours_tuple, pml_tuple):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------- degenerate batches
def _degenerate(case):
    g = torch.Generator().manual_seed(5)
    if case == "one_sample":
        return torch.randn(1, 8, generator=g), torch.tensor([2])
    if case == "one_class":
        return torch.randn(6, 8, generator=g), torch.zeros(6, dtype=torch.long)
    return torch.randn(0, 8, generator=g), torch.zeros(0, dtype=torch.long)


DEGENERATE = ["IntraPairVarianceLoss", "SignalToNoiseRatioContrastiveLoss", "ThresholdConsistentMarginLoss",
              "InstanceLoss", "FastAPLoss", "HistogramLoss", "RankedListLoss", "PNPLoss", "SmoothAPLoss",
              "P2SGradLoss", "ManifoldLoss", "DynamicSoftMarginLoss", "VICRegLoss"]
# (loss, batch) where PML gives NaN or raises: dmlkern gives the grad-carrying zero (README deviations)
PML_FAILS = {
    ("InstanceLoss", "empty"), ("RankedListLoss", "empty"), ("SmoothAPLoss", "empty"), ("P2SGradLoss", "empty"),
    ("ManifoldLoss", "empty"), ("VICRegLoss", "empty"), ("VICRegLoss", "one_sample"),
}
DEGENERATE_KW = {"RankedListLoss": dict(margin=0.4, Tn=1.0), "P2SGradLoss": dict(descriptors_dim=8, num_classes=4),
                 "ManifoldLoss": dict(l=8, K=1)}


@pytest.mark.parametrize("batch", ["one_sample", "one_class", "empty"])
@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_batches(name, batch):
    emb, labels = _degenerate(batch)
    if name in ("ManifoldLoss", "VICRegLoss"):
        labels = None
    call = {"ref": emb + 0.1} if name == "VICRegLoss" else {}
    ours, pml = _pair(name, **DEGENERATE_KW.get(name, {}))
    if (name, batch) not in PML_FAILS:
        compare(ours, pml, emb, labels, seed=1, **call)
        return
    x = emb.clone().requires_grad_()
    value = ours(x, labels, ref_emb=call.get("ref"))
    value.backward()
    assert value.item() == 0 and x.grad is not None and torch.all(x.grad == 0)


# ----------------------------------------------------------------------------- PML's quirks and errors
def test_smooth_ap_is_float32_and_checks_class_sizes():
    emb, _, _, _ = make_inputs(3, 12, 8, 3, torch.float64)
    assert losses.SmoothAPLoss()(emb, _labels_balanced(3, 4)).dtype == torch.float32  # as PML's
    with pytest.raises(ValueError, match="same number of elements"):
        losses.SmoothAPLoss()(emb, torch.tensor([0] * 5 + [1] * 4 + [2] * 3))


def test_dynamic_soft_margin_runs_twice_and_keeps_pml_values():
    """PML's hist_ keeps its graph (its second backward raises); values of both calls match."""
    ours, pml = _pair("DynamicSoftMarginLoss")
    for seed in (0, 1):
        emb = _clustered(16, 8, torch.float32, seed)
        labels = torch.arange(16) % 4
        x = emb.clone().requires_grad_()
        value = ours(x, labels)
        value.backward()
        with torch.no_grad():
            assert_close(value.detach(), pml(emb, labels), torch.float32)
        assert_close(ours.hist_, pml.hist_.detach(), torch.float32, "hist_")
        assert not ours.hist_.requires_grad


def test_dynamic_soft_margin_without_labels():
    """Row i of embeddings and ref_emb are the positive pair. PML's backward fails there (an
    in-place write on the distance matrix): its values only."""
    emb = _clustered(12, 8, torch.float64, 4)
    ref = _clustered(10, 8, torch.float64, 5)
    ours, pml = _pair("DynamicSoftMarginLoss")
    x = emb.clone().requires_grad_()
    value = ours(x, None, ref_emb=ref)
    value.backward()
    assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert_close(value.detach(), pml(emb, None, ref_emb=ref), torch.float64)


def test_dynamic_soft_margin_last_bin_is_clamped():
    """A difference in the histogram's last bin or below its range: PML raises an index error,
    dmlkern counts it in the last / first bin."""
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.999, 0.04]])
    labels = torch.tensor([0, 0, 1])  # d_ap = 2, d_an ~ 0.04: the difference is in the last bin
    with pytest.raises(RuntimeError, match="out of bounds"):
        pml_losses.DynamicSoftMarginLoss()(emb, labels)
    value = losses.DynamicSoftMarginLoss()(emb, labels)
    assert torch.isfinite(value)
    labels = torch.tensor([0, 1, 0])  # d_ap ~ 0.04, d_an = 2: below min_val=-1
    with pytest.raises(RuntimeError, match="out of bounds"):
        pml_losses.DynamicSoftMarginLoss(min_val=-1.0)(emb, labels)
    assert torch.isfinite(losses.DynamicSoftMarginLoss(min_val=-1.0)(emb, labels))


@pytest.mark.parametrize("name,kw,exc", [
    ("FastAPLoss", dict(distance=lp(normalize_embeddings=False)), AssertionError),
    ("SmoothAPLoss", dict(distance=lp()), AssertionError),
    ("PNPLoss", dict(distance=lp()), AssertionError),
    ("PNPLoss", dict(variant="X"), ValueError),
    ("InstanceLoss", dict(distance=lp()), AssertionError),
    ("ThresholdConsistentMarginLoss", dict(distance=lp()), AssertionError),
    ("DynamicSoftMarginLoss", dict(distance=lambda d, r: d.CosineSimilarity()), AssertionError),
    ("SignalToNoiseRatioContrastiveLoss", dict(distance=lp()), AssertionError),
    ("HistogramLoss", dict(n_bins=10, delta=0.1), AssertionError),
    ("RankedListLoss", dict(margin=0.4, Tn=1.0, imbalance=2), AssertionError),
    ("ManifoldLoss", dict(l=8, lambdaC=-1), ValueError),
])
def test_constructor_errors_as_pml(name, kw, exc):
    for lib, dist_lib, red_lib in ((losses, distances, reducers), (pml_losses, pml_distances, pml_reducers)):
        args = {k: (v(dist_lib, red_lib) if callable(v) else v) for k, v in kw.items()}
        with pytest.raises(exc):
            getattr(lib, name)(**args)


def test_vicreg_rejects_distance_and_regularizer():
    with pytest.raises(ValueError):
        losses.VICRegLoss(distance=distances.CosineSimilarity())
    with pytest.raises(ValueError):
        losses.VICRegLoss(embedding_regularizer=lambda x: x.sum())


@pytest.mark.parametrize("name,kw,call", [
    ("FastAPLoss", {}, dict(ref_emb=True)),
    ("PNPLoss", {}, dict(indices_tuple=True)),
    ("RankedListLoss", dict(margin=0.4, Tn=1.0), dict(indices_tuple=True)),
    ("InstanceLoss", {}, dict(indices_tuple=True)),
    ("ManifoldLoss", dict(l=8, K=2), dict(labels=True)),
    ("VICRegLoss", {}, dict(labels=True)),
    ("FastAPLoss", {}, dict(labels=None)),
])
def test_unsupported_inputs_raise_value_error(name, kw, call):
    emb, labels, _, _ = make_inputs(2, 12, 8, 3, torch.float32)
    tup = random_indices(2, "pairs", labels, n=5)
    args = dict(labels=labels, indices_tuple=None, ref_emb=None)
    if name in ("ManifoldLoss", "VICRegLoss"):
        args["labels"] = None
    for k, v in call.items():
        args[k] = {"ref_emb": emb + 1, "indices_tuple": tup, "labels": labels}[k] if v is True else v
    for lib in (losses, pml_losses):
        torch.manual_seed(0)
        with pytest.raises(ValueError):
            getattr(lib, name)(**kw)(emb, **args)


# ----------------------------------------------------------------------------- statistics, pickling
@pytest.mark.parametrize("case", ["intra_pair", "fast_ap", "histogram", "ranked_list", "instance", "manifold",
                                  "dynamic_soft_margin", "p2sgrad"])
def test_recordable_attributes_as_pml(case):
    name, kw, _ = CASES[case]
    ours, pml = _pair(name, **kw)
    assert getattr(ours, "_record_these", []) == getattr(pml, "_record_these", [])
    for attr in getattr(pml, "_record_these", []):
        assert getattr(ours, attr) == getattr(pml, attr), attr


@pytest.mark.parametrize("case", ["intra_pair", "fast_ap", "p2sgrad", "manifold", "dynamic_soft_margin", "vicreg",
                                  "smooth_ap", "pnp_O"])
def test_pickle_and_deepcopy(case):
    name, kw, kind = CASES[case]
    loss, _ = _pair(name, **kw)
    emb, labels, call = _inputs(kind, torch.float32)
    fwd = dict(labels=labels, ref_emb=call.get("ref"), indices_tuple=call.get("indices_tuple"))
    torch.manual_seed(0)
    want = loss(emb, **fwd)
    for clone in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        if name == "DynamicSoftMarginLoss":  # its histogram moved on: start both from the same state
            clone.hist_ = loss.hist_.clone()
            loss_copy = copy.deepcopy(loss)
            torch.manual_seed(0)
            want = loss_copy(emb, **fwd)
        torch.manual_seed(0)
        assert_close(clone(emb, **fwd), want, torch.float32)


def test_snr_runs_blocked():
    emb, labels, _, _ = make_inputs(4, 16, 8, 4, torch.float32)
    loss = losses.SignalToNoiseRatioContrastiveLoss()
    loss(emb, labels)
    assert loss.last_backend == "blocked" and loss.last_fallback is None
    with pytest.raises(InvalidInputError):
        losses.SignalToNoiseRatioContrastiveLoss(distance=distances.LpDistance())


@pytest.mark.parametrize("case", ["intra_pair", "fast_ap", "histogram", "ranked_list", "instance", "pnp_O",
                                  "smooth_ap", "tcm", "vicreg", "manifold"])
def test_statistics_as_pml(case):
    """With COLLECT_STATS on, the loss's distance and reducers record PML's statistics."""
    from pytorch_metric_learning.utils import common_functions as pml_cf

    from dmlkern.utils import common_functions as cf

    name, kw, kind = CASES[case]
    old = cf.COLLECT_STATS, pml_cf.COLLECT_STATS
    try:
        cf.COLLECT_STATS = pml_cf.COLLECT_STATS = True
        ours, pml = _pair(name, **kw)
    finally:
        cf.COLLECT_STATS, pml_cf.COLLECT_STATS = old
    emb, labels, call = _inputs(kind, torch.float64)
    for loss in (ours, pml):
        torch.manual_seed(0)
        loss(emb, labels, indices_tuple=call.get("indices_tuple"), ref_emb=call.get("ref"))
    pairs = [(ours.distance, pml.distance), (ours.reducer, pml.reducer)]
    if hasattr(pml.reducer, "reducers"):
        pairs += [(ours.reducer.reducers[k], pml.reducer.reducers[k]) for k in pml.reducer.reducers]
    for o, p in pairs:
        assert getattr(o, "_record_these_stats", []) == getattr(p, "_record_these_stats", [])
        for attr in getattr(p, "_record_these_stats", []):
            assert getattr(o, attr) == pytest.approx(getattr(p, attr), rel=1e-9), (type(o).__name__, attr)


def test_no_warnings_in_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for case, (name, kw, kind) in CASES.items():
            emb, labels, call = _inputs(kind, torch.float32)
            loss, _ = _pair(name, **kw)
            e = emb.clone().requires_grad_()
            loss(e, labels, indices_tuple=call.get("indices_tuple"), ref_emb=call.get("ref")).backward()
