"""dmlkern.regularizers against PML 2.9.0's: alone (values, gradients, reducers, statistics,
errors) and inside dmlkern's losses as embedding_regularizer / weight_regularizer, where PML adds
the sub-losses embedding_reg_loss / weight_reg_loss."""
import copy
import pickle

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers

from dmlkern import distances, losses, reducers, regularizers
from dmlkern.utils import common_functions

from _pml_helpers import assert_close, make_inputs

# id -> (class, kwargs builder (distances module, reducers module) -> kwargs)
CASES = {
    "lp": ("LpRegularizer", lambda d, r: {}),
    "lp_p1_pow2": ("LpRegularizer", lambda d, r: dict(p=1, power=2)),
    "lp_sum": ("LpRegularizer", lambda d, r: dict(reducer=r.SumReducer())),
    "zero_mean": ("ZeroMeanRegularizer", lambda d, r: {}),
    "zero_mean_threshold": ("ZeroMeanRegularizer", lambda d, r: dict(reducer=r.ThresholdReducer(low=0.5))),
    "center_invariant": ("CenterInvariantRegularizer", lambda d, r: {}),
    "regular_face": ("RegularFaceRegularizer", lambda d, r: {}),
    "regular_face_dot": ("RegularFaceRegularizer", lambda d, r: dict(distance=d.DotProductSimilarity(normalize_embeddings=False))),
    "sparse_centers": ("SparseCentersRegularizer", lambda d, r: dict(num_classes=4, centers_per_class=3)),
}


def _pair(case):
    cls, kw = CASES[case]
    return (getattr(regularizers, cls)(**kw(distances, reducers)),
            getattr(pml_regularizers, cls)(**kw(pml_distances, pml_reducers)))


def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_regularizer_alone(case, dtype):
    ours, pml = _pair(case)
    x = make_inputs(1, 12, 6, 2, dtype)[0]
    (v_o, g_o), (v_p, g_p) = _value_and_grad(ours, x), _value_and_grad(pml, x)
    assert_close(v_o, v_p, dtype)
    assert_close(g_o, g_p, dtype, "gradient")


def test_sparse_centers_statistics_and_recordable_attributes():
    ours = regularizers.SparseCentersRegularizer(3, 2, collect_stats=True)
    pml = pml_regularizers.SparseCentersRegularizer(3, 2, collect_stats=True)
    x = make_inputs(2, 6, 5, 2, torch.float64)[0]
    ours(x), pml(x)
    for attr in ("same_class_center_sim", "diff_class_center_sim"):
        assert getattr(ours, attr) == pytest.approx(getattr(pml, attr), rel=1e-12)
    assert ours._record_these == pml._record_these
    assert (ours.num_classes, ours.centers_per_class) == (pml.num_classes, pml.centers_per_class) == (0, 0)  # PML's
    assert torch.equal(ours.same_class_mask, pml.same_class_mask)
    assert torch.equal(ours.diff_class_mask, pml.diff_class_mask)


def test_collect_stats_switch_reaches_regularizers():
    old = common_functions.COLLECT_STATS
    try:
        common_functions.COLLECT_STATS = True
        assert regularizers.LpRegularizer().collect_stats and regularizers.LpRegularizer().reducer.collect_stats
    finally:
        common_functions.COLLECT_STATS = old
    assert not regularizers.LpRegularizer().collect_stats


@pytest.mark.parametrize("make", [
    lambda lib, d: lib.CenterInvariantRegularizer(distance=d.CosineSimilarity()),
    lambda lib, d: lib.RegularFaceRegularizer(distance=d.LpDistance()),
    lambda lib, d: lib.SparseCentersRegularizer(3, 1),
    lambda lib, d: lib.SparseCentersRegularizer(3, 2, distance=d.LpDistance()),
])
def test_distance_requirements_raise_as_pml(make):
    for lib, d in ((regularizers, distances), (pml_regularizers, pml_distances)):
        with pytest.raises(AssertionError):
            make(lib, d)


@pytest.mark.parametrize("case", ["lp", "sparse_centers"])
def test_pickle_and_deepcopy(case):
    reg, _ = _pair(case)
    x = make_inputs(3, 12, 6, 2, torch.float32)[0]
    for clone in (pickle.loads(pickle.dumps(reg)), copy.deepcopy(reg)):
        assert_close(clone(x), reg(x), torch.float32)


# ----------------------------------------------------------------------------- inside the losses
# (loss, constructor kwargs, regularizer case for embeddings, for weights, reg weights)
IN_LOSSES = [
    ("MultiSimilarityLoss", {}, "lp", None),  # a fused loss
    ("ContrastiveLoss", {}, "zero_mean", None),  # two sub-losses + the regularizer's
    ("FastAPLoss", {}, "lp_p1_pow2", None),  # a reference loss from this issue
    ("ArcFaceLoss", dict(num_classes=4, embedding_size=6), None, "regular_face"),
    ("SoftTripleLoss", dict(num_classes=4, embedding_size=6, centers_per_class=3), None, "sparse_centers"),
    ("ProxyAnchorLoss", dict(num_classes=4, embedding_size=6), "lp", "center_invariant"),
    ("NormalizedSoftmaxLoss", dict(num_classes=4, embedding_size=6), "zero_mean", "lp"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kw,emb_reg,w_reg", IN_LOSSES, ids=[c[0] for c in IN_LOSSES])
def test_regularizers_in_losses(name, kw, emb_reg, w_reg, dtype):
    built = []
    for lib, pick in ((losses, 0), (pml_losses, 1)):
        args = dict(kw)
        if emb_reg:
            args.update(embedding_regularizer=_pair(emb_reg)[pick], embedding_reg_weight=0.3)
        if w_reg:
            args.update(weight_regularizer=_pair(w_reg)[pick], weight_reg_weight=0.7)
        torch.manual_seed(0)
        built.append(getattr(lib, name)(**args))
    ours, pml = built
    assert ours.sub_loss_names() == pml.sub_loss_names()
    x, labels, _, _ = make_inputs(4, 16, 6, 4, dtype)
    results = []
    for loss in (ours, pml):
        loss.to(dtype)
        e = x.clone().requires_grad_(True)
        value = loss(e, labels)
        params = [e] + list(loss.parameters())
        results.append((value.detach(), torch.autograd.grad(value, params)))
    assert_close(results[0][0], results[1][0], dtype)
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, dtype, "gradient")


def test_reg_sub_losses_in_the_loss_dict():
    """With DoNothingReducer both return the same dict, the *_reg_loss entries included."""
    torch.manual_seed(0)
    ours = losses.ProxyAnchorLoss(4, 6, embedding_regularizer=regularizers.LpRegularizer(),
                                  weight_regularizer=regularizers.ZeroMeanRegularizer(), weight_reg_weight=0.5,
                                  reducer=reducers.DoNothingReducer())
    torch.manual_seed(0)
    pml = pml_losses.ProxyAnchorLoss(4, 6, embedding_regularizer=pml_regularizers.LpRegularizer(),
                                     weight_regularizer=pml_regularizers.ZeroMeanRegularizer(), weight_reg_weight=0.5,
                                     reducer=pml_reducers.DoNothingReducer())
    x, labels, _, _ = make_inputs(5, 10, 6, 4, torch.float32)
    d_ours, d_pml = ours(x, labels), pml(x, labels)
    assert set(d_ours) == set(d_pml) == {"pos_loss", "neg_loss", "weight_reg_loss", "embedding_reg_loss"}
    for k in ("weight_reg_loss", "embedding_reg_loss"):
        assert d_ours[k]["reduction_type"] == d_pml[k]["reduction_type"] == "already_reduced"
        assert_close(d_ours[k]["losses"].detach(), d_pml[k]["losses"].detach(), torch.float32, k)
    assert ours._record_these == pml._record_these  # embedding_reg_weight / weight_reg_weight recorded
