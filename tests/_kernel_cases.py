"""Backends, devices and per-dtype tolerances for kernel-vs-reference tests."""
import pytest
import torch

import dmlkern
from dmlkern.triton import interpret_mode

HAS_CUDA = torch.cuda.is_available()

# (backend, device) pairs; GPU ones skip with the reason on a machine without one.
KERNEL_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp-cpu"),
    pytest.param("triton", "cpu", id="triton-interpret",
                 marks=pytest.mark.skipif(HAS_CUDA or not interpret_mode(),
                                          reason="Triton on CPU tensors needs TRITON_INTERPRET=1 and no GPU")),
    pytest.param("cpp", "cuda", id="cpp-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]

# Value / gradient tolerances (rtol, atol) per dtype, against an fp64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def dtypes_for(backend, device):
    """dtypes each backend supports on each device."""
    if device == "cpu" and backend == "cpp":
        return [torch.float32, torch.float64]
    if device == "cpu":  # Triton interpreter: bf16 tl.dot is unreliable there
        return [torch.float32, torch.float64, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def compiled_info():
    return dmlkern.build_info()
