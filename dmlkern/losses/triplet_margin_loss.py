"""TripletMarginLoss (PML 2.9.0): ``relu(d_ap - d_an + margin)`` per triplet.

``swap`` uses ``min(d_an, d_pn)``; ``smooth_loss`` uses softplus; ``triplets_per_anchor`` is
"all" or the number of random triplets per anchor. Default reducer: AvgNonZeroReducer.
Over every triplet, or a TripletMarginMiner's result on the same inputs, the fused path
(`fused/triplet.py`) never lists the triplets.
"""

from ..fused.triplet import triplet_margin
from ..reducers import AvgNonZeroReducer
from ..reference import embedding_losses as R
from .base import BaseMetricLossFunction


class TripletMarginLoss(BaseMetricLossFunction):
    _labels_required = False

    def __init__(self, margin=0.05, swap=False, smooth_loss=False, triplets_per_anchor="all", **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss
        self.triplets_per_anchor = triplets_per_anchor
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return triplet_margin(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return R.triplet_margin_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels,
            margin=self.margin, swap=self.swap, smooth_loss=self.smooth_loss,
            triplets_per_anchor=self.triplets_per_anchor, distance=self.distance,
        )

    def get_default_reducer(self):
        return AvgNonZeroReducer()
