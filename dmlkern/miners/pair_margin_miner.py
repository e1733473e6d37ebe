from ..reference.miners import pair_margin_miner
from .base import BaseTupleMiner


class PairMarginMiner(BaseTupleMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``."""

    def __init__(self, pos_margin=0.2, neg_margin=0.8, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return pair_margin_miner(
            mat, labels, ref_labels, self.pos_margin, self.neg_margin, self.distance.is_inverted
        )
