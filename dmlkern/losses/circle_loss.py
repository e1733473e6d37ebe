"""CircleLoss (PML 2.9.0), mat-based, requires CosineSimilarity; AvgNonZeroReducer by default.

Per row: ``softplus(logsumexp_p(-gamma [1+m-s_p]_+ (s_p-1+m)) + logsumexp_n(gamma [s_n+m]_+ (s_n-m)))``
with detached weights; rows lacking a positive or a negative give 0.
"""

from ..distances import CosineSimilarity
from ..fused import _stats as fused_stats
from ..fused.circle import circle
from ..fused.listed_pairs import listed_circle
from ..reducers import AvgNonZeroReducer
from ..reference import embedding_losses as R
from .base import GenericPairLoss


class CircleLoss(GenericPairLoss):
    def __init__(self, m=0.4, gamma=80, **kwargs):
        super().__init__(mat_based_loss=True, **kwargs)
        R.require_distance("CircleLoss", self.distance, "CosineSimilarity")
        self.m = m
        self.gamma = gamma
        self.op = 1 + self.m
        self.on = -self.m
        self.delta_p = 1 - self.m
        self.delta_n = self.m
        self.add_to_recordable_attributes(list_of_names=["m", "gamma", "op", "on", "delta_p", "delta_n"], is_stat=False)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # all pairs: one lse2 pass on the engine; an indices_tuple: only its pairs
        fused = circle if indices_tuple is None else listed_circle
        return fused_stats.pair_loss(fused, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # op, on, delta_p, delta_n as PML reads them: the attributes at call time
        return R.circle_loss_dict(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, m=self.m, gamma=self.gamma, distance=self.distance,
            op=self.op, on=self.on, delta_p=self.delta_p, delta_n=self.delta_n,
        )

    def get_default_reducer(self):
        return AvgNonZeroReducer()

    def get_default_distance(self):
        return CosineSimilarity()
