import torch

from ..distances import CosineSimilarity
from ..fused.proxy_anchor import proxy_anchor
from ..reducers import DivisorReducer
from ..reference.classification_losses import PROXY_ANCHOR_SUB_LOSSES, proxy_anchor_loss_dict
from ._classification_common import ClassWeightsMixin, fused_class_call, new_weight
from .base import BaseMetricLossFunction, TorchInitWrapper, WeightRegularizerMixin


class ProxyAnchorLoss(ClassWeightsMixin, WeightRegularizerMixin, BaseMetricLossFunction):
    """Proxy-Anchor loss (``proxies`` (C, D), init ``kaiming_normal_(mode="fan_out")``).

    Sub-losses ``pos_loss`` (divided by the number of proxies with a positive in the batch) and
    ``neg_loss`` (divided by ``num_classes``), DivisorReducer, CosineSimilarity. Miner weights
    enter additively (``w_i - 1`` inside the exponent), as in PML.
    """
    _class_weight = "proxies"
    _class_weight_rows = True

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, **kwargs):
        super().__init__(**kwargs)
        self.proxies = new_weight(num_classes, embedding_size)
        self.weight_init_func(self.proxies)
        self.num_classes = num_classes
        self.margin = margin
        self.alpha = alpha
        self.add_to_recordable_attributes(list_of_names=["num_classes", "alpha", "margin"], is_stat=False)

    def get_default_reducer(self):
        return DivisorReducer()

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_weight_init_func(self):
        return TorchInitWrapper(torch.nn.init.kaiming_normal_, mode="fan_out")

    def _sub_loss_names(self):
        return list(PROXY_ANCHOR_SUB_LOSSES)

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        return fused_class_call(self, lambda *args: proxy_anchor(*args, self.proxies), embeddings, labels,
                                indices_tuple, lambda: self.proxies)  # PML's distance(embeddings, proxies)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        self.cast_types(embeddings.dtype, embeddings.device)
        loss_dict = proxy_anchor_loss_dict(
            embeddings, labels, self.proxies, indices_tuple, margin=self.margin, alpha=self.alpha, distance=self.distance
        )
        self.add_weight_regularization_to_loss_dict(loss_dict)
        return loss_dict

    def get_logits(self, embeddings):
        return self.distance(embeddings, self.proxies)
