"""The masked row log-sum-exp op, lse[i] = log sum_j mask(i, j) exp(scale * <x_i, y_j>).

Registered twice as a custom op with autograd and fake-tensor support:
  dmlkern::masked_lse         C++ (schema in csrc/ops.cpp, kernels in csrc/cpu and csrc/cuda)
  dmlkern::masked_lse_triton  Triton (dmlkern/triton/masked_lse.py) via torch.library.triton_op
Both save only the inputs and the O(N) lse; backward recomputes the tiles.
"""
import torch

from .. import reference
from ..triton import triton_available
from .dispatch import extension_loaded, log, resolve_backend

MASK_MODES = {"all": 0, "same": 1, "diff": 2}


def _stats_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- C++ op: fake tensors and autograd (the schema and kernels live in csrc/) -------------

def _setup_context(ctx, inputs, output):
    x, y, x_labels, y_labels, scale, mask_mode, exclude_diag = inputs
    ctx.save_for_backward(x, y, x_labels, y_labels, output)
    ctx.args = (scale, mask_mode, exclude_diag)


def _make_backward(backward_op):
    def backward(ctx, grad_lse):
        x, y, x_labels, y_labels, lse = ctx.saved_tensors
        grad_x, grad_y = backward_op(grad_lse.contiguous(), x, y, x_labels, y_labels, lse, *ctx.args)
        return grad_x, grad_y, None, None, None, None, None

    return backward


def _fake_lse(x, y, x_labels, y_labels, scale, mask_mode, exclude_diag):
    return x.new_empty((x.shape[0],), dtype=_stats_dtype(x.dtype))


def _fake_lse_backward(grad_lse, x, y, x_labels, y_labels, lse, scale, mask_mode, exclude_diag):
    return x.new_empty(x.shape), y.new_empty(y.shape)


if extension_loaded():  # loading dmlkern._C defines the schemas; add fake + autograd
    torch.library.register_fake("dmlkern::masked_lse")(_fake_lse)
    torch.library.register_fake("dmlkern::masked_lse_backward")(_fake_lse_backward)
    torch.library.register_autograd(
        "dmlkern::masked_lse",
        _make_backward(torch.ops.dmlkern.masked_lse_backward),
        setup_context=_setup_context,
    )


# ---- Triton op -----------------------------------------------------------------------------

masked_lse_triton = None
if triton_available():
    from torch.library import triton_op, wrap_triton

    from ..triton import masked_lse as _tk

    @triton_op("dmlkern::masked_lse_triton", mutates_args=())
    def masked_lse_triton(x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor,
                          y_labels: torch.Tensor, scale: float, mask_mode: int,
                          exclude_diag: bool) -> torch.Tensor:
        return _tk.masked_lse_fwd(x, y, x_labels, y_labels, scale, mask_mode, exclude_diag, wrap_triton)

    @triton_op("dmlkern::masked_lse_triton_backward", mutates_args=())
    def masked_lse_triton_backward(grad_lse: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                                   x_labels: torch.Tensor, y_labels: torch.Tensor, lse: torch.Tensor,
                                   scale: float, mask_mode: int,
                                   exclude_diag: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _tk.masked_lse_bwd(grad_lse, x, y, x_labels, y_labels, lse, scale, mask_mode,
                                  exclude_diag, wrap_triton)

    masked_lse_triton.register_autograd(
        _make_backward(masked_lse_triton_backward), setup_context=_setup_context)


# ---- public entry point --------------------------------------------------------------------

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
    chosen = resolve_backend(backend, x.device)
    log.debug("masked_lse: backend=%s device=%s dtype=%s", chosen, x.device, x.dtype)
    if chosen == "reference":
        return reference.masked_lse(x, y, x_labels, y_labels, scale, mask, exclude_diag).to(
            _stats_dtype(x.dtype))
    args = (x, y, x_labels, y_labels, float(scale), MASK_MODES[mask], exclude_diag)
    if chosen == "triton":
        return masked_lse_triton(*args)
    return torch.ops.dmlkern.masked_lse(*args)
