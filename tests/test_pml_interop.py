"""What dmlkern does not have yet can be taken from PML itself: PML's wrappers, regularizers,
samplers and AccuracyCalculator work with dmlkern's losses and miners (README, "Using PML's other
parts"). Each case against the same composition of PML's own classes."""
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning import samplers as pml_samplers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from dmlkern import distances, losses, miners


def _batch(seed=0, n=40, d=8, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "ContrastiveLoss", "SupConLoss", "NTXentLoss"])
def test_cross_batch_memory_wraps_dmlkern_losses(name):
    x, labels = _batch()
    results = []
    for lib in (losses, pml_losses):
        memory = pml_losses.CrossBatchMemory(getattr(lib, name)(), embedding_size=8, memory_size=32)
        # two batches: the second one also sees the first one's embeddings in the memory
        memory(x[:20].float(), labels[:20])
        results.append(_value_and_grad(lambda e: memory(e, labels[20:]), x[20:].float()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_multiple_losses_and_self_supervised_wrappers():
    x, labels = _batch(1)
    got = _value_and_grad(lambda e: pml_losses.MultipleLosses(
        [losses.MultiSimilarityLoss(), losses.ContrastiveLoss()], weights=[1.0, 0.5])(e, labels), x)
    want = _value_and_grad(lambda e: pml_losses.MultipleLosses(
        [pml_losses.MultiSimilarityLoss(), pml_losses.ContrastiveLoss()], weights=[1.0, 0.5])(e, labels), x)
    torch.testing.assert_close(got, want)
    ref = x.flip(0) + 0.1
    got = _value_and_grad(lambda e: pml_losses.SelfSupervisedLoss(losses.NTXentLoss())(e, ref), x)
    want = _value_and_grad(lambda e: pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss())(e, ref), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("regularizer", ["LpRegularizer", "ZeroMeanRegularizer"])
def test_pml_regularizers_on_dmlkern_losses(regularizer):
    x, labels = _batch(2)
    make = getattr(pml_regularizers, regularizer)
    got = _value_and_grad(lambda e: losses.MultiSimilarityLoss(embedding_regularizer=make())(e, labels), x)
    want = _value_and_grad(lambda e: pml_losses.MultiSimilarityLoss(embedding_regularizer=make())(e, labels), x)
    torch.testing.assert_close(got, want)
    torch.manual_seed(0)
    ours = losses.ArcFaceLoss(5, 8, weight_regularizer=pml_regularizers.RegularFaceRegularizer())
    torch.manual_seed(0)
    theirs = pml_losses.ArcFaceLoss(5, 8, weight_regularizer=pml_regularizers.RegularFaceRegularizer())
    torch.testing.assert_close(_value_and_grad(lambda e: ours(e, labels), x.float()),
                               _value_and_grad(lambda e: theirs(e, labels), x.float()))


def test_sampler_batches_train_and_accuracy_calculator_scores():
    """MPerClassSampler's batches through dmlkern's loss and miner, then AccuracyCalculator."""
    torch.manual_seed(0)
    centers = torch.randn(6, 8)
    labels = torch.arange(6).repeat_interleave(20)
    data = centers[labels] + 0.8 * torch.randn(len(labels), 8)
    sampler = pml_samplers.MPerClassSampler(labels, m=4, batch_size=24, length_before_new_iter=240)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    indices = list(iter(sampler))
    assert len(indices) == 240
    for start in range(0, len(indices), 24):
        idx = torch.tensor(indices[start:start + 24])
        emb = model(data[idx])
        loss = loss_fn(emb, labels[idx], miner(emb, labels[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    with torch.no_grad():
        emb = model(data)
    # k-NN with dmlkern's distance (PML's default, faiss, is not installed here)
    knn = CustomKNN(distances.CosineSimilarity())
    scores = AccuracyCalculator(include=("precision_at_1",), k=5, knn_func=knn).get_accuracy(
        emb, labels, emb, labels, True)
    assert scores["precision_at_1"] > 0.5  # six separable clusters; chance is 1/6
