"""The row-blocked AngularMiner, HDCMiner, DistanceWeightedMiner and UniformHistogramMiner (dmlkern/fused/blocked_miners.py)
against PML 2.9.0: the same indices in PML's order (HDCMiner past _TOPK_PAIRS: the same values in
the same order, ties in row-major order), PML's statistics, the same triplets for the same seed,
several blocks, degenerate batches, thread counts and peak memory."""
import math
from collections import Counter

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners
import torch

import dmlkern.distances as our_distances
import dmlkern.fused.blocked_miners as blocked_miners
import dmlkern.miners as our_miners

from _batches import assert_same_indices
from _peak_rss import peak_rss_growth_mib

DTYPES = [torch.float32, torch.float64]
STAT_TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def _blocked_distances_match_full():
    """Whether LpDistance's fp64 matrix, computed in row blocks (the blocked miners' way), has the
    bits of the full matrix (PML's way): torch.cdist's product path rounds a row the same whatever
    the block only if the BLAS does (MKL's AVX-512 path on Intel Xeon does; its AVX2 path on AMD
    EPYC does not: ~2e-8 apart near zero distance, after the square root). HDC's exact agreement
    with PML's pair order under forced small blocks needs it."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(150, 6, generator=g, dtype=torch.float64), dim=1)
    d = our_distances.LpDistance()
    full = d.compute_mat(q, q)
    return all(torch.equal(d.compute_mat(q[i:i + 7], q), full[i:i + 7]) for i in range(0, 150, 7))


EXACT_HDC = _blocked_distances_match_full()
# How far a row block's distance may round from PML's full matrix where they differ (AMD: ~2e-8 in
# fp64 near zero distance, after the square root); random pairs' values lie ~1e-4 apart.
HDC_NEAR_TIE = {torch.float32: 1e-4, torch.float64: 1e-6}


def assert_hdc_like_pml(got, want, mat):
    """HDCMiner's output against PML's: the same tuple in PML's order (its pairs sorted by value,
    ties as torch.topk orders them) where the blocked distances have the full matrix's bits; where
    this BLAS rounds a row block otherwise (`_blocked_distances_match_full`), the same up to
    near-ties: position by position, values (from PML's matrix `mat`) within HDC_NEAR_TIE, and
    every pair one side has and the other lacks within HDC_NEAR_TIE of the selection's boundary."""
    if EXACT_HDC:
        assert_same_indices(got, want)
        return
    assert len(got) == len(want) == 4 and all(t.dtype == torch.long for t in got)
    tol = HDC_NEAR_TIE[mat.dtype]
    for i in (0, 2):
        assert len(got[i]) == len(got[i + 1]) == len(want[i]), "a different number of pairs"
        if not len(want[i]):
            continue
        got_vals, want_vals = mat[got[i], got[i + 1]], mat[want[i], want[i + 1]]
        torch.testing.assert_close(got_vals, want_vals, rtol=0, atol=tol)
        ours = Counter(zip(got[i].tolist(), got[i + 1].tolist()))
        theirs = Counter(zip(want[i].tolist(), want[i + 1].tolist()))
        for a, b in (ours - theirs) + (theirs - ours):
            assert abs(float(mat[a, b] - want_vals[-1])) <= tol, f"pair ({a}, {b}) is not a near-tie at the boundary"


def _batch(seed, n, dim, classes, dtype, ref_rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return (x, y)
    return (x, y, torch.randn(ref_rows, dim, generator=g, dtype=dtype),
            torch.randint(0, classes, (ref_rows,), generator=g))


def _both(name, **kw):
    return getattr(our_miners, name)(**kw), getattr(pml_miners, name)(**kw)


def _stats_match(ours, theirs, dtype):
    assert ours._record_these_stats == theirs._record_these_stats
    for stat in theirs._record_these_stats:
        want, got = float(getattr(theirs, stat)), float(getattr(ours, stat))
        if math.isnan(want):
            assert math.isnan(got), stat
        else:
            assert got == pytest.approx(want, rel=STAT_TOL[dtype], abs=STAT_TOL[dtype]), stat


@pytest.fixture
def small_blocks(monkeypatch):
    """Several row blocks, angle chunks and multinomial chunks at test sizes (UniformHistogramMiner:
    the blocked sweeps, which otherwise start past 512 rows)."""
    monkeypatch.setattr(blocked_miners, "_BLOCK_VALUES", 64 * 90)
    monkeypatch.setattr(blocked_miners, "_ANGLE_VALUES", 700)
    monkeypatch.setattr(blocked_miners, "_HISTOGRAM_REFERENCE_ROWS", 0)
    monkeypatch.setattr(blocked_miners, "_HISTOGRAM_REFERENCE_PAIRS_PER_DRAW", 0)


# ----------------------------------------------------------------------------- AngularMiner
ANGULAR_CASES = [  # (seed, n, dim, classes, ref_rows, angle)
    (0, 13, 5, 3, None, 20), (1, 70, 8, 4, None, 45), (2, 97, 6, 9, 61, 30), (3, 41, 3, 2, None, 60),
    (4, 30, 7, 5, 33, 0), (5, 25, 4, 3, None, 90), (6, 25, 4, 3, None, -15), (7, 29, 4, 3, 31, 89.99),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ANGULAR_CASES, ids=lambda c: f"n{c[1]}-ref{c[4]}-angle{c[5]}")
def test_angular_matches_pml(case, dtype, small_blocks):
    seed, n, dim, classes, ref_rows, angle = case
    args = _batch(seed, n, dim, classes, dtype, ref_rows)
    ours, theirs = _both("AngularMiner", angle=angle, collect_stats=True)
    assert_same_indices(ours(*args), theirs(*args))
    _stats_match(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_angular_triplets_at_the_threshold_are_recomputed(dtype, monkeypatch, small_blocks):
    """The threshold set to PML's own angles (ties at the threshold), and a negative placed at a
    pair's centre (d_nc ~ eps): the interval test can't decide those, PML's maths does."""
    x, y = _batch(11, 40, 6, 3, dtype)
    a, p = [int(i) for i in torch.where(y == y[0])[0][:2]]
    other = int(torch.where(y != y[0])[0][0])
    x[other] = (x[a] + x[p]) / 2
    pml_miner = pml_miners.AngularMiner(angle=0, collect_stats=True)
    pml_miner(x, y)
    calls = []
    real = blocked_miners._pml_angles
    monkeypatch.setattr(blocked_miners, "_pml_angles", lambda *args: calls.append(len(args[2])) or real(*args))
    for degrees in (pml_miner.average_angle, pml_miner.max_angle, pml_miner.min_angle, 35.0):
        ours, theirs = _both("AngularMiner", angle=degrees, collect_stats=True)
        assert_same_indices(ours(x, y), theirs(x, y))
        _stats_match(ours, theirs, dtype)
    assert sum(calls) > 0


def test_angular_output_too_large_raises(monkeypatch):
    monkeypatch.setattr(blocked_miners, "_MAX_OUTPUT_BYTES", 24 * 2 * 100)
    x, y = _batch(0, 30, 4, 3, torch.float32)
    with pytest.raises(torch.OutOfMemoryError, match="AngularMiner: the mined triplets would need"):
        our_miners.AngularMiner(angle=0)(x, y)
    monkeypatch.setattr(blocked_miners, "_MAX_OUTPUT_BYTES", None)
    assert len(our_miners.AngularMiner(angle=0)(x, y)[0]) > 100


def test_angular_stats_not_computed_without_collect_stats(monkeypatch):
    import dmlkern.miners.angular_miner as am

    monkeypatch.setattr(am, "AngleStats", lambda: pytest.fail("statistics without collect_stats"))
    x, y = _batch(0, 20, 4, 3, torch.float32)
    assert_same_indices(our_miners.AngularMiner()(x, y), pml_miners.AngularMiner()(x, y))


# ----------------------------------------------------------------------------- HDCMiner
HDC_DISTANCES = [None, ("CosineSimilarity", {}), ("LpDistance", {"power": 2}),
                 ("DotProductSimilarity", {"normalize_embeddings": False})]


def _hdc_pair(filter_percentage, dist):
    kw = dict(filter_percentage=filter_percentage)
    if dist is None:
        return _both("HDCMiner", **kw)
    return (our_miners.HDCMiner(distance=getattr(our_distances, dist[0])(**dist[1]), **kw),
            pml_miners.HDCMiner(distance=getattr(pml_distances, dist[0])(**dist[1]), **kw))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist", HDC_DISTANCES, ids=lambda d: "default" if d is None else d[0])
def test_hdc_matches_pml(dist, dtype, small_blocks):
    """Pair lists up to _TOPK_PAIRS: PML's output in PML's order, ties (the pairs (i, j) and
    (j, i) of a batch with itself) included."""
    for seed, (n, dim, classes, ref_rows) in enumerate([(13, 5, 3, None), (150, 9, 11, None), (101, 4, 6, 67)]):
        args = _batch(seed, n, dim, classes, dtype, ref_rows)
        for f in (0.5, 0.27, 0.01, 1.0, 0.0):
            ours, theirs = _hdc_pair(f, dist)
            assert_hdc_like_pml(ours(*args), theirs(*args), theirs.distance(args[0], args[2] if ref_rows else None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hdc_past_topk_pairs(dtype, monkeypatch, small_blocks):
    """Candidates pruned block by block: the same values in the same order as PML, the same pairs
    except among those tied with the k-th value, and ties in row-major order (PML: torch.topk's)."""
    monkeypatch.setattr(blocked_miners, "_TOPK_PAIRS", 0)
    for seed, (n, dim, classes, ref_rows) in enumerate([(150, 9, 11, None), (151, 6, 4, 97), (77, 3, 2, None)]):
        args = _batch(seed, n, dim, classes, dtype, ref_rows)
        refs = args[0] if ref_rows is None else args[2]
        mat = torch.cdist(torch.nn.functional.normalize(args[0]), torch.nn.functional.normalize(refs))
        for f in (0.5, 0.03, 1.0):
            ours, theirs = _hdc_pair(f, None)
            got, want = ours(*args), theirs(*args)
            if not EXACT_HDC:
                assert_hdc_like_pml(got, want, mat)
                continue
            for i in (0, 2):
                got_vals, want_vals = mat[got[i], got[i + 1]], mat[want[i], want[i + 1]]
                assert torch.equal(got_vals, want_vals) and len(got_vals) > 0
                strict = want_vals != want_vals[-1]

                def listed(t, vals):
                    return sorted(zip(vals[strict].tolist(), t[i][strict].tolist(), t[i + 1][strict].tolist()))

                assert listed(got, got_vals) == listed(want, want_vals)
                flat = got[i] * refs.shape[0] + got[i + 1]
                same_value = got_vals[1:] == got_vals[:-1]
                assert torch.all(flat[1:][same_value] > flat[:-1][same_value])


def test_hdc_past_topk_pairs_orders_ties_row_major(monkeypatch):
    monkeypatch.setattr(blocked_miners, "_TOPK_PAIRS", 0)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    a1, p, a2, n = our_miners.HDCMiner(filter_percentage=0.5)(x, y)
    assert (a1.tolist(), p.tolist()) == ([0, 1], [1, 0])  # all four positive pairs at distance 0
    d = torch.cdist(torch.nn.functional.normalize(x), torch.nn.functional.normalize(x))[a2, n]
    assert torch.all(d[1:] >= d[:-1])
    ties = d == d[-1]
    flat = (a2 * 5 + n)[ties]
    assert torch.all(flat[1:] > flat[:-1])


def test_hdc_set_idx_externally(small_blocks):
    x, y = _batch(3, 150, 6, 5, torch.float64)
    for external in (pml_miners.TripletMarginMiner(margin=0.3)(x, y), pml_miners.PairMarginMiner()(x, y)):
        ours, theirs = _both("HDCMiner", filter_percentage=0.6)
        ours.set_idx_externally(external, y)
        theirs.set_idx_externally(external, y)
        mat = theirs.distance(x)
        for _ in range(3):  # PML keeps (and re-filters) the external pairs on later calls
            assert_hdc_like_pml(ours(x, y), theirs(x, y), mat)
        ours.reset_idx()
        theirs.reset_idx()
        assert_hdc_like_pml(ours(x, y), theirs(x, y), mat)
    ours, theirs = _both("HDCMiner")
    bad = (torch.tensor([0, 150]), torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([3]))
    for miner in (ours, theirs):
        miner.set_idx_externally(bad, y)
        with pytest.raises(IndexError):
            miner(x, y)


def test_hdc_filter_over_one_raises_as_pml():
    x, y = _batch(0, 10, 4, 3, torch.float32)
    for miner in _both("HDCMiner", filter_percentage=1.5):
        with pytest.raises(RuntimeError, match="out of range"):
            miner(x, y)


# ----------------------------------------------------------------------------- DistanceWeightedMiner
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_distance_weighted_same_seed_same_triplets(dtype, blocks, request):
    """Several row blocks, classes larger than a block, multinomial drawn in chunks (small)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    shapes = [(13, 5, 3, None), (31, 17, 6, 29), (301, 8, 20, None), (200, 6, 2, None), (170, 7, 3, 130),
              (97, 16, 1, None)]
    for seed, (n, dim, classes, ref_rows) in enumerate(shapes):
        args = _batch(seed, n, dim, classes, dtype, ref_rows)
        kw = dict(cutoff=0.3, nonzero_loss_cutoff=1.9) if seed % 2 else {}
        torch.manual_seed(100 + seed)
        want = pml_miners.DistanceWeightedMiner(**kw)(*args)
        torch.manual_seed(100 + seed)
        got = our_miners.DistanceWeightedMiner(**kw)(*args)
        assert_same_indices(got, want)
        assert len(got[0]) > 0 or classes == 1
        torch.manual_seed(7)
        pml_miners.DistanceWeightedMiner(**kw)(*args)
        after_pml = torch.rand(4)
        torch.manual_seed(7)
        our_miners.DistanceWeightedMiner(**kw)(*args)
        assert torch.equal(torch.rand(4), after_pml)  # the same RNG consumption


def test_multinomial_in_chunks_is_torch_multinomial(monkeypatch):
    """The chunked draw relies on torch.multinomial(w, 1) = argmax(w / q), q ~ Exp(1) drawn for
    the whole tensor in order: fails if torch changes that."""
    monkeypatch.setattr(blocked_miners, "_BLOCK_VALUES", 300)
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        w = torch.rand(57, 41, generator=g, dtype=dtype)
        w[w < 0.4] = 0
        rows = torch.tensor([0, 0, 3, 5, 5, 5, 9] + list(range(10, 57)))
        torch.manual_seed(3)
        want = torch.multinomial(w[rows], 1, replacement=True).flatten()
        torch.manual_seed(3)
        got = blocked_miners._multinomial_rows(w, rows)
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- UniformHistogramMiner
UHM_CASES = [  # (n, dim, classes, ref_rows, num_bins, pos_per_bin, neg_per_bin)
    (50, 8, 4, None, 100, 10, 10), (301, 6, 9, None, 20, 3, 5), (200, 5, 2, 170, 7, 4, 1),
    (130, 3, 1, None, 10, 2, 2), (90, 4, 90, None, 5, 1, 2)]  # (one class: no negative; singletons: no positive)
UHM_DISTANCES = [("LpDistance", dict(normalize_embeddings=False)), ("LpDistance", {}), ("CosineSimilarity", {}),
                 ("DotProductSimilarity", dict(normalize_embeddings=False))]


def _uhm_pair(dist, **kw):
    return (our_miners.UniformHistogramMiner(distance=getattr(our_distances, dist[0])(**dist[1]), **kw),
            pml_miners.UniformHistogramMiner(distance=getattr(pml_distances, dist[0])(**dist[1]), **kw))


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("dist", UHM_DISTANCES, ids=lambda d: f"{d[0]}{len(d[1])}")
def test_uniform_histogram_same_seed_same_pairs(dist, blocks, request):
    """PML's pairs for the same seed and the same RNG consumption, over sweeps of row blocks. The
    embeddings are small integers, so that every distance has the same bits however its products
    are blocked (the bins' edges are the smallest and largest value)."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    for seed, (n, dim, classes, ref_rows, num_bins, pos_per_bin, neg_per_bin) in enumerate(UHM_CASES):
        g = torch.Generator().manual_seed(seed)
        args = [torch.randint(-3, 4, (n, dim), generator=g).float(), torch.randint(0, classes, (n,), generator=g)]
        if ref_rows is not None:
            args += [torch.randint(-3, 4, (ref_rows, dim), generator=g).float(),
                     torch.randint(0, classes, (ref_rows,), generator=g)]
        ours, pml = _uhm_pair(dist, num_bins=num_bins, pos_per_bin=pos_per_bin, neg_per_bin=neg_per_bin)
        torch.manual_seed(100 + seed)
        want = pml(*args)
        after_pml = torch.rand(4)
        torch.manual_seed(100 + seed)
        got = ours(*args)
        assert_same_indices(got, want)
        assert torch.equal(torch.rand(4), after_pml)  # the same RNG consumption


@pytest.mark.parametrize("blocked", [False, True], ids=["reference", "blocked"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_histogram_random_rows_match_pml(dtype, blocked, monkeypatch):
    """Random rows (the reference at these sizes, or the blocked sweeps: one block), fp32 and
    fp64, and the distance's statistics recorded once, as PML's."""
    if blocked:
        monkeypatch.setattr(blocked_miners, "_HISTOGRAM_REFERENCE_ROWS", 0)
        monkeypatch.setattr(blocked_miners, "_HISTOGRAM_REFERENCE_PAIRS_PER_DRAW", 0)
    from dmlkern.utils import common_functions as c_f
    import pytorch_metric_learning.utils.common_functions as pml_c_f

    old = c_f.COLLECT_STATS, pml_c_f.COLLECT_STATS
    c_f.COLLECT_STATS = pml_c_f.COLLECT_STATS = True
    try:
        for seed, shape in enumerate([(61, 7, 5, None), (120, 16, 3, 77)]):
            args = _batch(seed, *shape[:3], dtype, shape[3])
            ours, pml = _uhm_pair(("LpDistance", {}), num_bins=30)
            torch.manual_seed(seed)
            want = pml(*args)
            torch.manual_seed(seed)
            assert_same_indices(ours(*args), want)
            for name in pml.distance._record_these_stats:
                torch.testing.assert_close(torch.as_tensor(getattr(ours.distance, name)),
                                           torch.as_tensor(getattr(pml.distance, name)), rtol=STAT_TOL[dtype], atol=0)
    finally:
        c_f.COLLECT_STATS, pml_c_f.COLLECT_STATS = old


def _pml_bins(values, edges):
    """PML's filter_by_bin membership: the bin i with edges[i] <= v < edges[i + 1] (last closed)."""
    bins = torch.full(values.shape, -1, dtype=torch.long)
    for i in range(len(edges) - 1):
        inside = (edges[i] <= values) & ((values < edges[i + 1]) if i < len(edges) - 2 else (values <= edges[i + 1]))
        bins[inside] = i
    return bins


@pytest.mark.parametrize("dtype", DTYPES)
def test_histogram_bins_are_pml_comparisons(dtype):
    """Values on the edges, at the largest value, between them; equal edges (all values equal);
    edges of a tiny range (the estimate's rounding)."""
    g = torch.Generator().manual_seed(0)
    for low, high, n_bins in ((0.3, 1.7, 100), (-2.0, 5.0, 7), (1.0, 1.0 + 1e-6, 50), (0.5, 0.5, 10)):
        edges = torch.linspace(torch.tensor(low, dtype=dtype), torch.tensor(high, dtype=dtype), steps=n_bins + 1)
        values = torch.cat([edges, low + (high - low) * torch.rand(500, generator=g, dtype=dtype)]).clamp(low, high)
        got = blocked_miners._histogram_bins(values, edges)
        torch.testing.assert_close(got, _pml_bins(values, edges), rtol=0, atol=0)


def test_uniform_histogram_nan_raises_as_pml():
    """A NaN distance: PML's edges are NaN, no bin holds a pair and its torch.cat of none raises;
    the full-matrix reference runs and raises the same."""
    x, y = _batch(3, 12, 4, 3, torch.float32)
    x[4, 1] = float("nan")
    for miner in _uhm_pair(("LpDistance", {})):
        with pytest.raises((RuntimeError, ValueError), match="non-empty"):  # (torch: ValueError now)
            miner(x, y)


# ----------------------------------------------------------------------------- all three
MINERS = [("AngularMiner", {}), ("HDCMiner", {}), ("DistanceWeightedMiner", {})]


def test_empty_inputs():
    """An empty batch: empty tuples as PML (DistanceWeightedMiner: PML fails in torch.max); the
    blocked functions give empty tuples for no rows or no reference rows."""
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    for name, _ in MINERS:
        got = getattr(our_miners, name)()(*empty)
        assert len(got) == (4 if name == "HDCMiner" else 3) and all(t.numel() == 0 for t in got)
        if name != "DistanceWeightedMiner":
            assert_same_indices(got, getattr(pml_miners, name)()(*empty))
    x, y = torch.randn(5, 4), torch.tensor([0, 0, 1, 1, 2])
    lp = our_distances.LpDistance()
    for emb, lab, ref, ref_lab in ((x[:0], y[:0], x, y), (x, y, x[:0], y[:0])):
        outs = [blocked_miners.angular_miner(emb, lab, ref, ref_lab, 0.3),
                blocked_miners.hdc_all_pairs(lp, emb, lab, ref, ref_lab, 0.5),
                blocked_miners.distance_weighted_miner(lp, emb, lab, ref, ref_lab, 0.5, 1.4)]
        for out in outs:
            assert all(t.dtype == torch.long and t.numel() == 0 for t in out)


def test_same_output_at_one_two_and_four_threads(monkeypatch):
    """Indices and AngularMiner's statistics bit for bit at 1, 2 and 4 threads (sizes past torch's
    grain size, where an op is split over threads)."""
    monkeypatch.setattr(blocked_miners, "_TOPK_PAIRS", 1 << 14)
    x, y = _batch(5, 600, 32, 40, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            angular = our_miners.AngularMiner(angle=35, collect_stats=True)
            out = [*angular(x, y), *our_miners.HDCMiner(filter_percentage=0.2)(x, y)]
            torch.manual_seed(0)
            out += our_miners.DistanceWeightedMiner()(x, y)
            results.append((out, [getattr(angular, s) for s in angular._record_these_stats]))
    finally:
        torch.set_num_threads(before)
    for out, stats in results[1:]:
        assert all(torch.equal(u, v) for u, v in zip(out, results[0][0]))
        assert stats == results[0][1]


# ----------------------------------------------------------------------------- memory
_MEMORY_SETUP = """
    import math
    torch.manual_seed(0)
    n = {n}
    x = torch.randn(n, 128)
    labels = torch.randint(0, n // 8, (n,))
    same = int(torch.bincount(labels).pow(2).sum())
    miners.{miner}()(x[:300], labels[:300])  # loads the kernels' code (BLAS, the extension) before measuring
"""


@pytest.mark.slow
def test_angular_peak_memory():
    """N=1024, D=128, angle 60: PML lists ~7.3M triplets and gathers three T x D rows (> 10 GiB);
    the blocked miner's peak RSS grows by < 256 MiB."""
    growth = peak_rss_growth_mib(_MEMORY_SETUP.format(n=1024, miner="AngularMiner"), """
        out = miners.AngularMiner(angle=60)(x, labels)
        assert len(out[0]) < 10000
    """)
    print(f"peak RSS growth {growth:.0f} MiB")
    assert growth < 256, growth


@pytest.mark.slow
def test_hdc_peak_memory():
    """N=8192, D=128, filter 0.001: PML's matrix (256 MiB) and list of every pair (> 1 GiB); the
    blocked miner's peak RSS grows by < 256 MiB."""
    growth = peak_rss_growth_mib(_MEMORY_SETUP.format(n=8192, miner="HDCMiner"), """
        out = miners.HDCMiner(filter_percentage=0.001)(x, labels)
        assert len(out[0]) == math.ceil(0.001 * (same - n)) and len(out[2]) == math.ceil(0.001 * (n * n - same))
    """)
    print(f"peak RSS growth {growth:.0f} MiB")
    assert growth < 256, growth


@pytest.mark.slow
def test_uniform_histogram_peak_memory():
    """N=4096, D=128: PML's matrix (64 MiB), its list of every pair (16.7M pairs, > 512 MiB of
    indices) and a mask per bin; the blocked miner's peak RSS grows by < 64 MiB (N=8192 measured
    +43 MiB on a 2-core AMD EPYC, in 4x the time)."""
    growth = peak_rss_growth_mib(_MEMORY_SETUP.format(n=4096, miner="UniformHistogramMiner"), """
        out = miners.UniformHistogramMiner()(x, labels)
        assert 0 < len(out[0]) <= 1000 and 0 < len(out[2]) <= 1000
    """, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    print(f"peak RSS growth {growth:.0f} MiB")
    assert growth < 64, growth


@pytest.mark.slow
def test_distance_weighted_peak_memory():
    """N=4096, D=128 (larger N take PML's random draws, class by class, a minute and more): PML's
    call grows the peak RSS by ~564 MiB (its N x N distances, weights and temporaries), the blocked
    miner's by < 128 MiB (~80 MiB: its block buffers, about the same at N=8192). With glibc's mmap
    threshold fixed at 128 KiB: its default raises the threshold after the first freed block, and
    the heap then keeps freed 8 MiB blocks (measured at N=8192: +263 MiB by default)."""
    growth = peak_rss_growth_mib(_MEMORY_SETUP.format(n=4096, miner="DistanceWeightedMiner"), """
        out = miners.DistanceWeightedMiner()(x, labels)
        assert len(out[0]) > 4096
    """, env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    print(f"peak RSS growth {growth:.0f} MiB")
    assert growth < 128, growth


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("n, m, d, power, same", [(300, None, 33, 1, True), (200, 700, 7, 2, False),
                                                  (70, 26, 5, 1, False), (2000, None, 128, 1, True)],
                         ids=["self", "ref-power2", "26-refs", "2000x128"])
def test_reused_euclidean_blocks_are_cdist_bits(dtype, n, m, d, power, same, monkeypatch):
    """distance_blocks(reuse=True) with an LpDistance (BatchEasyHardMiner's way): each block has the
    bits of torch.cdist on that block (the blocks' source before the reuse: the picks, hence the
    indices, are unchanged), squared for power 2, every block written into the same buffer.
    Blocks of 64 rows (several per call)."""
    monkeypatch.setattr(blocked_miners, "_BLOCK_VALUES", 64 * (m or n))
    g = torch.Generator().manual_seed(n)
    emb = torch.randn(n, d, generator=g, dtype=dtype)
    ref_emb = emb if same else torch.randn(m, d, generator=g, dtype=dtype)
    dist = our_distances.LpDistance(power=power)
    assert blocked_miners._EuclideanBlocks.apply(dist, emb, ref_emb)
    q = torch.nn.functional.normalize(emb, dim=1)
    r = q if same else torch.nn.functional.normalize(ref_emb, dim=1)
    pointers, count = set(), 0
    for r0, r1, mat in blocked_miners.distance_blocks(dist, emb, ref_emb, reuse=True):
        want = torch.cdist(q[r0:r1], r) ** power
        assert torch.equal(mat, want), f"rows {r0}:{r1}"
        pointers.add(mat.data_ptr())
        count += 1
    assert count > 1 and len(pointers) == 1


def test_reused_euclidean_blocks_decline():
    """The reused Euclidean blocks only for dmlkern's LpDistance(p=2) on CPU fp32/fp64 rows, over 25
    columns (cdist's product path), outside autograd."""
    x = torch.randn(40, 6)
    apply = blocked_miners._EuclideanBlocks.apply
    assert apply(our_distances.LpDistance(), x, x)
    assert not apply(our_distances.LpDistance(p=1), x, x)
    assert not apply(our_distances.CosineSimilarity(), x, x)
    assert not apply(our_distances.LpDistance(), x, x[:25])
    assert not apply(our_distances.LpDistance(), x.half(), x.half())
    assert not apply(our_distances.LpDistance(), x.requires_grad_(), x)


def test_histogram_bins_follow_pmls_comparisons():
    """`_histogram_bins` against the comparisons themselves (edges[i] <= v < edges[i + 1], the
    last bin closed, -1 in none): values on the edges, just off them, outside the range (a block's
    entries of the other side) and in uneven edges (the exact search)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        for edges in (torch.linspace(0.3, 1.7, 11, dtype=dtype), torch.tensor([0.0, 0.1, 0.15, 1.0, 2.0], dtype=dtype)):
            values = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1),
                                torch.rand(500, generator=g, dtype=dtype) * 3 - 0.5])
            want = torch.full(values.shape, -1, dtype=torch.long)
            n_bins = len(edges) - 1
            for i in range(n_bins):
                upper = values <= edges[i + 1] if i == n_bins - 1 else values < edges[i + 1]
                want[(values >= edges[i]) & upper] = i
            assert torch.equal(blocked_miners._histogram_bins(values, edges), want)
