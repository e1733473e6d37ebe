"""MultiSimilarity, GeneralizedLiftedStructure, SupCon and Contrastive losses on an explicit indices_tuple
(dmlkern/fused/listed_pairs.py): only the listed pairs, against PML 2.9.0 itself."""
import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners

from dmlkern import losses
from dmlkern._validation import InvalidInputError

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
KWARGS = {"MultiSimilarityLoss": ({}, {"alpha": 3, "beta": 20, "base": 0.3}),
          "GeneralizedLiftedStructureLoss": ({}, {"pos_margin": 0.2, "neg_margin": 0.8}),
          "ContrastiveLoss": ({}, {"pos_margin": 0.1, "neg_margin": 0.9}),
          "SupConLoss": ({}, {"temperature": 0.3})}
HAND_PAIRS = (torch.tensor([0, 0, 1, 0]), torch.tensor([5, 5, 7, 9]), torch.tensor([2, 3, 3]), torch.tensor([1, 1, 4]))


def _tuples(x, labels):
    """Tuples as PML's miners give them (pairs and triplets), and hand-built ones with duplicates."""
    return {
        "ms_miner": pml_miners.MultiSimilarityMiner(0.1)(x, labels),
        "pair_margin": pml_miners.PairMarginMiner()(x, labels),
        "semihard_triplets": pml_miners.TripletMarginMiner(type_of_triplets="semihard")(x, labels),
        "batch_hard": pml_miners.BatchHardMiner()(x, labels),
        "hand_pairs_with_duplicates": HAND_PAIRS,
        "one_pair_each": (torch.tensor([0]), torch.tensor([5]), torch.tensor([2]), torch.tensor([1])),
        "empty": tuple(torch.empty(0, dtype=torch.long) for _ in range(4)),
    }


def _run(lib, x, labels, tuple_, kw, ref=None, name="MultiSimilarityLoss"):
    x = x.clone().requires_grad_(True)
    loss_fn = getattr(losses if lib == "dmlkern" else pml_losses, name)(**kw)
    value = loss_fn(x, labels, tuple_) if ref is None else loss_fn(x, labels, tuple_, ref, labels)
    (grad,) = torch.autograd.grad(value, x, allow_unused=True) if value.requires_grad else (None,)
    return value.detach(), torch.zeros_like(x) if grad is None else grad, loss_fn


@pytest.mark.parametrize("loss_name", list(KWARGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,classes", [(53, 6), (9, 9), (12, 1)])
def test_matches_pml(n, classes, dtype, loss_name):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    for name, tuple_ in _tuples(x, labels).items():
        if name.startswith("hand") or name == "one_pair_each":
            if n < 10:
                continue
        for kw in KWARGS[loss_name]:
            ours, our_grad, loss_fn = _run("dmlkern", x, labels, tuple_, kw, name=loss_name)
            want, want_grad, _ = _run("pml", x, labels, tuple_, kw, name=loss_name)
            if loss_fn.last_backend == "reference":  # PML's MS miner keeps ~all negatives of random data
                assert "dense indices_tuple" in loss_fn.last_fallback, name
            else:
                assert loss_fn.last_backend in ("listed", "zero"), (name, loss_fn.last_fallback)
            torch.testing.assert_close(ours, want, **TOL[dtype], msg=name)
            torch.testing.assert_close(our_grad, want_grad, **TOL[dtype], msg=name)


@pytest.mark.parametrize("loss_name", list(KWARGS))
def test_dense_tuples_run_the_reference(loss_name):
    """Past 1/16 of all pairs listing costs more than the reference's matrix (time and memory)."""
    x = torch.randn(40, 8, dtype=torch.float64)
    labels = torch.arange(40) % 4
    a1, p, a2, n = pml_miners.PairMarginMiner(pos_margin=0.0, neg_margin=10.0)(x, labels)  # every pair
    loss_fn = getattr(losses, loss_name)()
    loss_fn(x, labels, (a1, p, a2, n))
    assert loss_fn.last_backend == "reference" and "dense" in loss_fn.last_fallback
    loss_fn(x, labels, (a1[:40], p[:40], a2[:40], n[:40]))
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback


def test_pml_len_rule_and_a_pair_both_positive_and_negative():
    x = torch.randn(12, 6, dtype=torch.float64)
    labels = torch.arange(12) % 3
    loss_fn = losses.MultiSimilarityLoss()
    loss_fn(x, labels, _tuples(x, labels)["one_pair_each"])
    assert loss_fn.last_backend == "zero"
    with pytest.raises(InvalidInputError, match="either positive or negative"):
        loss_fn(x, labels, (torch.tensor([0, 1]), torch.tensor([5, 2]), torch.tensor([0, 3]), torch.tensor([5, 4])))


@pytest.mark.parametrize("loss_name", list(KWARGS))
def test_bit_identical_across_thread_counts(loss_name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 16, generator=g)
    labels = torch.randint(0, 40, (600,), generator=g)
    pairs = pml_miners.MultiSimilarityMiner(0.3)(x, labels)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results.append(_run("dmlkern", x, labels, pairs, {}, name=loss_name)[:2])
    finally:
        torch.set_num_threads(before)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("loss_name", list(KWARGS))
def test_nan_embeddings_follow_pml(loss_name):
    x = torch.randn(20, 6, dtype=torch.float64)
    labels = torch.arange(20) % 4
    pairs = pml_miners.PairMarginMiner(pos_margin=0.0, neg_margin=10.0)(x, labels)
    x[3, 1] = float("nan")
    ours, _, _ = _run("dmlkern", x, labels, pairs, {}, name=loss_name)
    want, _, _ = _run("pml", x, labels, pairs, {}, name=loss_name)
    torch.testing.assert_close(ours, want, equal_nan=True)
