"""What the Triton kernel test modules share: `triton_device()` skips the module (saying why)
without triton or a place to run its kernels, else gives that place, "cuda" or "cpu" (the
interpreter, TRITON_INTERPRET=1); `gpu_marks(device)` marks a module's tests `gpu` on a GPU
(benchmarks/gpu_check.sh runs `-m gpu`)."""
import pytest
import torch

from dmlkern.triton import interpret_mode, triton_available


def triton_device():
    if not triton_available():
        pytest.skip("needs triton", allow_module_level=True)
    if not (torch.cuda.is_available() or interpret_mode()):
        pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_marks(device):
    return [pytest.mark.gpu] if device == "cuda" else []
