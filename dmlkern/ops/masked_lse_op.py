"""The masked row log-sum-exp op (the function `dmlkern.ops.masked_lse`; this module is
`dmlkern.ops.masked_lse_op`), lse[i] = log sum_j mask(i, j) exp(scale * <x_i, y_j>).

A thin epilogue on the pair engine's lse2 pass (docs/ENGINE.md, `pair_engine.engine_forward`)
with params [scale, 0, scale, 0, 0]: mask "same" is the pass's positive column (same label,
without the self-pair j == i when y is x), "diff" its negative column (labels differ), and
"all" the positive column of a pass run with one label for every row, so that every pair but
the excluded self-pairs is a positive. The engine op's registered autograd carries the
gradients (its backward recomputes the tiles from the saved O(N) statistics); the C++, CUDA
and Triton kernels are the engine's.
"""
import torch

from .. import reference
from ..engine_spec import PASS_LSE2, EngineParams, stats_dtype
from .dispatch import log_debug
from .pair_engine import choose_backend, engine_forward

MASK_MODES = {"all": 0, "same": 1, "diff": 2}


def _check_inputs(x, y, x_labels, y_labels):
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (N, D), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        raise ValueError(f"y must be a 2-D tensor (M, D), got {getattr(y, 'shape', type(y))}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same width D, got {x.shape[1]} and {y.shape[1]}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
    for name, lab, rows in (("x_labels", x_labels, x.shape[0]), ("y_labels", y_labels, y.shape[0])):
        if lab.dim() != 1 or lab.shape[0] != rows:
            raise ValueError(f"{name} must be 1-D of length {rows}, got shape {tuple(lab.shape)}")
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {lab.dtype}")
        if lab.device != x.device:
            raise ValueError(f"{name} must be on {x.device}, got {lab.device}")


def masked_lse(x, y=None, x_labels=None, y_labels=None, *, scale=1.0, mask="all", backend="auto"):
    """Row log-sum-exp of scaled similarities over the pairs that `mask` keeps, tile by tile.

    lse[i] = log sum_j mask(i, j) * exp(scale * <x_i, y_j>)

    x: (N, D); y: (M, D), or None (or x itself) for pairs within x, which excludes self-pairs.
    x_labels / y_labels: integer labels (needed for mask "same" / "diff"; y_labels defaults to
    x_labels when y is x). mask: "all", "same" (same label) or "diff" (different label).
    Returns fp32 (fp64 for fp64 inputs); -inf for rows with no kept pair (gradient 0 there).
    backend: "auto", "cpp", "triton" or "reference" (see dmlkern.ops.dispatch).
    """
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {sorted(MASK_MODES)}, got {mask!r}")
    exclude_diag = y is None or y is x
    if y is None:
        y = x
    # Pairs within x with y_labels of their own: a self-pair's two labels may differ.
    own_y_labels = exclude_diag and y_labels is not None and y_labels is not x_labels
    if x_labels is None:
        if mask != "all":
            raise ValueError(f"mask={mask!r} needs x_labels")
        x_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    if y_labels is None:
        if exclude_diag:
            y_labels = x_labels
        elif mask != "all":
            raise ValueError(f"mask={mask!r} with a separate y needs y_labels")
        else:
            y_labels = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    _check_inputs(x, y, x_labels, y_labels)
    x_labels = x_labels.long()
    y_labels = y_labels.long()
    chosen = choose_backend(backend, x.device)
    if (chosen != "reference" and mask == "diff" and own_y_labels
            and bool((x_labels != y_labels).any())):
        # The engine's negatives are a label mask only: it would keep a self-pair whose two
        # labels differ, which masked_lse excludes. Only the materialising path has that mask.
        log_debug("masked_lse: self-pairs with differing labels, mask='diff': reference path")
        chosen = "reference"
    log_debug("masked_lse: backend=%s device=%s dtype=%s", chosen, x.device, x.dtype)
    if chosen == "reference":
        return reference.masked_lse(x, y, x_labels, y_labels, scale, mask, exclude_diag).to(
            stats_dtype(x.dtype))
    if mask == "all":  # one label for every row: every pair is a positive (self-pairs still excluded)
        x_labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        y_labels = x_labels if exclude_diag else torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    s = float(scale)
    out = engine_forward(x, y, x_labels, y_labels, pass_kind=PASS_LSE2, params=EngineParams(sc_pos=s, sc_neg=s),
                         exclude_diag=exclude_diag, backend=chosen)
    return out[:, 1 if mask == "diff" else 0].contiguous()
