"""Checks shared by the tests of the blocked per-row-statistics losses (fused/ranking.py's
`row_stats` and the losses built on it): value and gradient of a call, bits at several thread
counts, the distance's statistics against PML's, peak memory of one call in a fresh process."""
import pytest
import torch

import dmlkern.fused.ranking as ranking
from _peak_rss import peak_rss_growth_mib

# (N, classes) of degenerate batches: one sample, two of one class, one class, no positive, pairs
# of two classes, five rows of two classes
DEGENERATE = [(1, 1), (2, 1), (9, 1), (9, 9), (2, 2), (5, 2)]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def value_grad(loss_fn, x, labels, **kw):
    """The loss and its gradient in x (zeros where the value has no graph)."""
    x = x.clone().requires_grad_(True)
    value = loss_fn(x, labels, **kw)
    grad = torch.autograd.grad(value, x, allow_unused=True)[0] if value.requires_grad else None
    return value.detach(), torch.zeros_like(x) if grad is None else grad


def assert_same_bits_across_threads(make_loss, x, labels, backend="blocked"):
    """Bit-identical values and gradients on repeat and at 1 or 2 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 2):
            torch.set_num_threads(t)
            loss_fn = make_loss()
            results.append(value_grad(loss_fn, x, labels))
            assert loss_fn.last_backend == backend, loss_fn.last_fallback
    finally:
        torch.set_num_threads(threads)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


def assert_distance_statistics_match(make_pair, x, labels, backend="blocked"):
    """With COLLECT_STATS on, one call of each of make_pair()'s (dmlkern, PML) losses records the
    same distance statistics (the losses are built with it on: a distance reads it at __init__)."""
    from dmlkern.utils import common_functions as c_f
    import pytorch_metric_learning.utils.common_functions as pml_c_f

    old = c_f.COLLECT_STATS, pml_c_f.COLLECT_STATS
    c_f.COLLECT_STATS = pml_c_f.COLLECT_STATS = True
    try:
        ours, pml = make_pair()
        ours(x, labels), pml(x, labels)
    finally:
        c_f.COLLECT_STATS, pml_c_f.COLLECT_STATS = old
    assert ours.last_backend == backend, ours.last_fallback
    for name in pml.distance._record_these_stats:
        torch.testing.assert_close(torch.as_tensor(getattr(ours.distance, name)),
                                   torch.as_tensor(getattr(pml.distance, name)))


_MEMORY_SETUP = """
    torch.set_num_threads(1)  # (time only: this machine's few cores are shared)
    torch.manual_seed(0)
    n, d = {n}, 64
    x = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, n // 8, (n,))
    loss_fn = {ctor}
    # warm-up on 64 rows: what torch imports on a first backward (torch.autograd.grad brings
    # torch.fx's symbolic shapes and sympy, ~35 MiB) is the process's, not the measured call's
    warm = torch.randn(64, d, requires_grad=True)
    loss_fn(warm, labels[:64] % 8).backward()
"""
_MEMORY_RUN = """
    loss = loss_fn(x, labels)
    loss.backward()
    assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
"""


def blocked_call_peak_mib(ctor, n):
    """Peak RSS growth (MiB) of one forward + backward of `ctor` (source text, e.g.
    "losses.PNPLoss()") on N random rows of width 64 in classes of ~8, which must run blocked."""
    return peak_rss_growth_mib(setup=_MEMORY_SETUP.format(ctor=ctor, n=n), measured=_MEMORY_RUN)


def assert_matches_pml(ours, pml, x, labels, pml_labels=None, backends=("blocked",)):
    """ours(x, labels) ran one of `backends` and matches PML's value (dtype too) and gradient."""
    value, grad = value_grad(ours, x, labels)
    assert ours.last_backend in backends, (ours.last_backend, ours.last_fallback)
    want_value, want_grad = value_grad(pml, x, labels if pml_labels is None else pml_labels)
    assert value.dtype == want_value.dtype
    torch.testing.assert_close(value, want_value, equal_nan=True, **TOL[x.dtype])
    torch.testing.assert_close(grad, want_grad, equal_nan=True, **TOL[x.dtype])


@pytest.fixture(params=["one_block", "row_blocks"])
def block_size(request, monkeypatch):
    """One block for the whole batch, or blocks of a row or two (the last one shorter)."""
    if request.param == "row_blocks":
        monkeypatch.setattr(ranking, "_BLOCK_VALUES", 700)
    return request.param
