"""Shared test set-up. Without a GPU, Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported."""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
        os.environ["TRITON_INTERPRET"] = "1"

# The suite checks the fused class-weight losses at small sizes: no small-problem shortcut to the
# reference (fused/class_softmax.py; its own test sets the threshold). Subprocesses inherit it.
os.environ["DMLKERN_SMALL_CLASS_LOGITS"] = "0"

# cuBLAS repeats its bits under torch's deterministic algorithms only with a fixed workspace,
# set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_torch_on_gpu(request):
    """GPU tests compare bits (label dtypes, gradcheck's repeated backward): on CUDA, index_add
    and indexing's backward (the O(N D) steps around the kernels) add with atomics, in an order
    that varies run to run, unless torch's deterministic algorithms are on. The kernels have one
    writer per output either way; dmlkern's CPU paths are deterministic as they are (tested at
    several thread counts). warn_only: an op without a deterministic CUDA version warns."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
