"""Miner base classes (PML 2.9.0 API).

``miner(embeddings, labels, ref_emb=None, ref_labels=None)`` runs under ``torch.no_grad()`` and
returns LongTensor index tuples: triplets ``(a, p, n)`` or pairs ``(a1, p, a2, n)`` (empty tensors
when nothing qualifies). Without ``ref_emb`` the batch is compared with itself and the trivial
pairs (i, i) are excluded; with ``ref_emb`` but no ``ref_labels``, ``labels`` also label the
reference rows (as in PML).

Statistics (PML's): ``num_pos_pairs`` / ``num_neg_pairs`` / ``num_triplets`` are set on every
call; with ``collect_stats=True`` (or ``dmlkern.utils.common_functions.COLLECT_STATS``) they and
the miner's own statistics (``_record_these_stats``) are reset to 0 at the start of each call.
"""

import torch

from .._tracing import forward_ad_active
from .._validation import InvalidInputError, class_id_pair, validate_inputs
from ..distances import LpDistance
from ..utils.common_functions import RecordsMixin

__all__ = ["BaseMiner", "BaseTupleMiner"]


class BaseMiner(RecordsMixin, torch.nn.Module):
    def __init__(self, distance=None, collect_stats=None, **kwargs):
        super().__init__(**kwargs)
        self._init_records(collect_stats)
        self.distance = self.get_default_distance() if distance is None else distance
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0
        self.num_triplets = 0
        self.add_to_recordable_attributes(
            list_of_names=["num_pos_pairs", "num_neg_pairs", "num_triplets"], is_stat=True
        )

    def get_default_distance(self):
        return LpDistance(p=2)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        raise NotImplementedError

    def _require_distance(self, cls, **attrs):
        ok = isinstance(self.distance, cls) and all(getattr(self.distance, k) == v for k, v in attrs.items())
        if not ok:
            want = ", ".join(f"{k}={v}" for k, v in attrs.items())
            raise InvalidInputError(f"{type(self).__name__} requires the distance to be {cls.__name__}({want})")

    def output_assertion(self, output):
        if len(output) == 3:
            self.num_triplets = len(output[0])
            if not (len(output[0]) == len(output[1]) == len(output[2])):
                raise RuntimeError("miner returned triplet tensors of different lengths")
        elif len(output) == 4:
            self.num_pos_pairs, self.num_neg_pairs = len(output[0]), len(output[2])
            if len(output[0]) != len(output[1]) or len(output[2]) != len(output[3]):
                raise RuntimeError("miner returned pair tensors of different lengths")
        else:
            raise TypeError("a miner must return 3 (triplets) or 4 (pairs) tensors")

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self.reset_stats()
        if forward_ad_active():
            # forward-mode AD (torch.func.jvp): mining returns indices, so no tangent is needed, and
            # the blocked miners' products into buffers (out=) take none
            embeddings, ref_emb = embeddings.detach(), None if ref_emb is None else ref_emb.detach()
        with torch.no_grad():
            validate_inputs(embeddings, labels, None, ref_emb, ref_labels, labels_required=True)
            labels, ref_labels = class_id_pair(labels, None if ref_emb is None else ref_labels, embeddings.device)
            if ref_emb is None:
                ref_emb, ref_labels = embeddings, labels
            out = self.mine(embeddings, labels, ref_emb, ref_labels)
        self.output_assertion(out)
        return out

    def lazy_or_forward(self, lazy_type, lazy_ok, embeddings, labels, ref_emb, ref_labels, keep_for_counts=True):
        """forward's result: a `lazy_type` where lazy_ok, else the indices. The lazy result is kept
        in `_uncounted` (keep_for_counts) until the miner's counts are read."""
        self._uncounted = None  # this call's counts replace the last lazy result's
        if not lazy_ok:
            return BaseMiner.forward(self, embeddings, labels, ref_emb, ref_labels)
        lazy = self.lazy_forward(lazy_type, embeddings, labels, ref_emb, ref_labels)
        if keep_for_counts:
            self._uncounted = lazy
        return lazy

    def lazy_forward(self, lazy_type, embeddings, labels, ref_emb, ref_labels):
        """forward's checks and label mapping, then a `lazy_type` (fused/lazy_pairs.py) instead of the
        indices: a snapshot of the inputs, mined only when something reads it."""
        from .._tracing import static_shapes

        self.reset_stats()
        with torch.no_grad():
            validate_inputs(embeddings, labels, None, ref_emb, ref_labels, labels_required=True)
            # As the loss will see them (int64, on the embeddings' device); a loss given the caller's
            # very tensor takes these (the identity check the fused loss makes under torch.compile).
            # one id mapping for both (float labels: ids equal where PML's == holds)
            ids, ref_ids = class_id_pair(labels, None if ref_emb is None else ref_labels, embeddings.device)
            lazy = lazy_type(self, embeddings, ids, ref_emb, ref_ids, given_labels=(labels, ref_labels))
            if self.distance.collect_stats and not static_shapes():  # PML's miner calls its distance
                self.distance.record_stats(embeddings, embeddings if ref_emb is None else ref_emb)
        return lazy


class BaseTupleMiner(BaseMiner):
    """A miner returning pair or triplet index tuples (every miner here)."""


def _counted_when_read(name):
    """A pair count PML records on every call. A lazy result is counted when the count is read:
    that materialises its pairs (PML's cost, paid only by a caller who asks)."""
    def get(self):
        self._count_lazy_pairs()
        return getattr(self, "_" + name)

    def set(self, value):
        setattr(self, "_" + name, value)
    return property(get, set)


class LazyPairCounts:
    """For a pair miner whose forward may return a lazy tuple (fused/lazy_pairs.py): its
    num_pos_pairs / num_neg_pairs, counted from the last lazy result when read (listing it), and
    pickled as PML holds them. Set `self._uncounted = None` before BaseMiner.__init__ runs."""

    num_pos_pairs = _counted_when_read("num_pos_pairs")
    num_neg_pairs = _counted_when_read("num_neg_pairs")

    def _count_lazy_pairs(self):
        lazy, self._uncounted = self._uncounted, None
        if lazy is not None:
            self.output_assertion(lazy.materialize())

    def __getstate__(self):
        """pickle / deepcopy: the counts PML would hold, not the last lazy result."""
        self._count_lazy_pairs()
        return super().__getstate__()
