"""The reference path and the miners never hold more memory than PML 2.9.0 for the same call:
the reference is where dmlkern falls back (degenerate or unsupported inputs, small class
problems), and a fallback or miner that costs more than the library it replaces would not be a
drop-in. Peak tensor bytes (tests/_peak_allocated.py: deterministic, exact to the tensor) of one
forward + backward of each loss with `backend="reference"`, and of each miner's call with its
tuple listed, against PML's, at small batches where PML's N x N (or N^3) tensors are smallest
next to dmlkern's own index tensors and blocks. (The class-weight losses' small problems:
tests/test_class_losses_fused.py.)"""
import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from dmlkern import losses
from _peak_allocated import PML_SLACK, PeakAllocated

# Not here: MarginLoss, whose reference lists its triplets in O(#triplets) index tensors where
# PML builds an N^3 mask: ~3 % more than PML at N <= 128, 27 % less at N = 256.
LOSSES = ["AngularLoss", "CircleLoss", "ContrastiveLoss", "FastAPLoss", "GeneralizedLiftedStructureLoss",
          "HistogramLoss", "InstanceLoss", "IntraPairVarianceLoss", "LiftedStructureLoss", "MultiSimilarityLoss",
          "NCALoss", "NPairsLoss", "NTXentLoss", "SignalToNoiseRatioContrastiveLoss", "SmoothAPLoss", "SupConLoss",
          "TripletMarginLoss", "TupletMarginLoss", "PNPLoss", "ThresholdConsistentMarginLoss"]


def _peak(loss_fn, x, labels):
    x = x.detach().clone().requires_grad_(True)
    loss_fn(x, labels).backward()  # (first-call work outside the measure)
    x.grad = None
    with PeakAllocated() as held:
        loss_fn(x, labels).backward()
    return held.peak


@pytest.mark.parametrize("name", LOSSES)
def test_reference_holds_no_more_than_pml(name):
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=1)
    # classes of 8 (SmoothAP needs equal classes); NT-Xent's SimCLR pairs
    labels = torch.arange(64) % 32 if name == "NTXentLoss" else torch.arange(64) // 8
    ours = getattr(losses, name)()
    ours.backend = "reference"
    ours_peak, pml_peak = _peak(ours, x, labels), _peak(getattr(pml_losses, name)(), x, labels)
    assert ours.last_backend == "reference"
    assert ours_peak <= pml_peak * PML_SLACK, f"{name}: {ours_peak / 2**10:.1f} KiB held, PML {pml_peak / 2**10:.1f} KiB"


MINERS = ["TripletMarginMiner", "BatchHardMiner", "BatchEasyHardMiner", "PairMarginMiner", "MultiSimilarityMiner",
          "AngularMiner", "HDCMiner", "DistanceWeightedMiner", "UniformHistogramMiner"]


def _miner_peak(miner, x, labels):
    def run():
        torch.manual_seed(1)
        out = miner(x, labels)
        return tuple(out.materialize() if hasattr(out, "materialize") else out)  # the tuple PML returns

    run()
    with PeakAllocated() as held:
        run()
    return held.peak


# (PML's AngularMiner holds ~700 MiB at N=256: N=64 only)
@pytest.mark.parametrize("name,n", [(m, 64) for m in MINERS] + [(m, 256) for m in MINERS if m != "AngularMiner"])
def test_miner_holds_no_more_than_pml(name, n):
    """Every miner's call, its tuple listed (a lazy result materialised, as when PML's loss reads
    it), holds at most PML's peak: the blocked miners' blocks and bookkeeping stay within PML's
    N x M (or N^3) tensors at small sizes too."""
    from dmlkern import miners
    from pytorch_metric_learning import miners as pml_miners

    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.normalize(torch.randn(n, 32, generator=g), dim=1)
    labels = torch.arange(n) // 8
    ours_peak = _miner_peak(getattr(miners, name)(), x, labels)
    pml_peak = _miner_peak(getattr(pml_miners, name)(), x, labels)
    assert ours_peak <= pml_peak * PML_SLACK, f"{name}: {ours_peak / 2**10:.1f} KiB held, PML {pml_peak / 2**10:.1f} KiB"


def test_blocked_triplet_mining_does_not_grow_the_heap():
    """Under glibc's default allocator (peak RSS, not tensor bytes): the reference TripletMarginMiner
    walks anchor blocks and keeps each block's triplets. With each block's temporaries allocated
    and freed anew, the kept triplets pinned them in the heap and the process grew by a block
    (16 MiB) per block: 3.6 GiB at N=1024 for 89 MiB of triplets, out of memory at N=2048 (PML:
    1.4 and 2.2 GiB). With one set of block buffers it holds about twice the result."""
    from _peak_rss import peak_rss_growth_mib

    setup = """
        from dmlkern import distances
        from dmlkern.reference.miners import triplet_margin_miner
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 128, generator=g)
        labels = torch.randint(0, 128, (1024,), generator=g)
        mat = distances.CosineSimilarity()(x, x)
    """
    measured = """
        a, p, n = triplet_margin_miner(mat, labels, labels, 0.2, "semihard", True)
        result_mib = 3 * a.numel() * 8 / 2**20
        assert 60 < result_mib < 120, result_mib  # (the bound below is sized by it)
    """
    growth = peak_rss_growth_mib(setup, measured)
    assert growth < 4 * 89 + 64, f"{growth:.0f} MiB of peak RSS growth for ~89 MiB of triplets"
