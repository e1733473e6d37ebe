import torch

from .._tracing import static_shapes
from ..distances import CosineSimilarity
from ..fused._common import engine_backend, is_unit_cosine
from ..fused.lazy_pairs import LazyMinedPairs
from ..reference.miners import multi_similarity_miner
from .base import BaseTupleMiner


def _counted_when_read(name):
    """A pair count PML records on every call. A lazy result is counted when the count is read:
    that materialises its pairs (PML's N x N cost, paid only by a caller who asks)."""
    def get(self):
        self._count_lazy_pairs()
        return getattr(self, "_" + name)

    def set(self, value):
        setattr(self, "_" + name, value)
    return property(get, set)


class MultiSimilarityMiner(BaseTupleMiner):
    """Multi-similarity pair mining (Wang et al. 2019); default distance CosineSimilarity.

    Where the fused engine can run (cosine distance, no collect_stats), forward returns a
    LazyMinedPairs: PML's (a1, p, a2, n) tuple whose tensors are computed only when something
    reads them; a fused MultiSimilarityLoss given it mines inside its kernel instead
    (dmlkern/fused/lazy_pairs.py).
    """

    def __init__(self, epsilon=0.1, **kwargs):
        self._uncounted = None  # the last lazy result, until num_pos_pairs / num_neg_pairs are read
        super().__init__(**kwargs)
        self.epsilon = epsilon
        self.add_to_recordable_attributes(name="epsilon", is_stat=False)

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

    def get_default_distance(self):
        return CosineSimilarity()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return multi_similarity_miner(
            mat, labels, ref_labels, self.epsilon, self.distance.is_inverted, embeddings is ref_emb
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self._uncounted = None  # this call's counts replace the last lazy result's
        lazy_ok = (not self.collect_stats and is_unit_cosine(self.distance) and torch.is_tensor(embeddings)
                   and engine_backend(embeddings, "auto") is not None)
        if not lazy_ok:
            return super().forward(embeddings, labels, ref_emb, ref_labels)
        lazy = self.lazy_forward(LazyMinedPairs, embeddings, labels, ref_emb, ref_labels)
        if not static_shapes():  # (under torch.compile the counts are not kept)
            self._uncounted = lazy
        return lazy
