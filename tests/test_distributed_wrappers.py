"""DistributedLossWrapper / DistributedMinerWrapper on gloo ranks with uneven shards, against one
process's loss on the concatenated global batch: the value is world_size × the global loss, each
rank's embeddings get world_size × the global gradient of its rows (DDP then averages), the
loss's own parameters get the global gradient, and a DDP training step equals the single-process
step (the contract in dmlkern/distributed/wrappers.py)."""
import pytest
import torch

from _distributed import run_ranks, shard
from dmlkern import distances, losses, miners, reducers
from dmlkern.utils import distributed as dist_utils

D, CLASSES = 6, 4

# (name, loss factory, miner factory or None); factories are called after torch.manual_seed(0),
# and the losses' parameters made fp64 (MarginLoss keeps its beta in fp32 otherwise)
CASES = [
    ("contrastive", lambda: losses.ContrastiveLoss(), None),
    ("triplet", lambda: losses.TripletMarginLoss(margin=0.3), None),
    ("triplet+miner", lambda: losses.TripletMarginLoss(margin=0.3), lambda: miners.TripletMarginMiner(margin=0.3)),
    ("triplet+batch_hard", lambda: losses.TripletMarginLoss(margin=0.3), lambda: miners.BatchHardMiner()),
    ("triplet+semihard cosine mean", lambda: losses.TripletMarginLoss(
        margin=0.3, distance=distances.CosineSimilarity(), reducer=reducers.MeanReducer()),
     lambda: miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=distances.CosineSimilarity())),
    ("margin_learned_beta", lambda: losses.MarginLoss(learn_beta=True, num_classes=CLASSES), None),
    ("multi_similarity", lambda: losses.MultiSimilarityLoss(), None),
    ("multi_similarity+miner", lambda: losses.MultiSimilarityLoss(), lambda: miners.MultiSimilarityMiner(0.1)),
    ("lifted", lambda: losses.LiftedStructureLoss(), None),
    ("generalized_lifted", lambda: losses.GeneralizedLiftedStructureLoss(), None),
    ("ntxent", lambda: losses.NTXentLoss(temperature=0.2), None),
    ("supcon", lambda: losses.SupConLoss(temperature=0.2), None),
    ("tuplet", lambda: losses.TupletMarginLoss(), None),
    ("angular", lambda: losses.AngularLoss(), None),
    ("nca", lambda: losses.NCALoss(), None),
    ("circle", lambda: losses.CircleLoss(), None),
    ("contrastive+pair_margin", lambda: losses.ContrastiveLoss(), lambda: miners.PairMarginMiner()),
    ("contrastive+angular_miner", lambda: losses.ContrastiveLoss(), lambda: miners.AngularMiner(angle=40)),
    ("contrastive+hdc", lambda: losses.ContrastiveLoss(), lambda: miners.HDCMiner(filter_percentage=0.5)),
    ("triplet+batch_easy_hard", lambda: losses.TripletMarginLoss(margin=0.3), lambda: miners.BatchEasyHardMiner()),
    ("triplet+distance_weighted (seeded alike)", lambda: losses.TripletMarginLoss(margin=0.3),
     lambda: miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)),
    ("proxy_anchor", lambda: losses.ProxyAnchorLoss(CLASSES, D), None),
    ("proxy_nca", lambda: losses.ProxyNCALoss(CLASSES, D), None),
    ("arcface", lambda: losses.ArcFaceLoss(CLASSES, D), None),
    ("cosface", lambda: losses.CosFaceLoss(CLASSES, D), None),
    ("soft_triple", lambda: losses.SoftTripleLoss(CLASSES, D, centers_per_class=2), None),
    ("fast_ap (reference)", lambda: losses.FastAPLoss(), None),
]


ROW_SHARDED = {"multi_similarity", "supcon", "ntxent", "contrastive", "generalized_lifted", "circle", "proxy_anchor",
               "multi_similarity+miner", "triplet", "triplet+miner",
               "triplet+semihard cosine mean"}  # the rest run gathered


def _params(module):
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _global_case(loss_fn, miner_fn, emb, labels):
    torch.manual_seed(0)
    loss, miner = loss_fn().double(), miner_fn() if miner_fn else None
    emb = emb.clone().requires_grad_()
    value = loss(emb, labels, miner(emb, labels) if miner else None)
    value.backward()
    return value.detach(), emb.grad, {n: p.grad for n, p in _params(loss).items()}


def _ranks_all_cases(r, world, sizes, emb, labels, efficient):
    out = []
    for name, loss_fn, miner_fn in CASES:
        torch.manual_seed(0)
        loss = dist_utils.DistributedLossWrapper(loss_fn().double(), efficient=efficient)
        miner = dist_utils.DistributedMinerWrapper(miner_fn(), efficient=efficient) if miner_fn else None
        x = shard(emb, sizes, r).clone().requires_grad_()
        y = shard(labels, sizes, r)
        value = loss(x, y, miner(x, y) if miner else None)
        value.backward()
        out.append((value.detach(), x.grad, {n: p.grad for n, p in _params(loss.loss).items()}, loss.last_mode))
    return out


@pytest.mark.parametrize("sizes", [[7, 4], [3, 6, 2]], ids=["2 ranks", "3 ranks"])
def test_wrapped_losses_and_miners_equal_the_global_batch(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    n = sum(sizes)
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    world = len(sizes)
    per_rank = run_ranks(_ranks_all_cases, world, sizes, emb, labels, False)
    for i, (name, loss_fn, miner_fn) in enumerate(CASES):
        value, grad, param_grads = _global_case(loss_fn, miner_fn, emb, labels)
        assert value.abs() > 0, f"{name}: a zero global loss tests nothing"
        for r in range(world):
            r_value, r_grad, r_params, mode = per_rank[r][i]
            assert mode == ("row_sharded" if name in ROW_SHARDED else "gathered"), name
            assert torch.equal(r_value, per_rank[0][i][0]), f"{name}: every rank reduces the same values alike"
            torch.testing.assert_close(r_value, value * world, rtol=1e-10, atol=1e-12, msg=f"{name}, rank {r}: value")
            torch.testing.assert_close(r_grad, shard(grad, sizes, r) * world, rtol=1e-10, atol=1e-12,
                                       msg=f"{name}, rank {r}: embeddings' gradient")
            assert r_params.keys() == param_grads.keys(), name
            for p in param_grads:
                torch.testing.assert_close(r_params[p], param_grads[p], rtol=1e-10, atol=1e-12,
                                           msg=f"{name}, rank {r}: gradient of {p}")


# (name, loss factory, labels of the global batch, expected mode): reducers on the gathered per-row
# losses, float labels, degenerate global batches (the gathered path), a one-row shard
REDUCER_AND_LABEL_CASES = [
    ("ms+avg_nonzero", lambda: losses.MultiSimilarityLoss(reducer=reducers.AvgNonZeroReducer()),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("ms+class_weighted", lambda: losses.MultiSimilarityLoss(reducer=reducers.ClassWeightedReducer(
        torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))), [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("supcon+threshold", lambda: losses.SupConLoss(reducer=reducers.ThresholdReducer(low=0.1)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("ntxent float labels", lambda: losses.NTXentLoss(), [0.5, 1.5, 0.5, 2.0, 1.5, 1.5, 0.5, 2.0, 2.0], "row_sharded"),
    ("supcon one class", lambda: losses.SupConLoss(), [3] * 9, "gathered"),
    ("ntxent no positive pair", lambda: losses.NTXentLoss(), list(range(9)), "gathered"),
    ("contrastive cosine, sum / mean", lambda: losses.ContrastiveLoss(
        pos_margin=0.9, neg_margin=0.2, distance=distances.CosineSimilarity(),
        reducer=reducers.MultipleReducers({"pos_loss": reducers.SumReducer(), "neg_loss": reducers.MeanReducer()})),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("contrastive one class", lambda: losses.ContrastiveLoss(), [1] * 9, "row_sharded"),
    ("proxy_anchor, class 3 absent, float64 proxies", lambda: losses.ProxyAnchorLoss(4, D).double(),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("proxy_anchor with a label out of range", lambda: losses.ProxyAnchorLoss(2, D), [0, 1, 0, 2, 1, 1, 0, 2, 2],
     "raises"),
    # the distances the fused losses take in one process: raw rows (the Lp ones centred on the
    # gathered columns' median, alike on every rank), squared distances
    ("ms dot product (not unit)", lambda: losses.MultiSimilarityLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("ms raw lp", lambda: losses.MultiSimilarityLoss(distance=distances.LpDistance(normalize_embeddings=False)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("supcon raw dot", lambda: losses.SupConLoss(
        temperature=2.0, distance=distances.DotProductSimilarity(normalize_embeddings=False)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("ntxent squared raw lp", lambda: losses.NTXentLoss(
        temperature=3.0, distance=distances.LpDistance(normalize_embeddings=False, power=2)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("contrastive raw lp", lambda: losses.ContrastiveLoss(
        pos_margin=0.5, neg_margin=2.5, distance=distances.LpDistance(normalize_embeddings=False)),
     [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("generalized lifted raw lp", lambda: losses.GeneralizedLiftedStructureLoss(
        distance=distances.LpDistance(normalize_embeddings=False)), [0, 1, 0, 2, 1, 1, 0, 2, 2], "row_sharded"),
    ("supcon squared lp (not a similarity: one process runs the reference)", lambda: losses.SupConLoss(
        distance=distances.LpDistance(power=2)), [0, 1, 0, 2, 1, 1, 0, 2, 2], "gathered"),
]
SIZES_WITH_A_ONE_ROW_SHARD = [5, 1, 3]


def _ranks_reducer_and_label_cases(r, world, sizes, emb):
    out = []
    for name, loss_fn, labels, mode in REDUCER_AND_LABEL_CASES:
        torch.manual_seed(0)
        loss = dist_utils.DistributedLossWrapper(loss_fn())
        x = shard(emb, sizes, r).clone().requires_grad_()
        if mode == "raises":  # on every rank, not only where the label is
            with pytest.raises(ValueError, match="labels"):
                loss(x, shard(torch.tensor(labels), sizes, r))
            out.append(None)
            continue
        value = loss(x, shard(torch.tensor(labels), sizes, r))
        value.backward()
        out.append((value.detach(), x.grad, loss.last_mode))
    return out


def test_row_sharded_reducers_labels_and_degenerate_batches():
    sizes = SIZES_WITH_A_ONE_ROW_SHARD
    emb = torch.randn(sum(sizes), D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    per_rank = run_ranks(_ranks_reducer_and_label_cases, len(sizes), sizes, emb)
    for i, (name, loss_fn, labels, mode) in enumerate(REDUCER_AND_LABEL_CASES):
        if mode == "raises":
            continue
        torch.manual_seed(0)
        x = emb.clone().requires_grad_()
        value = loss_fn()(x, torch.tensor(labels))
        value.backward()
        for r in range(len(sizes)):
            r_value, r_grad, r_mode = per_rank[r][i]
            assert r_mode == mode, name
            torch.testing.assert_close(r_value, value.detach() * len(sizes), rtol=1e-10, atol=1e-12, msg=name)
            torch.testing.assert_close(r_grad, shard(x.grad, sizes, r) * len(sizes), rtol=1e-10, atol=1e-12, msg=name)


def _ranks_ntxent(r, world, sizes, emb, labels, temperature):
    loss = dist_utils.DistributedLossWrapper(losses.NTXentLoss(temperature=temperature))
    x = shard(emb, sizes, r).clone().requires_grad_()
    value = loss(x, shard(labels, sizes, r))
    value.backward()
    return value.detach(), x.grad, loss.last_mode


def test_row_sharded_ntxent_past_pmls_cap_is_pmls_global_loss():
    """A positive pair past PML's -log(p + tiny) cap (fp32, cosine at t = 0.01: row 1 opposite its
    positive row 0, next to row 2): the row-sharded kernels floor p as PML does, on every rank."""
    import pytorch_metric_learning.losses as pml_losses

    g = torch.Generator().manual_seed(4)
    emb = torch.randn(12, D, generator=g, dtype=torch.float64)
    emb[1], emb[2] = -emb[0], -emb[0] + 0.01 * emb[3]
    emb = emb.float()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8])
    sizes = [7, 5]
    per_rank = run_ranks(_ranks_ntxent, len(sizes), sizes, emb, labels, 0.01)
    x = emb.clone().requires_grad_()
    value = pml_losses.NTXentLoss(temperature=0.01)(x, labels)
    value.backward()
    for r, (r_value, r_grad, mode) in enumerate(per_rank):
        assert mode == "row_sharded"
        torch.testing.assert_close(r_value, value.detach() * len(sizes), rtol=1e-4, atol=1e-5, msg=f"rank {r}")
        torch.testing.assert_close(r_grad, shard(x.grad, sizes, r) * len(sizes), rtol=1e-4, atol=1e-6,
                                   msg=f"rank {r}")


def _ranks_ddp_step(r, world, sizes, inputs, labels, loss_name):
    torch.manual_seed(0)
    model = torch.nn.Linear(inputs.shape[1], D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = dict((c[0], c[1]) for c in CASES)[loss_name]
    loss = dist_utils.DistributedLossWrapper(loss_fn())
    opt = torch.optim.SGD(list(ddp.parameters()) + list(loss.parameters()), lr=0.5)
    opt.zero_grad()
    loss(ddp(shard(inputs, sizes, r)), shard(labels, sizes, r)).backward()
    opt.step()
    return [p.detach().clone() for p in list(model.parameters()) + list(loss.parameters())]


@pytest.mark.parametrize("loss_name", ["multi_similarity", "proxy_anchor"])
def test_a_ddp_step_equals_the_single_process_step(loss_name):
    sizes = [5, 2, 4]
    g = torch.Generator().manual_seed(7)
    inputs = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (sum(sizes),), generator=g)
    per_rank = run_ranks(_ranks_ddp_step, len(sizes), sizes, inputs, labels, loss_name)
    torch.manual_seed(0)
    model = torch.nn.Linear(inputs.shape[1], D).double()
    loss = dict((c[0], c[1]) for c in CASES)[loss_name]()
    opt = torch.optim.SGD(list(model.parameters()) + list(loss.parameters()), lr=0.5)
    opt.zero_grad()
    loss(model(inputs), labels).backward()
    opt.step()
    expected = [p.detach() for p in list(model.parameters()) + list(loss.parameters())]
    for r, params in enumerate(per_rank):
        assert len(params) == len(expected)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p, e, rtol=1e-10, atol=1e-12, msg=f"rank {r}")


def _ranks_pml_interop(r, world, sizes, emb, labels):
    from pytorch_metric_learning import losses as pml_losses
    from pytorch_metric_learning.utils import distributed as pml_dist

    x = shard(emb, sizes[:world], r) if len(set(sizes)) == 1 else shard(emb, sizes, r)
    y = shard(labels, sizes, r)
    ours = dist_utils.DistributedLossWrapper(losses.ContrastiveLoss(), efficient=True)(x, y)
    theirs = pml_dist.DistributedLossWrapper(pml_losses.ContrastiveLoss(), efficient=True)(x, y)
    return ours.detach(), theirs.detach()


def test_efficient_mode_is_pmls():
    sizes = [4, 4]  # PML's gather needs equal shards
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(8, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=g)
    for ours, theirs in run_ranks(_ranks_pml_interop, 2, sizes, emb, labels):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_wrappers_reject_what_pml_rejects():
    with pytest.raises(TypeError, match="BaseMetricLossFunction"):
        dist_utils.DistributedLossWrapper(torch.nn.MSELoss())
    with pytest.raises(TypeError, match="BaseMiner"):
        dist_utils.DistributedMinerWrapper(losses.ContrastiveLoss())


def test_without_a_process_group_the_loss_runs_as_is():
    emb, labels = torch.randn(6, D, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    wrapped = dist_utils.DistributedLossWrapper(losses.MultiSimilarityLoss())
    with pytest.warns(UserWarning, match="non-distributed"):
        value = wrapped(emb, labels)
    torch.testing.assert_close(value, losses.MultiSimilarityLoss()(emb, labels), rtol=0, atol=0)


def _ranks_cross_batch_memory(r, world, sizes_per_step, emb_steps, label_steps):
    torch.manual_seed(0)
    loss = dist_utils.DistributedLossWrapper(losses.CrossBatchMemory(losses.NTXentLoss(), D, memory_size=13))
    out = []
    for sizes, emb, labels in zip(sizes_per_step, emb_steps, label_steps):
        x = shard(emb, sizes, r).clone().requires_grad_()
        value = loss(x, shard(labels, sizes, r))
        value.backward()
        out.append((value.detach(), x.grad))
    return out, loss.loss.embedding_memory, loss.loss.label_memory


def test_cross_batch_memory_under_the_wrapper_equals_one_process():
    g = torch.Generator().manual_seed(11)
    sizes_per_step = [[3, 2], [1, 4], [4, 4], [2, 3]]  # the queue (13) wraps around
    emb_steps = [torch.randn(sum(s), D, generator=g, dtype=torch.float64) for s in sizes_per_step]
    label_steps = [torch.randint(0, 3, (sum(s),), generator=g) for s in sizes_per_step]
    per_rank = run_ranks(_ranks_cross_batch_memory, 2, sizes_per_step, emb_steps, label_steps)
    cbm = losses.CrossBatchMemory(losses.NTXentLoss(), D, memory_size=13)
    for step, (sizes, emb, labels) in enumerate(zip(sizes_per_step, emb_steps, label_steps)):
        x = emb.clone().requires_grad_()
        value = cbm(x, labels)
        value.backward()
        for r, (steps, memory, memory_labels) in enumerate(per_rank):
            r_value, r_grad = steps[step]
            torch.testing.assert_close(r_value, value.detach() * 2, rtol=1e-10, atol=1e-12, msg=f"step {step}")
            torch.testing.assert_close(r_grad, shard(x.grad, sizes, r) * 2, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    for r, (_, memory, memory_labels) in enumerate(per_rank):
        torch.testing.assert_close(memory, cbm.embedding_memory.to(memory.dtype), rtol=0, atol=0)
        assert torch.equal(memory_labels, cbm.label_memory)
