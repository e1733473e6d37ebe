"""Shared test set-up. Without a GPU, Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET must be set before triton is first imported."""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
        os.environ["TRITON_INTERPRET"] = "1"

# The suite checks the fused paths at small sizes: no small-problem shortcut to the reference
# (opt-in, 0 by default: fused/class_softmax.py, fused/_common.py; their own tests set the
# thresholds), whatever the developer's environment says. Subprocesses inherit it.
os.environ["DMLKERN_SMALL_CLASS_LOGITS"] = "0"
os.environ["DMLKERN_SMALL_PAIRS"] = "0"

# pytest-xdist workers share the cores: each gets its share of threads (subprocesses too, through
# OMP_NUM_THREADS). Two workers of two OpenMP threads each on two cores spin at each other's
# barriers: small CPU kernels then took 10-30x their time (a 0.4 s test took 12 s). Tests of bits
# across thread counts set their counts themselves.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS

# cuBLAS repeats its bits under torch's deterministic algorithms only with a fixed workspace,
# set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(_THREADS))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Keep each xdist_group on one worker under `--dist loadgroup`. pytest-xdist marks a group
    by suffixing the node id with "@group" (item._nodeid); pytest 9 reads node ids from item._id,
    so that suffix is lost and a group's tests (test_bench's shared sweep) were spread over the
    workers. Set it where pytest 9 reads it."""
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId  # pytest >= 9
    except ImportError:  # older pytest: xdist's own suffix works
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


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
