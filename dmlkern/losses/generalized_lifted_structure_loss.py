"""GeneralizedLiftedStructureLoss (PML 2.9.0), mat-based (Hermans et al., page 4).

Per row: ``relu(log sum_p exp(d_p - pos_margin) + log sum_n exp(neg_margin - d_n))``, averaged
over all rows.
"""

from ..fused import _stats as fused_stats
from ..fused.generalized_lifted import generalized_lifted_structure
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class GeneralizedLiftedStructureLoss(GenericPairLoss):
    def __init__(self, neg_margin=1, pos_margin=0, **kwargs):
        super().__init__(mat_based_loss=True, **kwargs)
        self.neg_margin = neg_margin
        self.pos_margin = pos_margin
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(generalized_lifted_structure, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.generalized_lifted_structure_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            neg_margin=self.neg_margin, pos_margin=self.pos_margin, distance=self.distance,
        )
