"""P2SGradLoss without the N x C cosines: mean over (row, class) of (cos_ic - [c == y_i])^2 =
(sum_i x_i^T G x_i - 2 sum_i cos_{i, y_i} + N) / (N C), with x the unit rows and G = W W^T the
D x D Gram matrix of the unit class columns: O((N + C) D^2) work, O(D^2) extra memory, autograd
through `fixed_mm` products and fixed-order sums (deterministic on the CPU). PML clamps each cosine to [-1, 1]; that only
bites on rounding past +-1, which this form does not see (README, deviations)."""
import torch

from .._determinism import fixed_order_sum
from ..ops.fixed_mm_op import fixed_mm
from ._common import decline
from ._epilogue import _engine_or_decline

_DTYPES = (torch.float32, torch.float64)


def p2s_grad(module, embeddings, labels, weight):
    """(loss_dict, backend), or None after `decline`. `weight` (D, C), its columns already unit."""
    if _engine_or_decline(module, embeddings) is None:
        return None
    if embeddings.dtype not in _DTYPES:
        return decline(module, f"dtype {embeddings.dtype} (the Gram form runs fp32 / fp64)")
    if torch.is_autocast_enabled(embeddings.device.type):
        return decline(module, "torch.autocast (the Gram form would round other products than PML's)")
    n, c = embeddings.shape[0], weight.shape[1]
    x = embeddings / embeddings.pow(2).sum(1).pow(0.5).view(-1, 1)  # PML's cosine denominator
    # fixed_mm and fixed_order_sum: the same bits at any CPU thread count
    gram = fixed_mm(weight, weight)
    squares = fixed_order_sum((fixed_mm(x, gram) * x).reshape(-1))
    targets = fixed_order_sum((x * weight.t().index_select(0, labels)).reshape(-1))  # index_select: a serial backward
    loss = (squares - 2 * targets + n) / (n * c)
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}, "gram"
