"""InstanceLoss on the class path and P2SGradLoss's Gram form: PML's values and gradients without
an N x N (N x C) buffer."""
import pytest
import torch

from dmlkern import losses
from _kernel_cases import KERNEL_BACKENDS
from _peak_rss import peak_rss_growth_mib

PL = pytest.importorskip("pytorch_metric_learning.losses", reason="needs pytorch-metric-learning for parity")

CASES = [("InstanceLoss", {}), ("InstanceLoss", {"gamma": 10}),
         ("P2SGradLoss", {"descriptors_dim": 12, "num_classes": 7})]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def _run(module, x, labels):
    xx = x.clone().requires_grad_()
    value = module(xx, labels)
    value.backward()
    weight_grad = module.weight.grad.clone() if hasattr(module, "weight") else None
    return value.detach(), xx.grad, weight_grad


def _pair(name, kw, dtype):
    torch.manual_seed(0)
    ours = getattr(losses, name)(**kw).to(dtype)
    torch.manual_seed(0)
    return ours, getattr(PL, name)(**kw).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n", [1, 2, 37, 301])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[1].get('gamma', '')}")
def test_matches_pml(case, n, dtype):
    name, kw = case
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    labels = torch.randint(0, 7, (n,), generator=g)
    ours, pml = _pair(name, kw, dtype)
    got, want = _run(ours, x, labels), _run(pml, x, labels)
    assert ours.last_backend == ("gram" if name == "P2SGradLoss" else "cpp"), ours.last_fallback
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, **TOL[dtype])
    if name == "P2SGradLoss":  # the weight renormalised in place once per call, as PML
        torch.testing.assert_close(ours.weight.detach(), pml.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_instance_loss_backends(backend, device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(45, 8, generator=g, dtype=torch.float32)
    labels = torch.randint(0, 6, (45,), generator=g)
    ours, pml = _pair("InstanceLoss", {"gamma": 16}, torch.float32)
    ours.backend = backend
    got = _run(ours, x.to(device), labels.to(device))
    want = _run(pml, x, labels)
    assert ours.last_backend == backend
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)


def test_labels_float_and_same_class():
    x = torch.randn(20, 6, dtype=torch.float64)
    for labels in (torch.full((20,), 3.0), torch.arange(20) % 4 + 0.5):
        ours, pml = _pair("InstanceLoss", {}, torch.float64)
        torch.testing.assert_close(_run(ours, x, labels)[1], _run(pml, x, labels)[1], **TOL[torch.float64])
        assert ours.last_backend == "cpp"


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (9,), generator=g)
    instance = losses.InstanceLoss(gamma=4)
    assert torch.autograd.gradcheck(lambda t: instance(t, labels), (x,))
    p2s = losses.P2SGradLoss(5, 3).double()  # (its weight is renormalised in each call: x only)
    assert torch.autograd.gradcheck(lambda t: p2s(t, labels), (x,))
    assert p2s.last_backend == "gram"


def test_bit_identical_across_thread_counts():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(700, 32, generator=g)
    labels = torch.randint(0, 50, (700,), generator=g)
    before = torch.get_num_threads()
    for name, kw in [("InstanceLoss", {}), ("P2SGradLoss", {"descriptors_dim": 32, "num_classes": 5000})]:
        results = []
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            results.append(_run(getattr(losses, name)(**kw), x, labels))
        torch.set_num_threads(before)
        for other in results[1:]:
            for a, b in zip(results[0], other):
                if a is not None:
                    assert torch.equal(a, b), name


def test_declines():
    x = torch.randn(10, 6)
    labels = torch.arange(10) % 3
    p2s = losses.P2SGradLoss(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p2s(x, labels)
    assert p2s.last_backend == "reference" and "autocast" in p2s.last_fallback
    instance = losses.InstanceLoss()
    instance.backend = "reference"
    instance(x, labels)
    assert instance.last_backend == "reference"
    p2s.weight.data[:, 1] = 0  # renorm only shrinks columns: a zero one stays zero
    with pytest.raises(AssertionError, match="unit norm"):  # PML's assertion, on the fused path too
        p2s(x, labels)


@pytest.mark.parametrize("name", ["InstanceLoss", "P2SGradLoss"])
def test_peak_memory_at_16384(name):
    """One N x N (N x C) fp32 matrix would be 1 GiB; PML materialises several."""
    setup = f"""
        torch.manual_seed(0)
        n = 16384
        x = torch.randn(n, 64, requires_grad=True)
        labels = torch.randint(0, 16384, (n,))
        loss_fn = losses.InstanceLoss() if "{name}" == "InstanceLoss" else losses.P2SGradLoss(64, 16384)
    """
    measured = """
        loss_fn(x, labels).backward()
        assert loss_fn.last_backend in ("cpp", "gram"), loss_fn.last_fallback
    """
    assert peak_rss_growth_mib(setup, measured) < 256
