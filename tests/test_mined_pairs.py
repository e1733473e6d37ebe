"""MultiSimilarityMiner's result is PML's 4-tuple in every use (dmlkern/fused/lazy_pairs.py),
while a fused MultiSimilarityLoss given it still mines inside its kernel: each case against PML
2.9.0 itself, and the path the loss took."""
import copy
import io
import pickle

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from dmlkern import losses, miners
from dmlkern.fused.lazy_pairs import LazyMinedPairs
from dmlkern.ops import pair_engine as pe


@pytest.fixture(autouse=True)
def _cpp_engine(monkeypatch):
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")
    monkeypatch.setenv("DMLKERN_BACKEND", "cpp")


def _batch(seed=0, n=48, d=12, classes=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels


def _assert_same_pairs(got, want):
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(torch.as_tensor(a).cpu(), b.cpu())


def _loss_and_grad(loss_fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    value = loss_fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def _pml_ms(x, labels, eps=0.1, mine_on=None, mine_labels=None):
    """PML's MultiSimilarityLoss on x with its miner's pairs from (mine_on, mine_labels)."""
    mine_on = x if mine_on is None else mine_on
    pairs = pml_miners.MultiSimilarityMiner(epsilon=eps)(mine_on, labels if mine_labels is None else mine_labels)
    return _loss_and_grad(pml_losses.MultiSimilarityLoss(), x, labels, pairs)


def test_result_is_a_tuple_of_pml_pairs_computed_on_demand():
    x, labels = _batch()
    pairs = miners.MultiSimilarityMiner()(x, labels)
    want = pml_miners.MultiSimilarityMiner()(x, labels)
    assert isinstance(pairs, tuple) and len(pairs) == 4 and not pairs.is_materialized
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.long for t in pairs)
    _assert_same_pairs(pairs, want)
    assert pairs.is_materialized
    assert torch.equal(torch.cat(pairs), torch.cat(want))
    joined = pairs + (torch.tensor([7]),)
    assert type(joined) is tuple and len(joined) == 5 and torch.equal(joined[0], want[0])
    a1, p, a2, n = miners.MultiSimilarityMiner()(x, labels)  # unpacking, then use
    assert torch.equal(x[a1, 0], x[want[0], 0]) and len(n) == len(want[3])
    assert torch.equal(miners.MultiSimilarityMiner()(x, labels)[2].unique(), want[2].unique())


def test_result_pickles_and_saves_as_pml_tuple():
    x, labels = _batch(1)
    want = pml_miners.MultiSimilarityMiner()(x, labels)
    for dump in (lambda p: pickle.loads(pickle.dumps(p)), copy.deepcopy, copy.copy):
        got = dump(miners.MultiSimilarityMiner()(x, labels))
        assert type(got) is tuple and all(type(t) is torch.Tensor for t in got)
        _assert_same_pairs(got, want)
    buffer = io.BytesIO()
    torch.save(miners.MultiSimilarityMiner()(x, labels), buffer)
    buffer.seek(0)
    got = torch.load(buffer)  # weights_only: plain tensors in a plain tuple
    _assert_same_pairs(got, want)
    buffer = io.BytesIO()
    torch.save(miners.MultiSimilarityMiner()(x, labels)[1], buffer)  # one tensor alone
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), want[1])


def test_called_miner_copies_and_pickles_with_pmls_counts():
    x, labels = _batch(2)
    theirs = pml_miners.MultiSimilarityMiner()
    theirs(x, labels)
    for copy_of in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        miner = miners.MultiSimilarityMiner()
        miner(x, labels)
        other = copy_of(miner)
        assert (other.num_pos_pairs, other.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs) != (0, 0)
        _assert_same_pairs(other(x, labels), theirs(x, labels))


def test_loss_without_labels_takes_the_miners_pairs_fused():
    x, labels = _batch(3)
    want = _pml_ms(x, labels)
    for call in (lambda lf, e, p: lf(e, indices_tuple=p), lambda lf, e, p: lf(e, None, p)):
        loss_fn = losses.MultiSimilarityLoss()
        e = x.clone().requires_grad_(True)
        value = call(loss_fn, e, miners.MultiSimilarityMiner()(e, labels))
        (grad,) = torch.autograd.grad(value, e)
        assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
        torch.testing.assert_close((value, grad), want)


@pytest.mark.parametrize("read", ["num_pos_pairs", "index", "cat"])
def test_reading_the_pairs_before_the_loss_keeps_the_fused_path(read):
    x, labels = _batch(4)
    miner, loss_fn = miners.MultiSimilarityMiner(), losses.MultiSimilarityLoss()
    e = x.clone().requires_grad_(True)
    pairs = miner(e, labels)
    seen = {"num_pos_pairs": lambda: miner.num_pos_pairs, "index": lambda: pairs[0].sum(),
            "cat": lambda: torch.cat(pairs)}[read]()
    assert pairs.is_materialized and seen is not None
    value = loss_fn(e, labels, pairs)
    (grad,) = torch.autograd.grad(value, e)
    assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    torch.testing.assert_close((value.detach(), grad), _pml_ms(x, labels))


def test_mining_on_detached_embeddings_keeps_the_fused_path():
    x, labels = _batch(5)
    loss_fn = losses.MultiSimilarityLoss()
    e = x.clone().requires_grad_(True)
    value = loss_fn(e, labels, miners.MultiSimilarityMiner()(e.detach(), labels))
    (grad,) = torch.autograd.grad(value, e)
    assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    torch.testing.assert_close((value.detach(), grad), _pml_ms(x, labels))


@pytest.mark.parametrize("change", ["epsilon", "labels_in_place", "embeddings_in_place", "embeddings_data"])
def test_changes_between_miner_and_loss_give_pmls_numbers(change):
    """PML mines with what the inputs were at mining time; dmlkern's result snapshots them."""
    x, labels = _batch(6)
    e, mined_x, mined_labels = x.clone(), x.clone(), labels.clone()
    miner, loss_fn = miners.MultiSimilarityMiner(epsilon=0.1), losses.MultiSimilarityLoss()
    pairs = miner(e, labels)
    if change == "epsilon":
        miner.epsilon = 0.6
    elif change == "labels_in_place":
        labels[:10] = (labels[:10] + 1) % 6
    elif change == "embeddings_in_place":
        e.mul_(1.3).add_(0.05)
    else:  # through .data: the version counter does not see it, the values comparison does
        e.data.add_(0.05)
    got = _loss_and_grad(loss_fn, e, labels, pairs)
    want = _pml_ms(e, labels, mine_on=mined_x, mine_labels=mined_labels)
    torch.testing.assert_close(got, want)
    if change in ("epsilon", "labels_in_place"):  # same embeddings: the kernel mines as the miner did
        assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    else:
        assert loss_fn.last_backend == "reference" and "changed since mining" in loss_fn.last_fallback


@pytest.mark.parametrize("name", ["ProxyAnchorLoss", "ArcFaceLoss", "SoftTripleLoss", "FastAPLoss", "CosFaceLoss",
                                  "ContrastiveLoss"])
def test_pml_losses_take_dmlkerns_miner_result(name):
    """PML's losses (convert_to_weights, pair indexing) get the same numbers from dmlkern's miner."""
    x, labels = _batch(7, n=40, d=8, classes=5, dtype=torch.float32)
    args = {"ProxyAnchorLoss": (5, 8), "ArcFaceLoss": (5, 8), "SoftTripleLoss": (5, 8), "CosFaceLoss": (5, 8)}
    values = []
    for mine in (miners.MultiSimilarityMiner(), pml_miners.MultiSimilarityMiner()):
        torch.manual_seed(0)
        loss_fn = getattr(pml_losses, name)(*args.get(name, ()))
        values.append(_loss_and_grad(loss_fn, x, labels, mine(x, labels)))
    torch.testing.assert_close(values[0], values[1])
    weights = lmu.convert_to_weights(miners.MultiSimilarityMiner()(x, labels), labels, torch.float32)
    want = lmu.convert_to_weights(pml_miners.MultiSimilarityMiner()(x, labels), labels, torch.float32)
    assert torch.equal(weights, want)


def test_other_losses_take_the_materialised_pairs():
    x, labels = _batch(8)
    loss_fn = losses.ContrastiveLoss()
    got = _loss_and_grad(loss_fn, x, labels, miners.MultiSimilarityMiner()(x, labels))
    assert loss_fn.last_backend == "reference"
    want = _loss_and_grad(pml_losses.ContrastiveLoss(), x, labels, pml_miners.MultiSimilarityMiner()(x, labels))
    torch.testing.assert_close(got, want)


def test_pairs_of_another_batch_size_are_validated_as_any_indices_tuple():
    x, labels = _batch(9)
    pairs = miners.MultiSimilarityMiner()(x, labels)
    with pytest.raises(ValueError, match="indices_tuple"):
        losses.MultiSimilarityLoss()(x[:10], labels[:10], pairs)


def test_ref_emb_mining_matches_pml():
    x, labels = _batch(10)
    ref, ref_labels = _batch(11, n=30)
    theirs = pml_miners.MultiSimilarityMiner()(x, labels, ref, ref_labels)
    ours = miners.MultiSimilarityMiner()(x, labels, ref, ref_labels)
    loss_fn = losses.MultiSimilarityLoss()
    got = loss_fn(x, labels, ours, ref, ref_labels)
    assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    want = pml_losses.MultiSimilarityLoss()(x, labels, theirs, ref, ref_labels)
    torch.testing.assert_close(got, want)
    _assert_same_pairs(ours, theirs)


def test_result_type_and_repr():
    x, labels = _batch(12)
    pairs = miners.MultiSimilarityMiner()(x, labels)
    assert isinstance(pairs, LazyMinedPairs) and "not computed" in repr(pairs)
    pairs.materialize()
    assert "tensor" in repr(pairs)


def test_records_like_pmls_miner():
    """PML's miner lists epsilon as recordable and its distance records norms on every call."""
    from dmlkern.distances import CosineSimilarity
    from pytorch_metric_learning.distances import CosineSimilarity as PMLCosine
    x, labels = _batch(13)
    ours = miners.MultiSimilarityMiner(distance=CosineSimilarity(collect_stats=True))
    theirs = pml_miners.MultiSimilarityMiner(distance=PMLCosine(collect_stats=True))
    assert ours._record_these == theirs._record_these == ["epsilon"]
    ours(x * 3, labels)
    theirs(x * 3, labels)
    for name in ("initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm"):
        assert getattr(ours.distance, name) == pytest.approx(getattr(theirs.distance, name), rel=1e-12), name
