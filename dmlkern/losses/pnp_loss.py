"""PNPLoss (PML 2.9.0, https://github.com/interestingzhuo/PNPloss): per query, the mean over its
positives of a function (``variant``) of the smoothed number of negatives ranked above each;
already reduced. Labels required; no indices_tuple, no ref_emb. Requires CosineSimilarity.
The fused path (`fused/pnp.py`, last_backend "blocked") walks row blocks, O(B P N) for classes of
at most P rows; the reference holds (positive pairs, N) instead of PML's several (N, N, N)."""

from ..distances import CosineSimilarity
from ..fused.pnp import pnp as _fused
from ..reference.embedding_losses import require_distance
from ..reference.ranking_losses import pnp_loss_dict, pnp_sigmoid
from ._classification_common import ref_not_supported
from ._unsupported import indices_tuple_not_supported
from .base import BaseMetricLossFunction


class PNPLoss(BaseMetricLossFunction):
    VARIANTS = ["Ds", "Dq", "Iu", "Ib", "O"]
    _labels_required = True

    def __init__(self, b=2, alpha=1, anneal=0.01, variant="O", **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "CosineSimilarity")
        self.b = b
        self.alpha = alpha
        self.anneal = anneal
        self.variant = variant
        if self.variant not in self.VARIANTS:
            raise ValueError(f"variant={variant} but must be one of {self.VARIANTS}")

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        indices_tuple_not_supported(indices_tuple)
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return pnp_loss_dict(embeddings, labels, b=self.b, alpha=self.alpha, anneal=self.anneal,
                             variant=self.variant, distance=self.distance)

    def sigmoid(self, tensor, temp=1.0):
        return pnp_sigmoid(tensor, temp)

    def get_default_distance(self):
        return CosineSimilarity()
