"""PML's `DistributedLossWrapper` / `DistributedMinerWrapper` on torch.distributed, exact for the
global batch and for shards of any size.

Gradient contract (README, "Distributed training"): the value returned is world_size times the
loss of the global batch (PML's value), the same on every rank. Each rank's embeddings get
world_size times the global loss's gradient for its own rows, so once DDP averages the model's
gradients over ranks they equal the single-process gradients of the global loss. The loss's own
parameters (proxies, class weights) get the single-process gradient on every rank, before and
after averaging: the ×world_size does not reach them.

`efficient=False` (the default) is that exact global loss. It runs one of two ways:
- row-sharded (`row_sharded.py`, the losses listed there): each rank computes only its own rows
  against the gathered columns; the columns' gradients go back to their owners (one all-reduce
  of an N_g × D buffer) and the reducer sees every rank's per-row losses;
- gathered: every rank computes the whole global loss with gradients to its own rows (any loss,
  any reducer, any indices_tuple, the reference losses).
The gathered batch of the exact mode and of `DistributedMinerWrapper(efficient=False)` is in rank
order (rank 0's rows first; PML puts each rank's own rows first), the same on every rank: every
rank computes the same bits, and a random miner (DistanceWeightedMiner) seeded alike on every
rank draws what one process draws. Its indices refer to that order.
`efficient=True` is PML's: each rank's rows against the gathered rows minus the self-pairs,
reduced per rank, the other ranks' rows taken as constants: not the global loss's gradient.
"""
import warnings

import torch

from . import collectives as co


def _is_cross_batch_memory(loss):
    from .. import losses

    types = tuple(t for t in (getattr(losses, "CrossBatchMemory", None), _pml("losses", "CrossBatchMemory")) if t)
    return isinstance(loss, types)


def _pml(module, name):
    try:
        import importlib

        return getattr(importlib.import_module(f"pytorch_metric_learning.{module}"), name)
    except ImportError:
        return None


def _accepted(obj, dmlkern_type, module, name):
    return isinstance(obj, dmlkern_type) or (_pml(module, name) is not None and isinstance(obj, _pml(module, name)))


def _to_device(labels, device):
    return None if labels is None else labels.to(device)


def _gather(emb, labels, own_first_order, group):
    labels = _to_device(labels, emb.device)
    sizes = co.shard_sizes(emb.shape[0], emb.device, group)
    r = co.rank(group)
    parts = co.all_gather_rows(emb, sizes, group)
    parts[r] = emb  # only this rank's rows carry a gradient (the others are constants)
    all_emb = torch.cat(co.own_first(parts, r) if own_first_order else parts)
    all_labels = None if labels is None else co.gather_labels(labels, sizes, own_first_order, group)
    return all_emb, all_labels, labels


def _gather_emb_and_ref(emb, labels, ref_emb, ref_labels, own_first_order, group=None):
    all_emb, all_labels, labels = _gather(emb, labels, own_first_order, group)
    all_ref_emb, all_ref_labels = None, None
    if ref_emb is not None:
        all_ref_emb, all_ref_labels, _ = _gather(ref_emb, ref_labels, own_first_order, group)
    return all_emb, all_labels, all_ref_emb, all_ref_labels, labels


def gather(emb, labels, group=None):
    """PML's gather for shards of any size: (all_emb, all_labels, labels), own rows first. Only
    this rank's rows carry a gradient."""
    return _gather(emb, labels, True, group)


def gather_emb_and_ref(emb, labels, ref_emb=None, ref_labels=None, group=None):
    return _gather_emb_and_ref(emb, labels, ref_emb, ref_labels, True, group)


def get_indices_tuple(labels, ref_labels, embeddings=None, ref_emb=None, miner=None):
    """PML's: the miner's tuple (or all pairs) between this rank's rows (the first len(labels)
    reference rows) and the gathered ones, without the self comparisons."""
    from ..utils import loss_and_miner_utils as lmu

    curr_batch_idx = torch.arange(len(labels), device=labels.device)
    if miner:
        indices_tuple = miner(embeddings, labels, ref_emb, ref_labels)
    else:
        indices_tuple = lmu.get_all_pairs_indices(labels, ref_labels)
    return lmu.remove_self_comparisons(indices_tuple, curr_batch_idx, len(ref_labels))


def gather_enqueue_mask(enqueue_mask, device, group=None, *, own_first_order=True):
    if enqueue_mask is None:
        return enqueue_mask
    enqueue_mask = enqueue_mask.to(device)
    sizes = co.shard_sizes(enqueue_mask.shape[0], device, group)
    return co.gather_labels(enqueue_mask, sizes, own_first_order, group)


def select_ref_or_regular(regular, ref):
    return regular if ref is None else ref


def _loss_params_scaled(loss, scale):
    """{name: parameter whose gradient is multiplied by scale}, for torch.func.functional_call."""
    return {name: co.scale_grad(p, scale) for name, p in loss.named_parameters() if p.requires_grad}


class DistributedLossWrapper(torch.nn.Module):
    """PML's wrapper (see the module doc). `row_sharded=False` (dmlkern only) makes the exact mode
    always gather, e.g. to compare the two."""

    def __init__(self, loss, efficient=False, *, row_sharded=True):
        super().__init__()
        from ..losses import BaseMetricLossFunction

        if not (_accepted(loss, BaseMetricLossFunction, "losses", "BaseMetricLossFunction")
                or _is_cross_batch_memory(loss)):
            raise TypeError("The input loss must extend BaseMetricLossFunction or CrossBatchMemory")
        if _is_cross_batch_memory(loss) and efficient:
            raise ValueError("CrossBatchMemory with efficient=True is not currently supported")
        self.loss = loss
        self.efficient = efficient
        self.row_sharded = row_sharded
        self.last_mode = None  # "row_sharded", "gathered", "efficient" or "local": how the last call ran

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None,
                enqueue_mask=None):
        if not co.is_distributed():
            warnings.warn("DistributedLossWrapper is being used in a non-distributed setting. Returning the loss as is.")
            self.last_mode = "local"
            if _is_cross_batch_memory(self.loss):
                return self.loss(embeddings, labels, indices_tuple, enqueue_mask)
            return self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        world_size = co.world_size()
        if _is_cross_batch_memory(self.loss):
            return self.forward_cross_batch(embeddings, labels, indices_tuple, ref_emb, ref_labels, world_size,
                                            enqueue_mask)
        return self.forward_regular_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels, world_size)

    def _global_loss(self, world_size, *args):
        """world_size × the loss of the gathered batch, the ×world_size kept off the loss's own
        parameters' gradients (see the module doc)."""
        if hasattr(self.loss, "cast_types"):  # the loss's in-place cast must reach the parameters, not the stand-ins
            self.loss.cast_types(args[0].dtype, args[0].device)
        params = _loss_params_scaled(self.loss, 1.0 / world_size)
        if params:
            loss = torch.func.functional_call(self.loss, params, args, strict=False)
        else:
            loss = self.loss(*args)
        if not isinstance(loss, torch.Tensor):  # PML fails on dict * int here
            raise TypeError(f"DistributedLossWrapper needs a loss that returns a tensor; {type(self.loss).__name__} "
                            f"returned a {type(loss).__name__} (e.g. with DoNothingReducer)")
        return loss * world_size

    def forward_regular_loss(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size):
        if world_size <= 1:
            self.last_mode = "local"
            return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels)
        if not self.efficient and self.row_sharded:
            from . import row_sharded

            out = row_sharded.loss(self.loss, emb, labels, indices_tuple, ref_emb, ref_labels)
            if out is not None:
                self.last_mode = "row_sharded"
                return out * world_size
        all_emb, all_labels, all_ref_emb, all_ref_labels, labels = _gather_emb_and_ref(
            emb, labels, ref_emb, ref_labels, own_first_order=self.efficient)
        if self.efficient:
            self.last_mode = "efficient"
            if all_labels is not None:
                all_labels = select_ref_or_regular(all_labels, all_ref_labels)
            all_emb = select_ref_or_regular(all_emb, all_ref_emb)
            if indices_tuple is None:
                indices_tuple = get_indices_tuple(labels, all_labels)
            return self._global_loss(world_size, emb, labels, indices_tuple, all_emb, all_labels)
        self.last_mode = "gathered"
        return self._global_loss(world_size, all_emb, all_labels, indices_tuple, all_ref_emb, all_ref_labels)

    def forward_cross_batch(self, emb, labels, indices_tuple, ref_emb, ref_labels, world_size, enqueue_mask):
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("CrossBatchMemory is not compatible with ref_emb and ref_labels")
        if world_size <= 1:
            self.last_mode = "local"
            return self.loss(emb, labels, indices_tuple, enqueue_mask)
        all_emb, all_labels, _, _, _ = _gather_emb_and_ref(emb, labels, None, None, own_first_order=False)
        enqueue_mask = gather_enqueue_mask(enqueue_mask, emb.device, own_first_order=False)
        self.last_mode = "gathered"
        return self._global_loss(world_size, all_emb, all_labels, indices_tuple, enqueue_mask)


class DistributedMinerWrapper(torch.nn.Module):
    """PML's: the miner on the gathered batch, whose indices feed DistributedLossWrapper;
    efficient=True mines this rank's rows against the gathered ones (own rows first), without the
    self comparisons."""

    def __init__(self, miner, efficient=False):
        super().__init__()
        from ..miners import BaseMiner

        if not _accepted(miner, BaseMiner, "miners", "BaseMiner"):
            raise TypeError("The input miner must extend BaseMiner")
        self.miner = miner
        self.efficient = efficient

    def forward(self, emb, labels, ref_emb=None, ref_labels=None):
        world_size = co.world_size()
        if world_size <= 1:
            return self.miner(emb, labels, ref_emb, ref_labels)
        all_emb, all_labels, all_ref_emb, all_ref_labels, labels = _gather_emb_and_ref(
            emb, labels, ref_emb, ref_labels, own_first_order=self.efficient)
        if self.efficient:
            all_labels = select_ref_or_regular(all_labels, all_ref_labels)
            all_emb = select_ref_or_regular(all_emb, all_ref_emb)
            return get_indices_tuple(labels, all_labels, emb, all_emb, self.miner)
        return self.miner(all_emb, all_labels, all_ref_emb, all_ref_labels)
