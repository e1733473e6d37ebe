from ..fused import margin_softmax
from ..reference import classification_losses as ref
from .large_margin_softmax_loss import LargeMarginSoftmaxLoss


class CosFaceLoss(LargeMarginSoftmaxLoss):
    """CosFace / AM-Softmax: ``CE(scale * (cos - margin * onehot(y)), y)``."""

    def __init__(self, *args, margin=0.35, scale=64, **kwargs):
        super().__init__(*args, margin=margin, scale=scale, **kwargs)

    def init_margin(self):
        pass

    _fused_path = staticmethod(margin_softmax.cosface)

    def _loss_dict(self, embeddings, labels, indices_tuple):
        return ref.cosface_loss_dict(
            embeddings, labels, self.W, indices_tuple, margin=self.margin, scale=self.scale, distance=self.distance
        )

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        return cosine_of_target_classes - self.margin

    def scale_logits(self, logits, *_):
        return logits * self.scale
