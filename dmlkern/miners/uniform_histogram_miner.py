from ..reference.histogram_miner import uniform_histogram_miner
from .base import BaseTupleMiner


class UniformHistogramMiner(BaseTupleMiner):
    """All pairs, then per side ``num_bins`` equal bins of their distances between the smallest and
    the largest, and ``pos_per_bin`` / ``neg_per_bin`` pairs drawn with replacement from each
    non-empty bin (PML's draws for the same torch seed). Returns pairs."""

    def __init__(self, num_bins=100, pos_per_bin=10, neg_per_bin=10, **kwargs):
        super().__init__(**kwargs)
        self.num_bins = num_bins
        self.pos_per_bin = pos_per_bin
        self.neg_per_bin = neg_per_bin
        self.add_to_recordable_attributes(list_of_names=["pos_per_bin", "neg_per_bin"], is_stat=False)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return uniform_histogram_miner(mat, labels, ref_labels, self.num_bins, self.pos_per_bin, self.neg_per_bin)
