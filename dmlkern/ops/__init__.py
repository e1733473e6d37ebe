"""Custom ops (autograd, fake tensors, backend dispatch) over the C++ and Triton kernels."""
from .dispatch import resolve_backend  # noqa: F401
from .fixed_mm_op import fixed_cdist, fixed_mm  # noqa: F401
from .masked_lse_op import masked_lse  # noqa: F401
from .pair_engine import engine_forward  # noqa: F401
