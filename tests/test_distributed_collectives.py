"""The collectives' gradient rules (dmlkern/distributed/collectives.py) on gloo ranks with
uneven shards, against one process's autograd on the concatenated batch."""
import torch

from _distributed import run_ranks, shard
from dmlkern.distributed import collectives as co

SIZES = [3, 5, 1]


def _columns_and_values(r, world, x_all, w):
    sizes = co.shard_sizes(SIZES[r], x_all.device)
    x = shard(x_all, sizes, r).clone().requires_grad_()
    cols = co.gather_columns(x, sizes)  # own first
    rank_order = co.gather_columns(x, sizes, own_first_order=False)
    # a loss made of this rank's rows against all columns, plus per-row values every rank reduces
    row_terms = (x @ cols.T).exp().sum(1)
    values = co.gather_values(row_terms, sizes)
    total = (values * w).sum() + co.all_reduce_sum((x ** 2).sum()) * 0.5
    total.backward()
    return rank_order.detach(), total.detach(), x.grad


def test_gather_columns_and_values_give_the_global_gradient():
    torch.manual_seed(0)
    x_all = torch.randn(sum(SIZES), 4, dtype=torch.float64)
    w = torch.rand(sum(SIZES), dtype=torch.float64)
    out = run_ranks(_columns_and_values, len(SIZES), x_all, w)
    x_ref = x_all.clone().requires_grad_()
    ref_total = ((x_ref @ x_ref.T).exp().sum(1) * w).sum() + (x_ref ** 2).sum() * 0.5
    ref_total.backward()
    for r, (gathered, total, grad) in enumerate(out):
        torch.testing.assert_close(gathered, x_all, rtol=0, atol=0)
        torch.testing.assert_close(total, ref_total.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, shard(x_ref.grad, SIZES, r), rtol=1e-12, atol=1e-12)
