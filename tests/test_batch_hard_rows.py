"""dmlkern::batch_hard_rows (csrc/cpu/batch_hard_rows_cpu.cpp), BatchEasyHardMiner's per-row picks
in C++ on the CPU: against its torch twin (`blocked_miners._torch_picks`: torch.min / max over the
filled rows) bit for bit on every rule (strategies, semihard order, ranges, min / max) and on
the hard inputs (ties, NaN, inf, finfo.max, all-equal labels, several chunks), the whole miners
against PML 2.9.0 with the kernel in use, and the same bits at 1 and 2 threads."""
import itertools

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners
import torch

import dmlkern.distances as our_distances
import dmlkern.fused.blocked_miners as bm
import dmlkern.miners as our_miners
from dmlkern.reference import miners as ref

from _batches import assert_same_indices

pytestmark = pytest.mark.skipif(not bm._CPU_PICKS, reason="the C++ extension (batch_hard_rows) is not built")

STRATEGIES = [(p, n) for p, n in itertools.product([ref.HARD, ref.SEMIHARD, ref.EASY, ref.ALL], repeat=2)
              if not (p == n == ref.SEMIHARD) and {p, n} != {ref.ALL, ref.SEMIHARD}]


def _rules(pos_strategy, neg_strategy, inverted):
    """blocked_miners.batch_easy_hard_miner's take_min per side, the op's modes and order."""
    closest_is_min = not inverted
    pos_take_min = closest_is_min if pos_strategy == ref.EASY else not closest_is_min
    neg_take_min = closest_is_min if neg_strategy in (ref.HARD, ref.SEMIHARD) else not closest_is_min
    pick_pos, pick_neg = pos_strategy != ref.ALL, neg_strategy != ref.ALL
    order = 1 if pos_strategy == ref.SEMIHARD and pick_neg else 2 if neg_strategy == ref.SEMIHARD and pick_pos else 0
    modes = [(1 if t else 2) if p else 0 for p, t in ((pick_pos, pos_take_min), (pick_neg, neg_take_min))]
    return pos_take_min, neg_take_min, modes, order


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(0.0, 0.0, 0.0), b.nan_to_num(0.0, 0.0, 0.0)) and torch.equal(a.signbit(), b.signbit())


def _assert_block_matches(mat, labels, ref_labels, r0, strategies, inverted, pos_range, neg_range):
    pos_strategy, neg_strategy = strategies
    pos_take_min, neg_take_min, modes, order = _rules(pos_strategy, neg_strategy, inverted)
    r1 = r0 + mat.shape[0]
    got = bm._cpu_picks(mat, labels, ref_labels, r0, r1, *modes, order, pos_range, neg_range)
    want = bm._torch_picks(mat, labels, ref_labels, r0, r1, pos_strategy, neg_strategy, pos_take_min,
                           neg_take_min, pos_range, neg_range)[:2]
    for side, g, w in zip(("positive", "negative"), got, want):
        assert (g is None) == (w is None), side
        if g is None:
            continue
        (gv, gi), go = g
        (wv, wi), wo = w
        assert torch.equal(go, wo), f"{side}: ok differs in rows {(go != wo).nonzero().flatten().tolist()}"
        assert torch.equal(gi, wi), f"{side}: index differs in rows {(gi != wi).nonzero().flatten().tolist()}"
        assert _same_bits(gv, wv), f"{side}: values differ"


def _hard_block(seed, rows, cols, dtype, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: ties in and across chunks
        mat = torch.randint(0, 4, (rows, cols), generator=g).to(dtype) / 4
    elif kind == "special":  # NaN, +-inf, finfo.max / min, -0.0 among ties
        mat = torch.randint(0, 3, (rows, cols), generator=g).to(dtype) / 2
        fi = torch.finfo(dtype)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), fi.max, fi.min, -0.0], dtype=dtype)
        where = torch.rand(rows, cols, generator=g) < 0.08
        mat[where] = specials[torch.randint(0, len(specials), (int(where.sum()),), generator=g)]
    else:
        mat = torch.rand(rows, cols, generator=g, dtype=dtype) * 2
    return mat


SHAPES = [(1, 1), (1, 7), (5, 3), (7, 511), (9, 512), (6, 513), (4, 1500), (65, 64)]


@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_picks_match_torch_twin(kind, dtype):
    variants = list(itertools.product((False, True), (None, (0.25, 0.75))))  # (inverted, allowed range)
    if kind != "special":
        variants = [(False, None), (True, (0.25, 0.75))]
    for s, (rows, cols) in enumerate(SHAPES):
        mat = _hard_block(s, rows, cols, dtype, kind)
        g = torch.Generator().manual_seed(100 + s)
        for classes in (1, 3, cols):
            col_labels = torch.randint(0, classes, (cols,), generator=g)
            cases = [(torch.randint(0, classes, (rows,), generator=g), col_labels, 0)]  # ref labels
            if rows <= cols:  # the batch against itself: the block rows r0:r0+rows, self pairs excluded
                r0 = int(torch.randint(0, cols - rows + 1, (1,), generator=g))
                cases.append((col_labels, col_labels, r0))
            for labels, ref_labels, r0 in cases:
                for strategies in STRATEGIES:
                    for inverted, rng in variants:
                        _assert_block_matches(mat, labels, ref_labels, r0, strategies, inverted, rng,
                                              None if rng is None else (0.5, float("inf")))


def test_range_compares_in_the_matrix_dtype():
    """torch compares an fp32 matrix with a Python float in fp32 (0.1 rounds to fp32's 0.1)."""
    mat = torch.tensor([[0.1, 0.2, 0.10000001]], dtype=torch.float32)
    labels, ref_labels = torch.tensor([0]), torch.tensor([1, 1, 1])
    _assert_block_matches(mat, labels, ref_labels, 0, (ref.ALL, ref.HARD), False, None, (0.1, 0.1))
    (_, idx), ok = bm._cpu_picks(mat, labels, ref_labels, 0, 1, 0, 1, 0, None, (0.1, 0.1))[1]
    assert ok.item() and idx.item() == 0


def test_first_index_of_a_tie_and_first_nan():
    """The pinned rules themselves (so a twin that changed with them would still be caught)."""
    row = torch.tensor([[3.0, 1.0, 5.0, 1.0, 5.0, 0.0]])
    labels, ref_labels = torch.tensor([0]), torch.tensor([1, 0, 0, 0, 0, 1])  # positives 1..4
    (pv, pi), pok = bm._cpu_picks(row, labels, ref_labels, 0, 1, 2, 1, 0, None, None)[0]  # max positive
    assert pi.item() == 2 and pv.item() == 5.0 and pok.item()
    (pv, pi), _ = bm._cpu_picks(row, labels, ref_labels, 0, 1, 1, 1, 0, None, None)[0]  # min positive
    assert pi.item() == 1 and pv.item() == 1.0
    row[0, 3] = row[0, 4] = float("nan")
    (pv, pi), _ = bm._cpu_picks(row, labels, ref_labels, 0, 1, 1, 1, 0, None, None)[0]
    assert pi.item() == 3 and pv.isnan().item()
    (nv, ni), nok = bm._cpu_picks(row, torch.tensor([1]), torch.ones(6, dtype=torch.long), 0, 1, 1, 1, 0,
                                  None, None)[1]
    assert not nok.item() and ni.item() == 0 and nv.item() == torch.finfo(torch.float32).max  # no negative


def test_several_chunks_tie_across_chunks():
    """A row's minimum in two chunks (the op's chunks are 512 columns): the first one wins."""
    cols = 1700
    mat = torch.ones(2, cols, dtype=torch.float64)
    mat[:, [1600, 600, 1100]] = 0.25
    mat[1, 1650] = float("nan")
    labels, ref_labels = torch.tensor([0, 0]), torch.ones(cols, dtype=torch.long)
    (nv, ni), _ = bm._cpu_picks(mat, labels, ref_labels, 0, 2, 0, 1, 0, None, None)[1]
    assert ni.tolist() == [600, 1650] and nv[0].item() == 0.25 and nv[1].isnan()
    _assert_block_matches(mat, labels, ref_labels, 0, (ref.ALL, ref.HARD), False, None, None)


def test_same_bits_at_1_and_2_threads():
    g = torch.Generator().manual_seed(3)
    mat = torch.randint(0, 50, (301, 2049), generator=g).float() / 50
    labels = torch.randint(0, 40, (2049,), generator=g)
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2, 1, 2):
            torch.set_num_threads(t)
            runs.append(torch.ops.dmlkern.batch_hard_rows(mat, labels[100:401], labels, 100, True, [2, 1, 0], [], [])
                        + torch.ops.dmlkern.batch_hard_rows(mat, labels[100:401], labels, 100, True, [1, 2, 2],
                                                            [0.1, 0.9], []))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def test_argument_checks():
    mat, labels = torch.rand(3, 4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.dmlkern.batch_hard_rows(mat, labels[:3].int(), labels.int(), 0, False, [2, 1, 0], [], [])
    with pytest.raises(RuntimeError, match="semihard order needs both sides"):
        torch.ops.dmlkern.batch_hard_rows(mat, labels[:3], labels, 0, False, [0, 1, 2], [], [])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.dmlkern.batch_hard_rows(mat.half(), labels[:3], labels, 0, False, [2, 1, 0], [], [])


# ----------------------------------------------------------------------------- the miners vs PML
DISTANCES = [None, ("LpDistance", {"power": 2}), ("CosineSimilarity", {}),
             ("LpDistance", {"normalize_embeddings": False}), ("DotProductSimilarity", {"normalize_embeddings": False})]


def _miner(module, name, kw, dist):
    kw = dict(kw)
    if dist is not None:
        kw["distance"] = getattr(our_distances if module is our_miners else pml_distances, dist[0])(**dist[1])
    return getattr(module, name)(**kw)


def _inputs(seed, n, d, classes, dtype, dup, ref_rows=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    if dup:  # duplicated rows: tied distances (0 to each other, equal to every other row)
        x[1::3] = x[0::3][: len(x[1::3])]
    y = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return (x, y)
    r = torch.randn(ref_rows, d, generator=g, dtype=dtype)
    r[: min(ref_rows, n) // 2] = x[: min(ref_rows, n) // 2]
    return (x, y, r, torch.randint(0, classes, (ref_rows,), generator=g))


@pytest.fixture
def counted(monkeypatch):
    """Several row blocks at test sizes, and the number of C++ calls made."""
    monkeypatch.setattr(bm, "_BLOCK_VALUES", 64 * 90)
    calls = []
    real = bm._cpu_picks

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "_cpu_picks", spy)
    return calls


MINER_CASES = [("BatchHardMiner", {})] + [
    ("BatchEasyHardMiner", dict(pos_strategy=p, neg_strategy=n)) for p, n in STRATEGIES] + [
    ("BatchEasyHardMiner", dict(pos_strategy="semihard", neg_strategy="hard", allowed_pos_range=(0.3, 1.2),
                                allowed_neg_range=(0.5, 1.6)))]


@pytest.mark.parametrize("case", MINER_CASES, ids=lambda c: c[0] + "-" + "-".join(map(str, c[1].values())))
def test_miners_match_pml_with_the_kernel(case, counted):
    name, kw = case
    for dist in DISTANCES:
        for seed, (n, d, classes, dtype, dup, ref_rows) in enumerate([
                (150, 8, 7, torch.float32, True, None), (131, 5, 1, torch.float64, False, None),
                (97, 6, 40, torch.float32, False, 83), (1, 4, 2, torch.float32, False, None),
                (70, 4, 3, torch.float64, True, 71), (66, 3, 66, torch.float32, False, None)]):
            args = _inputs(seed, n, d, classes, dtype, dup, ref_rows)
            before = len(counted)
            ours = _miner(our_miners, name, kw, dist)(*args)
            assert len(counted) > before  # the kernel ran
            assert_same_indices(ours, _miner(pml_miners, name, kw, dist)(*args))


def test_kernel_and_torch_paths_agree(monkeypatch):
    """The whole miner with the C++ picks and with the torch twin (the other devices' path)."""
    monkeypatch.setattr(bm, "_BLOCK_VALUES", 64 * 200)
    args = _inputs(9, 300, 16, 30, torch.float32, True)
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(bm, "_CPU_PICKS", kernel)
        results.append([our_miners.BatchEasyHardMiner(pos_strategy=p, neg_strategy=n)(*args) for p, n in STRATEGIES]
                       + [our_miners.BatchHardMiner()(*args)])
    for a, b in zip(*results):
        assert_same_indices(a, b)
