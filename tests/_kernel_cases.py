"""Backends, devices and per-dtype tolerances for kernel-vs-reference tests.

KERNEL_BACKENDS parametrises "backend,device"; kernel_dtype_cases() parametrises
"backend, device, dtype, atol, rtol" with one test id per backend and dtype."""
import pytest
import torch

from dmlkern.ops.dispatch import extension_loaded
from dmlkern.triton import interpret_mode

HAS_CUDA = torch.cuda.is_available()
NO_EXTENSION = pytest.mark.skipif(not extension_loaded(), reason="needs the dmlkern._C extension built for this torch")

# (backend, device) pairs; GPU ones skip with the reason on a machine without one.
KERNEL_BACKENDS = [
    pytest.param("cpp", "cpu", id="cpp-cpu", marks=NO_EXTENSION),
    pytest.param("triton", "cpu", id="triton-interpret",
                 marks=pytest.mark.skipif(HAS_CUDA or not interpret_mode(),
                                          reason="Triton on CPU tensors needs TRITON_INTERPRET=1 and no GPU")),
    pytest.param("cpp", "cuda", id="cpp-cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"), NO_EXTENSION]),
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


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def kernel_dtype_cases(exclude=(), per_backend=None):
    """pytest.param(backend, device, dtype, atol, rtol, id="<backend>-<dtype>") for every
    KERNEL_BACKENDS entry and each dtype of dtypes_for, with the backend's marks (GPU ones skip
    with "needs a CUDA device"). exclude: dtypes left out; per_backend: only the first that many
    of each backend's dtypes."""
    cases = []
    for backend_param in KERNEL_BACKENDS:
        backend, device = backend_param.values
        dtypes = [dt for dt in dtypes_for(backend, device) if dt not in exclude][:per_backend]
        for dtype in dtypes:
            rtol, atol = TOLERANCES[dtype]
            cases.append(pytest.param(backend, device, dtype, atol, rtol, marks=backend_param.marks,
                                      id=f"{backend_param.id}-{_dtype_id(dtype)}"))
    return cases


KERNEL_DTYPE_CASES = kernel_dtype_cases()
