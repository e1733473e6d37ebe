"""Statistics (``collect_stats`` / the global switch) vs pytorch-metric-learning 2.9.0: every
attribute PML records, with the same ``_record_these`` / ``_record_these_stats`` lists, for every
loss, miner, reducer and distance PML gives statistics; the fused losses keep their backend."""
import math

import pytest
import pytorch_metric_learning.distances as PD
import pytorch_metric_learning.losses as PL
import pytorch_metric_learning.miners as PM
import pytorch_metric_learning.reducers as PR
import torch
from pytorch_metric_learning.utils import common_functions as pml_cf

import dmlkern.distances as DD
import dmlkern.losses as DL
import dmlkern.miners as DM
import dmlkern.reducers as DR
from dmlkern import _tracing
from dmlkern.utils import common_functions as our_cf

N, D = 24, 8


def _batch(seed=0, n=N, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, classes, (n,), generator=g)


def _close(a, b):
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-4 * max(1.0, abs(a))


def assert_same_stats(pml_obj, our_obj, extra=()):
    for lst in ("_record_these", "_record_these_stats"):
        assert getattr(our_obj, lst, None) == getattr(pml_obj, lst, None), lst
    names = list(getattr(pml_obj, "_record_these_stats", [])) + list(extra)
    for name in names + (["num_above_high"] if hasattr(pml_obj, "num_above_high") else []):
        assert _close(getattr(pml_obj, name), getattr(our_obj, name)), (name, getattr(pml_obj, name), getattr(our_obj, name))


@pytest.fixture(params=["arg", "global"])
def stats_on(request, monkeypatch):
    """kwargs turning statistics on: collect_stats=True, or the global switches (read at
    construction, as in PML)."""
    if request.param == "global":
        monkeypatch.setattr(pml_cf, "COLLECT_STATS", True)
        monkeypatch.setattr(our_cf, "COLLECT_STATS", True)
        return {}
    return {"collect_stats": True}


def _both(name, pml_mod, our_mod, **kw):
    return getattr(pml_mod, name)(**kw), getattr(our_mod, name)(**kw)


# ------------------------------------------------------------------------------------- miners
MINER_CASES = [
    ("PairMarginMiner", {}), ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=1.1)),
    ("TripletMarginMiner", {}), ("TripletMarginMiner", dict(type_of_triplets="semihard", margin=0.6)),
    ("AngularMiner", {}), ("AngularMiner", dict(angle=45)),
    ("BatchHardMiner", {}), ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", dict(pos_strategy="all", neg_strategy="hard")),
    ("BatchEasyHardMiner", dict(pos_strategy="hard", neg_strategy="all")),
    ("BatchEasyHardMiner", dict(pos_strategy="all", neg_strategy="all")),
    ("BatchEasyHardMiner", dict(pos_strategy="semihard", neg_strategy="hard")),
    ("HDCMiner", {}), ("DistanceWeightedMiner", {}),
]


@pytest.mark.parametrize("dist", [None, "cos"])
@pytest.mark.parametrize("name,kw", MINER_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(MINER_CASES)])
def test_miner_stats(name, kw, dist, stats_on):
    if dist == "cos" and name in ("AngularMiner", "DistanceWeightedMiner"):
        # both libraries reject a non-Lp distance for these miners (no statistics to compare)
        for miners_module, distances_module in ((PM, PD), (DM, DD)):
            with pytest.raises(AssertionError, match="LpDistance"):
                getattr(miners_module, name)(distance=distances_module.CosineSimilarity())
        return
    if dist == "cos":
        kw = dict(kw, distance=None)
    p, o = _both(name, PM, DM, **kw, **stats_on)
    if dist == "cos":
        p.distance, o.distance = PD.CosineSimilarity(), DD.CosineSimilarity()
    for seed in (0, 1):  # the second call checks the reset
        x, y = _batch(seed)
        torch.manual_seed(seed)
        p(x, y)
        torch.manual_seed(seed)
        o(x, y)
        assert_same_stats(p, o)


def test_miner_stats_with_ref_and_no_triplets(stats_on):
    x, y = _batch(2)
    ref, ref_y = _batch(3, n=10)
    for name in ("TripletMarginMiner", "PairMarginMiner", "AngularMiner", "BatchHardMiner"):
        p, o = _both(name, PM, DM, **stats_on)
        p(x, y, ref, ref_y)
        o(x, y, ref, ref_y)
        assert_same_stats(p, o)
        one = torch.zeros(N, dtype=torch.long)  # no negatives: empty triplet sets
        p(x, one)
        o(x, one)
        assert_same_stats(p, o)


def test_miner_counts_without_collect_stats():
    x, y = _batch(0)
    for name, kw in MINER_CASES:
        p, o = _both(name, PM, DM, **kw)
        torch.manual_seed(0)
        p(x, y)
        torch.manual_seed(0)
        o(x, y)
        for a in ("num_pos_pairs", "num_neg_pairs", "num_triplets"):
            if hasattr(p, a):
                assert getattr(p, a) == getattr(o, a)
        assert getattr(o, "_record_these_stats", None) is None
        assert all(getattr(o, s, 0) == 0 for s in ("pos_pair_dist", "average_angle", "hardest_pos_pair"))


# ----------------------------------------------------------------------------------- reducers
def _loss_dicts():
    g = torch.Generator().manual_seed(5)
    losses = torch.rand(20, generator=g) - 0.3
    idx = torch.arange(20)
    pairs = (torch.randint(0, N, (20,), generator=g), torch.randint(0, N, (20,), generator=g))
    return {
        "element": {"loss": {"losses": losses, "indices": idx, "reduction_type": "element", "divisor": 7}},
        "pos_pair": {"loss": {"losses": losses, "indices": pairs, "reduction_type": "pos_pair", "divisor": 3}},
        "already_reduced": {"loss": {"losses": losses.sum(), "indices": None, "reduction_type": "already_reduced"}},
        "zero": {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}},
    }


REDUCER_CASES = [
    ("MeanReducer", {}), ("SumReducer", {}), ("AvgNonZeroReducer", {}), ("ThresholdReducer", dict(low=0.1)),
    ("ThresholdReducer", dict(high=0.4)), ("ThresholdReducer", dict(low=0.05, high=0.4)), ("DivisorReducer", {}),
    ("PerAnchorReducer", {}), ("ClassWeightedReducer", dict(weights=torch.tensor([1.0, 2.0, 0.5, 3.0]))),
]


# PerAnchorReducer with an element-wise loss hands it to its inner MeanReducer (the MeanReducer
# case): that combination is not listed.
REDUCER_KIND_CASES = [pytest.param(name, kw, kind, id=f"{kind}-{name}-{i}")
                      for kind in ("element", "pos_pair", "already_reduced", "zero")
                      for i, (name, kw) in enumerate(REDUCER_CASES)
                      if not (name == "PerAnchorReducer" and kind == "element")]


@pytest.mark.parametrize("name,kw,kind", REDUCER_KIND_CASES)
def test_reducer_stats(name, kw, kind, stats_on):
    p, o = _both(name, PR, DR, **kw, **stats_on)
    x, y = _batch(0)
    for k in (kind, "zero"):  # then a zero loss: the reset
        d = _loss_dicts()[k]
        p(d, x, y)
        o(d, x, y)
        assert_same_stats(p, o)


def test_multiple_reducers_stats(stats_on):
    x, y = _batch(0)
    d = {"a": _loss_dicts()["element"]["loss"], "b": _loss_dicts()["pos_pair"]["loss"]}
    p = PR.MultipleReducers({"a": PR.AvgNonZeroReducer(**stats_on)}, **stats_on)
    o = DR.MultipleReducers({"a": DR.AvgNonZeroReducer(**stats_on)}, **stats_on)
    assert torch.allclose(p(d, x, y), o(d, x, y))
    assert_same_stats(p, o)
    assert_same_stats(p.reducers["a"], o.reducers["a"])
    assert_same_stats(p.default_reducer, o.default_reducer)


def test_divisor_recorded_without_collect_stats():
    x, y = _batch(0)
    p, o = PR.DivisorReducer(), DR.DivisorReducer()
    d = _loss_dicts()["element"]
    p(d, x, y)
    o(d, x, y)
    assert p.divisor == o.divisor == 7
    assert getattr(o, "_record_these_stats", None) is None and o.losses_size == 0


# ---------------------------------------------------------------------------------- distances
DIST_CASES = [("LpDistance", {}), ("LpDistance", dict(normalize_embeddings=False, power=2)), ("CosineSimilarity", {}),
              ("DotProductSimilarity", dict(normalize_embeddings=False)), ("SNRDistance", {}), ("LpDistance", dict(p=1))]


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("name,kw", DIST_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(DIST_CASES)])
def test_distance_stats(name, kw, with_ref, stats_on):
    p, o = _both(name, PD, DD, **kw, **stats_on)
    x, _ = _batch(0)
    ref = _batch(1, n=9)[0] * 3 if with_ref else None
    assert torch.allclose(p(x, ref), o(x, ref), atol=1e-5)
    assert_same_stats(p, o)
    o2 = getattr(DD, name)(**kw, **stats_on)
    o2.record_stats(x, ref)  # the fused losses' way: no matrix
    assert_same_stats(p, o2)


# -------------------------------------------------------------------------- losses (reference)
def _copy_weights(p, o):
    for a in ("W", "proxies"):
        if hasattr(p, a) and hasattr(o, a):
            getattr(o, a).data.copy_(getattr(p, a).data)


CLASS_LOSSES = ["LargeMarginSoftmaxLoss", "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "SubCenterArcFaceLoss"]
LOSS_CASES = [("AngularLoss", {}), ("TupletMarginLoss", {}), ("NPairsLoss", {})] + [
    (n, dict(num_classes=4, embedding_size=D)) for n in CLASS_LOSSES
]


@pytest.mark.parametrize("name,kw", LOSS_CASES, ids=[n for n, _ in LOSS_CASES])
def test_loss_stats(name, kw, stats_on):
    torch.manual_seed(0)
    p, o = _both(name, PL, DL, **kw, **stats_on)
    _copy_weights(p, o)
    for seed in (0, 1):
        x, y = _batch(seed)
        assert torch.allclose(p(x, y), o(x, y), rtol=1e-4, atol=1e-5)
        assert_same_stats(p, o)
    one = torch.zeros(N, dtype=torch.long)  # no negatives: PML records nothing after the reset
    if name not in CLASS_LOSSES:
        p(x, one)
        o(x, one)
        assert_same_stats(p, o)


def test_loss_stats_with_indices_tuple_and_ref(stats_on):
    x, y = _batch(0)
    ref, ref_y = _batch(1, n=12)
    mined = PM.TripletMarginMiner(margin=0.5)(x, y)
    for name in ("AngularLoss", "TupletMarginLoss"):
        p, o = _both(name, PL, DL, **stats_on)
        p(x, y, mined)
        o(x, y, mined)
        assert_same_stats(p, o)
        p(x, y, ref_emb=ref, ref_labels=ref_y)
        o(x, y, ref_emb=ref, ref_labels=ref_y)
        assert_same_stats(p, o)
    p, o = _both("NPairsLoss", PL, DL, **stats_on)
    p(x, y, mined)
    o(x, y, mined)
    assert_same_stats(p, o)


def test_no_stats_computed_without_collect_stats(monkeypatch):
    """collect_stats=False: NPairsLoss.num_pairs (PML records it always) matches; the other
    statistics' code does not run."""
    import dmlkern.losses.angular_loss as ang
    import dmlkern.losses.tuplet_margin_loss as tup
    import dmlkern.miners.angular_miner as am
    import dmlkern.miners.triplet_margin_miner as tm

    def boom(*a, **k):
        raise AssertionError("statistics computed without collect_stats")

    for mod, fn in ((ang, "angular_loss_average_angle"), (tup, "degrees_mean_acos"), (am, "AngleStats"),
                    (tm, "triplet_means")):
        monkeypatch.setattr(mod, fn, boom)
    x, y = _batch(0)
    for name, kw in LOSS_CASES:
        torch.manual_seed(0)
        p, o = _both(name, PL, DL, **kw)
        _copy_weights(p, o)
        p(x, y)
        o(x, y)
        assert getattr(o, "_record_these_stats", None) is None
        assert getattr(o, "avg_angle", 0) == getattr(o, "average_angle", 0) == getattr(o, "avg_pos_angle", 0) == 0
    p, o = PL.NPairsLoss(), DL.NPairsLoss()
    p(x, y)
    o(x, y)
    assert p.num_pairs == o.num_pairs == 4
    DM.AngularMiner()(x, y)
    DM.TripletMarginMiner()(x, y)


def test_loss_stats_do_not_change_loss_or_grad():
    x, y = _batch(0)
    for name, kw in LOSS_CASES:
        torch.manual_seed(0)
        a = getattr(DL, name)(**kw)
        torch.manual_seed(0)
        b = getattr(DL, name)(**kw, collect_stats=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        lb = b(xb, y)
        if getattr(b, "last_backend", None) == "reference":  # statistics a fused path can't give:
            a.backend = "reference"  # compare with the same path without them
        la = a(xa, y)
        la.backward()
        lb.backward()
        assert torch.equal(la, lb) and torch.equal(xa.grad, xb.grad), name


# ------------------------------------------------------------------------------ fused losses
FUSED_CASES = [("MultiSimilarityLoss", {}, "cos"), ("NTXentLoss", {}, "cos"), ("SupConLoss", {}, "cos"),
               ("GeneralizedLiftedStructureLoss", {}, "lp"), ("LiftedStructureLoss", {}, "lp"),
               ("NPairsLoss", {}, "dot"), ("ProxyAnchorLoss", dict(num_classes=4, embedding_size=D), "cos")]
_DIST = {"cos": "CosineSimilarity", "lp": "LpDistance", "dot": "DotProductSimilarity"}


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("name,kw,dist", FUSED_CASES, ids=[n for n, _, _ in FUSED_CASES])
def test_fused_loss_stats_stay_fused(name, kw, dist, static, stats_on, monkeypatch):
    """The distance's norms (O(N D)), NPairsLoss.num_pairs and the reducer's losses_size (O(N)
    from label counts) are recorded on the fused path, equal to PML's."""
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    torch.manual_seed(0)
    p = getattr(PL, name)(**kw, distance=getattr(PD, _DIST[dist])(**stats_on), **stats_on)
    o = getattr(DL, name)(**kw, distance=getattr(DD, _DIST[dist])(**stats_on), **stats_on)
    _copy_weights(p, o)
    for seed in (0, 1):
        x, y = _batch(seed)
        assert torch.allclose(p(x, y), o(x, y), rtol=1e-4, atol=1e-5)
        if not (static and name in ("NTXentLoss", "NPairsLoss") and "collect_stats" not in stats_on):
            assert o.last_backend == "cpp"
        assert_same_stats(p, o)
        assert_same_stats(p.distance, o.distance)
        reducers = [(p.reducer, o.reducer)]
        if hasattr(p.reducer, "reducers"):
            reducers = [(p.reducer.reducers[k], o.reducer.reducers[k]) for k in p.reducer.reducers]
        for rp, ro in reducers:
            assert_same_stats(rp, ro)


def test_npairs_num_pairs_fused_without_collect_stats():
    p, o = PL.NPairsLoss(), DL.NPairsLoss()
    for seed, classes in ((0, 4), (1, 30)):
        x, y = _batch(seed, classes=classes)
        p(x, y)
        o(x, y)
        assert o.last_backend in ("cpp", "zero") and p.num_pairs == o.num_pairs


def test_fused_degenerate_batch_distance_stats(stats_on):
    """PML's GenericPairLoss skips the distance when every pair list has <= 1 entry."""
    p = PL.MultiSimilarityLoss(distance=PD.CosineSimilarity(**stats_on))
    o = DL.MultiSimilarityLoss(distance=DD.CosineSimilarity(**stats_on))
    x, y = _batch(0)
    p(x, y)
    o(x, y)
    p(x[:2], torch.tensor([0, 1]))  # one negative pair each way (2 entries): the distance runs
    o(x[:2], torch.tensor([0, 1]))
    assert_same_stats(p.distance, o.distance)
    p(x[:1], torch.tensor([0]))  # no pair: the distance keeps the last values
    o(x[:1], torch.tensor([0]))
    assert_same_stats(p.distance, o.distance)
