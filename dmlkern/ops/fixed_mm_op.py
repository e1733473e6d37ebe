"""The deterministic matrix product (the function `dmlkern.ops.fixed_mm`; this module is
`dmlkern.ops.fixed_mm_op`): fixed_mm(a, b) = a @ b.T, for a (N, D) and b (M, D).

On the CPU, torch.matmul's bits change with the thread count (MKL splits a product by it); the
op `dmlkern::fixed_mm` (csrc/cpu/fixed_mm_cpu.cpp) cuts the output into fixed tiles, each one
single-threaded BLAS product, so values and gradients are bit-identical on repeat and at any
thread count (fp32, fp64). On CUDA it is one cuBLAS product (csrc/cuda/fixed_mm_cuda.cu). The
backward runs through the op again: grad_a = g @ b = fixed_mm(g, b.T), grad_b = g.T @ a =
fixed_mm(g.T, a.T) (transposed views: the kernel reads them in place; each gradient in its
input's layout, as torch.mm's). Other dtypes and devices,
an install without the extension, and forward-mode AD (which the op's autograd does not carry)
compute a @ b.T with torch (no determinism promise).

The autograd of fixed_mm and fixed_cdist is C++ (csrc/autograd.cpp): the reference runs every
product through them, and at the small batches where it runs, a Python autograd.Function's
forward and backward cost more host time than the product. torch.func transforms refuse C++
autograd Functions: under them split-form Python Functions with the same backwards run.
"""
import torch

from .._tracing import forward_ad_active
from .dispatch import extension_loaded
from .pair_engine import _direct_call_ok

_OP_READY = extension_loaded() and hasattr(torch.ops.dmlkern, "fixed_mm") and hasattr(torch.ops.dmlkern, "fixed_mm_into")
# The dtypes with a kernel, per device type.
_KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64)}
if _OP_READY and torch._C._dispatch_has_kernel_for_dispatch_key("dmlkern::fixed_mm", "CUDA"):
    _KERNEL_DTYPES["cuda"] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def runs_kernel(a):
    """Whether fixed_mm of a tensor like `a` runs dmlkern's op (else torch's a @ b.T)."""
    return _OP_READY and a.dtype in _KERNEL_DTYPES.get(a.device.type, ())


def _check_inputs(a, b):
    for name, t, shape in (("a", a, "(N, D)"), ("b", b, "(M, D)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"fixed_mm: {name} must be a 2-D tensor {shape}, got {getattr(t, 'shape', type(t))}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fixed_mm: a (N, D) and b (M, D) must have the same width D, got a {tuple(a.shape)} "
                         f"and b {tuple(b.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"fixed_mm: a must be a floating-point tensor, got {a.dtype}")
    if a.dtype != b.dtype:
        raise TypeError(f"fixed_mm: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"fixed_mm: a and b must be on the same device, got {a.device} and {b.device}")


def _check_out(a, b, out):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (a.shape[0], b.shape[0]):
        raise ValueError(f"fixed_mm: out must be a tensor of shape (N, M) = {(a.shape[0], b.shape[0])}, "
                         f"got {getattr(out, 'shape', type(out))}")
    if out.dtype != a.dtype or out.device != a.device:
        raise TypeError(f"fixed_mm: out must have a's dtype {a.dtype} and device {a.device}, got {out.dtype} "
                        f"on {out.device}")
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or out.requires_grad):
        raise RuntimeError("fixed_mm: out= is not differentiable: call it under torch.no_grad() (or without "
                           "out=) when a or b requires grad")


def fixed_mm(a, b, out=None):
    """a @ b.T (N, M) in a's dtype, differentiable; bit-identical on repeat and across CPU thread
    counts where `runs_kernel(a)` (CPU fp32 / fp64; CUDA with the CUDA build). a: (N, D), b: (M, D)
    of one dtype and device; any strides (transposed views are read in place). out: an (N, M)
    tensor of a's dtype and device (any strides, sharing no memory with a or b) to write the
    product into and return, for calls without autograd: blocked loops reuse one buffer instead
    of allocating (and page-faulting) a fresh one per block. A contiguous out gets the bits of
    the call without out=; a strided one (a block of a larger buffer) may round otherwise, since
    the BLAS picks kernels by the output's layout, but the same at any thread count."""
    _check_inputs(a, b)
    if out is not None:
        _check_out(a, b, out)
        if not runs_kernel(a) or forward_ad_active():
            return torch.mm(a, b.t(), out=out)
        torch.ops.dmlkern.fixed_mm_into.default(a, b, out)
        return out
    if not runs_kernel(a) or forward_ad_active():  # (the op's autograd would drop tangents)
        return a @ b.t()
    if torch._C._are_functorch_transforms_active():
        return _FunctorchFixedMM.apply(a, b)
    return torch.ops.dmlkern.fixed_mm.default(a, b)  # its autograd: csrc/autograd.cpp


class _FunctorchFixedMM(torch.autograd.Function):
    """fixed_mm's autograd under torch.func transforms, which refuse C++ autograd Functions: the
    op below autograd, and the C++ one's backward (split form, as torch.func needs)."""

    @staticmethod
    def forward(a, b):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.dmlkern.fixed_mm.default(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = fixed_mm(b.t(), grad).t() if _column_major(a) else fixed_mm(grad, b.t())
        if ctx.needs_input_grad[1]:
            grad_b = fixed_mm(a.t(), grad.t()).t() if _column_major(b) else fixed_mm(grad.t(), a.t())
        return grad_a, grad_b


def _column_major(t):
    """A transposed view of a row-major matrix: its gradient comes back in its layout (csrc/autograd.cpp)."""
    return t.stride(0) == 1 and t.stride(1) != 1 and t.stride(1) >= t.shape[0]


if _OP_READY:
    @torch.library.register_fake("dmlkern::fixed_mm")
    def _fake(a, b):
        return a.new_empty((a.shape[0], b.shape[0]))

    @torch.library.register_fake("dmlkern::fixed_mm_into")
    def _fake_into(a, b, out):
        return None


# torch.cdist(a, b, p=2) takes its matrix-product form when either side has more than this many
# rows (compute_mode "use_mm_for_euclid_dist_if_necessary"); below it, the direct differences,
# whose bits do not depend on the thread count.
CDIST_MM_MIN_ROWS = 25
_CDIST_READY = extension_loaded() and hasattr(torch.ops.dmlkern, "fixed_cdist")


# fixed_cdist's autograd under torch.func transforms (elsewhere the op's own, csrc/autograd.cpp,
# with the same backward).
def _euclidean_forward(a, b):
    with torch._C._AutoDispatchBelowAutograd():  # this Function is the autograd
        return torch.ops.dmlkern.fixed_cdist.default(a, b)


def _euclidean_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _euclidean_backward(ctx, grad):
    a, b, dist = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True: the op's formula from differentiable ops (fixed_mm included).
        ratio = (grad / dist).masked_fill(dist == 0, 0)
        grad_a = a * ratio.sum(1, keepdim=True) - fixed_mm(ratio, b.t())
        grad_b = b * ratio.sum(0).unsqueeze(1) - fixed_mm(ratio.t(), a.t())
    else:
        grad_a, grad_b = torch.ops.dmlkern.fixed_cdist_backward.default(grad, a, b, dist)
    return grad_a if ctx.needs_input_grad[0] else None, grad_b if ctx.needs_input_grad[1] else None


_euclidean_apply = type("_FixedEuclidean", (torch.autograd.Function,), {
    "forward": staticmethod(_euclidean_forward), "setup_context": staticmethod(_euclidean_setup),
    "backward": staticmethod(_euclidean_backward)}).apply

if _CDIST_READY:
    @torch.library.register_fake("dmlkern::fixed_cdist")
    def _fake_cdist(a, b):
        return a.new_empty((a.shape[0], b.shape[0]))

    @torch.library.register_fake("dmlkern::fixed_cdist_backward")
    def _fake_cdist_backward(grad, a, b, dist):
        return torch.empty_like(a), torch.empty_like(b)


def fixed_cdist(a, b):
    """torch.cdist(a, b, p=2) for a (N, D) and b (M, D), bit-identical on repeat and across CPU
    thread counts for eager CPU fp32 / fp64 tensors: above CDIST_MM_MIN_ROWS rows, torch's
    product form and its backward (the op dmlkern::fixed_cdist: the product as fixed_mm's);
    otherwise, and for other dtypes and devices, under torch.compile, dispatch modes and
    functorch transforms other than grad / vjp, torch.cdist itself. Differentiable, to any
    order (create_graph=True differentiates the backward's formula through fixed_mm)."""
    _check_inputs(a, b)
    if (not _CDIST_READY or a.device.type != "cpu" or a.dtype not in _KERNEL_DTYPES["cpu"]
            or max(a.shape[0], b.shape[0]) <= CDIST_MM_MIN_ROWS or a.numel() == 0 or b.numel() == 0
            or not _direct_call_ok(a, b)):
        return torch.cdist(a, b, p=2)
    if torch._C._are_functorch_transforms_active():  # (they refuse the op's C++ autograd)
        return _euclidean_apply(a, b)
    return torch.ops.dmlkern.fixed_cdist.default(a, b)  # its autograd: csrc/autograd.cpp
