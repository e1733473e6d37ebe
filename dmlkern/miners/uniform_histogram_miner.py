from ..fused import blocked_miners
from .base import BaseTupleMiner


class UniformHistogramMiner(BaseTupleMiner):
    """All pairs, then per side ``num_bins`` equal bins of their distances between the smallest and
    the largest, and ``pos_per_bin`` / ``neg_per_bin`` pairs drawn with replacement from each
    non-empty bin (PML's draws for the same torch seed). Returns pairs. Mines in sweeps of row blocks
    of the distance matrix (`fused/blocked_miners.py`): no N x M matrix or list of every pair."""

    def __init__(self, num_bins=100, pos_per_bin=10, neg_per_bin=10, **kwargs):
        super().__init__(**kwargs)
        self.num_bins = num_bins
        self.pos_per_bin = pos_per_bin
        self.neg_per_bin = neg_per_bin
        self.add_to_recordable_attributes(list_of_names=["pos_per_bin", "neg_per_bin"], is_stat=False)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        return blocked_miners.uniform_histogram_miner(self.distance, embeddings, labels, ref_emb, ref_labels,
                                                      self.num_bins, self.pos_per_bin, self.neg_per_bin)
