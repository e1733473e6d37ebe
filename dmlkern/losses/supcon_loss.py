"""SupConLoss (PML 2.9.0), mat-based, cosine similarity by default.

Per anchor: ``-(1/|P|) sum_p [s_p/t - log sum_{k in P u N} e^{s_k/t}]``, reduced by
AvgNonZeroReducer. Zero unless the batch has at least one positive and one negative pair.
"""

from ..distances import CosineSimilarity
from ..reducers import AvgNonZeroReducer
from ..fused import _stats as fused_stats
from ..fused._common import small_problem
from ..fused.supcon import supcon
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class SupConLoss(GenericPairLoss):
    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(mat_based_loss=True, **kwargs)
        self.temperature = temperature
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def small_problem_reason(self, embeddings, ref_emb):
        return small_problem(embeddings, ref_emb, "supcon")

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(supcon, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.supcon_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, temperature=self.temperature, distance=self.distance
        )

    def get_default_reducer(self):
        return AvgNonZeroReducer()

    def get_default_distance(self):
        return CosineSimilarity()
