"""CrossBatchMemory (PML 2.9.0): a loss over each batch against a queue of the last
``memory_size`` embeddings (the batch included), without PML's explicit N x M pair list.

PML lists every pair of the batch's rows with the queue's (less each row's comparison with its own
queue slot) and hands the list to the loss. Here, without a miner or an ``indices_tuple``, the loss
gets that tuple lazily (``fused.lazy_pairs.LazyAllPairs``): the fused pair losses
(MultiSimilarity, NTXent, Contrastive, SupCon) run their kernels on the batch against the queue
rolled so that the batch's own slots come first (the self comparisons are the diagonal, which the
kernels exclude: ``fused._common.all_pairs_plan``); any other loss reads the tuple, which then
computes PML's exact list. With ``enqueue_mask`` nothing is excluded, and a pair loss
(``GenericPairLoss``) gets no tuple at all: its all pairs of the rows with the queue are the same.
With a miner or an ``indices_tuple`` the pairs are listed as PML lists them.
"""
import torch

from .._validation import InvalidInputError, _check_emb, _check_labels, _no_nan, class_id_pair
from ..fused.lazy_pairs import LazyAllPairs
from ..reference import indices as lmu
from ..utils.common_functions import RecordsMixin
from .base import GenericPairLoss
from .base_loss_wrapper import BaseLossWrapper

__all__ = ["CrossBatchMemory"]


def _to(x, device, dtype=None):
    """PML's ``c_f.to_device``: the device, and the dtype unless autocast is on."""
    if x.device != device:
        x = x.to(device)
    if dtype is not None and not torch.is_autocast_enabled() and x.dtype != dtype:
        x = x.type(dtype)
    return x


class CrossBatchMemory(BaseLossWrapper, RecordsMixin):
    """``loss(embeddings, labels, indices_tuple, E_mem, L_mem)`` with the queue ``E_mem`` /
    ``L_mem`` (``embedding_memory`` / ``label_memory``, filled slots only until the queue has
    wrapped around once), after writing the batch into the queue at ``queue_idx``.

    ``enqueue_mask`` (bool, one per row): only those rows are written to the queue, and only the
    others are compared with it. ``miner``: mines the rows against the queue (without
    enqueue_mask, each row's comparison with its own slot is then dropped). ``indices_tuple``:
    pairs or triplets added to the all-pairs (or mined) tuple, converted to its form. Attributes as PML's: ``embedding_memory``,
    ``label_memory`` (buffers: in ``state_dict``), ``queue_idx``, ``has_been_filled``,
    ``curr_batch_idx`` (the slots written by the last call), ``loss``, ``miner``."""

    def __init__(self, loss, embedding_size, memory_size=1024, miner=None, collect_stats=None, **kwargs):
        super().__init__(loss=loss, **kwargs)
        self._init_records(collect_stats)
        self.loss = loss
        self.miner = miner
        self.embedding_size = embedding_size
        self.memory_size = memory_size
        self.reset_queue()
        self.add_to_recordable_attributes(list_of_names=["embedding_size", "memory_size", "queue_idx"], is_stat=False)

    @staticmethod
    def supported_losses():
        return [
            "AngularLoss",
            "CircleLoss",
            "ContrastiveLoss",
            "GeneralizedLiftedStructureLoss",
            "IntraPairVarianceLoss",
            "LiftedStructureLoss",
            "MarginLoss",
            "MultiSimilarityLoss",
            "NCALoss",
            "NTXentLoss",
            "SignalToNoiseRatioContrastiveLoss",
            "SupConLoss",
            "TripletMarginLoss",
            "TupletMarginLoss",
        ]

    @classmethod
    def check_loss_support(cls, loss_name):
        if loss_name not in cls.supported_losses():
            raise ValueError(f"CrossBatchMemory not supported for {loss_name}")

    def _check_inputs(self, embeddings, labels, indices_tuple, enqueue_mask):
        """PML's checks (InvalidInputError where PML asserts) and the ones PML lacks, where it fails
        later (often after updating the queue) or silently misbehaves: all before the queue changes."""
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive")
        _check_emb(embeddings, "embeddings")
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must have embedding_size={self.embedding_size} columns, got "
                             f"{embeddings.shape[1]}")
        if labels is None:
            raise ValueError("labels are required for CrossBatchMemory")
        _check_labels(labels, "labels", len(embeddings), "embeddings")
        if labels.dtype.is_floating_point:
            _no_nan(labels, "labels")
        if enqueue_mask is not None:
            if not torch.is_tensor(enqueue_mask) or enqueue_mask.dtype != torch.bool or enqueue_mask.ndim != 1:
                raise TypeError("enqueue_mask must be a 1D bool tensor (True: the row goes to the queue)")
            if len(enqueue_mask) != len(embeddings):
                raise InvalidInputError(f"enqueue_mask must have one entry per row of embeddings: "
                                        f"{len(enqueue_mask)} != {len(embeddings)}")
        else:
            if len(embeddings) > len(self.embedding_memory):
                raise InvalidInputError(f"embeddings has {len(embeddings)} rows, more than the queue holds "
                                        f"(memory_size={len(self.embedding_memory)})")
            if len(embeddings) == 0:  # (PML: an IndexError, after updating the queue)
                raise ValueError("embeddings is empty: without enqueue_mask CrossBatchMemory needs a row")

    def forward(self, embeddings, labels, indices_tuple=None, enqueue_mask=None):
        self._check_inputs(embeddings, labels, indices_tuple, enqueue_mask)
        self.reset_stats()
        device = embeddings.device
        labels = _to(labels, device)
        self.embedding_memory = _to(self.embedding_memory, device, embeddings.dtype)
        self.label_memory = _to(self.label_memory, device, labels.dtype)

        if enqueue_mask is not None:
            enqueue_mask = enqueue_mask.to(device)
            emb_for_queue, labels_for_queue = embeddings[enqueue_mask], labels[enqueue_mask]
            embeddings, labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
            remove_self_comparisons = False
        else:
            emb_for_queue, labels_for_queue = embeddings, labels
            remove_self_comparisons = True

        self.add_to_memory(emb_for_queue, labels_for_queue, len(emb_for_queue))
        if not self.has_been_filled:
            E_mem, L_mem = self.embedding_memory[:self.queue_idx], self.label_memory[:self.queue_idx]
        else:
            E_mem, L_mem = self.embedding_memory, self.label_memory
        if torch.is_grad_enabled() and embeddings.requires_grad:
            # the fused losses keep the queue's rows for their backward, and the next call writes
            # the queue in place: a snapshot (PML's loss keeps its own normalised copy)
            E_mem, L_mem = E_mem.clone(), L_mem.clone()

        indices_tuple = self.create_indices_tuple(embeddings, labels, E_mem, L_mem, indices_tuple,
                                                  remove_self_comparisons)
        return self.loss(embeddings, labels, indices_tuple, E_mem, L_mem)

    def add_to_memory(self, embeddings, labels, batch_size):
        self.curr_batch_idx = torch.arange(self.queue_idx, self.queue_idx + batch_size,
                                           device=labels.device) % self.memory_size
        self.embedding_memory[self.curr_batch_idx] = embeddings.detach()
        self.label_memory[self.curr_batch_idx] = labels.detach()
        prev_queue_idx = self.queue_idx
        self.queue_idx = (self.queue_idx + batch_size) % self.memory_size
        if (not self.has_been_filled) and (self.queue_idx <= prev_queue_idx):
            self.has_been_filled = True

    def _all_pairs(self, labels, L_mem, do_remove_self_comparisons):
        """All pairs of the rows with the queue, less each row's comparison with its own slot (the
        last call's, from slot queue_idx - batch size on), lazily. PML's remove_self_comparisons
        keeps the self comparison of a one-row batch (its wrap-around test catches it): so does
        this tuple."""
        n = len(self.curr_batch_idx)
        self_offset = (self.queue_idx - n) % self.memory_size if do_remove_self_comparisons and n > 1 else None
        ids, ref_ids = class_id_pair(labels, L_mem, labels.device)
        return LazyAllPairs(ids, ref_ids, self_offset)

    def create_indices_tuple(self, embeddings, labels, E_mem, L_mem, input_indices_tuple,
                             do_remove_self_comparisons):
        """PML's tuple for the loss: the miner's (less the self comparisons), or all pairs (less
        them: the lazy LazyAllPairs; None for a pair loss when nothing is excluded), with
        input_indices_tuple appended (then listed)."""
        if self.miner:
            indices_tuple = self.miner(embeddings, labels, E_mem, L_mem)
            if do_remove_self_comparisons:
                indices_tuple = lmu.remove_self_comparisons(indices_tuple, self.curr_batch_idx, self.memory_size)
        elif input_indices_tuple is None:
            pairs = self._all_pairs(labels, L_mem, do_remove_self_comparisons)
            if pairs.self_offset is None and isinstance(self.loss, GenericPairLoss):
                return None  # the loss's own all pairs of embeddings with E_mem: the same pairs
            return pairs
        else:
            indices_tuple = self._all_pairs(labels, L_mem, do_remove_self_comparisons).materialize()

        if input_indices_tuple is not None:
            if len(input_indices_tuple) == 3 and len(indices_tuple) == 4:
                input_indices_tuple = lmu.convert_to_pairs(input_indices_tuple, labels)
            elif len(input_indices_tuple) == 4 and len(indices_tuple) == 3:
                input_indices_tuple = lmu.convert_to_triplets(input_indices_tuple, labels)
            indices_tuple = tuple(torch.cat([x, y.to(x.device)], dim=0)
                                  for x, y in zip(indices_tuple, input_indices_tuple))
        return indices_tuple

    def reset_queue(self):
        self.register_buffer("embedding_memory", torch.zeros(self.memory_size, self.embedding_size))
        self.register_buffer("label_memory", torch.zeros(self.memory_size).long())
        self.has_been_filled = False
        self.queue_idx = 0
