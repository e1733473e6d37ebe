"""Triton kernels: the main GPU path. On a machine without a GPU they run under
TRITON_INTERPRET=1 on CPU tensors (set before triton is imported), which is how CI tests them."""
import functools
import os
import sys


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_AVAILABLE = _probe_triton()  # probed once: torch.compile cannot trace imports


def triton_available() -> bool:
    return _TRITON_AVAILABLE


# A GPU driver's device files: looked up instead of asking torch.cuda, which at import time would
# initialise CUDA and so poison fork for the user's process.
_GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/kfd", "/dev/dxg")


@functools.cache  # decided once: the ops are registered at import, and "auto" asks on every call
def triton_ops_wanted() -> bool:
    """Whether the Triton kernels can run here: under the interpreter, or where a GPU driver is
    installed (assumed off Linux); DMLKERN_TRITON_OPS=1 / 0 says so instead (1: to trace the GPU
    path on fake CUDA tensors on a machine without a GPU). Otherwise the Triton ops are not
    registered at import: registering one (torch.library.triton_op) imports torch._dynamo and
    torch._inductor (~1 s), and on CUDA tensors "auto" picks the C++ CUDA kernels."""
    if not _TRITON_AVAILABLE:
        return False
    forced = os.environ.get("DMLKERN_TRITON_OPS", "")
    if forced in ("0", "1"):
        return forced == "1"
    if interpret_mode() or not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(path) for path in _GPU_DRIVER_FILES)
