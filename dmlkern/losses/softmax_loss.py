from ..fused.margin_softmax import softmax
from ..reference.classification_losses import softmax_loss_dict
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, WeightRegularizerMixin


class SoftmaxLoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """Plain softmax cross-entropy on a bias-free linear classifier ``W`` (D, C):
    ``mean_i CE(x_i W, y_i)`` (raw embeddings, no normalisation; init ``normal_``; not in PML)."""
    _small_problems_to_reference = True

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.W = new_weight(embedding_size, num_classes)
        self.weight_init_func(self.W)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        return fused_class_call(self, softmax, embeddings, labels, indices_tuple)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        loss_dict = softmax_loss_dict(embeddings, labels, self.W, indices_tuple)
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return embeddings @ self.W
