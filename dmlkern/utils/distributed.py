"""PML's `utils.distributed` API: `DistributedLossWrapper`, `DistributedMinerWrapper` and the
gather utilities, for shards of any size and exact global-batch gradients
(dmlkern/distributed/wrappers.py)."""
import torch

from ..distributed import collectives as _co
from ..distributed.wrappers import (  # noqa: F401
    DistributedLossWrapper,
    DistributedMinerWrapper,
    gather,
    gather_emb_and_ref,
    gather_enqueue_mask,
    get_indices_tuple,
    select_ref_or_regular,
)

is_distributed = _co.is_distributed


def all_gather(x):
    """The other ranks' rows of x (rank order, this rank's left out), or None with one rank."""
    world_size = torch.distributed.get_world_size()
    if world_size <= 1:
        return None
    r = torch.distributed.get_rank()
    parts = _co.all_gather_rows(x, _co.shard_sizes(x.shape[0], x.device))
    return torch.cat(parts[:r] + parts[r + 1:])


def all_gather_embeddings_and_labels(emb, labels):
    if not is_distributed():
        return None, None
    return all_gather(emb), all_gather(labels) if labels is not None else None
