"""Fused losses (dmlkern/fused) against the reference path of the same classes, on every
engine backend: values and gradients, ref_emb, degenerate batches, the lazy miner."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import dmlkern.fused._common as fused_common
import dmlkern.fused.lifted as fused_lifted
from dmlkern import _tracing
import dmlkern.miners.multi_similarity_miner as ms_miner_module
from dmlkern import losses, miners
from dmlkern.fused.lazy_pairs import LazyMinedPairs
from dmlkern.ops import pair_engine as pe
from dmlkern.reducers import AvgNonZeroReducer, MeanReducer, SumReducer
from _kernel_cases import KERNEL_BACKENDS, TOLERANCES, dtypes_for
from _triton_device import env_without_interpreter

# The engine's own reference ("engine-reference") checks the epilogues independently of kernels.
BACKENDS = [pytest.param("engine-reference", "cpu", id="engine-reference")] + KERNEL_BACKENDS

LOSSES = {
    "multi_similarity": lambda c, d: losses.MultiSimilarityLoss(alpha=2, beta=10, base=0.5),
    "multi_similarity_miner": lambda c, d: losses.MultiSimilarityLoss(),
    "supcon": lambda c, d: losses.SupConLoss(temperature=0.3),
    "ntxent": lambda c, d: losses.NTXentLoss(temperature=0.2),
    "generalized_lifted": lambda c, d: losses.GeneralizedLiftedStructureLoss(neg_margin=0.9, pos_margin=0.1),
    "lifted": lambda c, d: losses.LiftedStructureLoss(neg_margin=1.1, pos_margin=0.05),
    "lifted_avg_nonzero": lambda c, d: losses.LiftedStructureLoss(neg_margin=0.2, pos_margin=4.3,
                                                                  reducer=AvgNonZeroReducer()),
    "npairs": lambda c, d: losses.NPairsLoss(),
    "proxy_anchor": lambda c, d: losses.ProxyAnchorLoss(c, d, margin=0.1, alpha=16),
    "nca": lambda c, d: losses.NCALoss(softmax_scale=2),
    "tuplet_margin": lambda c, d: losses.TupletMarginLoss(margin=5.73, scale=16),
    "contrastive": lambda c, d: losses.ContrastiveLoss(pos_margin=0.2, neg_margin=1.3),
    "margin": lambda c, d: losses.MarginLoss(margin=0.2, beta=1.3),
    "margin_learn_beta_per_class": lambda c, d: losses.MarginLoss(margin=0.1, nu=0.05, beta=1.2, learn_beta=True,
                                                                  num_classes=c),
}
# The losses whose reference takes LpDistance's torch.cdist (no bf16 on the CPU).
CDIST_REFERENCE = {"generalized_lifted", "lifted", "lifted_avg_nonzero", "contrastive", "margin",
                   "margin_learn_beta_per_class", "nca"}
NO_REF_EMB = {"npairs", "proxy_anchor", "lifted", "lifted_avg_nonzero"}  # lifted with ref_emb: the reference

# (N, classes, with ref_emb of M rows or None). Degenerate: one sample, no positives, one class.
CASES = [(1, 1, None), (9, 9, None), (12, 1, None), (37, 5, None), (70, 6, 53)]


@pytest.fixture
def engine_backend_choice(monkeypatch):
    """Force the fused path onto a given engine backend (or the materialising engine)."""
    def force(backend, device):
        if backend == "engine-reference":
            pick = lambda tensor, requested: "reference"  # noqa: E731
            monkeypatch.setattr(fused_common, "engine_backend", pick)
            monkeypatch.setattr(ms_miner_module, "engine_backend", pick)
            return "reference"
        if backend not in pe.available_backends():
            pytest.fail(f"the {backend} pair engine is not registered in this build")
        monkeypatch.setenv("DMLKERN_BACKEND", backend)
        return backend
    return force


def _run(loss_fn, name, x, labels, ref, ref_labels, path):
    x = x.detach().clone().requires_grad_(True)
    ref = None if ref is None else ref.detach().clone().requires_grad_(True)
    loss_fn.backend = "reference" if path == "reference" else "auto"
    args = (x, labels, None, ref, ref_labels)
    if name == "multi_similarity_miner":
        mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, ref, ref_labels)
        args = (x, labels, mined, ref, ref_labels)
    value = loss_fn(*args)
    wrt = [x] + ([ref] if ref is not None else []) + [p for p in loss_fn.parameters()]
    grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fused_matches_reference(engine_backend_choice, backend, device, name):
    _check_against_reference(engine_backend_choice(backend, device), backend, device, name)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_static_shape_paths_match_reference(engine_backend_choice, monkeypatch, backend, device, name):
    """The code paths torch.compile traces (tensor-valued degenerate-batch zeros, N-pairs over
    all sorted positions, tensor divisors), run eagerly on every backend."""
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    _check_against_reference(engine_backend_choice(backend, device), backend, device, name)


def _check_against_reference(expected, backend, device, name):
    dtypes = [torch.float64] if backend == "engine-reference" else dtypes_for(backend, device)
    for dtype in dtypes:
        half = dtype in (torch.float16, torch.bfloat16)
        if half and device == "cpu":
            continue  # no CPU half kernels: the reference runs (test_half_precision_on_cpu_runs_the_reference)
        for n, classes, m in CASES:
            if m is not None and name in NO_REF_EMB:
                continue
            g = torch.Generator().manual_seed(n * 7 + classes)
            x = torch.randn(n, 16, generator=g, dtype=torch.float64).to(device, dtype)
            labels = torch.randint(0, classes, (n,), generator=g).to(device)
            ref = ref_labels = None
            if m is not None:
                ref = torch.randn(m, 16, generator=g, dtype=torch.float64).to(device, dtype)
                ref_labels = torch.randint(0, classes, (m,), generator=g).to(device)
            torch.manual_seed(0)
            loss_fn = LOSSES[name](classes, 16).to(device=device, dtype=dtype)
            if half:
                # Yardstick: the fp32 reference on the same (rounded) inputs and parameters.
                wide = copy.deepcopy(loss_fn).float()
                want_v, want_g = _run(wide, name, x.float(), labels, None if ref is None else ref.float(),
                                      ref_labels, "reference")
            else:
                want_v, want_g = _run(loss_fn, name, x, labels, ref, ref_labels, "reference")
            got_v, got_g = _run(loss_fn, name, x, labels, ref, ref_labels, "fused")
            if half:
                got_v, got_g = got_v.float(), [gr.float() for gr in got_g]
            what = f"{name} {dtype} n={n} classes={classes} ref={m}"
            assert loss_fn.last_backend in (expected, "zero"), f"{what}: ran {loss_fn.last_backend}"
            if loss_fn.last_backend == "zero":
                assert want_v == 0, what  # degenerate batches: the reference's zero, not a fused value
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(got_v, want_v, rtol=rtol, atol=atol, msg=lambda s: f"{what} value: {s}")
            for k, (a, b) in enumerate(zip(got_g, want_g)):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{what} grad {k}: {s}")


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck_fp64(engine_backend_choice, backend, device, name):
    """torch.autograd.gradcheck of each fused loss class in fp64: the kernels' gradients against
    finite differences, for embeddings, ref_emb and ProxyAnchor's proxies."""
    expected = engine_backend_choice(backend, device)
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.randint(0, 3, (13,), generator=g).to(device)
    refs = [(None, None)]
    if name not in NO_REF_EMB:
        refs.append((torch.randn(9, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True),
                     torch.randint(0, 3, (9,), generator=g).to(device)))
    torch.manual_seed(0)
    loss_fn = LOSSES[name](3, 5).to(device=device, dtype=torch.float64)
    for ref, ref_labels in refs:
        def loss(x, *rest):
            r = ref if ref is None else rest[0]
            mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, r, ref_labels) \
                if name == "multi_similarity_miner" else None
            params = {"proxies": rest[-1]} if name == "proxy_anchor" else {}
            return torch.func.functional_call(loss_fn, params, (x, labels, mined, r, ref_labels))

        inputs = (x,) + (() if ref is None else (ref,)) + tuple(loss_fn.parameters())
        # fast_mode (random projections) for Triton: the interpreter is slow; the C++ CPU kernels
        # get the full Jacobian.
        assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5,
                                        fast_mode=expected == "triton"), name
        assert loss_fn.last_backend == expected, f"{name}: ran {loss_fn.last_backend}"


def test_cpp_large_odd_non_contiguous_and_deterministic(engine_backend_choice):
    """The C++ engine past its row block (128) with odd sizes: N=151, ref_emb of M=139 rows,
    D=37, embeddings given as non-contiguous views; against the reference. The same call again,
    and with one thread instead of two, gives bit-identical values and gradients (no atomics)."""
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(41)
    x = torch.randn(37, 151, generator=g, dtype=torch.float64).T  # column-major view
    ref = torch.randn(139, 74, generator=g, dtype=torch.float64)[:, ::2]  # strided view
    # ~4 per class: the reference's O(pairs x N) (lifted, NT-Xent, tuplet: PML's maths) stays quick
    labels = torch.randint(0, 38, (151,), generator=g)
    ref_labels = torch.randint(0, 38, (139,), generator=g)
    assert not x.is_contiguous() and not ref.is_contiguous()
    threads = torch.get_num_threads()
    for name in LOSSES:
        for r, rl in [(None, None)] + ([] if name in NO_REF_EMB else [(ref, ref_labels)]):
            torch.manual_seed(0)
            loss_fn = LOSSES[name](38, 37).double()
            what = f"{name} ref_emb={r is not None}"
            want_v, want_g = _run(loss_fn, name, x, labels, r, rl, "reference")
            got_v, got_g = _run(loss_fn, name, x, labels, r, rl, "fused")
            assert loss_fn.last_backend == "cpp", f"{what}: ran {loss_fn.last_backend}"
            torch.testing.assert_close(got_v, want_v, rtol=1e-9, atol=1e-11, msg=lambda s: f"{what}: {s}")
            for a, b in zip(got_g, want_g):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda s: f"{what}: {s}")
            try:
                torch.set_num_threads(1)
                again = [_run(loss_fn, name, x, labels, r, rl, "fused")]
            finally:
                torch.set_num_threads(threads)
            again.append(_run(loss_fn, name, x, labels, r, rl, "fused"))
            for v, grads in again:
                assert torch.equal(v, got_v), f"{what}: value not reproducible"
                assert all(torch.equal(a, b) for a, b in zip(grads, got_g)), f"{what}: gradient not reproducible"


def test_half_precision_on_cpu_runs_the_reference():
    """No fp16 / bf16 CPU kernels: those dtypes take the reference path (not a wrong fused one)."""
    g = torch.Generator().manual_seed(43)
    labels = torch.randint(0, 3, (20,), generator=g)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(20, 8, generator=g).to(dtype)
        for name in LOSSES:
            if dtype == torch.bfloat16 and name in CDIST_REFERENCE:
                continue  # their LpDistance reference uses torch.cdist: no bf16 on CPU (PML fails alike)
            torch.manual_seed(0)
            loss_fn = LOSSES[name](3, 8).to(dtype)
            _run(loss_fn, name, x, labels, None, None, "fused")
            assert loss_fn.last_backend in ("reference", "zero"), f"{name} {dtype}: ran {loss_fn.last_backend}"
            if loss_fn.last_backend == "reference":
                assert f"{dtype} on cpu" in loss_fn.last_fallback, (name, loss_fn.last_fallback)


def _hessian_vector(loss_fn, name, x, labels, ref, path, direction):
    """(gradient taken with create_graph=True, its derivative along `direction`) for x and ref."""
    x = x.detach().clone().requires_grad_(True)
    ref = None if ref is None else ref.detach().clone().requires_grad_(True)
    loss_fn.backend = "reference" if path == "reference" else "auto"
    ref_labels = None if ref is None else labels[: len(ref)]
    mined = None
    if name == "multi_similarity_miner":
        mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, ref, ref_labels)
    value = loss_fn(x, labels, mined, ref, ref_labels)
    wrt = [x] + ([ref] if ref is not None else [])
    grads = torch.autograd.grad(value, wrt, create_graph=True)
    inner = sum((g * direction[: len(g)]).sum() for g in grads)
    second = torch.autograd.grad(inner, wrt, allow_unused=True)
    return [g.detach() for g in grads], [torch.zeros_like(w) if h is None else h for h, w in zip(second, wrt)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_double_backward_matches_reference(engine_backend_choice, backend, device, name):
    """create_graph=True (e.g. a gradient penalty, second-order meta-learning): the kernels'
    gradients carry no graph, so the fused losses return the reference's differentiable gradient
    then (ops.pair_engine.reference_gradient) instead of silently dropping their second-order part."""
    expected = engine_backend_choice(backend, device)
    g = torch.Generator().manual_seed(11)
    # Over 25 rows: the reference's torch.cdist then takes its matrix-product path, which has a
    # double backward; its direct kernel (25 rows or fewer) has none on CUDA (PML fails alike).
    x = torch.randn(30, 6, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 4, (30,), generator=g).to(device)
    direction = torch.randn(30, 6, generator=g, dtype=torch.float64).to(device)
    refs = [None] if name in NO_REF_EMB else [None, torch.randn(27, 6, generator=g, dtype=torch.float64).to(device)]
    for ref in refs:
        torch.manual_seed(0)
        loss_fn = LOSSES[name](4, 6).to(device=device, dtype=torch.float64)
        want = _hessian_vector(loss_fn, name, x, labels, ref, "reference", direction)
        got = _hessian_vector(loss_fn, name, x, labels, ref, "fused", direction)
        what = f"{name} ref_emb={ref is not None}"
        assert loss_fn.last_backend == expected, f"{what}: ran {loss_fn.last_backend}"
        for kind, a_list, b_list in (("gradient", got[0], want[0]), ("second derivative", got[1], want[1])):
            for a, b in zip(a_list, b_list):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda s: f"{what} {kind}: {s}")
        assert any(h.abs().max() > 0 for h in want[1]), f"{what}: a zero second derivative tests nothing"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ms_miner_few_mined_pairs_follow_pmls_len_rule(engine_backend_choice, backend, device):
    """PML zeroes the loss when the miner keeps at most one positive AND at most one negative
    pair. The fused path decides that from its statistics (one row's pairs are counted when only
    one row has any), so tiny batches with 0, 1 or 2 mined pairs in a single row must match the
    reference, value and gradient, and both sides of the rule must actually occur here."""
    engine_backend_choice(backend, device)
    seen = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n = 3 + seed % 3
        x = torch.randn(n, 3, generator=g, dtype=torch.float64).to(device)
        labels = torch.randint(0, 2, (n,), generator=g).to(device)
        loss_fn = losses.MultiSimilarityLoss()
        want_v, want_g = _run(loss_fn, "multi_similarity_miner", x, labels, None, None, "reference")
        got_v, got_g = _run(loss_fn, "multi_similarity_miner", x, labels, None, None, "fused")
        a1, _, a2, _ = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels).materialize()
        zero_by_rule = len(a1) <= 1 and len(a2) <= 1
        seen.add((zero_by_rule, min(len(a1), 3), min(len(a2), 3)))
        what = f"seed={seed} mined pos={len(a1)} neg={len(a2)}"
        # CPU: an early return (last_backend "zero"); CUDA: the same zero through torch.where
        # (no host sync), so the loss value tells.
        zeroed = loss_fn.last_backend == "zero" if device == "cpu" else float(got_v) == 0.0
        assert zeroed == zero_by_rule, f"{what}: ran {loss_fn.last_backend}, loss {float(got_v)}"
        torch.testing.assert_close(got_v, want_v, msg=lambda m: f"{what}: {m}")
        torch.testing.assert_close(got_g[0], want_g[0], msg=lambda m: f"{what}: {m}")
    assert (True, 1, 1) in seen and any(not z and min(p, q) <= 1 for z, p, q in seen), sorted(seen)


# The hinge losses leave a NaN pair value to the reference (eager, CPU): PML's reducers drop
# (AvgNonZero) or keep each NaN pair loss, which the kernels' totals can't tell apart.
NAN_TO_REFERENCE = {"contrastive", "margin", "margin_learn_beta_per_class"}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_nan_embeddings_follow_the_reference(engine_backend_choice, backend, device, name):
    """A NaN row in embeddings (and in ref_emb): values and gradients NaN exactly where the
    reference's are. Multi-Similarity with the miner keeps a finite loss there: PML's miner
    drops the NaN pairs (its extrema come from an ascending sort, NaN last). The hinge losses
    (NAN_TO_REFERENCE) run the reference on the CPU; on CUDA their NaN propagates."""
    expected = engine_backend_choice(backend, device)
    dtype = torch.float64 if torch.float64 in dtypes_for(backend, device) or device == "cpu" else torch.float32
    g = torch.Generator().manual_seed(23)
    x = torch.randn(37, 16, generator=g, dtype=torch.float64)
    x[5] = float("nan")
    labels = torch.randint(0, 5, (37,), generator=g).to(device)
    refs = [(None, None)]
    if name not in NO_REF_EMB:
        ref = torch.randn(29, 16, generator=g, dtype=torch.float64)
        ref[11] = float("nan")
        refs.append((ref.to(device, dtype), torch.randint(0, 5, (29,), generator=g).to(device)))
    for ref, ref_labels in refs:
        torch.manual_seed(0)
        loss_fn = LOSSES[name](5, 16).to(device=device, dtype=dtype)
        xd = x.to(device, dtype)
        want_v, want_g = _run(loss_fn, name, xd, labels, ref, ref_labels, "reference")
        got_v, got_g = _run(loss_fn, name, xd, labels, ref, ref_labels, "fused")
        what = f"{name} {dtype} ref_emb={ref is not None}"
        if name in NAN_TO_REFERENCE and device == "cuda":  # no host read there: the NaN propagates
            assert loss_fn.last_backend == expected and torch.isnan(got_v), f"{what}: {loss_fn.last_backend} {got_v}"
            continue
        if name in NAN_TO_REFERENCE and backend != "engine-reference":
            expected = "reference"
            assert "NaN" in loss_fn.last_fallback, f"{what}: {loss_fn.last_fallback}"
        assert loss_fn.last_backend == expected, f"{what}: ran {loss_fn.last_backend}"
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got_v, want_v, rtol=rtol, atol=atol, equal_nan=True, msg=lambda s: f"{what}: {s}")
        for k, (a, b) in enumerate(zip(got_g, want_g)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda s: f"{what} grad {k}: {s}")
        if name == "multi_similarity_miner":
            assert torch.isfinite(want_v), f"{what}: PML's miner drops the NaN pairs"


PML_NAMES = {"multi_similarity": "MultiSimilarityLoss", "supcon": "SupConLoss", "generalized_lifted": "GeneralizedLiftedStructureLoss",
             "lifted": "LiftedStructureLoss", "nca": "NCALoss", "tuplet_margin": "TupletMarginLoss", "npairs": "NPairsLoss"}


@pytest.mark.parametrize("name,with_ref", [(n, r) for n in PML_NAMES for r in (False, True) if not (r and n in NO_REF_EMB)])
def test_nan_row_per_element_losses_are_pmls(name, with_ref):
    """DoNothingReducer, a NaN row and classes of one sample: each row's loss is NaN exactly where
    PML's is, and PML's kept rows are kept. Without positives PML's SupCon row is 0 * log_prob and
    its NCA row 0 * a probability: NaN where the row holds a NaN similarity (the fused SupCon gave
    0 and NCA dropped such rows)."""
    from pytorch_metric_learning import losses as pml_losses, reducers as pml_reducers
    from dmlkern.reducers import DoNothingReducer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(14, 8, generator=g, dtype=torch.float64)
    x[4] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 0, 1, 2, 7])  # 3 .. 7: no positive
    ref = ref_labels = None
    if with_ref:
        ref = torch.randn(10, 8, generator=g, dtype=torch.float64)
        ref[2] = float("nan")
        ref_labels = torch.tensor([0, 1, 2, 0, 1, 2, 8, 9, 0, 1])
    want = getattr(pml_losses, PML_NAMES[name])(reducer=pml_reducers.DoNothingReducer())(x, labels, None, ref, ref_labels)
    loss_fn = getattr(losses, PML_NAMES[name])(reducer=DoNothingReducer())
    got = loss_fn(x, labels, None, ref, ref_labels)
    assert loss_fn.last_backend == "cpp", f"{name}: ran {loss_fn.last_backend}"
    assert got.keys() == want.keys()
    for key, entry in want.items():
        if not torch.is_tensor(entry["losses"]):  # PML's empty entry
            assert got[key]["losses"] == entry["losses"], key
            continue
        assert torch.isnan(entry["losses"]).any(), f"{name} {key}: PML's losses hold no NaN here"
        torch.testing.assert_close(got[key]["losses"].reshape(entry["losses"].shape), entry["losses"],
                                   rtol=1e-9, atol=1e-12, equal_nan=True, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("name", ["LiftedStructureLoss", "GeneralizedLiftedStructureLoss", "RankedListLoss"])
def test_zero_row_next_to_a_nan_row_is_seen(name):
    """An all-zero row sends the unit-Euclidean losses to the reference (sqrt(2 - 2s) assumes unit
    rows); a NaN row in the same batch hid it (the norms' amin was NaN), and the fused kernels
    took the zero row's distances wrong. Per-element losses equal PML's."""
    from pytorch_metric_learning import losses as pml_losses, reducers as pml_reducers
    from dmlkern.reducers import DoNothingReducer
    kwargs = {"margin": 0.4, "Tn": 10} if name == "RankedListLoss" else {}
    x = torch.tensor([[float("nan")], [0.0], [0.137], [0.0066], [-0.2], [0.05]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    want = getattr(pml_losses, name)(reducer=pml_reducers.DoNothingReducer(), **kwargs)(x, labels)
    loss_fn = getattr(losses, name)(reducer=DoNothingReducer(), **kwargs)
    got = loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "shorter than 1e-12" in loss_fn.last_fallback, loss_fn.last_fallback
    for key, entry in want.items():
        torch.testing.assert_close(got[key]["losses"], entry["losses"], rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_has_entry_finds_each_infinite_or_nan_entry(dtype):
    """has_entry's shortcut (a finite sum proves every entry finite) answers as the entrywise test:
    an inf or a NaN anywhere in embeddings or ref_emb, finite rows whose sum overflows, -0.0."""
    big = torch.finfo(dtype).max
    x = torch.randn(37, 5, dtype=torch.float64).to(dtype)
    cases = {"finite": x, "overflowing sum": torch.full((37, 5), big, dtype=dtype), "zeros": -torch.zeros(3, 2, dtype=dtype)}
    for where, value in ((0, float("inf")), (-1, -float("inf")), (17, float("nan"))):
        t = x.clone()
        t.view(-1)[where] = value
        cases[f"{value} at {where}"] = t
    for name, t in cases.items():
        for test in (torch.isinf, torch.isnan):
            want = bool(test(t).any())
            assert fused_common.has_entry(test, t) == want, (name, test.__name__)
            assert fused_common.has_entry(test, x, t) == want, (name, test.__name__, "ref_emb")
            assert fused_common.has_entry(test, t, x) == want, (name, test.__name__, "embeddings")


@pytest.mark.parametrize("name,reducer", [("AngularLoss", "AvgNonZeroReducer"), ("MultiSimilarityLoss", "ThresholdReducer"),
                                          ("SupConLoss", "DoNothingReducer"), ("GeneralizedLiftedStructureLoss", "MeanReducer"),
                                          ("ContrastiveLoss", "SumReducer")])
def test_infinite_entry_gives_pmls_result(name, reducer):
    """A +-inf embedding entry, eager on the CPU, runs the reference: PML's value there is inf, NaN
    or finite by its ops' order (AngularLoss with AvgNonZero: finite, where the kernels gave NaN)."""
    from pytorch_metric_learning import losses as pml_losses, reducers as pml_reducers
    from dmlkern import reducers as our_reducers
    kwargs = {"low": 0.1, "high": 2.0} if reducer == "ThresholdReducer" else {}
    g = torch.Generator().manual_seed(9)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.3
    x[3, 1] = float("inf")
    x[7, 0] = -float("inf")
    labels = torch.arange(12) % 4
    want = getattr(pml_losses, name)(reducer=getattr(pml_reducers, reducer)(**kwargs))(x, labels)
    loss_fn = getattr(losses, name)(reducer=getattr(our_reducers, reducer)(**kwargs))
    got = loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "infinite" in loss_fn.last_fallback, loss_fn.last_fallback
    if isinstance(want, dict):
        for key, entry in want.items():
            torch.testing.assert_close(got[key]["losses"], entry["losses"], rtol=1e-9, atol=1e-12, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("with_ref", [False, True], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("name", ["SupConLoss", "NTXentLoss"])
def test_listed_pairs_with_a_nan_row_give_pmls_result(name, with_ref):
    """A miner's tuple and a NaN row: PML's NaN reaches anchors without a listed pair to it
    (SupCon's row maximum over the whole matrix, NT-Xent's pairs x pairs product), so eager off
    CUDA these run the reference; the listed path gave those anchors finite losses."""
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners, reducers as pml_reducers
    from dmlkern.reducers import DoNothingReducer
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    ref = ref_labels = None
    if with_ref:
        ref = torch.randn(12, 5, generator=g, dtype=torch.float64)
        ref[7] = float("nan")
        ref_labels = torch.arange(12) % 5
    else:
        x[7] = float("nan")
    tuples = pml_miners.TripletMarginMiner(margin=10, type_of_triplets="all")(x, labels, ref, ref_labels)
    want = getattr(pml_losses, name)(reducer=pml_reducers.DoNothingReducer())(x, labels, tuples, ref, ref_labels)
    loss_fn = getattr(losses, name)(reducer=DoNothingReducer())
    got = loss_fn(x, labels, tuples, ref, ref_labels)
    assert loss_fn.last_backend == "reference" and "NaN" in loss_fn.last_fallback, loss_fn.last_fallback
    for key, entry in want.items():
        assert name != "SupConLoss" or torch.isnan(entry["losses"]).any()  # (the case the listed path got wrong)
        torch.testing.assert_close(got[key]["losses"], entry["losses"], rtol=1e-9, atol=1e-12, equal_nan=True)


def test_ms_miner_with_nan_embeddings_matches_pml():
    """The extrema the fused miner reads (pass 0) follow PML's sort: the max over negatives is
    NaN when a negative is NaN, the min over positives skips NaN. Checked on PML itself."""
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(40, 8, generator=g, dtype=torch.float64)
        x[3 + seed] = float("nan")
        labels = torch.randint(0, 4, (40,), generator=g)
        want = pml_losses.MultiSimilarityLoss()(x, labels, pml_miners.MultiSimilarityMiner()(x, labels))
        loss_fn = losses.MultiSimilarityLoss()
        got = loss_fn(x, labels, miners.MultiSimilarityMiner()(x, labels))
        assert loss_fn.last_backend == "cpp"
        assert torch.isfinite(want), "a NaN row: PML's miner drops its pairs"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reducer", ["mean", "avg_nonzero"])
def test_lifted_nan_embeddings_follow_the_reference(engine_backend_choice, reducer):
    """A NaN row: MeanReducer propagates NaN; AvgNonZero drops the NaN pair losses (NaN > 0 is
    false) and averages the rest, so the fused path must not return NaN there."""
    from dmlkern.reducers import AvgNonZeroReducer, MeanReducer
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    x[4] = float("nan")
    labels = torch.randint(0, 4, (30,), generator=g)
    make = lambda: losses.LiftedStructureLoss(  # noqa: E731
        neg_margin=0.5, pos_margin=0.2, reducer=MeanReducer() if reducer == "mean" else AvgNonZeroReducer())
    loss_fn = make()
    want_v, _ = _run(loss_fn, "lifted", x, labels, None, None, "reference")
    got_v, _ = _run(loss_fn, "lifted", x, labels, None, None, "fused")
    assert loss_fn.last_backend == "cpp"
    assert torch.isnan(want_v) == (reducer == "mean")
    torch.testing.assert_close(got_v, want_v, equal_nan=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_any_integer_label_dtype(engine_backend_choice, backend, device):
    """PML takes labels of any integer dtype; the kernels take int64. Every fused loss (and the
    lazy miner) gives the int64 result, value and gradients, on the fused path, bit for bit. The
    labels become int64 before any backend runs: the C++ backend takes int32, int16 and uint8,
    the others uint8 (the narrowest) only, as the Triton interpreter is slow."""
    expected = engine_backend_choice(backend, device)
    for label_dtype in [torch.int32, torch.int16, torch.uint8] if backend == "cpp" else [torch.uint8]:
        _check_label_dtype(expected, device, label_dtype)


def _check_label_dtype(expected, device, label_dtype):
    g = torch.Generator().manual_seed(31)
    x = torch.randn(33, 8, generator=g, dtype=torch.float64).to(device)
    labels = torch.randint(0, 5, (33,), generator=g).to(device)
    ref = torch.randn(21, 8, generator=g, dtype=torch.float64).to(device)
    ref_labels = torch.randint(0, 5, (21,), generator=g).to(device)
    for name in LOSSES:
        for r, rl in [(None, None)] + ([] if name in NO_REF_EMB else [(ref, ref_labels)]):
            torch.manual_seed(0)
            loss_fn = LOSSES[name](5, 8).to(device=device, dtype=torch.float64)
            want_v, want_g = _run(loss_fn, name, x, labels, r, rl, "fused")
            got_v, got_g = _run(loss_fn, name, x, labels.to(label_dtype), r, None if rl is None else rl.to(label_dtype),
                                "fused")
            what = f"{name} {label_dtype} ref_emb={r is not None}"
            assert loss_fn.last_backend == expected, f"{what}: ran {loss_fn.last_backend}"
            torch.testing.assert_close(got_v, want_v, rtol=0, atol=0, msg=lambda s: f"{what}: {s}")
            for a, b in zip(got_g, want_g):
                torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda s: f"{what}: {s}")


def test_strided_labels_run_quietly(engine_backend_choice):
    """Labels given as a strided view (labels[::2]) give the contiguous result without warnings
    (torch.searchsorted warns on non-contiguous inputs)."""
    import warnings
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(47)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (60,), generator=g)[::2]
    for name in LOSSES:
        torch.manual_seed(0)
        loss_fn = LOSSES[name](4, 8).double()
        want = _run(loss_fn, name, x, labels.contiguous(), None, None, "fused")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = _run(loss_fn, name, x, labels, None, None, "fused")
        assert loss_fn.last_backend == "cpp", name
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["generalized_lifted", "lifted", "lifted_avg_nonzero", "contrastive"])
def test_euclidean_losses_with_zero_rows_match_pml(engine_backend_choice, name):
    """An all-zero (or shorter than 1e-12) row stays short after F.normalize, and PML's cdist then
    gives the true distance where the kernels' sqrt(2 - 2s) assumes unit rows: eager calls see
    it and run the reference, value and gradient as PML's."""
    from pytorch_metric_learning import losses as pml_losses
    engine_backend_choice("cpp", "cpu")
    g = torch.Generator().manual_seed(53)
    labels = torch.randint(0, 4, (20,), generator=g)
    for scale in (0.0, 1e-13):
        x = torch.randn(20, 6, generator=g, dtype=torch.float64)
        x[3] *= scale
        loss_fn = LOSSES[name](4, 6)
        pml_fn = getattr(pml_losses, type(loss_fn).__name__)(**{k: getattr(loss_fn, k) for k in ("pos_margin", "neg_margin")})
        if name == "lifted_avg_nonzero":
            from pytorch_metric_learning.reducers import AvgNonZeroReducer as PmlAvgNonZero
            pml_fn = pml_losses.LiftedStructureLoss(pos_margin=loss_fn.pos_margin, neg_margin=loss_fn.neg_margin,
                                                    reducer=PmlAvgNonZero())
        ours_x, pml_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got, want = loss_fn(ours_x, labels), pml_fn(pml_x, labels)
        got.backward()
        want.backward()
        assert loss_fn.last_backend == "reference", f"{name} scale={scale}: ran {loss_fn.last_backend}"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ours_x.grad, pml_x.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ntxent_far_past_softplus_cutoff_is_exact(engine_backend_choice, backend, device):
    """softplus(z) for z > 20 (a positive far less similar than the negatives, low temperature):
    F.softplus's cut-off returns z there (up to 2e-9 off); PML's NT-Xent, and the kernels, don't."""
    import math
    expected = engine_backend_choice(backend, device)
    if torch.float64 not in dtypes_for(backend, device) and backend != "engine-reference":
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    from pytorch_metric_learning import losses as pml_losses
    angle_pos, angle_neg = math.acos(-0.5), math.acos(0.52)  # positives at cos -0.5, negatives at 0.52
    angles = torch.tensor([0.0, angle_pos, -angle_neg, -angle_neg - angle_pos], dtype=torch.float64)
    x = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    want = pml_losses.NTXentLoss(temperature=0.05)(x, labels)
    loss_fn = losses.NTXentLoss(temperature=0.05)
    got = loss_fn(x.to(device), labels.to(device))
    assert loss_fn.last_backend == expected
    torch.testing.assert_close(got.cpu(), want, rtol=1e-14, atol=0)


def test_unfusable_configurations_use_the_reference(engine_backend_choice):
    engine_backend_choice("engine-reference", "cpu")
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (20,))
    from dmlkern.distances import LpDistance
    from dmlkern.reducers import AvgNonZeroReducer, DoNothingReducer, ThresholdReducer
    zero_row = torch.cat([x[:1] * 0, x[1:]])
    for loss_fn, args, reason in [
        (losses.MultiSimilarityLoss(distance=LpDistance(p=1)), (x, labels), "non-default distance LpDistance"),
        (losses.LiftedStructureLoss(), (x, labels, None, x[:7] * 2, labels[:7]), "ref_emb"),  # PML's quirk
        (losses.LiftedStructureLoss(), (x, labels, None, x, labels.clone()), "ref_emb"),  # self-pairs kept then
        (losses.LiftedStructureLoss(), (zero_row, labels), "shorter than 1e-12"),
        (losses.GeneralizedLiftedStructureLoss(), (zero_row, labels), "shorter than 1e-12"),
        (losses.NPairsLoss(), (x, labels, (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))),
         "an indices_tuple"),
        (losses.MultiSimilarityLoss(distance=LpDistance(p=1)), (x, None, (torch.tensor([0, 1]), torch.tensor([1, 2]),
                                                                       torch.tensor([4]), torch.tensor([5]))),
         "non-default distance LpDistance"),
        (losses.ContrastiveLoss(distance=LpDistance(normalize_embeddings=False, power=3)), (x, labels),
         "non-default distance LpDistance"),
        (losses.ContrastiveLoss(reducer=ThresholdReducer(low=0.1)), (x, labels), "ThresholdReducer for its sub-loss"),
        (losses.ContrastiveLoss(reducer=MeanReducer(collect_stats=True)), (x, labels),
         "MeanReducer collecting statistics"),
        (losses.ContrastiveLoss(reducer=DoNothingReducer()), (x, labels), "DoNothingReducer"),
        (losses.ContrastiveLoss(), (zero_row, labels), "shorter than 1e-12"),
        (losses.MarginLoss(triplets_per_anchor=3), (x, labels), "triplets_per_anchor=k drawing over 1/16"),
        (losses.MarginLoss(reducer=AvgNonZeroReducer()), (x, labels), "AvgNonZeroReducer for its sub-loss"),
    ]:
        loss_fn.last_fallback = None
        loss_fn(*args)
        assert loss_fn.last_backend == "reference", type(loss_fn).__name__
        assert reason in (loss_fn.last_fallback or ""), (type(loss_fn).__name__, loss_fn.last_fallback)
    loss_fn = losses.SupConLoss()
    loss_fn(x, labels)
    assert loss_fn.last_fallback is None  # the fused path (here on the engine's reference twin)
    loss_fn.backend = "reference"
    loss_fn(x, labels)
    assert loss_fn.last_fallback.startswith("backend='reference'")


THRESHOLD_ZERO_CASES = {  # (loss, args) of a library's losses L and miners M, with reducer R
    "contrastive": lambda L, M, R, x, y: (L.ContrastiveLoss(reducer=R), (x, y)),
    "contrastive_pair_margin": lambda L, M, R, x, y: (L.ContrastiveLoss(reducer=R), (x, y, M.PairMarginMiner()(x, y))),
    "lifted": lambda L, M, R, x, y: (L.LiftedStructureLoss(reducer=R), (x, y)),
    "intra_pair_variance": lambda L, M, R, x, y: (L.IntraPairVarianceLoss(reducer=R), (x, y)),
    "snr_contrastive": lambda L, M, R, x, y: (L.SignalToNoiseRatioContrastiveLoss(reducer=R), (x, y)),
}


@pytest.mark.parametrize("case", sorted(THRESHOLD_ZERO_CASES))
def test_threshold_reducer_at_zero_runs_as_avg_non_zero(case):
    """PML's AvgNonZeroReducer is its ThresholdReducer(low=0): where AvgNonZeroReducer runs fused,
    ThresholdReducer(low=0) takes the same path (the same bits), with PML's value and gradient."""
    import pytorch_metric_learning.losses as pml_losses
    import pytorch_metric_learning.miners as pml_miners
    import pytorch_metric_learning.reducers as pml_reducers

    from dmlkern import reducers

    g = torch.Generator().manual_seed(11)
    x0, labels = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (40,), generator=g)
    got = {}
    for lib, L, M, R in (("dmlkern", losses, miners, reducers), ("pml", pml_losses, pml_miners, pml_reducers)):
        for name, reducer in (("threshold", R.ThresholdReducer(low=0)), ("avg", R.AvgNonZeroReducer())):
            x = x0.clone().requires_grad_(True)
            loss_fn, args = THRESHOLD_ZERO_CASES[case](L, M, reducer, x, labels)
            value = loss_fn(*args)
            got[lib, name] = (value.detach(), torch.autograd.grad(value, x)[0], getattr(loss_fn, "last_backend", None))
    value, grad, backend = got["dmlkern", "threshold"]
    avg_value, avg_grad, avg_backend = got["dmlkern", "avg"]
    assert backend == avg_backend and backend != "reference", (backend, avg_backend)
    assert torch.equal(value, avg_value) and torch.equal(grad, avg_grad)
    want, want_grad, _ = got["pml", "threshold"]
    torch.testing.assert_close(value, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)


def test_lazy_miner_records_pair_counts_like_pml(engine_backend_choice):
    """PML's miner sets num_pos_pairs / num_neg_pairs on every call; a lazy result is counted when
    they are read (after the fused loss used it, without materialising it before)."""
    from pytorch_metric_learning import miners as pml_miners
    engine_backend_choice("cpp", "cpu")
    miner, theirs = miners.MultiSimilarityMiner(epsilon=0.1), pml_miners.MultiSimilarityMiner(epsilon=0.1)
    for seed in range(2):  # the second call's counts replace the first's
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(30 + 10 * seed, 8, generator=g)
        labels = torch.randint(0, 4, (len(x),), generator=g)
        lazy = miner(x, labels)
        loss_fn = losses.MultiSimilarityLoss()
        loss_fn(x, labels, lazy)
        assert loss_fn.last_backend == "cpp" and not lazy.is_materialized
        theirs(x, labels)
        assert (miner.num_pos_pairs, miner.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs) != (0, 0)
    # A later eager call (collect_stats: PML's path) records its own counts, not the last lazy one's.
    lazy = miner(x[:12], labels[:12])
    miner.collect_stats = True
    miner(x, labels)
    theirs(x, labels)
    assert (miner.num_pos_pairs, miner.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)
    assert not lazy.is_materialized


def test_lazy_miner_materialises_pml_format_on_demand(engine_backend_choice):
    engine_backend_choice("engine-reference", "cpu")
    x = torch.randn(30, 8)
    labels = torch.randint(0, 4, (30,))
    miner = miners.MultiSimilarityMiner(epsilon=0.1)
    lazy = miner(x, labels)
    assert isinstance(lazy, LazyMinedPairs) and not lazy.is_materialized
    a1, p, a2, n = lazy  # PML's tuple; its tensors are computed when first read
    assert len(lazy) == 4 and not lazy.is_materialized
    miner.collect_stats = True  # the eager path (collects stats) gives the same pairs
    eager = miner(x, labels)
    for got, want in zip((a1, p, a2, n), eager):
        assert torch.equal(got, want)
    # A loss that cannot fuse it (here: a non-default distance) gets the materialised pairs.
    from dmlkern.distances import LpDistance
    loss_fn = losses.MultiSimilarityLoss(distance=LpDistance())
    miner.collect_stats = False
    got = loss_fn(x, labels, miner(x, labels))
    want = loss_fn(x, labels, eager)
    assert loss_fn.last_backend == "reference"
    torch.testing.assert_close(got, want)


MEMORY_LOSSES = {  # constructor, labels (n = 16384): the default configuration of each fused loss
    "multi_similarity": ("losses.MultiSimilarityLoss()", "torch.randint(0, n // 8, (n,))"),
    "multi_similarity_miner": ("losses.MultiSimilarityLoss()", "torch.randint(0, n // 8, (n,))"),
    # mining on x.detach(), a common pattern: the loss still mines in its kernel
    "multi_similarity_miner_detached": ("losses.MultiSimilarityLoss()", "torch.randint(0, n // 8, (n,))"),
    "ntxent": ("losses.NTXentLoss()", "torch.cat([torch.arange(n // 2), torch.arange(n // 2)])"),
    # per-pair losses (115K positive pairs): PML's positive x negative pairs matrix would be ~3e10 entries
    "ntxent_avg_nonzero": ("losses.NTXentLoss(reducer=__import__('dmlkern.reducers').reducers.AvgNonZeroReducer())",
                           "torch.randint(0, n // 8, (n,))"),
    "supcon": ("losses.SupConLoss()", "torch.randint(0, n // 8, (n,))"),
    "lifted": ("losses.LiftedStructureLoss()", "torch.randint(0, n // 8, (n,))"),
    "generalized_lifted": ("losses.GeneralizedLiftedStructureLoss()", "torch.randint(0, n // 8, (n,))"),
    "npairs": ("losses.NPairsLoss()", "torch.randint(0, n // 2, (n,))"),
    "proxy_anchor": ("losses.ProxyAnchorLoss(n // 8, d)", "torch.randint(0, n // 8, (n,))"),
    "nca": ("losses.NCALoss()", "torch.randint(0, n // 8, (n,))"),
    "tuplet_margin": ("losses.TupletMarginLoss()", "torch.randint(0, n // 8, (n,))"),
    "circle": ("losses.CircleLoss()", "torch.randint(0, n // 8, (n,))"),
    "contrastive": ("losses.ContrastiveLoss()", "torch.randint(0, n // 8, (n,))"),
    "margin": ("losses.MarginLoss()", "torch.randint(0, n // 8, (n,))"),
    "margin_learn_beta_per_class": ("losses.MarginLoss(learn_beta=True, nu=0.1, num_classes=n // 8)",
                                    "torch.randint(0, n // 8, (n,))"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MEMORY_LOSSES))
def test_fused_loss_memory_is_linear_in_n(name):
    """fwd+bwd at N=16384, D=128 on the C++ CPU engine grows peak RSS by < 256 MiB (one N x N
    fp32 matrix is 1 GiB): the peak during the call (VmHWM) against the resident set before it
    (VmRSS), in a fresh process."""
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")
    make, labels = MEMORY_LOSSES[name]
    script = textwrap.dedent(f"""
        import torch
        from dmlkern import losses, miners

        def kib(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

        torch.manual_seed(0)
        n, d = 16384, 128
        x = torch.randn(n, d, requires_grad=True)
        labels = {labels}
        loss_fn = {make}
        mine = miners.MultiSimilarityMiner() if "{name}".startswith("multi_similarity_miner") else None
        mined_on = x.detach() if "{name}".endswith("_detached") else x
        for p in loss_fn.parameters():  # allocated before the measurement, as x is
            p.grad = torch.zeros_like(p)
        before = kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        loss = loss_fn(x, labels, mine(mined_on, labels) if mine else None)
        loss.backward()
        after = kib("VmHWM")
        assert loss_fn.last_backend == "cpp", loss_fn.last_backend
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        print((after - before) / 1024.0)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env=env_without_interpreter(DMLKERN_BACKEND="auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 256, f"{name}: peak RSS grew by {growth_mib:.0f} MiB"


# ----------------------------------------------------------------------- Lifted Structure
# (N, classes, pos_margin, neg_margin, what). The fused path for MeanReducer / AvgNonZeroReducer
# runs the lifted_pairs pass (no pair list, any number of positives per row).
LIFTED_CASES = [
    (37, 5, 4.3, 0.2, "mixed"),            # zero and non-zero pair losses
    (80, 0, 0.0, 1.0, "many_positives"),   # ~75 positives per row: beyond the pair list's 64
    (30, 3, 100.0, 0.0, "all_zero"),       # every pair loss 0: AvgNonZero's grad-carrying zero
    (12, 1, 0.0, 1.0, "one_class"),        # no negatives: PML's zero loss
    (9, 9, 0.0, 1.0, "no_positives"),
    (1, 1, 0.0, 1.0, "one_sample"),
    (2, 1, 0.0, 1.0, "one_pair"),          # PML's len <= 1 rule
]


def _lifted_case(n, classes, seed, device, dtype):
    """classes = 0: one class of n - 4 rows and two pairs (few negatives: PML's reference stays small)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64).to(device, dtype)
    if classes == n:
        labels = torch.arange(n)
    elif classes == 0:
        labels = torch.cat([torch.zeros(n - 4, dtype=torch.long), torch.tensor([1, 1, 2, 2])])
    else:
        labels = torch.randint(0, classes, (n,), generator=g)
    return x, labels.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reducer", [MeanReducer, AvgNonZeroReducer], ids=["mean", "avg_nonzero"])
def test_fused_lifted_structure_matches_reference(engine_backend_choice, backend, device, reducer):
    expected = engine_backend_choice(backend, device)
    dtypes = [torch.float64] if backend == "engine-reference" else dtypes_for(backend, device)
    for dtype in dtypes:
        if dtype in (torch.float16, torch.bfloat16):
            continue  # half precision: test_fused_matches_reference, against the fp32 reference
        for n, classes, pm, nm, what in LIFTED_CASES:
            x, labels = _lifted_case(n, classes, n + classes, device, dtype)
            loss_fn = losses.LiftedStructureLoss(neg_margin=nm, pos_margin=pm, reducer=reducer())
            ref_dict = loss_fn.compute_loss(x, labels, None, x, labels)["loss"]["losses"]
            if what == "mixed":
                assert (ref_dict == 0).any() and (ref_dict > 0).any(), "the case must mix zero and non-zero losses"
            if what == "all_zero":
                assert torch.is_tensor(ref_dict) and len(ref_dict) > 0 and (ref_dict == 0).all()
            if what == "many_positives":
                assert (n - 4) * (n - 5) > fused_lifted.MAX_POS_PAIRS_PER_ROW * n  # the pair list's limit
            want_v, want_g = _run(loss_fn, "lifted", x, labels, None, None, "reference")
            got_v, got_g = _run(loss_fn, "lifted", x, labels, None, None, "fused")
            label = f"{reducer.__name__} {dtype} {what}"
            degenerate = what in ("one_class", "no_positives", "one_sample", "one_pair")
            # (CUDA zeroes degenerate batches with torch.where, without a host sync: the engine ran)
            zero_label = "zero" if degenerate and device == "cpu" else expected
            assert loss_fn.last_backend == zero_label, f"{label}: ran {loss_fn.last_backend}"
            rtol, atol = TOLERANCES[dtype]
            torch.testing.assert_close(got_v, want_v, rtol=rtol, atol=atol, msg=lambda s: f"{label} value: {s}")
            torch.testing.assert_close(got_g[0], want_g[0], rtol=rtol, atol=atol, msg=lambda s: f"{label} grad: {s}")
            if what == "all_zero":
                assert float(got_v) == 0.0 and not got_g[0].any(), label


def test_fused_lifted_structure_other_reducers_list_the_pairs(engine_backend_choice):
    """Reducers that need the per-pair losses keep the pair list, and its limit of 64 pairs per
    row on average (above it: the reference)."""
    engine_backend_choice("cpp", "cpu")
    for n, classes, fused in [(37, 5, True), (140, 0, False)]:
        x, labels = _lifted_case(n, classes, 3, "cpu", torch.float64)
        for reducer in (SumReducer(), MeanReducer(collect_stats=True)):
            loss_fn = losses.LiftedStructureLoss(reducer=reducer)
            want_v, want_g = _run(loss_fn, "lifted", x, labels, None, None, "reference")
            got_v, got_g = _run(loss_fn, "lifted", x, labels, None, None, "fused")
            assert loss_fn.last_backend == ("cpp" if fused else "reference"), (n, type(reducer).__name__)
            torch.testing.assert_close(got_v, want_v)
            torch.testing.assert_close(got_g[0], want_g[0])


def test_lifted_pairs_function_gradcheck_cpp():
    """fp64 gradcheck of the fused loss's autograd.Function (two passes, one backward) on cpp."""
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(14, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (14,), generator=g)
    params = [1.0, -0.2, -1.0, 0.8, 0.0]

    def total(a):
        return fused_lifted._LiftedPairs.apply(a, labels, params, "cpp")[0]

    assert total(x) > 0
    assert torch.autograd.gradcheck(total, (x.requires_grad_(True),))


NTXENT_DISTANCES = {
    "cosine": lambda D: D.CosineSimilarity(),
    "dot": lambda D: D.DotProductSimilarity(normalize_embeddings=False),
    "unit_euclidean": lambda D: D.LpDistance(),
    "unit_squared": lambda D: D.LpDistance(power=2),
    "raw_euclidean": lambda D: D.LpDistance(normalize_embeddings=False),
}
NTXENT_REDUCERS = {
    "do_nothing": lambda R: R.DoNothingReducer(),
    "avg_nonzero": lambda R: R.AvgNonZeroReducer(),
    "threshold": lambda R: R.ThresholdReducer(low=0.5),
    "per_anchor": lambda R: R.PerAnchorReducer(),
}


@pytest.mark.parametrize("case", ["batch", "ref_emb", "singletons", "one_class"])
@pytest.mark.parametrize("reducer", list(NTXENT_REDUCERS))
@pytest.mark.parametrize("distance", list(NTXENT_DISTANCES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ntxent_per_pair_reducers_match_pml(engine_backend_choice, backend, device, distance, reducer, case):
    """NTXentLoss with a reducer other than the mean reads PML's per-positive-pair losses: fused,
    from each anchor's negatives' log-sum-exp and the pairs' own logits (PML builds positive pairs
    x negative pairs). PML's values (for DoNothingReducer its pairs, in its order) and gradients,
    on odd sizes, with ref_emb, with a NaN-free batch of mostly singletons (anchors without
    positives) and one class (no negatives: PML's zero)."""
    from pytorch_metric_learning import distances as pml_distances, losses as pml_losses
    from pytorch_metric_learning import reducers as pml_reducers
    from dmlkern import distances as dml_distances, reducers as dml_reducers
    expected = engine_backend_choice(backend, device)
    dtype = torch.float64 if backend == "engine-reference" else torch.float32
    g = torch.Generator().manual_seed(31)
    n = 41
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    labels = {"singletons": torch.cat([torch.arange(n - 4), torch.tensor([0, 1, 1, 2])]),
              "one_class": torch.zeros(n, dtype=torch.long)}.get(case, torch.randint(0, 5, (n,), generator=g))
    ref = ref_labels = None
    if case == "ref_emb":
        ref, ref_labels = torch.randn(23, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (23,), generator=g)

    def run(lib):
        dist = NTXENT_DISTANCES[distance](dml_distances if lib == "dml" else pml_distances)
        red = NTXENT_REDUCERS[reducer](dml_reducers if lib == "dml" else pml_reducers)
        loss_fn = (losses if lib == "dml" else pml_losses).NTXentLoss(temperature=0.3, distance=dist, reducer=red)
        emb = (x.to(dtype) if lib == "pml" else x.to(device, dtype)).clone().requires_grad_(True)
        ref_emb = None if ref is None else (ref.to(dtype) if lib == "pml" else ref.to(device, dtype)).clone().requires_grad_(True)
        lab = labels if lib == "pml" else labels.to(device)
        ref_lab = ref_labels if lib == "pml" or ref_labels is None else ref_labels.to(device)
        out = loss_fn(emb, lab, None, ref_emb, ref_lab)
        if isinstance(out, dict):
            entry = out["loss"]
            total, values = entry["losses"].sum() if torch.is_tensor(entry["losses"]) else None, entry
        else:
            total, values = out, out
        wrt = [emb] + ([] if ref_emb is None else [ref_emb])
        grads = torch.autograd.grad(total, wrt, allow_unused=True) if total is not None and total.requires_grad else None
        return loss_fn, values, grads

    loss_fn, got, got_g = run("dml")
    _, want, want_g = run("pml")
    assert loss_fn.last_backend == ("zero" if case == "one_class" else expected), loss_fn.last_fallback
    rtol, atol = TOLERANCES[dtype]
    if isinstance(want, dict):
        assert isinstance(got, dict) and got["reduction_type"] == want["reduction_type"]
        if want["indices"] is not None:
            assert all(torch.equal(a.cpu(), b) for a, b in zip(got["indices"], want["indices"]))
        got_v, want_v = got["losses"], want["losses"]
    else:
        got_v, want_v = got, want
    torch.testing.assert_close(torch.as_tensor(got_v).cpu(), torch.as_tensor(want_v), rtol=rtol, atol=atol)
    assert (got_g is None) == (want_g is None)
    for a, b in zip(got_g or (), want_g or ()):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a.cpu(),
                                   torch.zeros_like(b) if b is None else b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ntxent_sorted_rows_keep_each_ref_pairing(engine_backend_choice, backend, device):
    """The fused NT-Xent sorts rows by label; the ref_emb pairings must survive that: ref_emb
    given with ref_labels *being* labels (PML then drops the pairs (i, i) of equal index: one
    permutation for both sides), ref_emb being the embeddings with other ref_labels (two
    permutations of one tensor) and separate ref rows and labels. Values and both gradients."""
    expected = engine_backend_choice(backend, device)
    dtype = torch.float64 if backend == "engine-reference" else torch.float32
    g = torch.Generator().manual_seed(17)
    n = 90  # SimCLR-like labels, shuffled: the sort moves every row
    labels = torch.cat([torch.arange(n // 2)] * 2)[torch.randperm(n, generator=g)].to(device)
    x = torch.randn(n, 16, generator=g, dtype=torch.float64).to(device, dtype)
    other = torch.randn(n, 16, generator=g, dtype=torch.float64).to(device, dtype)
    other_labels = labels[torch.randperm(n, generator=g).to(device)]
    loss_fn = losses.NTXentLoss(temperature=0.2)
    for what, ref, ref_labels in (("ref_labels is labels", other, labels),
                                  ("ref_emb is the embeddings", None, other_labels),
                                  ("separate ref", other, other_labels)):
        def run(path):
            emb = x.detach().clone().requires_grad_(True)
            ref_emb = emb if ref is None else ref.detach().clone().requires_grad_(True)
            loss_fn.backend = "reference" if path == "reference" else "auto"
            value = loss_fn(emb, labels, None, ref_emb, ref_labels)
            wrt = [emb] if ref is None else [emb, ref_emb]
            return value.detach(), torch.autograd.grad(value, wrt)

        want_v, want_g = run("reference")
        got_v, got_g = run("fused")
        assert loss_fn.last_backend == expected, f"{what}: ran {loss_fn.last_backend}"
        rtol, atol = TOLERANCES[dtype]
        torch.testing.assert_close(got_v, want_v, rtol=rtol, atol=atol, msg=lambda s: f"{what} value: {s}")
        for k, (a, b) in enumerate(zip(got_g, want_g)):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda s: f"{what} grad {k}: {s}")


# ----------------------------------------------------------------------- Contrastive and Margin
# Against PML 2.9.0 itself (fp64): (name, our constructor, PML's), built from one table of keyword
# arguments so that both sides get the same configuration; "distance" / "reducer" name the class
# in each library.
HINGE_PML_CASES = [
    ("contrastive", "ContrastiveLoss", {}),
    ("contrastive_margins", "ContrastiveLoss", dict(pos_margin=0.25, neg_margin=1.2)),
    ("contrastive_cosine", "ContrastiveLoss", dict(pos_margin=0.9, neg_margin=0.1, distance="CosineSimilarity")),
    ("contrastive_mean", "ContrastiveLoss", dict(neg_margin=1.5, reducer="MeanReducer")),
    ("contrastive_sum_cosine", "ContrastiveLoss", dict(pos_margin=0.8, neg_margin=0.2, reducer="SumReducer",
                                                       distance="CosineSimilarity")),
    ("margin", "MarginLoss", {}),
    ("margin_cosine", "MarginLoss", dict(beta=0.2, margin=0.1, distance="CosineSimilarity")),
    ("margin_learn_beta", "MarginLoss", dict(margin=0.1, beta=1.3, nu=0.2, learn_beta=True)),
    ("margin_learn_beta_per_class", "MarginLoss", dict(margin=0.1, beta=1.3, nu=0.2, learn_beta=True,
                                                       num_classes=5)),
    ("margin_per_class_cosine_mean", "MarginLoss", dict(beta=0.1, nu=0.1, learn_beta=True, num_classes=5,
                                                        distance="CosineSimilarity", reducer="MeanReducer")),
]


def _hinge_pair(cls, kwargs):
    """(ours, PML's) built from the same keywords."""
    from pytorch_metric_learning import distances as pml_distances, losses as pml_losses, reducers as pml_reducers
    from dmlkern import distances, reducers

    def build(loss_mod, dist_mod, red_mod):
        kw = dict(kwargs)
        if "distance" in kw:
            kw["distance"] = getattr(dist_mod, kw["distance"])()
        if "reducer" in kw:
            kw["reducer"] = getattr(red_mod, kw["reducer"])()
        return getattr(loss_mod, cls)(**kw).double()

    return build(losses, distances, reducers), build(pml_losses, pml_distances, pml_reducers)


def _pml_parity(ours, theirs, x, labels, ref=None, ref_labels=None, expected=None, what=""):
    """Values and gradients (embeddings, ref_emb, learnable beta) of ours against PML's."""
    def run(fn):
        emb = x.detach().clone().requires_grad_(True)
        r = None if ref is None else ref.detach().clone().requires_grad_(True)
        value = fn(emb, labels, None, r, ref_labels)
        wrt = [emb] + ([] if r is None else [r]) + list(fn.parameters())
        grads = torch.autograd.grad(value, wrt, allow_unused=True)
        return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]

    got_v, got_g = run(ours)
    want_v, want_g = run(theirs)
    if expected is not None:
        assert ours.last_backend == expected, f"{what}: ran {ours.last_backend} ({ours.last_fallback})"
    torch.testing.assert_close(got_v, want_v.to(got_v.dtype), rtol=1e-10, atol=1e-12, msg=lambda s: f"{what}: {s}")
    for k, (a, b) in enumerate(zip(got_g, want_g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda s: f"{what} grad {k}: {s}")
    return got_v


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("name,cls,kwargs", HINGE_PML_CASES, ids=[c[0] for c in HINGE_PML_CASES])
def test_hinge_losses_match_pml(engine_backend_choice, backend, device, name, cls, kwargs):
    """ContrastiveLoss and MarginLoss on the engine's hinge pass against PML 2.9.0 itself, fp64:
    values and gradients (embeddings, ref_emb, learnable beta) for the default Euclidean distance
    and CosineSimilarity, the default and other reducers, with and without ref_emb."""
    expected = engine_backend_choice(backend, device)
    if torch.float64 not in dtypes_for(backend, device) and backend != "engine-reference":
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    g = torch.Generator().manual_seed(61)
    x = torch.randn(41, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (41,), generator=g)
    ref = torch.randn(23, 8, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 5, (23,), generator=g)
    other = torch.randn(41, 8, generator=g, dtype=torch.float64)
    labels = labels.to(device)
    # ref_emb with its own labels, and with ref_labels being labels (PML drops the pairs (i, i) then)
    for r, rl in ((None, None), (ref, ref_labels.to(device)), (other, labels)):
        ours, theirs = _hinge_pair(cls, kwargs)
        what = f"{name} ref_emb={r is not None} ref_labels is labels={rl is labels}"
        value = _pml_parity(ours, theirs, x.to(device), labels, None if r is None else r.to(device), rl, expected,
                            what)
        assert value != 0, f"{what}: a zero loss tests little"


# (what, labels): batches where PML returns its zero for a sub-loss or the whole loss.
HINGE_DEGENERATE = [
    ("one_sample", [0]),
    ("two_same", [3, 3]),                # Contrastive: one positive pair each way, no negative
    ("one_class", [1] * 6),              # no negatives: Margin has no triplet
    ("no_positives", [0, 1, 2, 3, 4]),   # Contrastive: negatives only; Margin: no triplet
    ("one_triplet_anchor", [0, 0, 1, 2, 3]),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static_shapes"])
@pytest.mark.parametrize("what,labels", HINGE_DEGENERATE, ids=[c[0] for c in HINGE_DEGENERATE])
def test_hinge_losses_degenerate_batches_match_pml(engine_backend_choice, monkeypatch, backend, device, static,
                                                   what, labels):
    """Degenerate batches against PML 2.9.0: one sample, no positives, one class, no negatives;
    values and gradients (including a learnable beta's), eager and on the static-shape paths
    torch.compile takes (tensor-valued zeros)."""
    engine_backend_choice(backend, device)
    if torch.float64 not in dtypes_for(backend, device) and backend != "engine-reference":
        pytest.skip(f"the {backend} backend has no fp64 kernels on {device}")
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", static)
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), 6, generator=torch.Generator().manual_seed(len(labels)), dtype=torch.float64)
    for name, cls, kwargs in HINGE_PML_CASES:
        ours, theirs = _hinge_pair(cls, kwargs)
        _pml_parity(ours, theirs, x.to(device), labels.to(device), what=f"{name} {what}")
        assert ours.last_backend in ("zero", "reference" if backend == "engine-reference" else backend), \
            f"{name} {what}: ran {ours.last_backend} ({ours.last_fallback})"


def test_margin_per_class_beta_label_range():
    """A per-class beta is indexed by the anchors' labels: a label outside [0, num_classes) on an
    anchor raises as the reference does (naming labels); on a row without triplets (PML never
    indexes it) it is fine."""
    x = torch.randn(6, 4, dtype=torch.float64)
    loss_fn = losses.MarginLoss(learn_beta=True, num_classes=3)
    with pytest.raises(ValueError, match="labels must be in"):
        loss_fn(x, torch.tensor([0, 0, 1, 1, 5, 5]))
    value = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 7]))  # 7: a singleton, no positive
    loss_fn.backend = "reference"
    torch.testing.assert_close(value, loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 7])))


def test_margin_divisor_reducer_records_the_divisor():
    """PML's DivisorReducer records the divisor on every call; the fused path sets the same."""
    from pytorch_metric_learning import losses as pml_losses
    x = torch.randn(30, 6, dtype=torch.float64)
    labels = torch.randint(0, 4, (30,))
    ours, theirs = losses.MarginLoss(), pml_losses.MarginLoss()
    ours(x, labels)
    theirs(x, labels)
    assert ours.last_backend == "cpp"
    assert int(ours.reducer.reducers["margin_loss"].divisor) == int(theirs.reducer.reducers["margin_loss"].divisor) > 0


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if "cuda" in p.id])
def test_cuda_runs_under_strict_deterministic_algorithms(engine_backend_choice, backend, device):
    """A user's torch.use_deterministic_algorithms(True) (not warn_only): every fused loss, one
    with the unnormalised LpDistance (its centring) and the triplet family run on CUDA without
    an op raising for want of a deterministic version, bit-identical on repeat."""
    from dmlkern.distances import LpDistance
    expected = engine_backend_choice(backend, device)
    g = torch.Generator().manual_seed(41)
    x = torch.randn(67, 16, generator=g, dtype=torch.float32).to(device)
    labels = torch.randint(0, 5, (67,), generator=g).to(device)
    cases = dict(LOSSES)
    cases["contrastive_raw_lp"] = lambda c, d: losses.ContrastiveLoss(distance=LpDistance(normalize_embeddings=False))
    cases["triplet_semihard"] = lambda c, d: losses.TripletMarginLoss(margin=0.2)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name, make in cases.items():
            torch.manual_seed(0)
            loss_fn = make(5, 16).to(device)
            runs = []
            for _ in range(2):
                if name == "triplet_semihard":
                    xx = x.detach().clone().requires_grad_(True)
                    value = loss_fn(xx, labels, miners.TripletMarginMiner(type_of_triplets="semihard")(xx, labels))
                    runs.append((value.detach(), list(torch.autograd.grad(value, [xx]))))
                else:
                    runs.append(_run(loss_fn, name, x, labels, None, None, "fused"))
            assert loss_fn.last_backend != "reference", f"{name}: {loss_fn.last_fallback}"
            if name in LOSSES:
                assert loss_fn.last_backend == expected, f"{name}: ran {loss_fn.last_backend}"
            (v1, g1), (v2, g2) = runs
            assert torch.equal(v1, v2) and all(torch.equal(a, b) for a, b in zip(g1, g2)), f"{name}: bits differ"
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
