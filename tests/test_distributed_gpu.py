"""The distributed wrappers and the class-sharded loss with CUDA tensors (2 gloo ranks sharing one
GPU; NCCL needs a GPU per rank), against one process on the GPU: the collectives' padding and
copies, and the Triton kernels' row-sharded calls. Run by benchmarks/gpu_check.sh (-m gpu)."""
import pytest
import torch

from _distributed import run_ranks, shard

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZES = [300, 213]
D, CLASSES = 64, 37


def _cases():
    from dmlkern import losses, miners

    return [("multi_similarity", lambda: losses.MultiSimilarityLoss(), None),
            ("multi_similarity+miner", lambda: losses.MultiSimilarityLoss(), lambda: miners.MultiSimilarityMiner()),
            ("ntxent", lambda: losses.NTXentLoss(), None),
            ("contrastive", lambda: losses.ContrastiveLoss(), None),
            ("triplet", lambda: losses.TripletMarginLoss(), None),
            ("proxy_anchor", lambda: losses.ProxyAnchorLoss(CLASSES, D), None),
            ("arcface (gathered)", lambda: losses.ArcFaceLoss(CLASSES, D), None)]


def _ranks(r, world, emb, labels):
    from dmlkern.distributed.class_sharded import ClassShardedLoss
    from dmlkern.losses import ArcFaceLoss
    from dmlkern.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

    out = []
    x_all, y = shard(emb, SIZES, r).cuda(), shard(labels, SIZES, r).cuda()
    for name, loss_fn, miner_fn in _cases():
        torch.manual_seed(0)
        loss = DistributedLossWrapper(loss_fn().cuda())
        miner = DistributedMinerWrapper(miner_fn()) if miner_fn else None
        x = x_all.clone().requires_grad_()
        value = loss(x, y, miner(x, y) if miner else None)
        value.backward()
        out.append((value.detach().cpu(), x.grad.cpu(), loss.last_mode))
    torch.manual_seed(0)
    full = ArcFaceLoss(CLASSES, D).cuda()
    sharded = ClassShardedLoss(ArcFaceLoss, CLASSES, D).cuda()
    sharded.load_from_full(full)
    x = x_all.clone().requires_grad_()
    value = sharded(x, y)
    value.backward()
    out.append((value.detach().cpu(), x.grad.cpu(), "class_sharded"))
    return out


def test_wrappers_on_cuda_tensors_equal_one_process():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(sum(SIZES), D, generator=g)
    labels = torch.randint(0, CLASSES, (sum(SIZES),), generator=g)
    per_rank = run_ranks(_ranks, len(SIZES), emb, labels)
    from dmlkern.losses import ArcFaceLoss

    expected = []
    for name, loss_fn, miner_fn in _cases() + [("class_sharded", lambda: ArcFaceLoss(CLASSES, D), None)]:
        torch.manual_seed(0)
        loss, miner = loss_fn().cuda(), miner_fn() if miner_fn else None
        x = emb.cuda().requires_grad_()
        value = loss(x, labels.cuda(), miner(x, labels.cuda()) if miner else None)
        value.backward()
        expected.append((name, value.detach().cpu(), x.grad.cpu()))
    for r in range(len(SIZES)):
        for (name, value, grad), (r_value, r_grad, mode) in zip(expected, per_rank[r]):
            scale = 1 if mode == "class_sharded" else len(SIZES)
            torch.testing.assert_close(r_value, value * scale, rtol=2e-4, atol=1e-5, msg=lambda m, name=name, mode=mode: f"{name} ({mode}): {m}")
            torch.testing.assert_close(r_grad, shard(grad, SIZES, r) * len(SIZES), rtol=2e-3, atol=1e-5,
                                       msg=lambda m, name=name, mode=mode: f"{name} ({mode}): {m}")
