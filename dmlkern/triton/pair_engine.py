"""Triton tiled pair engine (docs/ENGINE.md), host side: engine_forward and engine_backward
check their arguments, choose the tiles (tiles.py) and launch the forward kernel
(forward_kernel.py) or the backward kernel (backward_kernel.py) on every fused loss's behalf.
Ground truth: dmlkern/reference/pair_engine.py.

With fp16 / bf16 and D <= 256 (ONE_K) a program keeps its row block loaded and loads each column
tile once, in one piece; the kernels are then bound by their epilogues' instructions, which
is what shaped them (docs/ENGINE.md, last section; scripts/triton_compile_check.py counts them):
exponentials are exp2 with log2(e) folded into the scales, the backward's per-row constants are
computed once per row, and the masks need no row bound (rows past the end are never stored).

The EngineParams travel as three fp32 pieces each (sc_pos_h + sc_pos_m + sc_pos_l == sc_pos
exactly, and so on, PARAM_PIECES): Triton passes Python floats as fp32, which would round the
fp64 path's parameters.
"""
import functools
import struct

import torch
import triton
import triton.language as tl

from ..engine_spec import (COEF_WIDTH, COEF_WIDTH_HINGE, COEF_WIDTH_LIFT, MINING_MULTI_SIMILARITY, MINING_NONE,
                           OUT_COLUMNS, PASS_EXTREMA, PASS_HINGE, PASS_LIFTED_PAIRS, PASS_POS_SOFTPLUS,
                           TRANSFORM_CIRCLE, TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE, EngineParams, stats_dtype)
from ..reference.pair_engine import check_circle, check_hinge_mining, check_symmetric, params_of
from . import interpret_mode
from .backward_kernel import _engine_bwd_kernel
from .forward_kernel import _engine_fwd_kernel
from .tiles import TILE_OVERRIDES, _launch_tiles  # noqa: F401 -- TILE_OVERRIDES lives in tiles.py; the same dict

__all__ = ["engine_forward", "engine_backward"]

# The kernels' scalar arguments, in order: each EngineParams field's three fp32 pieces.
PARAM_PIECES = tuple(f"{field}_{piece}" for field in EngineParams._fields for piece in "hml")


def _launch_config(x):
    """Accumulator dtype, dot precision and the interpreter's upcast for inputs like x."""
    interp = interpret_mode()
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    if x.dtype == torch.float32:
        # Follow torch's matmul precision setting: IEEE unless the user allowed TF32.
        precision = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    else:
        precision = "ieee"
    # The interpreter computes in numpy; fp64/fp16/bf16 dots go through fp32/fp64 there.
    upcast = interp or x.dtype == torch.float64
    return dict(UPCAST=upcast, ACC_DTYPE=acc, INPUT_PRECISION=precision)


def _f32(p):
    return struct.unpack("f", struct.pack("f", p))[0]


def _split(p):
    """Three fp32-representable floats with hi + mid + lo == p exactly (for any p whose
    pieces stay in the fp32 normal range, i.e. every sensible loss parameter)."""
    p = float(p)
    if p != p or p in (float("inf"), float("-inf")) or abs(p) > 3.0e38:
        return [p, 0.0, 0.0]
    hi = _f32(p)
    mid = _f32(p - hi)
    lo = _f32(p - hi - mid)
    return [hi, mid, lo]


def _param_args(params):
    """The kernels' PARAM_PIECES for params (EngineParams, or 5, 9 or 10 floats in its order; the
    circle constants default to 0, log_floor to -inf)."""
    return _split_params(tuple(float(p) for p in params_of(params)))


@functools.lru_cache(maxsize=256)  # a loss calls with the same few params every step: host time
def _split_params(params):
    return tuple(piece for p in params for piece in _split(p))


def _coef_flags(row_coef, coef_terms):
    """(HAS_B, HAS_LIFT): whether row_coef's B_pos column, and its C_lift column if any, are
    used. The fused losses say so (coef_terms: bit 1 B_pos, bit 2 C_lift; they know their pass
    chain); coef_terms=-1 reads the values instead: one small reduction and one device-to-host
    copy per call (a host sync on a GPU). A column left out compiles its term away, which also
    frees registers. Tensors seen while torch.compile traces (fake) keep both terms then."""
    has_lift = row_coef.shape[1] == 6
    if coef_terms >= 0:
        return bool(coef_terms & 1), has_lift and bool(coef_terms & 2)
    if _is_fake(row_coef) or torch.compiler.is_compiling() or row_coef.shape[0] == 0:
        return True, has_lift
    flags = (row_coef[:, 4:] != 0).any(dim=0).tolist()
    return bool(flags[0]), has_lift and bool(flags[1])


def _is_fake(t):
    return isinstance(t, torch._subclasses.fake_tensor.FakeTensor)


def _check(transform, mining, params, pass_kind=None, coef_width=None):
    if pass_kind is not None and pass_kind not in OUT_COLUMNS:
        raise ValueError(f"pass_kind must be 0, 1, 2, 3 or 4, got {pass_kind}")
    if transform not in (TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE, TRANSFORM_CIRCLE):
        raise ValueError(f"transform must be 0, 1 or 2, got {transform}")
    if mining not in (MINING_NONE, MINING_MULTI_SIMILARITY):
        raise ValueError(f"mining must be 0 or 1, got {mining}")
    check_circle(transform, mining, params, pass_kind=pass_kind, coef_width=coef_width)


def _row_tensor(t, n, width, dtype, device):
    """row_in / row_coef in the stats dtype; None stands for zeros (a pass that reads none)."""
    if t is None:
        return torch.zeros(1, width, device=device, dtype=dtype).expand(n, width)
    return t.to(dtype)


def engine_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining, params,
                   exclude_diag, wrap=lambda k: k):
    """Per-row statistics of one pass (docs/ENGINE.md): (N, 2) for extrema / lse2, (N, 3) for
    pos_softplus / lifted_pairs, (N, 4) for hinge, in the stats dtype (fp32, fp64 for fp64 inputs)."""
    pass_kind, transform, mining = int(pass_kind), int(transform), int(mining)
    _check(transform, mining, params, pass_kind)
    if pass_kind == PASS_LIFTED_PAIRS:
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "pass_kind=3 (lifted_pairs)")
    if pass_kind == PASS_HINGE:
        check_hinge_mining(mining, "pass_kind=4 (hinge)")
    n, d = x.shape
    m = y.shape[0]
    acc_dtype = stats_dtype(x.dtype)
    out = torch.empty(n, OUT_COLUMNS[pass_kind], device=x.device, dtype=acc_dtype)
    if n == 0:
        return out
    row_in = _row_tensor(row_in, n, 3, acc_dtype, x.device)
    tiles, options = _launch_tiles(x, d, "fwd", positives_only=pass_kind in (PASS_POS_SOFTPLUS, PASS_LIFTED_PAIRS))
    grid = (triton.cdiv(n, tiles["BLOCK_M"]),)
    wrap(_engine_fwd_kernel)[grid](
        x, y, x_labels, y_labels, row_in, out, n, m, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), x_labels.stride(0), y_labels.stride(0),
        row_in.stride(0), row_in.stride(1), out.stride(0), out.stride(1),
        *_param_args(params),
        PASS_KIND=pass_kind, TRANSFORM=transform,
        MINING=mining if pass_kind != PASS_EXTREMA else MINING_NONE,  # extrema use the label masks only
        # (pass 3 is mining 0, checked above)
        EXCLUDE_DIAG=bool(exclude_diag),
        **tiles, **options, **_launch_config(x))
    return out


def engine_backward(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params,
                    exclude_diag, symmetric=False, wrap=lambda k: k, coef_terms=-1):
    """(grad_x, grad_y) in the input dtypes for dl/dv given by row_coef (docs/ENGINE.md): (N, 5),
    (N, 6) with the lifted pairs' C_lift (the symmetric case only), or (N, 2), the hinge backward's
    (H_pos, H_neg) (mining 0; coef_terms is ignored). symmetric (y is x): their
    sum as grad_x, grad_y zero. coef_terms: which of B_pos (1) and C_lift (2) row_coef uses, -1
    to read it from the values (see _coef_flags)."""
    transform, mining = int(transform), int(mining)
    if row_coef.dim() != 2 or row_coef.shape[1] not in (COEF_WIDTH, COEF_WIDTH_LIFT, COEF_WIDTH_HINGE):
        raise ValueError(f"row_coef must be (N, 5), (N, 6) or (N, 2) (the hinge backward), got {tuple(row_coef.shape)}")
    _check(transform, mining, params, coef_width=row_coef.shape[1])
    hinge = row_coef.shape[1] == COEF_WIDTH_HINGE
    if hinge:
        check_hinge_mining(mining, "row_coef with 2 columns (the hinge backward)")
    has_lift = row_coef.shape[1] == COEF_WIDTH_LIFT
    if has_lift:
        check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "row_coef with 6 columns (C_lift)")
    if symmetric and (x.shape != y.shape or x_labels.shape != y_labels.shape):
        raise ValueError(f"symmetric=True needs y of x's shape (y is x), got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    m = y.shape[0]
    acc_dtype = stats_dtype(x.dtype)
    # Every program stores its whole (rows x D-slice) block, cast to the input dtype: no memset,
    # no cast kernel. The symmetric case's grad_y is zero (grad_x holds both sides).
    grad_x = (torch.empty if m > 0 else torch.zeros)(n, d, device=x.device, dtype=x.dtype)
    grad_y = (torch.zeros if symmetric or n == 0 else torch.empty)(m, d, device=y.device, dtype=y.dtype)
    if n > 0 and m > 0 and d > 0:
        row_in = _row_tensor(row_in, n, 3, acc_dtype, x.device)
        row_coef = row_coef.to(acc_dtype)
        has_b, has_lift = (False, False) if hinge else _coef_flags(row_coef, int(coef_terms))
        if not has_lift and row_coef.shape[1] == 6:
            row_coef = row_coef[:, :5]  # an all-zero C_lift column: the term is compiled away
        tiles, options = _launch_tiles(x, d, "bwd", lift=has_lift, symmetric=symmetric, has_b=has_b, hinge=hinge)
        cfg = _launch_config(x)
        pargs = _param_args(params)
        # symmetric: one launch over x's row blocks computes both sides (y is x, the same labels).
        sides = (((x, x_labels, x, x_labels, grad_x, True),) if symmetric else
                 ((x, x_labels, y, y_labels, grad_x, True), (y, y_labels, x, x_labels, grad_y, False)))
        for own, own_labels, other, other_labels, grad, own_is_x in sides:
            grid = (triton.cdiv(own.shape[0], tiles["BLOCK_M"]), triton.cdiv(d, tiles["BLOCK_DOUT"]))
            wrap(_engine_bwd_kernel)[grid](
                own, other, own_labels, other_labels, row_in, row_coef, grad,
                own.shape[0], other.shape[0], d,
                own.stride(0), own.stride(1), other.stride(0), other.stride(1),
                own_labels.stride(0), other_labels.stride(0),
                row_in.stride(0), row_in.stride(1),
                row_coef.stride(0), row_coef.stride(1), grad.stride(0), grad.stride(1),
                *pargs,
                OWN_IS_X=own_is_x, SYMMETRIC=bool(symmetric), TRANSFORM=transform, MINING=mining,
                EXCLUDE_DIAG=bool(exclude_diag), HAS_B=has_b, HAS_LIFT=has_lift, HINGE=hinge,
                **tiles, **options, **cfg)
    return grad_x, grad_y

