"""UniformHistogramMiner's mining (PML 2.9.0): pairs drawn uniformly over a histogram of their
distances."""

import torch

from .indices import get_all_pairs_indices

__all__ = ["uniform_histogram_miner"]


def _draw_per_bin(values, num_bins, per_bin):
    """Indices into ``values``: for each of ``num_bins`` equal bins between min and max (the last
    one closed), ``per_bin`` draws with replacement among the values in it (empty bins skipped).
    The global RNG is consumed bin by bin, as PML does."""
    edges = torch.linspace(torch.min(values), torch.max(values), steps=num_bins + 1,
                           device=values.device, dtype=values.dtype)
    picked = []
    for i in range(num_bins):
        low, high = edges[i], edges[i + 1]
        inside = low <= values
        inside &= (values < high) if i != num_bins - 1 else (values <= high)  # (in place: PML's peak memory)
        members = torch.where(inside)[0]
        if len(members) == 0:
            continue
        draws = torch.multinomial(torch.ones_like(members, dtype=torch.float), per_bin, replacement=True)
        picked.append(members[draws])
    return torch.cat(picked, dim=0)


def uniform_histogram_miner(mat, labels, ref_labels, num_bins=100, pos_per_bin=10, neg_per_bin=10):
    """Pairs ``(a1, p, a2, n)``: from all positive (negative) pairs, ``pos_per_bin``
    (``neg_per_bin``) per bin of their values in ``mat``."""
    a1, p, a2, n = get_all_pairs_indices(labels, ref_labels)
    if len(a1) > 0:
        keep = _draw_per_bin(mat[a1, p], num_bins, pos_per_bin)
        a1, p = a1[keep], p[keep]
    if len(a2) > 0:
        keep = _draw_per_bin(mat[a2, n], num_bins, neg_per_bin)
        a2, n = a2[keep], n[keep]
    return a1, p, a2, n
