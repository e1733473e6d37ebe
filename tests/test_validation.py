"""Bad inputs raise a clear ValueError/TypeError naming the argument; PML's ValueErrors are kept."""
import pytest
import pytorch_metric_learning.losses as pml_losses
import torch

import dmlkern.losses as our_losses
from _pml_helpers import EMBEDDING_LOSSES, LOSS_NAMES, functional_fn, reference_fn
from dmlkern._validation import InvalidInputError, prepare_inputs, validate_inputs

B, D = 6, 4


def _emb(n=B, d=D, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype, generator=torch.Generator().manual_seed(0))


def _labels(n=B):
    return torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0][:n])


def _pairs():
    return (torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 1]), torch.tensor([2, 4]))


# (case id, kwargs builder, error type, argument named in the message)
BAD_INPUTS = [
    ("emb_1d", lambda: dict(embeddings=torch.randn(B), labels=_labels()), ValueError, "embeddings"),
    ("emb_3d", lambda: dict(embeddings=torch.randn(B, D, 2), labels=_labels()), ValueError, "embeddings"),
    ("emb_int", lambda: dict(embeddings=torch.ones(B, D, dtype=torch.long), labels=_labels()), TypeError, "embeddings"),
    ("emb_not_tensor", lambda: dict(embeddings=[[0.0] * D] * B, labels=_labels()), TypeError, "embeddings"),
    ("labels_2d", lambda: dict(embeddings=_emb(), labels=_labels().view(B, 1)), ValueError, "labels"),
    ("labels_short", lambda: dict(embeddings=_emb(), labels=_labels()[:-1]), ValueError, "labels"),
    # float / bool labels and empty batches are accepted as PML accepts them (test_pml_inputs.py)
    ("labels_complex", lambda: dict(embeddings=_emb(), labels=_labels().to(torch.complex64)), TypeError, "labels"),
    ("labels_nan", lambda: dict(embeddings=_emb(), labels=_labels().double().fill_(float("nan"))), ValueError,
     "labels"),
    ("ref_width", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5, D + 1),
                               ref_labels=_labels(5)), ValueError, "ref_emb"),
    ("ref_labels_len", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5),
                                    ref_labels=_labels(4)), ValueError, "ref_labels"),
    ("ref_labels_2d", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5),
                                   ref_labels=_labels(5).view(5, 1)), ValueError, "ref_labels"),
    ("ref_missing_labels", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5)),
     ValueError, "ref_labels"),
    ("ref_dtype", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5, dtype=torch.float64),
                               ref_labels=_labels(5)), TypeError, "ref_emb"),
    ("ref_device", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=torch.empty(5, D, device="meta"),
                                ref_labels=_labels(5)), ValueError, "ref_emb"),
    ("idx_out_of_range", lambda: dict(embeddings=_emb(), labels=_labels(),
                                      indices_tuple=(torch.tensor([0]), torch.tensor([B]), torch.tensor([1]))),
     ValueError, "indices_tuple"),
    ("idx_negative", lambda: dict(embeddings=_emb(), labels=_labels(),
                                  indices_tuple=(torch.tensor([-1, 0]), torch.tensor([1, 1]),
                                                 torch.tensor([0, 2]), torch.tensor([2, 3]))),
     ValueError, "indices_tuple"),
    ("idx_ref_range", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(3), ref_labels=_labels(3),
                                   indices_tuple=(torch.tensor([5]), torch.tensor([4]), torch.tensor([1]))),
     ValueError, "indices_tuple"),
    ("idx_float", lambda: dict(embeddings=_emb(), labels=_labels(),
                               indices_tuple=(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([2.0]))),
     TypeError, "indices_tuple"),
    ("idx_len2", lambda: dict(embeddings=_emb(), labels=_labels(), indices_tuple=(torch.tensor([0]), torch.tensor([1]))),
     ValueError, "indices_tuple"),
    ("idx_mismatched", lambda: dict(embeddings=_emb(), labels=_labels(),
                                    indices_tuple=(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 2]))),
     ValueError, "indices_tuple"),
    ("idx_2d", lambda: dict(embeddings=_emb(), labels=_labels(),
                            indices_tuple=(torch.tensor([[0]]), torch.tensor([[1]]), torch.tensor([[2]]))),
     ValueError, "indices_tuple"),
]


def _call(fn, kw):
    kw = dict(kw)
    emb = kw.pop("embeddings")
    labels = kw.pop("labels", None)
    return fn(emb, labels, **kw)


@pytest.mark.parametrize("case,build,err,arg", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bad_inputs_module(name, case, build, err, arg):
    kw = build()
    if name == "NPairsLoss" and "ref_emb" in kw:
        err, arg = ValueError, "ref_emb"  # NPairs rejects any ref_emb first, as PML does
    with pytest.raises(err, match=arg):
        _call(getattr(our_losses, name)(), kw)


@pytest.mark.parametrize("case,build,err,arg", BAD_INPUTS[::3], ids=[c[0] for c in BAD_INPUTS[::3]])
@pytest.mark.parametrize("api", ["reference", "functional"])
def test_bad_inputs_functions(api, case, build, err, arg):
    fn = reference_fn("MultiSimilarityLoss") if api == "reference" else functional_fn("MultiSimilarityLoss")
    with pytest.raises(err, match=arg):
        _call(fn, build())


# ------------------------------------------------------------------ PML's own ValueErrors, same conditions
PML_VALUE_ERRORS = [
    ("labels_short", lambda: dict(embeddings=_emb(), labels=_labels()[:-1])),
    ("labels_2d", lambda: dict(embeddings=_emb(), labels=_labels().view(B, 1))),
    ("ref_labels_len", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(5), ref_labels=_labels(4))),
    ("emb_1d", lambda: dict(embeddings=torch.randn(B), labels=None, indices_tuple=_pairs())),
]


@pytest.mark.parametrize("case,build", PML_VALUE_ERRORS, ids=[c[0] for c in PML_VALUE_ERRORS])
@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss", "NCALoss"])
def test_pml_value_errors_kept(name, case, build):
    kw = build()
    with pytest.raises(ValueError):
        _call(getattr(pml_losses, name)(), kw)
    with pytest.raises(ValueError):
        _call(getattr(our_losses, name)(), kw)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_missing_labels(name):
    labels_required = EMBEDDING_LOSSES[name][1]
    emb = _emb()
    for mod in (pml_losses, our_losses):
        with pytest.raises(ValueError):
            getattr(mod, name)()(emb)
    with pytest.raises(ValueError, match="labels"):
        getattr(our_losses, name)()(emb)
    if labels_required and name != "NCALoss":
        # indices_tuple alone is not enough for these
        for mod in (pml_losses, our_losses):
            with pytest.raises(ValueError):
                getattr(mod, name)()(emb, None, _pairs())


def test_nca_single_sample_without_labels_is_zero_like_pml():
    emb = torch.randn(1, 3, requires_grad=True)
    assert our_losses.NCALoss()(emb).item() == 0.0
    assert pml_losses.NCALoss()(emb).item() == 0.0


def test_pair_both_positive_and_negative_raises_like_pml():
    emb, labels = _emb(), _labels()
    it = (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 4]))
    with pytest.raises(AssertionError):
        pml_losses.MultiSimilarityLoss()(emb, labels, it)
    with pytest.raises(InvalidInputError, match="indices_tuple"):
        our_losses.MultiSimilarityLoss()(emb, labels, it)


# ------------------------------------------------------------------ validate_inputs / prepare_inputs directly
# (case id, kwargs builder, labels_required) of inputs accepted as PML accepts them (more label
# dtypes in test_pml_inputs.py).
GOOD_INPUTS = [
    ("labels", lambda: dict(embeddings=_emb(), labels=_labels()), True),
    ("pairs_without_labels", lambda: dict(embeddings=_emb(), labels=None, indices_tuple=_pairs()), False),
    ("triplet_with_ref", lambda: dict(embeddings=_emb(), labels=_labels(),
                                      indices_tuple=(torch.tensor([0]), torch.tensor([4]), torch.tensor([2])),
                                      ref_emb=_emb(5), ref_labels=_labels(5)), True),
    ("int32_labels", lambda: dict(embeddings=_emb(), labels=_labels().int()), None),
    ("float_labels", lambda: dict(embeddings=_emb(), labels=_labels().float()), True),
    ("bool_labels", lambda: dict(embeddings=_emb(), labels=_labels() > 0), True),
    ("empty_batch", lambda: dict(embeddings=_emb(0), labels=_labels(0)), True),
    ("empty_ref_emb", lambda: dict(embeddings=_emb(), labels=_labels(), ref_emb=_emb(0), ref_labels=_labels(0)),
     True),
]


@pytest.mark.parametrize("case,build,labels_required", GOOD_INPUTS, ids=[c[0] for c in GOOD_INPUTS])
@pytest.mark.parametrize("name", ["ContrastiveLoss", "TripletMarginLoss", "MultiSimilarityLoss"])
def test_validate_inputs_accepts_good_inputs(name, case, build, labels_required):
    """validate_inputs returns None (raises nothing) for inputs PML accepts, and the loss then
    returns PML's value on them."""
    kw = build()
    assert validate_inputs(kw["embeddings"], kw["labels"], kw.get("indices_tuple"), kw.get("ref_emb"),
                           kw.get("ref_labels"), labels_required=labels_required) is None
    ours = _call(getattr(our_losses, name)(), kw)
    theirs = _call(getattr(pml_losses, name)(), kw)
    assert isinstance(ours, torch.Tensor) and ours.shape == () and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs)


def test_prepare_inputs_maps_float_labels_to_ids_as_pml_compares_them():
    """ids equal exactly where PML's labels == ref_labels holds (promoted dtypes; 1.5 != 1.7;
    True == 1); ordered as the values; one tensor keeps its identity."""
    emb = _emb()
    labels = torch.tensor([1.5, 1.7, 1.5, -0.0, 0.0, 3.0])
    _, y, _, _, ry = prepare_inputs(emb, labels, None, None, None, labels_required=True)
    assert y.dtype == torch.int64 and ry is y and y.tolist() == [1, 2, 1, 0, 0, 3]
    ref_labels = torch.tensor([3, 0, 2, 1, 1])
    _, y, _, _, ry = prepare_inputs(emb, labels, None, _emb(5), ref_labels, labels_required=True)
    assert torch.equal(y[:, None] == ry[None, :], labels[:, None] == ref_labels[None, :])
    _, y, _, _, ry = prepare_inputs(emb, _labels() > 0, None, _emb(5), ref_labels, labels_required=True)
    assert torch.equal(y[:, None] == ry[None, :], (_labels() > 0)[:, None] == ref_labels[None, :])


def test_validate_inputs_label_requirements():
    with pytest.raises(ValueError, match="labels"):
        validate_inputs(_emb(), None, _pairs(), None, None, labels_required=True)
    with pytest.raises(ValueError, match="labels"):
        validate_inputs(_emb(), None, None, None, None, labels_required=False)
    validate_inputs(_emb(), None, None, None, None, labels_required=None)


def test_prepare_inputs_keeps_pml_identities():
    emb, labels = _emb(), _labels()
    e, y, it, r, ry = prepare_inputs(emb, labels, None, None, None, labels_required=True)
    assert e is emb and y is labels and r is emb and ry is labels and it is None
    ref = _emb()
    _, y, _, r, ry = prepare_inputs(emb, labels, None, ref, None, labels_required=True)
    assert r is ref and ry is y  # ref_labels falls back to labels (PML's pair utilities do the same)
    # a given ref_labels without ref_emb is ignored, as in PML
    _, y, _, r, ry = prepare_inputs(emb, labels, None, None, _labels(), labels_required=True)
    assert r is emb and ry is y


def test_error_is_also_assertion_error_where_pml_asserts():
    assert issubclass(InvalidInputError, ValueError) and issubclass(InvalidInputError, AssertionError)


CLASS_WEIGHT_LOSSES = ["ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss", "NormalizedSoftmaxLoss",
                       "LargeMarginSoftmaxLoss", "ArcFaceLoss", "CosFaceLoss", "SphereFaceLoss",
                       "SubCenterArcFaceLoss", "SoftmaxLoss", "CenterLoss"]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", CLASS_WEIGHT_LOSSES)
def test_class_weight_losses_check_width_and_label_range(name, backend):
    """Losses with class weights (num_classes, embedding_size): embeddings of another width, and
    labels outside [0, num_classes), raise a ValueError naming the argument, on the fused path
    too (ProxyAnchor's kernels would otherwise count a label >= C as negative to every proxy),
    where PML fails deep inside or, for a negative label, silently uses the last class."""
    loss_fn = getattr(our_losses, name)(num_classes=4, embedding_size=D)
    loss_fn.backend = backend
    with pytest.raises(ValueError, match="embedding_size=4"):
        loss_fn(_emb(d=D + 1), _labels() % 4)
    for bad in (4, -1):
        labels = _labels() % 4
        labels[2] = bad
        with pytest.raises(ValueError, match=r"labels must be class ids in \[0, num_classes=4\)"):
            loss_fn(_emb(), labels)
    loss_fn(_emb(), _labels() % 4)  # in range: runs


def test_proxy_anchor_label_range_under_static_shapes(monkeypatch):
    """Under torch.compile the labels can't be read: ProxyAnchor's fused path returns NaN for a
    label outside [0, num_classes) instead of a wrong number (the static-shape path, run eagerly)."""
    from dmlkern import _tracing
    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    loss_fn = our_losses.ProxyAnchorLoss(4, D)
    labels = _labels() % 4
    assert torch.isfinite(loss_fn(_emb(), labels)) and loss_fn.last_backend == "cpp"
    labels[1] = 4
    assert torch.isnan(loss_fn(_emb(), labels)) and loss_fn.last_backend == "cpp"
