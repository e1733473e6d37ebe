"""TripletMarginLoss and MarginLoss with triplets_per_anchor=k (PML's random triplets): the same
triplets drawn as PML draws them (`listed_triplets.random_triplets`), then the listed path
(dmlkern/fused/listed_triplets.py), against PML 2.9.0 itself under the same torch seed."""
import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu

from dmlkern import distances, losses
from dmlkern.fused.listed_triplets import DENSE_RANDOM, random_triplets
from _peak_rss import peak_rss_growth_mib

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=2e-6)}
# (N, classes, ref rows or None, triplets per anchor): odd sizes; one sample, one class (no
# negatives), every row its own class (no positives), k None (the class size) and 0
DRAW_CASES = [(1, 1, None, 3), (12, 1, None, 3), (9, 9, None, 2), (37, 5, None, 3), (41, 6, None, None),
              (30, 4, None, 0), (61, 7, 45, 4), (20, 3, 33, None), (25, 8, 3, 5)]


def _labels(n, classes, ref_rows, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return labels, labels  # the same object: an anchor is not its own positive
    return labels, torch.randint(0, classes + 1, (ref_rows,), generator=g)


@pytest.mark.parametrize("case", DRAW_CASES, ids=lambda c: "n{}c{}r{}k{}".format(*c))
def test_random_triplets_are_pmls(case):
    """The same triplets, in the same order, and the RNG left where PML leaves it."""
    n, classes, ref_rows, k = case
    for seed in range(4):
        labels, ref_labels = _labels(n, classes, ref_rows, seed)
        torch.manual_seed(seed)
        want = pml_lmu.get_random_triplet_indices(labels, ref_labels, t_per_anchor=k)
        want_next = torch.rand(3)
        torch.manual_seed(seed)
        got = random_triplets(labels, ref_labels, k)
        assert torch.equal(torch.rand(3), want_next)
        for g, w in zip(got, want):
            assert g.dtype == torch.long and torch.equal(g, w)


def test_random_triplets_over_the_limit_draw_nothing():
    labels = torch.arange(40) % 4
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert random_triplets(labels, labels, 5, max_triplets=199) is None  # 40 anchors x 5
    assert torch.equal(torch.get_rng_state(), state)
    assert len(random_triplets(labels, labels, 5, max_triplets=200)[0]) == 200


def _value_and_grads(lib, name, kw, x, labels, ref, ref_labels, seed, distance=None):
    L, D = (losses, distances) if lib == "dmlkern" else (pml_losses, pml_distances)
    extra = {} if distance is None else {"distance": getattr(D, distance[0])(**distance[1])}
    loss_fn = getattr(L, name)(**kw, **extra)
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    torch.manual_seed(seed)
    value = loss_fn(x, labels, None, ref, ref_labels)
    wrt = [x] + ([] if ref is None else [ref]) + ([loss_fn.beta] if kw.get("learn_beta") else [])
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], loss_fn


LOSS_CASES = [("TripletMarginLoss", {"triplets_per_anchor": 3}),
              ("TripletMarginLoss", {"triplets_per_anchor": 2, "margin": 0.3, "smooth_loss": True}),
              ("TripletMarginLoss", {"triplets_per_anchor": 4, "margin": 0.2, "swap": True}),
              ("MarginLoss", {"triplets_per_anchor": 3}),
              ("MarginLoss", {"triplets_per_anchor": 2, "learn_beta": True, "num_classes": 7, "nu": 0.1})]
DISTANCES = [None, ("CosineSimilarity", {}), ("LpDistance", {"power": 2}),
             ("DotProductSimilarity", {"normalize_embeddings": False})]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distance", DISTANCES, ids=lambda d: "default" if d is None else d[0] + str(d[1]))
@pytest.mark.parametrize("name,kw", LOSS_CASES, ids=lambda c: str(c))
def test_loss_matches_pml(name, kw, distance, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(203, 16, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 7, (203,), generator=g)
    ref = torch.randn(151, 16, generator=g, dtype=torch.float64).to(dtype)
    ref_labels = torch.randint(0, 7, (151,), generator=g)
    calls = [(None, None)] + ([] if kw.get("swap") else [(ref, ref_labels)])  # PML's swap reads ref rows as queries
    for seed, (r, rl) in enumerate(calls):
        ours, our_grads, loss_fn = _value_and_grads("dmlkern", name, kw, x, labels, r, rl, seed, distance)
        want, want_grads, _ = _value_and_grads("pml", name, kw, x, labels, r, rl, seed, distance)
        assert loss_fn.last_backend == "listed", loss_fn.last_fallback
        torch.testing.assert_close(ours, want, **TOL[dtype])
        for got, w in zip(our_grads, want_grads):
            torch.testing.assert_close(got, w, **TOL[dtype])


@pytest.mark.parametrize("name", ["TripletMarginLoss", "MarginLoss"])
def test_dense_draws_run_the_reference_drawing_once(name):
    """Over 1/16 of all pairs the reference's matrix is cheaper: the fused path declines before any
    draw, the reference draws PML's triplets, and the RNG ends where PML's does."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    kw = {"triplets_per_anchor": 5}
    ours, _, loss_fn = _value_and_grads("dmlkern", name, kw, x, labels, None, None, 9)
    ours_next = torch.rand(2)
    want, _, _ = _value_and_grads("pml", name, kw, x, labels, None, None, 9)
    assert loss_fn.last_backend == "reference" and loss_fn.last_fallback == DENSE_RANDOM
    torch.testing.assert_close(ours, want, **TOL[torch.float64])
    assert torch.equal(ours_next, torch.rand(2))


@pytest.mark.parametrize("name", ["TripletMarginLoss", "MarginLoss"])
@pytest.mark.parametrize("labels", [[0], [3, 3, 3, 3, 3], [0, 1, 2, 3, 4]], ids=["one", "one_class", "singletons"])
def test_degenerate_batches_give_pmls_zero(name, labels):
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 6, dtype=torch.float64)
    ours, our_grads, loss_fn = _value_and_grads("dmlkern", name, {"triplets_per_anchor": 2}, x, labels, None, None, 0)
    want, want_grads, _ = _value_and_grads("pml", name, {"triplets_per_anchor": 2}, x, labels, None, None, 0)
    assert loss_fn.last_backend == "zero", loss_fn.last_fallback
    assert torch.equal(ours, want) and torch.equal(our_grads[0], want_grads[0])


def test_reference_backend_draws_as_pml():
    x = torch.randn(100, 8, dtype=torch.float64)
    labels = torch.arange(100) % 9
    loss_fn = losses.TripletMarginLoss(triplets_per_anchor=2)
    loss_fn.backend = "reference"
    torch.manual_seed(4)
    ours = loss_fn(x, labels)
    torch.manual_seed(4)
    assert loss_fn.last_backend == "reference"
    torch.testing.assert_close(ours, pml_losses.TripletMarginLoss(triplets_per_anchor=2)(x, labels))


def test_nan_embeddings_follow_pml():
    """PML's value (AvgNonZero drops the NaN terms); the gradient is NaN in the rows of the
    triplets the NaN row is in, finite elsewhere, where PML's dense matmul backward makes every
    row NaN (README, deviations)."""
    x = torch.randn(120, 8, dtype=torch.float64)
    x[7, 2] = float("nan")
    labels = torch.arange(120) % 10
    kw = {"triplets_per_anchor": 2}
    ours, our_grads, loss_fn = _value_and_grads("dmlkern", "TripletMarginLoss", kw, x, labels, None, None, 1)
    want, _, _ = _value_and_grads("pml", "TripletMarginLoss", kw, x, labels, None, None, 1)
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    torch.testing.assert_close(ours, want, equal_nan=True)
    torch.manual_seed(1)
    triplets = torch.stack(pml_lmu.get_random_triplet_indices(labels, labels, t_per_anchor=2), dim=1)
    reached = torch.unique(triplets[(triplets == 7).any(dim=1)])
    nan_rows = torch.nonzero(our_grads[0].isnan().any(dim=1)).flatten()
    assert 7 in nan_rows and set(nan_rows.tolist()) <= set(reached.tolist()) and len(nan_rows) < len(x)


def test_same_bits_at_one_and_two_threads():
    """Value and gradient bit for bit at 1 and 2 CPU threads (sizes past torch's grain size)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3000, 64, generator=g)
    labels = torch.randint(0, 300, (3000,), generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            value, grads, loss_fn = _value_and_grads("dmlkern", "TripletMarginLoss", {"triplets_per_anchor": 4},
                                                     x, labels, None, None, 0)
            assert loss_fn.last_backend == "listed", loss_fn.last_fallback
            results.append((value, grads[0]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.slow
def test_memory_at_n16384():
    """fwd+bwd at N=16384, D=128, 16 triplets per anchor grows peak RSS by < 256 MiB (PML's N x N
    distance matrix alone is 1 GiB), measured in a fresh process."""
    growth_mib = peak_rss_growth_mib(
        setup="""
            torch.manual_seed(0)
            n, d = 16384, 128
            x = torch.randn(n, d, requires_grad=True)
            labels = torch.randint(0, n // 8, (n,))
            loss_fn = losses.TripletMarginLoss(triplets_per_anchor=16)
        """,
        measured="""
            loss = loss_fn(x, labels)
            loss.backward()
            assert loss_fn.last_backend == "listed", loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"
