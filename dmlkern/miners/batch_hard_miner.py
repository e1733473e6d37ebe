from ..reference.miners import batch_hard_miner
from .batch_easy_hard_miner import BatchEasyHardMiner


class BatchHardMiner(BatchEasyHardMiner):
    """Per anchor: the hardest positive and hardest negative, returned as triplets ``(a, p, n)``."""

    def __init__(self, **kwargs):
        super().__init__(pos_strategy=self.HARD, neg_strategy=self.HARD, **kwargs)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        return self._with_stats(mat, batch_hard_miner(mat, labels, ref_labels, self.distance.is_inverted))
