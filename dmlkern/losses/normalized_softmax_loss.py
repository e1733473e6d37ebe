import torch

from ..distances import DotProductSimilarity
from ..fused.margin_softmax import normalized_softmax
from ..reference.classification_losses import normalized_softmax_logits, normalized_softmax_loss_dict
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, WeightRegularizerMixin


class NormalizedSoftmaxLoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """NormSoftmax: ``CE(x_hat . W_hat / temperature, y)``; ``W`` (D, C), init ``normal_``;
    default distance DotProductSimilarity (normalising)."""
    _small_problems_to_reference = True

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, temperature=0.05, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.add_to_recordable_attributes(list_of_names=["embedding_size", "num_classes", "temperature"], is_stat=False)
        self.W = new_weight(embedding_size, num_classes)
        self.weight_init_func(self.W)
        self.cross_entropy = torch.nn.CrossEntropyLoss(reduction="none")

    def get_default_distance(self):
        return DotProductSimilarity()

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        return fused_class_call(self, normalized_softmax, embeddings, labels, indices_tuple,
                                lambda: self.distance.normalize(self.W, dim=0).t())  # PML's distance(embeddings, W_hat.t())

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        loss_dict = normalized_softmax_loss_dict(
            embeddings, labels, self.W, indices_tuple, temperature=self.temperature, distance=self.distance
        )
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return normalized_softmax_logits(embeddings, self.W, temperature=self.temperature, distance=self.distance)
