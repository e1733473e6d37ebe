"""Weight rows normalised, and that normalisation's backward, in two sweeps each (the ops
`dmlkern::unit_rows` / `unit_rows_backward`, csrc/cpu/unit_rows_cpu.cpp): what the class-weight
losses do to every block of weight rows, forward and backward (fused/class_softmax.py's
unit_and_norm and unit_backward_), where torch's ops take five and nine passes over the block;
and the backward of every fused loss's row normalisation (fused/_common.py's _UnitRows).

No autograd: callers use them only where no graph is recorded (`runs_kernel`). A row's sums run
in double over its entries in order, so the bits do not depend on the layout's chunks or on the
thread count.
"""
import torch

from .._tracing import static_shapes
from .dispatch import extension_loaded
from .pair_engine import _direct_call_ok

_OP_READY = extension_loaded() and hasattr(torch.ops.dmlkern, "unit_rows")

if _OP_READY:
    @torch.library.register_fake("dmlkern::unit_rows")
    def _fake_unit_rows(rows, eps, out):
        return rows.new_empty((rows.shape[0], 1))

    @torch.library.register_fake("dmlkern::unit_rows_backward")
    def _fake_unit_rows_backward(grad, y, norms, eps, out):
        return None


def runs_kernel(*tensors):
    """Whether unit_rows / unit_rows_backward may run on these tensors: the op is built, they are
    eager plain CPU fp32 / fp64 2-D tensors of one dtype, and no graph is being recorded for them."""
    if not _OP_READY or static_shapes() or not _direct_call_ok(*tensors):
        return False
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dim() == 2 and t.dtype == first.dtype and t.device == first.device for t in tensors)


def unit_rows(rows, eps, out):
    """rows / max(|row|, eps) into `out` (rows' shape and dtype, any strides; may be rows);
    returns the norms (R, 1) in rows' dtype."""
    return torch.ops.dmlkern.unit_rows.default(rows, float(eps), out)


def unit_rows_backward(grad, y, norms, eps, out):
    """The gradient of rows given `grad`, that of y = rows / max(|row|, eps), into `out` (grad's
    shape; may be grad): (grad - y (y . grad) [norm >= eps]) / max(norm, eps)."""
    torch.ops.dmlkern.unit_rows_backward.default(grad, y, norms, float(eps), out)
    return out
