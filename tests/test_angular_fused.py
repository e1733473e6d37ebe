"""The fused AngularLoss (dmlkern/fused/angular.py): all pairs on class blocks of Gram products
("blocked"), an indices_tuple's pairs listed ("listed"); against PML 2.9.0 itself (values,
gradients of embeddings and ref_emb, the per-pair loss dict), forced small blocks, degenerate
batches, NaN, the declined exp-range case, gradcheck, double backward, thread-count
reproducibility, statistics and memory at N=16384; classes of very different sizes in one batch
and the blocks' same-label entries against the label comparison."""
import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.reducers as pml_reducers

import dmlkern.fused.angular as fused_angular
from dmlkern import _tracing, losses, miners, reducers
from dmlkern.fused._common import LabelStats
from dmlkern._determinism import log as fixed_log
from _pml_helpers import assert_value_and_grads_close, random_indices
from _peak_rss import peak_rss_growth_mib

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
# (N, classes, ref rows or None, D). Degenerate: one sample, one class, no positives (all
# labels distinct), two rows of two classes.
CASES = [(37, 5, None, 13), (129, 11, None, 7), (70, 6, 53, 16), (33, 4, 33, 5), (61, 2, None, 9),
         (1, 1, None, 8), (12, 1, None, 8), (9, 9, None, 8), (2, 2, None, 8)]
DEGENERATE = {(1, 1), (12, 1), (9, 9), (2, 2)}


def _inputs(n, classes, ref_rows, d, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 7 + classes)
    x = (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.arange(n) % classes if classes == n else torch.randint(0, classes, (n,), generator=g)
    if ref_rows is None:
        return x, labels, None, None
    ref = (scale * torch.randn(ref_rows, d, generator=g, dtype=torch.float64)).to(dtype)
    return x, labels, ref, torch.randint(0, classes, (ref_rows,), generator=g)


def _run(loss_fn, x, labels, ref=None, ref_labels=None, indices_tuple=None):
    """(value, [grad x, grad ref]) on fresh leaves."""
    x = x.clone().requires_grad_(True)
    ref = None if ref is None else ref.clone().requires_grad_(True)
    value = loss_fn(x, labels, indices_tuple, ref, ref_labels)
    wrt = [x] + ([] if ref is None else [ref])
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    return value.detach(), [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def _assert_like_pml(x, labels, ref=None, ref_labels=None, indices_tuple=None, expected="blocked", alpha=40,
                     pml_tuple=None, reducer=None, **tol):
    """reducer: a reducer class name (both libraries'), else the default MeanReducer (the fused
    mean, its gradients formed in the forward); others take the per-pair losses' backward."""
    kw = {} if reducer is None else {"reducer": getattr(reducers, reducer)()}
    ours = losses.AngularLoss(alpha=alpha, **kw)
    got, got_grads = _run(ours, x, labels, ref, ref_labels, indices_tuple)
    assert ours.last_backend == expected, (ours.last_backend, ours.last_fallback)
    pml_kw = {} if reducer is None else {"reducer": getattr(pml_reducers, reducer)()}
    want, want_grads = _run(pml_losses.AngularLoss(alpha=alpha, **pml_kw), x, labels, ref, ref_labels,
                            indices_tuple if pml_tuple is None else pml_tuple)
    assert_value_and_grads_close(got, got_grads, want, want_grads, **(tol or TOL[x.dtype]))
    return ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}c{c[1]}r{c[2]}d{c[3]}")
def test_matches_pml(case, dtype):
    x, labels, ref, ref_labels = _inputs(*case, dtype)
    expected = "zero" if case[:2] in DEGENERATE else "blocked"
    for alpha in (40, 55):
        _assert_like_pml(x, labels, ref, ref_labels, expected=expected, alpha=alpha)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reducer", [None, "AvgNonZeroReducer"])
def test_half_embeddings_run_blocked_in_fp32(dtype, reducer):
    """fp16 / bf16 embeddings run the class blocks in fp32: PML's result on the same values in
    fp32, rounded to the dtype (loss, per-pair losses and gradients in the embeddings' dtype), with
    the default MeanReducer (fused mean) and a per-pair reducer, listed pairs too."""
    kw = {} if reducer is None else {"reducer": getattr(reducers, reducer)()}
    pml_kw = {} if reducer is None else {"reducer": getattr(pml_reducers, reducer)()}
    half_ulp = dict(rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps * 1e-3)
    for n, classes, ref_rows, d in [(37, 5, None, 13), (70, 6, 53, 16)]:
        x, labels, ref, ref_labels = _inputs(n, classes, ref_rows, d, dtype, seed=2)
        up = (lambda t: None if t is None else t.float())
        tuples = [(None, "blocked")] + ([(random_indices(3, "pairs", labels, n=40), "listed")] if ref is None else [])
        for indices_tuple, expected in tuples:
            ours = losses.AngularLoss(**kw)
            got, got_grads = _run(ours, x, labels, ref, ref_labels, indices_tuple)
            want, want_grads = _run(pml_losses.AngularLoss(**pml_kw), up(x), labels, up(ref), ref_labels,
                                    indices_tuple)
            what = f"{dtype} {reducer} n={n} ref={ref_rows} {expected}"
            assert ours.last_backend == expected, (what, ours.last_fallback)
            assert got.dtype == dtype and all(g.dtype == dtype for g in got_grads), what
            assert_value_and_grads_close(got.float(), [g.float() for g in got_grads], want.to(dtype).float(),
                                         [w.to(dtype).float() for w in want_grads], **half_ulp,
                                         msg=lambda m: f"{what}: {m}")


def test_per_pair_dict_matches_pml():
    """DoNothingReducer: the per-pair losses (P, 1) in PML's row-major pair order, its indices."""
    for ref_rows in (None, 41):
        x, labels, ref, ref_labels = _inputs(50, 6, ref_rows, 8, torch.float64, seed=1)
        ours = losses.AngularLoss(reducer=reducers.DoNothingReducer())(x, labels, None, ref, ref_labels)
        want = pml_losses.AngularLoss(reducer=pml_reducers.DoNothingReducer())(x, labels, None, ref, ref_labels)
        o, w = ours["loss"], want["loss"]
        assert o["reduction_type"] == w["reduction_type"] == "pos_pair"
        assert all(torch.equal(a, b) for a, b in zip(o["indices"], w["indices"]))
        assert o["losses"].shape == w["losses"].shape
        torch.testing.assert_close(o["losses"], w["losses"], **TOL[torch.float64])


@pytest.mark.parametrize("reducer,kw", [("AvgNonZeroReducer", {}), ("SumReducer", {}),
                                        ("ThresholdReducer", {"low": 8.0}),
                                        ("ClassWeightedReducer", {"weights": torch.rand(5) + 0.5})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_reducers_match_pml(reducer, kw):
    """(PerAnchorReducer fails on PML's (P, 1) per-pair losses, in PML too.)"""
    x, labels, ref, ref_labels = _inputs(45, 5, 30, 6, torch.float64, seed=2)
    for r in (None, ref):
        ours = losses.AngularLoss(reducer=getattr(reducers, reducer)(**kw))
        got, got_grads = _run(ours, x, labels, r, None if r is None else ref_labels)
        assert ours.last_backend == "blocked", ours.last_fallback
        theirs = pml_losses.AngularLoss(reducer=getattr(pml_reducers, reducer)(**kw))
        want, want_grads = _run(theirs, x, labels, r, None if r is None else ref_labels)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, **TOL[torch.float64])


@pytest.mark.parametrize("reducer", [None, "AvgNonZeroReducer"], ids=["mean", "avg_nonzero"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forced_small_blocks(monkeypatch, dtype, reducer):
    """Several blocks, Gram groups of a few rows, classes cut into square tiles (positive blocks
    of their own, with and without ref_emb), odd sizes; the mean's forward-formed gradients and
    the per-pair losses' recomputing backward."""
    seen = set()
    for block_values, group_rows, block_rows in ((5 * 64, 3, 7), (1, 2, 2), (40 * 64, 4, 256)):
        monkeypatch.setattr(fused_angular, "_BLOCK_VALUES", block_values)
        monkeypatch.setattr(fused_angular, "_GROUP_ROWS", group_rows)
        monkeypatch.setattr(fused_angular, "_BLOCK_ROWS", block_rows)
        for n, classes, ref_rows in ((64, 3, None), (64, 13, None), (57, 9, 64), (64, 2, 64)):
            x, labels, ref, ref_labels = _inputs(n, classes, ref_rows, 11, dtype, seed=3)
            same = ref is None
            blocks = fused_angular._blocks(labels, labels if same else ref_labels, 64, same, same)
            seen |= {"blocks"} if len(blocks) > 1 else set()
            seen |= {"groups"} if any(len(cuts) > 1 for _, tiles in blocks for _, cuts in tiles) else set()
            seen |= {"tiles"} if any(len(tiles) > 1 for _, tiles in blocks) else set()
            _assert_like_pml(x, labels, ref, ref_labels, reducer=reducer)
    assert seen == {"blocks", "groups", "tiles"}


def test_mean_gradients_scale_with_the_upstream_gradient():
    """The mean's gradients are formed in the forward and scaled in the backward: an upstream
    gradient of 2.5 gives 2.5 times them (also when the backward runs twice on a retained graph),
    and a call without gradients gives the same value."""
    x, labels, ref, ref_labels = _inputs(90, 7, 40, 12, torch.float64, seed=21)
    x, ref = x.requires_grad_(True), ref.requires_grad_(True)
    loss_fn = losses.AngularLoss()
    value = loss_fn(x, labels, None, ref, ref_labels)
    assert loss_fn.last_backend == "blocked"
    unit = torch.autograd.grad(value, (x, ref), retain_graph=True)
    for _ in range(2):
        scaled = torch.autograd.grad(value, (x, ref), torch.tensor(2.5, dtype=torch.float64), retain_graph=True)
        for got, want in zip(scaled, unit):
            torch.testing.assert_close(got, 2.5 * want, rtol=1e-12, atol=0)  # unit_rows rounds in between
    with torch.no_grad():
        plain = loss_fn(x, labels, None, ref, ref_labels)
    assert loss_fn.last_backend == "blocked" and not plain.requires_grad
    assert torch.equal(plain, value.detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_unnormalised_embeddings_of_moderate_norm(dtype):
    """x_n enters raw: rows of norm ~3-10 stay on the fused path."""
    for scale in (0.05, 1.0, 2.5):
        x, labels, ref, ref_labels = _inputs(60, 5, 40, 8, dtype, seed=4, scale=scale)
        _assert_like_pml(x, labels)
        _assert_like_pml(x, labels, ref, ref_labels)


def test_large_norms_decline_to_the_reference():
    """fp32 rows of norm ~300: exp(c s) spans far more than fp32's range; the reference runs and
    gives PML's answer (the fused G would have underflowed)."""
    x, labels, _, _ = _inputs(40, 4, None, 8, torch.float32, seed=5, scale=100.0)
    ours = _assert_like_pml(x, labels, expected="reference", rtol=1e-4, atol=1e-4)
    assert ours.last_fallback == fused_angular.UNSAFE


def test_degenerate_batches_are_pmls_zero():
    x, labels, ref, _ = _inputs(10, 3, 6, 5, torch.float64, seed=6)
    for lab in (torch.zeros(10, dtype=torch.long), torch.arange(10)):  # one class; no positives
        _assert_like_pml(x, lab, expected="zero")
    _assert_like_pml(x[:1], labels[:1], expected="zero")
    # ref_emb of a single class: class 0's pairs have no negative (loss 0), others have no pair
    lab = torch.tensor([0, 0, 1, 1, 0, 2, 0, 1, 2, 0])
    _assert_like_pml(x, lab, ref, torch.zeros(6, dtype=torch.long))


def test_nan_embeddings_follow_pml():
    x, labels, _, _ = _inputs(20, 4, None, 6, torch.float64, seed=7)
    x[0, 2] = float("nan")  # a row of class 0 (6 rows): that class's other pairs stay finite
    for reducer in (reducers.DoNothingReducer(), None):
        kw = {} if reducer is None else {"reducer": reducer}
        pml_kw = {} if reducer is None else {"reducer": pml_reducers.DoNothingReducer()}
        ours_fn = losses.AngularLoss(**kw)
        ours = ours_fn(x, labels)
        want = pml_losses.AngularLoss(**pml_kw)(x, labels)
        assert ours_fn.last_backend == "blocked", ours_fn.last_fallback
        if reducer is None:
            torch.testing.assert_close(ours, want, equal_nan=True)
        else:
            got, exp = ours["loss"]["losses"], want["loss"]["losses"]
            assert torch.isnan(exp).any() and not torch.isnan(exp).all()
            torch.testing.assert_close(got, exp, equal_nan=True, **TOL[torch.float64])


@pytest.mark.parametrize("reducer", [None, "AvgNonZeroReducer", "SumReducer"])
@pytest.mark.parametrize("layout", ["ref_emb", "batch", "listed"])
def test_nan_row_in_no_pair_gets_pmls_zero_gradient(layout, reducer):
    """A NaN row that is in no pair (no positive in the references, or not in the tuple): PML
    normalises only its pairs' rows, so that row's gradient is 0, not NaN; the rest as PML's."""
    x, labels, ref, ref_labels = _inputs(24, 4, None if layout == "batch" else 30, 6, torch.float64, seed=11)
    x[5, 1] = float("nan")
    tup = None
    if layout == "listed":  # pairs of rows 0-3 with their first same-label reference rows
        a = torch.arange(4)
        p = torch.stack([torch.nonzero(ref_labels == labels[i])[0, 0] for i in a])
        n = torch.stack([torch.nonzero(ref_labels != labels[i])[0, 0] for i in a])
        tup = (a, p, a, n)
    else:  # a label no other row has: with ref_emb in no pair; in the batch a negative of every row
        labels[5] = 9
    ours = _assert_like_pml(x, labels, ref, ref_labels, indices_tuple=tup, reducer=reducer,
                            expected="listed" if tup else "blocked", equal_nan=True, **TOL[torch.float64])
    grad = _run(ours, x, labels, ref, ref_labels, tup)[1][0]
    assert torch.isfinite(grad[5]).all() or layout == "batch", grad[5]  # (as a negative its terms are NaN)


def test_listed_nan_loss_leaves_same_label_reference_rows_a_zero_gradient():
    """A listed pair whose loss is NaN (a NaN negative row): PML's masked logsumexp gives the
    same-label reference rows (not negatives of that anchor) gradient 0 whatever the upstream
    value; only the negatives and the pair's rows get NaN."""
    x, labels, _, _ = _inputs(6, 3, None, 4, torch.float64, seed=5)
    ref = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    ref_labels = torch.tensor([2, 2, 0, 1])
    ref[1, 0] = ref[3, 2] = float("nan")  # row 1: same label as the anchor; row 3: a negative
    labels[0] = 2
    tup = (torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([2]))
    out = []
    for lib in (pml_losses, losses):
        xx, rr = x.clone().requires_grad_(), ref.clone().requires_grad_()
        loss = lib.AngularLoss()
        loss(xx, labels, tup, rr, ref_labels).backward()
        out.append(rr.grad)
    assert out[0][1].tolist() == [0.0] * 4 and torch.isnan(out[0][3]).all(), "PML's pattern (the case must bite)"
    assert loss.last_backend == "listed", loss.last_fallback
    torch.testing.assert_close(out[1], out[0], equal_nan=True, **TOL[torch.float64])


def test_listed_pair_without_negatives_is_zero_even_with_a_nan_row():
    """A listed pair whose anchor has no negative among the references: PML's masked logsumexp
    gives exactly 0, also when its positive row is NaN (u_a . u_p is NaN but masked out)."""
    x, labels, _, _ = _inputs(6, 3, None, 4, torch.float64, seed=3)
    ref, ref_labels = x[:2].clone(), torch.tensor([7, 7])
    ref[0, 1] = float("nan")
    labels[4] = 7
    tup = (torch.tensor([4]), torch.tensor([0]), torch.tensor([4]), torch.tensor([1]))  # a's label is every ref's
    got = losses.AngularLoss(reducer=reducers.DoNothingReducer())
    ours = got(x, labels, tup, ref, ref_labels)["loss"]["losses"]
    want = pml_losses.AngularLoss(reducer=pml_reducers.DoNothingReducer())(x, labels, tup, ref, ref_labels)
    assert got.last_backend == "listed", got.last_fallback
    assert want["loss"]["losses"].tolist() == [[0.0]]
    assert ours.tolist() == [[0.0]]


@pytest.mark.parametrize("kind", ["pairs", "triplets"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_indices_tuple_pairs_are_listed(kind, dtype):
    """A tuple's pairs (a, p), duplicates kept; a hand-built pair whose positive has another label
    too (the negatives are a's)."""
    for ref_rows in (None, 35):
        x, labels, ref, ref_labels = _inputs(40, 5, ref_rows, 9, dtype, seed=8)
        tup = random_indices(8, kind, labels, ref_labels, n=30)
        _assert_like_pml(x, labels, ref, ref_labels, indices_tuple=tup, expected="listed")
    x, labels, _, _ = _inputs(40, 5, None, 9, dtype, seed=8)
    odd = (torch.tensor([0, 1, 1]), torch.tensor([2, 3, 3]), torch.tensor([0]), torch.tensor([4]))
    _assert_like_pml(x, labels, indices_tuple=odd, expected="listed")


def test_miner_results_are_listed(monkeypatch):
    monkeypatch.setattr(fused_angular, "_BLOCK_VALUES", 7 * 48)  # several chunks of pairs
    x, labels, _, _ = _inputs(48, 4, None, 8, torch.float64, seed=9)
    for ours_miner, pml_miner in ((miners.MultiSimilarityMiner(), pml_miners.MultiSimilarityMiner()),
                                  (miners.TripletMarginMiner(), pml_miners.TripletMarginMiner())):
        _assert_like_pml(x, labels, indices_tuple=ours_miner(x, labels), pml_tuple=pml_miner(x, labels),
                         expected="listed")


def test_empty_tuple_is_pmls_zero():
    x, labels, _, _ = _inputs(20, 4, None, 6, torch.float64, seed=10)
    e = torch.empty(0, dtype=torch.long)
    _assert_like_pml(x, labels, indices_tuple=(e, e, e, e), expected="zero")
    _assert_like_pml(x, labels, indices_tuple=(torch.tensor([0]), torch.tensor([1]), e, e), expected="zero")


def test_gradcheck_fp64():
    x, labels, ref, ref_labels = _inputs(14, 3, 11, 5, torch.float64, seed=11)
    tup = random_indices(11, "pairs", labels, n=9)
    for refs, tuple_, backend in (((None, None), None, "blocked"), ((ref, ref_labels), None, "blocked"),
                                  ((None, None), tup, "listed")):
        loss_fn = losses.AngularLoss(alpha=45)
        if refs[0] is None:
            inputs = (x.clone().requires_grad_(True),)

            def f(x):
                return loss_fn(x, labels, tuple_)
        else:
            inputs = (x.clone().requires_grad_(True), refs[0].clone().requires_grad_(True))

            def f(x, r):
                return loss_fn(x, labels, tuple_, r, refs[1])
        assert torch.autograd.gradcheck(f, inputs)
        assert loss_fn.last_backend == backend, loss_fn.last_fallback


def test_double_backward_matches_the_reference():
    x, labels, _, _ = _inputs(15, 3, None, 6, torch.float64, seed=12)
    v = torch.randn_like(x)
    for tuple_ in (None, random_indices(12, "pairs", labels, n=9)):
        hvps = []
        for backend in ("auto", "reference"):
            xx = x.clone().requires_grad_(True)
            loss_fn = losses.AngularLoss()
            loss_fn.backend = backend
            (g,) = torch.autograd.grad(loss_fn(xx, labels, tuple_), xx, create_graph=True)
            hvps.append(torch.autograd.grad((g * v).sum(), xx)[0])
        torch.testing.assert_close(hvps[0], hvps[1], **TOL[torch.float64])


def test_bit_identical_across_thread_counts():
    """Past torch's grain size (blocks of 256 x 700 values, 10k pairs): values and gradients of
    x and ref_emb, all pairs and a tuple's, the same bits at 1, 2 and 4 threads."""
    x, labels, ref, ref_labels = _inputs(700, 40, 600, 16, torch.float32, seed=13)
    tup = random_indices(13, "pairs", labels, n=5000)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 4, 1):
            torch.set_num_threads(threads)
            for args in ((None, None, None), (ref, ref_labels, None), (None, None, tup)):
                loss_fn = losses.AngularLoss()
                value, grads = _run(loss_fn, x, labels, *args[:2], indices_tuple=args[2])
                assert loss_fn.last_backend == ("listed" if args[2] is not None else "blocked")
                results.append((value, *grads))
    finally:
        torch.set_num_threads(before)
    for k, got in enumerate(results[3:]):
        assert all(torch.equal(a, b) for a, b in zip(got, results[k % 3])), f"run {k + 3} differs"


def test_log_is_torch_log_and_thread_free():
    t = torch.cat([torch.rand(50000, dtype=torch.float64) * 1e3,
                   torch.tensor([0.0, float("inf"), float("nan"), -1.0, 1e-310, 1.0], dtype=torch.float64)])
    torch.testing.assert_close(fixed_log(t), torch.log(t), equal_nan=True, rtol=1e-15, atol=1e-15)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outs.append(fixed_log(t.float()))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())


def test_average_angle_matches_pml():
    x, labels, ref, ref_labels = _inputs(30, 4, 20, 6, torch.float64, seed=14)
    for args in ((None, None), (ref, ref_labels)):
        ours, theirs = losses.AngularLoss(collect_stats=True), pml_losses.AngularLoss(collect_stats=True)
        ours(x, labels, None, *args)
        theirs(x, labels, None, *args)
        assert ours.last_backend == "blocked"
        assert abs(ours.average_angle - theirs.average_angle) < 1e-9


def test_other_configurations_use_the_reference(monkeypatch):
    x, labels, _, _ = _inputs(20, 4, None, 6, torch.float64, seed=15)
    loss_fn = losses.AngularLoss()
    loss_fn.backend = "reference"
    loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "requested" in loss_fn.last_fallback
    loss_fn = losses.AngularLoss()
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    loss_fn(x, labels)
    assert loss_fn.last_backend == "reference" and "torch.compile" in loss_fn.last_fallback


@pytest.mark.slow
def test_memory_at_n16384():
    """fwd+bwd at N=16384, D=128 (labels randint(0, N/8)) grows peak RSS by < 256 MiB (PML
    builds pairs x N ~ 1.9e9 values here), measured in a fresh process."""
    growth_mib = peak_rss_growth_mib(
        setup="""
            torch.manual_seed(0)
            n, d = 16384, 128
            x = torch.randn(n, d, requires_grad=True)
            labels = torch.randint(0, n // 8, (n,))
            loss_fn = losses.AngularLoss()
        """,
        measured="""
            loss = loss_fn(x, labels)
            loss.backward()
            assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 256, f"peak RSS grew by {growth_mib:.0f} MiB"


def test_torch_func_grad_runs_the_fused_path():
    x, labels, _, _ = _inputs(30, 4, None, 8, torch.float64, seed=16)
    loss_fn = losses.AngularLoss()
    got = torch.func.grad(lambda x: loss_fn(x, labels))(x)
    assert loss_fn.last_backend == "blocked"
    loss_fn.backend = "reference"
    want = torch.func.grad(lambda x: loss_fn(x, labels))(x)
    torch.testing.assert_close(got, want, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reference_given_with_the_batch_or_its_labels(dtype):
    """ref_labels is labels with another ref_emb (PML excludes the diagonal by identity), and
    ref_emb is the batch with a copy of its labels (self-pairs count as positives then)."""
    x, labels, ref, _ = _inputs(40, 5, 40, 7, dtype, seed=17)
    _assert_like_pml(x, labels, ref, labels)
    ours, theirs = losses.AngularLoss(), pml_losses.AngularLoss()
    got = ours(x, labels, None, x, labels.clone())
    assert ours.last_backend == "blocked", ours.last_fallback
    torch.testing.assert_close(got, theirs(x, labels, None, x, labels.clone()), **TOL[dtype])


def _mixed_labels(seed, sizes=(45, 20, 3, 3, 2, 2, 2, 1, 1, 1, 1)):
    """Classes of very different sizes in one batch (81 rows by default): singletons have no positive."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def _blocked_setup(labels, ref_labels, same_rows):
    return fused_angular._blocked_setup(LabelStats(labels, ref_labels), labels, ref_labels, len(ref_labels),
                                        ref_labels is labels, same_rows, 1.0, 1.0)


@pytest.mark.parametrize("sizes", [None, (32, 8, 1 << 20), (7, 3, 5 * 81)], ids=["default", "rows32", "rows5"])
def test_positive_entries_are_the_label_mask(monkeypatch, sizes):
    """`_positive_entries` (flat indices from the blocks' pairs, or the label comparison where the
    positives are over 1/8 of a block) marks exactly the entries labels[rows_a] == ref_labels: the
    batch as the reference, ref_labels as labels with another ref_emb, another reference, two
    classes (the comparison), small classes, a class cut into tiles."""
    if sizes is not None:
        for name, value in zip(("_BLOCK_ROWS", "_GROUP_ROWS", "_BLOCK_VALUES"), sizes):
            monkeypatch.setattr(fused_angular, name, value)
    mixed, halves, small = _mixed_labels(0), torch.arange(80) % 2, torch.arange(200) % 40
    cases = [(mixed, mixed, True), (mixed, mixed, False), (mixed, _mixed_labels(1, (9, 30, 2, 1, 5, 1, 4)), False),
             (halves, halves, True), (small, small, True), (small, small, False), (small, small[:150] + 1, False)]
    seen = set()
    for labels, ref_labels, same_rows in cases:
        setup = _blocked_setup(labels, ref_labels, same_rows)
        m = len(ref_labels)
        for rows_a, tiles in setup.blocks:
            want = labels[rows_a][:, None] == ref_labels[None, :]
            got = fused_angular._positive_entries(setup, rows_a, tiles, m)
            if isinstance(got, torch.Tensor):
                seen.add("index")
                mask = torch.zeros(len(rows_a) * m, dtype=torch.bool)
                mask[got] = True
                assert torch.equal(mask.view(len(rows_a), m), want)
            else:
                seen.add("compare")
                assert torch.equal(got[0][:, None] == got[1][None, :], want)
    assert seen == {"index", "compare"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_classes_of_very_different_sizes(monkeypatch, dtype):
    """One batch with a class larger than a block (cut into tiles), classes of 2-20 rows and
    singletons, so blocks that are their own and only positive block (the gradient of s in A's
    place) and blocks of several tiles; with and without ref_emb; one class with pairs among
    singletons; then the same batches at the default block sizes."""
    g = torch.Generator().manual_seed(18)
    x = torch.randn(81, 9, generator=g, dtype=torch.float64).to(dtype)
    ref = torch.randn(60, 9, generator=g, dtype=torch.float64).to(dtype)
    labels, ref_labels = _mixed_labels(2), _mixed_labels(3)[:60]
    one = torch.cat([torch.zeros(10, dtype=torch.long), torch.arange(1, 21)])[torch.randperm(30, generator=g)]
    for sizes in ((32, 8, 1 << 20), None):
        if sizes is not None:
            for name, value in zip(("_BLOCK_ROWS", "_GROUP_ROWS", "_BLOCK_VALUES"), sizes):
                monkeypatch.setattr(fused_angular, name, value)
            blocks = _blocked_setup(labels, labels, True).blocks
            assert any(len(tiles) == 1 and tiles[0][0] is rows_a for rows_a, tiles in blocks)
            assert any(len(tiles) > 1 for _, tiles in blocks)
        else:
            monkeypatch.undo()
        _assert_like_pml(x, labels)
        _assert_like_pml(x, labels, ref, ref_labels)
        _assert_like_pml(x[:30], one)
        _assert_like_pml(x[:30], one, ref[:30], one)
