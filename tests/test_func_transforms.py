"""torch.func transforms through the fused losses: torch.func.grad and torch.func.vjp give
torch.autograd.grad's gradients (fp64), and the fused engine runs them, forward and backward
(no fall-back to the reference). Parameters (ProxyAnchor's proxies) enter through
torch.func.functional_call."""
import pytest
import torch

from dmlkern import miners
from dmlkern.ops import pair_engine as pe
from dmlkern import losses
from dmlkern.reducers import SumReducer
from test_fused_losses import LOSSES as FUSED_LOSSES, NO_REF_EMB

# + Lifted with a per-pair reducer: its fused path lists the positive pairs (pair_lists.PairDots)
LOSSES = dict(FUSED_LOSSES, lifted_pair_list=lambda c, d: losses.LiftedStructureLoss(
    neg_margin=1.1, pos_margin=0.05, reducer=SumReducer()))
CASES = [(name, with_ref) for name in LOSSES for with_ref in (False, True)
         if not (with_ref and name in NO_REF_EMB | {"lifted_pair_list"})]
TOL = dict(rtol=1e-10, atol=1e-12)


def _setup(name, with_ref):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (14,), generator=g)
    ref = ref_labels = None
    if with_ref:
        ref = torch.randn(9, 6, generator=g, dtype=torch.float64)
        ref_labels = torch.randint(0, 3, (9,), generator=g)
    torch.manual_seed(0)
    loss_fn = LOSSES[name](3, 6).double()
    params = {k: v.detach().clone() for k, v in loss_fn.named_parameters()}

    def loss(x, ref, params):
        mined = (miners.MultiSimilarityMiner(epsilon=0.1)(x, labels, ref, ref_labels)
                 if name == "multi_similarity_miner" else None)
        return torch.func.functional_call(loss_fn, params, (x, labels, mined, ref, ref_labels))

    return loss_fn, loss, (x, ref, params)


def _autograd(loss, x, ref, params):
    leaves = (x.clone().requires_grad_(True), None if ref is None else ref.clone().requires_grad_(True),
              {k: v.clone().requires_grad_(True) for k, v in params.items()})
    value = loss(*leaves)
    flat = [leaves[0]] + ([] if ref is None else [leaves[1]]) + list(leaves[2].values())
    return value.detach(), torch.autograd.grad(value, flat)


def _primals(loss, x, ref, params):
    """The function of tensors only and its primals: (x, params), or (x, ref, params)."""
    if ref is None:
        return (lambda x, p: loss(x, None, p)), (x, params)
    return loss, (x, ref, params)


def _flat(grads):
    return list(grads[:-1]) + list(grads[-1].values())


@pytest.fixture
def no_reference_gradient(monkeypatch):
    """The fused backward must run: the differentiable reference gradient (create_graph=True's
    path) fails the test if called."""
    def fail(*args, **kwargs):
        raise AssertionError("the backward fell back to the reference gradient")
    monkeypatch.setattr(pe, "reference_gradient", fail)


@pytest.mark.parametrize("name,with_ref", CASES, ids=[f"{n}{'-ref' if r else ''}" for n, r in CASES])
def test_grad_and_vjp_equal_autograd(name, with_ref, no_reference_gradient):
    loss_fn, loss, (x, ref, params) = _setup(name, with_ref)
    want_value, want = _autograd(loss, x, ref, params)
    assert loss_fn.last_backend == "cpp", loss_fn.last_backend

    f, primals = _primals(loss, x, ref, params)
    loss_fn.last_backend = None
    got = _flat(torch.func.grad(f, argnums=tuple(range(len(primals))))(*primals))
    assert loss_fn.last_backend == "cpp", f"torch.func.grad ran {loss_fn.last_backend}"
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)

    loss_fn.last_backend = None
    value, vjp_fn = torch.func.vjp(f, *primals)
    got = _flat(vjp_fn(torch.ones((), dtype=torch.float64)))
    assert loss_fn.last_backend == "cpp", f"torch.func.vjp ran {loss_fn.last_backend}"
    torch.testing.assert_close(value, want_value, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["multi_similarity", "ntxent", "lifted", "proxy_anchor"])
def test_second_order_grad_of_grad_equals_autograd(name):
    """torch.func.grad of torch.func.grad needs a differentiable first gradient: the inner
    backward takes the reference's (create_graph=True's path), as plain double backward does."""
    loss_fn, loss, (x, ref, params) = _setup(name, False)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def directional(x):  # <grad_x loss, v>
        return (torch.func.grad(lambda x: loss(x, None, params))(x) * v).sum()

    got = torch.func.grad(directional)(x)
    xx = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(loss(xx, None, params), xx, create_graph=True)
    (want,) = torch.autograd.grad((gx * v).sum(), xx)
    torch.testing.assert_close(got, want, **TOL)


def test_grad_through_outer_autograd_keeps_the_graph():
    """torch.func.grad on inputs that require grad outside the transform: its result must stay
    differentiable by plain autograd (the backward records its graph there)."""
    loss_fn, loss, (x, ref, params) = _setup("multi_similarity", False)
    xx = x.clone().requires_grad_(True)
    gx = torch.func.grad(lambda x: loss(x, None, params))(xx)
    assert gx.requires_grad
    (got,) = torch.autograd.grad(gx.sum(), xx)
    xx2 = x.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(loss(xx2, None, params), xx2, create_graph=True)
    (want,) = torch.autograd.grad(g2.sum(), xx2)
    torch.testing.assert_close(got, want, **TOL)


def _tangents(primals):
    g = torch.Generator().manual_seed(2)
    return tuple({k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in p.items()}
                 if isinstance(p, dict) else torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals)


def _forward_ad_unsupported_by_torch(error):
    """torch's own ops without a forward derivative (torch.cdist, which PML's LpDistance calls
    too): the reference path raises the same NotImplementedError as PML."""
    text = str(error)
    return isinstance(error, NotImplementedError) and "forward AD" in text and ("cdist" in text or "euclidean" in text)


@pytest.mark.parametrize("name,with_ref", CASES, ids=[f"{n}{'-ref' if r else ''}" for n, r in CASES])
def test_forward_mode_ad_takes_the_reference_and_gives_the_directional_derivative(name, with_ref):
    """torch.func.jvp and forward_ad.dual_level: the fused kernels have no jvp, so the call takes
    the reference (last_fallback says why) and its tangent is <gradient, tangent> from autograd,
    never a dropped (zero) tangent or the engine's NotImplementedError."""
    loss_fn, loss, (x, ref, params) = _setup(name, with_ref)
    want_value, grads = _autograd(loss, x, ref, params)
    f, primals = _primals(loss, x, ref, params)
    tangents = _tangents(primals)
    want = sum((g * t).sum() for g, t in zip(grads, _flat(tangents)))
    try:
        value, got = torch.func.jvp(f, primals, tangents)
    except NotImplementedError as error:
        assert _forward_ad_unsupported_by_torch(error), error
        return
    assert loss_fn.last_backend == "reference", loss_fn.last_backend
    assert "forward-mode AD" in loss_fn.last_fallback, loss_fn.last_fallback
    torch.testing.assert_close(value, want_value, **TOL)
    torch.testing.assert_close(got, want, **TOL)

    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangents[0])
        out = loss(dual, ref, params)
        got_x = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(got_x, (grads[0] * tangents[0]).sum(), **TOL)


MINER_CASES = ["MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "BatchHardMiner", "BatchEasyHardMiner",
               "AngularMiner", "HDCMiner", "DistanceWeightedMiner", "UniformHistogramMiner"]


@pytest.mark.parametrize("name", MINER_CASES)
def test_miners_under_forward_mode_ad_mine_the_same_indices(name):
    """Mining gives indices: under torch.func.jvp a miner returns the eager call's (the blocked
    miners' products into buffers take no tangents; PML's Euclidean miners raise there, in cdist),
    and a cosine loss on them gets autograd's directional derivative."""
    from dmlkern.distances import CosineSimilarity
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    miner = getattr(miners, name)()
    torch.manual_seed(5)
    want = miner(x, labels)
    loss_fn = (losses.TripletMarginLoss if len(want) == 3 else losses.ContrastiveLoss)(distance=CosineSimilarity())
    mined = []

    def f(z):
        mined.append(miner(z, labels))
        return loss_fn(z, labels, mined[-1])

    torch.manual_seed(5)
    _, got = torch.func.jvp(f, (x,), (tangent,))
    tuple_got = mined[0].materialize() if hasattr(mined[0], "materialize") else mined[0]
    assert len(tuple_got) == len(want) and all(torch.equal(a, b) for a, b in zip(tuple_got, want))
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(xx, labels, want), xx)
    torch.testing.assert_close(got, (grad * tangent).sum(), **TOL)


@pytest.mark.parametrize("name", [n for n, with_ref in CASES if not with_ref])
def test_jacrev_and_jacfwd_give_the_gradient(name):
    """The Jacobian of a scalar loss is its gradient: jacrev through the fused vjp, jacfwd through
    the reference's jvp (or torch's cdist error with an LpDistance, as PML)."""
    loss_fn, loss, (x, ref, params) = _setup(name, False)
    _, grads = _autograd(loss, x, ref, params)
    torch.testing.assert_close(torch.func.jacrev(lambda z: loss(z, None, params))(x), grads[0], **TOL)
    try:
        got = torch.func.jacfwd(lambda z: loss(z, None, params))(x)
    except NotImplementedError as error:
        assert _forward_ad_unsupported_by_torch(error), error
        return
    torch.testing.assert_close(got, grads[0], **TOL)
