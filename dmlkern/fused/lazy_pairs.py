"""The Multi-Similarity miner's result, kept lazy.

A fused MultiSimilarityLoss that receives it recomputes the miner's masks inside the kernel
from per-row extrema, so the pair indices are never built. Anything else that reads it (len,
indexing, unpacking, tuple()) gets PML-format index tensors, computed once on first use.
"""
from collections.abc import Sequence


class LazyMinedPairs(Sequence):
    def __init__(self, miner, embeddings, labels, ref_emb, ref_labels, materialize, given_labels=(None, None)):
        self.miner = miner
        self.embeddings = embeddings
        self.labels = labels  # int64 on the embeddings' device (as_class_ids)
        self.ref_emb = ref_emb
        self.ref_labels = ref_labels
        self.given_labels = given_labels  # (labels, ref_labels) as the caller passed them
        self._materialize = materialize
        self._pairs = None

    def materialize(self):
        """The (a1, p, a2, n) LongTensors, as PML's miner returns them."""
        if self._pairs is None:
            self._pairs = tuple(self._materialize())
        return self._pairs

    @property
    def is_materialized(self):
        return self._pairs is not None

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.materialize()[i]

    def __iter__(self):
        return iter(self.materialize())

    def __repr__(self):
        state = "materialized" if self.is_materialized else "lazy"
        return f"LazyMinedPairs({state}, epsilon={self.miner.epsilon})"
