"""Materialising references for the pair engine's reductions (ground truth for the kernels)."""
import torch

__all__ = ["pair_mask", "masked_lse"]

_MASK_MODES = {"all": 0, "same": 1, "diff": 2}


def pair_mask(x_labels, y_labels, mask="all", exclude_diag=False):
    """Boolean (N, M) mask: all pairs, same label ("same") or different label ("diff")."""
    n, m = x_labels.shape[0], y_labels.shape[0]
    if mask == "all":
        keep = torch.ones(n, m, dtype=torch.bool, device=x_labels.device)
    elif mask == "same":
        keep = x_labels[:, None] == y_labels[None, :]
    elif mask == "diff":
        keep = x_labels[:, None] != y_labels[None, :]
    else:
        raise ValueError(f"mask must be one of {sorted(_MASK_MODES)}, got {mask!r}")
    if exclude_diag:
        keep = keep & ~torch.eye(n, m, dtype=torch.bool, device=x_labels.device)
    return keep


def masked_lse(x, y, x_labels, y_labels, scale=1.0, mask="all", exclude_diag=False):
    """lse[i] = log sum_j mask(i, j) exp(scale * <x_i, y_j>), with the N x M matrix in memory.

    Rows whose mask is empty give -inf; their gradient is 0 (torch.logsumexp alone would give NaN).
    """
    sim = scale * (x @ y.T)
    keep = pair_mask(x_labels, y_labels, mask, exclude_diag)
    sim = sim.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(dim=1)
    # Give empty rows a harmless finite row so autograd yields 0 there, then put -inf back.
    safe = sim.masked_fill(empty[:, None], 0.0)
    lse = torch.logsumexp(safe, dim=1)
    return lse.masked_fill(empty, float("-inf"))
