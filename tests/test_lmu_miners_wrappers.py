"""dmlkern.utils.loss_and_miner_utils (every public function of PML 2.9.0's lmu, same results),
common_functions' helpers, the miners UniformHistogramMiner and EmbeddingsAlreadyPackagedAsTriplets,
BatchedDistance and the wrappers MultipleLosses / SelfSupervisedLoss, against PML."""
import copy
import pickle

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.utils import common_functions as pml_cf
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu

from dmlkern import _api_table, distances, losses, miners
from dmlkern.utils import common_functions as cf
from dmlkern.utils import loss_and_miner_utils as lmu

from _pml_helpers import assert_close, make_inputs


def _same(a, b):
    """Equal results: tensors (values and dtype class), tuples / lists of them, or plain values."""
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.shape == b.shape and a.is_floating_point() == b.is_floating_point()
        assert torch.equal(a.to(b.dtype), b), (a, b)
    elif isinstance(b, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


LABELS = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2])
REF_LABELS = torch.tensor([1, 0, 2, 2, 3, 0])


def _calls():
    """name -> list of (args, kwargs) to call both libraries with."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) > 0.5
    mask[1] = False
    pairs = lmu.get_all_pairs_indices(LABELS)
    triplets = lmu.get_all_triplets_indices(LABELS)
    m, d = lmu.get_matches_and_diffs(LABELS)
    sub_pairs = tuple(t[::3] for t in pairs)
    batch_idx = torch.arange(7, 16) % 10  # the batch's queue slots, wrapping round a queue of 10
    return {
        "logsumexp": [((x,), {}), ((x,), dict(keep_mask=mask)), ((x,), dict(keep_mask=mask, add_one=False)),
                      ((x,), dict(keep_mask=mask, dim=0))],
        "meshgrid_from_sizes": [((x, x[:3]), {}), ((x, x[:3]), dict(dim=1))],
        "get_matches_and_diffs": [((LABELS,), {}), ((LABELS, LABELS), {}), ((LABELS, LABELS.clone()), {}),
                                  ((LABELS, REF_LABELS), {})],
        "get_all_pairs_indices": [((LABELS,), {}), ((LABELS, REF_LABELS), {})],
        "convert_to_pairs": [((None, LABELS), {}), ((triplets, LABELS), {}), ((pairs, LABELS), {}),
                             ((None, LABELS, REF_LABELS), {})],
        "convert_to_pos_pairs_with_unique_labels": [((None, LABELS), {}), ((sub_pairs, LABELS), {}),
                                                    ((sub_pairs, LABELS * 0.5 - 1.25), {})],  # float labels
        "pos_pairs_from_tuple": [((pairs,), {})],
        "neg_pairs_from_tuple": [((pairs,), {})],
        "get_all_triplets_indices": [((LABELS,), {}), ((LABELS, REF_LABELS), {})],
        "get_all_triplets_indices_vectorized_method": [((m, d), {})],
        "get_all_triplets_indices_loop_method": [((LABELS, m, d), {})],
        "get_random_triplet_indices": [((LABELS,), {}), ((LABELS,), dict(t_per_anchor=3)),
                                       ((LABELS, REF_LABELS), dict(t_per_anchor=2)),
                                       ((LABELS,), dict(weights=torch.rand(9, 9, generator=g)))],
        "repeat_to_match_size": [((torch.arange(3), 8, 3), {})],
        "matched_size_indices": [((torch.arange(3), torch.arange(7)), {}), ((torch.arange(7), torch.arange(2)), {})],
        "convert_to_triplets": [((None, LABELS), dict(t_per_anchor="all")), ((None, LABELS), dict(t_per_anchor=2)),
                                ((sub_pairs, LABELS), {}), ((triplets, LABELS), {})],
        "convert_to_weights": [((None, LABELS, torch.float32), {}), ((sub_pairs, LABELS, torch.float64), {}),
                               ((triplets, LABELS, torch.float32), dict(using_ref=True))],
        "remove_self_comparisons": [((tuple(t[:20] for t in triplets), batch_idx, 10), {}),
                                    ((sub_pairs, batch_idx, 10), {}),
                                    ((sub_pairs, batch_idx, 10), dict(ref_is_subset=True))],
        "not_self_comparisons": [((pairs[0], pairs[1] % 10, batch_idx[0], batch_idx[-1], batch_idx, 10), {})],
        "get_anchors": [((pairs,), {}), ((triplets,), {})],
    }


def test_every_lmu_function_is_tested():
    assert set(_calls()) == set(_api_table.pml_public_names("utils.loss_and_miner_utils"))


@pytest.mark.parametrize("name", sorted(_calls()))
def test_lmu_function_as_pml(name):
    for args, kwargs in _calls()[name]:
        torch.manual_seed(1)
        want = getattr(pml_lmu, name)(*args, **kwargs)
        torch.manual_seed(1)
        got = getattr(lmu, name)(*args, **kwargs)
        _same(got, want)


@pytest.mark.parametrize("name", ["neg_inf", "pos_inf", "small_val"])
def test_dtype_constants(name):
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert getattr(cf, name)(dtype) == getattr(pml_cf, name)(dtype) == getattr(lmu, name)(dtype)


def test_torch_arange_from_size():
    x = torch.zeros(4, 3)
    _same(cf.torch_arange_from_size(x), pml_cf.torch_arange_from_size(x))
    _same(cf.torch_arange_from_size(x, 1), pml_cf.torch_arange_from_size(x, 1))


# ----------------------------------------------------------------------------- miners
@pytest.mark.parametrize("kw", [{}, dict(num_bins=5, pos_per_bin=3, neg_per_bin=2)])
@pytest.mark.parametrize("ref", [False, True])
def test_uniform_histogram_miner_same_draws(kw, ref):
    emb, labels, ref_emb, ref_labels = make_inputs(3, 30, 8, 4, torch.float32, ref_rows=12 if ref else None)
    out = []
    for lib in (miners, pml_miners):
        miner = lib.UniformHistogramMiner(**kw)
        torch.manual_seed(4)
        out.append(miner(emb, labels, ref_emb, ref_labels))
        out.append(miner.num_pos_pairs)
    _same(out[0], out[2])
    assert out[1] == out[3]


def test_miners_pickle_and_deepcopy():
    emb, labels, _, _ = make_inputs(5, 18, 8, 3, torch.float32)
    for miner in (miners.UniformHistogramMiner(num_bins=4), miners.EmbeddingsAlreadyPackagedAsTriplets()):
        for clone in (pickle.loads(pickle.dumps(miner)), copy.deepcopy(miner)):
            torch.manual_seed(0)
            want = miner(emb, labels)
            torch.manual_seed(0)
            _same(clone(emb, labels), want)


def test_uniform_histogram_miner_feeds_a_loss():
    emb, labels, _, _ = make_inputs(6, 24, 8, 4, torch.float32)
    torch.manual_seed(0)
    tup = miners.UniformHistogramMiner(num_bins=4, pos_per_bin=2, neg_per_bin=2)(emb, labels)
    got = losses.ContrastiveLoss()(emb, labels, tup)
    assert_close(got, pml_losses.ContrastiveLoss()(emb, labels, tup), torch.float32)


def test_embeddings_already_packaged_as_triplets():
    emb, labels = torch.randn(12, 4), torch.arange(12)
    want = pml_miners.EmbeddingsAlreadyPackagedAsTriplets()(emb, labels)
    _same(miners.EmbeddingsAlreadyPackagedAsTriplets()(emb, labels), want)
    _same(miners.EmbeddingsAlreadyPackagedAsTriplets()(emb, None), want)  # PML fails without labels
    with pytest.raises(Exception):  # a batch that is not whole triplets (PML: AssertionError)
        miners.EmbeddingsAlreadyPackagedAsTriplets()(torch.randn(7, 4), None)
    tup = miners.EmbeddingsAlreadyPackagedAsTriplets()(emb, None)
    assert_close(losses.TripletMarginLoss()(emb, None, tup), pml_losses.TripletMarginLoss()(emb, None, tup),
                 torch.float32)


# ----------------------------------------------------------------------------- BatchedDistance
@pytest.mark.parametrize("ref", [False, True])
def test_batched_distance(ref):
    q = torch.randn(10, 5)
    r = torch.randn(7, 5) if ref else None
    blocks = {}
    for name, lib in (("ours", distances), ("pml", pml_distances)):
        seen = []
        bd = lib.BatchedDistance(lib.CosineSimilarity(), lambda mat, s, e: seen.append((mat.clone(), s, e)), batch_size=4)
        assert bd(q, r) is None
        assert bd.is_inverted and bd.normalize_embeddings  # the wrapped distance's attributes
        blocks[name] = seen
    assert [(s, e) for _, s, e in blocks["ours"]] == [(s, e) for _, s, e in blocks["pml"]] == [(0, 4), (4, 8), (8, 12)]
    for (a, _, _), (b, _, _) in zip(blocks["ours"], blocks["pml"]):
        assert_close(a, b, torch.float32)


# ----------------------------------------------------------------------------- wrappers
def _value_and_grad(fn, x):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


@pytest.mark.parametrize("as_dict", [False, True])
def test_multiple_losses(as_dict):
    x, labels, _, _ = make_inputs(8, 20, 8, 4, torch.float64)
    results = []
    for L, M in ((losses, miners), (pml_losses, pml_miners)):
        parts = [L.MultiSimilarityLoss(), L.ContrastiveLoss(), L.FastAPLoss()]
        mins = [M.MultiSimilarityMiner(), None, M.UniformHistogramMiner(num_bins=3)]
        weights = [1.0, 0.5, 2.0]
        if as_dict:
            keys = ["ms", "c", "ap"]
            parts, weights = dict(zip(keys, parts)), dict(zip(keys, weights))
            mins = {"ms": mins[0], "ap": mins[2]}
        wrapper = L.MultipleLosses(parts, miners=mins, weights=weights)
        torch.manual_seed(2)
        results.append(_value_and_grad(lambda e: wrapper(e, labels), x))
    assert_close(results[0][0], results[1][0], torch.float64)
    assert_close(results[0][1], results[1][1], torch.float64, "gradient")


def test_multiple_losses_checks_and_copies():
    with pytest.raises(AssertionError):
        losses.MultipleLosses([losses.ContrastiveLoss()], weights=[1, 2])
    with pytest.raises(AssertionError):
        losses.MultipleLosses({"a": losses.ContrastiveLoss()}, weights={"b": 1})
    wrapper = losses.MultipleLosses([losses.ContrastiveLoss(), losses.IntraPairVarianceLoss()], weights=[1, 3])
    x, labels, _, _ = make_inputs(9, 12, 8, 3, torch.float32)
    for clone in (pickle.loads(pickle.dumps(wrapper)), copy.deepcopy(wrapper)):
        assert_close(clone(x, labels), wrapper(x, labels), torch.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["NTXentLoss", "IntraPairVarianceLoss", "SignalToNoiseRatioContrastiveLoss",
                                  "TripletMarginLoss"])
def test_self_supervised_loss(name, symmetric):
    x = make_inputs(10, 12, 8, 3, torch.float64)[0]
    ref = x.flip(0) * 0.5 + 0.1
    got = _value_and_grad(lambda e: losses.SelfSupervisedLoss(getattr(losses, name)(), symmetric=symmetric)(e, ref), x)
    want = _value_and_grad(
        lambda e: pml_losses.SelfSupervisedLoss(getattr(pml_losses, name)(), symmetric=symmetric)(e, ref), x)
    assert_close(got[0], want[0], torch.float64)
    assert_close(got[1], want[1], torch.float64, "gradient")


def test_self_supervised_loss_rejects_unsupported_losses():
    assert losses.SelfSupervisedLoss.supported_losses() == pml_losses.SelfSupervisedLoss.supported_losses()
    for lib in (losses, pml_losses):
        with pytest.raises(Exception, match="not supported for FastAPLoss"):
            lib.SelfSupervisedLoss(lib.FastAPLoss())
    with pytest.raises(NotImplementedError):
        losses.BaseLossWrapper(losses.NTXentLoss())
