"""InstanceLoss (PML 2.9.0, Dual-Path Convolutional Image-Text Embeddings): per row, the
cross-entropy of gamma * cosine(row, batch) with the row's class index as the target column.
Labels required; no indices_tuple, no ref_emb (ValueError, as PML). Requires CosineSimilarity."""

from ..distances import CosineSimilarity
from ..fused.instance import instance
from ..reference.embedding_losses import require_distance
from ..reference.more_losses import instance_loss_dict
from ._classification_common import ref_not_supported
from ._unsupported import indices_tuple_not_supported
from .base import BaseMetricLossFunction


class InstanceLoss(BaseMetricLossFunction):
    _labels_required = True

    def __init__(self, gamma=64, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "CosineSimilarity")
        self.gamma = gamma
        self.add_to_recordable_attributes(list_of_names=["gamma"], is_stat=False)

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        indices_tuple_not_supported(indices_tuple)
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return instance(self, embeddings, labels)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return instance_loss_dict(embeddings, labels, gamma=self.gamma, distance=self.distance)

    def get_default_distance(self):
        return CosineSimilarity()
