"""HistogramLoss (PML 2.9.0, Learning Deep Embeddings with Histogram Loss): the probability that
a negative pair is more similar than a positive one, from soft histograms with bin width
``delta`` = 2 / ``n_bins`` (100 bins by default); already reduced. Labels or indices_tuple
required; no ref_emb. CosineSimilarity by default. With labels and no indices_tuple: row blocks
without an N x N matrix or a triplet list (`fused/ranking.py`, last_backend "blocked")."""

from .._validation import InvalidInputError
from ..distances import CosineSimilarity
from ..fused.ranking import histogram as _fused
from ..reference.ranking_losses import histogram_loss_dict
from ._classification_common import ref_not_supported
from .base import BaseMetricLossFunction


class HistogramLoss(BaseMetricLossFunction):
    _labels_required = False

    def __init__(self, n_bins: int = None, delta: float = None, **kwargs):
        super().__init__(**kwargs)
        if delta is not None and n_bins is not None and delta != 2 / n_bins:
            raise InvalidInputError(
                f"delta and n_bins must satisfy the equation delta = 2/n_bins.\n"
                f"Passed values are delta={delta} and n_bins={n_bins}"
            )
        if delta is None and n_bins is None:
            n_bins = 100
        self.delta = delta if delta is not None else 2 / n_bins
        self.add_to_recordable_attributes(name="delta", is_stat=False)

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return _fused(self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return histogram_loss_dict(embeddings, labels, indices_tuple, ref_emb, ref_labels, delta=self.delta,
                                   distance=self.distance)

    def get_default_distance(self):
        return CosineSimilarity()
