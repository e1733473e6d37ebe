"""PML-compatible utilities, under PML's module names:

* ``common_functions``: PML's ``c_f`` helpers, and ``COLLECT_STATS`` (the global statistics switch);
* ``loss_and_miner_utils``: PML's index utilities (``lmu``);
* ``module_with_records``, ``module_with_records_and_reducer``: the base classes for writing a
  loss, miner or regularizer PML-style;
* ``distributed``: PML's distributed wrappers.

PML's trainer / tester / logging modules (``accuracy_calculator``, ``inference``, ``key_checker``,
``logging_presets``, ``loss_tracker``) are not part of dmlkern.
"""
import importlib

from . import common_functions

_LAZY = ("loss_and_miner_utils", "module_with_records", "module_with_records_and_reducer", "distributed")
__all__ = ["common_functions", *_LAZY]


def __getattr__(name):
    # Imported on first use: they need dmlkern.reference / reducers / distances, which themselves
    # import common_functions.
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
