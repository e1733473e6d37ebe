"""ClassShardedLoss (dmlkern/distributed/class_sharded.py) on gloo ranks against one process: the
unsharded dmlkern loss (and PML for ArcFace and ProxyNCA) on the concatenated batch, in fp64.
Contract checked: every rank returns the global loss; each rank's embeddings get world_size times
their slice of the single-process gradient; each rank's weight shard gets its slice of the full
weight's gradient; DDP's average of a model's gradients is the single-process gradient.
Uneven embedding shards (a rank with no rows too), uneven and default class splits, odd class
counts, a rank whose classes hold none of the batch's targets, one class per column block."""
import pytest
import torch

from _distributed import run_ranks, shard
from dmlkern import losses, reducers
from dmlkern.distributed.class_sharded import ClassShardedLoss
from dmlkern.fused import class_softmax
from dmlkern.triton import interpret_mode

D = 6
TOL = dict(rtol=1e-10, atol=1e-10)

# name: (class, constructor kwargs); kwargs built per call (a reducer is a stateful module)
LOSSES = {
    "arcface": (losses.ArcFaceLoss, lambda: dict(margin=28.6, scale=64)),
    "cosface": (losses.CosFaceLoss, lambda: dict(margin=0.35, scale=64)),
    "sphereface": (losses.SphereFaceLoss, lambda: dict(margin=4, scale=1)),
    "normalized_softmax": (losses.NormalizedSoftmaxLoss, lambda: dict(temperature=0.1)),
    "proxy_nca": (losses.ProxyNCALoss, lambda: dict(softmax_scale=3)),
    "subcenter_arcface": (losses.SubCenterArcFaceLoss, lambda: dict(margin=28.6, scale=16, sub_centers=3)),
    "subcenter_arcface_k1": (losses.SubCenterArcFaceLoss, lambda: dict(margin=28.6, scale=16, sub_centers=1)),
    # the reducer runs on the global per-sample losses (low=45 keeps 2 of the 6 of seed 40 below)
    "cosface_threshold": (losses.CosFaceLoss, lambda: dict(margin=0.35, scale=64,
                                                           reducer=reducers.ThresholdReducer(low=45))),
    # samples whose target probability is 0 in fp64 are left out (the fused ProxyNCA's rule)
    "proxy_nca_hot": (losses.ProxyNCALoss, lambda: dict(softmax_scale=400)),
}
PML = {"arcface": "ArcFaceLoss", "proxy_nca": "ProxyNCALoss"}  # PML imported in this process only (faster spawns)


def _make(name, num_classes, weight=None):
    cls, kwargs = LOSSES[name]
    loss = cls(num_classes=num_classes, embedding_size=D, **kwargs()).double()
    if weight is not None:
        _weight(loss).data = weight.clone()
    return loss


def _weight(loss):
    return loss.proxies if hasattr(loss, "proxies") else loss.W  # dmlkern's or PML's


def _weight_slice(name, full, c0, c1):
    """Classes c0 .. c1 - 1 of a full weight (or its gradient), sliced here, not by the code under test."""
    if LOSSES[name][0] is losses.ProxyNCALoss:
        return full[c0:c1]
    k = LOSSES[name][1]().get("sub_centers", 1)
    return full[:, c0 * k:c1 * k]


def _case(name, num_classes, sizes, ranges, seed, label_low=0, backend="auto"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), D, dtype=torch.float64, generator=g)
    labels = torch.randint(label_low, num_classes, (sum(sizes),), generator=g)
    weight = torch.randn(_weight(_make(name, num_classes)).shape, dtype=torch.float64, generator=g)
    return dict(name=name, num_classes=num_classes, sizes=sizes, ranges=ranges, x=x, labels=labels, weight=weight,
                backend=backend)


def _unsharded(case, pml=False):
    """Value and gradients of one process's loss on the concatenated batch."""
    if pml:
        from pytorch_metric_learning import losses as pml_losses
        pml_class = getattr(pml_losses, PML[case["name"]])
        loss = pml_class(num_classes=case["num_classes"], embedding_size=D, **LOSSES[case["name"]][1]()).double()
        _weight(loss).data = case["weight"].clone()
    else:
        loss = _make(case["name"], case["num_classes"], case["weight"])
    x = case["x"].clone().requires_grad_()
    value = loss(x, case["labels"])
    value.backward()
    return value.detach(), x.grad, _weight(loss).grad


def _sharded_runs(r, world, cases, one_class_per_block):
    if one_class_per_block:  # a fresh process: every shard walked in column blocks of one class
        class_softmax.MIN_BLOCK, class_softmax.BLOCK_BYTES, class_softmax.BLOCK_LOGITS = 1, 1, 1
    out = []
    for case in cases:
        cls, kwargs = LOSSES[case["name"]]
        ranges = case["ranges"]
        sharded = ClassShardedLoss(cls, case["num_classes"], D, class_range=None if ranges is None else ranges[r],
                                   **kwargs())
        sharded.loss.backend = case["backend"]
        sharded.load_from_full(_make(case["name"], case["num_classes"], case["weight"]))
        x = shard(case["x"], case["sizes"], r).clone().requires_grad_()
        value = sharded(x, shard(case["labels"], case["sizes"], r))
        value.backward()
        out.append((sharded.class_range, sharded.last_backend, value.detach(), x.grad, sharded.weight.grad))
    return out


def _check_runs(cases, results, expected_ranges):
    world = len(results)
    for i, case in enumerate(cases):
        ref_value, ref_gx, ref_gw = _unsharded(case)
        pml = _unsharded(case, pml=True) if case["name"] in PML else None
        for r in range(world):
            class_range, backend, value, gx, gw = results[r][i]
            assert class_range == expected_ranges[i][r], case["name"]
            want = {"auto": "cpp"}.get(case["backend"], case["backend"])
            if case["name"] == "subcenter_arcface" and want not in ("cpp", "triton"):
                want = "blocked"  # its grouped blocks' torch ops (kernels: the CPU's C++, Triton)
            assert backend == want, case["name"]
            torch.testing.assert_close(value, results[0][i][2], rtol=0, atol=0)  # the same bits on every rank
            torch.testing.assert_close(value, ref_value, **TOL)
            torch.testing.assert_close(gx, world * shard(ref_gx, case["sizes"], r), **TOL)
            torch.testing.assert_close(gw, _weight_slice(case["name"], ref_gw, *class_range), **TOL)
            if pml is not None:
                torch.testing.assert_close(value, pml[0], **TOL)
                torch.testing.assert_close(gx, world * shard(pml[1], case["sizes"], r), **TOL)
                torch.testing.assert_close(gw, _weight_slice(case["name"], pml[2], *class_range), **TOL)


SIX = ["arcface", "cosface", "sphereface", "normalized_softmax", "proxy_nca", "subcenter_arcface"]


def test_three_ranks_uneven_shards_match_one_process():
    sizes, uneven = [3, 5, 1], [(0, 1), (1, 5), (5, 7)]
    cases, expected = [], []
    for i, name in enumerate(SIX):
        # rank 0's one class is no sample's target; 7 classes split unevenly
        cases.append(_case(name, 7, sizes, uneven, seed=10 + i, label_low=1))
        expected.append(uneven)
        # the default split of 7 classes over 3 ranks
        cases.append(_case(name, 7, sizes, None, seed=20 + i))
        expected.append([(0, 2), (2, 4), (4, 7)])
    assert not (cases[0]["labels"] == 0).any()
    cases.append(_case("subcenter_arcface_k1", 7, sizes, None, seed=30))  # one sub-centre: the target's (N, 1) cosines
    zero_row = _case("sphereface", 7, sizes, None, seed=31)  # PML's gradient 0 for a zero row (|x| scales its logits)
    zero_row["x"][4] = 0
    cases.append(zero_row)
    expected += [[(0, 2), (2, 4), (4, 7)]] * 2
    _check_runs(cases, run_ranks(_sharded_runs, 3, cases, False), expected)


def _hot_proxy_nca_drops_some(case):
    """Independently of dmlkern: some but not all samples have target probability 0 in fp64."""
    x = torch.nn.functional.normalize(case["x"])
    p = torch.nn.functional.normalize(case["weight"])
    logits = -400 * torch.cdist(x, p) ** 2
    ce = torch.logsumexp(logits, dim=1) - logits[torch.arange(len(x)), case["labels"]]
    zero = torch.exp(-ce) == 0
    return bool(zero.any()) and not bool(zero.all())


def _two_rank_runs(r, world, cases, ddp_case, bad_range_case):
    out = {"runs": _sharded_runs(r, world, cases, True)}
    # DDP's contract: the model's gradients averaged over the ranks are the single-process ones
    torch.manual_seed(3)
    model = torch.nn.Linear(4, D).double()
    inputs, sizes = ddp_case["inputs"], ddp_case["sizes"]
    cls, kwargs = LOSSES[ddp_case["name"]]
    sharded = ClassShardedLoss(cls, ddp_case["num_classes"], D, **kwargs())
    sharded.load_from_full(_make(ddp_case["name"], ddp_case["num_classes"], ddp_case["weight"]))
    sharded(model(shard(inputs, sizes, r)), shard(ddp_case["labels"], sizes, r)).backward()
    grads = []
    for p in model.parameters():
        torch.distributed.all_reduce(p.grad)
        grads.append(p.grad / world)
    out["ddp"] = grads
    # bad input on one rank raises the same ValueError on every rank (no rank left in a collective)
    labels = torch.tensor([0, 1, 2]) if r == 0 else torch.tensor([4, 5])
    try:
        sharded(torch.randn(len(labels), D, dtype=torch.float64), labels)
    except ValueError as e:
        out["bad_labels"] = str(e)
    try:
        ClassShardedLoss(cls, 5, D, class_range=bad_range_case[r], **kwargs())(
            torch.randn(2, D, dtype=torch.float64), torch.tensor([0, 1]))
    except ValueError as e:
        out["bad_ranges"] = str(e)
    return out


def test_two_ranks_blocks_reducers_ddp_and_errors():
    sizes = [4, 2]
    cases = [_case(name, 5, sizes, None, seed=30 + i) for i, name in enumerate(SIX)]
    cases += [_case("cosface_threshold", 5, sizes, None, seed=40),
              _case("arcface", 5, [6, 0], [(0, 3), (3, 5)], seed=41),  # rank 1: no rows
              _case("proxy_nca_hot", 9, [7, 5], [(0, 4), (4, 9)], seed=42),
              _case("sphereface", 5, sizes, None, seed=43, backend="reference")]  # fp16 / bf16 on a CPU
    if interpret_mode() and not torch.cuda.is_available():
        cases.append(_case("arcface", 5, sizes, None, seed=44, backend="triton"))
    assert _hot_proxy_nca_drops_some(cases[8])
    expected = [[(0, 2), (2, 5)]] * 7 + [[(0, 3), (3, 5)], [(0, 4), (4, 9)]] + [[(0, 2), (2, 5)]] * 2
    ddp_case = _case("normalized_softmax", 5, [5, 3], None, seed=50)
    ddp_case["inputs"] = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(51))
    results = run_ranks(_two_rank_runs, 2, cases, ddp_case, [(0, 2), (3, 5)], triton_interpreter=interpret_mode())
    _check_runs(cases, [out["runs"] for out in results], expected)
    torch.manual_seed(3)
    model = torch.nn.Linear(4, D).double()
    _make("normalized_softmax", 5, ddp_case["weight"])(model(ddp_case["inputs"]), ddp_case["labels"]).backward()
    for r, out in enumerate(results):
        for got, p in zip(out["ddp"], model.parameters()):
            torch.testing.assert_close(got, p.grad, **TOL)
        assert "labels" in out["bad_labels"] and "from 4 to 5 on rank 1" in out["bad_labels"], out
        assert "class_range" in out["bad_ranges"], out


@pytest.mark.parametrize("name", SIX)
def test_one_process_equals_the_plain_loss(name):
    """Without torch.distributed: no collective, the shard is every class."""
    case = _case(name, 5, [7], None, seed=60)
    ref_value, ref_gx, ref_gw = _unsharded(case)
    sharded = ClassShardedLoss(LOSSES[name][0], 5, D, **LOSSES[name][1]())
    assert sharded.class_range == (0, 5)
    sharded.load_from_full(_make(name, 5, case["weight"]))
    x = case["x"].clone().requires_grad_()
    value = sharded(x, case["labels"])
    value.backward()
    torch.testing.assert_close(value.detach(), ref_value, **TOL)
    torch.testing.assert_close(x.grad, ref_gx, **TOL)
    torch.testing.assert_close(sharded.weight.grad, ref_gw, **TOL)


@pytest.mark.parametrize("reducer", ["mean", "avg_non_zero", "do_nothing"])
def test_proxy_nca_without_a_kept_sample_matches_the_plain_loss(reducer):
    """Every sample's probability 0 (each proxy opposite its samples): the plain loss's zero, and
    the proxies' gradient as the plain loss's (zeros with a mean, as PML's; None with AvgNonZero),
    PML's empty entry with DoNothingReducer."""
    x = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 1, 2])
    weight = -x[labels] + 0.3 * x[labels.roll(1)]
    make_reducer = {"mean": reducers.MeanReducer, "avg_non_zero": reducers.AvgNonZeroReducer,
                    "do_nothing": reducers.DoNothingReducer}[reducer]
    plain = losses.ProxyNCALoss(3, D, softmax_scale=1e4, reducer=make_reducer()).double()
    plain.proxies.data = weight.clone()
    sharded = ClassShardedLoss(losses.ProxyNCALoss, 3, D, softmax_scale=1e4, reducer=make_reducer())
    sharded.load_from_full(plain)
    for loss, w in ((plain, plain.proxies), (sharded, sharded.weight)):
        value = loss(x.clone().requires_grad_(), labels)
        if reducer == "do_nothing":  # PML's empty entry, as it is
            assert value["loss"]["reduction_type"] == "element" and value["loss"]["losses"].shape == (0,)
            continue
        value.backward()
        assert value.item() == 0.0
        if reducer == "mean":
            assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
        else:
            assert w.grad is None


def test_argument_errors():
    sharded = ClassShardedLoss(losses.ArcFaceLoss, 4, D)
    x = torch.randn(3, D)
    for bad in ([0, 4, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match="labels"):
            sharded(x, torch.tensor(bad))
    with pytest.raises(ValueError, match="labels"):
        sharded(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="embeddings"):
        sharded(torch.randn(3, D + 1), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class_range"):
        ClassShardedLoss(losses.ArcFaceLoss, 4, D, class_range=(2, 2))
    with pytest.raises(ValueError, match="class_range"):  # not distributed: the one shard must be every class
        ClassShardedLoss(losses.ArcFaceLoss, 4, D, class_range=(0, 2))(x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="loss_class"):
        ClassShardedLoss(losses.SoftTripleLoss, 4, D)
    with pytest.raises(ValueError, match="weight_regularizer"):
        ClassShardedLoss(losses.CosFaceLoss, 4, D, weight_regularizer=lambda w: w.sum())


def test_no_double_backward():
    sharded = ClassShardedLoss(losses.CosFaceLoss, 4, D)
    x = torch.randn(3, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        sharded(x, torch.tensor([0, 1, 3])).backward(create_graph=True)
