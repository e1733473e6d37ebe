import torch

from ..fused.lazy_pairs import LazyMinedTriplets
from ..fused.triplet import distance_kind
from ..reference.miners import triplet_margin_miner
from ._stats import triplet_means
from .base import BaseTupleMiner


class TripletMarginMiner(BaseTupleMiner):
    """Triplets by margin: ``type_of_triplets`` in {"all", "hard", "semihard", "easy"}.

    With ``t = d_an - d_ap`` (``s_ap - s_an`` for similarities): all ``t <= margin``; hard
    ``t <= 0``; semihard ``0 < t <= margin``; easy ``t > margin``.

    With the default LpDistance or CosineSimilarity and no collect_stats, forward returns a
    LazyMinedTriplets: PML's (a, p, n) tuple whose tensors are computed only when something reads
    them; a fused TripletMarginLoss given it keeps the same triplets without listing them
    (dmlkern/fused/triplet.py), under torch.compile too. ``num_triplets`` is counted when read,
    also without listing.
    """

    def __init__(self, margin=0.2, type_of_triplets="all", **kwargs):
        self._uncounted = None  # the last lazy result, until num_triplets is read
        super().__init__(**kwargs)
        self.margin = margin
        self.type_of_triplets = type_of_triplets
        self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
        self.add_to_recordable_attributes(
            list_of_names=["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"], is_stat=True
        )

    @property
    def num_triplets(self):
        lazy, self._uncounted = self._uncounted, None
        if lazy is not None:
            self._num_triplets = lazy.count()
        return self._num_triplets

    @num_triplets.setter
    def num_triplets(self, value):
        self._num_triplets = value

    def __getstate__(self):
        """pickle / deepcopy: the count PML would hold, not the last lazy result."""
        self.num_triplets  # noqa: B018 (counts the lazy result)
        return super().__getstate__()

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        if self.collect_stats:
            self.pos_pair_dist, self.neg_pair_dist, self.avg_triplet_margin = triplet_means(
                mat, labels, ref_labels, self.distance.is_inverted
            )
        return triplet_margin_miner(
            mat, labels, ref_labels, self.margin, self.type_of_triplets, self.distance.is_inverted
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        lazy_ok = (not self.collect_stats and distance_kind(self.distance) is not None
                   and torch.is_tensor(embeddings) and embeddings.dtype.is_floating_point)
        return self.lazy_or_forward(LazyMinedTriplets, lazy_ok, embeddings, labels, ref_emb, ref_labels)
