import math

import torch

from .._validation import InvalidInputError
from ..distances import CosineSimilarity
from ..fused.grouped_classes import soft_triple
from ..reference.classification_losses import soft_triple_logits, soft_triple_loss_dict
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, TorchInitWrapper, WeightRegularizerMixin


class SoftTripleLoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """SoftTriple loss (``fc`` (D, C*K), init ``kaiming_uniform_(a=sqrt(5))``).

    As in PML, the attribute ``gamma`` holds ``1 / gamma``. The paper's center regulariser is
    not built in: pass ``weight_regularizer=..., weight_reg_weight=tau`` (applied to ``fc.t()``).
    """
    _small_problems_to_reference = True
    _class_weight = "fc"

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, centers_per_class=10, la=20, gamma=0.1, margin=0.01, **kwargs):
        super().__init__(**kwargs)
        if not self.distance.is_inverted:
            raise InvalidInputError("SoftTripleLoss requires a similarity (distance.is_inverted)")
        self.la = la
        self.gamma = 1.0 / gamma  # PML stores the inverse
        self._gamma = gamma
        self.margin = margin
        self.num_classes = num_classes
        self.centers_per_class = centers_per_class
        self.embedding_size = embedding_size
        self.add_to_recordable_attributes(list_of_names=["la", "gamma", "margin", "centers_per_class", "num_classes", "embedding_size"], is_stat=False)
        self.fc = new_weight(embedding_size, num_classes * centers_per_class)
        self.weight_init_func(self.fc)

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_weight_init_func(self):
        return TorchInitWrapper(torch.nn.init.kaiming_uniform_, a=math.sqrt(5))

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        return fused_class_call(self, soft_triple, embeddings, labels, indices_tuple,
                                lambda: self.fc.t())  # PML's loss always calls distance(embeddings, fc.t())

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        loss_dict = soft_triple_loss_dict(
            embeddings, labels, self.fc, indices_tuple, num_classes=self.num_classes,
            centers_per_class=self.centers_per_class, la=self.la, gamma=self._gamma,
            margin=self.margin, distance=self.distance,
        )
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return soft_triple_logits(
            embeddings, self.fc, num_classes=self.num_classes, centers_per_class=self.centers_per_class,
            gamma=self._gamma, distance=self.distance,
        )
