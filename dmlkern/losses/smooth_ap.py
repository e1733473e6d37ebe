"""SmoothAPLoss (PML 2.9.0, https://arxiv.org/abs/2007.12163): 1 - SmoothAP per query (sub-loss
``ap_loss``), times its miner weight. Labels required, every class equally frequent (ValueError
otherwise); no ref_emb. PML's layout rule is kept: see ``reference.ranking_losses.smooth_ap_loss_dict``.
Requires CosineSimilarity. Memory: the fused path (`fused/ranking.py`, last_backend "blocked")
evaluates blocks of anchors, O(B g N) for g rows per group; the reference (N, g, N) instead of
PML's several (N, N, N)."""

from ..distances import CosineSimilarity
from ..fused.ranking import smooth_ap as _fused
from ..reference.embedding_losses import require_distance
from ..reference.ranking_losses import smooth_ap_loss_dict
from ._classification_common import ref_not_supported
from .base import BaseMetricLossFunction


class SmoothAPLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, temperature=0.01, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "CosineSimilarity")
        self.temperature = temperature

    def get_default_distance(self):
        return CosineSimilarity()

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return smooth_ap_loss_dict(embeddings, labels, indices_tuple, temperature=self.temperature, distance=self.distance)
