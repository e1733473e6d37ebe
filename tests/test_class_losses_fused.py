"""The class-weight losses on the class path (dmlkern/fused/class_softmax.py: no N x C logits)
against pytorch-metric-learning 2.9.0 itself, on every engine backend: values and gradients of
the embeddings and the class weights, odd sizes over several column blocks, degenerate batches
(one sample, one class), miner weights, fp64 gradcheck, a double backward, and the memory bound."""
import subprocess
import sys
import textwrap

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

import dmlkern.fused.class_softmax as class_softmax
from dmlkern import distances, losses
from dmlkern.ops import grouped_class_op
from dmlkern.ops import pair_engine as pe
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES, dtypes_for
from _peak_allocated import PML_SLACK, PeakAllocated
from _triton_device import env_without_interpreter
from test_fused_losses import engine_backend_choice  # noqa: F401 (a fixture)

# name: (weight attribute, constructor kwargs (dmlkern, PML), PML class or None (dmlkern only))
CLASS_LOSSES = {
    "arcface": ("W", dict(margin=28.6, scale=64), "ArcFaceLoss"),
    "arcface_small": ("W", dict(margin=10.0, scale=8), "ArcFaceLoss"),
    "cosface": ("W", dict(margin=0.35, scale=64), "CosFaceLoss"),
    "sphereface": ("W", dict(margin=4, scale=1), "SphereFaceLoss"),
    "large_margin": ("W", dict(margin=3, scale=2), "LargeMarginSoftmaxLoss"),
    "normalized_softmax": ("W", dict(temperature=0.1), "NormalizedSoftmaxLoss"),
    "proxy_nca": ("proxies", dict(softmax_scale=3), "ProxyNCALoss"),
    "proxy_nca_cosine": ("proxies", dict(softmax_scale=2), "ProxyNCALoss"),
    "softmax": ("W", {}, None),
    "subcenter_arcface": ("W", dict(margin=28.6, scale=16, sub_centers=3), "SubCenterArcFaceLoss"),
    "soft_triple": ("fc", dict(centers_per_class=4, la=20, gamma=0.1, margin=0.01), "SoftTripleLoss"),
    "soft_triple_default": ("fc", {}, "SoftTripleLoss"),
}
CLASS_NAMES = {"softmax": "SoftmaxLoss"}
# (N, C, block classes): one sample, one class, several blocks with odd sizes, the last one short
CASES = [(1, 1, None), (9, 1, None), (37, 5, None), (70, 203, 64), (25, 130, 48), (20, 13, 1)]


def _ran(name, expected, dtype, device):
    """The `last_backend` a call reports: the engine backend, except that SubCenterArcFace's and
    SoftTriple's grouped blocks run a kernel only on the Triton backend and on the C++ backend for
    CPU fp32 / fp64, and torch ops ("blocked") elsewhere."""
    if name.startswith(("subcenter_arcface", "soft_triple")) and expected == "cpp" and not (
            torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)):
        return class_softmax.TORCH_BLOCKS
    return expected


def _make(name, num_classes, dim, dtype, device="cpu"):
    attr, kwargs, pml_name = CLASS_LOSSES[name]
    ours_kwargs, pml_kwargs = dict(kwargs), dict(kwargs)
    if name == "proxy_nca_cosine":
        ours_kwargs["distance"], pml_kwargs["distance"] = distances.CosineSimilarity(), pml_distances.CosineSimilarity()
    ours = getattr(losses, pml_name or CLASS_NAMES[name])(num_classes=num_classes, embedding_size=dim, **ours_kwargs)
    ours = ours.to(device=device, dtype=dtype)
    if pml_name is None:  # not in PML: dmlkern's own reference path is the yardstick
        theirs = getattr(losses, CLASS_NAMES[name])(num_classes=num_classes, embedding_size=dim)
        theirs.backend = "reference"
    else:
        theirs = getattr(pml_losses, pml_name)(num_classes=num_classes, embedding_size=dim, **pml_kwargs)
    theirs = theirs.to(device=device, dtype=dtype)
    with torch.no_grad():
        getattr(theirs, attr).copy_(getattr(ours, attr))
    return ours, theirs, attr


def _value_and_grads(loss_fn, attr, x, labels, indices_tuple=None):
    x = x.detach().clone().requires_grad_(True)
    value = loss_fn(x, labels, indices_tuple)
    return value.detach(), torch.autograd.grad(value, (x, getattr(loss_fn, attr)))


def _assert_matches(name, dtype, ours, theirs, attr, x, labels, indices_tuple=None, what=""):
    got_v, got_g = _value_and_grads(ours, attr, x, labels, indices_tuple)
    want_v, want_g = _value_and_grads(theirs, attr, x, labels, indices_tuple)
    rtol, atol = TOLERANCES[dtype]
    if name.startswith(("arcface", "cosface")) and dtype == torch.float32:
        rtol, atol = 1e-4, 1e-4  # scale 64: logits ~64, PML's own fp32 rounding is ~1e-5 of them
    for label, a, b in [("value", got_v, want_v), ("grad x", got_g[0], want_g[0]), (f"grad {attr}", got_g[1], want_g[1])]:
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{name} {what} {label}: {s}")


@pytest.fixture
def block_classes(monkeypatch):
    """Force column blocks of `classes` classes (None: the default size)."""
    def force(classes):
        if classes is not None:
            monkeypatch.setattr(class_softmax, "BLOCK_BYTES", 1)
            monkeypatch.setattr(class_softmax, "MIN_BLOCK", classes)
    return force


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_class_loss_matches_pml(engine_backend_choice, block_classes, backend, device, name):  # noqa: F811
    expected = engine_backend_choice(backend, device)
    # The Triton interpreter is slow: fp32 only (gradcheck covers fp64), a few blocks per call.
    dtypes = [torch.float32] if expected == "triton" else [torch.float32, torch.float64]
    for dtype in [dt for dt in dtypes_for(backend, device) if dt in dtypes]:
        for n, num_classes, block in CASES:
            if expected == "triton" and (n * num_classes > 4000 or block == 1):
                continue
            block_classes(block)
            g = torch.Generator().manual_seed(n + num_classes)
            x = torch.randn(n, 12, generator=g, dtype=torch.float64).to(device, dtype)
            labels = torch.randint(0, num_classes, (n,), generator=g).to(device)
            torch.manual_seed(n)
            ours, theirs, attr = _make(name, num_classes, 12, dtype, device)
            _assert_matches(name, dtype, ours, theirs, attr, x, labels, what=f"{dtype} n={n} C={num_classes}")
            ran = _ran(name, expected, dtype, device)
            assert ours.last_backend == ran, f"{name}: ran {ours.last_backend} ({ours.last_fallback})"


@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_miner_weights_match_pml(engine_backend_choice, name):  # noqa: F811
    """A miner's tuple weighs each sample (PML's convert_to_weights), on the fused path."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,), generator=g)
    mined = pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard")(x, labels)
    torch.manual_seed(0)
    ours, theirs, attr = _make(name, 6, 12, torch.float64)
    _assert_matches(name, torch.float64, ours, theirs, attr, x, labels, mined, what="mined")
    assert ours.last_backend == "cpp", ours.last_fallback


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_class_loss_gradcheck_fp64(engine_backend_choice, block_classes, backend, device, name):  # noqa: F811
    """torch.autograd.gradcheck in fp64 over two column blocks: embeddings and class weights."""
    expected = engine_backend_choice(backend, device)
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    block_classes(4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 7, (11,), generator=g).to(device)
    torch.manual_seed(0)
    loss_fn, _, attr = _make(name, 7, 5, torch.float64, device)
    if name.startswith(("arcface", "cosface")):
        loss_fn.scale = 4.0  # scale 64 makes finite differences of fp64 logits too coarse
    weight = getattr(loss_fn, attr)

    def loss(x, w):
        return torch.func.functional_call(loss_fn, {attr: w}, (x, labels))

    assert torch.autograd.gradcheck(loss, (x, weight), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=expected == "triton")
    assert loss_fn.last_backend == _ran(name, expected, torch.float64, device), loss_fn.last_fallback


def _small_fp64_case(name, n, classes, dim, seed):
    """(x, labels, ours, theirs, weight attribute) on the C++ engine."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    torch.manual_seed(0)
    return (x, labels, *_make(name, classes, dim, torch.float64))


@pytest.mark.parametrize("name", ["arcface", "proxy_nca", "large_margin"])
def test_double_backward_matches_pml(engine_backend_choice, name):  # noqa: F811
    """create_graph=True: the gradient is itself differentiable (the reference's graph)."""
    engine_backend_choice("cpp", "cpu")
    x0, labels, ours, theirs, attr = _small_fp64_case(name, 15, 4, 6, seed=2)
    results = []
    for loss_fn in (ours, theirs):
        x = x0.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(loss_fn(x, labels), x, create_graph=True)
        results.append(torch.autograd.grad((gx ** 2).sum(), (x, getattr(loss_fn, attr))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["arcface", "proxy_nca", "soft_triple", "subcenter_arcface"])
def test_torch_func_grad_runs_the_kernels(engine_backend_choice, name):  # noqa: F811
    """torch.func.grad through the class path (split-form Functions): the kernels run, and the
    gradients of the embeddings and the weights equal autograd's on PML."""
    engine_backend_choice("cpp", "cpu")
    x, labels, ours, theirs, attr = _small_fp64_case(name, 21, 5, 8, seed=4)
    weight = getattr(ours, attr).detach()
    got = torch.func.grad(lambda w, x: torch.func.functional_call(ours, {attr: w}, (x, labels)), argnums=(0, 1))(weight, x)
    assert ours.last_backend == "cpp", ours.last_fallback
    xx = x.clone().requires_grad_(True)
    want = torch.autograd.grad(theirs(xx, labels), (getattr(theirs, attr), xx))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_non_default_distance_uses_the_reference(engine_backend_choice):  # noqa: F811
    engine_backend_choice("cpp", "cpu")
    loss_fn = losses.ProxyNCALoss(4, 6, distance=distances.LpDistance(power=1)).double()
    x, labels = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "LpDistance" in loss_fn.last_fallback


@pytest.mark.parametrize("name", list(CLASS_LOSSES))
def test_small_problems_run_the_reference(monkeypatch, name):
    """Eager class-weight losses with fewer than DMLKERN_SMALL_CLASS_LOGITS logits (N x C x K; the
    suite runs with 0 elsewhere, conftest.py) run the reference, with PML's numbers; from that many, the
    blocked path."""
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_LOGITS", 2000)
    group = {"subcenter_arcface": 3, "soft_triple": 4, "soft_triple_default": 10}.get(name, 1)
    for n, classes, fused in ((12, 166 // group, False), (40, -(-2000 // (40 * group)), True)):
        assert (n * classes * group >= 2000) == fused
        ours, theirs, attr = _make(name, classes, 6, torch.float64)
        x, labels = torch.randn(n, 6, dtype=torch.float64), torch.randint(0, classes, (n,))
        _assert_matches(name, torch.float64, ours, theirs, attr, x, labels, what=f"N={n} C={classes}")
        if fused:
            assert ours.last_backend != "reference" and ours.last_fallback is None, ours.last_fallback
        else:
            assert ours.last_backend == "reference" and "a small problem" in ours.last_fallback, ours.last_fallback


@pytest.mark.parametrize("name", [n for n, spec in CLASS_LOSSES.items() if spec[2] is not None])
def test_small_problems_hold_no_more_than_pml(monkeypatch, name):
    """A small problem's reference call (forward + backward) holds at most PML's peak of tensor
    bytes (the reference must never cost more memory than PML for the same call)."""
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_LOGITS", 1 << 30)
    monkeypatch.setattr(class_softmax, "SMALL_PROBLEM_MAX_COLUMNS", 1 << 30)
    group = {"subcenter_arcface": 3, "soft_triple": 4, "soft_triple_default": 10}.get(name, 1)
    classes = 1000 // group
    ours, theirs, attr = _make(name, classes, 64, torch.float32)
    x, labels = torch.randn(256, 64), torch.randint(0, classes, (256,))
    peaks = []
    for loss_fn in (ours, theirs):
        loss_fn(x[:8], labels[:8])  # (first-call work, e.g. lazily built buffers, outside the measure)
        with PeakAllocated() as held:
            _value_and_grads(loss_fn, attr, x, labels)
        peaks.append(held.peak)
    assert ours.last_backend == "reference"
    assert peaks[0] <= peaks[1] * PML_SLACK, f"{name}: {peaks[0] / 2**20:.2f} MiB held, PML {peaks[1] / 2**20:.2f} MiB"


def test_small_problem_threshold_from_the_environment():
    """DMLKERN_SMALL_CLASS_LOGITS: 2^17 logits by default (a small call runs the reference), an
    integer when set (0: never; else an error naming it)."""
    code = ("import torch, dmlkern.fused.class_softmax as c; from dmlkern import losses; "
            "f = losses.ArcFaceLoss(10, 8); f(torch.randn(4, 8), torch.arange(4)); "
            "print(c.SMALL_PROBLEM_LOGITS, f.last_backend)")
    env = {k: v for k, v in env_without_interpreter().items() if k != "DMLKERN_SMALL_CLASS_LOGITS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(1 << 17), "reference"], out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_CLASS_LOGITS": "0"},
                         capture_output=True, text=True, check=True)
    threshold, backend = out.stdout.split()
    assert threshold == "0" and backend != "reference", out.stdout
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_CLASS_LOGITS": "4096"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["4096", "reference"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "DMLKERN_SMALL_CLASS_LOGITS": "lots"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "DMLKERN_SMALL_CLASS_LOGITS must be an integer" in out.stderr


@pytest.mark.parametrize("name", ["arcface", "softmax", "large_margin", "proxy_nca", "subcenter_arcface", "soft_triple"])
def test_reused_block_buffers_give_fresh_buffers_bits(engine_backend_choice, block_classes, monkeypatch,
                                                       name):  # noqa: F811
    """On the C++ CPU backend the column-block loop reuses its buffers (RowsScratch: the unit weight
    rows, the products under the rows' dot products) and the kernels write the rows' gradient
    straight into the block of the weights' gradient (pair_engine_backward_into,
    grouped_class_lse_backward_into): the value and the gradients are those of fresh tensors per
    block, bit for bit, over five blocks of PML's (D, C) W and the (C, D) proxies, the last block
    short, in fp32 and fp64."""
    engine_backend_choice("cpp", "cpu")
    block_classes(48)
    into_calls = []
    for module, fn in ((pe, "engine_backward_into"), (grouped_class_op, "grouped_class_lse_backward_into")):
        real = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _real=real, **k: into_calls.append(1) or _real(*a, **k))
    for dtype in (torch.float32, torch.float64):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(70, 12, generator=g, dtype=torch.float64).to(dtype)
        labels = torch.randint(0, 203, (70,), generator=g)
        torch.manual_seed(1)
        ours, _, attr = _make(name, 203, 12, dtype)
        got_v, got_g = _value_and_grads(ours, attr, x, labels)
        with monkeypatch.context() as fresh:
            fresh.setattr(class_softmax.RowsScratch, "like", lambda self, rows, slot, dtype=None: None)
            fresh.setattr(pe, "_into_ready", False)
            fresh.setattr(grouped_class_op, "_INTO_READY", False)
            want_v, want_g = _value_and_grads(ours, attr, x, labels)
        assert ours.last_backend == "cpp", ours.last_fallback
        assert torch.equal(got_v, want_v), f"{name} {dtype}: value"
        for what, a, b in (("x", got_g[0], want_g[0]), (attr, got_g[1], want_g[1])):
            assert torch.equal(a, b), f"{name} {dtype}: grad {what} differs by {(a - b).abs().max()}"
    assert into_calls, "the blocks' kernels write the rows' gradient in place"


@pytest.mark.slow
def test_class_backward_page_faults_once_per_call_not_per_block():
    """ArcFace fwd+bwd at N=256, C=131072, D=128 (eight column blocks) on the C++ CPU engine: the
    minor page faults of a call (after two warm-up calls, the weights' gradient fresh each call)
    stay below the weights' gradient plus eight blocks of BLOCK_BYTES. Block-sized tensors made
    afresh in each block are faulted in again whenever glibc trims its heap between blocks, as
    it does for three of them (~27 MiB a block, ~280 MiB a call here)."""
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")
    script = textwrap.dedent("""
        import resource
        import torch
        from dmlkern import losses
        from dmlkern.fused.class_softmax import BLOCK_BYTES

        torch.manual_seed(0)
        n, c, d = 256, 131072, 128
        x = torch.randn(n, d, requires_grad=True)
        labels = torch.randint(0, c, (n,))
        loss_fn = losses.ArcFaceLoss(num_classes=c, embedding_size=d)
        faults = []
        for step in range(4):
            loss_fn.W.grad = x.grad = None
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            loss_fn(x, labels).backward()
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 2**20)
        assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
        print(min(faults[2:]), loss_fn.W.numel() * 4 / 2**20, BLOCK_BYTES / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=env_without_interpreter(DMLKERN_BACKEND="auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    faulted_mib, weight_mib, block_mib = map(float, out.stdout.strip().splitlines()[-1].split())
    assert faulted_mib < weight_mib + 8 * block_mib, (
        f"a call faulted in {faulted_mib:.0f} MiB (weights' gradient {weight_mib:.0f} MiB, blocks of {block_mib:.0f} MiB)")


MEMORY_CLASS_LOSSES = ["ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss", "LargeMarginSoftmaxLoss",
                       "NormalizedSoftmaxLoss", "ProxyNCALoss", "SoftmaxLoss", "SubCenterArcFaceLoss",
                       "SoftTripleLoss", "CenterLoss"]
ROWS_PER_CLASS = {"SubCenterArcFaceLoss": 3, "SoftTripleLoss": 10}  # their defaults


@pytest.mark.slow
@pytest.mark.parametrize("name", MEMORY_CLASS_LOSSES)
def test_class_loss_memory_is_twice_the_weights_at_most(name):
    """fwd+bwd at N=256, C=262144, D=128 on the C++ CPU engine grows peak RSS by < 2x the class
    weights (128 MiB; one N x C fp32 logits matrix is 256 MiB, PML makes several), their gradient
    included: the peak during the call (VmHWM) against the resident set before it (VmRSS), in a
    fresh process. With
    K weight rows per class, C / K classes (the same weights); CenterLoss (its centres a buffer
    without gradient) is O(N D) on any path."""
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")
    script = textwrap.dedent(f"""
        import torch
        from dmlkern import losses

        def kib(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        torch.manual_seed(0)
        n, c, d = 256, 262144 // {ROWS_PER_CLASS.get(name, 1)}, 128
        x = torch.randn(n, d, requires_grad=True)
        labels = torch.randint(0, c, (n,))
        loss_fn = losses.{name}(num_classes=c, embedding_size=d)
        weight = next(iter(loss_fn.parameters()), None)
        if weight is None:  # CenterLoss
            weight = loss_fn.centers.requires_grad_(False)
            weight.grad = torch.zeros_like(weight)
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        loss = loss_fn(x, labels)
        loss.backward()
        after = kib("VmHWM")
        assert loss_fn.last_backend == ("reference" if "{name}" == "CenterLoss" else "cpp"), loss_fn.last_fallback
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
        print((after - before) / 1024.0, weight.numel() * weight.element_size() / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env=env_without_interpreter(DMLKERN_BACKEND="auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    growth_mib, weight_mib = map(float, out.stdout.strip().splitlines()[-1].split())
    assert growth_mib < 2 * weight_mib, f"{name}: peak RSS grew by {growth_mib:.0f} MiB (weights {weight_mib:.0f} MiB)"
