from .batch_easy_hard_miner import BatchEasyHardMiner


class BatchHardMiner(BatchEasyHardMiner):
    """Per anchor: the hardest positive and hardest negative, returned as triplets ``(a, p, n)``."""

    def __init__(self, **kwargs):
        super().__init__(pos_strategy=self.HARD, neg_strategy=self.HARD, **kwargs)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        a, p, _, n = super().mine(embeddings, labels, ref_emb, ref_labels)
        return a, p, n
