"""dmlkern.functional runs the loss modules' dispatcher: every function gives its module's value
and gradients bit for bit, the fused losses take the fused engine (last_backend "cpp" on the
CPU) and allocate nothing N x N, and the generated signatures are the classes' keywords."""
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmlkern import functional, losses
from dmlkern.functional import _from_module
from dmlkern.functional import classification as F_cls
from dmlkern.functional import embedding as F_emb
from dmlkern.reducers import SumReducer

# function -> hyperparameters (not all defaults: the keywords must reach the module)
EMBEDDING = {
    "contrastive_loss": dict(pos_margin=0.1, neg_margin=0.8),
    "triplet_margin_loss": dict(margin=0.2),
    "margin_loss": dict(margin=0.1, beta=1.0),
    "multi_similarity_loss": dict(alpha=2, beta=10, base=0.4),
    "lifted_structure_loss": dict(neg_margin=1.1, pos_margin=0.05),
    "generalized_lifted_structure_loss": dict(neg_margin=0.9, pos_margin=0.1),
    "n_pairs_loss": dict(),
    "ntxent_loss": dict(temperature=0.2),
    "supcon_loss": dict(temperature=0.3),
    "tuplet_margin_loss": dict(margin=5.0, scale=32),
    "angular_loss": dict(alpha=35),
    "nca_loss": dict(softmax_scale=2),
    "circle_loss": dict(m=0.3, gamma=60),
}
# function -> (constructor keywords beyond the hyperparameters, function hyperparameters)
CLASSIFICATION = {
    "proxy_nca_loss": ({}, dict(softmax_scale=2)),
    "proxy_anchor_loss": ({}, dict(margin=0.2, alpha=16)),
    "soft_triple_loss": ({}, dict(num_classes=4, centers_per_class=3, la=10)),
    "large_margin_softmax_loss": ({}, dict(margin=3)),
    "sphereface_loss": ({}, dict(margin=3)),
    "cosface_loss": ({}, dict(margin=0.3, scale=32)),
    "arcface_loss": ({}, dict(margin=20.0, scale=32)),
    "subcenter_arcface_loss": ({}, dict(num_classes=4, sub_centers=2)),
    "normalized_softmax_loss": ({}, dict(temperature=0.1)),
    "center_loss": ({}, {}),
    "softmax_loss": ({}, {}),
}
FUSED = {"multi_similarity_loss", "lifted_structure_loss", "generalized_lifted_structure_loss", "n_pairs_loss",
         "ntxent_loss", "supcon_loss", "proxy_anchor_loss"}
WITH_REF = {"contrastive_loss", "triplet_margin_loss", "multi_similarity_loss", "generalized_lifted_structure_loss",
            "ntxent_loss", "supcon_loss", "circle_loss"}


def test_every_function_is_covered_and_all_is_kept():
    assert set(functional.__all__) == set(EMBEDDING) | set(CLASSIFICATION) | {"center_loss_update"}
    assert list(functional.__all__) == list(F_emb.__all__) + list(F_cls.__all__)


def _inputs(n=16, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    ref = torch.randn(11, d, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, classes, (11,), generator=g)
    return x, labels, ref, ref_labels


def _value_and_grads(call, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = call(*leaves)
    return value.detach(), torch.autograd.grad(value, leaves, allow_unused=True)


def _assert_identical(got, want, what):
    assert torch.equal(got[0], want[0]), f"{what}: value {got[0]} != {want[0]}"
    for a, b in zip(got[1], want[1]):
        assert (a is None and b is None) or torch.equal(a, b), f"{what}: gradient differs"


@pytest.mark.parametrize("name", list(EMBEDDING))
def test_embedding_function_equals_its_module(name):
    x, labels, ref, ref_labels = _inputs()
    fn, hyper = getattr(functional, name), EMBEDDING[name]
    module = fn.loss_class(**hyper)
    cases = [((x,), {})]
    if name in WITH_REF:
        cases.append(((x, ref), {"ref_labels": ref_labels}))
    for tensors, extra in cases:
        def by_module(*t):
            return module(t[0], labels, None, t[1] if len(t) > 1 else None, extra.get("ref_labels"))

        def by_function(*t):
            return fn(t[0], labels, ref_emb=t[1] if len(t) > 1 else None, **extra, **hyper)

        want = _value_and_grads(by_module, tensors)
        got = _value_and_grads(by_function, tensors)
        _assert_identical(got, want, f"{name} ref_emb={len(tensors) > 1}")
        ran = _from_module.last_module().last_backend
        assert ran == module.last_backend, (ran, module.last_backend)
        if name in FUSED and not (name == "lifted_structure_loss" and len(tensors) > 1):
            assert ran == "cpp", f"{name}: the function ran {ran}"


@pytest.mark.parametrize("name", list(CLASSIFICATION))
def test_classification_function_equals_its_module(name):
    x, labels, _, _ = _inputs()
    fn = getattr(functional, name)
    ctor, hyper = CLASSIFICATION[name]
    kwargs = {**hyper, "num_classes": 4, "embedding_size": 6, **ctor}
    torch.manual_seed(0)
    module = fn.loss_class(**kwargs).double()
    weight_name = inspect.getfullargspec(fn).args[2]
    weight = getattr(module, weight_name).detach().clone()
    if name == "center_loss":  # zeros at start: some centers that matter
        weight = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        module.centers.copy_(weight)
        module.eval()  # the function updates no centers
    is_param = weight_name in dict(module.named_parameters())

    def by_module(x, w):
        if is_param:
            return torch.func.functional_call(module, {weight_name: w}, (x, labels))
        return module(x, labels)

    want = _value_and_grads(by_module, (x, weight))
    rng = torch.random.get_rng_state()
    got = _value_and_grads(lambda x, w: fn(x, labels, w, **hyper), (x, weight))
    assert torch.equal(torch.random.get_rng_state(), rng), "the function drew random numbers (weight init)"
    if not is_param:  # a buffer: the module gives it no gradient, the function's tensor argument may get one
        got = (got[0], got[1][:1])
        want = (want[0], want[1][:1])
    _assert_identical(got, want, name)
    ran = _from_module.last_module().last_backend
    assert ran == module.last_backend
    if name in FUSED:
        assert ran == "cpp", f"{name}: the function ran {ran}"


def test_weight_is_cast_differentiably_not_in_place():
    x, labels, _, _ = _inputs()
    proxies = torch.randn(4, 6, dtype=torch.float32, requires_grad=True)
    before = proxies.detach().clone()
    value = functional.proxy_anchor_loss(x, labels, proxies)
    value.backward()
    assert value.dtype == torch.float64
    assert proxies.dtype == torch.float32 and torch.equal(proxies.detach(), before)
    assert proxies.grad is not None and proxies.grad.dtype == torch.float32


def test_cached_modules_do_not_change_results():
    """The per-thread module cache: the same call twice gives the same value; a reducer object
    given by the caller is never cached (each call its own module)."""
    x, labels, _, _ = _inputs()
    a = functional.multi_similarity_loss(x, labels, alpha=3)
    b = functional.multi_similarity_loss(x, labels, alpha=3)
    c = functional.multi_similarity_loss(x, labels, alpha=3, reducer=SumReducer())
    assert torch.equal(a, b)
    assert torch.equal(c, losses.MultiSimilarityLoss(alpha=3, reducer=SumReducer())(x, labels))
    assert not torch.equal(a, c)
    # the same hyperparameter values for another loss class: its own module
    lifted = functional.lifted_structure_loss(x, labels)
    general = functional.generalized_lifted_structure_loss(x, labels)
    assert torch.equal(general, losses.GeneralizedLiftedStructureLoss()(x, labels))
    assert torch.equal(lifted, losses.LiftedStructureLoss()(x, labels))


def test_margin_loss_takes_a_beta_tensor():
    x, labels, _, _ = _inputs()
    beta = torch.tensor([0.9, 1.0, 1.1, 1.2], dtype=torch.float64, requires_grad=True)
    value = functional.margin_loss(x, labels, beta=beta, learn_beta=True, num_classes=4, nu=0.1)
    (grad,) = torch.autograd.grad(value, beta)
    assert grad.shape == beta.shape


def test_signatures_come_from_the_classes():
    for name in EMBEDDING:
        fn = getattr(functional, name)
        params = inspect.signature(fn).parameters
        hyper = _from_module.hyperparameters(fn.loss_class)
        for k, default in hyper.items():
            assert params[k].kind is inspect.Parameter.KEYWORD_ONLY and params[k].default == default, (name, k)
        assert list(params)[:2] == ["embeddings", "labels"]
        assert {"ref_emb", "ref_labels", "indices_tuple", "distance", "reducer"} <= set(params)
        assert fn.__doc__ and fn.loss_class.__name__ in fn.__doc__
    with pytest.raises(TypeError):
        functional.multi_similarity_loss(torch.randn(4, 3), torch.arange(4), not_a_keyword=1)


class _LargestOutput(TorchDispatchMode):
    """The largest tensor any op returns (its element count), forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_functions_build_nothing_n_by_n(name):
    """At N=2048 every tensor the function's forward and backward create is O(N D) (the reference
    would build N x N = 4M-element matrices). The dispatch mode sees each op's output; the
    engine's tiles live inside its kernels."""
    n, d, classes = 2048, 16, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, classes, (n,), generator=g)
    fn = getattr(functional, name)
    args = (x, labels, torch.randn(classes, d, generator=g)) if name == "proxy_anchor_loss" else (x, labels)
    with _LargestOutput() as mode:
        value = fn(*args)
        value.backward()
    assert _from_module.last_module().last_backend == "cpp"
    assert mode.largest < n * n // 16, f"{name}: a tensor of {mode.largest} elements (N x N = {n * n})"
    assert torch.isfinite(x.grad).all()
