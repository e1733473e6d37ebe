"""SignalToNoiseRatioContrastiveLoss (PML 2.9.0): ContrastiveLoss on SNRDistance (required)."""

from ..distances import SNRDistance
from ..reference.embedding_losses import require_distance
from .base import BaseMetricLossFunction
from .contrastive_loss import ContrastiveLoss


class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    # The fused Contrastive kernels take Lp / cosine distances only: the reference runs.
    fused_loss_dict = BaseMetricLossFunction.fused_loss_dict

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "SNRDistance")

    def get_default_distance(self):
        return SNRDistance()
