import torch

from ..distances import LpDistance
from ..fused.proxy_nca import proxy_nca
from ..fused._epilogue import reduces_empty_on_graph, returns_loss_dict
from ..reference.classification_losses import proxy_nca_loss_dict
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, WeightRegularizerMixin


class ProxyNCALoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """NCA against one learnable proxy per class (``proxies`` (C, D), init ``normal_``).

    Default distance: normalised squared Euclidean (``LpDistance(power=2)``); MeanReducer.
    The softmax denominator includes the positive proxy (as PML codes it).
    """
    _small_problems_to_reference = True
    _class_weight = "proxies"
    _class_weight_rows = True

    _labels_required = True
    _label_kind = "class_ids"  # labels compared with the class indices, as PML (base.py)

    def __init__(self, num_classes, embedding_size, softmax_scale=1, **kwargs):
        super().__init__(**kwargs)
        self.softmax_scale = softmax_scale
        self.num_classes = num_classes
        self.add_to_recordable_attributes(list_of_names=["softmax_scale", "num_classes"], is_stat=False)
        self.proxies = new_weight(num_classes, embedding_size)
        self.weight_init_func(self.proxies)
        self.proxy_labels = torch.arange(num_classes)

    def get_default_distance(self):
        return LpDistance(power=2)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        return fused_class_call(self, proxy_nca, embeddings, labels, indices_tuple,
                                lambda: self.proxies)  # PML's loss always calls distance(embeddings, proxies)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        loss_dict = proxy_nca_loss_dict(
            embeddings, labels, self.proxies, indices_tuple, softmax_scale=self.softmax_scale, distance=self.distance,
            empty_entry=returns_loss_dict(self), zero_on_graph=reduces_empty_on_graph(self),
        )
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return self.distance(embeddings, self.proxies)
