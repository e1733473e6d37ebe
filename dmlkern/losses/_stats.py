"""PML's loss statistics that need pair values (computed only with collect_stats, as PML does,
under no_grad, from the inputs: they never touch the loss or its gradient)."""

import math

import torch

from ..reference.indices import convert_to_pairs

__all__ = ["degrees_mean_acos", "angular_loss_average_angle"]

_BLOCK = 1 << 22  # pair x reference-row values per block


def degrees_mean_acos(cosines):
    """``degrees(mean(acos(cosines)))`` as a Python float (PML's angle statistics)."""
    return math.degrees(torch.mean(torch.acos(cosines)).item())


@torch.no_grad()
def angular_loss_average_angle(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """AngularLoss.average_angle: over every positive pair (a, p) and every reference row n of
    another label, the mean of atan(||x̂_a - x̂_p|| / (2 ||c - x_n||)), c = (x̂_a + x̂_p) / 2,
    in degrees; None when PML records nothing (no positive or no negative pair). PML builds a
    (pairs, R, D) tensor; this goes through blocks of pairs, O(block * R) memory."""
    a1, p, a2, _ = convert_to_pairs(indices_tuple, labels, ref_labels)
    if len(a1) == 0 or len(a2) == 0:
        return None
    anchors, positives = distance.normalize(embeddings[a1]), distance.normalize(ref_emb[p])
    ref64 = ref_emb.double()
    total, count = 0.0, 0
    step = max(1, _BLOCK // max(1, ref_emb.shape[0]))
    for s in range(0, len(a1), step):
        xa, xp = anchors[s : s + step], positives[s : s + step]
        ap = distance.pairwise_distance(xa, xp).double()
        nc = torch.cdist(((xa + xp) / 2).double(), ref64, p=distance.p)
        keep = labels[a1[s : s + step]].unsqueeze(1) != ref_labels.unsqueeze(0)
        total += float(torch.atan(ap.unsqueeze(1) / (2 * nc))[keep].sum())
        count += int(keep.sum())
    return math.degrees(total / count) if count else math.nan
