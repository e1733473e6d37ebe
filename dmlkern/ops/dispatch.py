"""Backend selection shared by every fused op.

Backends: "cpp" (the C++ extension: CPU kernels, or CUDA kernels for CUDA tensors),
"triton" (GPU, or CPU tensors under TRITON_INTERPRET=1) and "reference" (materialising
PyTorch). "auto" picks Triton for CUDA tensors (C++ CUDA if Triton is missing) and C++
for CPU tensors. The DMLKERN_BACKEND environment variable overrides "auto".
"""
import logging
import os

import torch

from ..triton import interpret_mode, triton_available, triton_ops_wanted

log = logging.getLogger("dmlkern")

BACKENDS = ("auto", "cpp", "triton", "reference")


from .._build_info import _load_extension  # noqa: E402

_EXTENSION_LOADED = _load_extension() is not None  # loaded once: torch.compile cannot trace imports


def extension_loaded() -> bool:
    return _EXTENSION_LOADED


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("cpp", "triton" or "reference") for a call on `device`."""
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("DMLKERN_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"DMLKERN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_ops_wanted():
            backend = "triton"
        elif extension_loaded() and device.type in ("cpu", "cuda"):
            backend = "cpp"
        else:
            backend = "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton is not installed")
        if device.type != "cuda" and not interpret_mode():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before importing "
                "triton) to run on CPU tensors"
            )
    if backend == "cpp" and not extension_loaded():
        raise RuntimeError("backend='cpp' but the dmlkern._C extension is not built")
    return backend


def log_debug(msg, *args):
    """Backend choices are logged at DEBUG; skipped under torch.compile (a log call would be a
    graph break there), which also keeps torch._dynamo out of `import dmlkern` (~1 s)."""
    if not torch.compiler.is_compiling():
        log.debug(msg, *args)
