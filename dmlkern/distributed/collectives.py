"""Collectives over the default process group (or `group`), for shards of any size.

torch.distributed.all_gather needs equal sizes (gloo aborts with "Received data size doesn't
match"), so every gather first exchanges the row counts and pads to the largest shard. Orders:
`rank order` is the global batch as one process would see it (rank 0's rows first); `own first`
is PML's order (this rank's rows, then the others in rank order), in which the rows of this rank
are the first rows of the columns, so self-pairs are the diagonal.

Gradient rules (each is exact because every rank runs the same computation on the gathered
values):
- `gather_columns`: rows every rank reads as columns. Backward: all-reduce (sum) of the gradient
  over ranks, then this rank's slice: the gradient of a column sums the contributions of every
  rank's rows.
- `gather_values`: values every rank feeds to the same downstream computation (per-row losses
  into the reducer). Backward: this rank's slice of the gradient, no communication: every rank
  computed the same downstream gradient.
"""
import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def world_size(group=None):
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group=None):
    return dist.get_rank(group) if is_distributed() else 0


def shard_sizes(n, device, group=None):
    """Every rank's number of rows (a list of ints, rank order)."""
    w = world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(w)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in sizes]


def all_gather_rows(x, sizes, group=None):
    """Every rank's x (rows may differ in number: `sizes`, rank order), as a list in rank order.
    Not differentiable."""
    x = x.detach().contiguous()
    most = max(sizes)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros((most - x.shape[0],) + x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return [p[:n] for p, n in zip(parts, sizes)]


def own_first(parts, r):
    """PML's order: part r, then the others in rank order."""
    return [parts[r]] + parts[:r] + parts[r + 1:]


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(x, sizes, r, order_own_first, group):
        parts = all_gather_rows(x, sizes, group)
        parts[r] = x.detach()
        return torch.cat(own_first(parts, r) if order_own_first else parts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.sizes, ctx.r, ctx.order_own_first, ctx.group = inputs

    @staticmethod
    def backward(ctx, grad):
        n, before = ctx.sizes[ctx.r], sum(ctx.sizes[:ctx.r])
        if ctx.order_own_first:  # to rank order, the same on every rank, before summing
            grad = torch.cat([grad[n:n + before], grad[:n], grad[n + before:]])
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[before:before + n], None, None, None, None


class _GatherValues(torch.autograd.Function):
    @staticmethod
    def forward(x, sizes, r, group):
        parts = all_gather_rows(x, sizes, group)
        parts[r] = x.detach()
        return torch.cat(parts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.sizes, ctx.r, _ = inputs

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.sizes[:ctx.r])
        return grad[start:start + ctx.sizes[ctx.r]], None, None, None


def gather_columns(x, sizes, own_first_order=True, group=None):
    """All ranks' rows of x (own first, or rank order), differentiable: see the module doc."""
    return _GatherColumns.apply(x, sizes, rank(group), own_first_order, group)


def gather_values(x, sizes, group=None):
    """All ranks' x in rank order, for a computation every rank repeats: see the module doc."""
    return _GatherValues.apply(x, sizes, rank(group), group)


def gather_labels(labels, sizes, own_first_order=True, group=None):
    """All ranks' labels (own first, or rank order); no gradient."""
    parts = all_gather_rows(labels, sizes, group)
    parts[rank(group)] = labels
    return torch.cat(own_first(parts, rank(group)) if own_first_order else parts)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(x, scale):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(x, scale):
    """x, whose gradient is multiplied by `scale` on the way back."""
    return _ScaleGrad.apply(x, scale)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        out = x.detach().clone().contiguous()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(x, group=None):
    """The sum of x over ranks, for a computation every rank repeats: its backward is the
    identity (each rank's x gets the gradient of the one sum, which every rank computed)."""
    return _AllReduceSum.apply(x, group)


class _SumGradOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(x, group):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_ranks(x, group=None):
    """x, which every rank holds alike (a loss's own parameter), whose gradient on the way back is
    the sum of every rank's: each rank's part comes from its own rows."""
    return _SumGradOverRanks.apply(x, group)
