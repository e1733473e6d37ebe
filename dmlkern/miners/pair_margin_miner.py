import torch

from .._tracing import static_shapes
from ..fused import blocked_miners
from ..fused._common import small_problem
from ..fused.lazy_pairs import LazyMarginPairs
from ..fused.triplet import distance_kind
from ..reference.miners import pair_margin_miner
from ._stats import pair_means
from .base import BaseTupleMiner, LazyPairCounts


class PairMarginMiner(LazyPairCounts, BaseTupleMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``.

    With the default LpDistance or CosineSimilarity and no collect_stats, forward returns a
    LazyMarginPairs: PML's (a1, p, a2, n) tuple whose tensors are computed only when something
    reads them; a fused ContrastiveLoss given it keeps the same pairs without listing them
    (dmlkern/fused/pair_margin_contrastive.py). Listed, the pairs come from row blocks of the
    distance matrix (`fused/blocked_miners.py`); with collect_stats, and for a small problem on
    the CPU (`fused._common.small_problem`, whose loss then runs the reference), from the whole
    matrix, returned listed.
    """

    def __init__(self, pos_margin=0.2, neg_margin=0.8, **kwargs):
        self._uncounted = None  # the last lazy result, until num_pos_pairs / num_neg_pairs are read
        super().__init__(**kwargs)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"], is_stat=False)
        self.add_to_recordable_attributes(list_of_names=["pos_pair_dist", "neg_pair_dist"], is_stat=True)

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        if not self.collect_stats and small_problem(embeddings, ref_emb) is None:
            # row blocks: no N x M matrix (the statistics read the whole one; a small one costs less)
            return blocked_miners.pair_margin_miner(
                self.distance, embeddings, labels, ref_emb, ref_labels, self.pos_margin, self.neg_margin)
        mat = self.distance(embeddings, ref_emb)
        if self.collect_stats:
            self.pos_pair_dist, self.neg_pair_dist = pair_means(mat, labels, ref_labels)
        return pair_margin_miner(
            mat, labels, ref_labels, self.pos_margin, self.neg_margin, self.distance.is_inverted
        )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        lazy_ok = (not self.collect_stats and not static_shapes() and distance_kind(self.distance) is not None
                   and torch.is_tensor(embeddings) and embeddings.dtype in (torch.float32, torch.float64)
                   and not _small(embeddings, ref_emb))
        return self.lazy_or_forward(LazyMarginPairs, lazy_ok, embeddings, labels, ref_emb, ref_labels)


def _small(embeddings, ref_emb):
    """A small problem (`fused._common.small_problem`): the loss then runs the reference on the
    pairs, so the miner lists them as PML does rather than lazily (shapes checked later)."""
    ref = embeddings if ref_emb is None else ref_emb
    return (embeddings.dim() == 2 and torch.is_tensor(ref) and ref.dim() == 2
            and small_problem(embeddings, ref) is not None)
