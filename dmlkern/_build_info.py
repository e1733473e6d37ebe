"""What this install compiled and what can run now."""
import importlib


def _load_extension():
    try:
        return importlib.import_module("dmlkern._C")
    except ImportError:
        return None


def build_info() -> dict:
    """Return which backends were compiled (cpu, cuda + arch list) and which can run on this machine."""
    import torch

    ext = _load_extension()
    compiled = dict(ext.compiled_info()) if ext is not None else {}
    try:
        import triton  # noqa: F401

        triton_available = True
    except ImportError:
        triton_available = False
    from .triton import interpret_mode

    cuda_present = torch.cuda.is_available()
    return {
        "version": __import__("dmlkern").__version__,
        "extension_loaded": ext is not None,
        "cpu": bool(compiled.get("cpu", False)),
        "cuda": bool(compiled.get("cuda", False)),
        "cuda_arch_list": compiled.get("cuda_arch_list", ""),
        "triton_available": triton_available,
        "triton_interpret": interpret_mode(),
        "can_run": {
            "cpu": bool(compiled.get("cpu", False)),
            "cuda": bool(compiled.get("cuda", False)) and cuda_present,
            "triton": triton_available and (cuda_present or interpret_mode()),
        },
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
