"""dmlkern embedding losses and reducers vs pytorch-metric-learning 2.9.0 itself.

Values and gradients (wrt embeddings, ref_emb and learnable parameters) on fresh random inputs;
fp64 within 1e-6 relative, fp32 within 1e-4.
"""
import math

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.reducers as pml_reducers
import torch

import dmlkern.distances as our_distances
import dmlkern.losses as our_losses
import dmlkern.reducers as our_reducers
from _pml_helpers import (
    EMBEDDING_LOSSES,
    LOSS_NAMES,
    assert_close,
    assert_same_loss_dict,
    compare,
    functional_fn,
    loss_pair,
    make_inputs,
    random_indices,
    reference_fn,
    run_loss,
)

DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
LABELS_OPTIONAL = [n for n in LOSS_NAMES if not EMBEDDING_LOSSES[n][1]]
WITH_REF = [n for n in LOSS_NAMES if EMBEDDING_LOSSES[n][2]]


# ============================================================================ plain batches
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,dim,n_classes", [(7, 3, 3), (16, 8, 4), (33, 5, 6)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_default_config(name, seed, batch, dim, n_classes, dtype):
    emb, labels, _, _ = make_inputs(seed, batch, dim, n_classes, dtype)
    ours, pml = loss_pair(name)
    compare(ours, pml, emb, labels)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_reference_and_functional_equal_the_module(name):
    emb, labels, ref, ref_labels = make_inputs(3, 13, 6, 3, torch.float64, ref_rows=9)
    module = getattr(our_losses, name)()
    cases = [dict()]
    if EMBEDDING_LOSSES[name][2]:
        cases.append(dict(ref=ref, ref_labels=ref_labels))
    for kw in cases:
        # The reference function: bit-identical to the module's reference path; the fused path
        # (default) within rounding; the functional form runs the module's dispatcher: bit-identical
        # to the module's default path.
        module.backend = "reference"
        v_mod, g_mod = run_loss(module, emb, labels, **kw)
        v, g = run_loss(reference_fn(name), emb, labels, **kw)
        assert torch.equal(v, v_mod)
        assert all(torch.equal(a, b) for a, b in zip(g, g_mod))
        module.backend = "auto"
        v_fused, g_fused = run_loss(module, emb, labels, **kw)
        v, g = run_loss(functional_fn(name), emb, labels, **kw)
        assert torch.equal(v, v_fused)
        assert all(torch.equal(a, b) for a, b in zip(g, g_fused))
        torch.testing.assert_close(v_fused, v_mod, rtol=1e-10, atol=1e-12)
        for a, b in zip(g_fused, g_mod):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ============================================================================ ref_emb
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref_rows", [5, 12])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", WITH_REF)
def test_ref_emb(name, seed, ref_rows, dtype):
    emb, labels, ref, ref_labels = make_inputs(seed, 9, 4, 3, dtype, ref_rows=ref_rows)
    ours, pml = loss_pair(name)
    compare(ours, pml, emb, labels, ref=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("name", [n for n in WITH_REF if n not in ("AngularLoss", "NCALoss")])
def test_ref_emb_without_ref_labels_falls_back_to_labels(name):
    # PML's pair/triplet utilities use labels (and drop the diagonal) when ref_labels is None
    emb, labels, ref, _ = make_inputs(4, 10, 4, 3, torch.float64, ref_rows=10)
    ours, pml = loss_pair(name)
    compare(ours, pml, emb, labels, ref=ref, ref_labels=None)


def test_n_pairs_rejects_ref_emb_like_pml():
    emb, labels, ref, ref_labels = make_inputs(0, 8, 4, 3, torch.float64, ref_rows=6)
    for loss in loss_pair("NPairsLoss"):
        with pytest.raises(ValueError, match="ref_emb"):
            loss(emb, labels, ref_emb=ref, ref_labels=ref_labels)


# ============================================================================ indices_tuple
@pytest.mark.parametrize("use_ref", [False, True], ids=["self", "ref"])
@pytest.mark.parametrize("with_labels", [True, False], ids=["labels", "nolabels"])
@pytest.mark.parametrize("kind", ["pairs", "triplets"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_indices_tuple(name, kind, with_labels, use_ref):
    labels_required, supports_ref = EMBEDDING_LOSSES[name][1:]
    if use_ref and not supports_ref:
        use_ref = False  # NPairs: covered by test_n_pairs_rejects_ref_emb_like_pml
    emb, labels, ref, ref_labels = make_inputs(11, 14, 5, 3, torch.float64, ref_rows=11 if use_ref else None)
    it = random_indices(11, kind, labels, ref_labels)
    ours, pml = loss_pair(name)
    call_labels = labels if (with_labels or labels_required) else None
    call_ref_labels = ref_labels if (with_labels or labels_required) else None
    compare(ours, pml, emb, call_labels, indices_tuple=it, ref=ref, ref_labels=call_ref_labels)


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n not in ("NCALoss",)])
def test_one_pos_pair_one_neg_pair_short_circuit(name):
    # PML's GenericPairLoss returns zero when every index tensor has at most one entry
    emb, labels, _, _ = make_inputs(2, 6, 4, 2, torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    it = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    ours, pml = loss_pair(name)
    v, _ = compare(ours, pml, emb, labels, indices_tuple=it)
    if name in ("ContrastiveLoss", "NTXentLoss", "MultiSimilarityLoss", "LiftedStructureLoss", "SupConLoss"):
        assert v.item() == 0.0


# ============================================================================ distances
DISTANCE_CASES = [
    ("ContrastiveLoss", "cos"), ("ContrastiveLoss", "lp_raw"), ("ContrastiveLoss", "lp_sq"),
    ("TripletMarginLoss", "cos"), ("TripletMarginLoss", "lp_sq"), ("TripletMarginLoss", "dot_raw"),
    ("MarginLoss", "cos"), ("MarginLoss", "lp_raw"),
    ("MultiSimilarityLoss", "lp"), ("MultiSimilarityLoss", "dot_raw"),
    ("LiftedStructureLoss", "cos"), ("GeneralizedLiftedStructureLoss", "cos"),
    ("NPairsLoss", "lp"), ("NPairsLoss", "dot_raw"),
    ("NTXentLoss", "lp"), ("NTXentLoss", "lp_raw"), ("NTXentLoss", "lp1"),
    ("SupConLoss", "lp"), ("SupConLoss", "dot_raw"),
    ("NCALoss", "cos"), ("NCALoss", "lp"),
    ("AngularLoss", "lp"), ("TupletMarginLoss", "cos"), ("CircleLoss", "cos"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,distance", DISTANCE_CASES)
def test_non_default_distance(name, distance, dtype):
    emb, labels, ref, ref_labels = make_inputs(5, 12, 6, 3, dtype, ref_rows=7)
    ours, pml = loss_pair(name, distance=distance)
    compare(ours, pml, emb, labels)
    if EMBEDDING_LOSSES[name][2]:
        ours, pml = loss_pair(name, distance=distance)
        compare(ours, pml, emb, labels, ref=ref, ref_labels=ref_labels)


@pytest.mark.parametrize("name,distance", [("TupletMarginLoss", "lp"), ("CircleLoss", "dot_raw"),
                                           ("AngularLoss", "cos"), ("AngularLoss", "lp_sq")])
def test_distance_requirements_raise_like_pml(name, distance):
    from _pml_helpers import distance_pair

    d_ours, d_pml = distance_pair(distance)
    with pytest.raises(AssertionError):
        getattr(pml_losses, name)(distance=d_pml)
    with pytest.raises((AssertionError, ValueError), match="distance"):
        getattr(our_losses, name)(distance=d_ours)


# ============================================================================ reducers
REDUCERS = {
    "mean": ("MeanReducer", {}),
    "sum": ("SumReducer", {}),
    "avgnz": ("AvgNonZeroReducer", {}),
    "thresh": ("ThresholdReducer", {"low": 0.05, "high": 3.0}),
    "thresh_hi": ("ThresholdReducer", {"high": 1.0}),
    "per_anchor": ("PerAnchorReducer", {}),
    "per_anchor_avgnz": ("PerAnchorReducer", {"reducer": ("AvgNonZeroReducer", {})}),
    "class_weighted": ("ClassWeightedReducer", {"weights": "random"}),
}


@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_non_default_reducer(name, reducer):
    emb, labels, _, _ = make_inputs(6, 11, 4, 4, torch.float64)
    ours, pml = loss_pair(name, reducer=REDUCERS[reducer], n_classes=4)
    try:
        run_loss(pml, emb, labels)
    except Exception as exc:  # e.g. PerAnchorReducer on triplet losses
        with pytest.raises(type(exc)):
            run_loss(ours, emb, labels)
        return
    compare(ours, pml, emb, labels)


def test_divisor_reducer_on_margin_loss():
    emb, labels, _, _ = make_inputs(7, 10, 4, 3, torch.float64)
    ours, pml = loss_pair("MarginLoss", reducer=("DivisorReducer", {}))
    compare(ours, pml, emb, labels)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_do_nothing_reducer_returns_pml_loss_dict(name):
    emb, labels, _, _ = make_inputs(8, 10, 4, 3, torch.float64)
    params = {"learn_beta": True, "num_classes": 3} if name == "MarginLoss" else {}
    ours, pml = loss_pair(name, params, reducer=("DoNothingReducer", {}))
    d_ours = ours(emb, labels)
    d_pml = pml(emb, labels)
    assert_same_loss_dict(d_ours, d_pml, torch.float64)


# ---------------------------------------------------------------------------- reducers alone
def _pair_dict(losses, kind, n):
    g = torch.Generator().manual_seed(0)
    if kind == "element":
        return {"loss": {"losses": losses, "indices": torch.arange(len(losses)), "reduction_type": "element"}}
    if kind == "triplet":
        idx = tuple(torch.randint(0, n, (len(losses),), generator=g) for _ in range(3))
        return {"loss": {"losses": losses, "indices": idx, "reduction_type": "triplet"}}
    idx = (torch.randint(0, n, (len(losses),), generator=g), torch.randint(0, n, (len(losses),), generator=g))
    return {"loss": {"losses": losses, "indices": idx, "reduction_type": kind}}


@pytest.mark.parametrize("kind", ["element", "pos_pair", "neg_pair", "triplet"])
@pytest.mark.parametrize("reducer", list(REDUCERS))
def test_reducers_on_raw_loss_dicts(reducer, kind):
    # Seeded: with the global RNG, all six relu'd element losses were 0 once in 64 orders
    # (then no reducer output has a gradient to test).
    torch.manual_seed(5)
    n = 6
    emb = torch.randn(n, 3, dtype=torch.float64)
    labels = torch.randint(0, 4, (n,))
    losses = torch.relu(torch.randn(9 if kind == "element" else 15, dtype=torch.float64))
    if kind == "element":
        losses = torch.relu(torch.randn(n, dtype=torch.float64))
    ours_r, pml_r = __import__("_pml_helpers").reducer_pair(REDUCERS[reducer], 4)
    results = []
    for red in (ours_r, pml_r):
        x = losses.clone().requires_grad_(True)
        try:
            out = red(_pair_dict(x, kind, n), emb, labels)
        except NotImplementedError:
            results.append(None)
            continue
        out.backward()
        results.append((out.detach(), x.grad))
    if results[1] is None:
        assert results[0] is None
        return
    assert_close(results[0][0], results[1][0], torch.float64)
    assert_close(results[0][1], results[1][1], torch.float64)


@pytest.mark.parametrize("cls", ["MeanReducer", "AvgNonZeroReducer", "DivisorReducer", "SumReducer"])
def test_zero_loss_is_grad_carrying_zero(cls):
    emb = torch.randn(4, 3, requires_grad=True)
    d = {"loss": {"losses": 0, "indices": None, "reduction_type": "already_reduced"}}
    out = getattr(our_reducers, cls)()(d, emb, None)
    assert out.ndim == 0 and out.item() == 0 and out.requires_grad
    out.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_threshold_and_divisor_empty_give_zero():
    emb = torch.randn(4, 3, requires_grad=True)
    d = {"loss": {"losses": torch.zeros(5), "indices": torch.arange(5), "reduction_type": "element"}}
    assert our_reducers.AvgNonZeroReducer()(d, emb, None).requires_grad
    d["loss"]["divisor"] = 0
    out = our_reducers.DivisorReducer()(d, emb, None)
    assert out.item() == 0 and out.requires_grad


@pytest.mark.parametrize("case", ["nan_rows", "snr_width_1"])
def test_margin_loss_without_a_positive_term_is_pmls_zero(case):
    """MarginLoss + its DivisorReducer where no term is > 0 (every term NaN): PML's branch returns
    its zero loss, sum(embeddings * 0), whose graph leaves the NaN terms out: gradient 0, and no
    gradient for the learnt per-class beta. Eager on the CPU dmlkern branches as PML."""
    g = torch.Generator().manual_seed(3)
    if case == "nan_rows":
        x = torch.randn(6, 5, generator=g, dtype=torch.float64)
        x[:, 1] = float("nan")
        labels, kw, dists = torch.tensor([0, 0, 1, 1, 2, 2]), dict(learn_beta=True, num_classes=3), {}
    else:  # PML's SNR distance divides by an unbiased variance over one entry: NaN
        x = torch.randn(6, 1, generator=g, dtype=torch.float64)
        labels, kw, dists = torch.tensor([0, 0, 1, 1, 2, 2]), {}, dict(distance="SNRDistance")
    out = []
    for losses_mod, dist_mod in ((pml_losses, pml_distances), (our_losses, our_distances)):
        extra = {"distance": getattr(dist_mod, dists["distance"])()} if dists else {}
        loss = losses_mod.MarginLoss(**kw, **extra)
        xx = x.clone().requires_grad_()
        value = loss(xx, labels)
        value.backward()
        beta_grad = loss.beta.grad if kw.get("learn_beta") else "fixed"
        out.append((value.detach(), xx.grad, beta_grad))
    (pv, pg, pb), (ov, og, ob) = out
    assert torch.equal(pg, torch.zeros_like(pg)), "PML's zero loss (the case must bite)"
    torch.testing.assert_close(ov, pv, equal_nan=True)  # sum(x * 0): NaN with NaN rows
    assert torch.equal(og, pg)
    assert (pb is None) == (ob is None) and (pb == "fixed") == (ob == "fixed")


@pytest.mark.parametrize("pairs", [1, 2])
def test_per_anchor_reducer_on_column_shaped_pair_losses(pairs):
    """Pair losses shaped (P, 1) (LiftedStructure's, AngularLoss's): PML's grid assignment takes
    one pair's (1, 1) and fails for more; dmlkern does the same (it failed for one pair too)."""
    emb = torch.randn(5, 3, dtype=torch.float64)
    d = {"loss": {"losses": torch.rand(pairs, 1, dtype=torch.float64),
                  "indices": (torch.tensor([0, 2][:pairs]), torch.tensor([3, 4][:pairs])),
                  "reduction_type": "pos_pair"}}
    out = []
    for reducers in (pml_reducers, our_reducers):
        try:
            out.append(reducers.PerAnchorReducer()(d, emb, None))
        except RuntimeError:
            out.append("raised")
    assert out[0] == "raised" if pairs > 1 else torch.is_tensor(out[0])
    if pairs > 1:
        assert out[1] == "raised"
    else:
        assert_close(out[1], out[0], torch.float64)


def test_margin_loss_without_a_positive_term_gives_beta_no_gradient():
    """The fused MarginLoss where every term is 0 (tight, orthogonal classes): PML's DivisorReducer
    returns its zero loss, so the learnt beta gets no gradient (None, not zeros) and the
    embeddings zeros; dmlkern's fused path takes the same branch."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    x = torch.eye(4, 8, dtype=torch.float64)[labels] + 0.001 * torch.randn(12, 8, generator=g, dtype=torch.float64)
    out = []
    for losses_mod in (pml_losses, our_losses):
        loss = losses_mod.MarginLoss(learn_beta=True, num_classes=4)
        xx = x.clone().requires_grad_()
        value = loss(xx, labels)
        value.backward()
        out.append((value.detach(), xx.grad, loss.beta.grad))
        if losses_mod is our_losses:
            assert loss.last_backend not in (None, "reference", "zero"), loss.last_fallback
    (pv, pg, pb), (ov, og, ob) = out
    assert pb is None and torch.equal(pg, torch.zeros_like(pg)), "PML's zero loss (the case must bite)"
    assert ob is None and torch.equal(og, pg) and torch.equal(ov, pv)


@pytest.mark.parametrize("wrapper", [False, True])
def test_no_nonzero_term_leaves_ref_emb_out_of_the_graph(wrapper):
    """ContrastiveLoss (fused) + AvgNonZeroReducer where every term is 0, with a ref_emb (or
    SelfSupervisedLoss's second view): PML returns its zero loss, sum(embeddings * 0), so
    ref_emb gets no gradient (None, not zeros: an optimizer skips it) and embeddings zeros."""
    g = torch.Generator().manual_seed(5)
    x = 10 * torch.randn(7, 8, generator=g, dtype=torch.float64)
    ref = x + 0.1 * torch.randn(7, 8, generator=g, dtype=torch.float64)  # each row next to its view
    out = []
    for losses_mod in (pml_losses, our_losses):
        inner = losses_mod.ContrastiveLoss(pos_margin=0.3, neg_margin=0.5)
        xx, rr = x.clone().requires_grad_(), ref.clone().requires_grad_()
        if wrapper:
            value = losses_mod.SelfSupervisedLoss(inner, symmetric=False)(xx, rr)
        else:
            value = inner(xx, torch.arange(7), None, rr, torch.arange(7))
        value.backward()
        out.append((value.detach(), xx.grad, rr.grad))
        if losses_mod is our_losses:
            assert inner.last_backend not in (None, "reference", "zero"), inner.last_fallback
    (pv, pg, pr), (ov, og, orr) = out
    assert pr is None and torch.equal(pg, torch.zeros_like(pg)), "PML's zero loss (the case must bite)"
    assert orr is None and torch.equal(og, pg) and torch.equal(ov, pv)


def test_multiple_reducers_sum_and_default():
    emb = torch.randn(5, 2, dtype=torch.float64)
    x = torch.rand(5, dtype=torch.float64)
    d = {
        "a": {"losses": x, "indices": torch.arange(5), "reduction_type": "element"},
        "b": {"losses": x * 2, "indices": torch.arange(5), "reduction_type": "element"},
    }
    ours = our_reducers.MultipleReducers({"a": our_reducers.SumReducer()})(d, emb, None)
    pml = pml_reducers.MultipleReducers({"a": pml_reducers.SumReducer()})(d, emb, None)
    assert_close(ours, pml, torch.float64)


# ============================================================================ edge batches
EDGE_CASES = {
    "no_positives": lambda: torch.arange(6),
    "single_class": lambda: torch.zeros(5, dtype=torch.long),
    "single_sample": lambda: torch.tensor([3]),
    "two_same": lambda: torch.tensor([1, 1]),
    "two_diff": lambda: torch.tensor([0, 1]),
    "one_pair_and_singletons": lambda: torch.tensor([0, 0, 1, 2, 3]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_edge_batches(name, case, dtype):
    labels = EDGE_CASES[case]()
    emb = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    ours, pml = loss_pair(name)
    v_pml, _ = run_loss(pml, emb, labels)
    if name == "NCALoss" and not torch.isfinite(v_pml):
        # documented deviation: no row with a positive -> grad-carrying zero instead of NaN
        assert case in ("no_positives", "two_diff")
        v, (g,) = run_loss(ours, emb, labels)
        assert v.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
        return
    compare(ours, pml, emb, labels)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_zero_loss_keeps_graph(name):
    # a single sample has no pair: the loss is the grad-carrying zero of PML
    emb = torch.randn(1, 4, requires_grad=True)
    out = getattr(our_losses, name)()(emb, torch.tensor([0]))
    assert out.ndim == 0 and out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


# ============================================================================ hyperparameters
HYPER_CASES = [
    ("ContrastiveLoss", {"pos_margin": 0.3, "neg_margin": 0.9}),
    ("TripletMarginLoss", {"margin": 0.3, "swap": True}),
    ("TripletMarginLoss", {"margin": 0.1, "smooth_loss": True}),
    ("TripletMarginLoss", {"triplets_per_anchor": 3}),
    ("MarginLoss", {"margin": 0.1, "nu": 0.1, "beta": 0.9, "learn_beta": True}),
    ("MarginLoss", {"nu": 0.05, "learn_beta": True, "num_classes": 4}),
    ("MarginLoss", {"num_classes": 4, "beta": 1.0}),
    ("MarginLoss", {"triplets_per_anchor": 2}),
    ("MultiSimilarityLoss", {"alpha": 1.0, "beta": 20, "base": 0.3}),
    ("LiftedStructureLoss", {"neg_margin": 0.5, "pos_margin": 0.1}),
    ("GeneralizedLiftedStructureLoss", {"neg_margin": 0.5, "pos_margin": 0.1}),
    ("NTXentLoss", {"temperature": 0.5}),
    ("SupConLoss", {"temperature": 0.3}),
    ("TupletMarginLoss", {"margin": 10.0, "scale": 16}),
    ("AngularLoss", {"alpha": 30}),
    ("NCALoss", {"softmax_scale": 3}),
    ("CircleLoss", {"m": 0.25, "gamma": 64}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params", HYPER_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(HYPER_CASES)])
def test_hyperparameters(name, params, dtype):
    emb, labels, ref, ref_labels = make_inputs(12, 15, 5, 4, dtype, ref_rows=8)
    ours, pml = loss_pair(name, params)
    learn = [ours.beta] if params.get("learn_beta") else []
    learn_pml = [pml.beta] if params.get("learn_beta") else []
    compare(ours, pml, emb, labels, ours_params=learn, pml_params=learn_pml, seed=77)
    if learn:
        assert float(ours.beta.grad.abs().sum()) > 0
    if not params.get("swap"):  # PML's swap indexes query rows with ref indices
        compare(ours, pml, emb, labels, ref=ref, ref_labels=ref_labels,
                ours_params=learn, pml_params=learn_pml, seed=78)


def test_margin_loss_fp32_beta_gradient_is_pmls_with_an_fp64_beta():
    """README deviation: with fp64 embeddings, the learned (fp32) beta's gradient is within one
    fp32 rounding of PML's gradient for an fp64 beta (PML's own, summed in fp32, may be further)."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, 5, (64,), generator=g)
    kw = {"margin": 0.5, "nu": 0, "beta": 0.5, "learn_beta": True, "num_classes": 5}
    ours, pml = our_losses.MarginLoss(**kw), pml_losses.MarginLoss(**kw)
    pml.beta = torch.nn.Parameter(pml.beta.detach().double())
    for loss_fn in (ours, pml):
        loss_fn(x.clone().requires_grad_(True), labels).backward()
    assert ours.beta.grad.dtype == torch.float32
    torch.testing.assert_close(ours.beta.grad.double(), pml.beta.grad, rtol=1.2e-7, atol=1e-12)


def test_margin_loss_attributes_match_pml():
    for kw in [{}, {"learn_beta": True}, {"learn_beta": True, "num_classes": 5}, {"num_classes": 3}]:
        ours, pml = loss_pair("MarginLoss", kw)
        assert type(ours.beta) is type(pml.beta)
        assert torch.equal(ours.beta.detach(), pml.beta.detach())
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in pml.named_parameters()]


def test_constructor_attributes_match_pml():
    checks = {
        "ContrastiveLoss": ["pos_margin", "neg_margin"],
        "TripletMarginLoss": ["margin", "swap", "smooth_loss", "triplets_per_anchor"],
        "MarginLoss": ["margin", "nu", "learn_beta", "triplets_per_anchor"],
        "MultiSimilarityLoss": ["alpha", "beta", "base"],
        "LiftedStructureLoss": ["neg_margin", "pos_margin"],
        "GeneralizedLiftedStructureLoss": ["neg_margin", "pos_margin"],
        "NTXentLoss": ["temperature"],
        "SupConLoss": ["temperature"],
        "TupletMarginLoss": ["margin", "scale"],
        "AngularLoss": ["alpha"],
        "NCALoss": ["softmax_scale"],
        "CircleLoss": ["m", "gamma", "op", "on", "delta_p", "delta_n"],
    }
    for name, attrs in checks.items():
        ours, pml = loss_pair(name)
        for a in attrs:
            o, p = getattr(ours, a), getattr(pml, a)
            if torch.is_tensor(p):
                assert torch.allclose(o.double(), p.double()), (name, a)
            elif isinstance(p, float):
                assert math.isclose(o, p, rel_tol=1e-12), (name, a)
            else:
                assert o == p, (name, a)
        assert ours.sub_loss_names() == pml.sub_loss_names(), name
        assert type(ours.distance).__name__ == type(pml.distance).__name__, name
        for k in ("normalize_embeddings", "p", "power", "is_inverted"):
            assert getattr(ours.distance, k) == getattr(pml.distance, k), (name, k)
        assert type(ours.reducer).__name__ == type(pml.reducer).__name__, name


# ============================================================================ regularizer, SimCLR
class _SqNorm(torch.nn.Module):
    def forward(self, x):
        return x.pow(2).sum(dim=1).mean()


@pytest.mark.parametrize("name", ["ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "MarginLoss", "NCALoss"])
def test_embedding_regularizer(name):
    emb, labels, _, _ = make_inputs(13, 10, 4, 3, torch.float64)
    ours, pml = loss_pair(name, embedding_regularizer=_SqNorm(), embedding_reg_weight=0.3)
    assert ours.sub_loss_names() == pml.sub_loss_names()
    compare(ours, pml, emb, labels)
    # PML's own regularizer object works with a dmlkern loss too
    from pytorch_metric_learning.regularizers import LpRegularizer

    ours, pml = loss_pair(name, embedding_regularizer=LpRegularizer(), embedding_reg_weight=0.1)
    compare(ours, pml, emb, labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ntxent_simclr_labels(dtype):
    g = torch.Generator().manual_seed(21)
    n = 9
    emb = torch.randn(2 * n, 8, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    ours, pml = loss_pair("NTXentLoss", {"temperature": 0.2})
    compare(ours, pml, emb, labels)


# ============================================================================ base classes, PML objects
def test_custom_generic_pair_loss_subclass_matches_pml():
    # users subclass GenericPairLoss and implement _compute_loss, as with PML
    def make(base_mod, mat_based):
        class Custom(base_mod.GenericPairLoss):
            def __init__(self, **kw):
                super().__init__(mat_based_loss=mat_based, **kw)

            def _compute_loss(self, *args):
                if mat_based:
                    mat, pos_mask, neg_mask = args
                    losses = (mat * pos_mask).sum(dim=1) - (mat * neg_mask).sum(dim=1) ** 2
                    return {"loss": {"losses": losses, "indices": torch.arange(len(mat)), "reduction_type": "element"}}
                pos, neg, it = args
                return {"loss": {"losses": pos ** 2, "indices": it[:2], "reduction_type": "pos_pair"}}

        return Custom()

    from pytorch_metric_learning.losses import generic_pair_loss as pml_gpl

    import dmlkern.losses.base as our_base

    emb, labels, _, _ = make_inputs(14, 9, 4, 3, torch.float64)
    for mat_based in (False, True):
        compare(make(our_base, mat_based), make(pml_gpl, mat_based), emb, labels)


def test_weight_regularizer_mixin_sub_losses_and_reducer():
    from pytorch_metric_learning.losses import mixins as pml_mixins
    from pytorch_metric_learning.losses.base_metric_loss_function import BaseMetricLossFunction as PBase

    import dmlkern.losses.base as our_base

    class Ours(our_base.WeightRegularizerMixin, our_base.BaseMetricLossFunction):
        pass

    class Pml(pml_mixins.WeightRegularizerMixin, PBase):
        pass

    for kw in [{}, {"weight_regularizer": _SqNorm()}, {"weight_regularizer": _SqNorm(), "embedding_regularizer": _SqNorm()}]:
        o, p = Ours(**kw), Pml(**kw)
        assert o.sub_loss_names() == p.sub_loss_names()
        assert type(o.reducer).__name__ == type(p.reducer).__name__
        assert isinstance(o.weight_init_func, our_base.TorchInitWrapper)
        if "weight_regularizer" in kw:
            assert isinstance(o.weight_regularizer, torch.nn.Module)
            assert "weight_regularizer" in dict(o.named_children())
    o = Ours(weight_regularizer=_SqNorm(), weight_reg_weight=0.5)
    w = torch.randn(3, 4)
    d = {}
    o.add_weight_regularization_to_loss_dict(d, w)
    assert torch.allclose(d["weight_reg_loss"]["losses"], _SqNorm()(w) * 0.5)


@pytest.mark.parametrize("name", ["ContrastiveLoss", "NTXentLoss", "MultiSimilarityLoss"])
def test_pml_distance_and_reducer_objects_work_with_dmlkern_losses(name):
    import pytorch_metric_learning.distances as pml_distances

    emb, labels, _, _ = make_inputs(15, 10, 4, 3, torch.float64)
    ours = getattr(our_losses, name)(distance=pml_distances.CosineSimilarity(), reducer=pml_reducers.SumReducer())
    pml = getattr(pml_losses, name)(distance=pml_distances.CosineSimilarity(), reducer=pml_reducers.SumReducer())
    compare(ours, pml, emb, labels)
    d = getattr(our_losses, name)(reducer=pml_reducers.DoNothingReducer())(emb, labels)
    assert isinstance(d, dict)


# ============================================================================ documented deviations
def test_nca_without_any_positive_is_grad_zero_not_nan():
    emb = torch.randn(6, 4, requires_grad=True)
    labels = torch.arange(6)
    assert torch.isnan(pml_losses.NCALoss()(emb, labels))
    out = our_losses.NCALoss()(emb, labels)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_tuplet_cosine_rounded_above_one_is_finite():
    # a duplicated sample: fp32 rounding gives cos = 1 + 1.2e-7, PML's unclamped acos gives NaN
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        x = torch.randn(1, 7, generator=g)
        emb = torch.cat([x, x, torch.randn(2, 7, generator=g)])
        sim = torch.nn.functional.normalize(emb)
        if (sim @ sim.T)[0, 1] > 1:
            break
    assert (sim @ sim.T)[0, 1] > 1, "no duplicated pair with a rounded-up cosine found"
    emb.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2])
    assert torch.isnan(pml_losses.TupletMarginLoss()(emb, labels))
    out = our_losses.TupletMarginLoss()(emb, labels)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(emb.grad).all()
