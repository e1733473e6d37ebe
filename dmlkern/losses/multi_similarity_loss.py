"""MultiSimilarityLoss (PML 2.9.0), mat-based, cosine similarity by default.

Per row: ``(1/alpha) log(1 + sum_p exp(-alpha (s_p - base))) + (1/beta) log(1 + sum_n
exp(beta (s_n - base)))``, averaged over all rows (rows without pairs count as 0). No mining
inside the loss (use MultiSimilarityMiner).
"""

from ..distances import CosineSimilarity
from ..fused import _stats as fused_stats
from ..fused.multi_similarity import multi_similarity
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class MultiSimilarityLoss(GenericPairLoss):
    def __init__(self, alpha=2, beta=50, base=0.5, **kwargs):
        super().__init__(mat_based_loss=True, **kwargs)
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.add_to_recordable_attributes(list_of_names=["alpha", "beta", "base"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(multi_similarity, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.multi_similarity_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            alpha=self.alpha, beta=self.beta, base=self.base, distance=self.distance,
        )

    def get_default_distance(self):
        return CosineSimilarity()
