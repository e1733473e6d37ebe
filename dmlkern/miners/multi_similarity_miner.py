import torch

from .._tracing import static_shapes
from ..distances import CosineSimilarity
from ..fused._common import engine_backend, is_unit_cosine
from ..fused.lazy_pairs import LazyMinedPairs
from ..reference.miners import multi_similarity_miner
from .base import BaseTupleMiner, LazyPairCounts


class MultiSimilarityMiner(LazyPairCounts, BaseTupleMiner):
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

    def get_default_distance(self):
        return CosineSimilarity()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return multi_similarity_miner(
            mat, labels, ref_labels, self.epsilon, self.distance.is_inverted, embeddings is ref_emb
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        lazy_ok = (not self.collect_stats and is_unit_cosine(self.distance) and torch.is_tensor(embeddings)
                   and engine_backend(embeddings, "auto") is not None)
        # (under torch.compile the counts are not kept)
        return self.lazy_or_forward(LazyMinedPairs, lazy_ok, embeddings, labels, ref_emb, ref_labels,
                                    keep_for_counts=not static_shapes())
