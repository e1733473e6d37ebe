"""The class path's grouped block kernel (this module is `dmlkern.ops.grouped_class_op`): the
log-sum-exp over the other classes of one block of classes with K weight rows each
(SubCenterArcFace, SoftTriple), and its backward, as the ops `dmlkern::grouped_class_lse` /
`dmlkern::grouped_class_lse_backward` on the CPU (csrc/ops.cpp; csrc/cpu/grouped_class_cpu.cpp)
and `dmlkern::grouped_class_lse_triton` / `_backward_triton` on the Triton backend
(triton/grouped_class.py; `TRITON` holds them with the C++ ops' signatures).

`GroupedBlock` (fused/class_softmax.py) calls the C++ ops for CPU fp32 / fp64 blocks on the C++
backend and the Triton ones on the Triton backend; its torch ops are their twin (the C++ backend on
CUDA tensors or in half precision, the reference's graph) and the
yardstick of their tests. No autograd: the class path differentiates by hand (its forward runs
without grad, its backward calls `grouped_class_lse_backward`). Fake tensors are registered, so
torch.compile and FakeTensor tracing see the ops' shapes.
"""
import types

import torch

from ..engine_spec import stats_dtype
from ..triton import triton_ops_wanted
from .dispatch import extension_loaded

_OP_READY = extension_loaded() and hasattr(torch.ops.dmlkern, "grouped_class_lse")
REDUCE_MAX = 0  # max over the K cosines (MaxOverGroup)
REDUCE_SOFT = 1  # SoftTriple's soft assignment (SoftAssignment)
_KERNEL_DTYPES = (torch.float32, torch.float64)


def runs_kernel(x):
    """Whether the grouped kernel takes rows like `x` (a CPU fp32 / fp64 tensor, the extension loaded)."""
    return _OP_READY and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES


def grouped_class_lse(x, w, labels, class0, group, reduce, scale, inv_gamma=1.0):
    """lse_i = log sum_{q: class0 + q != labels[i]} exp(scale * v_iq), (N,) in x's dtype (-inf when
    no class of the block counts), v_iq the reduction (REDUCE_MAX / REDUCE_SOFT with inv_gamma) of
    the cosines <x_i, w_{qK+k}>, k < K = group. x (N, D) unit rows, w (R, D) the block's unit
    weight rows (R = classes * K), labels (N,) int64 global class ids; CPU fp32 / fp64."""
    return torch.ops.dmlkern.grouped_class_lse.default(x, w, labels, int(class0), int(group), int(reduce), float(scale),
                                               float(inv_gamma))


def grouped_class_lse_backward(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse):
    """(grad_x, grad_w) of sum_i grad_i lse_i over this block, given the full lse (every block's):
    dL/ds_ick = grad_i exp(scale v_iq - lse_i) scale dv_iq/ds_ick (0 at the own class); grad_w is
    the gradient of the unit rows w (the normalisation's is the caller's), in w's layout when w is a
    transposed view (`grad_w_like`), the products reading such a w in place."""
    return torch.ops.dmlkern.grouped_class_lse_backward.default(x, w, labels, int(class0), int(group), int(reduce),
                                                        float(scale), float(inv_gamma), grad, lse)


_INTO_READY = _OP_READY and hasattr(torch.ops.dmlkern, "grouped_class_lse_backward_into")


def grouped_class_lse_backward_into(grad_w, x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse):
    """grouped_class_lse_backward's grad_x, with grad_w written into `grad_w` (w's shape and x's
    dtype, any strides: a block of the weights' gradient), not into a fresh tensor, where the op
    `dmlkern::grouped_class_lse_backward_into` is built (else computed, then copied in)."""
    if not _INTO_READY:
        grad_x, gw = grouped_class_lse_backward(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse)
        grad_w.copy_(gw)
        return grad_x
    return torch.ops.dmlkern.grouped_class_lse_backward_into.default(x, w, labels, int(class0), int(group), int(reduce),
                                                             float(scale), float(inv_gamma), grad, lse, grad_w)


if _OP_READY:
    @torch.library.register_fake("dmlkern::grouped_class_lse")
    def _fake(x, w, labels, class0, group, reduce, scale, inv_gamma):
        return x.new_empty((x.shape[0],), dtype=stats_dtype(x.dtype))

    @torch.library.register_fake("dmlkern::grouped_class_lse_backward")
    def _fake_backward(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse):
        return x.new_empty(x.shape), grad_w_like(w)

if _INTO_READY:
    @torch.library.register_fake("dmlkern::grouped_class_lse_backward_into")
    def _fake_backward_into(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse, grad_w):
        return x.new_empty(x.shape)


def grad_w_like(w):
    """An empty tensor of w's shape in the layout the backward returns grad_w in: w's own when w is
    a transposed view (strides (1, ld): a block of PML's W (D, C K)), else contiguous."""
    if w.stride(0) == 1 and w.stride(1) != 1:
        return w.new_empty((w.shape[1], w.shape[0])).t()
    return w.new_empty(w.shape)


# The Triton kernels as ops (torch.library.triton_op: fake tensors and torch.compile trace through
# to the kernels). An eager call on plain tensors launches them directly: the same kernels for
# less host time, as the pair engine's direct path (ops/pair_engine.py, _direct_call_ok).
TRITON = None  # the Triton backend's grouped_class_lse / grouped_class_lse_backward, when triton is there
if triton_ops_wanted():
    from torch.library import triton_op, wrap_triton

    from ..triton import grouped_class as _tg

    @triton_op("dmlkern::grouped_class_lse_triton", mutates_args=())
    def _lse_triton(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, class0: int, group: int, reduce: int,
                    scale: float, inv_gamma: float) -> torch.Tensor:
        return _tg.grouped_class_lse(x, w, labels, class0, group, reduce, scale, inv_gamma, wrap_triton)

    @triton_op("dmlkern::grouped_class_lse_backward_triton", mutates_args=())
    def _lse_backward_triton(x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, class0: int, group: int,
                             reduce: int, scale: float, inv_gamma: float, grad: torch.Tensor,
                             lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _tg.grouped_class_lse_backward(x, w, labels, class0, group, reduce, scale, inv_gamma, grad, lse,
                                              wrap_triton)

    def _triton_call(direct, op):
        def call(x, w, labels, class0, group, reduce, scale, inv_gamma=1.0, *rest):
            from .pair_engine import _direct_call_ok
            args = (x, w, labels, int(class0), int(group), int(reduce), float(scale), float(inv_gamma), *rest)
            return direct(*args) if _direct_call_ok(x, w, labels, *rest) else op(*args)
        return call

    TRITON = types.SimpleNamespace(
        grouped_class_lse=_triton_call(_tg.grouped_class_lse, _lse_triton),
        grouped_class_lse_backward=_triton_call(_tg.grouped_class_lse_backward, _lse_backward_triton),
        supports=_tg.supports)
