"""RankedListLoss (PML 2.9.0, https://arxiv.org/abs/1903.03238; defaults: RLL-Simpler): per query,
weighted hinge means over the positives farther than alpha - margin and the negatives closer
than alpha, mixed by ``imbalance``. Labels required; no indices_tuple, no ref_emb. Row blocks
without an N x N matrix (`fused/ranking.py`, last_backend "blocked")."""

import warnings

from .._validation import InvalidInputError
from ..fused.ranking import ranked_list as _fused
from ..reference.ranking_losses import ranked_list_loss_dict
from ._classification_common import ref_not_supported
from ._unsupported import indices_tuple_not_supported
from .base import BaseMetricLossFunction


class RankedListLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, margin, Tn, imbalance=0.5, alpha=None, Tp=0, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        if not 0 <= imbalance <= 1:
            raise InvalidInputError("Imbalance must be between 0 and 1")
        self.imbalance = imbalance
        self.alpha = alpha if alpha is not None else 1 + margin / 2
        if Tp > 5 or Tn > 5:
            warnings.warn("Values of Tp or Tn are too high. Too large temperature values may lead to overflow.")
        self.Tp = Tp
        self.Tn = Tn
        self.add_to_recordable_attributes(list_of_names=["imbalance", "alpha", "margin", "Tp", "Tn"], is_stat=False)

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        indices_tuple_not_supported(indices_tuple)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return ranked_list_loss_dict(embeddings, labels, margin=self.margin, imbalance=self.imbalance,
                                     alpha=self.alpha, Tp=self.Tp, Tn=self.Tn, distance=self.distance)
