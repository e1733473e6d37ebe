"""SignalToNoiseRatioContrastiveLoss (PML 2.9.0): ContrastiveLoss on SNRDistance (required). All
pairs run on row blocks without an N x M matrix (`fused/snr_contrastive.py`, last_backend
"blocked"; also CrossBatchMemory's lazy all pairs); any other indices_tuple runs the reference."""

from ..distances import SNRDistance
from ..fused import _stats as fused_stats
from ..fused.snr_contrastive import snr_contrastive
from ..reference.embedding_losses import require_distance
from .contrastive_loss import ContrastiveLoss


class SignalToNoiseRatioContrastiveLoss(ContrastiveLoss):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        require_distance(type(self).__name__, self.distance, "SNRDistance")

    def fused_loss_dict(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        return fused_stats.pair_loss(snr_contrastive, self, embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def get_default_distance(self):
        return SNRDistance()
