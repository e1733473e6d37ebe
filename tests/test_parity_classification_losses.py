"""Proxy / classification losses vs pytorch-metric-learning 2.9.0 (values and gradients with
the same initial weights), plus hand-written checks of CenterLoss and SoftmaxLoss."""
import math

import numpy as np
import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch

import dmlkern.distances as our_distances
import dmlkern.losses as our_losses
from dmlkern.functional import classification as F_cls

from _batches import SHAPES, batch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# name -> (weight attribute, constructor kwargs variants)
LOSSES = {
    "ProxyNCALoss": ("proxies", [{}, dict(softmax_scale=4)]),
    "ProxyAnchorLoss": ("proxies", [{}, dict(margin=0.3, alpha=8)]),
    "SoftTripleLoss": ("fc", [dict(centers_per_class=3), dict(centers_per_class=2, la=7, gamma=0.3, margin=0.2),
                              dict(centers_per_class=1)]),
    "LargeMarginSoftmaxLoss": ("W", [{}, dict(margin=3, scale=2)]),
    "SphereFaceLoss": ("W", [{}, dict(margin=2, scale=3)]),
    "CosFaceLoss": ("W", [{}, dict(margin=0.2, scale=10)]),
    "ArcFaceLoss": ("W", [{}, dict(margin=50, scale=8)]),
    "SubCenterArcFaceLoss": ("W", [dict(sub_centers=2), dict(sub_centers=3, margin=10, scale=5), dict(sub_centers=1)]),
    "NormalizedSoftmaxLoss": ("W", [{}, dict(temperature=0.5)]),
}
CASES = [(n, kw) for n, (_, kws) in LOSSES.items() for kw in kws]

# functional name and how constructor kwargs map onto it
FUNCTIONAL = {
    "ProxyNCALoss": "proxy_nca_loss",
    "ProxyAnchorLoss": "proxy_anchor_loss",
    "SoftTripleLoss": "soft_triple_loss",
    "LargeMarginSoftmaxLoss": "large_margin_softmax_loss",
    "SphereFaceLoss": "sphereface_loss",
    "CosFaceLoss": "cosface_loss",
    "ArcFaceLoss": "arcface_loss",
    "SubCenterArcFaceLoss": "subcenter_arcface_loss",
    "NormalizedSoftmaxLoss": "normalized_softmax_loss",
}

TOL = {torch.float64: dict(rtol=1e-5, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=1e-5)}


def pair_of_losses(name, C, D, kw, dtype=torch.float64, ours_kw=None, theirs_kw=None):
    theirs = getattr(pml_losses, name)(num_classes=C, embedding_size=D, **kw, **(theirs_kw or {}))
    ours = getattr(our_losses, name)(num_classes=C, embedding_size=D, **kw, **(ours_kw or {}))
    attr = LOSSES.get(name, ("W",))[0]
    w0 = getattr(theirs, attr).detach().to(dtype).clone()
    assert getattr(ours, attr).shape == w0.shape
    with torch.no_grad():
        getattr(theirs, attr).data = w0.clone()
        getattr(ours, attr).data = w0.clone()
    return ours, theirs, attr


def run(loss, attr, x, y, tup=None):
    xx = x.clone().requires_grad_()
    value = loss(xx, y, tup)
    value.backward()
    return value.detach(), xx.grad, getattr(loss, attr).grad


def compare(ours, theirs, attr, x, y, tup=None):
    vo, gxo, gwo = run(ours, attr, x, y, tup)
    vt, gxt, gwt = run(theirs, attr, x, y, tup)
    tol = TOL[x.dtype]
    assert vo.dtype == vt.dtype
    torch.testing.assert_close(vo, vt, **tol)
    torch.testing.assert_close(gxo, gxt, **tol)
    torch.testing.assert_close(gwo, gwt, **tol)
    return vo


def tuples_for(x, y):
    return {
        "none": None,
        "triplets": pml_miners.TripletMarginMiner(margin=0.3)(x, y),
        "pairs": pml_miners.MultiSimilarityMiner(epsilon=0.3)(x, y),
        "empty": tuple(torch.empty(0, dtype=torch.long) for _ in range(3)),
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_values_and_gradients_match_pml(case):
    name, kw = case
    nonzero = 0
    for seed, (B, D, C) in enumerate(SHAPES):
        for dtype in (torch.float64, torch.float32):
            x, y = batch(seed, B, D, C, dtype)
            for tkey, tup in tuples_for(x, y).items():
                if dtype == torch.float32 and tkey in ("pairs", "empty"):
                    continue
                torch.manual_seed(seed)
                # one more class than the labels use: a class without samples in the batch
                ours, theirs, attr = pair_of_losses(name, C + 1, D, kw, dtype)
                v = compare(ours, theirs, attr, x, y, tup)
                nonzero += bool(v != 0)
                # the functional form gives the same value for the same weight
                fkw = {k: v_ for k, v_ in kw.items()}
                if name in ("SoftTripleLoss", "SubCenterArcFaceLoss"):
                    fkw["num_classes"] = C + 1
                if name == "SoftTripleLoss":
                    fkw.setdefault("centers_per_class", 3)
                w = getattr(ours, attr).detach()
                fv = getattr(F_cls, FUNCTIONAL[name])(x, y, w, tup, **fkw)
                torch.testing.assert_close(fv, v, **TOL[dtype])
    assert nonzero > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_edge_batches(name):
    kw = dict(LOSSES[name][1][0])
    # single sample, single class, absent classes, all labels distinct (no positive pair)
    for y in ([2], [1, 1, 1, 1, 1], [0, 3, 3, 0, 1, 1, 0], [3, 0, 2, 1]):
        y = torch.tensor(y)
        x = torch.randn(len(y), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(len(y)))
        ours, theirs, attr = pair_of_losses(name, 4, 6, kw)
        compare(ours, theirs, attr, x, y)


@pytest.mark.parametrize("name", list(LOSSES))
def test_logits_and_default_init_match_pml(name):
    kw = dict(LOSSES[name][1][0])
    attr = LOSSES[name][0]
    torch.manual_seed(11)
    theirs = getattr(pml_losses, name)(num_classes=5, embedding_size=7, **kw)
    torch.manual_seed(11)
    ours = getattr(our_losses, name)(num_classes=5, embedding_size=7, **kw)
    # same seed -> the default weight init draws the same numbers as PML's
    torch.testing.assert_close(getattr(ours, attr).detach(), getattr(theirs, attr).detach(), rtol=0, atol=0)
    x, _ = batch(0, 9, 7, 5, torch.float32)
    torch.testing.assert_close(ours.get_logits(x), theirs.get_logits(x))


def test_attributes_like_pml():
    a, b = pml_losses.SoftTripleLoss(4, 5), our_losses.SoftTripleLoss(4, 5)
    assert (a.gamma, a.la, a.margin, a.centers_per_class) == (b.gamma, b.la, b.margin, b.centers_per_class)
    a, b = pml_losses.ArcFaceLoss(4, 5), our_losses.ArcFaceLoss(4, 5)
    assert a.margin == pytest.approx(b.margin) and a.scale == b.scale
    a, b = pml_losses.LargeMarginSoftmaxLoss(4, 5, margin=4.7), our_losses.LargeMarginSoftmaxLoss(4, 5, margin=4.7)
    assert a.margin == b.margin == 4 and a.max_n == b.max_n
    a = pml_losses.SubCenterArcFaceLoss(num_classes=4, embedding_size=5, sub_centers=3)
    b = our_losses.SubCenterArcFaceLoss(num_classes=4, embedding_size=5, sub_centers=3)
    assert a.W.shape == b.W.shape == (5, 12) and a.num_classes == b.num_classes == 4
    assert isinstance(our_losses.ArcFaceLoss(3, 4), our_losses.LargeMarginSoftmaxLoss)
    assert isinstance(our_losses.ProxyAnchorLoss(3, 4).proxies, torch.nn.Parameter)


def test_weight_regularizer_and_custom_distance():
    x, y = batch(1, 11, 6, 4)
    reg = lambda w: (w**2).sum() / w.shape[0]  # noqa: E731
    for name, extra_t, extra_o in [
        ("ProxyAnchorLoss", dict(weight_regularizer=reg, weight_reg_weight=0.3), dict(weight_regularizer=reg, weight_reg_weight=0.3)),
        ("SoftTripleLoss", dict(weight_regularizer=reg, centers_per_class=2), dict(weight_regularizer=reg, centers_per_class=2)),
        ("ProxyNCALoss", dict(distance=pml_distances.CosineSimilarity()), dict(distance=our_distances.CosineSimilarity())),
        ("ProxyAnchorLoss", dict(distance=pml_distances.LpDistance()), dict(distance=our_distances.LpDistance())),
        ("NormalizedSoftmaxLoss", dict(distance=pml_distances.LpDistance(power=2)), dict(distance=our_distances.LpDistance(power=2))),
    ]:
        ours, theirs, attr = pair_of_losses(name, 4, 6, {}, ours_kw=extra_o, theirs_kw=extra_t)
        compare(ours, theirs, attr, x, y)


@pytest.mark.parametrize("name", list(LOSSES))
def test_empty_batch_keeps_the_weight_regularizer(name):
    """An empty batch: PML's compute_loss still adds the weight regularizer's term, so its loss is
    that term (ProxyAnchor) or NaN (the others: a mean over no sample, plus the term). dmlkern gives
    the term in both cases (its empty-batch zero plus the term), and the weights PML's gradient."""
    reg = lambda w: (w**2).sum() / w.shape[0]  # noqa: E731
    kw = dict(LOSSES[name][1][0], weight_regularizer=reg, weight_reg_weight=0.3)
    ours, theirs, attr = pair_of_losses(name, 4, 6, kw)
    x, y = torch.empty(0, 6, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    vo, gxo, gwo = run(ours, attr, x, y)
    vt, gxt, gwt = run(theirs, attr, x, y)
    term = 0.3 * reg(getattr(ours, attr).detach().t() if attr in ("W", "fc") else getattr(ours, attr).detach())
    assert float(term) > 0
    torch.testing.assert_close(vo, term.to(vo.dtype), **TOL[torch.float64])
    if not torch.isnan(vt):
        torch.testing.assert_close(vo, vt, **TOL[torch.float64])
    torch.testing.assert_close(gwo, gwt, **TOL[torch.float64])
    assert gxo.shape == gxt.shape == x.shape
    # without a regularizer the weights still get PML's zero gradient (None would change an
    # optimizer's step: momentum and weight decay skip a parameter without a gradient)
    ours, theirs, attr = pair_of_losses(name, 4, 6, dict(LOSSES[name][1][0]))
    (vo, _, gwo), (vt, _, gwt) = run(ours, attr, x, y), run(theirs, attr, x, y)
    assert vo == 0 and gwt is not None and gwo is not None
    torch.testing.assert_close(gwo, gwt, **TOL[torch.float64])


def test_subcenter_get_outliers_like_pml():
    x, y = batch(2, 40, 5, 4)
    torch.manual_seed(0)
    theirs = pml_losses.SubCenterArcFaceLoss(num_classes=6, embedding_size=5, sub_centers=3)
    ours = our_losses.SubCenterArcFaceLoss(num_classes=6, embedding_size=5, sub_centers=3)
    ours.W.data = theirs.W.data.clone()
    for threshold in (40, 75):
        o_out, o_dom = ours.get_outliers(x, y, threshold=threshold)
        t_out, t_dom = theirs.get_outliers(x, y, threshold=threshold)
        assert o_out.tolist() == t_out.long().tolist()
        present = torch.unique(y)
        torch.testing.assert_close(o_dom[:, present], t_dom[:, present])
        assert len(o_out) > 0 or threshold == 75
    # PML returns the tuple even with return_dominant_centers=False
    assert len(ours.get_outliers(x, y, return_dominant_centers=False)) == 2


@pytest.mark.parametrize("name", list(LOSSES) + ["CenterLoss", "SoftmaxLoss"])
def test_bad_inputs_raise_value_error(name):
    x, y = batch(0, 6, 4, 3)
    kw = dict(LOSSES.get(name, (None, [{}]))[1][0])
    loss = getattr(our_losses, name)(num_classes=3, embedding_size=4, **kw)
    with pytest.raises(ValueError):
        loss(x, y, ref_emb=x.clone(), ref_labels=y)
    with pytest.raises(ValueError):
        loss(x)  # labels required
    with pytest.raises(ValueError):
        loss(x, y[:4])
    if name in LOSSES:
        pml = getattr(pml_losses, name)(num_classes=3, embedding_size=4, **kw)
        with pytest.raises(ValueError):
            pml(x, y, ref_emb=x.clone(), ref_labels=y)


def test_parameter_follows_embedding_dtype_like_pml():
    x, y = batch(0, 5, 4, 3, torch.float64)
    for cls in (our_losses.ProxyAnchorLoss, pml_losses.ProxyAnchorLoss):
        loss = cls(3, 4)
        assert loss.proxies.dtype == torch.float32
        loss(x, y)
        assert loss.proxies.dtype == torch.float64


# ----------------------------------------------------------------------------- CenterLoss / SoftmaxLoss
def test_center_loss_value_gradient_and_update_by_hand():
    C, D = 4, 3
    loss = our_losses.CenterLoss(num_classes=C, embedding_size=D, alpha=0.3)
    centers0 = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 0.5], [3.0, 3.0, -3.0]])
    loss.centers.copy_(torch.tensor(centers0))
    xs = np.array([[1.0, 0.0, 2.0], [0.0, 2.0, 1.0], [1.5, -1.0, 1.0], [-1.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    ys = [0, 1, 0, 2, 1]
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    value = loss(x, torch.tensor(ys))
    # expected value: mean of 0.5 * squared distances to the (pre-update) centers
    expected = sum(0.5 * sum((xs[i][k] - centers0[ys[i]][k]) ** 2 for k in range(D)) for i in range(5)) / 5
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value.backward()
    expected_grad = [[(xs[i][k] - centers0[ys[i]][k]) / 5 for k in range(D)] for i in range(5)]
    np.testing.assert_allclose(x.grad.numpy(), expected_grad, rtol=1e-6, atol=1e-7)
    # expected update: c_j - alpha * sum_{i in j}(c_j - x_i) / (1 + n_j); class 3 (absent) unchanged
    new = centers0.copy()
    for j in range(C):
        members = [i for i in range(5) if ys[i] == j]
        for k in range(D):
            delta = sum(centers0[j][k] - xs[i][k] for i in members) / (1 + len(members))
            new[j][k] = centers0[j][k] - 0.3 * delta
    np.testing.assert_allclose(loss.centers.numpy(), new, rtol=1e-6)
    # eval mode: no update
    loss.eval()
    loss(x.detach(), torch.tensor(ys))
    np.testing.assert_allclose(loss.centers.numpy(), new, rtol=1e-6)


def test_center_loss_converges_to_class_means_and_miner_weights():
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2] * 4)
    loss = our_losses.CenterLoss(num_classes=3, embedding_size=4, alpha=0.5)
    for _ in range(200):
        loss(x, y)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    torch.testing.assert_close(loss.centers, means)
    # with a triplet tuple, absent samples weigh 0 and the rest count/max_count
    loss.eval()
    tup = (torch.tensor([0, 0]), torch.tensor([3, 3]), torch.tensor([1, 2]))
    per = [0.5 * float(((x[i] - means[y[i]]) ** 2).sum()) for i in range(12)]
    w = {0: 1.0, 3: 1.0, 1: 0.5, 2: 0.5}
    expected = sum(per[i] * w.get(i, 0.0) for i in range(12)) / 12
    assert loss(x, y, tup).item() == pytest.approx(expected, rel=1e-9)


def test_softmax_loss_by_hand():
    loss = our_losses.SoftmaxLoss(num_classes=3, embedding_size=2)
    W = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0]])
    loss.W.data = torch.tensor(W)
    xs = np.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]])
    ys = [2, 0, 1]
    expected = 0.0
    for i in range(3):
        logits = [sum(xs[i][k] * W[k][c] for k in range(2)) for c in range(3)]
        expected += -logits[ys[i]] + math.log(sum(math.exp(v) for v in logits))
    expected /= 3
    x = torch.tensor(xs, requires_grad=True)
    value = loss(x, torch.tensor(ys))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    value.backward()
    # d/dx_i = (softmax(x_i W) - onehot(y_i)) W^T / B
    for i in range(3):
        logits = np.array([sum(xs[i][k] * W[k][c] for k in range(2)) for c in range(3)])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[ys[i]] -= 1
        np.testing.assert_allclose(x.grad[i].numpy(), W @ p / 3, rtol=1e-10)
    assert F_cls.softmax_loss(x.detach(), torch.tensor(ys), torch.tensor(W)).item() == pytest.approx(expected, rel=1e-12)


def test_proxy_nca_without_any_positive_gives_zero_not_nan():
    """Deviation from PML (NaN): every sample's positive probability underflows to 0 (its label is
    its farthest proxy, a large softmax_scale), so every row is dropped -> the grad-carrying zero.
    (Labels without a proxy raise: test_validation.)"""
    x, _ = batch(0, 5, 4, 3)
    ours = our_losses.ProxyNCALoss(num_classes=3, embedding_size=4, softmax_scale=1e4).double()
    theirs = pml_losses.ProxyNCALoss(num_classes=3, embedding_size=4, softmax_scale=1e4).double()
    theirs.proxies.data.copy_(ours.proxies.data)
    y = torch.cdist(torch.nn.functional.normalize(x), torch.nn.functional.normalize(ours.proxies.data)).argmax(dim=1)
    assert torch.isnan(theirs(x, y))
    xx = x.clone().requires_grad_()
    value = ours(xx, y)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(xx.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", ["LargeMarginSoftmaxLoss", "SphereFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss"])
def test_zero_embedding_row_matches_pml(name):
    """An all-zero embedding row: PML's logits scale the cosine (x / max(|x|, eps)) by |x| (L-Softmax,
    SphereFace), whose gradient at 0 is 0, so the row's whole gradient is 0; the fused path must
    not give the gradient of <x, w> (the same values) nor the NaN of a square root's gradient."""
    x, y = batch(5, 9, 6, 4, torch.float64)
    x[3] = 0
    ours, theirs, attr = pair_of_losses(name, 4, 6, {})
    compare(ours, theirs, attr, x, y)
    assert ours.last_backend not in (None, "reference"), ours.last_fallback
