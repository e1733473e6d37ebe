"""FastAPLoss (PML 2.9.0, https://github.com/kunhe/FastAP-metric-learning): per query with a
positive, 1 - FastAP from soft histograms of its distances (``num_bins``), times its miner
weight (from ``indices_tuple``). Labels required, no ref_emb. Requires a normalised
LpDistance(p=2) (default: power=2). Power 1 or 2 (a listed indices_tuple too) runs on row blocks
without an N x N matrix (`fused/ranking.py`, last_backend "blocked")."""

from ..distances import LpDistance
from ..fused.ranking import fast_ap as _fused
from ..reference.embedding_losses import require_distance
from ..reference.ranking_losses import fast_ap_loss_dict
from ._classification_common import ref_not_supported
from .base import BaseMetricLossFunction


class FastAPLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, num_bins=10, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "LpDistance", normalize_embeddings=True, p=2)
        self.num_bins = int(num_bins)
        self.num_edges = self.num_bins + 1
        self.add_to_recordable_attributes(list_of_names=["num_bins"], is_stat=False)

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fast_ap_loss_dict(embeddings, labels, indices_tuple, num_bins=self.num_bins, distance=self.distance)

    def get_default_distance(self):
        return LpDistance(power=2)
