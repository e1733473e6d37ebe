"""TupletMarginLoss (PML 2.9.0), pair-based, requires CosineSimilarity.

Per positive pair: ``log(1 + sum_{negatives of a} exp(scale (s_an - cos(acos(s_ap) - margin))))``,
``margin`` given in degrees (stored in radians, as PML does).
"""

import math

from ..distances import CosineSimilarity
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class TupletMarginLoss(GenericPairLoss):
    def __init__(self, margin=5.73, scale=64, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        R.require_distance("TupletMarginLoss", self.distance, "CosineSimilarity")
        self.margin = math.radians(margin)
        self.scale = scale

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.tuplet_margin_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            margin=self.margin, scale=self.scale, distance=self.distance,
        )

    def get_default_distance(self):
        return CosineSimilarity()
