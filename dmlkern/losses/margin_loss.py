"""MarginLoss (PML 2.9.0): per triplet ``relu(d_ap - beta + margin) + relu(beta - d_an + margin)``.

Reduced by DivisorReducer over the number of non-zero terms. ``beta`` is one value or, with
``num_classes``, one per class (indexed by the anchor's label); ``learn_beta`` makes it a
Parameter and adds ``beta_reg_loss = beta * nu``.
"""

import torch

from ..fused import _stats as fused_stats
from ..fused.margin import margin
from ..reducers import DivisorReducer
from ..reference import embedding_losses as R
from .base import BaseMetricLossFunction


class MarginLoss(BaseMetricLossFunction):
    _labels_required = False

    def __init__(
        self, margin=0.2, nu=0, beta=1.2, triplets_per_anchor="all", learn_beta=False, num_classes=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.margin = margin
        self.nu = nu
        self.learn_beta = learn_beta
        self.initialize_beta(beta, num_classes)
        self.triplets_per_anchor = triplets_per_anchor
        self.add_to_recordable_attributes(list_of_names=["margin", "nu", "beta"], is_stat=False)

    def initialize_beta(self, beta, num_classes):
        b = R.make_margin_beta(beta, num_classes)
        self.beta = torch.nn.Parameter(b) if self.learn_beta else b

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        out = margin(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)
        if isinstance(out, tuple):  # PML calls the distance when there are triplets
            fused_stats.record_distance(self.distance, embeddings, ref_emb)
        return out

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.margin_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            margin=self.margin, nu=self.nu, beta=self.beta, learn_beta=self.learn_beta,
            triplets_per_anchor=self.triplets_per_anchor, distance=self.distance,
        )

    def _sub_loss_names(self):
        return ["margin_loss", "beta_reg_loss"]

    def get_default_reducer(self):
        return DivisorReducer()
