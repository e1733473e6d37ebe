import math

from ..distances import LpDistance
from ..reference.miners import angular_miner
from .base import BaseTupleMiner


class AngularMiner(BaseTupleMiner):
    """Triplets whose angle ``atan(||x_a - x_p|| / (2 ||x_n - x_c||))`` exceeds ``angle`` degrees
    (computed on the raw, un-normalised embeddings, like PML). Requires normalised LpDistance(p=2)."""

    def __init__(self, angle=20, **kwargs):
        super().__init__(**kwargs)
        self._require_distance(LpDistance, p=2, power=1, normalize_embeddings=True)
        self.angle = math.radians(angle)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return angular_miner(embeddings, labels, ref_emb, ref_labels, self.angle, self.distance.pairwise_distance)
