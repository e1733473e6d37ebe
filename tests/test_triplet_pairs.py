"""TripletMarginLoss on pairs (a1, p, a2, n) whose triplets are dense (PML's README example: a
MultiSimilarityMiner's pairs): PML's convert_to_triplets pairs every positive pair with every
negative pair of the same anchor; the blocked path runs those triplets from per-block masks
(`fused/triplet.py`, ListedPairMasks), against PML's values and gradients."""
import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.reducers as pml_reducers
from pytorch_metric_learning import distances as pml_distances

import dmlkern.fused._common as fused_common
import dmlkern.fused.triplet as fused_triplet
from dmlkern import distances, losses, miners, reducers
from _peak_rss import peak_rss_growth_mib

# (fp32: sums of thousands of triplets' terms in another order than PML's)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=5e-5, atol=2e-6)}


def _inputs(n, classes, ref_rows, dtype, seed=0, d=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref = None if ref_rows is None else torch.randn(ref_rows, d, generator=g, dtype=torch.float64).to(dtype)
    return x, labels, ref


def _random_pairs(n, m, count, seed, self_pairs=False):
    """count distinct (anchor, column) pairs per side, anchors in [0, n), columns in [0, m); no
    (a, a) pair unless self_pairs (its distance is rounding noise around 0 in both libraries)."""
    g = torch.Generator().manual_seed(seed)
    sides = []
    for _ in range(2):
        keys = torch.randperm(n * m, generator=g)
        if not self_pairs:
            keys = keys[keys // m != keys % m]
        sides += [keys[:count] // m, keys[:count] % m]
    return tuple(sides)


def _run(lib, x, labels, pairs, ref, loss_kw, distance=None, reducer=None, loss="TripletMarginLoss"):
    """(value, [grad x, grad ref, grad of a learnt beta], loss module) of lib's loss on the pairs."""
    L, D, R = (losses, distances, reducers) if lib == "dmlkern" else (pml_losses, pml_distances, pml_reducers)
    kw = dict(loss_kw)
    if distance is not None:
        kw["distance"] = getattr(D, distance)()
    if reducer is not None:
        kw["reducer"] = getattr(R, reducer)()
    loss_fn = getattr(L, loss)(**kw).to(x.dtype)
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    value = loss_fn(x, labels, pairs, ref, None if ref is None else torch.zeros(ref.shape[0], dtype=torch.long))
    wrt = [x] + ([ref] if ref is not None else []) + [p for p in loss_fn.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], loss_fn


def _assert_matches(ours, want, dtype):
    """Values and gradients within the dtype's tolerance; the gradients' absolute one scaled by their
    largest entry (with SumReducer each sums thousands of triplets' terms, in another order)."""
    torch.testing.assert_close(ours[0], want[0], **TOL[dtype])
    for g, w in zip(ours[1], want[1]):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", [None, "CosineSimilarity", "DotProductSimilarity"])
@pytest.mark.parametrize("reducer", [None, "MeanReducer", "SumReducer"])
@pytest.mark.parametrize("sorted_min", [1, 128], ids=["sorted", "direct"])
def test_dense_pairs_run_blocked_and_match_pml(monkeypatch, dtype, distance, reducer, sorted_min):
    """Hand-built dense pairs (odd sizes, anchors with no pair on a side, a ref_emb), relu and
    softplus terms, every reducer the blocked path reduces with; rows sorted or walked slot by slot."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", sorted_min)
    for n, ref_rows, count, seed in ((37, None, 500, 1), (29, 23, 300, 2), (53, None, 1500, 3)):
        x, labels, ref = _inputs(n, 5, ref_rows, dtype, seed=seed)
        pairs = _random_pairs(n, ref_rows or n, count, seed)
        for loss_kw in ({"margin": 0.3}, {"margin": 0.05, "smooth_loss": True}):
            ours = _run("dmlkern", x, labels, pairs, ref, loss_kw, distance, reducer)
            want = _run("pml", x, labels, pairs, ref, loss_kw, distance, reducer)
            assert ours[2].last_backend == "blocked", ours[2].last_fallback
            _assert_matches(ours, want, dtype)


@pytest.mark.parametrize("miner_lib", ["pml", "dmlkern"])
def test_multi_similarity_miner_pairs(miner_lib):
    """PML's README example: TripletMarginLoss on a MultiSimilarityMiner's pairs (PML's plain tuple
    or dmlkern's lazy result), several row blocks."""
    x, labels, _ = _inputs(150, 12, None, torch.float32, seed=4, d=16)
    miner = (pml_miners if miner_lib == "pml" else miners).MultiSimilarityMiner()
    pairs = miner(x, labels)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_common, "ROW_BLOCK_VALUES", 7 * 150)
        ours = _run("dmlkern", x, labels, pairs, None, {})
    want = _run("pml", x, labels, tuple(t.clone() for t in pml_miners.MultiSimilarityMiner()(x, labels)), None, {})
    assert ours[2].last_backend == "blocked", ours[2].last_fallback
    _assert_matches(ours, want, torch.float32)


def test_duplicates_sparse_pairs_and_swap_take_the_other_paths():
    """Duplicate pairs (PML repeats their triplets: no mask holds that), sparse pairs (the listed
    triplets are cheaper) and swap=True (each triplet's e_pn) don't run the masks, and still give
    PML's numbers."""
    x, labels, _ = _inputs(31, 4, None, torch.float64, seed=9)
    dense = _random_pairs(31, 31, 400, 9)
    duplicated = tuple(torch.cat([t, t[:3]]) for t in dense)
    sparse = _random_pairs(31, 31, 12, 9)
    for pairs, loss_kw, backend in ((duplicated, {}, "reference"), (sparse, {}, "listed"),
                                    (dense, {"swap": True}, "reference")):
        ours = _run("dmlkern", x, labels, pairs, None, loss_kw)
        want = _run("pml", x, labels, pairs, None, loss_kw)
        assert ours[2].last_backend == backend, (ours[2].last_backend, ours[2].last_fallback)
        _assert_matches(ours, want, torch.float64)


def test_nan_embedding_follows_pml():
    x, labels, _ = _inputs(33, 4, None, torch.float64, seed=12)
    x[5, 2] = float("nan")
    pairs = _random_pairs(33, 33, 500, 12)
    ours = _run("dmlkern", x, labels, pairs, None, {})
    want = _run("pml", x, labels, pairs, None, {})
    torch.testing.assert_close(ours[0], want[0], equal_nan=True)
    torch.testing.assert_close(ours[1][0], want[1][0], equal_nan=True)


def test_gradcheck_fp64():
    x, labels, ref = _inputs(13, 3, 11, torch.float64, seed=7, d=5)
    pairs = _random_pairs(13, 11, 60, 7)
    for smooth in (False, True):
        loss_fn = losses.TripletMarginLoss(margin=0.4, smooth_loss=smooth)

        def f(x, ref):
            return loss_fn(x, labels, pairs, ref, labels[:11])
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), ref.clone().requires_grad_(True)))
        assert loss_fn.last_backend == "blocked", loss_fn.last_fallback


def test_dense_pairs_memory_stays_below_pml():
    """PML's README example at N=1024 (PML lists ~7M triplets through a pairs x pairs match matrix:
    ~8.8 GiB of RSS here): the masks need the pairs' keys and one row block."""
    setup = """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g, requires_grad=True)
    labels = torch.randint(0, 128, (1024,), generator=g)
    pairs = miners.MultiSimilarityMiner()(x, labels)
    pairs = tuple(t.clone() for t in pairs.materialize())
    loss_fn = losses.TripletMarginLoss()
    """
    measured = """
    loss_fn(x, labels, pairs).backward()
    assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
    """
    assert peak_rss_growth_mib(setup, measured) < 256


def _margin_run(lib, x, labels, pairs, ref, loss_kw, distance=None, reducer=None):
    return _run(lib, x, labels, pairs, ref, loss_kw, distance, reducer, loss="MarginLoss")


MARGIN_KW = [{}, {"margin": 0.4, "beta": 0.9, "nu": 0.3, "learn_beta": True},
             {"learn_beta": True, "num_classes": 5, "nu": 0.2}]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", [None, "CosineSimilarity"])
@pytest.mark.parametrize("reducer", [None, "MeanReducer", "SumReducer"])
@pytest.mark.parametrize("loss_kw", MARGIN_KW, ids=["default", "learn_beta", "per_class_beta"])
def test_margin_loss_on_pairs_matches_pml(dtype, distance, reducer, loss_kw):
    """MarginLoss on pairs from the pairs alone (each term times the triplets it meets): dense and
    sparse pairs, duplicates (PML repeats their triplets), a ref_emb, anchors with pairs on one
    side only; the beta gradient too."""
    for n, ref_rows, count, seed in ((37, None, 500, 1), (29, 23, 300, 2), (31, None, 12, 3)):
        x, labels, ref = _inputs(n, 5, ref_rows, dtype, seed=seed)
        pairs = _random_pairs(n, ref_rows or n, count, seed)
        if seed == 2:
            pairs = tuple(torch.cat([t, t[:5]]) for t in pairs)
        ours = _margin_run("dmlkern", x, labels, pairs, ref, loss_kw, distance, reducer)
        want = _margin_run("pml", x, labels, pairs, ref, loss_kw, distance, reducer)
        assert ours[2].last_backend == "listed", ours[2].last_fallback
        _assert_matches(ours, want, dtype)


def test_margin_loss_pairs_degenerate_and_other_reducers():
    """No triplet (every anchor's pairs on one side: PML's zero losses), and a reducer needing the
    per-triplet losses (the listed triplets), against PML."""
    x, labels, _ = _inputs(19, 3, None, torch.float64, seed=5)
    one_sided = (torch.tensor([0, 0, 1]), torch.tensor([2, 3, 4]), torch.tensor([2, 5]), torch.tensor([7, 8]))
    sparse = (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 2, 2]), torch.tensor([5, 6, 9]))
    for pairs, reducer, backend in ((one_sided, None, "zero"), (sparse, "AvgNonZeroReducer", "listed")):
        ours = _margin_run("dmlkern", x, labels, pairs, None, {"learn_beta": True}, None, reducer)
        want = _margin_run("pml", x, labels, pairs, None, {"learn_beta": True}, None, reducer)
        assert ours[2].last_backend == backend, ours[2].last_fallback
        _assert_matches(ours, want, torch.float64)


def test_margin_loss_pairs_gradcheck_fp64():
    x, labels, ref = _inputs(11, 3, 9, torch.float64, seed=8, d=4)
    pairs = _random_pairs(11, 9, 40, 8)
    loss_fn = losses.MarginLoss(margin=0.3, beta=0.8).double()

    def f(x, ref):
        return loss_fn(x, labels, pairs, ref, labels[:9])
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), ref.clone().requires_grad_(True)))
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback


def test_margin_loss_on_dense_pairs_memory_stays_below_pml():
    """MarginLoss on a MultiSimilarityMiner's pairs at N=1024 (PML: ~8.8 GiB of RSS here, 18 s)."""
    setup = """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g, requires_grad=True)
    labels = torch.randint(0, 128, (1024,), generator=g)
    pairs = tuple(t.clone() for t in miners.MultiSimilarityMiner()(x, labels).materialize())
    loss_fn = losses.MarginLoss()
    """
    measured = """
    loss_fn(x, labels, pairs).backward()
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    """
    assert peak_rss_growth_mib(setup, measured) < 256
