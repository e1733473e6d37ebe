"""TripletMarginLoss on listed triplets (dmlkern/fused/listed_triplets.py) and the row-blocked
BatchHardMiner / BatchEasyHardMiner / PairMarginMiner (dmlkern/fused/blocked_miners.py), against
PML 2.9.0 itself: values, gradients, indices, degenerate batches, thread-count determinism, memory."""
import itertools

import pytest
import torch
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.reducers as pml_reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu

import dmlkern.fused.blocked_miners as blocked_miners
from dmlkern import distances, losses, miners, reducers
import dmlkern.fused.listed_pairs as listed_pairs
from dmlkern.fused.listed_triplets import pairs_to_triplets
from _peak_rss import peak_rss_growth_mib


@pytest.fixture(autouse=True)
def list_every_tuple(monkeypatch):
    """These small batches' tuples are often "dense" (over 1/16 of all pairs), which the reference
    takes (test_dense_triplet_tuples_run_the_reference): here the listed path takes them all."""
    monkeypatch.setattr(listed_pairs, "DENSE_FRACTION", float("inf"))


def test_dense_triplet_tuples_run_the_reference(monkeypatch):
    monkeypatch.setattr(listed_pairs, "DENSE_FRACTION", 1 / 16)
    x = torch.randn(40, 8, dtype=torch.float64)
    labels = torch.arange(40) % 4
    triplets = pml_miners.TripletMarginMiner(margin=10.0)(x, labels)  # every triplet
    loss_fn = losses.TripletMarginLoss()
    loss_fn(x, labels, tuple(t[:40] for t in triplets))
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    loss_fn(x, labels, triplets)
    assert loss_fn.last_backend == "reference" and "dense" in loss_fn.last_fallback

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}
EASY_HARD = [dict(pos_strategy=p, neg_strategy=n)
             for p, n in itertools.product(["hard", "semihard", "easy", "all"], repeat=2)
             if not (p == n == "semihard") and {p, n} != {"all", "semihard"}]
EASY_HARD.append(dict(allowed_pos_range=(0.3, 1.2), allowed_neg_range=(0.5, 1.6)))
MINER_CASES = ([("BatchHardMiner", {})] + [("BatchEasyHardMiner", kw) for kw in EASY_HARD]
               + [("PairMarginMiner", {}), ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=1.1))])
DISTANCES = {None: None, "cos": ("CosineSimilarity", {}), "lp_sq": ("LpDistance", {"power": 2}),
             "dot_raw": ("DotProductSimilarity", {"normalize_embeddings": False}), "lp1": ("LpDistance", {"p": 1})}
LOSS_KWARGS = [{}, {"margin": 0.3, "swap": True}, {"margin": 0.2, "smooth_loss": True}]


@pytest.fixture
def small_blocks(monkeypatch):
    """Row blocks of ~64-80 rows, so that the batches below span several blocks."""
    monkeypatch.setattr(blocked_miners, "_BLOCK_VALUES", 64 * 300)


def _batch(n, classes, ref_rows, dtype, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return x, labels, None, None
    ref = torch.randn(ref_rows, dim, generator=g, dtype=torch.float64).to(dtype)
    return x, labels, ref, torch.randint(0, classes, (ref_rows,), generator=g)


def _distance(key, lib):
    spec = DISTANCES[key]
    return {} if spec is None else {"distance": getattr(lib, spec[0])(**spec[1])}


def _miner(lib, name, kw, dist_key=None):
    return getattr(lib, name)(**kw, **_distance(dist_key, distances if lib is miners else pml_distances))


def _run(lib, x, labels, ref, ref_labels, indices=None, miner=None, loss_kw=(), dist_key=None, reducer=None):
    """(value, [grad x, grad ref], loss module) of lib's TripletMarginLoss; indices from `miner`
    (name, kwargs) on the same inputs, or the given tuple."""
    L, M, D = (losses, miners, distances) if lib == "dmlkern" else (pml_losses, pml_miners, pml_distances)
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    if miner is not None:
        indices = _miner(M, *miner)(x, labels, ref, ref_labels)
    extra = dict(_distance(dist_key, D))
    if reducer is not None:
        extra["reducer"] = getattr(reducers if lib == "dmlkern" else pml_reducers, reducer)()
    loss_fn = L.TripletMarginLoss(**dict(loss_kw), **extra)
    value = loss_fn(x, labels, indices, ref, ref_labels)
    wrt = [x] + ([ref] if ref is not None else [])
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], loss_fn


def _assert_matches_pml(dtype, *args, **kwargs):
    ours, our_grads, loss_fn = _run("dmlkern", *args, **kwargs)
    want, want_grads, _ = _run("pml", *args, **kwargs)
    torch.testing.assert_close(ours, want.to(ours.dtype), **TOL[dtype])
    for g, w in zip(our_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL[dtype])
    return loss_fn


def _same_tuple(ours, theirs):
    assert len(ours) == len(theirs)
    for u, v in zip(ours, theirs):
        assert u.dtype == torch.long and torch.equal(u, v.long()), (u, v)


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("miner", [("BatchHardMiner", {})] + [("BatchEasyHardMiner", kw) for kw in (
    {}, {"pos_strategy": "hard", "neg_strategy": "semihard"}, {"pos_strategy": "semihard", "neg_strategy": "hard"},
    {"pos_strategy": "all", "neg_strategy": "hard"}, {"pos_strategy": "easy", "neg_strategy": "all"})],
    ids=lambda m: m[0] + "-" + "-".join(map(str, m[1].values())))
@pytest.mark.parametrize("dist_key", [None, "cos"])
@pytest.mark.parametrize("case", [(37, 5, None), (61, 7, 45)], ids=lambda c: f"n{c[0]}c{c[1]}r{c[2]}")
def test_loss_on_mined_tuples_matches_pml(case, dist_key, miner, dtype, small_blocks):
    x, labels, ref, ref_labels = _batch(*case, dtype)
    for loss_kw in LOSS_KWARGS:
        if loss_kw.get("swap") and ref is not None:
            loss_kw = {}  # PML's swap reads mat[p, n] with p as a query row: needs a batch compared with itself
        loss_fn = _assert_matches_pml(dtype, x, labels, ref, ref_labels, miner=miner, loss_kw=loss_kw,
                                      dist_key=dist_key)
        assert loss_fn.last_backend in ("listed", "zero"), loss_fn.last_fallback


def _hand_built(n, m, seed):
    """Random triplets and pairs (repeats, any order). No pair of one row with itself: PML's cdist
    gives it sqrt(rounding noise) (~1e-8 in fp64, ~3e-4 in fp32) where ours gives about the same
    noise of another product, the distance of unit rows being ill-conditioned at 0."""
    g = torch.Generator().manual_seed(seed)
    a, p, ng = (torch.randint(0, hi, (80,), generator=g) for hi in (n, m, m))
    keep = (a != p) & (a != ng) & (p != ng)
    a1 = torch.randint(0, n, (40,), generator=g)
    a2 = torch.randint(0, n, (60,), generator=g)
    # positives even, negatives odd: no (p, n) of one row once converted to triplets (swap's d_pn)
    p1, n2 = 2 * torch.randint(0, m // 2, (40,), generator=g), 2 * torch.randint(0, m // 2, (60,), generator=g) + 1
    a2[:15] = a1[:15]
    k1, k2 = a1 != p1, a2 != n2
    return (a[keep], p[keep], ng[keep]), (a1[k1], p1[k1], a2[k2], n2[k2])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dist_key", [None, "cos"])
def test_loss_on_hand_built_tuples_matches_pml(dist_key, dtype):
    """Triplets in any order with repeats, PML's pairs (converted to triplets as PML does), int32
    indices, labels or none, a reference set, and the reducers that need the per-triplet list."""
    for ref_rows in (None, 29):
        x, labels, ref, ref_labels = _batch(31, 4, ref_rows, dtype, seed=5)
        triplets, pairs = _hand_built(31, ref_rows or 31, seed=6)
        for tup in (triplets, pairs, tuple(t.int() for t in triplets)):
            for loss_kw in LOSS_KWARGS:
                for lab in (labels, None):
                    loss_fn = _assert_matches_pml(dtype, x, lab, ref, None if lab is None else ref_labels, tup,
                                                  loss_kw=loss_kw, dist_key=dist_key)
                    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
        for reducer in ("MeanReducer", "SumReducer"):
            _assert_matches_pml(dtype, x, labels, ref, ref_labels, triplets, reducer=reducer, dist_key=dist_key)


def test_per_triplet_losses_match_pml():
    """DoNothingReducer: the loss dict itself (losses, indices, reduction type) is PML's."""
    x, labels, _, _ = _batch(25, 3, None, torch.float64, seed=8)
    _, pairs = _hand_built(25, 25, seed=9)
    ours = losses.TripletMarginLoss(reducer=reducers.DoNothingReducer())(x, labels, pairs)
    want = pml_losses.TripletMarginLoss(reducer=pml_reducers.DoNothingReducer())(x, labels, pairs)
    assert ours["loss"]["reduction_type"] == want["loss"]["reduction_type"] == "triplet"
    torch.testing.assert_close(ours["loss"]["losses"], want["loss"]["losses"], **TOL[torch.float64])
    _same_tuple(ours["loss"]["indices"], want["loss"]["indices"])


def test_pairs_to_triplets_is_pmls_conversion():
    g = torch.Generator().manual_seed(2)
    for n_pos, n_neg in ((0, 5), (5, 0), (17, 40), (64, 3)):
        pairs = tuple(torch.randint(0, 9, (k,), generator=g) for k in (n_pos, n_pos, n_neg, n_neg))
        _same_tuple(pairs_to_triplets(*pairs), pml_lmu.convert_to_triplets(pairs, None))


@pytest.mark.parametrize("labels", [[0], [3, 3, 3, 3, 3], [0, 1, 2, 3, 4], [0, 0, 1]],
                         ids=["one_sample", "one_class", "no_positives", "tiny"])
@pytest.mark.parametrize("miner", [("BatchHardMiner", {}), ("BatchEasyHardMiner", {}), ("PairMarginMiner", {})],
                         ids=lambda m: m[0])
def test_degenerate_batches(miner, labels):
    y = torch.tensor(labels)
    x = torch.randn(len(labels), 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _same_tuple(_miner(miners, *miner)(x, y), _miner(pml_miners, *miner)(x, y))
    loss_fn = _assert_matches_pml(torch.float64, x, y, None, None, miner=miner)
    assert loss_fn.last_backend in ("listed", "zero")


def test_empty_tuple_gives_pmls_zero():
    x, labels, _, _ = _batch(9, 3, None, torch.float64)
    e = torch.empty(0, dtype=torch.long)
    for tup in ((e, e, e), (e, e, e, e)):
        loss_fn = _assert_matches_pml(torch.float64, x, labels, None, None, tup)
        assert loss_fn.last_backend == "zero"


def test_unsupported_distance_runs_the_reference():
    x, labels, _, _ = _batch(20, 4, None, torch.float64, seed=3)
    triplets, _ = _hand_built(20, 20, seed=4)
    loss_fn = _assert_matches_pml(torch.float64, x, labels, None, None, triplets, dist_key="lp1")
    assert loss_fn.last_backend == "reference" and "LpDistance" in loss_fn.last_fallback


def test_lazy_triplets_the_blocked_path_declines_run_listed():
    """A TripletMarginMiner's lazy result with a reducer the blocked path can't express (one
    collecting statistics: they need the per-triplet losses)."""
    x, labels, _, _ = _batch(30, 4, None, torch.float64, seed=11)
    mined = miners.TripletMarginMiner(type_of_triplets="semihard")(x, labels)
    want_triplets = pml_miners.TripletMarginMiner(type_of_triplets="semihard")(x, labels)
    loss_fn = losses.TripletMarginLoss(reducer=reducers.ThresholdReducer(low=0.01, collect_stats=True))
    value = loss_fn(x, labels, mined)
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    want = pml_losses.TripletMarginLoss(reducer=pml_reducers.ThresholdReducer(low=0.01, collect_stats=True))(
        x, labels, want_triplets)
    torch.testing.assert_close(value, want, **TOL[torch.float64])


def test_double_backward_matches_the_reference():
    x, labels, _, _ = _batch(24, 3, None, torch.float64, seed=12)
    results = []
    for backend in ("auto", "reference"):
        xx = x.clone().requires_grad_(True)
        loss_fn = losses.TripletMarginLoss(margin=0.4, swap=True)
        loss_fn.backend = backend
        value = loss_fn(xx, labels, miners.BatchHardMiner()(xx, labels))
        (g,) = torch.autograd.grad(value, xx, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), xx)
        results.append((loss_fn.last_backend, value, g, gg))
    assert [r[0] for r in results] == ["listed", "reference"]
    for u, v in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(u, v, **TOL[torch.float64])


def test_same_bits_at_one_and_two_threads():
    """Miner indices, value and gradient bit for bit at 1 and 2 CPU threads (sizes past torch's
    grain size, where an op is split over threads)."""
    x, labels, _, _ = _batch(3000, 300, None, torch.float32, dim=64, seed=13)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xx = x.clone().requires_grad_(True)
            mined = miners.BatchHardMiner()(xx, labels)
            pairs = miners.PairMarginMiner()(xx, labels)
            value = losses.TripletMarginLoss(smooth_loss=True)(xx, labels, mined)
            value.backward()
            results.append((*mined, *pairs, value.detach(), xx.grad))
    finally:
        torch.set_num_threads(before)
    for u, v in zip(*results):
        assert torch.equal(u, v)


# ----------------------------------------------------------------------------- the miners
@pytest.mark.parametrize("case", MINER_CASES, ids=lambda c: c[0] + "-" + "-".join(map(str, c[1].values())))
def test_blocked_miners_match_pml(case, small_blocks):
    """Several row blocks (odd sizes, the last block not full), with and without a reference set."""
    for dist_key in DISTANCES:
        for dtype in (torch.float32, torch.float64):
            for n, ref_rows in ((301, None), (150, 97), (64, None)):
                x, labels, ref, ref_labels = _batch(n, 9, ref_rows, dtype, seed=n)
                args = (x, labels) if ref is None else (x, labels, ref, ref_labels)
                _same_tuple(_miner(miners, *case, dist_key)(*args), _miner(pml_miners, *case, dist_key)(*args))


def test_blocked_miners_match_pml_at_every_block_size():
    """Blocks never shorter than _MIN_BLOCK_ROWS: the products' bits, and so the picks, are the
    full matrix's. Here every block size from 64 to 70 rows over 700 rows."""
    x, labels, _, _ = _batch(700, 50, None, torch.float32, dim=32, seed=21)
    want = pml_miners.BatchHardMiner()(x, labels)
    for rows in range(64, 71):
        blocked_miners._BLOCK_VALUES, saved = rows * 700, blocked_miners._BLOCK_VALUES
        try:
            _same_tuple(miners.BatchHardMiner()(x, labels), want)
        finally:
            blocked_miners._BLOCK_VALUES = saved


def test_miners_with_stats_keep_pmls_statistics():
    x, labels, _, _ = _batch(40, 4, None, torch.float64, seed=22)
    for name, kw in (("BatchHardMiner", {}), ("PairMarginMiner", {})):
        ours = getattr(miners, name)(**kw, collect_stats=True)
        theirs = getattr(pml_miners, name)(**kw, collect_stats=True)
        _same_tuple(ours(x, labels), theirs(x, labels))
        for stat in ours._record_these_stats:
            assert getattr(ours, stat) == pytest.approx(getattr(theirs, stat), rel=1e-9), stat


# ----------------------------------------------------------------------------- memory
@pytest.mark.slow
def test_batch_hard_peak_memory():
    """BatchHardMiner + TripletMarginLoss fwd+bwd at N=16384, D=128 grows peak RSS by < 256 MiB
    (with the N x N matrix and masks: > 1 GiB), measured in a fresh process."""
    growth_mib = peak_rss_growth_mib(
        setup="""
            torch.manual_seed(0)
            x = torch.randn(16384, 128, requires_grad=True)
            labels = torch.randint(0, 4096, (16384,))
            miner, loss_fn = miners.BatchHardMiner(), losses.TripletMarginLoss()
        """,
        measured="""
            loss = loss_fn(x, labels, miner(x, labels))
            loss.backward()
            assert loss_fn.last_backend == "listed", loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
