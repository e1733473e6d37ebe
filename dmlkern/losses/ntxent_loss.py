"""NTXentLoss (PML 2.9.0), pair-based, cosine similarity by default.

Per positive pair (a, p): ``-log(e^{s_ap/t} / (e^{s_ap/t} + sum_{n: negatives of a} e^{s_an/t}))``;
other positives of a are not in the denominator; averaged over positive pairs. For SimCLR pass
``labels = cat([arange(N), arange(N)])``.
"""

from ..distances import CosineSimilarity
from ..fused import _stats as fused_stats
from ..fused.ntxent import ntxent
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class NTXentLoss(GenericPairLoss):
    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        self.temperature = temperature
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(ntxent, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.ntxent_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=self.temperature, distance=self.distance
        )

    def get_default_distance(self):
        return CosineSimilarity()
