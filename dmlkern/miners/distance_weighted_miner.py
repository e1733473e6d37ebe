from ..distances import LpDistance
from ..fused import blocked_miners
from .base import BaseTupleMiner


class DistanceWeightedMiner(BaseTupleMiner):
    """Random triplets with negatives sampled by inverse distance density (Wu et al. 2017).
    Uses the global torch RNG exactly as PML does, so a fixed seed gives PML's triplets. Mines
    on row blocks of the distance matrix (`fused/blocked_miners.py`): no N x M weights."""

    def __init__(self, cutoff=0.5, nonzero_loss_cutoff=1.4, **kwargs):
        super().__init__(**kwargs)
        self._require_distance(LpDistance, p=2, power=1, normalize_embeddings=True)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.add_to_recordable_attributes(list_of_names=["cutoff", "nonzero_loss_cutoff"], is_stat=False)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return blocked_miners.distance_weighted_miner(
            self.distance, embeddings, labels, ref_emb, ref_labels, self.cutoff, self.nonzero_loss_cutoff)
