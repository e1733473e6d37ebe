"""Trace the Triton path on fake CUDA tensors (no GPU) and print, as one JSON line, each case's
backend and the dmlkern ops in its graph. A fake tensor cannot be read, so any host sync
(.item(), bool(), nonzero, ...) fails the trace. Run by test_compile.py without TRITON_INTERPRET."""
import contextlib
import json
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # this checkout's tests and dmlkern
from dmlkern import _tracing, losses  # noqa: E402
from dmlkern.fused import _common as fused_common  # noqa: E402
from dmlkern.ops import pair_engine as pe  # noqa: E402
from test_compile import BLOCKED_PATH, FULLGRAPH_LOSSES, _plain  # noqa: E402

assert "TRITON_INTERPRET" not in os.environ, "the interpreter runs Triton kernels on fake tensors"
assert pe.pair_engine_forward_triton is not None, "the Triton pair engine is not registered"


def fake_cuda(*shapes, classes=5):
    with FakeTensorMode():
        return [torch.randn(*s, device="cuda") for s in shapes] + [torch.randint(0, classes, (36,), device="cuda")]


class _NoLabelRead:
    """check_inputs without its label-range read (one host read, by design) while tracing eager."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __enter__(self):
        self.loss_fn.check_inputs = lambda *args: None

    def __exit__(self, *exc):
        del self.loss_fn.check_inputs


def dmlkern_ops(graph_module):
    return [str(n.target) for n in graph_module.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("dmlkern.")]


# "static": the torch.compile path. "eager": a plain call on CUDA tensors, which must not sync
# with the host either (N-pairs eager lists its anchors: one sync, by design; the class-weight
# losses check their labels' range, and the Euclidean losses look for rows shorter than 1e-12,
# one read each, by design: traced without those checks, nothing else may read).
traced = {}
for mode in ("static", "eager"):
    _tracing.FORCE_STATIC_SHAPES = mode == "static"
    for name, build in dict(FULLGRAPH_LOSSES, lifted=_plain(losses.LiftedStructureLoss)).items():
        if name in BLOCKED_PATH:  # compiled on the CPU only (its CUDA twin has data-dependent shapes)
            continue
        if mode == "eager" and name == "npairs":
            continue
        loss_fn, step = build()
        params = dict(loss_fn.named_parameters())
        emb, *weights, labels = fake_cuda((36, 8), *[p.shape for p in params.values()])
        for pname, weight in zip(params, weights):  # the class weights on the batch's device
            setattr(loss_fn, pname, torch.nn.Parameter(weight))
        short_rows = fused_common.has_short_rows
        if mode == "eager":
            fused_common.has_short_rows = lambda *args: False
        with _NoLabelRead(loss_fn) if mode == "eager" else contextlib.nullcontext():
            graph = make_fx(step, tracing_mode="fake")(emb, labels)
        fused_common.has_short_rows = short_rows
        traced[f"{mode} {name}"] = (loss_fn.last_backend, dmlkern_ops(graph))
_tracing.FORCE_STATIC_SHAPES = False

for symmetric in (False, True):
    x, rows, coef, labels = fake_cuda((36, 8), (36, 3), (36, 5))

    def backward(x, lab, row_in, row_coef):
        return pe.engine_backward_raw(x, x, lab, lab, row_in, row_coef, transform=0, mining=1,
                                      params=[-2.0, 1.0, 5.0, -2.5, 0.1], exclude_diag=True,
                                      backend="triton", symmetric=symmetric)

    graph = make_fx(backward, tracing_mode="fake")(x, labels, rows, coef)
    traced[f"backward {'symmetric' if symmetric else 'two-sided'}"] = ("triton", dmlkern_ops(graph))
print(json.dumps(traced))
