"""ContrastiveLoss (PML 2.9.0): pos ``relu(d - pos_margin)``, neg ``relu(neg_margin - d)``.

The distance is not squared. Two sub-losses, ``pos_loss`` and ``neg_loss``, each reduced by
AvgNonZeroReducer (by default) and summed.
"""

from ..fused import _stats as fused_stats
from ..fused.contrastive import contrastive
from ..reducers import AvgNonZeroReducer
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class ContrastiveLoss(GenericPairLoss):
    def __init__(self, pos_margin=0, neg_margin=1, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(contrastive, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.contrastive_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            pos_margin=self.pos_margin, neg_margin=self.neg_margin, distance=self.distance,
        )

    def get_default_reducer(self):
        return AvgNonZeroReducer()

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]
