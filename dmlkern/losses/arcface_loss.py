from ..fused import margin_softmax
from ..reference import classification_losses as ref
from .large_margin_softmax_loss import LargeMarginSoftmaxLoss, _degrees_to_radians


class ArcFaceLoss(LargeMarginSoftmaxLoss):
    """ArcFace: additive angular margin (``margin`` given in degrees; the attribute holds
    radians, as in PML), logits times ``scale``."""

    def __init__(self, num_classes, embedding_size, margin=28.6, scale=64, **kwargs):
        super().__init__(num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale, **kwargs)

    def init_margin(self):
        self.margin = _degrees_to_radians(self.margin)

    _fused_path = staticmethod(margin_softmax.arcface)

    def _loss_dict(self, embeddings, labels, indices_tuple):
        return ref.arcface_loss_dict(
            embeddings, labels, self.W, indices_tuple, margin_radians=self.margin, scale=self.scale,
            distance=self.distance,
        )

    def modify_cosine_of_target_classes(self, cosine_of_target_classes):
        return ref.arcface_target_logit(cosine_of_target_classes, self.margin)

    def scale_logits(self, logits, *_):
        return logits * self.scale
