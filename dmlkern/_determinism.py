"""Reductions and epilogue maths whose bits do not depend on the CPU thread count.

On a CPU, torch splits an op over threads once it has 32768 elements or more (its grain size),
at chunk boundaries that depend on torch.get_num_threads(). Two kinds of ops then give other
bits with another thread count:

* a full reduction (`t.sum()`, `t.mean()`): each thread sums its chunk, then the partial sums
  are added, so the summation order follows the split;
* elementwise ops whose vectorised loop and scalar remainder loop differ (torch.logaddexp,
  torch.sigmoid): an element near a chunk boundary takes the scalar path with one split, the
  vector path with another (an ulp apart). exp and log1p (vectorised on the remainder too),
  +, -, *, /, max, min, where and sqrt (exact) are not affected.

`fixed_order_sum` / `fixed_order_mean` sum in chunks of a fixed size (a reduction with one
output per chunk is split over outputs: each chunk is summed by one thread, in one order),
and `logaddexp` and `log` use the unaffected ops. Off the CPU, and for other dtypes, they are the plain
torch ops (a CUDA reduction has a fixed order already).
"""
import math

import torch

from ._tracing import forward_ad_active

_GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: smaller ops run on one thread
_CHUNK = 4096  # elements per partial sum (below torch's grain size: one chunk is one thread's)


def _chunked(t):
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.numel() > _CHUNK


def fixed_order_sum(t):
    """t.sum(), summed in an order that does not depend on the thread count (module docstring)."""
    if not _chunked(t):
        return torch.sum(t)
    flat = t.reshape(-1)
    full = flat.numel() - flat.numel() % _CHUNK
    parts = flat[:full].view(-1, _CHUNK).sum(dim=1)
    if full < flat.numel():
        parts = torch.cat([parts, flat[full:].sum().unsqueeze(0)])
    return fixed_order_sum(parts)


def fixed_order_mean(t):
    """t.mean() as fixed_order_sum(t) / numel on CPU tensors past one chunk; else torch.mean."""
    if not _chunked(t):
        return torch.mean(t)
    return fixed_order_sum(t) / t.numel()


def logaddexp(a, b):
    """torch.logaddexp(a, b) (also -inf for a = b = -inf, gradient 1/2 each where a == b), on a
    CPU from ops whose bits do not depend on the thread count: max + log1p(exp(min - max))."""
    if a.device.type != "cpu" or max(a.numel(), b.numel()) < _GRAIN_SIZE:  # not split: one loop
        return torch.logaddexp(a, b)
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)
    # a == b (also both infinite, where lo - hi is NaN): log1p(exp(0)).
    return hi + torch.log1p(torch.exp(torch.where(hi == lo, 0.0, lo - hi)))


def log(t):
    """torch.log(t), on a CPU past torch's grain size from ops whose bits do not depend on the
    thread count: t = f * 2^e with f in [0.5, 1) (frexp, exact), log t = log1p(f - 1) + e log 2
    (f - 1 is exact). 0 -> -inf, inf -> inf, NaN and negatives -> NaN, as torch.log."""
    if t.device.type != "cpu" or t.numel() < _GRAIN_SIZE:  # not split: one loop
        return torch.log(t)
    mantissa, exponent = torch.frexp(t)
    return torch.log1p(mantissa - 1) + exponent.to(t.dtype) * math.log(2)


def softmax(t, dim):
    """torch.softmax(t, dim) with a backward whose bits do not depend on the thread count on a
    CPU (the op dmlkern::fixed_softmax, ops/fixed_softmax_op.py): torch's CPU softmax backward
    splits rows over threads even for small inputs and rounds by the split (e.g. fp32 100 x 100
    differs between 1 and 2 threads). Elsewhere (other devices and dtypes, no extension), and
    under torch.compile, torch.func transforms and forward-mode AD, torch.softmax."""
    from .ops import fixed_softmax_op  # (ops imports this module)

    if (not fixed_softmax_op.runs_kernel(t) or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active() or forward_ad_active()):
        return torch.softmax(t, dim)
    return fixed_softmax_op.fixed_softmax(t, dim)
