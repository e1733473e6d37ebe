"""dmlkern: fused, memory-lean deep-metric-learning losses, drop-in for pytorch-metric-learning."""

__version__ = "0.1.0"

from ._build_info import build_info  # noqa: F401


def __getattr__(name):
    # dmlkern.regularizers on first use: importing dmlkern alone must not import torch (bench CLI).
    if name == "regularizers":
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
