"""Materialising references for the pair engine's reductions (ground truth for the kernels)."""
import torch

__all__ = ["pair_mask", "masked_row_lse", "masked_lse"]

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


def masked_row_lse(vals, keep):
    """lse[i] = log sum_j keep(i, j) exp(vals[i, j]) over an N x M matrix: the one masked
    log-sum-exp of the reference layer (the engine's lse2 pass and `masked_lse` use it).

    Rows whose mask is empty give -inf; their gradient is 0 (torch.logsumexp alone would give NaN).
    """
    vals = vals.masked_fill(~keep, float("-inf"))
    empty = ~keep.any(dim=1)
    # Give empty rows a harmless finite row so autograd yields 0 there, then put -inf back.
    safe = vals.masked_fill(empty[:, None], 0.0)
    return torch.logsumexp(safe, dim=1).masked_fill(empty, float("-inf"))


def masked_lse(x, y, x_labels, y_labels, scale=1.0, mask="all", exclude_diag=False):
    """lse[i] = log sum_j mask(i, j) exp(scale * <x_i, y_j>), with the N x M matrix in memory."""
    return masked_row_lse(scale * (x @ y.T), pair_mask(x_labels, y_labels, mask, exclude_diag))
