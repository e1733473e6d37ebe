"""Inputs PML 2.9.0 accepts are accepted, with PML's result: float / bool labels (compared as
given), empty batches and empty ref_emb (PML's grad-carrying zero; miners: empty index tuples).
Also: no UserWarning from dmlkern in normal use, and SupCon's fp32 error near convergence."""
import warnings

import pytest
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch

import dmlkern.losses as our_losses
import dmlkern.miners as our_miners
from _batches import assert_same_indices
from _pml_helpers import LOSS_NAMES, compare

D = 4
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 1])
# case -> labels holding class ids in another dtype; "frac": non-integral floats (1.5 != 1.7)
LABEL_CASES = {
    "float": lambda: LABELS.float(),
    "double": lambda: LABELS.double(),
    "bool": lambda: LABELS > 0,
    "frac": lambda: LABELS.float() * 0.2 + 1.5,
}
CLASS_WEIGHT_LOSSES = ["ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss", "NormalizedSoftmaxLoss",
                       "LargeMarginSoftmaxLoss", "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss",
                       "SubCenterArcFaceLoss"]
OURS_ONLY_CLASS_LOSSES = ["SoftmaxLoss", "CenterLoss"]  # not in PML 2.9.0
MINERS = ["TripletMarginMiner", "AngularMiner", "BatchHardMiner", "BatchEasyHardMiner", "HDCMiner",
          "MultiSimilarityMiner", "PairMarginMiner", "DistanceWeightedMiner"]
PML_CRASHES_ON_EMPTY = {"BatchHardMiner", "BatchEasyHardMiner", "DistanceWeightedMiner"}  # max()/min() of nothing


def _emb(n=len(LABELS), seed=0):
    return torch.randn(n, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _class_loss(mod, name):
    torch.manual_seed(0)  # the same weights in both
    return getattr(mod, name)(num_classes=3, embedding_size=D)


# ------------------------------------------------------------------ float / bool labels
@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", list(LABEL_CASES))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_label_dtypes_match_pml(name, case, backend):
    """Value and gradients equal PML's for labels given as float / bool / non-integral floats."""
    ours = getattr(our_losses, name)()
    ours.backend = backend
    compare(ours, getattr(pml_losses, name)(), _emb(), LABEL_CASES[case]())


@pytest.mark.parametrize("name", ["SupConLoss", "ContrastiveLoss", "NCALoss", "MultiSimilarityLoss"])
def test_loss_mixed_label_dtypes_with_ref_match_pml(name):
    """int labels with float ref_labels (and the reverse) compare by value, as PML's ==."""
    ref_labels = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.5, 2.0])
    compare(getattr(our_losses, name)(), getattr(pml_losses, name)(), _emb(), LABELS, ref=_emb(6, 1),
            ref_labels=ref_labels)
    compare(getattr(our_losses, name)(), getattr(pml_losses, name)(), _emb(6, 1), ref_labels, ref=_emb(),
            ref_labels=LABELS)


@pytest.mark.parametrize("case", list(LABEL_CASES))
@pytest.mark.parametrize("name", MINERS)
def test_miner_label_dtypes_match_pml(name, case):
    """Index tuples equal PML's (with a reference set of int labels too: one id mapping for both)."""
    def mined(mod, *args):
        torch.manual_seed(0)  # DistanceWeightedMiner samples
        return getattr(mod, name)()(*args)

    x, y = _emb(), LABEL_CASES[case]()
    r, ry = _emb(6, 1), torch.tensor([0, 1, 2, 1, 0, 2])
    for args in [(x, y), (x, y, r, ry)]:
        assert_same_indices(mined(our_miners, *args), mined(pml_miners, *args))


@pytest.mark.parametrize("case", ["float", "bool", "frac"])
@pytest.mark.parametrize("name", CLASS_WEIGHT_LOSSES + OURS_ONLY_CLASS_LOSSES)
def test_class_weight_losses_with_float_or_bool_labels(name, case):
    """Labels index these losses' class weights: PML fails on float / bool labels (F.one_hot,
    indexing, cross_entropy) and dmlkern raises a TypeError naming labels. ProxyNCA compares
    them with arange(num_classes), as PML: integral floats and bools give PML's result;
    non-integral ones raise as out-of-range class ids do."""
    labels = LABEL_CASES[case]()
    ours = _class_loss(our_losses, name)
    if name == "ProxyNCALoss" and case != "frac":
        theirs = _class_loss(pml_losses, name)
        compare(ours, theirs, _emb(), labels, ours_params=[ours.proxies], pml_params=[theirs.proxies])
        return
    if name in CLASS_WEIGHT_LOSSES and name != "ProxyNCALoss":
        with pytest.raises((RuntimeError, IndexError)):
            _class_loss(pml_losses, name)(_emb(), labels)
    err = ValueError if name == "ProxyNCALoss" else TypeError
    with pytest.raises(err, match="labels"):
        ours(_emb(), labels)


@pytest.mark.parametrize("miner", ["TripletMarginMiner", "MultiSimilarityMiner"])
@pytest.mark.parametrize("case", ["float", "bool", "int"])
@pytest.mark.parametrize("name", CLASS_WEIGHT_LOSSES)
def test_class_weight_losses_with_a_miners_lazy_tuple(name, case, miner):
    """The same labels with the miner's tuple: dmlkern's miner returns a lazy tuple that carries its
    labels as dense class ids (float [1.] -> [0]); a class-weight loss must still see the label
    values (ProxyNCA: PML's result) or raise as without a miner (the others, float / bool)."""
    labels = LABELS.clone() if case == "int" else LABEL_CASES[case]()
    x = _emb()
    ours, theirs = _class_loss(our_losses, name), _class_loss(pml_losses, name)
    mined = getattr(our_miners, miner)()(x, labels)
    if case == "int" or name == "ProxyNCALoss":
        want = theirs(x, labels, getattr(pml_miners, miner)()(x, labels))
        torch.testing.assert_close(ours(x, labels, mined), want)
    else:
        with pytest.raises(TypeError, match="labels"):
            ours(x, labels, mined)


@pytest.mark.parametrize("target", LOSS_NAMES[:3] + MINERS[:2])
def test_nan_labels_raise(target):
    """PML compares NaN labels with ==: a NaN-labelled row is nobody's positive and (its negatives
    are built before the self pairs are removed) its own negative. dmlkern raises instead."""
    labels = LABELS.double()
    labels[3] = float("nan")
    mod = our_losses if target.endswith("Loss") else our_miners
    with pytest.raises(ValueError, match="labels contain NaN"):
        getattr(mod, target)()(_emb(), labels)


# ------------------------------------------------------------------ empty batches
def _assert_grad_carrying_zero(out, leaves):
    assert torch.is_tensor(out) and out.shape == () and out.requires_grad and out.item() == 0.0
    out.backward()
    for leaf in leaves:
        assert leaf.grad is None or not leaf.grad.any()


def _empty_cases():
    return {
        "empty_batch": (torch.randn(0, D), torch.zeros(0, dtype=torch.long), None, None),
        "empty_batch_float_labels": (torch.randn(0, D), torch.zeros(0), None, None),
        "empty_ref": (_emb().float(), LABELS, torch.randn(0, D), torch.zeros(0, dtype=torch.long)),
    }


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("case", list(_empty_cases()))
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_empty_batch_is_pmls_zero(name, case, backend):
    """PML's 0-dim zero that requires grad, with zero gradients (NCALoss with an empty ref_emb:
    PML gives NaN, dmlkern the zero, as for NCA without positives). NPairs rejects any ref_emb."""
    emb, labels, ref, ref_labels = _empty_cases()[case]
    leaves = [t.clone().requires_grad_(True) for t in (emb, ref) if t is not None]
    args = (leaves[0], labels, None) + ((leaves[1], ref_labels) if ref is not None else ())
    if name == "NPairsLoss" and ref is not None:
        for mod in (pml_losses, our_losses):
            with pytest.raises(ValueError, match="ref_emb"):
                getattr(mod, name)()(*args)
        return
    theirs = getattr(pml_losses, name)()(*[a.detach() if torch.is_tensor(a) and a.requires_grad else a for a in args])
    assert theirs.shape == () and (theirs.item() == 0.0 or (name == "NCALoss" and torch.isnan(theirs)))
    ours = getattr(our_losses, name)()
    ours.backend = backend
    _assert_grad_carrying_zero(ours(*args), leaves)


# losses whose PML compute_loss rejects a ref_emb / an indices_tuple, with their constructor args
NO_REF_LOSSES = {"FastAPLoss": {}, "HistogramLoss": {}, "SmoothAPLoss": {}, "RankedListLoss": {"margin": 0.4, "Tn": 10},
                 "PNPLoss": {}, "InstanceLoss": {}, "ManifoldLoss": {"l": D}, "P2SGradLoss": {"descriptors_dim": D, "num_classes": 3}}
NO_INDICES_TUPLE_LOSSES = ["RankedListLoss", "PNPLoss", "InstanceLoss", "P2SGradLoss"]


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the exception itself is compared
        return type(e), str(e)
    return None


UNSUPPORTED_CASES = [(name, given) for name in NO_REF_LOSSES for given in ("ref_emb", "indices_tuple", "both")
                     if given == "ref_emb" or name in NO_INDICES_TUPLE_LOSSES]


@pytest.mark.parametrize("batch", [0, 6], ids=["empty_batch", "batch"])
@pytest.mark.parametrize("name,given", UNSUPPORTED_CASES)
def test_unsupported_arguments_raise_as_pml_also_on_an_empty_batch(name, given, batch):
    """PML's compute_loss raises for a ref_emb (and for some losses an indices_tuple), in its order,
    before looking at the batch: so does dmlkern, an empty batch included (it returned 0 there)."""
    emb, labels = torch.randn(batch, D), torch.arange(batch) % 3
    kwargs = {}
    if given in ("ref_emb", "both"):
        kwargs.update(ref_emb=torch.randn(batch, D), ref_labels=torch.arange(batch) % 3)
    if given in ("indices_tuple", "both"):
        kwargs.update(indices_tuple=(torch.zeros(0, dtype=torch.long),) * 3)
    outcomes = []
    for mod in (pml_losses, our_losses):
        torch.manual_seed(0)
        loss = getattr(mod, name)(**NO_REF_LOSSES[name])
        outcomes.append(_raised(lambda: loss(emb, labels, **kwargs)))
    assert outcomes[0] is not None, f"PML accepted {given} for {name}"
    assert outcomes[1] is not None and issubclass(outcomes[1][0], outcomes[0][0]), outcomes
    assert outcomes[1][1] == outcomes[0][1], outcomes


@pytest.mark.parametrize("name", CLASS_WEIGHT_LOSSES + OURS_ONLY_CLASS_LOSSES)
def test_class_weight_loss_empty_batch(name):
    """PML: 0 for ProxyAnchor, NaN for the others (a mean over nothing); dmlkern: the
    grad-carrying zero for all, zero gradients for the embeddings and the class weights."""
    emb = torch.randn(0, D, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    if name in CLASS_WEIGHT_LOSSES:
        theirs = _class_loss(pml_losses, name)(emb.detach(), labels)
        assert theirs.item() == 0.0 if name == "ProxyAnchorLoss" else torch.isnan(theirs)
    ours = _class_loss(our_losses, name)
    _assert_grad_carrying_zero(ours(emb, labels), [emb, *ours.parameters()])


@pytest.mark.parametrize("case", list(_empty_cases()))
@pytest.mark.parametrize("name", MINERS)
def test_miner_empty_batch_returns_empty_tuples(name, case):
    """PML's empty index tuples; where PML crashes (max/min over nothing) the same empty tuples."""
    emb, labels, ref, ref_labels = _empty_cases()[case]
    args = (emb, labels) + ((ref, ref_labels) if ref is not None else ())
    ours = tuple(getattr(our_miners, name)()(*args))
    if name in PML_CRASHES_ON_EMPTY:
        with pytest.raises((IndexError, RuntimeError)):
            getattr(pml_miners, name)()(*args)
        assert len(ours) == (4 if name == "BatchEasyHardMiner" else 3)
        assert all(t.dtype == torch.long and t.numel() == 0 for t in ours)
    else:
        assert_same_indices(ours, getattr(pml_miners, name)()(*args))


# ------------------------------------------------------------------ no UserWarning in normal use
def _all_losses():
    out = [(n, getattr(our_losses, n)()) for n in LOSS_NAMES]
    out += [(n, _class_loss(our_losses, n)) for n in CLASS_WEIGHT_LOSSES + OURS_ONLY_CLASS_LOSSES]
    return out


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_no_warnings_in_normal_use(backend):
    """Every loss and miner, on the fused and the reference paths (CPU), forward and backward,
    raises no warning (Lifted / GeneralizedLifted used to: float() of a tensor requiring grad)."""
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 1, 0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, loss in _all_losses():
            loss.backend = backend
            loss(x, y).backward()
            if loss.backend == "auto" and name in ("LiftedStructureLoss", "GeneralizedLiftedStructureLoss"):
                assert loss.last_backend not in ("reference", None), name
        for name in MINERS:
            pairs = getattr(our_miners, name)()(x, y)
            our_losses.ContrastiveLoss()(x, y, pairs if len(pairs) == 4 else pairs).backward()


# ------------------------------------------------------------------ SupCon near convergence
def _near_convergence_batch(classes=4, per_class=48, dim=32, spread=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return centers[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("classes, per_class, spread, temperature", [
    (4, 48, 0.05, 0.1), (4, 48, 0.01, 0.1), (4, 48, 0.002, 0.1),
    (256, 2, 0.01, 0.07), (256, 2, 0.002, 0.05),  # two views per class: loss ~1e-3 next to s/t ~ 14-20
], ids=["48pos-0.05", "48pos-0.01", "48pos-0.002", "1pos-0.01", "1pos-0.002"])
def test_supcon_fp32_error_near_convergence_is_pmls(classes, per_class, spread, temperature):
    """Tight clusters: the fused fp32 loss is as close to the fp64 value as PML's fp32 loss is
    (mean over positives formed before subtracting, LSE split as lse_pos + softplus(lse_neg -
    lse_pos): no term of size 1/t cancels; with one positive the old form lost 1e-4 relative)."""
    x, y = _near_convergence_batch(classes, per_class, spread=spread)
    truth = pml_losses.SupConLoss(temperature=temperature)(x, y).item()
    pml_err = abs(pml_losses.SupConLoss(temperature=temperature)(x.float(), y).item() - truth) / truth
    ours = our_losses.SupConLoss(temperature=temperature)
    our_err = abs(ours(x.float(), y).item() - truth) / truth
    assert ours.last_backend not in ("reference", "zero")
    assert our_err <= max(2 * pml_err, 2e-7), (our_err, pml_err)
    # per row too (no reduction): the worst row's error
    rows64 = our_losses.SupConLoss(temperature=temperature, reducer=_no_reduction())(x, y)["loss"]["losses"]
    rows32 = our_losses.SupConLoss(temperature=temperature, reducer=_no_reduction())(x.float(), y)["loss"]["losses"]
    assert ((rows32.double() - rows64).abs() / rows64.abs()).max() < 1e-4


def _no_reduction():
    from dmlkern.reducers import DoNothingReducer
    return DoNothingReducer()


@pytest.mark.parametrize("name,dtype", [("SNRDistance", torch.float32), ("SNRDistance", torch.float64),
                                        ("LpDistance", torch.float16), ("LpDistance", torch.float32),
                                        ("CosineSimilarity", torch.float32)])
def test_distance_of_an_empty_query_batch_is_in_the_graph(name, dtype):
    """An empty query batch: PML's (0, R) matrix takes part in autograd (zero gradients for the
    reference rows); a detached zeros tensor would make backward raise."""
    import pytorch_metric_learning.distances as pml_distances

    import dmlkern.distances as our_distances
    grads = []
    for lib in (our_distances, pml_distances):
        q = torch.zeros(0, 4, dtype=dtype, requires_grad=True)
        r = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_(True)
        mat = getattr(lib, name)()(q, r)
        assert mat.shape == (0, 3) and mat.dtype == dtype
        mat.sum().backward()
        grads.append(r.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "SupConLoss", "ContrastiveLoss", "NTXentLoss",
                                  "LiftedStructureLoss"])
def test_label_values_far_apart_compare_as_equal_or_not(name):
    """The C++ kernels compare labels as int32 codes in [0, N + M) (csrc/cpu/engine_cpu.h,
    label_codes): label - min where the labels span fewer values than there are labels, their rank
    among the distinct labels up to 4096 labels, at::_unique2's codes past that. Shifted, negative,
    sparse, 2^32-spaced and 2^62-apart labels with the same classes give the very same bits as small
    ids, on the fused path, and PML's value; at 2100 rows (4200 labels) the sparse ones too."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(70, 12, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 9, (70,), generator=g)
    results = []
    # (ids * 2^32: int32 casts of label - min would make every class one)
    for labels in (ids, ids + 5_000_000_000, ids - 7, ids * 1000 + 3, ids * 2**32, ids * 2**59 - 2**62):
        loss_fn = getattr(our_losses, name)()
        xg = x.clone().requires_grad_(True)
        value = loss_fn(xg, labels)
        value.backward()
        assert loss_fn.last_backend not in ("reference", None), loss_fn.last_fallback
        results.append((value.detach(), xg.grad))
    for value, grad in results[1:]:
        assert torch.equal(value, results[0][0]) and torch.equal(grad, results[0][1])
    torch.testing.assert_close(results[0][0], getattr(pml_losses, name)()(x, ids), rtol=1e-9, atol=1e-12)
    if name == "MultiSimilarityLoss":  # past 4096 labels: the sparse ones through at::_unique2
        x = torch.randn(2100, 12, generator=g, dtype=torch.float64, requires_grad=True)
        ids = torch.randint(0, 300, (2100,), generator=g)
        loss_fn = our_losses.MultiSimilarityLoss()
        small, sparse = (torch.autograd.grad(loss_fn(x, labels), x)[0] for labels in (ids, ids * 1000))
        assert loss_fn.last_backend not in ("reference", None) and torch.equal(small, sparse)
