"""Eager CPU calls with fewer than DMLKERN_SMALL_PAIRS pairs (N x M; default 80 x 80, the suite
runs with 0 elsewhere: conftest.py) run the reference on the paths
whose fixed host cost is above the reference's there (fused/_common.py): SupCon and N-pairs on
all pairs, losses on listed pairs or triplets, ContrastiveLoss on a PairMarginMiner's pairs (the
miner then lists them). From that many pairs, the fused path; PML's numbers either way."""
import math
import os
import subprocess
import sys

import pytest
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch

from dmlkern import losses, miners
from dmlkern.fused import _common
from dmlkern.fused.lazy_pairs import LazyMined

THRESHOLD = 40 * 40


def _call(loss_cls, miner_cls, n, loss_kw, seed):
    """(value, x's gradient, last_backend, last_fallback) of dmlkern's call and PML's (value, gradient)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (n,), generator=g)
    out = []
    for pkg_losses, pkg_miners in ((losses, miners), (pml_losses, pml_miners)):
        xx = x.clone().requires_grad_(True)
        loss_fn = getattr(pkg_losses, loss_cls)(**loss_kw)
        tup = getattr(pkg_miners, miner_cls)()(xx, labels) if miner_cls else None
        torch.manual_seed(seed)  # triplets_per_anchor: the same random triplets
        value = loss_fn(xx, labels, tup)
        out.append((value.detach(), torch.autograd.grad(value, xx)[0], loss_fn))
    return out


CASES = {  # (loss, miner, loss kwargs): each path the rule covers (named as its SMALL_PROBLEM_SCALE key)
    "supcon": ("SupConLoss", None, {}),
    "n_pairs": ("NPairsLoss", None, {}),
    "listed_pairs": ("ContrastiveLoss", "BatchEasyHardMiner", {}),
    "listed_triplets": ("TripletMarginLoss", "BatchHardMiner", {}),
    "random_triplets": ("TripletMarginLoss", None, {"triplets_per_anchor": 1}),
    "pair_margin": ("ContrastiveLoss", "PairMarginMiner", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_small_problems_run_the_reference(monkeypatch, case):
    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", THRESHOLD)
    loss_cls, miner_cls, kw = CASES[case]
    limit = THRESHOLD * _common.SMALL_PROBLEM_SCALE.get(case, 1)  # the path's own scale (SupCon, N-pairs)
    largest = math.ceil(math.sqrt(limit)) - 1  # the largest small N (N x N pairs under the limit)
    for n in (largest, largest + 1):
        (value, grad, ours), (want, want_grad, _) = _call(loss_cls, miner_cls, n, kw, seed=n)
        torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
        if n * n < limit:
            assert ours.last_backend == "reference" and "a small problem" in ours.last_fallback, ours.last_fallback
        else:
            assert ours.last_backend not in ("reference", "zero") and ours.last_fallback is None, ours.last_fallback


def test_pair_margin_miner_lists_small_problems(monkeypatch):
    """PairMarginMiner lists a small problem's pairs as PML does (its loss then runs the
    reference on them) rather than returning its lazy pairs; PML's pairs either way."""
    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", THRESHOLD)
    for n in (39, 40):
        g = torch.Generator().manual_seed(n)
        x, labels = torch.randn(n, 8, generator=g), torch.randint(0, 5, (n,), generator=g)
        got = miners.PairMarginMiner()(x, labels)
        assert isinstance(got, LazyMined) == (n * n >= THRESHOLD), type(got)
        for a, b in zip(got, pml_miners.PairMarginMiner()(x, labels)):
            assert torch.equal(a, b)


def test_other_paths_stay_fused(monkeypatch):
    """The rule is for the measured paths only: e.g. every triplet (PML's O(N^3) reference) and
    MultiSimilarity on all pairs stay fused on small batches."""
    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", THRESHOLD)
    for loss_cls in ("TripletMarginLoss", "MultiSimilarityLoss"):
        (value, grad, ours), (want, want_grad, _) = _call(loss_cls, None, 20, {}, seed=3)
        assert ours.last_backend != "reference", ours.last_fallback
        torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-12)


SHORTCUT_CALLS = {  # (loss, miner) of each small-problem path, at N=100, D=128 (fp32)
    "SupConLoss": lambda: (losses.SupConLoss(), None),
    "NPairsLoss": lambda: (losses.NPairsLoss(), None),
    "TripletMarginLoss+BatchHardMiner": lambda: (losses.TripletMarginLoss(), miners.BatchHardMiner()),
    "ContrastiveLoss+PairMarginMiner": lambda: (losses.ContrastiveLoss(), miners.PairMarginMiner()),
    "ArcFaceLoss": lambda: (losses.ArcFaceLoss(100, 128), None),
    "ProxyNCALoss": lambda: (losses.ProxyNCALoss(100, 128), None),
}


@pytest.mark.parametrize("name", list(SHORTCUT_CALLS))
def test_small_problem_calls_are_bit_reproducible(monkeypatch, name):
    """The small-problem paths keep the determinism contract: at N=100, D=128 (fp32; thresholds
    raised to take it) MKL's product x @ x.T gives other bits at 1 and 2 threads on the AMD EPYC
    CI runs on (torch.matmul in these references fails here there); the reference's fixed_mm /
    fixed_cdist products and softmax don't."""
    import dmlkern.fused.class_softmax as class_softmax
    from test_determinism import _assert_reproducible

    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", 128 * 128)
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_LOGITS", class_softmax.DEFAULT_SMALL_PROBLEM_LOGITS)
    g = torch.Generator().manual_seed(11)
    x, labels = torch.randn(100, 128, generator=g), torch.arange(100) % 25
    torch.manual_seed(0)
    loss_fn, miner = SHORTCUT_CALLS[name]()

    def call():
        xx = x.clone().requires_grad_(True)
        value = loss_fn(xx, labels, None if miner is None else miner(xx, labels))
        assert loss_fn.last_backend == "reference" and "a small problem" in loss_fn.last_fallback, loss_fn.last_fallback
        return [value.detach(), *torch.autograd.grad(value, [xx, *loss_fn.parameters()])]

    _assert_reproducible(name, call)


def test_threshold_from_the_environment():
    """DMLKERN_SMALL_PAIRS: 80 x 80 by default (a small call runs the reference), an integer when
    set (0: never, the call stays fused; else an error naming it)."""
    code = ("import torch, dmlkern.fused._common as c; from dmlkern import losses; f = losses.SupConLoss(); "
            "f(torch.randn(6, 8), torch.arange(6) % 2); print(c.SMALL_PROBLEM_PAIRS, f.last_backend)")
    env = {k: v for k, v in os.environ.items() if k not in ("DMLKERN_SMALL_PAIRS", "TRITON_INTERPRET")}
    env["DMLKERN_TRITON_OPS"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6400", "reference"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_PAIRS": "0"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "cpp"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_PAIRS": "64"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["64", "reference"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_PAIRS": "lots"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "DMLKERN_SMALL_PAIRS must be an integer" in out.stderr


def test_small_problems_skip_the_fused_checks(monkeypatch):
    """A small problem is decided first (`small_problem_reason`, in the loss's forward): neither the
    inf scan nor the fused path's own checks run for it (their host time is what the rule saves), and
    the reference gives PML's value."""
    from dmlkern.fused import class_softmax

    monkeypatch.setattr(_common, "SMALL_PROBLEM_PAIRS", THRESHOLD)
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_LOGITS", class_softmax.DEFAULT_SMALL_PROBLEM_LOGITS)

    def refuse(*args, **kwargs):
        raise AssertionError("a fused check ran for a small problem")

    calls = [("SupConLoss", {}), ("NPairsLoss", {}), ("ArcFaceLoss", {"num_classes": 10, "embedding_size": 8}),
             ("ProxyNCALoss", {"num_classes": 10, "embedding_size": 8}),
             ("SoftTripleLoss", {"num_classes": 10, "embedding_size": 8, "centers_per_class": 2})]
    monkeypatch.setattr(_common, "has_entry", refuse)
    for name, _ in calls:
        monkeypatch.setattr(getattr(losses, name), "fused_loss_dict", refuse)
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randn(24, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (24,), generator=g)
    for name, kw in calls:
        ours, theirs = getattr(losses, name)(**kw).double(), getattr(pml_losses, name)(**kw).double()
        theirs.load_state_dict(ours.state_dict())
        value = ours(x, labels)
        assert ours.last_backend == "reference" and "a small problem" in ours.last_fallback, (name, ours.last_fallback)
        torch.testing.assert_close(value, theirs(x, labels), rtol=1e-9, atol=1e-12)
