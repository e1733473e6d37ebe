"""PairMarginMiner's lazy result (PML's 4-tuple in every use) and ContrastiveLoss keeping the same
pairs on row blocks without listing them (dmlkern/fused/pair_margin_contrastive.py): each case
against PML 2.9.0 itself, and the path the loss took."""
import copy
import pickle

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from _peak_rss import peak_rss_growth_mib
from dmlkern import distances, losses, miners, reducers
from dmlkern.fused import pair_margin_contrastive
from dmlkern.fused.lazy_pairs import LazyMarginPairs

# fp32: two fp32 results, each ~2e-6 from the fp64 gradient where a sum over many pairs cancels
# (SumReducer, 157 rows: on a Xeon's MKL PML's own lies 2.3e-6 from fp64 at x[17, 8], dmlkern's
# 1.2e-6 there, so they differed by 2.8e-6), hence an atol above either's error.
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=5e-6)}

# (loss kwargs, miner kwargs) by distance: margins that keep some pairs and drop others
EUCLIDEAN = ({"pos_margin": 0.3, "neg_margin": 1.3}, {"pos_margin": 0.9, "neg_margin": 1.35})
COSINE = ({"pos_margin": 0.7, "neg_margin": 0.1}, {"pos_margin": 0.4, "neg_margin": -0.05})
REDUCERS = ("AvgNonZeroReducer", "MeanReducer", "SumReducer")


@pytest.fixture(params=["cpp", "listed", "masked"])
def block_mode(request, monkeypatch):
    """The CPU's C++ forward (dmlkern::pair_margin_live; the backward's recomputed blocks in C++
    too), or the torch sweep with each block's kept pairs listed (few candidates) or masked (many)."""
    if request.param != "cpp":
        monkeypatch.setattr(pair_margin_contrastive, "_CPU_LIVE", False)
        monkeypatch.setattr(pair_margin_contrastive, "CPP_ROWS_DEVICES", ("cuda",))
        monkeypatch.setattr(pair_margin_contrastive, "DENSE_BLOCK_FRACTION",
                            1.0 if request.param == "listed" else -1.0)
    return request.param


def _batch(seed, n, classes, d=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def _run(lib, x, labels, ref=None, ref_labels=None, loss_kind="euclidean", miner_kind="euclidean",
         reducer="AvgNonZeroReducer", loss_kw=None, miner_kw=None):
    """(value, grad x, grad ref, loss module, mined tuple) of lib's ContrastiveLoss on its
    PairMarginMiner's pairs."""
    L, M, D, R = ((losses, miners, distances, reducers) if lib == "dmlkern"
                  else (pml_losses, pml_miners, pml_distances, pml_reducers))
    dist = {"euclidean": D.LpDistance, "cosine": D.CosineSimilarity}
    loss_kw = dict(EUCLIDEAN[0] if loss_kind == "euclidean" else COSINE[0], **(loss_kw or {}))
    miner_kw = dict(EUCLIDEAN[1] if miner_kind == "euclidean" else COSINE[1], **(miner_kw or {}))
    loss_fn = L.ContrastiveLoss(distance=dist[loss_kind](), reducer=getattr(R, reducer)(), **loss_kw)
    miner = M.PairMarginMiner(distance=dist[miner_kind](), **miner_kw)
    x = x.detach().clone().requires_grad_(True)
    r = None if ref is None else ref.detach().clone().requires_grad_(True)
    mined = miner(x, labels, r, ref_labels)
    value = loss_fn(x, labels, mined, r, ref_labels)
    inputs = (x,) if r is None else (x, r)
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    return value.detach(), grads, loss_fn, mined


def _assert_like_pml(dtype=torch.float64, backend="blocked", **kw):
    got, got_grads, loss_fn, mined = _run("dmlkern", **kw)
    want, want_grads, _, want_mined = _run("pml", **kw)
    assert loss_fn.last_backend == backend, loss_fn.last_fallback
    torch.testing.assert_close(got, want, **TOL[dtype])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **TOL[dtype])
    return mined, want_mined


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_kind,miner_kind", [("euclidean", "euclidean"), ("cosine", "cosine"),
                                                  ("euclidean", "cosine"), ("cosine", "euclidean")])
@pytest.mark.parametrize("reducer", REDUCERS)
def test_matches_pml(dtype, loss_kind, miner_kind, reducer, block_mode):
    x, labels = _batch(0, 157, 9, dtype=dtype)  # (not a block or tile multiple)
    mined, want_mined = _assert_like_pml(dtype, x=x, labels=labels, loss_kind=loss_kind, miner_kind=miner_kind,
                                         reducer=reducer)
    assert isinstance(mined, LazyMarginPairs) and not mined.is_materialized  # the loss listed nothing
    assert len(want_mined[0]) > 1 and len(want_mined[2]) > 1


@pytest.mark.parametrize("reducer", REDUCERS)
@pytest.mark.parametrize("ref_labels_given", [True, False])
def test_ref_emb_matches_pml(reducer, ref_labels_given, block_mode):
    x, labels = _batch(1, 61, 5)
    ref, ref_labels = _batch(2, 83 if ref_labels_given else 61, 5)  # (without ref_labels, labels label both)
    _assert_like_pml(x=x, labels=labels, ref=ref, ref_labels=ref_labels if ref_labels_given else None,
                     reducer=reducer)


@pytest.mark.parametrize("saved_pairs", [0, 300, 1 << 21])
def test_rows_spanning_several_blocks(monkeypatch, saved_pairs, block_mode):
    """Blocks of a few rows (the sweep's bookkeeping across blocks, forward and backward), with the
    backward recomputing the blocks (no kept pair saved, or more kept than saved) or not."""
    from dmlkern.fused import _common
    monkeypatch.setattr(_common, "ROW_BLOCK_VALUES", 7 * 130)
    monkeypatch.setattr(pair_margin_contrastive, "SAVED_PAIRS", saved_pairs)
    x, labels = _batch(3, 130, 6)
    _assert_like_pml(x=x, labels=labels)
    ref, ref_labels = _batch(4, 45, 6)
    _assert_like_pml(x=x, labels=labels, ref=ref, ref_labels=ref_labels, reducer="MeanReducer")


@pytest.mark.parametrize("case", ["one_sample", "one_class", "all_distinct", "one_pair_each", "nothing_kept"])
def test_degenerate_batches(case, block_mode):
    """PML's `len <= 1` rule on the mined pairs gives its zero loss; so does a window that keeps
    nothing. A one-class batch has positives only."""
    x, labels = _batch(5, 9, 3)
    miner_kw = None
    if case == "one_sample":
        x, labels = x[:1], labels[:1]
    elif case == "one_class":
        labels = torch.zeros_like(labels)
    elif case == "all_distinct":
        labels = torch.arange(len(labels))
    elif case == "one_pair_each":  # rows 0-1 one class, 2-3 another: 2 positive pairs (0,1), (1,0)
        x, labels = x[:4], torch.tensor([0, 0, 1, 1])
        miner_kw = {"pos_margin": 0.0, "neg_margin": 0.0}  # every positive, no negative
    else:
        miner_kw = {"pos_margin": 5.0, "neg_margin": -1.0}
    got, got_grads, loss_fn, mined = _run("dmlkern", x, labels, miner_kw=miner_kw)
    want, want_grads, _, want_mined = _run("pml", x, labels, miner_kw=miner_kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grads[0], want_grads[0])
    degenerate = all(len(t) <= 1 for t in want_mined)
    assert loss_fn.last_backend == ("zero" if degenerate else "blocked"), (case, loss_fn.last_fallback)
    if case == "one_class":
        assert len(want_mined[0]) > 1 and len(want_mined[2]) == 0


def test_result_is_pmls_tuple_in_every_use():
    x, labels = _batch(6, 40, 5)
    mined = miners.PairMarginMiner()(x, labels)
    want = pml_miners.PairMarginMiner()(x, labels)
    assert isinstance(mined, tuple) and len(mined) == 4 and not mined.is_materialized
    assert "not computed" in repr(mined)
    for a, b in zip(mined, want):
        assert a.dtype == torch.long and torch.equal(a, b)
    for dump in (lambda p: pickle.loads(pickle.dumps(p)), copy.deepcopy):
        got = dump(miners.PairMarginMiner()(x, labels))
        assert type(got) is tuple and all(torch.equal(a, b) for a, b in zip(got, want))
    # PML's own loss given dmlkern's lazy result reads (materialises) it
    value = pml_losses.ContrastiveLoss()(x, labels, miners.PairMarginMiner()(x, labels))
    torch.testing.assert_close(value, pml_losses.ContrastiveLoss()(x, labels, want))


def test_counts_are_pmls_when_read_and_pickled():
    x, labels = _batch(7, 40, 5)
    theirs = pml_miners.PairMarginMiner()
    theirs(x, labels)
    ours = miners.PairMarginMiner()
    mined = ours(x, labels)
    assert not mined.is_materialized
    assert (ours.num_pos_pairs, ours.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs) != (0, 0)
    ours(x, labels)
    other = pickle.loads(pickle.dumps(ours))
    assert (other.num_pos_pairs, other.num_neg_pairs) == (theirs.num_pos_pairs, theirs.num_neg_pairs)


@pytest.mark.parametrize("change", ["embeddings_in_place", "labels_in_place", "margin"])
def test_changes_between_miner_and_loss_give_pmls_numbers(change):
    """The result describes the inputs and margins at mining time (PML's tuple does)."""
    x, labels = _batch(8, 50, 5)
    e, mined_x, mined_labels = x.clone().requires_grad_(False), x.clone(), labels.clone()
    miner, loss_fn = miners.PairMarginMiner(), losses.ContrastiveLoss()
    mined = miner(e, labels)
    if change == "embeddings_in_place":
        e.mul_(1.3).add_(0.05)
    elif change == "labels_in_place":
        labels[:10] = (labels[:10] + 1) % 5
    else:
        miner.pos_margin, miner.neg_margin = 0.0, 2.0
    e = e.requires_grad_(True)
    got = loss_fn(e, labels, mined)
    (got_grad,) = torch.autograd.grad(got, e)
    e2 = e.detach().clone().requires_grad_(True)
    want = pml_losses.ContrastiveLoss()(e2, labels, pml_miners.PairMarginMiner()(mined_x, mined_labels))
    (want_grad,) = torch.autograd.grad(want, e2)
    torch.testing.assert_close((got.detach(), got_grad), (want.detach(), want_grad))
    expected = ("listed", "reference") if change == "embeddings_in_place" else ("blocked",)  # (a dense list)
    assert loss_fn.last_backend in expected, loss_fn.last_fallback


@pytest.mark.parametrize("config", ["do_nothing_reducer", "squared_distance", "miner_dot_product", "fp16"])
def test_other_configurations_list_the_pairs(config):
    """What the blocked path does not take runs on the listed pairs (or PML's maths), PML's numbers."""
    x, labels = _batch(9, 45, 5)
    loss_kw, miner_kw, pml_loss_kw, pml_miner_kw = {}, {}, {}, {}
    if config == "do_nothing_reducer":
        loss_kw, pml_loss_kw = {"reducer": reducers.DoNothingReducer()}, {"reducer": pml_reducers.DoNothingReducer()}
    elif config == "squared_distance":
        loss_kw, pml_loss_kw = {"distance": distances.LpDistance(power=2)}, {"distance": pml_distances.LpDistance(power=2)}
    elif config == "miner_dot_product":
        miner_kw = {"distance": distances.DotProductSimilarity(normalize_embeddings=False), "pos_margin": 0.5,
                    "neg_margin": 0.2}
        pml_miner_kw = {"distance": pml_distances.DotProductSimilarity(normalize_embeddings=False),
                        "pos_margin": 0.5, "neg_margin": 0.2}
    else:
        x = x.half()
    loss_fn = losses.ContrastiveLoss(**loss_kw)
    mined = miners.PairMarginMiner(**miner_kw)(x, labels)
    got = loss_fn(x, labels, mined)
    want = pml_losses.ContrastiveLoss(**pml_loss_kw)(x.double(), labels,
                                                    pml_miners.PairMarginMiner(**pml_miner_kw)(x.double(), labels))
    if config == "do_nothing_reducer":
        for k in got:
            torch.testing.assert_close(got[k]["losses"].double(), want[k]["losses"])
    else:
        torch.testing.assert_close(got.double(), want, rtol=2e-3 if config == "fp16" else 1e-9, atol=1e-3)
    assert loss_fn.last_backend in ("listed", "reference"), loss_fn.last_backend


def test_nan_row_as_pml():
    """A NaN row: PML's values and gradients (NaN in every row's: its distance backward spreads it);
    the reference runs."""
    x, labels = _batch(10, 30, 4)
    x[3] = float("nan")
    got, got_grads, loss_fn, _ = _run("dmlkern", x, labels)
    want, want_grads, _, _ = _run("pml", x, labels)
    assert loss_fn.last_backend == "reference", loss_fn.last_backend
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(got_grads[0], want_grads[0], equal_nan=True)


def test_bits_do_not_depend_on_the_thread_count(block_mode):
    x, labels = _batch(11, 700, 7, d=32, dtype=torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            value, grads, loss_fn, _ = _run("dmlkern", x, labels)
            assert loss_fn.last_backend == "blocked"
            results.append((value, grads[0]))
    finally:
        torch.set_num_threads(threads)
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.parametrize("saved_pairs", [0, 1 << 21])
def test_fp64_gradcheck_and_second_derivative(monkeypatch, saved_pairs, block_mode):
    monkeypatch.setattr(pair_margin_contrastive, "SAVED_PAIRS", saved_pairs)
    x, labels = _batch(12, 14, 3, d=5)
    rule = pair_margin_contrastive.MarginPairRule(True, 0.3, 1.3, True, 0.9, 1.35)

    def totals(a, b):
        out = pair_margin_contrastive.margin_pair_totals(a, b, labels, labels[:11].clone(), rule, False)
        return out[0], out[1]

    a = torch.nn.functional.normalize(x, dim=1).requires_grad_(True)
    b = torch.nn.functional.normalize(x[:11] + 0.1, dim=1).requires_grad_(True)
    assert torch.autograd.gradcheck(totals, (a, b))
    assert torch.autograd.gradgradcheck(totals, (a, b))
    self_totals = lambda a: pair_margin_contrastive.margin_pair_totals(a, None, labels, labels, rule, True)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(self_totals, (a,))


@pytest.mark.slow
def test_memory_with_every_pair_mined():
    """A window that keeps every pair (PML lists N^2 pairs, 1 GiB of indices at N=8192; the listed
    path would too): fwd+bwd at N=8192, D=128 grows peak RSS by < 128 MiB, in a fresh process."""
    growth_mib = peak_rss_growth_mib(
        setup="""
            torch.manual_seed(0)
            n, d = 8192, 128
            x = torch.randn(n, d, requires_grad=True)
            labels = torch.randint(0, n // 8, (n,))
            loss_fn, miner = losses.ContrastiveLoss(), miners.PairMarginMiner(pos_margin=0.0, neg_margin=2.5)
        """,
        measured="""
            loss = loss_fn(x, labels, miner(x, labels))
            loss.backward()
            assert loss_fn.last_backend == "blocked", loss_fn.last_fallback
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
        """)
    assert growth_mib < 128, f"peak RSS grew by {growth_mib:.0f} MiB"
