"""LiftedStructure, NTXent, TupletMargin, Margin and Circle losses on an explicit indices_tuple
(dmlkern/fused/listed_pairs.py, listed_triplets.py): only the listed pairs / triplets, against
PML 2.9.0 itself: values, gradients (embeddings, ref_emb, a learnt beta), reducers, degenerate
tuples, the dense rule, thread-count determinism, memory, the miners' lazy results."""
import pytest
import torch
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners

from dmlkern import distances, losses, miners
from _peak_rss import peak_rss_growth_mib
from _pml_helpers import reducer_pair

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=5e-5, atol=5e-6)}
# kwargs per loss; "distance" names a class of the library under test
KWARGS = {"LiftedStructureLoss": [{}, {"pos_margin": 0.1, "neg_margin": 0.7}, {"distance": "CosineSimilarity"}],
          "NTXentLoss": [{}, {"temperature": 0.3}, {"distance": "LpDistance"}],
          "TupletMarginLoss": [{}, {"margin": 10.0, "scale": 16}],
          "MarginLoss": [{}, {"margin": 0.3, "beta": 1.0}, {"distance": "CosineSimilarity", "beta": 0.5}],
          "CircleLoss": [{}, {"m": 0.25, "gamma": 64}]}
DENSE_RULE = {"MarginLoss", "CircleLoss"}  # the others' reference builds a pairs x pairs matrix: always listed
HAND_PAIRS = (torch.tensor([0, 0, 1, 0]), torch.tensor([5, 5, 7, 9]), torch.tensor([2, 3, 3]), torch.tensor([1, 1, 4]))
# duplicates on both sides, rows with only positives / only negatives
HAND_MIXED = (torch.tensor([0, 0, 1, 3, 4, 6]), torch.tensor([5, 5, 7, 2, 8, 1]),
              torch.tensor([0, 0, 1, 3, 5, 8, 4]), torch.tensor([2, 2, 8, 6, 1, 9, 3]))
# a self pair (4, 4) (not for TupletMargin: PML's acos at cos = 1 has a NaN gradient, README)
HAND_SELF = (torch.tensor([4, 2, 4]), torch.tensor([4, 3, 1]), torch.tensor([4, 3, 2]), torch.tensor([0, 9, 7]))
HAND_TRIPLETS = (torch.tensor([0, 0, 2, 2, 7]), torch.tensor([1, 1, 3, 5, 8]), torch.tensor([4, 4, 9, 9, 1]))


def _make(lib, name, kw, reducer=None):
    """lib's loss; reducer: a spec for `_pml_helpers.reducer_pair` (class name, kwargs)."""
    kw = dict(kw)
    if "distance" in kw:
        kw["distance"] = getattr(distances if lib is losses else pml_distances, kw["distance"])()
    if reducer is not None:
        kw["reducer"] = reducer_pair(reducer)[0 if lib is losses else 1]
    return getattr(lib, name)(**kw)


def _run(lib, name, x, labels, tuple_, kw=(), ref=None, ref_labels=None, reducer=None):
    """(value, grads of x [and ref] [and a learnt beta], loss module)."""
    loss_fn = _make(lib, name, dict(kw), reducer)
    inputs = [x.clone().requires_grad_(True)] + ([] if ref is None else [ref.clone().requires_grad_(True)])
    params = [p for p in loss_fn.parameters()]
    value = loss_fn(inputs[0], labels, tuple_) if ref is None else loss_fn(inputs[0], labels, tuple_, inputs[1],
                                                                            ref_labels)
    wrt = inputs + params
    grads = torch.autograd.grad(value, wrt, allow_unused=True) if value.requires_grad else [None] * len(wrt)
    return value.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)], loss_fn


def _compare(name, x, labels, tuple_, kw=(), ref=None, ref_labels=None, reducer=None, what=""):
    ours, our_grads, loss_fn = _run(losses, name, x, labels, tuple_, kw, ref, ref_labels, reducer)
    want, want_grads, _ = _run(pml_losses, name, x, labels, tuple_, kw, ref, ref_labels, reducer)
    tol = TOL[x.dtype]
    torch.testing.assert_close(ours, want, **tol, msg=lambda m: f"{name} {what} value: {m}")
    for ours_g, want_g in zip(our_grads, want_grads):
        # (a parameter's own dtype: MarginLoss's fp32 beta gets an fp32 gradient, which PML sums
        # triplet by triplet and MarginLoss on pairs pair by pair, times each pair's triplets)
        torch.testing.assert_close(ours_g, want_g, **TOL.get(want_g.dtype, tol),
                                   msg=lambda m: f"{name} {what} grad: {m}")
    return loss_fn


def _assert_path(loss_fn, name, what):
    if loss_fn.last_backend == "reference":
        assert name in DENSE_RULE and "dense indices_tuple" in loss_fn.last_fallback, (name, what, loss_fn.last_fallback)
    else:
        assert loss_fn.last_backend in ("listed", "zero"), (name, what, loss_fn.last_fallback)


def _tuples(x, labels, ref=None, ref_labels=None):
    """PML's miners' tuples (pairs and triplets) and hand-built ones (duplicates, degenerate rows)."""
    args = (x, labels) if ref is None else (x, labels, ref, ref_labels)
    out = {"pair_margin": pml_miners.PairMarginMiner()(*args),
           "ms_miner": pml_miners.MultiSimilarityMiner(0.1)(*args),
           # (the first 300: PML's pair-based losses build a pairs x pairs matrix of them)
           "semihard_triplets": tuple(t[:300] for t in pml_miners.TripletMarginMiner(type_of_triplets="semihard")(*args)),
           "batch_hard": pml_miners.BatchHardMiner()(*args),
           "empty": tuple(torch.empty(0, dtype=torch.long) for _ in range(4)),
           "empty_triplets": tuple(torch.empty(0, dtype=torch.long) for _ in range(3)),
           "only_positives": (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([], dtype=torch.long),
                              torch.tensor([], dtype=torch.long))}
    if x.shape[0] >= 10:
        out.update(hand_pairs=HAND_PAIRS, hand_mixed=HAND_MIXED, hand_self=HAND_SELF, hand_triplets=HAND_TRIPLETS,
                   one_pair_each=(torch.tensor([0]), torch.tensor([5]), torch.tensor([2]), torch.tensor([1])))
    return out


def _data(n, classes, dtype, seed=0, dim=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("name", list(KWARGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,classes", [(53, 6), (9, 9), (12, 1)])
def test_matches_pml(n, classes, dtype, name):
    x, labels = _data(n, classes, dtype, seed=n)
    listed = 0
    for what, tuple_ in _tuples(x, labels).items():
        if what == "hand_self" and name == "TupletMarginLoss":
            continue
        for kw in KWARGS[name]:
            loss_fn = _compare(name, x, labels, tuple_, kw, what=what)
            _assert_path(loss_fn, name, what)
            listed += loss_fn.last_backend == "listed"
    assert listed > 0 or n < 53  # the test runs the listed path


@pytest.mark.parametrize("name", list(KWARGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ref_emb_matches_pml(dtype, name):
    """ref_emb of another size, its own labels: gradients of both; Lifted matches a negative's
    anchor with a positive's reference index by value, as PML (also past the query rows)."""
    x, labels = _data(30, 5, dtype, seed=3)
    ref, ref_labels = _data(41, 5, dtype, seed=4)
    tuples = _tuples(x, labels, ref, ref_labels)
    tuples["lifted_index_quirk"] = (torch.tensor([0, 2, 2]), torch.tensor([35, 1, 0]), torch.tensor([1, 0, 2, 2]),
                                    torch.tensor([40, 3, 4, 4]))
    for what, tuple_ in tuples.items():
        for kw in KWARGS[name]:
            loss_fn = _compare(name, x, labels, tuple_, kw, ref, ref_labels, what=what)
            _assert_path(loss_fn, name, what)


REDUCERS = [("MeanReducer", {}), ("SumReducer", {}), ("AvgNonZeroReducer", {}), ("ThresholdReducer", {"low": 0.05}),
            ("DivisorReducer", {}), ("PerAnchorReducer", {"reducer": ("SumReducer", {})}),
            ("ClassWeightedReducer", {"weights": "random"})]


@pytest.mark.parametrize("name", list(KWARGS))
@pytest.mark.parametrize("reducer", REDUCERS, ids=[r[0] for r in REDUCERS])
def test_reducers_match_pml(name, reducer):
    x, labels = _data(40, 4, torch.float64, seed=5)
    tuples = _tuples(x, labels)
    for what in ("pair_margin", "semihard_triplets", "hand_mixed"):
        try:
            _make(pml_losses, name, {}, reducer)(x, labels, tuples[what])
        except Exception as e:  # PerAnchorReducer: PML's takes neither (P, 1) losses nor triplets;
            # DivisorReducer: only MarginLoss's dict carries a divisor (PML: KeyError; dmlkern names it)
            expected = ValueError if reducer[0] == "DivisorReducer" else type(e)
            with pytest.raises(expected, match="divisor" if expected is ValueError else None):
                _make(losses, name, {}, reducer)(x, labels, tuples[what])
            continue
        loss_fn = _compare(name, x, labels, tuples[what], reducer=reducer, what=f"{what} {reducer[0]}")
        _assert_path(loss_fn, name, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_margin_learnt_beta_per_class(dtype):
    """beta per class, learnt, with nu: beta_reg_loss per triplet and beta's gradient, as PML."""
    x, labels = _data(40, 4, dtype, seed=6)
    tuples = _tuples(x, labels)
    for kw in [{"learn_beta": True, "nu": 0.1, "num_classes": 4}, {"learn_beta": True, "nu": 0.3}]:
        for what in ("pair_margin", "semihard_triplets", "hand_triplets", "batch_hard"):
            loss_fn = _compare("MarginLoss", x, labels, tuples[what], kw, what=f"{what} {kw}")
            _assert_path(loss_fn, "MarginLoss", what)
            assert loss_fn.last_backend != "reference" or what == "semihard_triplets"


def test_tuplet_statistics_match_pml():
    x, labels = _data(40, 4, torch.float64, seed=7)
    pairs = pml_miners.PairMarginMiner()(x, labels)
    ours, theirs = losses.TupletMarginLoss(collect_stats=True), pml_losses.TupletMarginLoss(collect_stats=True)
    for tuple_ in (pairs, HAND_PAIRS, (pairs[0], pairs[1], pairs[2][:0], pairs[3][:0])):
        torch.testing.assert_close(ours(x, labels, tuple_), theirs(x, labels, tuple_))
        assert ours.last_backend in ("listed", "zero"), ours.last_fallback
        assert ours.avg_pos_angle == pytest.approx(theirs.avg_pos_angle, rel=1e-9)
        assert ours.avg_neg_angle == pytest.approx(theirs.avg_neg_angle, rel=1e-9)
    assert ours.avg_pos_angle == 0  # no negative pair: nothing recorded after the reset


@pytest.mark.parametrize("name", list(KWARGS))
def test_dense_rule(name):
    """Over 1/16 of all pairs the reference's N x M matrix is cheaper for Margin and Circle; the
    other three references build a pairs x pairs matrix, so they list any tuple."""
    x, labels = _data(40, 4, torch.float64, seed=8)
    if name == "MarginLoss":  # every triplet (2 distances each), then 40 of them
        every = pml_miners.TripletMarginMiner(margin=10.0)(x, labels)
    else:  # every pair, then 30 of each kind
        every = pml_miners.PairMarginMiner(pos_margin=0.0, neg_margin=10.0)(x, labels)
    loss_fn = _compare(name, x, labels, every, what="every pair")
    if name in DENSE_RULE:
        assert loss_fn.last_backend == "reference" and "dense" in loss_fn.last_fallback
    else:
        assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    few = tuple(t[:40 if name == "MarginLoss" else 30] for t in every)
    loss_fn = _compare(name, x, labels, few, what="a few")
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback


@pytest.mark.parametrize("name", list(KWARGS))
def test_nan_embeddings_follow_pml(name):
    x, labels = _data(40, 4, torch.float64, seed=12)
    if name == "MarginLoss":
        tuple_ = tuple(t[::500] for t in pml_miners.TripletMarginMiner(margin=10.0)(x, labels))
    else:
        tuple_ = tuple(t[::25] for t in pml_miners.PairMarginMiner(pos_margin=0.0, neg_margin=10.0)(x, labels))
    x[tuple_[0][1], 1] = float("nan")
    loss_fn = _make(losses, name, {})
    ours = loss_fn(x, labels, tuple_)
    # SupCon / NT-Xent: PML's NaN reaches anchors beyond the list; eager off CUDA the reference runs
    expected = "reference" if name in ("SupConLoss", "NTXentLoss") else "listed"
    assert loss_fn.last_backend == expected, loss_fn.last_fallback
    torch.testing.assert_close(ours, _make(pml_losses, name, {})(x, labels, tuple_), equal_nan=True)


@pytest.mark.parametrize("name", list(KWARGS))
def test_pml_len_rule_and_empty(name):
    x, labels = _data(12, 3, torch.float64, seed=9)
    loss_fn = losses.__dict__[name]()
    for tuple_ in ((torch.tensor([0]), torch.tensor([5]), torch.tensor([2]), torch.tensor([1])),
                   tuple(torch.empty(0, dtype=torch.long) for _ in range(4))):
        value = loss_fn(x.clone().requires_grad_(True), labels, tuple_)
        assert loss_fn.last_backend == "zero" and value.requires_grad and float(value) == 0


# every listed loss -> (rows, a tuple sparse enough to list there)
GRAD_CASES = {**{name: (12, HAND_PAIRS) for name in ("MultiSimilarityLoss", "GeneralizedLiftedStructureLoss",
                                                     "SupConLoss", "ContrastiveLoss")},
              **{name: (20, HAND_MIXED) for name in ("LiftedStructureLoss", "NTXentLoss", "TupletMarginLoss")},
              "MarginLoss": (20, HAND_TRIPLETS),
              # (mat-based: a pair may not be both; a row with both kinds)
              "CircleLoss": (20, (torch.tensor([0, 0, 1]), torch.tensor([5, 5, 7]), torch.tensor([0, 1, 1]),
                                  torch.tensor([2, 8, 9])))}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_and_double_backward_fp64(name):
    rows, tuple_ = GRAD_CASES[name]
    x = torch.randn(rows, 5, dtype=torch.float64, requires_grad=True)
    loss_fn = _make(losses, name, {})
    if name != "CircleLoss":  # (its gradient, as PML's, treats the pair weights as constants)
        assert torch.autograd.gradcheck(lambda x: loss_fn(x, None, tuple_), (x,))
    loss_fn(x, None, tuple_)
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback
    v = torch.randn_like(x)
    hvps = []
    for backend in ("auto", "reference"):
        loss_fn.backend = backend
        (g,) = torch.autograd.grad(loss_fn(x, None, tuple_), x, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), x)[0])
    torch.testing.assert_close(hvps[0], hvps[1], **TOL[torch.float64])


@pytest.mark.parametrize("name", list(KWARGS))
def test_bit_identical_across_thread_counts(name):
    x, labels = _data(600, 40, torch.float32, seed=1, dim=16)
    tuple_ = pml_miners.PairMarginMiner(pos_margin=0.5, neg_margin=0.8)(x, labels)  # 9284 pairs, 6330 triplets
    kw = {"num_classes": 40, "learn_beta": True, "nu": 0.1} if name == "MarginLoss" else {}
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            value, grads, loss_fn = _run(losses, name, x, labels, tuple_, kw)
            assert loss_fn.last_backend == "listed", loss_fn.last_fallback
            results.append((value, grads))
    finally:
        torch.set_num_threads(before)
    for value, grads in results[1:]:
        assert torch.equal(value, results[0][0])
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1]))


@pytest.mark.parametrize("name", list(KWARGS))
def test_lazy_miner_results(name):
    """The Multi-Similarity and Triplet-Margin miners' lazy results: PML's tuples, listed (or, when
    dense, the reference) as any tuple; also after the embeddings changed since mining."""
    x, labels = _data(60, 6, torch.float64, seed=10)
    for our_miner, pml_miner in [(miners.MultiSimilarityMiner(0.1), pml_miners.MultiSimilarityMiner(0.1)),
                                 # semihard: ~3.8k triplets (hard: ~14k, and PML's Lifted then takes 16 s)
                                 (miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"),
                                  pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="semihard"))]:
        for moved in (False, True):
            lazy = our_miner(x, labels)
            mined_on = x
            x_loss = x + 0.1 * torch.randn_like(x) if moved else x
            loss_fn = _make(losses, name, {})
            ours = loss_fn(x_loss.clone().requires_grad_(True), labels, lazy)
            _assert_path(loss_fn, name, type(our_miner).__name__)
            want = _make(pml_losses, name, {})(x_loss, labels, pml_miner(mined_on, labels))
            torch.testing.assert_close(ours, want, **TOL[torch.float64])


def test_contrastive_keeps_duplicates_and_shares_the_checks():
    """ContrastiveLoss (pair-based) runs `listed_pairs(dedupe=False)`: duplicates kept, a pair both
    positive and negative is PML's business (no assertion), the dense rule applies."""
    x, labels = _data(40, 4, torch.float64, seed=11)
    both = (torch.tensor([0, 0, 1]), torch.tensor([5, 5, 7]), torch.tensor([0, 2]), torch.tensor([5, 3]))
    loss_fn = _compare("ContrastiveLoss", x, labels, both, what="a pair both positive and negative")
    assert loss_fn.last_backend == "listed", loss_fn.last_fallback


@pytest.mark.slow
def test_memory_at_n16384_is_linear():
    """fwd+bwd at N=16384, D=128 with PairMarginMiner's pairs (and the triplets from them) grows
    peak RSS by < 256 MiB for each loss (the reference's N x N matrix alone: 1 GiB)."""
    growth = peak_rss_growth_mib(
        setup="""
            torch.manual_seed(0)
            n = 16384
            x = torch.randn(n, 128, requires_grad=True)
            labels = torch.randint(0, n // 8, (n,))
            # ~115k positive, ~16k negative pairs, listed here (the lazy result is read by the first loss)
            pairs = tuple(t.clone() for t in miners.PairMarginMiner(neg_margin=1.15)(x, labels))
            fns = [losses.MultiSimilarityLoss(), losses.LiftedStructureLoss(), losses.NTXentLoss(),
                   losses.TupletMarginLoss(), losses.MarginLoss(), losses.CircleLoss()]
        """,
        measured="""
            for loss_fn in fns:
                loss = loss_fn(x, labels, pairs)
                loss.backward()
                assert loss_fn.last_backend == "listed", (type(loss_fn).__name__, loss_fn.last_fallback)
                assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
                x.grad = None
                del loss
        """)
    assert growth < 256, f"peak RSS grew by {growth:.0f} MiB"
