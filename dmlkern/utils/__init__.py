"""PML-compatible utilities: ``common_functions`` (``COLLECT_STATS``, the global statistics switch),
``loss_and_miner_utils`` (PML's index utilities) and ``distributed`` (PML's distributed wrappers)."""
import importlib

from . import common_functions

__all__ = ["common_functions", "loss_and_miner_utils", "distributed"]


def __getattr__(name):
    # Imported on first use: it needs dmlkern.reference, which itself imports common_functions.
    if name in ("loss_and_miner_utils", "distributed"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
