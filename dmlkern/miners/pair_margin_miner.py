from ..fused import blocked_miners
from ..reference.miners import pair_margin_miner
from ._stats import pair_means
from .base import BaseTupleMiner


class PairMarginMiner(BaseTupleMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``.
    Mines on row blocks of the distance matrix (`fused/blocked_miners.py`) unless it collects
    statistics."""

    def __init__(self, pos_margin=0.2, neg_margin=0.8, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["pos_pair_dist", "neg_pair_dist"], is_stat=True)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if not self.collect_stats:  # row blocks: no N x M matrix (the statistics read the whole one)
            return blocked_miners.pair_margin_miner(
                self.distance, embeddings, labels, ref_emb, ref_labels, self.pos_margin, self.neg_margin)
        mat = self.distance(embeddings, ref_emb)
        self.pos_pair_dist, self.neg_pair_dist = pair_means(mat, labels, ref_labels)
        return pair_margin_miner(
            mat, labels, ref_labels, self.pos_margin, self.neg_margin, self.distance.is_inverted
        )
