from ..reference.miners import triplet_margin_miner
from ._stats import triplet_means
from .base import BaseTupleMiner


class TripletMarginMiner(BaseTupleMiner):
    """Triplets by margin: ``type_of_triplets`` in {"all", "hard", "semihard", "easy"}.

    With ``t = d_an - d_ap`` (``s_ap - s_an`` for similarities): all ``t <= margin``; hard
    ``t <= 0``; semihard ``0 < t <= margin``; easy ``t > margin``.
    """

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        super().__init__(**kwargs)
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"], is_stat=True
        )

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        if self.collect_stats:
            self.pos_pair_dist, self.neg_pair_dist, self.avg_triplet_margin = triplet_means(
                mat, labels, ref_labels, self.distance.is_inverted
            )
        return triplet_margin_miner(
            mat, labels, ref_labels, self.margin, self.type_of_triplets, self.distance.is_inverted
        )
