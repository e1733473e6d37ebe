from ..fused import blocked_miners
from ..reference import miners as ref
from ._stats import extreme_pair_stats
from .base import BaseTupleMiner


class BatchEasyHardMiner(BaseTupleMiner):
    """At most one positive and one negative per anchor, chosen by ``pos_strategy`` /
    ``neg_strategy`` in {"hard", "semihard", "easy", "all"}; returns pairs ``(a, p, a, n)``.
    Mines on row blocks of the distance matrix (`fused/blocked_miners.py`) unless it collects
    statistics."""

    HARD = ref.HARD
    SEMIHARD = ref.SEMIHARD
    EASY = ref.EASY
    ALL = ref.ALL
    all_batch_mining_strategies = [HARD, SEMIHARD, EASY, ALL]

    def __init__(
        self, pos_strategy=EASY, neg_strategy=SEMIHARD, allowed_pos_range=None, allowed_neg_range=None, **kwargs
    ):
        super().__init__(**kwargs)
        valid = self.all_batch_mining_strategies
        if pos_strategy not in valid or neg_strategy not in valid:
            raise ValueError(f"pos_strategy and neg_strategy must each be one of {valid}")
        if pos_strategy == neg_strategy == self.SEMIHARD:
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if {pos_strategy, neg_strategy} == {self.ALL, self.SEMIHARD}:
            raise ValueError('"semihard" cannot be used in combination with "all"')
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = allowed_pos_range
        self.allowed_neg_range = allowed_neg_range
        self.add_to_recordable_attributes(
            list_of_names=["easiest_triplet", "hardest_triplet", "easiest_pos_pair", "hardest_pos_pair",
                           "easiest_neg_pair", "hardest_neg_pair"],
            is_stat=True,
        )

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if not self.collect_stats:  # row blocks: no N x M matrix (the statistics read the whole one)
            return blocked_miners.batch_easy_hard_miner(
                self.distance, embeddings, labels, ref_emb, ref_labels, self.pos_strategy, self.neg_strategy,
                self.allowed_pos_range, self.allowed_neg_range)
        mat = self.distance(embeddings, ref_emb)
        return self._with_stats(mat, ref.batch_easy_hard_miner(
            mat,
            labels,
            ref_labels,
            self.pos_strategy,
            self.neg_strategy,
            self.allowed_pos_range,
            self.allowed_neg_range,
            self.distance.is_inverted,
        ))

    def _with_stats(self, mat, out):
        """Records PML's easiest/hardest statistics of the mined output (with collect_stats)."""
        if self.collect_stats:
            with_triplets = self.ALL not in (self.pos_strategy, self.neg_strategy)
            for name, value in extreme_pair_stats(mat, out, self.distance.is_inverted, with_triplets).items():
                setattr(self, name, value)
        return out
