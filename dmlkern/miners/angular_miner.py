import math

from ..distances import LpDistance
from ..fused import blocked_miners
from ..fused.blocked_miners import AngleStats
from .base import BaseTupleMiner


_ANGLE_STATS = ["average_angle", "average_angle_above_threshold", "average_angle_below_threshold",
                "min_angle", "max_angle", "std_of_angle"]


class AngularMiner(BaseTupleMiner):
    """Triplets whose angle ``atan(||x_a - x_p|| / (2 ||x_n - x_c||))`` exceeds ``angle`` degrees
    (computed on the raw, un-normalised embeddings, like PML). Requires normalised LpDistance(p=2).
    Mines chunks of positive pairs against the reference rows (`fused/blocked_miners.py`): PML's
    triplets in PML's order without its list of every triplet."""

    def __init__(self, angle=20, **kwargs):
        super().__init__(**kwargs)
        self._require_distance(LpDistance, p=2, power=1, normalize_embeddings=True)
        self.angle = math.radians(angle)
        self.add_to_recordable_attributes(list_of_names=["angle"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=_ANGLE_STATS, is_stat=True)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        stats = AngleStats() if self.collect_stats else None
        out = blocked_miners.angular_miner(embeddings, labels, ref_emb, ref_labels, self.angle, stats)
        if stats is not None:
            for name, value in stats.as_dict().items():
                setattr(self, name, value)
        return out
