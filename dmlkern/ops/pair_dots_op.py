"""The two products of a sparse matrix given as listed row pairs (the ops `dmlkern::pair_dots`
and `pair_row_sums`, csrc/cpu/pair_dots_cpu.cpp), without gathering the rows:
pair_dots(a, b, i, j)[p] = <a[i[p]], b[j[p]]>, and pair_row_sums(b, i, j, w, scale, out)[r] =
(sum over the pairs p of row r = i[p] of w[p] b[j[p]]) * scale[r]. AngularLoss's blocked path
(fused/angular.py) takes each positive pair's sum over the reference rows, and its gradient's
sums over each row's positive pairs, this way.

No autograd: callers use them only where no graph is recorded (`runs_kernel`). Each sum runs in
a fixed order (pair_dots' in double, pair_row_sums' per entry in the input's dtype), so the bits
depend neither on the thread count nor on the CPU's vector width.
"""
import torch

from .._tracing import static_shapes
from .dispatch import extension_loaded
from .pair_engine import _direct_call_ok

_OP_READY = (extension_loaded() and hasattr(torch.ops.dmlkern, "pair_dots")
             and hasattr(torch.ops.dmlkern, "pair_row_sums"))

if _OP_READY:
    @torch.library.register_fake("dmlkern::pair_dots")
    def _fake_pair_dots(a, b, i, j):
        return a.new_empty((i.shape[0],))

    @torch.library.register_fake("dmlkern::pair_row_sums")
    def _fake_pair_row_sums(b, i, j, w, scale, out):
        return None


def runs_kernel(a, b):
    """Whether pair_dots and pair_row_sums may run on rows like a and b: the ops are built, they are
    eager plain CPU fp32 / fp64 2-D tensors of one dtype, and no graph is being recorded for them."""
    if not _OP_READY or static_shapes() or not _direct_call_ok(a, b):
        return False
    if a.device.type != "cpu" or b.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    return a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype


def pair_dots(a, b, i, j):
    """(P,) in a's dtype: <a[i[p]], b[j[p]]> for a (R, K), b (Q, K), i and j (P,) int64."""
    return torch.ops.dmlkern.pair_dots.default(a, b, i, j)


def pair_row_sums(b, i, j, w, scale, out):
    """out (R, K) = per row r, the sum over the pairs p with i[p] == r (in listed order) of
    w[p] * b[j[p]], times scale[r] where scale (R, K) is given; 0 for a row of no pair. out: b's
    dtype, contiguous rows, sharing no memory with b or scale. Returns out."""
    torch.ops.dmlkern.pair_row_sums.default(b, i, j, w, scale, out)
    return out
