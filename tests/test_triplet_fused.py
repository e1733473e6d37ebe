"""The fused TripletMarginLoss (dmlkern/fused/triplet.py): every triplet, or a TripletMarginMiner's
lazy result, without listing the triplets; against PML 2.9.0 itself and the reference path."""
import copy
import pickle

import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.reducers as pml_reducers
from pytorch_metric_learning import distances as pml_distances

import dmlkern.fused._common as fused_common
import dmlkern.fused.listed_pairs as listed_pairs
import dmlkern.fused.triplet as fused_triplet
from dmlkern import distances, losses, miners
from dmlkern import reducers as our_reducers
from dmlkern.fused.lazy_pairs import LazyMinedTriplets
from dmlkern.reducers import AvgNonZeroReducer, MeanReducer, SumReducer
from _peak_rss import peak_rss_growth_mib
from _pml_helpers import assert_value_and_grads_close, random_indices

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
MINER_KINDS = [None, "all", "hard", "semihard", "easy"]
# (N, classes, ref rows or None). Degenerate: one sample, one class, no positives.
CASES = [(1, 1, None), (12, 1, None), (9, 9, None), (37, 5, None), (61, 7, 45)]


@pytest.fixture(params=["cpp", "torch"])
def row_impl(request, monkeypatch):
    """The per-row work in C++ (the CPU default) or in the torch twin (every other device)."""
    if request.param == "cpp" and not fused_triplet._CPU_KERNEL:
        pytest.fail("dmlkern::triplet_rows is not registered in this build")
    monkeypatch.setattr(fused_triplet, "_CPU_KERNEL", request.param == "cpp")
    return request.param


class _Calls(list):
    impl = None


@pytest.fixture
def sorted_calls(row_impl, monkeypatch):
    """Each implementation (row_impl); on the torch twin, its sorted rows' calls (a list)."""
    calls, real = _Calls(), fused_triplet._sorted_rows
    calls.impl = row_impl
    monkeypatch.setattr(fused_triplet, "_sorted_rows", lambda *args: calls.append(1) or real(*args))
    return calls


def _inputs(n, classes, ref_rows, dtype, seed=0, d=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return x, labels, None, None
    ref = torch.randn(ref_rows, d, generator=g, dtype=torch.float64).to(dtype)
    return x, labels, ref, torch.randint(0, classes, (ref_rows,), generator=g)


def _grads(lib, loss_kw, miner_kw, x, labels, ref, ref_labels, distance=None):
    """(value, grad x, grad ref) of lib's TripletMarginLoss (with lib's miner when miner_kw)."""
    L, M, D = (losses, miners, distances) if lib == "dmlkern" else (pml_losses, pml_miners, pml_distances)
    dist = None if distance is None else getattr(D, distance)()
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    loss_fn = L.TripletMarginLoss(**loss_kw, **({} if dist is None else {"distance": dist}))
    mined = None
    if miner_kw is not None:
        miner = M.TripletMarginMiner(**miner_kw, **({} if dist is None else {"distance": copy.deepcopy(dist)}))
        mined = miner(x, labels, ref, ref_labels)
    value = loss_fn(x, labels, mined, ref, ref_labels)
    wrt = [x] + ([ref] if ref is not None else [])
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return value.detach(), grads, loss_fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", [None, "CosineSimilarity"])
@pytest.mark.parametrize("kind", MINER_KINDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}c{c[1]}r{c[2]}")
def test_matches_pml(case, kind, distance, dtype, row_impl):
    x, labels, ref, ref_labels = _inputs(*case, dtype)
    miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.1 if kind == "easy" else 0.2}
    for loss_kw in ({"margin": 0.3}, {"margin": 0.05, "smooth_loss": True}):
        ours, our_grads, loss_fn = _grads("dmlkern", loss_kw, miner_kw, x, labels, ref, ref_labels, distance)
        want, want_grads, _ = _grads("pml", loss_kw, miner_kw, x, labels, ref, ref_labels, distance)
        assert loss_fn.last_backend in ("blocked", "zero"), loss_fn.last_fallback
        torch.testing.assert_close(ours, want, **TOL[dtype])
        for g, w in zip(our_grads, want_grads):
            torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", MINER_KINDS)
def test_half_embeddings_run_blocked_in_fp32(kind, dtype, row_impl):
    """fp16 / bf16 embeddings (a model under autocast) run the blocked path in fp32, not the
    reference's O(N^3) triplets: PML's result on the same values in fp32, rounded to the dtype
    (the loss and the gradients are in the embeddings' dtype)."""
    miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.1 if kind == "easy" else 0.2}
    for case in [(37, 5, None), (61, 7, 45)]:
        x, labels, ref, ref_labels = _inputs(*case, dtype, seed=1)
        up = (lambda t: None if t is None else t.float())
        for loss_kw in ({"margin": 0.3}, {"margin": 0.05, "smooth_loss": True}):
            ours, our_grads, loss_fn = _grads("dmlkern", loss_kw, miner_kw, x, labels, ref, ref_labels)
            want, want_grads, _ = _grads("pml", loss_kw, miner_kw, up(x), labels, up(ref), ref_labels)
            what = f"{dtype} {kind} {case} {loss_kw}"
            assert loss_fn.last_backend == "blocked", (what, loss_fn.last_fallback)
            assert ours.dtype == dtype and all(g.dtype == dtype for g in our_grads), what
            half_ulp = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-3)
            assert_value_and_grads_close(ours.float(), [g.float() for g in our_grads], want.to(dtype).float(),
                                         [w.to(dtype).float() for w in want_grads], **half_ulp,
                                         msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_embeddings_run_listed_triplets_in_fp32(dtype):
    """Listed triplets (a hand-made tuple, with and without ref_emb) with fp16 / bf16 embeddings:
    the listed path in fp32 from the widened rows, PML's result on the fp32 values rounded to the
    dtype (loss and gradients in the embeddings' dtype)."""
    half_ulp = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-3)
    for case in [(37, 5, None), (61, 7, 45)]:
        x, labels, ref, ref_labels = _inputs(*case, dtype, seed=4)
        tup = random_indices(5, "triplets", labels, ref_labels, n=30)  # not dense (2T < N M / 16)
        for loss_kw in ({"margin": 0.3}, {"margin": 0.05, "smooth_loss": True}):
            results = []
            for lib, t in (("dmlkern", lambda v: v), ("pml", lambda v: None if v is None else v.float())):
                L = losses if lib == "dmlkern" else pml_losses
                xx = t(x).clone().requires_grad_(True)
                rr = None if ref is None else t(ref).clone().requires_grad_(True)
                loss_fn = L.TripletMarginLoss(**loss_kw)
                value = loss_fn(xx, labels, tup, rr, ref_labels)
                wrt = [xx] + ([rr] if rr is not None else [])
                results.append((value.detach(), torch.autograd.grad(value, wrt), loss_fn))
            (ours, our_grads, loss_fn), (want, want_grads, _) = results
            what = f"{dtype} {case} {loss_kw}"
            assert loss_fn.last_backend == "listed", (what, loss_fn.last_fallback)
            assert ours.dtype == dtype and all(g.dtype == dtype for g in our_grads), what
            assert_value_and_grads_close(ours.float(), [g.float() for g in our_grads], want.to(dtype).float(),
                                         [w.to(dtype).float() for w in want_grads], **half_ulp,
                                         msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("reducer", [MeanReducer, SumReducer, AvgNonZeroReducer])
def test_reducers_match_the_reference(reducer, row_impl):
    x, labels, _, _ = _inputs(45, 6, None, torch.float64, seed=3)
    results = []
    for backend in ("auto", "reference"):
        xx = x.clone().requires_grad_(True)
        loss_fn = losses.TripletMarginLoss(margin=0.4, reducer=reducer())
        loss_fn.backend = backend
        value = loss_fn(xx, labels, miners.TripletMarginMiner(type_of_triplets="semihard")(xx, labels))
        results.append((value.detach(), torch.autograd.grad(value, xx)[0], loss_fn.last_backend))
    (v, g, b), (rv, rg, rb) = results
    assert (b, rb) == ("blocked", "reference")
    torch.testing.assert_close(v, rv, **TOL[torch.float64])
    torch.testing.assert_close(g, rg, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", [None, "CosineSimilarity"])
@pytest.mark.parametrize("case", [(61, 2, None), (40, 3, None), (50, 2, 33), (9, 1, None)],
                         ids=lambda c: f"n{c[0]}c{c[1]}r{c[2]}")
def test_sorted_rows_match_pml(monkeypatch, case, distance, dtype, sorted_calls):
    """Rows with many positives (few large classes) sort their negatives once (relu terms), in
    C++ and in the torch twin: forced on every row here, against PML for every miner window."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", 1)
    x, labels, ref, ref_labels = _inputs(*case, dtype, seed=71)
    for kind in MINER_KINDS:
        miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.1 if kind == "easy" else 0.2}
        for margin in (0.3, 0.0, -0.05):
            ours, our_grads, loss_fn = _grads("dmlkern", {"margin": margin}, miner_kw, x, labels, ref, ref_labels,
                                              distance)
            want, want_grads, _ = _grads("pml", {"margin": margin}, miner_kw, x, labels, ref, ref_labels, distance)
            assert loss_fn.last_backend in ("blocked", "zero"), loss_fn.last_fallback
            torch.testing.assert_close(ours, want, **TOL[dtype])
            for g, w in zip(our_grads, want_grads):
                torch.testing.assert_close(g, w, **TOL[dtype])
    assert sorted_calls or case[1] == 1 or sorted_calls.impl == "cpp"  # (one class: no negative, no triplet)


def test_sorted_rows_agree_with_the_direct_ones(monkeypatch, sorted_calls):
    """Sorted and direct rows on one batch of two classes (150 positives a row: the default
    threshold sorts them): the same counts, sums and gradients within rounding, the same bits at
    1, 2 and 4 threads."""
    x, labels, _, _ = _inputs(300, 2, None, torch.float32, seed=73)
    results = {}
    before = torch.get_num_threads()
    try:
        for threshold, threads in ((10**9, 2), (128, 1), (128, 2), (128, 4)):
            monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", threshold)
            torch.set_num_threads(threads)
            value, (g,), loss_fn = _grads("dmlkern", {"margin": 0.2}, {"type_of_triplets": "semihard"}, x, labels,
                                          None, None)
            assert loss_fn.last_backend == "blocked"
            results[(threshold, threads)] = (value, g)
    finally:
        torch.set_num_threads(before)
    assert sorted_calls or sorted_calls.impl == "cpp"
    direct = results.pop((10**9, 2))
    for value, g in results.values():
        assert torch.equal(value, results[(128, 1)][0]) and torch.equal(g, results[(128, 1)][1])
        torch.testing.assert_close(value, direct[0], **TOL[torch.float32])
        torch.testing.assert_close(g, direct[1], **TOL[torch.float32])


def test_sorted_and_direct_rows_in_one_block(monkeypatch, sorted_calls):
    """A block whose large class's rows sort (>= 10 positives; in chunks of rows) and whose small
    classes' rows don't, against PML for every window."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", 10)
    monkeypatch.setattr(fused_triplet, "SORTED_CHUNK_VALUES", 3 * 47)  # the torch twin: 3 rows per call
    g = torch.Generator().manual_seed(83)
    x = torch.randn(47, 6, generator=g, dtype=torch.float64)
    labels = torch.cat([torch.zeros(20, dtype=torch.long), torch.randint(1, 8, (27,), generator=g)])
    labels = labels[torch.randperm(47, generator=g)]
    for kind in MINER_KINDS:
        miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.2}
        ours, (grad,), _ = _grads("dmlkern", {"margin": 0.3}, miner_kw, x, labels, None, None)
        want, (want_grad,), _ = _grads("pml", {"margin": 0.3}, miner_kw, x, labels, None, None)
        torch.testing.assert_close(ours, want, **TOL[torch.float64])
        torch.testing.assert_close(grad, want_grad, **TOL[torch.float64])
    assert len(sorted_calls) > len(MINER_KINDS) or sorted_calls.impl == "cpp"  # several chunks a call


def test_sorted_rows_gradcheck_and_nan(monkeypatch, sorted_calls):
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", 1)
    x, labels, _, _ = _inputs(16, 2, None, torch.float64, seed=79)
    loss_fn = losses.TripletMarginLoss(margin=0.7)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (x.clone().requires_grad_(True),))
    assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
    assert sorted_calls or sorted_calls.impl == "cpp"
    x[3, 2] = float("nan")  # a NaN row: the direct sweep (its NaN terms), then PML's reference
    for kind in (None, "semihard"):
        miner_kw = None if kind is None else {"type_of_triplets": kind}
        ours, _, _ = _grads("dmlkern", {}, miner_kw, x, labels, None, None)
        want, _, _ = _grads("pml", {}, miner_kw, x, labels, None, None)
        torch.testing.assert_close(ours, want, equal_nan=True, **TOL[torch.float64])


def test_forced_small_blocks_and_many_positives(monkeypatch, row_impl):
    """Several row blocks of a few rows each, rows with many positives (slots), odd sizes."""
    monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", 3 * 53)
    x, labels, _, _ = _inputs(53, 2, None, torch.float64, seed=5)
    for kind in MINER_KINDS:
        miner_kw = None if kind is None else {"type_of_triplets": kind}
        ours, (g,), loss_fn = _grads("dmlkern", {}, miner_kw, x, labels, None, None)
        want, (w,), _ = _grads("pml", {}, miner_kw, x, labels, None, None)
        assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
        torch.testing.assert_close(ours, want, **TOL[torch.float64])
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_gradcheck_fp64(row_impl):
    x, labels, ref, ref_labels = _inputs(14, 3, 11, torch.float64, seed=7, d=5)  # 125 inputs to perturb
    for smooth in (False, True):
        loss_fn = losses.TripletMarginLoss(margin=0.7, smooth_loss=smooth)

        def f(x, ref):
            return loss_fn(x, labels, None, ref, ref_labels)
        assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), ref.clone().requires_grad_(True)))
        assert loss_fn.last_backend == "blocked", loss_fn.last_fallback


@pytest.mark.parametrize("swap", [False, True])
def test_double_backward_matches_the_reference(swap):
    x, labels, _, _ = _inputs(15, 3, None, torch.float64, seed=9)
    v = torch.randn_like(x)
    hvps = []
    for backend in ("auto", "reference"):
        xx = x.clone().requires_grad_(True)
        loss_fn = losses.TripletMarginLoss(margin=0.5, smooth_loss=True, swap=swap)
        loss_fn.backend = backend
        (g,) = torch.autograd.grad(loss_fn(xx, labels), xx, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), xx)[0])
    torch.testing.assert_close(hvps[0], hvps[1], **TOL[torch.float64])


def test_bit_identical_across_thread_counts(row_impl):
    x, labels, _, _ = _inputs(300, 20, None, torch.float32, seed=11)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4, 1):
            torch.set_num_threads(threads)
            for kind in (None, "semihard"):
                miner_kw = None if kind is None else {"type_of_triplets": kind}
                value, (g,), loss_fn = _grads("dmlkern", {"smooth_loss": kind is None}, miner_kw, x, labels, None, None)
                assert loss_fn.last_backend == "blocked"
                results.append((threads, kind, value, g))
    finally:
        torch.set_num_threads(before)
    first = {kind: (v, g) for t, kind, v, g in results if t == 1}
    for _, kind, v, g in results:
        assert torch.equal(v, first[kind][0]) and torch.equal(g, first[kind][1])


def test_nan_embeddings_follow_pml(row_impl):
    x, labels, _, _ = _inputs(20, 4, None, torch.float64, seed=13)
    x[3, 2] = float("nan")
    for kind in (None, "semihard"):
        miner_kw = None if kind is None else {"type_of_triplets": kind}
        ours, _, _ = _grads("dmlkern", {}, miner_kw, x, labels, None, None)
        want, _, _ = _grads("pml", {}, miner_kw, x, labels, None, None)
        torch.testing.assert_close(ours, want, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("reducer", ["MeanReducer", "SumReducer"])
def test_nan_anchor_gradients_follow_pml(reducer):
    """A NaN anchor with the raw dot product: PML's relu passes a NaN term's gradient, so the
    anchor's gradient is the finite sum of (n - p) over its triplets (its rows do not hold the
    NaN); dmlkern's blocked sums drop NaN terms, so the reference runs (`last_fallback`)."""
    x, labels, ref, ref_labels = _inputs(14, 2, 13, torch.float64, seed=21)
    x[1, 1] = float("nan")
    out = []
    for lib, dist, red in ((losses, distances, our_reducers), (pml_losses, pml_distances, pml_reducers)):
        loss = lib.TripletMarginLoss(distance=dist.DotProductSimilarity(normalize_embeddings=False),
                                     reducer=getattr(red, reducer)())
        xx, rr = x.clone().requires_grad_(), ref.clone().requires_grad_()
        value = loss(xx, labels, None, rr, ref_labels)
        value.backward()
        out.append((value.detach(), xx.grad, rr.grad))
        if lib is losses:
            assert "NaN triplet losses" in str(loss.last_fallback), loss.last_fallback
    assert torch.isfinite(out[1][1][1]).all(), "PML's NaN anchor gradient must be finite for the case to bite"
    for ours, theirs in zip(*out):
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL[torch.float64])


SWAP_DISTANCES = [None, "CosineSimilarity", ("LpDistance", {"normalize_embeddings": False}),
                  ("DotProductSimilarity", {"normalize_embeddings": False})]


def _swap_case(lib, loss_kw, miner_kw, x, labels, distance):
    """(value, grad x, loss) of lib's TripletMarginLoss(swap=True), after lib's miner when miner_kw."""
    L, M, D = (losses, miners, distances) if lib == "dmlkern" else (pml_losses, pml_miners, pml_distances)
    name, kw = (distance, {}) if isinstance(distance, str) or distance is None else distance
    dist = {} if name is None else {"distance": getattr(D, name)(**kw)}
    xx = x.clone().requires_grad_(True)
    loss_fn = L.TripletMarginLoss(swap=True, **loss_kw, **dist)
    mined = None if miner_kw is None else M.TripletMarginMiner(**miner_kw, **copy.deepcopy(dist))(xx, labels)
    value = loss_fn(xx, labels, mined)
    grad = torch.autograd.grad(value, xx)[0] if value.requires_grad else torch.zeros_like(xx)
    return value.detach(), grad if grad is not None else torch.zeros_like(xx), loss_fn


# (the miner's lazy result takes the unit distances: the raw ones only without a miner)
SWAP_CONFIGS = [(d, k) for d in SWAP_DISTANCES for k in (MINER_KINDS if d in SWAP_DISTANCES[:2] else [None])]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance,kind", SWAP_CONFIGS,
                         ids=[f"{d if d is None or isinstance(d, str) else 'raw-' + d[0]}-{k}" for d, k in SWAP_CONFIGS])
@pytest.mark.parametrize("case", [(1, 1), (12, 1), (9, 9), (37, 5), (40, 3)], ids=lambda c: f"n{c[0]}c{c[1]}")
def test_swap_matches_pml(case, kind, distance, dtype, row_impl):
    """swap=True: each triplet's anchor-negative distance is min(d_an, d_pn); the blocked path
    sorts the rows by label into blocks of whole classes."""
    x, labels, _, _ = _inputs(*case, None, dtype, seed=31)
    miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.1 if kind == "easy" else 0.2}
    for loss_kw in ({"margin": 0.3}, {"margin": 0.05, "smooth_loss": True}):
        ours, g, loss_fn = _swap_case("dmlkern", loss_kw, miner_kw, x, labels, distance)
        want, w, _ = _swap_case("pml", loss_kw, miner_kw, x, labels, distance)
        assert loss_fn.last_backend in ("blocked", "zero"), loss_fn.last_fallback
        torch.testing.assert_close(ours, want, **TOL[dtype])
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_swap_changes_the_loss():
    """The case above can fail: on these inputs swap's loss and gradient differ from the plain one."""
    x, labels, _, _ = _inputs(37, 5, None, torch.float64, seed=31)
    plain = losses.TripletMarginLoss(margin=0.3)(x, labels)
    swapped, _, loss_fn = _swap_case("dmlkern", {"margin": 0.3}, None, x, labels, None)
    assert loss_fn.last_backend == "blocked" and not torch.allclose(plain, swapped, rtol=1e-3)


def test_swap_ties_split_the_gradient_as_torch_minimum(row_impl):
    """Two equal rows of a class: each of their triplets has d_an == d_pn exactly, and PML's
    torch.min gives each side half of the gradient."""
    x, labels, _, _ = _inputs(18, 3, None, torch.float64, seed=37)
    same = labels == labels[0]
    x[same.nonzero()[1]] = x[0].clone()  # an equal row in row 0's class
    for smooth in (False, True):
        ours, g, loss_fn = _swap_case("dmlkern", {"margin": 0.4, "smooth_loss": smooth}, None, x, labels, None)
        want, w, _ = _swap_case("pml", {"margin": 0.4, "smooth_loss": smooth}, None, x, labels, None)
        assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
        # (the equal rows' own distance is ~1e-8 from the unit rows' product, not PML's exact 0:
        # README's near-duplicate deviation; a tie given whole to one side is off by ~10 %)
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_swap_blocks_of_whole_classes(monkeypatch, row_impl):
    """Blocks smaller than a class (one class each) and blocks of several small classes; labels
    in no order, one singleton class."""
    x, labels, _, _ = _inputs(53, 4, None, torch.float64, seed=41)
    labels[7] = 9
    for values in (3 * 53, 30 * 53):
        monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", values)
        blocks = fused_triplet.class_blocks(torch.sort(labels).values, 53)
        assert blocks[0][0] == 0 and blocks[-1][1] == 53 and len(blocks) > 1
        for kind in (None, "semihard"):
            miner_kw = None if kind is None else {"type_of_triplets": kind}
            ours, g, loss_fn = _swap_case("dmlkern", {}, miner_kw, x, labels, None)
            want, w, _ = _swap_case("pml", {}, miner_kw, x, labels, None)
            assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
            torch.testing.assert_close(ours, want, **TOL[torch.float64])
            torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_row_blocks_are_larger_off_the_cpu(monkeypatch):
    """A GPU block's torch ops are kernel launches: fewer, larger blocks there (the CPU's stay in cache)."""
    monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", 100)
    monkeypatch.setattr(fused_common, "GPU_ROW_BLOCK_VALUES", 1000)
    assert list(fused_common.row_blocks(25, 10)) == list(fused_common.row_blocks(25, 10, torch.device("cpu")))
    assert list(fused_common.row_blocks(25, 10, "cpu")) == [(0, 10), (10, 20), (20, 25)]
    assert list(fused_common.row_blocks(250, 10, torch.device("cuda"))) == [(0, 100), (100, 200), (200, 250)]
    labels = torch.tensor([0] * 30 + [1] * 30 + [2] * 50)
    assert fused_triplet.class_blocks(labels, 10) == [(0, 30), (30, 60), (60, 110)]


def test_class_blocks_cut_only_between_classes(monkeypatch):
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 5, 5, 5, 5, 5, 7])
    monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", 3 * 10)  # 3 rows of 10 columns: a bigger class alone
    assert fused_triplet.class_blocks(labels, 10) == [(0, 3), (3, 6), (6, 11), (11, 12)]
    monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", 6 * 10)
    assert fused_triplet.class_blocks(labels, 10) == [(0, 6), (6, 12)]
    assert fused_triplet.class_blocks(labels[:0], 10) == []


def test_swap_gradcheck_fp64(row_impl):
    x, labels, _, _ = _inputs(14, 3, None, torch.float64, seed=43)
    for smooth in (False, True):
        loss_fn = losses.TripletMarginLoss(margin=0.7, smooth_loss=smooth, swap=True)
        assert torch.autograd.gradcheck(lambda x: loss_fn(x, labels), (x.clone().requires_grad_(True),))
        assert loss_fn.last_backend == "blocked", loss_fn.last_fallback


def test_swap_bit_identical_across_thread_counts(row_impl):
    x, labels, _, _ = _inputs(300, 20, None, torch.float32, seed=53)
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            value, g, loss_fn = _swap_case("dmlkern", {}, {"type_of_triplets": "semihard"}, x, labels, None)
            assert loss_fn.last_backend == "blocked"
            results[threads] = (value, g)
    finally:
        torch.set_num_threads(before)
    for value, g in results.values():
        assert torch.equal(value, results[1][0]) and torch.equal(g, results[1][1])


def test_swap_nan_embeddings_follow_pml(row_impl):
    x, labels, _, _ = _inputs(20, 4, None, torch.float64, seed=59)
    x[3, 2] = float("nan")
    for kind in (None, "semihard"):
        miner_kw = None if kind is None else {"type_of_triplets": kind}
        ours, _, _ = _swap_case("dmlkern", {}, miner_kw, x, labels, None)
        want, _, _ = _swap_case("pml", {}, miner_kw, x, labels, None)
        torch.testing.assert_close(ours, want, equal_nan=True, **TOL[torch.float64])


def test_swap_under_compile_runs_the_reference(monkeypatch):
    """Under torch.compile (static shapes) swap's blocks of whole classes would be data-dependent:
    the reference runs, with PML's value (its tracing flag forced, as under compile)."""
    from dmlkern import _tracing

    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    x, labels, _, _ = _inputs(20, 4, None, torch.float64, seed=61)
    loss_fn = losses.TripletMarginLoss(swap=True)
    value = loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "torch.compile" in loss_fn.last_fallback, loss_fn.last_fallback
    torch.testing.assert_close(value, pml_losses.TripletMarginLoss(swap=True)(x, labels), **TOL[torch.float64])


@pytest.mark.parametrize("swap", [0, 1])
def test_triplet_rows_opcheck(swap):
    """The op's schema, fake (registered in fused/triplet.py) and autograd registration agree."""
    if not fused_triplet._CPU_KERNEL:
        pytest.fail("dmlkern::triplet_rows is not registered in this build")
    s = torch.rand(6, 6, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # sorted: every positive's row in the block
    for with_grad in (False, True):
        torch.library.opcheck(torch.ops.dmlkern.triplet_rows.default,
                              (s, labels, labels, 0, True, [0.2, 0.1], [1, 1, 3, swap], with_grad))


def test_swap_kernel_rejects_a_positive_outside_its_block():
    """The C++ op reads each positive's row from its block: labels not sorted into whole classes
    are an error that says so, not a read past the block."""
    if not fused_triplet._CPU_KERNEL:
        pytest.fail("dmlkern::triplet_rows is not registered in this build")
    s = torch.rand(4, 8, dtype=torch.float64)
    col_labels = torch.tensor([0, 0, 1, 1, 0, 2, 2, 3])
    with pytest.raises(RuntimeError, match="every positive's row must be in the block"):
        torch.ops.dmlkern.triplet_rows(s, col_labels[:4], col_labels, 0, True, [0.1, 0.0], [0, 1, 0, 1], False)
    with pytest.raises(RuntimeError, match="exclude_diag"):
        torch.ops.dmlkern.triplet_rows(s, col_labels[:4], col_labels, 0, False, [0.1, 0.0], [0, 1, 0, 1], False)


def test_lazy_triplets_are_pmls_tuple_when_read():
    x, labels, _, _ = _inputs(30, 4, None, torch.float32, seed=17)
    ours = miners.TripletMarginMiner(type_of_triplets="semihard")
    theirs = pml_miners.TripletMarginMiner(type_of_triplets="semihard")
    lazy = ours(x, labels)
    assert isinstance(lazy, LazyMinedTriplets) and isinstance(lazy, tuple) and not lazy.is_materialized
    assert "not computed" in repr(lazy)
    want = theirs(x, labels)
    assert ours.num_triplets == theirs.num_triplets == len(want[0])  # counted without listing
    assert not lazy.is_materialized
    a, p, n = lazy
    assert all(torch.equal(u, w) for u, w in zip((a, p, n), want))
    assert all(torch.equal(u, w) for u, w in zip(pickle.loads(pickle.dumps(lazy)), want))
    assert type(pickle.loads(pickle.dumps(lazy))) is tuple


def test_lazy_triplets_on_changed_inputs_run_listed(monkeypatch):
    """The miner's result describes the inputs at mining time: a loss on other values (an
    in-place update after mining) uses the listed triplets, as PML would."""
    monkeypatch.setattr(listed_pairs, "DENSE_FRACTION", float("inf"))  # (30 rows: a "dense" tuple)
    x, labels, _, _ = _inputs(30, 4, None, torch.float64, seed=19)
    mined = miners.TripletMarginMiner(type_of_triplets="semihard")(x, labels)
    want_triplets = pml_miners.TripletMarginMiner(type_of_triplets="semihard")(x, labels)
    x2 = x + 0.01 * torch.randn_like(x)
    loss_fn = losses.TripletMarginLoss()
    value = loss_fn(x2, labels, mined)
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    want = pml_losses.TripletMarginLoss()(x2, labels, want_triplets)
    torch.testing.assert_close(value, want, **TOL[torch.float64])


THRESHOLDS = [{"low": 0}, {"low": 0.0}, {"low": 0.1}, {"low": 0, "high": 0.5}, {"high": 0.5}, {"high": 0.3},
              {"low": -1.0, "high": 0.05}, {"high": 0.0}, {"low": 5.0}]


@pytest.mark.parametrize("sorted_min", [1, 128], ids=["sorted", "direct"])
@pytest.mark.parametrize("kind", [None, "semihard"])
@pytest.mark.parametrize("threshold", THRESHOLDS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_threshold_reducer(monkeypatch, threshold, kind, sorted_min, row_impl):
    """PML's AvgNonZeroReducer is its ThresholdReducer(low=0) (PML's TripletMarginLoss example:
    CosineSimilarity, a semihard TripletMarginMiner, ThresholdReducer(low=0)): that reducer runs
    on the kernels, with AvgNonZeroReducer's bits. Any other thresholds (PML's README example:
    ThresholdReducer(high=0.3)) filter the terms in the torch twin (none passing: the reducer's
    zero), on its direct rows and on its sorted rows (forced on every row); PML's value and
    gradient for all."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", sorted_min)
    x, labels, _, _ = _inputs(53, 6, None, torch.float64, seed=7)
    avg = threshold.get("low") == 0 and "high" not in threshold
    results = {}
    for lib, R in (("dmlkern", our_reducers), ("pml", pml_reducers)):
        for name, reducer in (("threshold", R.ThresholdReducer(**threshold)), ("avg", R.AvgNonZeroReducer())):
            L, M, D = (losses, miners, distances) if lib == "dmlkern" else (pml_losses, pml_miners, pml_distances)
            xx = x.clone().requires_grad_(True)
            loss_fn = L.TripletMarginLoss(margin=0.2, distance=D.CosineSimilarity(), reducer=reducer)
            mined = None if kind is None else M.TripletMarginMiner(
                margin=0.2, distance=D.CosineSimilarity(), type_of_triplets=kind)(xx, labels)
            value = loss_fn(xx, labels, mined)
            results[lib, name] = (value.detach(), torch.autograd.grad(value, xx, allow_unused=True)[0], loss_fn)
    ours, ours_grad, loss_fn = results["dmlkern", "threshold"]
    assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
    if avg:
        avg_value, avg_grad, _ = results["dmlkern", "avg"]
        assert torch.equal(ours, avg_value) and torch.equal(ours_grad, avg_grad)
    want, want_grad, _ = results["pml", "threshold"]
    torch.testing.assert_close(ours, want, **TOL[torch.float64])
    if want_grad is None:  # (nothing passed: PML's zero_loss has no graph to the embeddings)
        assert ours_grad is None or not ours_grad.any()
    else:
        torch.testing.assert_close(ours_grad, want_grad, **TOL[torch.float64])


@pytest.mark.parametrize("sorted_min", [1, 128], ids=["sorted", "direct"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", [(37, 5, None), (61, 7, 45), (9, 9, None)], ids=lambda c: f"n{c[0]}c{c[1]}r{c[2]}")
def test_threshold_reducer_filters_every_form(monkeypatch, case, dtype, sorted_min, row_impl):
    """A ThresholdReducer's filter with smooth_loss, swap, a ref_emb, miner windows and the
    Euclidean distance, on direct and sorted rows (relu terms, no swap), against PML; a NaN
    embedding takes the reference (PML's NaN gradient)."""
    monkeypatch.setattr(fused_triplet, "SORTED_MIN_POSITIVES", sorted_min)
    x, labels, ref, ref_labels = _inputs(*case, dtype, seed=3)
    for loss_kw in ({"margin": 0.3}, {"margin": 0.1, "smooth_loss": True}, {"margin": 0.2, "swap": True}):
        if loss_kw.get("swap") and ref is not None:
            continue
        for kind in (None, "all", "hard", "easy"):
            miner_kw = None if kind is None else {"type_of_triplets": kind, "margin": 0.25}
            for threshold in ({"high": 0.4}, {"low": 0.05, "high": 0.6}):
                loss_kw_r = dict(loss_kw)
                ours_r, want_r = our_reducers.ThresholdReducer(**threshold), pml_reducers.ThresholdReducer(**threshold)
                ours, our_grads, loss_fn = _grads("dmlkern", dict(loss_kw_r, reducer=ours_r), miner_kw, x, labels,
                                                  ref, ref_labels)
                want, want_grads, _ = _grads("pml", dict(loss_kw_r, reducer=want_r), miner_kw, x, labels, ref,
                                             ref_labels)
                assert loss_fn.last_backend in ("blocked", "zero"), loss_fn.last_fallback
                torch.testing.assert_close(ours, want, **TOL[dtype])
                for g, w in zip(our_grads, want_grads):
                    torch.testing.assert_close(g, w, **TOL[dtype])
    x[3, 1] = float("nan")
    loss_fn = losses.TripletMarginLoss(reducer=our_reducers.ThresholdReducer(high=0.4))
    torch.testing.assert_close(loss_fn(x, labels), pml_losses.TripletMarginLoss(
        reducer=pml_reducers.ThresholdReducer(high=0.4))(x, labels), equal_nan=True)
    assert loss_fn.last_backend == "reference" and "NaN" in loss_fn.last_fallback


@pytest.mark.parametrize("loss_name", ["TripletMarginLoss", "LiftedStructureLoss"])
@pytest.mark.parametrize("reducer", [None, "MeanReducer", "multiple"])
def test_embedding_regularizer_keeps_the_fused_path(loss_name, reducer, row_impl):
    """An embedding regularizer adds a sub-loss, so PML (and dmlkern) hold a MultipleReducers with
    one copy of the reducer per sub-loss (PML's README example: TripletMarginLoss with an
    LpRegularizer): the loss's own reducer decides the fused reduction, as without a regularizer."""
    from pytorch_metric_learning import regularizers as pml_regularizers
    from dmlkern import regularizers

    x, labels, _, _ = _inputs(45, 6, None, torch.float64, seed=17)
    results = {}
    for lib, L, R, G in (("dmlkern", losses, our_reducers, regularizers),
                         ("pml", pml_losses, pml_reducers, pml_regularizers)):
        kw = {"embedding_regularizer": G.LpRegularizer(), "embedding_reg_weight": 0.3}
        if reducer == "multiple":
            kw["reducer"] = R.MultipleReducers({"loss": R.SumReducer()}, default_reducer=R.MeanReducer())
        elif reducer is not None:
            kw["reducer"] = getattr(R, reducer)()
        loss_fn = getattr(L, loss_name)(**kw)
        xx = x.clone().requires_grad_(True)
        value = loss_fn(xx, labels)
        results[lib] = (value.detach(), torch.autograd.grad(value, xx)[0], loss_fn)
    ours, ours_grad, loss_fn = results["dmlkern"]
    if loss_name == "TripletMarginLoss" or reducer != "multiple":  # (Lifted's SumReducer: its pair list)
        assert loss_fn.last_backend == ("blocked" if loss_name == "TripletMarginLoss" else "cpp"), \
            loss_fn.last_fallback
    want, want_grad, _ = results["pml"]
    torch.testing.assert_close(ours, want, **TOL[torch.float64])
    torch.testing.assert_close(ours_grad, want_grad, **TOL[torch.float64])


def test_unfusable_configurations_use_the_reference():
    x, labels, ref, ref_labels = _inputs(20, 4, 9, torch.float64, seed=23)
    for kw, args, why in (({"swap": True}, (None, ref, ref_labels), "swap=True with ref_emb"),
                          ({"triplets_per_anchor": 3}, (), "triplets_per_anchor=k drawing over 1/16")):
        loss_fn = losses.TripletMarginLoss(**kw)
        torch.manual_seed(0)  # (the random triplets: PML's draws)
        value = loss_fn(x, labels, *args)
        assert loss_fn.last_backend == "reference" and why in loss_fn.last_fallback, loss_fn.last_fallback
        torch.manual_seed(0)
        torch.testing.assert_close(value, pml_losses.TripletMarginLoss(**kw)(x, labels, *args), **TOL[torch.float64])
    loss_fn = losses.TripletMarginLoss(distance=distances.LpDistance(power=2))
    loss_fn(x, labels)
    assert loss_fn.last_backend == "reference"


@pytest.mark.slow
@pytest.mark.parametrize("kind,swap", [(None, False), ("semihard", False), (None, True)])
def test_memory_is_linear_in_n(kind, swap):
    """fwd+bwd at N=16384, D=128 grows peak RSS by < 256 MiB (PML lists ~2e8 triplets here),
    measured in a fresh process (VmHWM against VmRSS before the call)."""
    growth_mib = peak_rss_growth_mib(
        setup=f"""
            torch.manual_seed(0)
            n, d = 16384, 128
            x = torch.randn(n, d, requires_grad=True)
            labels = torch.randint(0, n // 4, (n,))
            loss_fn = losses.TripletMarginLoss(swap={swap!r})
            kind = {kind!r}
        """,
        measured="""
            mined = None if kind is None else miners.TripletMarginMiner(type_of_triplets=kind)(x, labels)
            loss = loss_fn(x, labels, mined)
            loss.backward()
            assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"


def test_row_blocks_keep_128_rows_against_wide_columns(monkeypatch):
    """Past 16384 columns a row block keeps 128 rows (skinny blocks re-read y in every product), up
    to 16 block_values; below, about block_values values; the blocks tile [0, n) in order."""
    values = fused_common.ROW_BLOCK_VALUES
    assert fused_common.block_rows(1000) == values // 1000
    assert fused_common.block_rows(16384) == values // 16384
    assert fused_common.block_rows(65536) == 128 > values // 65536
    assert fused_common.block_rows(1 << 22) == 16 * values // (1 << 22)
    assert fused_common.block_rows(1 << 40) == 1
    assert fused_common.block_rows(65536, "cuda") == fused_common.GPU_ROW_BLOCK_VALUES // 65536
    assert list(fused_common.row_blocks(300, 65536)) == [(0, 128), (128, 256), (256, 300)]
    monkeypatch.setattr(fused_common, "ROW_BLOCK_VALUES", 16 * 150)  # (what tests shrink: no floor there)
    assert fused_common.block_rows(150) == 16
