"""The peak of the bytes held by the tensors that ops return inside a TorchDispatchMode: each
storage counted from the op that creates it until it is freed. Deterministic and exact to the
tensor, where the process's RSS (tests/_peak_rss.py) shows the allocator's noise at small sizes;
blind to a kernel's internal scratch, so it compares torch-op paths (the reference, PML)."""
import weakref

from torch.utils._python_dispatch import TorchDispatchMode
import torch

# How far a path may hold above PML's peak and still count as "no more than PML": autograd's node
# order can keep a small per-pair vector alive a step longer than PML's graph does
# (ContrastiveLoss: 1.8 KiB of 144 KiB at N=64); the bugs these checks catch hold a whole extra
# N x N or N x C tensor (+6 % to +23 %).
PML_SLACK = 1.015


class PeakAllocated(TorchDispatchMode):
    """`with PeakAllocated() as held: ...`, then `held.peak` (bytes)."""

    def __init__(self):
        super().__init__()
        self.live, self.held, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                self.live[key] = size
                self.held += size
                self.peak = max(self.peak, self.held)
                weakref.finalize(t.untyped_storage(), self._free, key)
        return out

    def _free(self, key):
        self.held -= self.live.pop(key, 0)
