"""TupletMarginLoss (PML 2.9.0), pair-based, requires CosineSimilarity.

Per positive pair: ``log(1 + sum_{negatives of a} exp(scale (s_an - cos(acos(s_ap) - margin))))``,
``margin`` given in degrees (stored in radians, as PML does).
"""

import math

import torch

from ..distances import CosineSimilarity
from ..fused import _stats as fused_stats
from ..fused.tuplet import tuplet_margin
from ..reference import embedding_losses as R
from ._stats import degrees_mean_acos
from .base import GenericPairLoss


class TupletMarginLoss(GenericPairLoss):
    def __init__(self, margin=5.73, scale=64, **kwargs):
        super().__init__(mat_based_loss=False, **kwargs)
        R.require_distance("TupletMarginLoss", self.distance, "CosineSimilarity")
        self.margin = math.radians(margin)
        self.scale = scale
        self.add_to_recordable_attributes(list_of_names=["margin", "scale"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["avg_pos_angle", "avg_neg_angle"], is_stat=True)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(tuplet_margin, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.reset_stats()
        if self.collect_stats:
            self._set_stats(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return R.tuplet_margin_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            margin=self.margin, scale=self.scale, distance=self.distance,
        )

    @torch.no_grad()
    def _set_stats(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """avg_pos_angle / avg_neg_angle: the mean angle of the positive / negative pairs (the
        similarity matrix is built once more, only with collect_stats)."""
        setup = R.pair_setup(embeddings, labels, indices_tuple, ref_emb, ref_labels, self.distance)
        if setup is not None and len(setup[1][0]) > 0 and len(setup[1][2]) > 0:
            mat, (a1, p, a2, n) = setup
            self.avg_pos_angle = degrees_mean_acos(mat[a1, p])
            self.avg_neg_angle = degrees_mean_acos(mat[a2, n])

    def get_default_distance(self):
        return CosineSimilarity()
