"""AngularLoss (PML 2.9.0): requires normalised LpDistance(p=2, power=1); labels required.

Per positive pair (a, p), over all ref items with another label:
``log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p).x_n - 2 (1 + tan^2(alpha)) x_a.x_p))`` with x_n the
raw (un-normalised) ref embedding, as in PML. ``alpha`` given in degrees, stored in radians as a
float64 0-dim tensor (as PML does). Fused: dmlkern/fused/angular.py (class blocks of Gram
products, or an indices_tuple's pairs listed).
"""

import math

import torch

from ..fused.angular import angular
from ..fused.lazy_pairs import LazyMined
from ..reference import embedding_losses as R
from ._stats import angular_loss_average_angle
from .base import BaseMetricLossFunction


class AngularLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, alpha=40, **kwargs):
        super().__init__(**kwargs)
        R.require_distance("AngularLoss", self.distance, "LpDistance", p=2, power=1, normalize_embeddings=True)
        self.alpha = torch.tensor(math.radians(alpha), dtype=torch.float64)
        self.add_to_recordable_attributes(list_of_names=["alpha"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["average_angle"], is_stat=True)

    def _record_stats(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.reset_stats()
        if self.collect_stats and labels is not None:
            average_angle = angular_loss_average_angle(embeddings, labels, indices_tuple, ref_emb, ref_labels, self.distance)
            if average_angle is not None:
                self.average_angle = average_angle

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if isinstance(indices_tuple, LazyMined):  # a miner's pairs or triplets: listed
            indices_tuple = tuple(t.to(embeddings.device) for t in indices_tuple.materialize())
        out = angular(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if out is not None:
            self._record_stats(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return out

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self._record_stats(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        return R.angular_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, alpha=float(self.alpha), distance=self.distance
        )
