"""The blocked PNPLoss (dmlkern/fused/pnp.py), ThresholdConsistentMarginLoss (dmlkern/fused/tcm.py) and
DynamicSoftMarginLoss (dmlkern/fused/dynamic_soft_margin.py): against PML 2.9.0 itself (values and
gradients), on several row blocks, odd sizes, degenerate batches, NaN, float labels, thread-count
determinism, fp64 gradcheck, peak memory and the declines; DynamicSoftMargin's running histogram
over several calls against the reference (PML raises on a second backward)."""
import pytest
import torch
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses

import dmlkern.fused.ranking as ranking
from dmlkern import distances, losses
from dmlkern.fused import pnp as fused_pnp
from _blocked_checks import block_size  # noqa: F401 (the fixture)
from _blocked_checks import (DEGENERATE, TOL, assert_distance_statistics_match, assert_matches_pml,
                             assert_same_bits_across_threads,
                             blocked_call_peak_mib, value_grad as _value_grad)

CONFIGS = {
    "pnp": ("PNPLoss", {}),
    "pnp_Ds": ("PNPLoss", dict(variant="Ds", anneal=0.05)),
    "pnp_Dq": ("PNPLoss", dict(variant="Dq", alpha=2, anneal=0.1)),
    "pnp_Iu": ("PNPLoss", dict(variant="Iu")),
    "pnp_Ib": ("PNPLoss", dict(variant="Ib", b=3, anneal=0.2)),
    "tcm": ("ThresholdConsistentMarginLoss", {}),
    "tcm_args": ("ThresholdConsistentMarginLoss", dict(lambda_plus=0.5, lambda_minus=2.0, margin_plus=0.3,
                                                        margin_minus=0.1)),
    "dsm": ("DynamicSoftMarginLoss", {}),
    "dsm_args": ("DynamicSoftMarginLoss", dict(min_val=-2.5, num_bins=23, momentum=0.3)),
}


def _pair(config, power=None):
    cls, kw = CONFIGS[config]
    ours_kw, pml_kw = dict(kw), dict(kw)
    if power is not None:
        ours_kw["distance"] = distances.LpDistance(power=power)
        pml_kw["distance"] = pml_distances.LpDistance(power=power)
    return getattr(losses, cls)(**ours_kw), getattr(pml_losses, cls)(**pml_kw)


def _check_against_pml(config, x, labels, backends=("blocked",)):
    ours, pml = _pair(config)
    assert_matches_pml(ours, pml, x, labels, backends=backends)
    return ours


def _batch(n, classes, seed, dtype=torch.float64, d=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x + 0.8 * torch.randn(classes, d, generator=g, dtype=torch.float64)[torch.arange(n) % classes]
    labels = torch.randint(0, classes, (n,), generator=g)  # unequal classes, some of one row
    return x.to(dtype), labels


@pytest.fixture(params=["cpp", "torch"])
def pnp_kernel(request, monkeypatch):
    """PNP's ranks in C++ (the CPU's path) or in torch ops (the path elsewhere), on the CPU."""
    if request.param == "torch":
        monkeypatch.setattr(fused_pnp, "_CPU_KERNEL", False)
    elif not fused_pnp._CPU_KERNEL:
        pytest.fail("dmlkern::pnp_ranks is not registered in this build")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_against_pml(config, dtype, block_size, pnp_kernel):
    x, labels = _batch(37, 9, seed=3, dtype=dtype)
    x[:6] += 3 * x[0]  # TCM: some positives above margin_plus and negatives above margin_minus
    _check_against_pml(config, x, labels)


@pytest.mark.parametrize("config", ["pnp", "pnp_Dq", "tcm", "dsm"])
def test_float_labels(config):
    """Float labels (PML compares them by value; dmlkern maps them to ids first)."""
    x, ids = _batch(24, 4, seed=5)
    _check_against_pml(config, x, torch.tensor([0.5, -3.25, 7.0, 1e3], dtype=torch.float64)[ids])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,classes", DEGENERATE)
@pytest.mark.parametrize("config", ["pnp", "pnp_Dq", "tcm", "dsm"])
def test_degenerate_batches(config, n, classes, dtype):
    g = torch.Generator().manual_seed(n + classes)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype)
    _check_against_pml(config, x, torch.arange(n) % classes, backends=("blocked", "zero"))


def test_tcm_no_kept_pair_is_pml_zero():
    """Every positive above margin_plus, no negative: PML's Python 0, reduced to a zero with a
    gradient of zeros."""
    x = torch.ones(4, 3, dtype=torch.float64)
    ours = _check_against_pml("tcm", x, torch.zeros(4, dtype=torch.long))
    assert float(ours(x, torch.zeros(4, dtype=torch.long))) == 0


def test_empty_batch():
    for config in ("pnp", "tcm", "dsm"):
        ours, _ = _pair(config)
        x = torch.zeros(0, 5, requires_grad=True)
        value = ours(x, torch.zeros(0, dtype=torch.long))
        value.backward()
        assert float(value) == 0 and ours.last_backend == "zero"


@pytest.mark.parametrize("config", ["pnp", "pnp_Ds", "tcm"])
@pytest.mark.parametrize("nan_row", [False, True], ids=["entry", "row"])
def test_nan_propagates_as_in_pml(config, nan_row):
    """NaN values and gradients where PML's are (TCM: the reference runs, eagerly on the CPU: the
    NaN pattern of its gradient is F.cosine_similarity's)."""
    x, labels = _batch(24, 4, seed=7)
    x[3, :] = float("nan")
    if not nan_row:
        x[3, :2] = 1.0
    ours = _check_against_pml(config, x, labels, backends=("reference",) if config == "tcm" else ("blocked",))
    assert (ours.last_fallback is None) == (config != "tcm")


@pytest.mark.parametrize("config", ["pnp", "tcm", "dsm"])
def test_deterministic_across_thread_counts(config, pnp_kernel):
    """Bit-identical values and gradients on repeat and at 1 or 2 threads (several blocks)."""
    x, labels = _batch(512, 16, seed=11, dtype=torch.float32, d=16)
    assert_same_bits_across_threads(lambda: _pair(config)[0], x, labels)


@pytest.mark.parametrize("config", ["pnp_Ds", "pnp_Dq", "pnp_Ib", "tcm_args", "dsm", "dsm_args"])
def test_gradcheck_fp64(config):
    """A fresh loss per call (DynamicSoftMargin's histogram moves with each call). PNP at a
    temperature where no difference reaches the clamp's kink, |s_qk - s_qj| = 50 anneal; the
    differences of DynamicSoftMargin's triplets away from its bins' edges (seed)."""
    x, labels = _batch(11, 3, seed=13, d=5)
    x.requires_grad_(True)

    def loss_of(x):
        return _pair(config)[0](x, labels)

    torch.autograd.gradcheck(loss_of, (x,))
    ours = _pair(config)[0]
    ours(x, labels)
    assert ours.last_backend == "blocked"
    torch.autograd.gradgradcheck(loss_of, (x,))  # create_graph: the one-block twin


def test_gradcheck_pnp_rows(pnp_kernel):
    """The hand-written backward of the per-row sums of f(rank), at the default temperature (the
    differences kept inside the clamp) and on several row blocks."""
    x = 0.004 * torch.nn.functional.normalize(torch.randn(12, 5, dtype=torch.float64), dim=1)
    x.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 2, 0, 5])
    for variant in ("O", "Iu"):
        spec = fused_pnp._PNPSpec(labels, 0.01, fused_pnp._variant_fn(variant, 2, 1))
        spec.values_per_row = 10 ** 5  # one row per block
        torch.autograd.gradcheck(lambda x: ranking.row_stats(x, spec), (x,))


def _pnp_op_inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(41)
    s = torch.randn(5, 9, generator=g, dtype=dtype) * 0.2
    cols = torch.tensor([[0, 3, 0], [1, 4, 6], [2, 2, 2], [0, 3, 3], [1, 4, 6]])
    real = torch.tensor([[True, True, False], [True, True, True], [False, False, False], [True, True, False],
                         [True, True, True]])
    labels = torch.tensor([0, 1, 2, 0, 1, 5, 1, 7, 8])
    return s, cols, real, labels[:5], labels


def test_pnp_ops_against_their_torch_twin():
    """The C++ ranks and their backward against the torch block (same maths), fp32 and fp64."""
    if not fused_pnp._CPU_KERNEL:
        pytest.fail("dmlkern::pnp_ranks is not registered in this build")
    for dtype in (torch.float64, torch.float32):
        s, cols, real, row_labels, labels = _pnp_op_inputs(dtype)
        z = -(s[:, None, :] - s.gather(1, cols)[:, :, None]) / 0.05
        sig = 1 / (1 + torch.exp(z.clamp(-50, 50)))
        negative = (row_labels[:, None] != labels[None, :]).to(dtype)
        want = torch.where(real, (sig * negative[:, None, :]).sum(-1), 0)
        got = torch.ops.dmlkern.pnp_ranks(s, cols, real, row_labels, labels, 0.05)
        torch.testing.assert_close(got, want, **TOL[dtype])
        g_rank = torch.where(real, torch.randn(cols.shape, dtype=dtype), 0)
        s_ = s.clone().requires_grad_(True)
        z = -(s_[:, None, :] - s_.gather(1, cols)[:, :, None]) / 0.05
        ranks = ((1 / (1 + torch.exp(z.clamp(-50, 50)))) * negative[:, None, :]).sum(-1)
        (want_grad,) = torch.autograd.grad((torch.where(real, ranks, 0) * g_rank).sum(), s_)
        got_grad = torch.ops.dmlkern.pnp_ranks_backward(s, cols, real, row_labels, labels, 0.05, g_rank)
        torch.testing.assert_close(got_grad, want_grad, **TOL[dtype])


def test_pnp_ops_opcheck_and_errors():
    if not fused_pnp._CPU_KERNEL:
        pytest.fail("dmlkern::pnp_ranks is not registered in this build")
    s, cols, real, row_labels, labels = _pnp_op_inputs()
    torch.library.opcheck(torch.ops.dmlkern.pnp_ranks.default, (s, cols, real, row_labels, labels, 0.05))
    torch.library.opcheck(torch.ops.dmlkern.pnp_ranks_backward.default,
                          (s, cols, real, row_labels, labels, 0.05, torch.ones(cols.shape, dtype=s.dtype)))
    bad = [((s.half(), cols, real, row_labels, labels, 0.05), "float32 or float64 s"),
           ((s, cols.int(), real, row_labels, labels, 0.05), "cols must be int64"),
           ((s, cols, real.long(), row_labels, labels, 0.05), "real must be bool"),
           ((s, cols, real, row_labels[:3], labels, 0.05), "row_labels must be int64 of shape"),
           ((s, cols, real, row_labels, labels[:4], 0.05), "col_labels must be int64 of shape"),
           ((s, cols + 9, real, row_labels, labels, 0.05), "cols must index s's columns"),
           ((s, cols, real, row_labels, labels, 0.0), "anneal must be > 0")]
    for args, words in bad:
        with pytest.raises(RuntimeError, match=words):
            torch.ops.dmlkern.pnp_ranks(*args)
    with pytest.raises(RuntimeError, match="g_rank must have cols' shape"):
        torch.ops.dmlkern.pnp_ranks_backward(s, cols, real, row_labels, labels, 0.05, torch.ones(2, 2, dtype=s.dtype))


@pytest.mark.parametrize("config", ["pnp", "tcm", "dsm"])
def test_torch_func_grad(config):
    x, labels = _batch(24, 4, seed=17)
    ours, again = _pair(config)[0], _pair(config)[0]  # (two: DynamicSoftMargin's histogram moves)
    grad = torch.func.grad(lambda x: ours(x, labels))(x)
    assert ours.last_backend == "blocked"
    torch.testing.assert_close(grad, _value_grad(again, x, labels)[1], **TOL[torch.float64])


def test_pnp_distance_statistics():
    x, labels = _batch(20, 4, seed=2, dtype=torch.float32, d=6)
    assert_distance_statistics_match(lambda: _pair("pnp"), x, labels)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("power,kw", [(1, {}), (2, {}), (1, dict(min_val=-0.5, num_bins=3, momentum=0.5)),
                                      (2, dict(min_val=-1.0, num_bins=7))])
def test_dsm_running_histogram_against_reference(power, kw, dtype, block_size):
    """Three calls (the histogram carried from call to call) against the reference, including
    differences outside the histogram's range (PML: index error) and the squared distance."""
    x, labels = _batch(33, 6, seed=23, dtype=dtype)
    ours = losses.DynamicSoftMarginLoss(distance=distances.LpDistance(power=power), **kw)
    ref = losses.DynamicSoftMarginLoss(distance=distances.LpDistance(power=power), **kw)
    ref.backend = "reference"
    for step in range(3):
        xs = x + 0.3 * step * x.flip(0)
        value, grad = _value_grad(ours, xs, labels)
        assert ours.last_backend == "blocked", ours.last_fallback
        want_value, want_grad = _value_grad(ref, xs, labels)
        torch.testing.assert_close(value, want_value, **TOL[dtype])
        torch.testing.assert_close(grad, want_grad, **TOL[dtype])
        assert ours.hist_.dtype == dtype
        torch.testing.assert_close(ours.hist_, ref.hist_, **TOL[dtype])


@pytest.mark.parametrize("config", ["dsm", "dsm_args"])
def test_dsm_binned_sums_without_scatter(config, monkeypatch):
    """The per-bin masked row sums that replace scatter_add off the CPU (its atomics' order varies)."""
    monkeypatch.setattr(ranking, "_SCATTER_DEVICE_TYPES", ())
    monkeypatch.setattr(ranking, "_GPU_BLOCK_VALUES", 5000)  # several row chunks
    x, labels = _batch(29, 5, seed=37)
    _check_against_pml(config, x, labels)


def test_dsm_fp32_at_least_as_accurate_as_the_reference():
    """fp32 against the fp64 reference, over batches whose differences fill few bins (two classes;
    wide rows: every difference near 0, u near 5): the loss is a small difference of large sums
    there, so each bin's sum of u's fractional parts is kept apart from i c_i."""
    ours_err, ref_err = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        n, d = 20 + 3 * seed, 4 + 5 * seed if seed % 2 else 512  # (wide: every distance near sqrt(2), u near 5)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 2, (n,), generator=g)
        reference = losses.DynamicSoftMarginLoss()
        reference.backend = "reference"
        truth = float(reference(x, labels))
        reference = losses.DynamicSoftMarginLoss()
        reference.backend = "reference"
        ref_err.append(abs(float(reference(x.float(), labels)) - truth) / abs(truth))
        ours = losses.DynamicSoftMarginLoss()
        ours_err.append(abs(float(ours(x.float(), labels)) - truth) / abs(truth))
        assert ours.last_backend == "blocked"
    # measured (AMD EPYC): 1.8e-7 against the reference's 5.4e-7; U_i - i c_i in float32: 4.4e-7
    assert max(ours_err) <= 0.7 * max(ref_err), (ours_err, ref_err)


def test_dsm_first_call_against_pml_squared():
    x, labels = _batch(30, 5, seed=29)
    assert_matches_pml(*_pair("dsm", power=2), 0.3 * x + 1, labels)  # (differences inside PML's bins)


def test_declines():
    x, labels = _batch(16, 4, seed=19)
    pairs = (torch.tensor([0, 4]), torch.tensor([4, 0]), torch.tensor([0, 1]), torch.tensor([1, 2]))
    short = x.clone()
    short[5] = 1e-9
    tcm, pnp, dsm = losses.ThresholdConsistentMarginLoss, losses.PNPLoss, losses.DynamicSoftMarginLoss
    nan = x.clone()
    nan[2, 3] = float("nan")
    cases = [  # (loss, call arguments, embeddings, words of the reason, whether PML's number is checked)
        (tcm(), dict(indices_tuple=pairs), x, "indices_tuple", True),
        (tcm(), dict(ref_emb=x.flip(0), ref_labels=labels), x, "ref_emb", True),
        (tcm(), {}, short, "1e-8", True),
        (tcm(), {}, x.half(), "dtype", False),  # (PML's CPU half cosine)
        (pnp(distance=distances.CosineSimilarity(power=2)), {}, x, "distance", False),
        (pnp(), {}, x.half(), "dtype", False),
        (dsm(), dict(indices_tuple=pairs), x, "indices_tuple", False),  # (PML: index error here)
        (dsm(), dict(ref_emb=x.flip(0), ref_labels=labels), x, "ref_emb", False),
        (dsm(distance=distances.LpDistance(power=3)), {}, x, "power 3", False),
        (dsm(min_val=-0.001, num_bins=10), {}, x, "bins", False),  # (20001 bins of width 2e-4 over [-2, 2])
        (dsm(), {}, x.half(), "dtype", False),
        (dsm(), {}, nan, "NaN", False),
    ]
    for loss_fn, kw, inputs, why, compare in cases:
        value = loss_fn(inputs, labels, **kw)
        assert loss_fn.last_backend == "reference" and why in loss_fn.last_fallback, (loss_fn, loss_fn.last_fallback)
        if compare:
            want = getattr(pml_losses, type(loss_fn).__name__)()(inputs, labels, **kw)
            torch.testing.assert_close(value, want, **TOL[torch.float64])
    with pytest.raises(ValueError, match="ref_emb"):  # PNP: as PML, before either path runs
        losses.PNPLoss()(x, labels, ref_emb=x.clone(), ref_labels=labels)


@pytest.mark.parametrize("ctor,n", [("losses.ThresholdConsistentMarginLoss()", 8192), ("losses.PNPLoss()", 2048),
                                     ("losses.DynamicSoftMarginLoss()", 4096)])
def test_memory_is_linear_in_n(ctor, n):
    """fwd+bwd grows peak RSS by < 96 MiB, in a fresh process. TCM at N=8192: PML lists the 67M
    pairs and gathers both rows of each (~16 GiB; one N x N fp32 matrix would be 256 MiB). PNP at
    N=2048: PML holds several N^3 fp32 tensors (32 GiB each). DynamicSoftMargin at N=4096: PML's
    triplet mask alone is N^3 bools (64 GiB)."""
    growth_mib = blocked_call_peak_mib(ctor, n)
    print(f"{ctor} N={n}: peak RSS +{growth_mib:.0f} MiB")
    assert growth_mib < 96, f"peak RSS grew by {growth_mib:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["pnp", "pnp_Iu", "tcm", "dsm", "dsm_args"])
def test_cuda_matches_cpu(config, monkeypatch):
    """On CUDA (the blocks' torch ops, the binned sums as reductions), fp32 and fp64, one block and
    several: PML's CPU value and gradient, bit-identical on repeat."""
    x, labels = _batch(70, 9, seed=31)
    x[:6] += 3 * x[0]
    for dtype in (torch.float64, torch.float32):
        want_value, want_grad = _value_grad(_pair(config)[1], x.to(dtype), labels)
        for block_values in (ranking._GPU_BLOCK_VALUES, 900):
            monkeypatch.setattr(ranking, "_GPU_BLOCK_VALUES", block_values)
            runs = []
            for _ in range(2):
                ours = _pair(config)[0]
                runs.append(_value_grad(ours, x.to("cuda", dtype), labels.cuda()))
                assert ours.last_backend == "blocked", ours.last_fallback
            assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
            torch.testing.assert_close(runs[0][0].cpu(), want_value, **TOL[dtype])
            torch.testing.assert_close(runs[0][1].cpu(), want_grad, **TOL[dtype])
