"""P2SGradLoss (PML 2.9.0, https://arxiv.org/abs/1905.02479): mean squared error between
cos(x, W_c) and the one-hot labels. ``weight`` (descriptors_dim, num_classes), its columns
renormalised to unit length at init and at every call (as PML). Labels required; no
indices_tuple, no ref_emb."""

import torch

from ..fused.p2s_grad import p2s_grad
from ..reference.more_losses import check_unit_columns, p2sgrad_loss_dict
from ._classification_common import ref_not_supported
from ._unsupported import indices_tuple_not_supported
from .base import BaseMetricLossFunction


class P2SGradLoss(BaseMetricLossFunction):
    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, descriptors_dim, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.descriptors_dim = descriptors_dim
        self.num_classes = num_classes
        self.weight = torch.nn.Parameter(torch.Tensor(descriptors_dim, num_classes))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
        self.m_loss = torch.nn.MSELoss()

    def check_unsupported(self, embeddings, indices_tuple, labels, ref_emb, ref_labels):
        ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        indices_tuple_not_supported(indices_tuple)

    def _renormed_weight(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        """PML's in-place renormalisation of the weight's columns (every call, once)."""
        w = self.weight.data.renorm(2, 1, 1e-5).mul(1e5)
        self.weight.data = w.to(device=embeddings.device, dtype=embeddings.dtype)
        return self.weight

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        weight = self._renormed_weight(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        check_unit_columns(weight, embeddings.dtype)
        result = p2s_grad(self, embeddings, labels, weight)
        self._renormed_this_call = result is None  # compute_loss runs next: don't renormalise twice
        return result

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if not getattr(self, "_renormed_this_call", False):
            self._renormed_weight(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self._renormed_this_call = False
        return p2sgrad_loss_dict(embeddings, labels, self.weight)
