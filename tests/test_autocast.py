"""The fused losses under torch.autocast follow matmul's rule: the engine's rows in the autocast
dtype (on the CPU, which has no bf16 kernel: rounded to bf16 and held in fp32), statistics in
fp32. Values against the reference under the same autocast (a tolerance per dtype); gradients
against the fp64 reference, at least as close as the reference under autocast is, or within a
few roundings of the autocast dtype; gradients in the parameters' dtype; parameters never cast
in place (PML issue #293)."""
import copy

import pytest
import torch

from dmlkern import losses, miners
from test_fused_losses import LOSSES

HAS_CUDA = torch.cuda.is_available()
# relative to the largest value / gradient entry: a few bf16 (fp16) roundings of the similarities
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
# The hinge losses' gradients are steps: a pair whose hinge argument is within a rounding of 0
# contributes its whole term on one side and nothing on the other (and moves Margin's divisor),
# whatever the dtype: their floor is a share of the largest gradient entry (one pair's term; 3.8%
# measured for Margin in fp16 and bf16, whose reference under autocast runs cdist in fp32).
HINGE_GRAD_FLOOR = {"contrastive": 6e-2, "margin": 6e-2, "margin_learn_beta_per_class": 6e-2}


def _run(loss_fn, name, x, labels, path, device, dtype):
    loss_fn = copy.deepcopy(loss_fn)
    loss_fn.backend = path
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels) if name == "multi_similarity_miner" else None
        value = loss_fn(x, labels, mined)
    value.backward()
    return loss_fn, value, x.grad


def _check(name, device, dtype):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, 16, generator=g).to(device)
    labels = torch.randint(0, 5, (48,), generator=g).to(device)
    torch.manual_seed(0)
    module = LOSSES[name](5, 16).to(device)
    params_before = {k: v.detach().clone() for k, v in module.named_parameters()}
    fused, v_fused, g_fused = _run(module, name, x, labels, "auto", device, dtype)
    ref, v_ref, g_ref = _run(module, name, x, labels, "reference", device, dtype)
    assert fused.last_backend not in ("reference", "zero"), f"{name}: ran {fused.last_backend}"
    assert ref.last_backend == "reference"
    tol = TOL[dtype]
    assert v_fused.dtype == torch.float32  # the statistics and the loss: fp32, as the embeddings
    torch.testing.assert_close(v_fused, v_ref.float(), rtol=tol, atol=tol * float(v_ref.detach().abs()))
    assert g_fused.dtype == torch.float32
    # The fp64 truth: the reference itself can be the less accurate one under autocast (fp16
    # NT-Xent: 2.8% of the largest entry off, the fused path 0.05%).
    truth = copy.deepcopy(module).double()
    truth.backend = "reference"
    x64 = x.detach().double().requires_grad_(True)
    mined = miners.MultiSimilarityMiner(epsilon=0.1)(x64, labels) if name == "multi_similarity_miner" else None
    truth(x64, labels, mined).backward()
    g_true = x64.grad.float()
    scale = float(g_true.abs().max())
    ref_error = float((g_ref.float() - g_true).abs().max())
    allowed = max(2 * ref_error, max(tol, HINGE_GRAD_FLOOR.get(name, 0.0)) * scale)
    fused_error = float((g_fused - g_true).abs().max())
    assert fused_error <= allowed, (f"{name}: gradient {fused_error:.3g} off the fp64 one (reference under autocast:"
                                    f" {ref_error:.3g}; allowed {allowed:.3g})")
    for run in (fused, ref):
        for k, p in run.named_parameters():
            assert p.dtype == torch.float32, f"{name}: {k} cast to {p.dtype}"
            assert torch.equal(p.detach(), params_before[k]), f"{name}: {k} changed"
            assert p.grad is not None and p.grad.dtype == torch.float32
    for k, p in dict(fused.named_parameters()).items():
        torch.testing.assert_close(p.grad, dict(ref.named_parameters())[k].grad, rtol=0,
                                   atol=tol * float(dict(ref.named_parameters())[k].grad.abs().max()))


@pytest.mark.parametrize("name", list(LOSSES))
def test_cpu_bf16_autocast_matches_the_reference_under_autocast(name):
    _check(name, "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_cuda_autocast_matches_the_reference_under_autocast(name, dtype):
    _check(name, "cuda", dtype)


def test_proxies_keep_their_dtype_with_half_embeddings_under_autocast():
    """Embeddings from a model under autocast are bf16; the fp32 proxies are not cast in place
    (PML's ProxyAnchor does: issue #293), and their gradient is fp32."""
    loss_fn = losses.ProxyAnchorLoss(5, 16)
    before = loss_fn.proxies.detach().clone()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 5, (32,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss_fn(x, labels)
    value.backward()
    assert loss_fn.proxies.dtype == torch.float32 and torch.equal(loss_fn.proxies.detach(), before)
    assert loss_fn.proxies.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(value)


# PML's LpDistance is torch.cdist, which autocast runs in fp32 (its fp32 list): with fp32
# embeddings PML's result under autocast is its fp32 result, and so must dmlkern's be.
# name -> (constructor kwargs, miner or None): the losses whose default distance is LpDistance,
# with the miners that mine on it.
N_CLASSES, DIM = 6, 16
EUCLIDEAN_CASES = {
    "ContrastiveLoss": ({}, None),
    "TripletMarginLoss": ({}, None),
    "TripletMarginLoss+TripletMarginMiner": ({}, ("TripletMarginMiner", {"margin": 0.2, "type_of_triplets": "semihard"})),
    "ContrastiveLoss+PairMarginMiner": ({}, ("PairMarginMiner", {"pos_margin": 0.8, "neg_margin": 1.2})),
    "MarginLoss": ({}, None),
    "LiftedStructureLoss": ({}, None),
    "GeneralizedLiftedStructureLoss": ({}, None),
    "NCALoss": ({}, None),
    "ProxyNCALoss": ({"num_classes": N_CLASSES, "embedding_size": DIM}, None),
    "FastAPLoss": ({}, None),
    "RankedListLoss": ({"margin": 0.4, "Tn": 10}, None),
    "DynamicSoftMarginLoss": ({}, None),
    "ThresholdConsistentMarginLoss": ({}, None),  # (F.cosine_similarity: not on autocast's lists either)
}


def _pml_and_ours(name, kwargs):
    import pytorch_metric_learning.losses as pml_losses
    cls = name.split("+")[0]
    torch.manual_seed(1)
    theirs = getattr(pml_losses, cls)(**kwargs)
    torch.manual_seed(1)
    ours = getattr(losses, cls)(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run_under_autocast(loss_fn, miner, x, labels):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tuples = miner(x, labels) if miner is not None else None
        value = loss_fn(x, labels, tuples)
    value.backward()
    params = {k: p.grad for k, p in loss_fn.named_parameters()}
    return value, x.grad, params


@pytest.mark.parametrize("name", list(EUCLIDEAN_CASES))
def test_cpu_autocast_euclidean_losses_are_pml_fp32_results(name):
    """Values and gradients equal PML's under the same autocast to fp32 rounding (the unit rows of
    a Euclidean distance are not rounded to bf16: ~3e-3 relative before)."""
    import pytorch_metric_learning.miners as pml_miners
    kwargs, miner = EUCLIDEAN_CASES[name]
    theirs, ours = _pml_and_ours(name, kwargs)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(48, DIM, generator=g)
    labels = torch.randint(0, N_CLASSES, (48,), generator=g)
    their_miner = getattr(pml_miners, miner[0])(**miner[1]) if miner else None
    our_miner = getattr(miners, miner[0])(**miner[1]) if miner else None
    v_pml, g_pml, p_pml = _run_under_autocast(theirs, their_miner, x, labels)
    v_ours, g_ours, p_ours = _run_under_autocast(ours, our_miner, x, labels)
    assert ours.last_backend not in ("reference", "zero"), f"{name}: ran {ours.last_backend}"
    assert v_pml.dtype == torch.float32 and v_ours.dtype == torch.float32
    torch.testing.assert_close(v_ours, v_pml, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_pml, rtol=1e-4, atol=1e-6 * float(g_pml.abs().max()))
    for k, grad in p_pml.items():
        torch.testing.assert_close(p_ours[k], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))


_CLASS = {"num_classes": N_CLASSES, "embedding_size": DIM}
# name -> (constructor kwargs, embeddings' scale)
ACCURACY_CASES = {name: (_CLASS, 1.0) for name in ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "SphereFaceLoss",
                                                   "LargeMarginSoftmaxLoss", "SubCenterArcFaceLoss"]}
ACCURACY_CASES["AngularLoss"] = ({"alpha": 10}, 0.1)  # the k u_a.u_p term dominating
ACCURACY_CASES["PNPLoss"] = ({"anneal": 0.1}, 1.0)  # (PML's bf16 similarities; dmlkern's from bf16 rows, fp32)


@pytest.mark.parametrize("name", list(ACCURACY_CASES))
def test_cpu_autocast_at_least_as_accurate_as_pml(name):
    """Under CPU bf16 autocast the gradients are as close to the fp64 truth as PML's. Before: the
    class weights' norms taken in bf16 by autocast's vecdot (ArcFace 9x PML's error), AngularLoss's
    u_a . u_p from bf16-rounded rows where PML's is an fp32 product (34x)."""
    kwargs, scale = ACCURACY_CASES[name]
    theirs, ours = _pml_and_ours(name, kwargs)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(48, DIM, generator=g) * scale
    labels = torch.randint(0, N_CLASSES, (48,), generator=g)
    _, g_pml, p_pml = _run_under_autocast(theirs, None, x, labels)
    _, g_ours, p_ours = _run_under_autocast(ours, None, x, labels)
    assert ours.last_backend not in ("reference", "zero"), f"{name}: ran {ours.last_backend}"
    truth = copy.deepcopy(theirs).double()
    x64 = x.double().requires_grad_(True)
    truth(x64, labels).backward()
    truths = {"embeddings": (x64.grad, g_pml, g_ours)}
    truths.update({k: (p.grad, p_pml[k], p_ours[k]) for k, p in truth.named_parameters()})
    for what, (true, pml_grad, our_grad) in truths.items():
        pml_error = float((pml_grad.double() - true).norm() / true.norm())
        our_error = float((our_grad.double() - true).norm() / true.norm())
        assert our_error <= 1.5 * pml_error + 1e-6, f"{name} {what}: {our_error:.3g} off fp64, PML {pml_error:.3g}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])])
@pytest.mark.parametrize("listed", [False, True], ids=["all_pairs", "listed"])
def test_fp16_autocast_ntxent_takes_pmls_fp16_floor(listed, device):
    """PML's NT-Xent adds tiny of its matrix's dtype inside the log: under fp16 autocast that is
    fp16's (a term capped at 9.7, reached at t = 0.07 on random rows), also with fp32 embeddings.
    The fused kernels floor p there too (before: fp32's floor, 8.63 against PML's 7.43)."""
    import pytorch_metric_learning.losses as pml_losses
    from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1).to(device)
    labels = torch.randint(0, 8, (64,), generator=g).to(device)
    tuple_ = None
    if listed:  # a sparse tuple (a dense one runs the reference): every 7th pair
        a1, p, a2, n = pml_lmu.get_all_pairs_indices(labels)
        tuple_ = (a1[::7], p[::7], a2[::7], n[::7])
    results = []
    ours_fn = losses.NTXentLoss(temperature=0.07)
    for loss_fn in (ours_fn, pml_losses.NTXentLoss(temperature=0.07)):
        xx = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.float16):
            value = loss_fn(xx, labels, tuple_)
        value.backward()
        results.append((value.float(), xx.grad))
    assert ours_fn.last_backend not in (None, "reference", "zero"), ours_fn.last_fallback
    ours, theirs = results
    plain = pml_losses.NTXentLoss(temperature=0.07)(x, labels, tuple_)
    assert theirs[0] < plain - 0.2, "PML's fp16 floor must lower the loss here"
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours[1], theirs[1], rtol=2e-2, atol=2e-3)
