"""Triton kernels: the main GPU path. On a machine without a GPU they run under
TRITON_INTERPRET=1 on CPU tensors (set before triton is imported), which is how CI tests them."""
import os


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
