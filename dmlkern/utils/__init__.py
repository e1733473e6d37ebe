"""PML-compatible utilities: ``common_functions.COLLECT_STATS`` (the global statistics switch)."""
from . import common_functions

__all__ = ["common_functions"]
