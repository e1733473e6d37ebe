"""IntraPairVarianceLoss (PML 2.9.0): pair-based; per pair, the squared relu of its deviation
from its side's mean (with pos_eps / neg_eps). Sub-losses ``pos_loss`` and ``neg_loss``;
CosineSimilarity and MeanReducer by default. All pairs run on row blocks without an N x M matrix
(`fused/intra_pair_variance.py`, last_backend "blocked"; also CrossBatchMemory's lazy all pairs); any
other indices_tuple runs the reference."""

from ..distances import CosineSimilarity
from ..fused import _stats as fused_stats
from ..fused.intra_pair_variance import intra_pair_variance
from ..reference.more_losses import intra_pair_variance_loss_dict
from .base import GenericPairLoss


class IntraPairVarianceLoss(GenericPairLoss):
    def __init__(self, pos_eps=0.01, neg_eps=0.01, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        self.pos_eps = pos_eps
        self.neg_eps = neg_eps
        self.add_to_recordable_attributes(list_of_names=["pos_eps", "neg_eps"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(intra_pair_variance, self, embeddings, labels, indices_tuple, ref_emb,
                                     ref_labels)

    def _compute_loss(self, pos_pairs, neg_pairs, indices_tuple):
        return intra_pair_variance_loss_dict(
            pos_pairs, neg_pairs, indices_tuple, pos_eps=self.pos_eps, neg_eps=self.neg_eps,
            is_inverted=self.distance.is_inverted,
        )

    def _sub_loss_names(self):
        return ["pos_loss", "neg_loss"]

    def get_default_distance(self):
        return CosineSimilarity()
