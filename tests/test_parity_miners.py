"""Miners vs pytorch-metric-learning 2.9.0: exact index sets (and order) on random inputs."""
import itertools
import math

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners
import torch

import dmlkern.distances as our_distances
import dmlkern.miners as our_miners
from dmlkern.losses import TripletMarginLoss

from _batches import SHAPES, assert_same_indices, batch, canon

DISTANCES = {
    None: None,
    "lp": ("LpDistance", {}),
    "lp_sq": ("LpDistance", {"power": 2}),
    "lp_raw": ("LpDistance", {"normalize_embeddings": False}),
    "cos": ("CosineSimilarity", {}),
    "dot_raw": ("DotProductSimilarity", {"normalize_embeddings": False}),
}

_EASY_HARD = [
    dict(pos_strategy=p, neg_strategy=n)
    for p, n in itertools.product(["hard", "semihard", "easy", "all"], repeat=2)
    if not (p == n == "semihard") and {p, n} != {"all", "semihard"}
]

MINER_CASES = (
    [("TripletMarginMiner", dict(margin=m, type_of_triplets=t)) for t in ["all", "hard", "semihard", "easy"] for m in [0.2, 0.6]]
    + [("AngularMiner", dict(angle=a)) for a in [20, 45]]
    + [("BatchHardMiner", {})]
    + [("BatchEasyHardMiner", kw) for kw in _EASY_HARD]
    + [("BatchEasyHardMiner", dict(allowed_pos_range=(0.3, 1.2), allowed_neg_range=(0.5, 1.6)))]
    + [("HDCMiner", dict(filter_percentage=f)) for f in [0.5, 0.27]]
    + [("MultiSimilarityMiner", dict(epsilon=e)) for e in [0.1, 0.4]]
    + [("PairMarginMiner", {}), ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=1.1))]
)

# distances each miner is checked with (Angular/DistanceWeighted require normalised Lp)
MINER_DISTANCES = {"AngularMiner": [None]}
DEFAULT_DISTANCES = [None, "lp_sq", "cos", "lp_raw", "dot_raw"]


def make(name, kw, dist_key, ours):
    kw = dict(kw)
    spec = DISTANCES[dist_key]
    if spec is not None:
        mod = our_distances if ours else pml_distances
        kw["distance"] = getattr(mod, spec[0])(**spec[1])
    return getattr(our_miners if ours else pml_miners, name)(**kw)


def _id(case):
    name, kw = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("case", MINER_CASES, ids=[_id(c) for c in MINER_CASES])
def test_miner_matches_pml(case):
    name, kw = case
    for dist_key in MINER_DISTANCES.get(name, DEFAULT_DISTANCES):
        for seed, (B, D, C) in enumerate(SHAPES):
            for dtype in (torch.float32, torch.float64):
                x, y, r, ry = batch(seed, B, D, C, dtype, R=B + 4)
                variants = [(x, y), (x, y, r, ry)]
                if dtype == torch.float64 and seed == 0:
                    # ref_emb without ref_labels (labels reused), and an equal-valued copy of the
                    # labels (the diagonal is then a positive pair, as in PML)
                    variants += [(x, y, x.clone()), (x, y, x, y.clone())]
                for args in variants:
                    theirs = make(name, kw, dist_key, False)(*args)
                    ours = make(name, kw, dist_key, True)(*args)
                    assert_same_indices(ours, theirs)


@pytest.mark.parametrize("name", ["TripletMarginMiner", "BatchHardMiner", "MultiSimilarityMiner", "PairMarginMiner",
                                  "HDCMiner", "AngularMiner", "BatchEasyHardMiner", "DistanceWeightedMiner"])
@pytest.mark.parametrize("labels", [[0], [3, 3, 3, 3, 3], [0, 1, 2, 3, 4], [0, 0, 1]], ids=["single_sample", "single_class", "no_positives", "tiny"])
def test_degenerate_batches(name, labels):
    y = torch.tensor(labels)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(len(labels), 4, dtype=dtype, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(0)
        theirs = getattr(pml_miners, name)()(x, y)
        torch.manual_seed(0)
        ours = getattr(our_miners, name)()(x, y)
        assert_same_indices(ours, theirs)


@pytest.mark.parametrize("ranges", [False, True], ids=["no-range", "ranges"])
@pytest.mark.parametrize("dist_key", [None, "cos"])
def test_batch_easy_hard_nan_embeddings_match_pml(dist_key, ranges):
    """A NaN in an embedding: PML drops a candidate only where a range's or the semihard
    threshold's opposite comparison holds, so NaN distances stay candidates and the row's min /
    max is the NaN's column; the blocked miner (C++ picks without NaN, torch picks with) gives PML's
    tuple for every strategy pair. With ranges, rows are dropped as well (their candidates leave)."""
    for seed in range(4):
        x, y = batch(seed, 12, 6, 3, torch.float64)
        x[seed, 0] = float("nan")
        if seed % 2:
            x[7] = float("nan")
        for kw in _EASY_HARD:
            if ranges:
                kw = dict(kw, allowed_pos_range=(0.2, 1.3), allowed_neg_range=(0.4, 1.6)) if dist_key is None else \
                    dict(kw, allowed_pos_range=(-0.3, 0.9), allowed_neg_range=(-0.8, 0.5))
            theirs = make("BatchEasyHardMiner", kw, dist_key, False)(x, y)
            ours = make("BatchEasyHardMiner", kw, dist_key, True)(x, y)
            assert [t.tolist() for t in ours] == [t.tolist() for t in theirs], (seed, kw)


def test_distance_weighted_same_seed_same_triplets():
    for seed, (B, D, C) in enumerate(SHAPES + [(31, 17, 6)]):
        for dtype in (torch.float32, torch.float64):
            x, y, r, ry = batch(seed, B, D, C, dtype, R=B + 3)
            for args in [(x, y), (x, y, r, ry)]:
                kw = dict(cutoff=0.3, nonzero_loss_cutoff=1.9) if seed % 2 else {}
                torch.manual_seed(100 + seed)
                theirs = pml_miners.DistanceWeightedMiner(**kw)(*args)
                torch.manual_seed(100 + seed)
                ours = our_miners.DistanceWeightedMiner(**kw)(*args)
                assert_same_indices(ours, theirs)
                assert len(ours[0]) > 0 or seed == 0


def test_distance_weighted_negative_distribution():
    """Negatives are drawn ~ 1/q(d): check empirical frequencies against the closed form."""
    x, y = batch(5, 9, 6, 3)
    miner = our_miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    torch.manual_seed(0)
    counts = torch.zeros(9, 9)
    for _ in range(300):
        a, p, n = miner(x, y)
        counts.index_put_((a, n), torch.ones(len(a)), accumulate=True)
    xn = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(xn, xn).clamp(min=0.5)
    D = 6.0
    w = d ** (2 - D) * (1 - d**2 / 4) ** (-(D - 3) / 2)
    w = w * (y[:, None] != y[None, :]) * (d < 1.4)
    for i in range(9):
        if w[i].sum() > 0 and counts[i].sum() > 0:
            expected = w[i] / w[i].sum()
            observed = counts[i] / counts[i].sum()
            assert torch.allclose(observed, expected.float(), atol=0.08)


def test_hdc_set_idx_externally_matches_pml():
    x, y = batch(3, 15, 6, 3)
    tm = pml_miners.TripletMarginMiner(margin=0.5)(x, y)
    theirs, ours = pml_miners.HDCMiner(filter_percentage=0.6), our_miners.HDCMiner(filter_percentage=0.6)
    theirs.set_idx_externally(tm, y)
    ours.set_idx_externally(tm, y)
    for _ in range(2):  # PML keeps (and re-filters) the external pairs on later calls
        assert_same_indices(ours(x, y), theirs(x, y))
    theirs.reset_idx()
    ours.reset_idx()
    assert_same_indices(ours(x, y), theirs(x, y))


def test_large_all_triplets_without_cube():
    """TripletMarginMiner on a batch larger than one anchor block still matches PML."""
    x, y = batch(9, 70, 8, 4)
    import dmlkern.reference.miners as rm

    old = rm._TRIPLET_BLOCK
    rm._TRIPLET_BLOCK = 70 * 70 * 3  # force several anchor blocks
    try:
        for kw in [dict(type_of_triplets="semihard"), dict(type_of_triplets="all", margin=0.1)]:
            assert_same_indices(our_miners.TripletMarginMiner(**kw)(x, y), pml_miners.TripletMarginMiner(**kw)(x, y))
        assert_same_indices(our_miners.AngularMiner(angle=30)(x, y), pml_miners.AngularMiner(angle=30)(x, y))
    finally:
        rm._TRIPLET_BLOCK = old


def test_bad_configuration_and_inputs():
    for kw in [dict(pos_strategy="semihard", neg_strategy="semihard"), dict(pos_strategy="all", neg_strategy="semihard"),
               dict(pos_strategy="bogus")]:
        with pytest.raises(ValueError):
            pml_miners.BatchEasyHardMiner(**kw)
        with pytest.raises(ValueError):
            our_miners.BatchEasyHardMiner(**kw)
    for cls in ("AngularMiner", "DistanceWeightedMiner"):
        with pytest.raises(AssertionError):
            getattr(pml_miners, cls)(distance=pml_distances.CosineSimilarity())
        with pytest.raises(AssertionError):
            getattr(our_miners, cls)(distance=our_distances.CosineSimilarity())
    x, y = batch(0, 6, 3, 2)
    m = our_miners.TripletMarginMiner()
    with pytest.raises(ValueError):
        m(x, y[:5])  # PML: ValueError too
    with pytest.raises(ValueError):
        m(x[0], y)


def test_no_grad_and_dtype():
    x, y = batch(0, 10, 4, 3)
    x.requires_grad_()
    for cls in ("MultiSimilarityMiner", "TripletMarginMiner", "BatchHardMiner"):
        out = getattr(our_miners, cls)()(x, y)
        assert all(t.dtype == torch.long and not t.requires_grad for t in out)


# ----------------------------------------------------------------------------- MaximumLossMiner
def _hand_triplet_loss(x, a, p, n, margin):
    """mean of the positive terms of relu(||xa-xp|| - ||xa-xn|| + margin) on normalised x."""
    xn = x / x.norm(dim=1, keepdim=True)
    vals = []
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        v = math.dist(xn[i].tolist(), xn[j].tolist()) - math.dist(xn[i].tolist(), xn[k].tolist()) + margin
        vals.append(max(v, 0.0))
    pos = [v for v in vals if v > 0]
    return sum(pos) / len(pos) if pos else 0.0


def test_maximum_loss_miner_picks_the_largest_loss_subset():
    x, y = batch(4, 8, 3, 2)
    inner = our_miners.BatchHardMiner()  # one triplet per anchor -> few candidates
    candidates = inner(x, y)
    T = len(candidates[0])
    assert 4 <= T <= 8
    size = math.ceil(0.5 * T)
    # expected: the largest hand-computed loss over every subset of that size
    best = max(
        _hand_triplet_loss(x, *(c[list(s)] for c in candidates), 0.05)
        for s in itertools.combinations(range(T), size)
    )
    torch.manual_seed(0)
    miner = our_miners.MaximumLossMiner(TripletMarginLoss(margin=0.05), miner=inner, num_trials=400)
    out = miner(x, y)
    assert len(out) == 3 and len(out[0]) == size
    got = _hand_triplet_loss(x, *out, 0.05)
    assert got == pytest.approx(best, rel=1e-9)
    # the chosen triplets are distinct candidates, kept in candidate order
    cand = list(zip(*[c.tolist() for c in candidates]))
    pos = [cand.index(t) for t in zip(*[o.tolist() for o in out])]
    assert pos == sorted(set(pos))


def test_maximum_loss_miner_pair_subsets_and_plain_callable():
    x, y = batch(2, 9, 4, 3)
    y[:3] = 0  # make sure there are positives
    P = int(sum((y[i] == y[j]) and i != j for i in range(9) for j in range(9)))
    N = int(sum(y[i] != y[j] for i in range(9) for j in range(9)))
    seen = []

    def loss(emb, labels, indices_tuple=None):
        a1, p, a2, n = indices_tuple
        value = float((emb[a1] * emb[p]).sum() - (emb[a2] * emb[n]).sum())
        seen.append((value, tuple(t.clone() for t in indices_tuple)))
        return value

    torch.manual_seed(3)
    out = our_miners.MaximumLossMiner(loss, num_trials=7)(x, y)
    assert len(seen) == 7
    assert len(out[0]) == math.ceil(P / 2) and len(out[2]) == math.ceil(N / 2)
    for a, b in [(out[0], out[1]), (out[2], out[3])]:
        assert len(set(zip(a.tolist(), b.tolist()))) == len(a)  # no repeats
    assert all(bool(y[i] == y[j]) and i != j for i, j in zip(out[0].tolist(), out[1].tolist()))
    assert all(bool(y[i] != y[j]) for i, j in zip(out[2].tolist(), out[3].tolist()))
    # it returned the first trial with the largest value
    values = [v for v, _ in seen]
    winner = seen[values.index(max(values))][1]
    assert canon(out) == canon(winner)
    # same seed, same result
    torch.manual_seed(3)
    again = our_miners.MaximumLossMiner(loss, num_trials=7)(x, y)
    assert canon(again) == canon(out)


# ----------------------------------------------------------------------------- index utilities
def test_index_utilities_match_lmu():
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    import dmlkern.reference.indices as I

    def same(a, b):
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))

    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        B, R = int(torch.randint(1, 16, (1,), generator=g)), int(torch.randint(1, 16, (1,), generator=g))
        y, ry = torch.randint(0, 4, (B,), generator=g), torch.randint(0, 4, (R,), generator=g)
        for args in [(y,), (y, ry), (y, y.clone())]:
            same(I.get_all_pairs_indices(*args), lmu.get_all_pairs_indices(*args))
            same(I.get_all_triplets_indices(*args), lmu.get_all_triplets_indices(*args))
            for t in (None, 2):
                w = torch.rand(B, len(args[-1]), generator=g) if seed % 2 else None
                torch.manual_seed(seed)
                ours = I.get_random_triplet_indices(*args, t_per_anchor=t, weights=w)
                torch.manual_seed(seed)
                same(ours, lmu.get_random_triplet_indices(*args, t_per_anchor=t, weights=w))
        pairs = lmu.get_all_pairs_indices(y)
        trip = lmu.get_all_triplets_indices(y)
        for tup in (None, pairs, trip):
            same(I.convert_to_pairs(tup, y), lmu.convert_to_pairs(tup, y))
            same(I.convert_to_pos_pairs_with_unique_labels(tup, y), lmu.convert_to_pos_pairs_with_unique_labels(tup, y))
            for using_ref in (False, True):
                assert torch.equal(I.convert_to_weights(tup, y, torch.float64, using_ref),
                                   lmu.convert_to_weights(tup, y, torch.float64, using_ref))
        for tup in (pairs, trip):
            same(I.convert_to_triplets(tup, y), lmu.convert_to_triplets(tup, y))
        if len(pairs[1]) and len(pairs[3]):
            same(I.matched_size_indices(pairs[1], pairs[3]), lmu.matched_size_indices(pairs[1], pairs[3]))
        z = torch.randn(B, R, generator=g, dtype=torch.float64)
        for mask in (None, torch.rand(B, R, generator=g) > 0.6):
            for dim in (0, 1):
                for add_one in (True, False):
                    assert torch.equal(I.logsumexp(z, mask, add_one, dim), lmu.logsumexp(z, mask, add_one, dim))
        # memory-queue self-comparison removal (CrossBatchMemory), with wrap-around
        Q = B + 5
        idx = (torch.arange(B) + seed) % Q
        qy = torch.randint(0, 3, (Q,), generator=g)
        qy[idx] = y
        for tup in (lmu.get_all_pairs_indices(y, qy), lmu.get_all_triplets_indices(y, qy)):
            for subset in (False, True):
                same(I.remove_self_comparisons(tuple(t.clone() for t in tup), idx, Q, subset),
                     lmu.remove_self_comparisons(tuple(t.clone() for t in tup), idx, Q, subset))


# ----------------------------------------------------------------------------- distances
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_distances_match_pml(dtype, monkeypatch):
    monkeypatch.setattr(our_distances.SNRDistance, "_chunk_elems", 40)  # force several blocks
    specs = [("LpDistance", {}), ("LpDistance", dict(power=2)), ("LpDistance", dict(p=1, normalize_embeddings=False)),
             ("CosineSimilarity", {}), ("DotProductSimilarity", {}), ("DotProductSimilarity", dict(normalize_embeddings=False)),
             ("SNRDistance", {})]
    x, y, r, ry = batch(4, 9, 6, 3, torch.float64, R=11)
    x, r = x.to(dtype), r.to(dtype)
    for name, kw in specs:
        if dtype == torch.float16 and name != "LpDistance":
            continue
        ours, theirs = getattr(our_distances, name)(**kw), getattr(pml_distances, name)(**kw)
        assert ours.is_inverted == theirs.is_inverted and ours.normalize_embeddings == theirs.normalize_embeddings
        for args in [(x,), (x, r)]:
            a = [t.clone().requires_grad_() for t in args]
            b = [t.clone().requires_grad_() for t in args]
            mo, mt = ours(*a), theirs(*b)
            torch.testing.assert_close(mo, mt)
            if dtype == torch.float64:
                w = torch.randn(mo.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
                (mo * w).sum().backward()
                (mt * w).sum().backward()
                for u, v in zip(a, b):
                    torch.testing.assert_close(u.grad, v.grad)
        torch.testing.assert_close(ours.pairwise_distance(x, r[:9]), theirs.pairwise_distance(x, r[:9]))
        assert ours.margin(1.0, 3.0) == theirs.margin(1.0, 3.0)
        torch.testing.assert_close(ours.smallest_dist(x, dim=1)[0], theirs.smallest_dist(x, dim=1)[0])
        torch.testing.assert_close(ours.get_norm(x), theirs.get_norm(x))
    with pytest.raises(ValueError):
        our_distances.LpDistance()(x[0])
