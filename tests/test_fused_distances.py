"""The fused pair / triplet losses on the distances beyond the unit-row defaults
(`fused._common.engine_rows`): DotProductSimilarity(normalize_embeddings=False) on the raw rows,
LpDistance(normalize_embeddings=False) on augmented rows (power 1 and 2), LpDistance(power=2) on
unit rows; against PML 2.9.0 itself (values and gradients)."""
import pytest
import torch
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.reducers as pml_reducers

from dmlkern import distances, losses
from dmlkern import reducers as our_reducers
from dmlkern.fused import _common
from _kernel_cases import KERNEL_BACKENDS
from _pml_helpers import assert_value_and_grads_close
from _peak_rss import peak_rss_growth_mib

RAW_DOT = ("DotProductSimilarity", {"normalize_embeddings": False})
RAW_LP = ("LpDistance", {"normalize_embeddings": False})
RAW_LP_SQ = ("LpDistance", {"normalize_embeddings": False, "power": 2})
UNIT_LP_SQ = ("LpDistance", {"power": 2})

# loss -> (constructor arguments, the distances its fused path takes beyond the defaults). The
# margins suit distances of rows of norm ~3 (the inputs below).
LOSSES = {
    "ContrastiveLoss": ({"pos_margin": 0.5, "neg_margin": 4.0}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ)),
    "TripletMarginLoss": ({"margin": 0.5}, (RAW_DOT, RAW_LP)),
    "MarginLoss": ({"margin": 0.3, "beta": 3.0}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ)),
    "MultiSimilarityLoss": ({"alpha": 2.0, "beta": 5.0, "base": 0.5}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ)),
    "NTXentLoss": ({"temperature": 2.0}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ, ("LpDistance", {}))),
    "SupConLoss": ({"temperature": 2.0}, (RAW_DOT,)),
    "NCALoss": ({"softmax_scale": 0.3}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ)),  # (UNIT_LP_SQ: its default)
    "GeneralizedLiftedStructureLoss": ({"pos_margin": 0.5, "neg_margin": 4.0}, (RAW_DOT, RAW_LP, RAW_LP_SQ,
                                                                               UNIT_LP_SQ)),
    # (its lifted_pairs pass needs the rows to be the columns: no augmented rows)
    "LiftedStructureLoss": ({"pos_margin": 0.2, "neg_margin": 2.0}, (RAW_DOT, UNIT_LP_SQ)),
    "NPairsLoss": ({}, (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ, ("LpDistance", {}))),
}
NO_REF_EMB = ("LiftedStructureLoss", "NPairsLoss")  # Lifted's fused path declines ref_emb; NPairs takes none
CASES = [(name, dist) for name, (_, dists) in LOSSES.items() for dist in dists]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def _case_id(case):
    name, (cls, kw) = case
    return f"{name}-{cls}-" + "-".join(f"{k[:4]}{v}" for k, v in kw.items())


def _inputs(n, classes, ref_rows, dtype, scale=1.0, offset=0.0, seed=0, dim=9):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return x, labels, None, None
    ref = (torch.randn(ref_rows, dim, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    return x, labels, ref, torch.randint(0, classes, (ref_rows,), generator=g)


def _run(lib, name, dist, x, labels, ref=None, ref_labels=None, backend=None, params=None):
    """(value, [grad x, grad ref], the loss module) of lib's loss with that distance."""
    dmod, lmod = (distances, losses) if lib == "ours" else (pml_distances, pml_losses)
    cls, kw = dist
    loss_fn = getattr(lmod, name)(distance=getattr(dmod, cls)(**kw), **(LOSSES[name][0] if params is None else params))
    if backend is not None:
        loss_fn.backend = backend
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    value = loss_fn(x, labels, None, ref, ref_labels)
    wrt = [x] + ([] if ref is None else [ref])
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)], loss_fn


def _assert_matches_pml(name, dist, x, labels, ref=None, ref_labels=None, tol=None, backend=None, fused=True,
                        against="pml"):
    """against: "pml", or "reference" (dmlkern's reference path: where it deviates from PML on
    purpose, e.g. NCALoss's 0 for a batch without positives, PML's NaN)."""
    ours, our_grads, loss_fn = _run("ours", name, dist, x, labels, ref, ref_labels, backend)
    if against == "pml":
        want, want_grads, _ = _run("pml", name, dist, x, labels, ref, ref_labels)
    else:
        want, want_grads, _ = _run("ours", name, dist, x, labels, ref, ref_labels, "reference")
    if fused:
        assert loss_fn.last_backend != "reference", loss_fn.last_fallback
    assert_value_and_grads_close(ours, our_grads, want, want_grads, **(tol or TOL[x.dtype]))
    return loss_fn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_pml(case, dtype):
    """Odd sizes, with and without ref_emb, float labels; rows of norm ~3 around an offset."""
    name, dist = case
    x, labels, ref, ref_labels = _inputs(37, 5, 29, dtype, scale=1.0, offset=0.3)
    for ref_, ref_labels_, labels_ in ((None, None, labels), (ref, ref_labels, labels),
                                       (None, None, labels.to(torch.float32))):
        if ref_ is not None and name == "NPairsLoss":
            continue  # (PML's NPairsLoss takes no ref_emb)
        fused = ref_ is None or name not in NO_REF_EMB
        loss_fn = _assert_matches_pml(name, dist, x, labels_, ref_, ref_labels_, fused=fused)
        assert (loss_fn.last_backend in ("cpp", "blocked")) == fused, loss_fn.last_fallback


@pytest.mark.parametrize("case", [c for c in CASES if c[1] in (RAW_LP, RAW_LP_SQ)], ids=_case_id)
def test_norms_far_from_one_fp32(case):
    """Rows of norm ~10-100 in fp32: PML's torch.cdist (matrix-product form past 25 rows) cancels
    |x|^2 + |y|^2 - 2 x.y on the raw norms; the augmented rows, centred on the rows' median, on the
    spread. Both against PML in fp64: ours is at least about as close as PML's own fp32 result."""
    name, dist = case
    params = dict(LOSSES[name][0])
    spread = 4.0
    for key in ("pos_margin", "neg_margin", "beta", "margin", "base"):  # margins on the data's scale
        if key in params:
            params[key] = params[key] * spread * (spread if dist is RAW_LP_SQ else 1.0)
    if name == "NCALoss":
        params["softmax_scale"] = 0.3 / spread / (spread if dist is RAW_LP_SQ else 1.0)
    if name == "MultiSimilarityLoss":
        params["alpha"], params["beta"] = 2.0 / spread, 5.0 / spread
    if name == "NTXentLoss":  # logits on the data's scale too (else most terms at PML's cap, -log tiny)
        params["temperature"] *= spread * (spread if dist is RAW_LP_SQ else 1.0)
    x, labels, ref, ref_labels = _inputs(41, 5, None, torch.float64, scale=spread, offset=20.0, seed=3)
    want, want_grads, _ = _run("pml", name, dist, x, labels, params=params)
    ours, our_grads, loss_fn = _run("ours", name, dist, x.float(), labels, params=params)
    pml32, pml32_grads, _ = _run("pml", name, dist, x.float(), labels, params=params)
    assert loss_fn.last_backend != "reference", loss_fn.last_fallback
    assert abs(float(ours) - float(want)) <= 1e-4 * abs(float(want)) + 1e-5
    our_err = float((our_grads[0].double() - want_grads[0]).abs().max())
    pml_err = float((pml32_grads[0].double() - want_grads[0]).abs().max())
    assert our_err <= max(2 * pml_err, 1e-5 * float(want_grads[0].abs().max())), (our_err, pml_err)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_degenerate_batches(case):
    """One sample, one class, no positive pair, and a zero row."""
    name, dist = case
    for n, classes in ((1, 1), (12, 1), (9, 9)):
        x, labels, _, _ = _inputs(n, classes, None, torch.float64, seed=n)
        if classes == 9:
            labels = torch.arange(n)
        _assert_matches_pml(name, dist, x, labels, fused=False, against="reference")
    x, labels, _, _ = _inputs(15, 3, None, torch.float64, seed=5)
    x[4] = 0.0
    loss_fn = _assert_matches_pml(name, dist, x, labels, fused=dist in (RAW_DOT, RAW_LP, RAW_LP_SQ),
                                  against="reference")
    if dist is UNIT_LP_SQ:  # a zero row stays zero normalised: d^2 = 2 - 2s doesn't hold
        assert loss_fn.last_fallback == _common.SHORT_ROWS


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_nan_propagates_as_in_pml(case):
    name, dist = case
    x, labels, _, _ = _inputs(20, 4, None, torch.float64, seed=13)
    x[3, 2] = float("nan")
    ours, _, _ = _run("ours", name, dist, x, labels)
    want, _, _ = _run("pml", name, dist, x, labels)
    torch.testing.assert_close(ours, want, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradcheck_fp64(case):
    name, dist = case
    x, labels, ref, ref_labels = _inputs(11, 3, 8, torch.float64, seed=7, dim=5)
    if name in NO_REF_EMB:
        ref, ref_labels = x[:8].clone(), labels  # (a stand-in, unused below)
    cls, kw = dist
    loss_fn = getattr(losses, name)(distance=getattr(distances, cls)(**kw), **LOSSES[name][0])

    def f(x, ref):
        if name in NO_REF_EMB:
            return loss_fn(x, labels) + 0 * ref.sum()
        return loss_fn(x, labels, None, ref, ref_labels)
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), ref.clone().requires_grad_(True)))
    assert loss_fn.last_backend in ("cpp", "blocked"), loss_fn.last_fallback


@pytest.mark.parametrize("reducer", ["MeanReducer", "AvgNonZeroReducer", "SumReducer"])
@pytest.mark.parametrize("dist", [RAW_DOT, UNIT_LP_SQ], ids=lambda d: d[0] + str(d[1]))
def test_lifted_reducers(dist, reducer):
    """LiftedStructureLoss's lifted_pairs pass (Mean / AvgNonZero) and its pair list (others)."""
    x, labels, _, _ = _inputs(33, 5, None, torch.float64, offset=0.2, seed=37)
    results = []
    for lib, dmod, lmod, rmod in (("ours", distances, losses, our_reducers), ("pml", pml_distances, pml_losses,
                                                                           pml_reducers)):
        xx = x.clone().requires_grad_(True)
        loss_fn = lmod.LiftedStructureLoss(distance=getattr(dmod, dist[0])(**dist[1]),
                                           reducer=getattr(rmod, reducer)(), **LOSSES["LiftedStructureLoss"][0])
        value = loss_fn(xx, labels)
        results.append((value.detach(), torch.autograd.grad(value, xx)[0]))
        if lib == "ours":
            assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    torch.testing.assert_close(results[0][0], results[1][0], **TOL[torch.float64])
    torch.testing.assert_close(results[0][1], results[1][1], **TOL[torch.float64])


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss")],
                         ids=_case_id)
def test_engine_backends_match_pml(case, backend, device):
    """The same rows on every engine backend (Triton: the interpreter on a CPU); on a GPU also fp16:
    the raw dot product runs fused, the augmented rows decline (|x|^2 / 2 would cancel)."""
    name, dist = case
    x, labels, ref, ref_labels = (t.to(device) for t in _inputs(21, 4, 13, torch.float32, offset=0.3, seed=11))
    loss_fn = _assert_matches_pml(name, dist, x, labels, ref, ref_labels, backend=backend)
    assert loss_fn.last_backend == backend, loss_fn.last_fallback
    if device == "cuda":
        half = x.to(torch.float16)
        ours, _, loss_fn = _run("ours", name, dist, half, labels, backend=backend)
        if dist in (RAW_LP, RAW_LP_SQ):
            assert loss_fn.last_fallback == _common.RAW_EUCLIDEAN_DTYPE.format(torch.float16)
        else:
            assert loss_fn.last_backend == backend, loss_fn.last_fallback
            want, _, _ = _run("pml", name, dist, half.float(), labels)  # the same values, PML in fp32
            torch.testing.assert_close(ours.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name,dist", [("ContrastiveLoss", RAW_LP), ("MultiSimilarityLoss", RAW_LP_SQ),
                                       ("TripletMarginLoss", RAW_LP), ("NTXentLoss", RAW_DOT)])
def test_bit_identical_across_thread_counts(name, dist):
    # NT-Xent's raw dot products on rows of norm ~18 would put every term at PML's cap (-log tiny,
    # a gradient of ~0): smaller rows keep its gradient in the comparison
    scale, offset = (1.0, 0.3) if name == "NTXentLoss" else (3.0, 1.0)
    x, labels, ref, ref_labels = _inputs(300, 20, None, torch.float32, scale=scale, offset=offset, seed=17, dim=33)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            value, grads, loss_fn = _run("ours", name, dist, x, labels)
            assert loss_fn.last_backend in ("cpp", "blocked"), loss_fn.last_fallback
            results.append((value, grads[0]))
    finally:
        torch.set_num_threads(before)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


def test_unsupported_configurations_decline():
    """What the fused paths don't express runs the reference, with the reason recorded."""
    x, labels, _, _ = _inputs(20, 4, None, torch.float64, seed=23)
    cases = [
        ("TripletMarginLoss", RAW_LP_SQ, "distance LpDistance"),  # the blocked path takes d or -s only
        ("TripletMarginLoss", UNIT_LP_SQ, "distance LpDistance"),
        ("ContrastiveLoss", ("LpDistance", {"p": 1}), "non-default distance LpDistance"),
        ("SupConLoss", RAW_LP, "raw euclidean: not on this loss's fused path"),  # its class sums need s
        ("SupConLoss", ("LpDistance", {}), "unit euclidean: not on this loss's fused path"),
        ("LiftedStructureLoss", RAW_LP, "raw euclidean: not on this loss's fused path"),
        ("ContrastiveLoss", ("LpDistance", {"normalize_embeddings": False, "power": 3}),
         "non-default distance LpDistance"),
    ]
    for name, dist, why in cases:
        _, _, loss_fn = _run("ours", name, dist, x, labels, params={})
        assert loss_fn.last_backend == "reference" and why in loss_fn.last_fallback, (name, loss_fn.last_fallback)


def test_half_precision_raw_euclidean_declines():
    """The augmented rows' |x|^2 / 2 would cancel at half precision: the fused paths decline (on a
    CPU the engine has no fp16 kernel anyway, so the check is the GPU's: tested on its own)."""
    x = torch.randn(20, 6).to(torch.float16)
    for dist in (RAW_LP, RAW_LP_SQ):
        distance = getattr(distances, dist[0])(**dist[1])
        assert _common.engine_rows_reason(distance, x, x) == _common.RAW_EUCLIDEAN_DTYPE.format(torch.float16)
    assert _common.engine_rows_reason(distances.DotProductSimilarity(normalize_embeddings=False), x, x) is None
    loss_fn = losses.ContrastiveLoss(distance=distances.LpDistance(normalize_embeddings=False))
    loss_fn(x, torch.randint(0, 3, (20,)))
    assert loss_fn.last_backend == "reference"


def test_euclidean_rows_dot_products():
    """x~ . y~ = 1 - |x - y|^2 / 2 for the augmented rows, whatever the median shift."""
    x, _, ref, _ = _inputs(13, 2, 7, torch.float64, scale=5.0, offset=30.0, seed=31)
    xa, ya = _common.euclidean_rows(x, ref)
    torch.testing.assert_close(2 - 2 * xa @ ya.T, torch.cdist(x, ref) ** 2, rtol=1e-10, atol=1e-9)
    xa, ya = _common.euclidean_rows(x, x)
    torch.testing.assert_close(2 - 2 * xa @ ya.T, torch.cdist(x, x) ** 2, rtol=1e-10, atol=1e-9)


# (loss, its distance's kwargs, the loss's kwargs)
MEMORY_CASES = [("ContrastiveLoss", "{'normalize_embeddings': False}", "{}"),
                ("MultiSimilarityLoss", "{'normalize_embeddings': False, 'power': 2}", "{}"),
                ("TripletMarginLoss", "{'normalize_embeddings': False}", "{}"),
                ("NTXentLoss", "{'normalize_embeddings': False}", "{}")]


@pytest.mark.slow
@pytest.mark.parametrize("name,kw,loss_kw", MEMORY_CASES)
def test_memory_is_linear_in_n(name, kw, loss_kw):
    """fwd+bwd at N=16384, D=128 with an unnormalised distance grows peak RSS by < 256 MiB (an N x N
    fp32 matrix is 1 GiB), measured in a fresh process."""
    cls = "DotProductSimilarity" if name == "NTXentLoss" else "LpDistance"
    growth_mib = peak_rss_growth_mib(
        setup=f"""
            from dmlkern import distances
            torch.manual_seed(0)
            n, d = 16384, 128
            x = (torch.randn(n, d) * 0.3 + 1.0).requires_grad_(True)
            labels = torch.randint(0, n // 4, (n,))
            loss_fn = losses.{name}(distance=distances.{cls}(**{kw}), **{loss_kw})
        """,
        measured="""
            loss = loss_fn(x, labels)
            loss.backward()
            assert loss_fn.last_backend in ("cpp", "blocked"), loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"


LISTED = {  # loss -> the distances its listed path takes beyond the defaults
    "ContrastiveLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "MultiSimilarityLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "GeneralizedLiftedStructureLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "LiftedStructureLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "NTXentLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "SupConLoss": (RAW_DOT,),
    "TripletMarginLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
    "MarginLoss": (RAW_DOT, RAW_LP, RAW_LP_SQ, UNIT_LP_SQ),
}


def _sparse_pairs(labels, num_pos, num_neg, seed):
    """A few positive and negative pairs (a1, p, a2, n) of one labels tensor, as a miner's."""
    g = torch.Generator().manual_seed(seed)
    same = labels[:, None] == labels[None, :]
    a1, p = (same & ~torch.eye(len(labels), dtype=torch.bool)).nonzero(as_tuple=True)
    a2, n = (~same).nonzero(as_tuple=True)
    k1, k2 = torch.randperm(len(a1), generator=g)[:num_pos], torch.randperm(len(a2), generator=g)[:num_neg]
    return a1[k1], p[k1], a2[k2], n[k2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", [(name, d) for name, dists in LISTED.items() for d in dists], ids=_case_id)
def test_listed_pairs_and_triplets_match_pml(case, dtype, monkeypatch):
    """An explicit indices_tuple (pairs, and triplets for the triplet losses): the listed paths on
    the gathered rows of `engine_rows`, with PML's default parameters."""
    import dmlkern.fused.listed_pairs as listed_pairs
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    monkeypatch.setattr(listed_pairs, "DENSE_FRACTION", float("inf"))  # (small batch: "dense" tuples)
    name, dist = case
    x, labels, _, _ = _inputs(31, 4, None, dtype, scale=0.7, offset=0.2, seed=41, dim=7)
    pairs = _sparse_pairs(labels, 40, 60, seed=43)
    tuples = [pairs]
    if name in ("TripletMarginLoss", "MarginLoss"):
        tuples.append(lmu.convert_to_triplets(pairs, labels))
    for tup in tuples:
        results = []
        for lib in ("ours", "pml"):
            dmod, lmod = (distances, losses) if lib == "ours" else (pml_distances, pml_losses)
            loss_fn = getattr(lmod, name)(distance=getattr(dmod, dist[0])(**dist[1]))
            xx = x.clone().requires_grad_(True)
            value = loss_fn(xx, labels, tup)
            results.append((value.detach(), torch.autograd.grad(value, xx)[0]))
            if lib == "ours":
                assert loss_fn.last_backend == "listed", loss_fn.last_fallback
        torch.testing.assert_close(results[0][0], results[1][0], **TOL[dtype])
        torch.testing.assert_close(results[0][1], results[1][1], **TOL[dtype])


def test_multi_similarity_miner_pairs_with_another_distance_run_listed(monkeypatch):
    """MultiSimilarityMiner's lazy pairs (mined on the cosine) with the loss on the raw Lp distance:
    the kernel can't mine on the loss's values, so the miner's pairs are listed."""
    import dmlkern.fused.listed_pairs as listed_pairs
    import pytorch_metric_learning.miners as pml_miners
    from dmlkern import miners

    monkeypatch.setattr(listed_pairs, "DENSE_FRACTION", float("inf"))  # (small batch: a "dense" tuple)
    x, labels, _, _ = _inputs(40, 5, None, torch.float64, seed=47)
    xx = x.clone().requires_grad_(True)
    loss_fn = losses.MultiSimilarityLoss(distance=distances.LpDistance(normalize_embeddings=False))
    value = loss_fn(xx, labels, miners.MultiSimilarityMiner(epsilon=0.5)(xx, labels))
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    xp = x.clone().requires_grad_(True)
    want = pml_losses.MultiSimilarityLoss(distance=pml_distances.LpDistance(normalize_embeddings=False))(
        xp, labels, pml_miners.MultiSimilarityMiner(epsilon=0.5)(xp, labels))
    torch.testing.assert_close(value, want, **TOL[torch.float64])
    torch.testing.assert_close(torch.autograd.grad(value, xx)[0], torch.autograd.grad(want, xp)[0],
                               **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_supcon_rows_whose_loss_rounds_to_zero(dtype):
    """A row with one positive far above its negatives: PML's log(1 + delta) is exactly 0 in fp32
    (1 + delta rounds to 1) and AvgNonZeroReducer leaves the row out; the fused rows do the same."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (12,), generator=g)
    ref = torch.randn(7, 6, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 3, (7,), generator=g)
    x, ref = x.to(dtype), ref.to(dtype)
    loss_fn = _assert_matches_pml("SupConLoss", RAW_DOT, x, labels, ref, ref_labels, tol=TOL[dtype])
    assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
    # (the case has such a row in fp32: without the rule the fp32 value is 6/5 of PML's)
    pml_rows = pml_losses.SupConLoss(distance=pml_distances.DotProductSimilarity(normalize_embeddings=False),
                                     reducer=pml_reducers.DoNothingReducer())(x, labels, None, ref, ref_labels)
    assert bool((pml_rows["loss"]["losses"] == 0).any()) == (dtype == torch.float32)


@pytest.mark.parametrize("name,dist", [("ContrastiveLoss", RAW_LP), ("TripletMarginLoss", RAW_LP),
                                       ("MultiSimilarityLoss", RAW_LP_SQ), ("NTXentLoss", RAW_DOT)])
def test_double_backward_matches_the_reference(name, dist):
    """create_graph=True: the reference twin's differentiable gradient through the augmented rows."""
    x, labels, _, _ = _inputs(15, 3, None, torch.float64, offset=0.5, seed=53)
    v = torch.randn_like(x)
    hvps = []
    for backend in ("auto", "reference"):
        xx = x.clone().requires_grad_(True)
        loss_fn = getattr(losses, name)(distance=getattr(distances, dist[0])(**dist[1]), **LOSSES[name][0])
        loss_fn.backend = backend
        (g,) = torch.autograd.grad(loss_fn(xx, labels), xx, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), xx)[0])
        assert (loss_fn.last_backend == "reference") == (backend == "reference"), loss_fn.last_fallback
    torch.testing.assert_close(hvps[0], hvps[1], **TOL[torch.float64])


def test_under_torch_compile():
    """fullgraph torch.compile of the fused paths on the augmented / raw rows (static shapes)."""
    x, labels, _, _ = _inputs(37, 5, None, torch.float32, scale=2.0, offset=1.0, seed=59)
    for name, dist in (("ContrastiveLoss", RAW_LP), ("MultiSimilarityLoss", RAW_DOT), ("NCALoss", RAW_LP_SQ)):
        loss_fn = getattr(losses, name)(distance=getattr(distances, dist[0])(**dist[1]), **LOSSES[name][0])
        want = loss_fn(x, labels)
        assert loss_fn.last_backend == "cpp", loss_fn.last_fallback
        torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(x, labels), want, **TOL[torch.float32])


def test_sorted_nanmedian_is_nanmedian():
    """The unnormalised LpDistance's centring on CUDA takes each column's median from a sort
    (nanmedian has no deterministic CUDA kernel): torch.nanmedian's values, NaN ignored, the lower
    middle for an even count, NaN for an all-NaN column; checked here on the CPU."""
    g = torch.Generator().manual_seed(2)
    for rows in (1, 2, 7, 10):
        t = torch.randn(rows, 6, generator=g, dtype=torch.float64)
        t[torch.rand(rows, 6, generator=g) < 0.3] = float("nan")
        t[:, 0] = float("nan")
        t[0, 1] = float("inf")
        t[:, 2] = t[0, 2]  # ties
        want = torch.nanmedian(t, dim=0).values
        got = _common.sorted_nanmedian(t)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()]), (rows, t)
