import torch

from ..fused import margin_softmax
from ..reference import classification_losses as ref
from .large_margin_softmax_loss import LargeMarginSoftmaxLoss


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    """SphereFace (A-Softmax): L-Softmax's target, logits scaled by ``||x_i||_2 * scale`` only."""

    _fused_path = staticmethod(margin_softmax.sphereface)

    def _loss_dict(self, embeddings, labels, indices_tuple):
        return ref.sphereface_loss_dict(
            embeddings, labels, self.W, indices_tuple, margin=self.margin, scale=self.scale, distance=self.distance
        )

    def scale_logits(self, logits, embeddings):
        return logits * torch.norm(embeddings, p=2, dim=1).unsqueeze(1) * self.scale
