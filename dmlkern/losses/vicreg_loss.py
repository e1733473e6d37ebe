"""VICRegLoss (PML 2.9.0): invariance, variance and covariance terms of two views
(``loss(embeddings, ref_emb=...)``), four sub-losses each reduced by MeanReducer and summed. No
labels, no indices_tuple, no distance and no embedding regularizer (ValueError, as PML). A batch of
one row gives the grad-carrying zero (PML: NaN, the variance of one sample)."""

from ..reference.more_losses import vicreg_loss_dict
from ._unsupported import indices_tuple_not_supported, labels_not_supported
from .base import BaseMetricLossFunction


class VICRegLoss(BaseMetricLossFunction):
    def __init__(self, invariance_lambda=25, variance_mu=25, covariance_v=1, eps=1e-4, **kwargs):
        if "distance" in kwargs:
            raise ValueError("VICRegLoss cannot use a distance function")
        if "embedding_regularizer" in kwargs:
            raise ValueError("VICRegLoss cannot use a regularizer")
        super().__init__(**kwargs)
        self.invariance_lambda = invariance_lambda
        self.variance_mu = variance_mu
        self.covariance_v = covariance_v
        self.eps = eps

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        indices_tuple_not_supported(indices_tuple)
        labels_not_supported(labels, ref_labels)
        if embeddings.shape[0] < 2:
            return self.zero_losses()
        return vicreg_loss_dict(
            embeddings, ref_emb, invariance_lambda=self.invariance_lambda, variance_mu=self.variance_mu,
            covariance_v=self.covariance_v, eps=self.eps,
        )

    def _sub_loss_names(self):
        return ["invariance_loss", "variance_loss1", "variance_loss2", "covariance_loss"]
