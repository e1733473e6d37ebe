import torch

from ..reference.classification_losses import center_loss_dict, center_loss_update_
from ._classification_common import check_class_inputs
from .base import BaseMetricLossFunction


class CenterLoss(BaseMetricLossFunction):
    """Center loss (Wen et al. 2016, "A Discriminative Feature Learning Approach for Deep Face
    Recognition"); not in PML.

    loss = mean_i 0.5 * ||x_i - c_{y_i}||^2 (MeanReducer by default; miner weights from
    ``indices_tuple`` multiply each sample's term). ``centers`` (num_classes, embedding_size) is a
    buffer (zeros at start) that receives no gradient; in training mode every forward, after
    computing the loss with the current centers, updates it as

        delta_c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j]);  c_j <- c_j - alpha * delta_c_j

    (all samples of the batch, unweighted). In eval mode the centers are left unchanged. Usually
    combined with a softmax loss: ``SoftmaxLoss(...)(x, y) + lambda * CenterLoss(...)(x, y)``.
    """

    _labels_required = True
    _label_kind = "indices"  # labels index the class weights (base.py)

    def __init__(self, num_classes, embedding_size, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.alpha = alpha
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))

    def check_inputs(self, embeddings, labels, ref_emb, ref_labels):
        check_class_inputs(self, embeddings, labels, ref_emb, ref_labels, self.centers.shape[1])

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        if self.centers.dtype != embeddings.dtype or self.centers.device != embeddings.device:
            self.centers = self.centers.to(device=embeddings.device, dtype=embeddings.dtype)
        loss_dict = center_loss_dict(embeddings, labels, self.centers, indices_tuple)
        if self.training:
            center_loss_update_(self.centers, embeddings, labels, self.alpha)
        return loss_dict
