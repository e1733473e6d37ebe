"""Shared test set-up. Without a GPU, Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported."""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
        os.environ["TRITON_INTERPRET"] = "1"
