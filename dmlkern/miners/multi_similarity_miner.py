import torch

from .._validation import as_class_ids, validate_inputs
from ..distances import CosineSimilarity
from ..fused._common import engine_backend, is_unit_cosine
from ..fused.lazy_pairs import LazyMinedPairs
from ..reference.miners import multi_similarity_miner
from .base import BaseTupleMiner


class MultiSimilarityMiner(BaseTupleMiner):
    """Multi-similarity pair mining (Wang et al. 2019); default distance CosineSimilarity.

    Where the fused engine can run (cosine distance, no collect_stats), forward returns a
    LazyMinedPairs: a fused MultiSimilarityLoss given it mines inside its kernel; anything else
    that reads it gets the same PML-format (a1, p, a2, n) tensors, built on first use.
    """

    def __init__(self, epsilon=0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

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
        if not lazy_ok:
            return super().forward(embeddings, labels, ref_emb, ref_labels)
        with torch.no_grad():
            validate_inputs(embeddings, labels, None, ref_emb, ref_labels, labels_required=True)
        # Kept as the loss will see them (int64, on the embeddings' device), and the caller's
        # tensor too: a loss given that very tensor takes these (the identity check the fused
        # loss makes under torch.compile).
        ids = as_class_ids(labels, embeddings.device)
        ref_ids = as_class_ids(ref_labels, embeddings.device)
        return LazyMinedPairs(self, embeddings, ids, ref_emb, ref_ids,
                              lambda: super(MultiSimilarityMiner, self).forward(embeddings, labels, ref_emb, ref_labels),
                              given_labels=(labels, ref_labels))
