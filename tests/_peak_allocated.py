"""The peak of the bytes held by the tensors that ops return inside a TorchDispatchMode: each
storage counted from the op that creates it until it is freed. Deterministic and exact to the
tensor, where the process's RSS (tests/_peak_rss.py) shows the allocator's noise at small sizes;
blind to a kernel's internal scratch, so it compares torch-op paths (the reference, PML)."""
import weakref

from torch.utils._python_dispatch import TorchDispatchMode
import torch


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
