"""dmlkern: fused, memory-lean deep-metric-learning losses, drop-in for pytorch-metric-learning."""

__version__ = "0.1.0"

from ._build_info import build_info  # noqa: F401
