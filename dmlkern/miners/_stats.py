"""PML's miner statistics, computed only when the miner collects statistics (PML records them
under the same condition). They need the miner's pair or triplet values, so they are computed
from the distance matrix the miner built anyway: O(B R) for pair and triplet means (a triplet
mean is a sum over anchors of positive-sum x negative-count terms). Accumulation is in float64.
(AngularMiner's angle statistics: `fused.blocked_miners.AngleStats`.)"""

import math

import torch

from ..reference.indices import get_matches_and_diffs

__all__ = ["pair_means", "triplet_means", "extreme_pair_stats"]


def _masks(labels, ref_labels):
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    return matches.bool(), diffs.bool()


def _mean_or_zero(values):
    return torch.mean(values).item() if len(values) > 0 else 0


def pair_means(mat, labels, ref_labels):
    """(mean over all positive pairs, mean over all negative pairs) of ``mat``, 0 when empty
    (PairMarginMiner's ``pos_pair_dist`` / ``neg_pair_dist``)."""
    pos, neg = _masks(labels, ref_labels)
    return _mean_or_zero(mat[pos]), _mean_or_zero(mat[neg])


def triplet_means(mat, labels, ref_labels, is_inverted):
    """TripletMarginMiner's (``pos_pair_dist``, ``neg_pair_dist``, ``avg_triplet_margin``): the
    means of d_ap, d_an and the margin over every triplet (a, p, n), NaN when there is none (as
    PML's mean of an empty tensor). sum_t d_ap = sum_a |N(a)| sum_{p in P(a)} d_ap, likewise d_an."""
    pos, neg = _masks(labels, ref_labels)
    m = mat.double()
    num_pos, num_neg = pos.sum(1, dtype=torch.float64), neg.sum(1, dtype=torch.float64)
    count = float((num_pos * num_neg).sum())
    if count == 0:
        return math.nan, math.nan, math.nan
    ap = float((torch.where(pos, m, 0).sum(1) * num_neg).sum()) / count
    an = float((torch.where(neg, m, 0).sum(1) * num_pos).sum()) / count
    return ap, an, (ap - an if is_inverted else an - ap)


def extreme_pair_stats(mat, out, is_inverted, with_triplets):
    """BatchEasyHardMiner's easiest/hardest statistics from its output: the positive distances
    PML keeps are mat[a1, p] and the negative ones mat[a2, n] (triplet output: mat[a, p],
    mat[a, n]); ``with_triplets``: neither strategy is "all" (the triplet statistics exist)."""
    a1, p, a2, n = out if len(out) == 4 else (out[0], out[1], out[0], out[2])
    pd, nd = mat[a1, p], mat[a2, n]
    hard_pos, easy_pos = (torch.min, torch.max) if is_inverted else (torch.max, torch.min)
    stats = {}
    if len(pd) > 0 and len(nd) > 0 and with_triplets:
        stats.update(easiest_triplet=easy_pos(pd - nd).item(), hardest_triplet=hard_pos(pd - nd).item())
    if len(pd) > 0:
        stats.update(easiest_pos_pair=easy_pos(pd).item(), hardest_pos_pair=hard_pos(pd).item())
    if len(nd) > 0:
        stats.update(easiest_neg_pair=hard_pos(nd).item(), hardest_neg_pair=easy_pos(nd).item())
    return stats
