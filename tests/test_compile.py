"""torch.compile with the fused engine: the custom ops trace with fullgraph=True (fake tensors,
autograd), and the loss classes compile (with graph breaks at their data-dependent checks)."""
import pytest
import torch
import torch.nn.functional as F

from dmlkern import losses, miners, reducers
from dmlkern.ops import pair_engine as pe


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: the tests' lambdas share code objects, and past dynamo's
    recompile limit (8 per code object) a compiled call would silently run eagerly; hitting the
    limit fails instead."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def _needs_cpp():
    if "cpp" not in pe.available_backends():
        pytest.fail("the cpp pair engine is not registered in this build")


def _plain_sgd_step(model, lr):
    """The eager twin of the compiled SGD step (no momentum), clearing the gradients."""
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def test_fullgraph_training_step_on_engine_ops():
    """A Multi-Similarity training step written on the engine op: forward compiled with
    fullgraph=True, backward through the compiled graph, optimizer step compiled too."""
    _needs_cpp()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.randn(45, 16, dtype=torch.float64)
    labels = torch.randint(0, 5, (45,))
    params = [-2.0, 1.0, 10.0, -5.0, 0.0]

    def loss_fn(inp, lab):
        emb = F.normalize(model(inp), dim=1)
        lse = pe.engine_forward(emb, emb, lab, lab, pass_kind=pe.PASS_LSE2, params=params,
                                exclude_diag=True, backend="cpp")
        return (F.softplus(lse[:, 0]) / 2 + F.softplus(lse[:, 1]) / 10).mean()

    eager_model = torch.nn.Linear(16, 8).double()
    eager_model.load_state_dict(model.state_dict())
    compiled_loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(2):
        loss = compiled_loss(inputs, labels)
        want = losses.MultiSimilarityLoss(alpha=2, beta=10, base=0.5)(eager_model(inputs), labels)
        torch.testing.assert_close(loss, want)
        loss.backward()
        want.backward()
        torch.testing.assert_close(model.weight.grad, eager_model.weight.grad)
        compiled_step()
        opt.zero_grad()
        _plain_sgd_step(eager_model, lr=0.1)


@pytest.mark.parametrize("make", [
    lambda: (losses.MultiSimilarityLoss(), True),
    lambda: (losses.NTXentLoss(), False),
    lambda: (losses.SupConLoss(), False),
    lambda: (losses.GeneralizedLiftedStructureLoss(), False),
], ids=["ms_miner", "ntxent", "supcon", "genlifted"])
def test_loss_classes_compile(make):
    _needs_cpp()
    loss_fn, with_miner = make()
    miner = miners.MultiSimilarityMiner()
    torch.manual_seed(1)
    x = torch.randn(40, 12, requires_grad=True)
    labels = torch.randint(0, 5, (40,))

    def step(emb, lab):
        return loss_fn(emb, lab, miner(emb, lab)) if with_miner else loss_fn(emb, lab)

    want = step(x, labels)
    assert loss_fn.last_backend == "cpp"
    (g_want,) = torch.autograd.grad(want, x)
    got = torch.compile(step, backend="aot_eager")(x, labels)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def _with_ms_miner():
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    return loss_fn, lambda emb, lab: loss_fn(emb, lab, miner(emb, lab))


def _with_ms_miner_int32_labels():
    """int32 labels: the loss and the miner each make them int64; the loss must still recognise
    the miner's lazy pairs (by the labels tensor the caller gave both) without reading values."""
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()

    def step(emb, lab):
        lab = lab.to(torch.int32)
        return loss_fn(emb, lab, miner(emb, lab))
    return loss_fn, step


def _with_triplet_miner(kind):
    """TripletMarginLoss with a TripletMarginMiner: the loss's blocked path keeps the miner's
    window from its lazy result (no triplet list), with fullgraph=True too."""
    def build():
        loss_fn, miner = losses.TripletMarginLoss(), miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind)

        def step(emb, lab):
            return loss_fn(emb, lab, miner(emb, lab))
        return loss_fn, step
    return build


def _plain(make):
    def build():
        loss_fn = make()
        return loss_fn, loss_fn
    return build


FULLGRAPH_LOSSES = {
    "ms": _plain(losses.MultiSimilarityLoss),
    "ms_miner": _with_ms_miner,
    "ms_miner_int32_labels": _with_ms_miner_int32_labels,
    "genlifted": _plain(losses.GeneralizedLiftedStructureLoss),
    "ntxent": _plain(losses.NTXentLoss),
    "supcon": _plain(losses.SupConLoss),
    "npairs": _plain(losses.NPairsLoss),
    "proxy_anchor": _plain(lambda: losses.ProxyAnchorLoss(5, 8)),
    "arcface": _plain(lambda: losses.ArcFaceLoss(5, 8, scale=8)),
    "proxy_nca": _plain(lambda: losses.ProxyNCALoss(5, 8)),
    "subcenter_arcface": _plain(lambda: losses.SubCenterArcFaceLoss(5, 8, scale=8)),
    "soft_triple": _plain(lambda: losses.SoftTripleLoss(5, 8, centers_per_class=3)),
    "contrastive": _plain(losses.ContrastiveLoss),
    "margin_learn_beta": _plain(lambda: losses.MarginLoss(learn_beta=True, nu=0.1)),
    "triplet": _plain(losses.TripletMarginLoss),
    "triplet_smooth_mean": _plain(lambda: losses.TripletMarginLoss(smooth_loss=True, reducer=reducers.MeanReducer())),
    "triplet_semihard_miner": _with_triplet_miner("semihard"),
}
# Their fused path is the blocked one (`last_backend` "blocked"; on the CPU the C++ triplet_rows op).
BLOCKED_PATH = {"triplet", "triplet_smooth_mean", "triplet_semihard_miner"}
# One class: no negative pair, PML's zero loss (MS, GenLifted, ProxyAnchor and Contrastive stay
# non-zero: positives alone, proxies of absent classes). N-pairs: one anchor, a 1 x 1
# cross-entropy = 0. Margin and Triplet: no triplet.
ZERO_ON_ONE_CLASS = {"ms_miner", "ms_miner_int32_labels", "ntxent", "supcon", "npairs", "margin_learn_beta", "triplet",
                     "triplet_smooth_mean", "triplet_semihard_miner"}


@pytest.mark.parametrize("name", list(FULLGRAPH_LOSSES))
@pytest.mark.parametrize("classes", [5, 1], ids=["batch", "one-class"])
def test_fullgraph_training_step_with_loss_class(name, classes):
    """forward (fullgraph=True), backward and a compiled optimizer step with the loss class
    (its own parameters too, e.g. ProxyAnchor's proxies), against eager; a one-class batch checks
    the degenerate-batch zero under compile."""
    _needs_cpp()
    torch.manual_seed(2)
    loss_fn, step = FULLGRAPH_LOSSES[name]()
    eager_loss_fn, eager_step = FULLGRAPH_LOSSES[name]()
    eager_loss_fn.load_state_dict(loss_fn.state_dict())
    model, eager_model = torch.nn.Linear(12, 8), torch.nn.Linear(12, 8)
    eager_model.load_state_dict(model.state_dict())
    params = list(model.parameters()) + list(loss_fn.parameters())
    eager_params = list(eager_model.parameters()) + list(eager_loss_fn.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    inputs = torch.randn(36, 12)
    labels = torch.randint(0, classes, (36,))
    compiled = torch.compile(lambda inp, lab: step(model(inp), lab), fullgraph=True, backend="aot_eager")
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(2):
        loss = compiled(inputs, labels)
        want = eager_step(eager_model(inputs), labels)
        assert eager_loss_fn.last_backend in ("cpp", "blocked", "zero"), eager_loss_fn.last_backend
        torch.testing.assert_close(loss, want)
        loss.backward()
        want.backward()
        if classes == 1 and name in ZERO_ON_ONE_CLASS:
            assert float(loss) == 0.0 and eager_loss_fn.last_backend == ("cpp" if name == "npairs" else "zero")
        else:
            assert float(loss) != 0.0
        for got, expected in zip(params, eager_params):
            # a parameter that the eager zero loss leaves out of the graph (Margin's beta: None)
            # gets a zero gradient under compile (static shapes: a tensor-valued zero)
            want_grad = expected.grad if expected.grad is not None or got.grad is None else torch.zeros_like(got)
            torch.testing.assert_close(got.grad, want_grad)
        compiled_step()
        opt.zero_grad()
        with torch.no_grad():
            for p in eager_params:
                if p.grad is not None:
                    p -= 0.05 * p.grad
                p.grad = None


_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# Every fused loss on the CPU; on the GPU (its run has a 15-minute budget, and Inductor compiles
# take tens of seconds each) the two chains of passes: MS with the miner, NT-Xent.
INDUCTOR_CASES = ([pytest.param(name, "cpu", "cpp", id=f"{name}-cpu-cpp") for name in FULLGRAPH_LOSSES]
                  + [pytest.param(name, "cuda", backend, id=f"{name}-cuda-{backend}", marks=_GPU)
                     for name in ("ms_miner", "ntxent") for backend in ("triton", "cpp")])


@pytest.mark.slow
@pytest.mark.parametrize("name,device,backend", INDUCTOR_CASES)
def test_inductor_fullgraph_forward_backward(name, device, backend):
    """The default compiler (Inductor, which generates code around the ops) with fullgraph=True:
    forward and backward through a linear layer match eager, on each backend that can run here
    (Triton and CUDA C++ on the GPU run)."""
    if backend not in pe.available_backends():
        pytest.fail(f"the {backend} pair engine is not registered in this build")
    torch.manual_seed(3)
    loss_fn, step = FULLGRAPH_LOSSES[name]()
    loss_fn.backend = backend
    model = torch.nn.Linear(12, 8).to(device)
    inputs = torch.randn(36, 12, device=device)
    labels = torch.randint(0, 5, (36,), device=device)
    loss_fn.to(device)
    want = step(model(inputs), labels)
    assert loss_fn.last_backend == ("blocked" if name in BLOCKED_PATH else backend), loss_fn.last_backend
    want_grads = torch.autograd.grad(want, list(model.parameters()) + list(loss_fn.parameters()))
    compiled = torch.compile(lambda inp, lab: step(model(inp), lab), fullgraph=True)
    got = compiled(inputs, labels)
    got_grads = torch.autograd.grad(got, list(model.parameters()) + list(loss_fn.parameters()))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reducer", ["mean", "avg_nonzero"])
@pytest.mark.parametrize("classes", [5, 1], ids=["batch", "one-class"])
def test_fullgraph_training_step_lifted_structure(reducer, classes):
    """LiftedStructureLoss on the lifted_pairs pass (no pair list): forward with fullgraph=True,
    backward and a compiled optimizer step, against eager; one class is PML's zero loss."""
    _needs_cpp()
    from dmlkern.reducers import AvgNonZeroReducer, MeanReducer

    torch.manual_seed(3)
    model = torch.nn.Linear(12, 8)
    eager_model = torch.nn.Linear(12, 8)
    eager_model.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = torch.randn(36, 12)
    labels = torch.randint(0, classes, (36,))

    def make():  # pos_margin: a mix of zero and non-zero pair losses (AvgNonZero counts them)
        red = MeanReducer() if reducer == "mean" else AvgNonZeroReducer()
        return losses.LiftedStructureLoss(neg_margin=0.5, pos_margin=4.5, reducer=red)

    loss_fn, eager_loss_fn = make(), make()
    compiled = torch.compile(lambda inp, lab: loss_fn(model(inp), lab), fullgraph=True, backend="aot_eager")
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(2):
        loss = compiled(inputs, labels)
        want = eager_loss_fn(eager_model(inputs), labels)
        torch.testing.assert_close(loss, want)
        loss.backward()
        want.backward()
        if classes == 1:  # no negative pair: PML's zero loss
            assert float(loss.detach()) == 0.0 and eager_loss_fn.last_backend == "zero"
            assert not model.weight.grad.any()
        else:
            assert eager_loss_fn.last_backend == "cpp" and float(loss.detach()) > 0
        torch.testing.assert_close(model.weight.grad, eager_model.weight.grad)
        compiled_step()
        opt.zero_grad()
        _plain_sgd_step(eager_model, lr=0.05)


# Losses whose pairs are the batch against itself: eager runs the one-sided symmetric backward.
SYMMETRIC_BACKWARD_LOSSES = {
    "ms": losses.MultiSimilarityLoss,
    "genlifted": losses.GeneralizedLiftedStructureLoss,
    "ntxent": losses.NTXentLoss,
    "supcon": losses.SupConLoss,
    "lifted": losses.LiftedStructureLoss,
    "contrastive": losses.ContrastiveLoss,
    "margin": losses.MarginLoss,
}


@pytest.mark.parametrize("name", list(SYMMETRIC_BACKWARD_LOSSES))
def test_compiled_backward_keeps_the_symmetric_kernel(name):
    """The backward graph that AOT autograd traces calls pair_engine_backward with
    symmetric=True (one side's tiles, (G + G^T) X), as eager does: the `x is y` test in the
    op's setup_context must survive tracing, else compiled training does twice the work."""
    _needs_cpp()
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    seen = []

    def backward_compiler(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "pair_engine_backward" in str(node.target):
                # schema: (..., exclude_diag, symmetric=False); positional or keyword
                seen.append(node.kwargs.get("symmetric", node.args[10] if len(node.args) > 10 else False))
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm), bw_compiler=backward_compiler)
    loss_fn = SYMMETRIC_BACKWARD_LOSSES[name]()
    torch.manual_seed(4)
    x = torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 4, (30,))
    want = loss_fn(x, labels)
    assert loss_fn.last_backend == "cpp", loss_fn.last_backend
    (g_want,) = torch.autograd.grad(want, x)
    got = torch.compile(lambda e, lab: loss_fn(e, lab), fullgraph=True, backend=backend)(x, labels)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert seen and all(flag is True for flag in seen), seen



def test_triton_path_traces_on_fake_cuda_tensors():
    """On CUDA tensors the loss classes pick the Triton engine, and their forward -- the
    static-shape one torch.compile takes, and the plain eager one (except N-pairs') -- and the
    Triton backward op's host code trace without a host sync or a data-dependent shape: make_fx
    over fake CUDA tensors, no GPU needed. Run in a subprocess without TRITON_INTERPRET: the
    interpreter runs kernels even on fake tensors. (Compiling and running the kernels needs the
    GPU run.)"""
    import json
    import os
    import subprocess
    import sys

    from _triton_device import env_without_interpreter

    env = env_without_interpreter(DMLKERN_TRITON_OPS="1")  # register the Triton ops with no GPU driver here
    script = os.path.join(os.path.dirname(__file__), "_trace_on_fake_cuda.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    traced = json.loads(run.stdout.strip().splitlines()[-1])
    names = set(FULLGRAPH_LOSSES) - BLOCKED_PATH | {"lifted"}
    want = ({f"static {n}" for n in names} | {f"eager {n}" for n in names - {"npairs"}}
            | {"backward two-sided", "backward symmetric"})
    assert set(traced) == want, sorted(traced)
    for case, (backend, ops) in traced.items():
        assert backend == "triton", (case, backend)
        kind = "backward" if case.startswith("backward") else "forward"
        # the grouped class losses (SoftTriple, SubCenterArcFace) run their own Triton op
        allowed = (f"dmlkern.pair_engine_{kind}_triton", "dmlkern.grouped_class_lse_triton")
        assert ops and all(op.startswith(allowed) for op in ops), (case, ops)
