"""The deterministic softmax's op (`dmlkern._determinism.softmax` calls it): dmlkern::fixed_softmax
is torch.softmax with a backward, dmlkern::fixed_softmax_backward, whose bits do not depend on the
CPU thread count (csrc/cpu/fixed_softmax_cpu.cpp: each row's y . grad one serial sum). Its
autograd is C++ (csrc/autograd.cpp), as fixed_mm's: at the small batches where the reference
runs, a Python autograd.Function's forward and backward cost more host time than the softmax."""
import torch

from .dispatch import extension_loaded

_OP_READY = extension_loaded() and hasattr(torch.ops.dmlkern, "fixed_softmax")


def runs_kernel(t):
    """Whether fixed_softmax takes a tensor like `t` (CPU fp32 / fp64 with the extension)."""
    return _OP_READY and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def fixed_softmax(t, dim):
    """torch.softmax(t, dim), differentiable, its backward bit-identical across CPU thread counts;
    for tensors `runs_kernel` takes."""
    return torch.ops.dmlkern.fixed_softmax.default(t, dim)


if _OP_READY:
    @torch.library.register_fake("dmlkern::fixed_softmax")
    def _fake(t, dim):
        return torch.empty_like(t)

    @torch.library.register_fake("dmlkern::fixed_softmax_backward")
    def _fake_backward(y, grad, dim):
        return torch.empty_like(y)
