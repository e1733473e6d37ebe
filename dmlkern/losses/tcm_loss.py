"""ThresholdConsistentMarginLoss (PML 2.9.0, https://arxiv.org/abs/2307.04047): hinge means of
the positive pairs' cosine below margin_plus and the negative pairs' above margin_minus;
already reduced. Requires CosineSimilarity (the cosines are computed directly, as in PML; the
distance object is not called). All pairs run on row blocks without listing them
(`fused/tcm.py`, last_backend "blocked"); an indices_tuple's pairs (O(pairs D) as listed) run the
reference."""

from ..distances import CosineSimilarity
from ..fused.tcm import tcm as _fused
from ..reference.embedding_losses import require_distance
from ..reference.more_losses import tcm_loss_dict
from .base import BaseMetricLossFunction


class ThresholdConsistentMarginLoss(BaseMetricLossFunction):
    _labels_required = False

    def __init__(self, lambda_plus=1.0, lambda_minus=1.0, margin_plus=0.9, margin_minus=0.5, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "CosineSimilarity")
        self.lambda_plus = lambda_plus
        self.lambda_minus = lambda_minus
        self.margin_plus = margin_plus
        self.margin_minus = margin_minus

    def get_default_distance(self):
        return CosineSimilarity()

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return tcm_loss_dict(
            embeddings, labels, indices_tuple, ref_labels, lambda_plus=self.lambda_plus,
            lambda_minus=self.lambda_minus, margin_plus=self.margin_plus, margin_minus=self.margin_minus,
        )
