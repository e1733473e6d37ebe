"""The tiled pair engine as differentiable custom ops (spec: docs/ENGINE.md).

  dmlkern::pair_engine_forward / _backward          C++ (csrc/ops.cpp; csrc/cpu, csrc/cuda)
  dmlkern::pair_engine_forward_triton / _backward   Triton (dmlkern/triton/pair_engine.py)

Forward saves only the inputs, row_in and the O(N) row statistics; backward turns the
upstream gradient of the statistics into per-row coefficients (row_coef) and the backend
recomputes the tiles. `engine_forward` is the entry point the fused losses call.

Eager calls on plain tensors skip the registered ops' Python autograd layer (torch.library's
wrapper costs ~40 us of host time per call here, paid before the kernel is launched) and run
the same forward and backward through a plain autograd.Function (`_direct_call_ok`). Under
torch.compile, inside a dispatch or function mode (FakeTensor, opcheck) and under functorch
transforms other than torch.func.grad / vjp, the registered ops run (torch.library's autograd
layer does not support functorch transforms; the direct autograd.Function does grad and vjp).
"""
import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .. import reference
from .._autograd import applier
from .._tracing import forward_ad_active, static_shapes
from ..triton import triton_ops_wanted
from .dispatch import extension_loaded, log_debug, resolve_backend

# The engine's vocabulary (dmlkern/engine_spec.py), re-exported: callers write pe.PASS_LSE2.
from ..engine_spec import (COEF_WIDTH_HINGE, MINING_MULTI_SIMILARITY, MINING_NONE, OUT_COLUMNS, PARAMS_BASE,  # noqa: F401
                           PARAMS_CIRCLE,
                           PASS_EXTREMA, PASS_HINGE, PASS_LIFTED_PAIRS, PASS_LSE2, PASS_POS_SOFTPLUS,
                           TRANSFORM_CIRCLE, TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE, EngineParams, stats_dtype)


def op_params(params, transform):
    """The ops' float[] params: the 5 every transform reads, transform 2's 4 constants for it, and
    all 10 with a log_floor (the other calls stay as they were)."""
    params = [float(p) for p in params]
    if len(params) > PARAMS_CIRCLE and params[PARAMS_CIRCLE] != float("-inf"):
        return params
    return params[:PARAMS_CIRCLE] if int(transform) == TRANSFORM_CIRCLE else params[:PARAMS_BASE]


def _setup_context(ctx, inputs, output):
    x, y, x_labels, y_labels, row_in, pass_kind, transform, mining, params, exclude_diag = inputs
    ctx.save_for_backward(x, y, x_labels, y_labels, row_in, output)
    ctx.args = (pass_kind, transform, mining, params, exclude_diag)
    # y is x (and the labels too): autograd sums the two gradients anyway, so the backward
    # may compute that sum from one side's tiles (pairs (a, b) and (b, a) together).
    ctx.symmetric = x is y and x_labels is y_labels


def autocast_rows(x):
    """The engine's input rows under torch.autocast, by the rule of matmul-like ops: floating rows
    (not fp64) in the autocast dtype, statistics in fp32 (`stats_dtype`). The CUDA / Triton
    engines have fp16 / bf16 kernels and get the cast rows; the CPU engine has none: it gets the
    rows rounded to the autocast dtype and held in fp32, i.e. exactly the products a bf16 GEMM
    forms and accumulates in fp32 (only its final rounding of each similarity to bf16 is left out:
    the tiles never leave the kernel). A differentiable cast (the gradient flows back in x's dtype);
    outside autocast, x itself."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float64:
        return x
    dtype = torch.get_autocast_dtype(device_type)
    if device_type == "cpu":
        return x if x.dtype == dtype else x.to(dtype).to(torch.float32)
    return x.to(dtype)


def row_coefficients(pass_kind, out, grad_out):
    """(row_coef, grad_row_in-or-None) for the upstream gradient of a pass's statistics."""
    zero = torch.zeros_like(out[:, 0])
    if pass_kind == PASS_LSE2:
        coef = torch.stack([grad_out[:, 0], out[:, 0], grad_out[:, 1], out[:, 1], zero], dim=1)
        return coef, None
    if pass_kind == PASS_POS_SOFTPLUS:
        coef = torch.stack([zero, zero, zero, zero, grad_out[:, 0]], dim=1)
        # d/dL_i sum_p softplus(L_i - u_ip) = sum_p sigmoid(L_i - u_ip) = out[:, 1]
        grad_l = grad_out[:, 0] * out[:, 1]
        return coef, torch.stack([zero, zero, grad_l], dim=1)
    if pass_kind == PASS_HINGE:
        # The hinge backward (H_pos, H_neg) = the gradients of the two sums (the counts are
        # constants); d/dL_i sum_p relu(t_ip) = #(t_ip > 0) and -#(t_in > 0) for the negatives.
        coef = torch.stack([grad_out[:, 0], grad_out[:, 2]], dim=1)
        grad_l = grad_out[:, 0] * out[:, 1] - grad_out[:, 2] * out[:, 3]
        return coef, torch.stack([zero, zero, grad_l], dim=1)
    if pass_kind == PASS_LIFTED_PAIRS:
        # Its backward (row_coef column 5, C_lift) gives the gradient of a uniformly weighted
        # total only, and its L gradient needs the symmetry: losses differentiate it through
        # their own autograd.Function with engine_backward_raw (fused.lifted._LiftedPairs).
        raise RuntimeError("the lifted_pairs pass (pass_kind=3) is not differentiable through the op: "
                           "use engine_backward_raw with row_coef (N, 6) (docs/ENGINE.md)")
    raise RuntimeError("the extrema pass (mining statistics) is not differentiable")


# The row_coef terms each differentiable pass uses (coef_terms: 1 = B_pos; lse2 and the hinge
# backward have none).
_COEF_TERMS = {PASS_LSE2: 0, PASS_POS_SOFTPLUS: 1, PASS_HINGE: 0}


def reference_gradient(forward, inputs, needs, grad_out):
    """The gradient when autograd records the backward itself (create_graph=True, e.g. for a
    double backward). The backward kernels' results carry no graph, so a second derivative
    through them would silently miss their part; instead this recomputes the same statistics
    with `forward` on the reference path (materialising, differentiable) and returns their
    gradient with its graph. One entry per input, None where `needs` is False; an input given
    twice (y is x) gets the gradient once."""
    wanted = []
    for t, need in zip(inputs, needs):
        if need and not any(t is w for w in wanted):
            wanted.append(t)
    grads = {}
    if wanted:
        with torch.enable_grad():
            out = forward(*inputs)
            for t, g in zip(wanted, torch.autograd.grad(out, wanted, grad_out, create_graph=True,
                                                          allow_unused=True)):
                grads[id(t)] = g
    result = []
    for t, need in zip(inputs, needs):
        result.append(grads.pop(id(t), None) if need else None)
    return result


_GRAPH_TRANSFORMS = None


def backward_needs_graph(saved):
    """Whether a backward must return a differentiable gradient (then `reference_gradient`), i.e.
    autograd records it: create_graph=True, or a functorch transform that differentiates it again.
    torch.func.grad / vjp always run backward with grad mode on; they need the graph only when an
    outer transform (torch.func.grad of torch.func.grad, jvp) or plain autograd (inputs that
    require grad outside the transform) differentiates the result. `saved`: a saved input, whose
    functorch wrappers tell the levels. Without grad mode (a plain backward) no work is done here."""
    if not torch.is_grad_enabled():
        return False
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor, maybe_get_level
    if not is_functorch_wrapped_tensor(saved):
        return True  # create_graph=True
    current = maybe_get_level(saved)  # the level running this backward (negative: a finished vjp's)
    while is_functorch_wrapped_tensor(saved):
        saved = get_unwrapped(saved)
    if saved.requires_grad:
        return True
    global _GRAPH_TRANSFORMS
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    if _GRAPH_TRANSFORMS is None:
        from torch._C._functorch import TransformType
        _GRAPH_TRANSFORMS = (TransformType.Grad, TransformType.Jvp)
    return any(i.key() in _GRAPH_TRANSFORMS and i.level() != current for i in retrieve_all_functorch_interpreters())


def _make_backward(backward_op, takes_coef_terms=False):
    def backward(ctx, grad_out):
        x, y, x_labels, y_labels, row_in, out = ctx.saved_tensors
        pass_kind, transform, mining, params, exclude_diag = ctx.args
        if backward_needs_graph(x):  # create_graph=True: a differentiable gradient
            def forward(x, y, row_in):
                return reference.engine_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining,
                                                params, exclude_diag)
            grad_x, grad_y, grad_row_in = reference_gradient(
                forward, (x, y, row_in), [ctx.needs_input_grad[i] for i in (0, 1, 4)], grad_out)
            return grad_x, grad_y, None, None, grad_row_in, None, None, None, None, None
        coef, grad_row_in = row_coefficients(pass_kind, out, grad_out)
        grad_x = grad_y = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            args = (x, y, x_labels, y_labels, row_in, coef.contiguous(), transform, mining, params,
                    exclude_diag, ctx.symmetric)
            if takes_coef_terms:  # Triton: the pass says which terms are used (no host check)
                args += (_COEF_TERMS[pass_kind],)
            with torch.no_grad():  # under torch.func.grad grad mode is on: the kernels record nothing
                grad_x, grad_y = backward_op(*args)
            if ctx.symmetric:  # grad_x is the sum of both sides (grad_y zero): nothing to add
                grad_y = None
        return grad_x, grad_y, None, None, grad_row_in, None, None, None, None, None

    return backward


def _fake_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining, params, exclude_diag):
    return x.new_empty((x.shape[0], OUT_COLUMNS.get(pass_kind, 2)), dtype=stats_dtype(x.dtype))


def _fake_backward(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag,
                   symmetric=False):
    # the CPU kernel reads a column-major y as it is and gives its gradient in that layout
    column_major = y.device.type == "cpu" and y.dim() == 2 and y.shape[0] > 1 and y.stride(0) == 1 \
        and y.stride(1) >= y.shape[0]
    return x.new_empty(x.shape), (y.new_empty(y.shape[::-1]).t() if column_major else y.new_empty(y.shape))


def _fake_backward_into(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag,
                        grad_y):
    return x.new_empty(x.shape)


_cpp_ready = extension_loaded() and hasattr(torch.ops.dmlkern, "pair_engine_forward")
_into_ready = _cpp_ready and hasattr(torch.ops.dmlkern, "pair_engine_backward_into")
if _cpp_ready:
    torch.library.register_fake("dmlkern::pair_engine_forward")(_fake_forward)
    torch.library.register_fake("dmlkern::pair_engine_backward")(_fake_backward)
    torch.library.register_autograd(
        "dmlkern::pair_engine_forward",
        _make_backward(torch.ops.dmlkern.pair_engine_backward.default),
        setup_context=_setup_context,
    )
if _into_ready:
    torch.library.register_fake("dmlkern::pair_engine_backward_into")(_fake_backward_into)


def _only_grad_transforms():
    """Whether every active functorch transform is torch.func.grad / vjp (a Grad level): the
    direct autograd.Function supports those (its split form), not vmap or jvp (no vmap or jvp
    rule). torch.library's autograd layer supports no functorch transform at all."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return all(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


def _direct_call_ok(*tensors):
    """Whether this call may run the kernels through `_direct_function` (module docstring)."""
    if (torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled() or is_in_torch_dispatch_mode()
            or forward_ad_active()):
        return False
    if torch._C._are_functorch_transforms_active() and not _only_grad_transforms():
        return False
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _direct_function(name, forward_impl, backward):
    """The engine forward as a plain autograd.Function: forward_impl (the backend's forward)
    with the registered op's setup_context and backward, i.e. the same numbers for less host
    time. Without a gradient to track, forward_impl alone. In the split form (forward without
    ctx, then setup_context), the one torch.func.grad / vjp accept."""

    def forward(*inputs):
        # This Function is the autograd: the op's own autograd layer is skipped (under torch.func
        # transforms it would crash: torch.library's autograd layer has no functorch support).
        with torch._C._AutoDispatchBelowAutograd():
            return forward_impl(*inputs)

    function = type(name, (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "setup_context": staticmethod(_setup_context),
                     "backward": staticmethod(backward)})

    apply = applier(function)

    def call(*inputs):
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:5]):
            return apply(*inputs)
        return forward_impl(*inputs)

    return call


_CppDirect = None
if _cpp_ready:
    _CppDirect = _direct_function("_CppDirect", torch.ops.dmlkern.pair_engine_forward.default,
                                  _make_backward(torch.ops.dmlkern.pair_engine_backward.default))

pair_engine_forward_triton = None
_TritonDirect = None
if triton_ops_wanted():
    try:
        from ..triton import pair_engine as _tk
    except ImportError:  # kernels not written yet in this checkout
        _tk = None
    if _tk is not None:
        from torch.library import triton_op, wrap_triton

        @triton_op("dmlkern::pair_engine_forward_triton", mutates_args=())
        def pair_engine_forward_triton(x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor,
                                       y_labels: torch.Tensor, row_in: torch.Tensor, pass_kind: int,
                                       transform: int, mining: int, params: list[float],
                                       exclude_diag: bool) -> torch.Tensor:
            return _tk.engine_forward(x, y, x_labels, y_labels, row_in, pass_kind, transform, mining,
                                      params, exclude_diag, wrap_triton)

        @triton_op("dmlkern::pair_engine_backward_triton", mutates_args=())
        def pair_engine_backward_triton(x: torch.Tensor, y: torch.Tensor, x_labels: torch.Tensor,
                                        y_labels: torch.Tensor, row_in: torch.Tensor,
                                        row_coef: torch.Tensor, transform: int, mining: int,
                                        params: list[float], exclude_diag: bool,
                                        symmetric: bool = False,
                                        coef_terms: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
            return _tk.engine_backward(x, y, x_labels, y_labels, row_in, row_coef, transform, mining,
                                       params, exclude_diag, symmetric, wrap_triton, coef_terms)

        pair_engine_forward_triton.register_autograd(
            _make_backward(pair_engine_backward_triton, takes_coef_terms=True), setup_context=_setup_context)

        def _triton_backward_direct(*args):  # args as _make_backward passes them, coef_terms last
            if torch._C._are_functorch_transforms_active():  # functorch's wrappers: through the dispatcher
                return pair_engine_backward_triton(*args)
            return _tk.engine_backward(*args[:-1], coef_terms=args[-1])

        _TritonDirect = _direct_function("_TritonDirect", _tk.engine_forward,
                                         _make_backward(_triton_backward_direct, takes_coef_terms=True))


def available_backends():
    """Concrete backends whose engine is present in this install."""
    out = ["reference"]
    if _cpp_ready:
        out.append("cpp")
    if pair_engine_forward_triton is not None:
        out.append("triton")
    return out


def choose_backend(backend, device):
    """Resolve `backend` for a call on `device`; an engine missing from this install, or
    forward-mode AD (`forward_ad_active`: torch's ops carry the tangents), -> reference."""
    chosen = resolve_backend(backend, device)
    if forward_ad_active():
        return "reference"
    if chosen == "cpp" and not _cpp_ready or chosen == "triton" and pair_engine_forward_triton is None:
        if backend not in (None, "auto"):
            raise RuntimeError(f"backend={backend!r}: the pair engine is not available for it here")
        chosen = "reference"
    return chosen


def engine_forward(x, y, x_labels, y_labels, row_in=None, *, pass_kind, transform=TRANSFORM_DOT,
                   mining=MINING_NONE, params=EngineParams(), exclude_diag=False,
                   backend="auto"):
    """Per-row statistics of one engine pass (docs/ENGINE.md), differentiable in x, y and row_in
    (except passes 0 and 3: extrema and lifted_pairs; pass 3 needs y is x, exclude_diag, mining 0;
    pass 4, hinge, needs mining 0; its count columns are constants).

    x (N, D), y (M, D) of one floating dtype and device; x_labels (N,), y_labels (M,) int64;
    row_in (N, 3) in the stats dtype (None: zeros). backend: "auto", "cpp", "triton", "reference".
    """
    stats = stats_dtype(x.dtype)
    if row_in is None:
        row_in = torch.zeros(x.shape[0], 3, dtype=stats, device=x.device)
    params = op_params(params, transform)
    if int(pass_kind) == PASS_LIFTED_PAIRS:
        reference.check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "pass_kind=3 (lifted_pairs)")
    if int(pass_kind) == PASS_HINGE:
        reference.check_hinge_mining(mining, "pass_kind=4 (hinge)")
    reference.check_circle(transform, mining, params, pass_kind=pass_kind)
    args = (x, y, x_labels, y_labels, row_in.to(stats).contiguous(), int(pass_kind), int(transform),
            int(mining), params, bool(exclude_diag))
    chosen = choose_backend(backend, x.device)
    log_debug("pair_engine pass %d: backend=%s", pass_kind, chosen)
    if chosen == "reference":
        return reference.engine_forward(*args)
    direct = _direct_call_ok(*args[:5])
    if chosen == "triton":
        return _TritonDirect(*args) if direct else pair_engine_forward_triton(*args)
    return _CppDirect(*args) if direct else torch.ops.dmlkern.pair_engine_forward.default(*args)


def _backward_args(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag, symmetric):
    """The backward ops' arguments, after the checks the ops leave to Python."""
    if row_coef.shape[1] == 6:
        reference.check_symmetric(x, y, x_labels, y_labels, exclude_diag, mining, "row_coef with 6 columns (C_lift)")
    if row_coef.shape[1] == COEF_WIDTH_HINGE:
        reference.check_hinge_mining(mining, "row_coef with 2 columns (the hinge backward)")
    reference.check_circle(transform, mining, params, coef_width=row_coef.shape[1])
    return (x, y, x_labels, y_labels, row_in, row_coef, int(transform), int(mining),
            op_params(params, transform), bool(exclude_diag), bool(symmetric))


def engine_backward_into(grad_y, x, y, x_labels, y_labels, row_in, row_coef, *, transform, mining, params,
                         exclude_diag, backend, coef_terms=-1):
    """engine_backward_raw's non-symmetric backward with grad_y written into `grad_y` (y's shape,
    any strides; a block of a weights' gradient): returns grad_x. The C++ CPU op writes it in
    place (pair_engine_backward_into: no block-sized gradient allocated and page-faulted per
    call); elsewhere, and for a grad_y of another dtype than x's, the gradient is copied in."""
    if (backend == "cpp" and _into_ready and x.device.type == "cpu" and grad_y.dtype == x.dtype
            and not static_shapes()):
        args = _backward_args(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag,
                              False)
        return torch.ops.dmlkern.pair_engine_backward_into.default(*args[:-1], grad_y)
    grad_x, gy = engine_backward_raw(x, y, x_labels, y_labels, row_in, row_coef, transform=transform, mining=mining,
                                     params=params, exclude_diag=exclude_diag, backend=backend,
                                     coef_terms=coef_terms)
    grad_y.copy_(gy)
    return grad_x


def engine_backward_raw(x, y, x_labels, y_labels, row_in, row_coef, *, transform, mining, params,
                        exclude_diag, backend, symmetric=False, coef_terms=-1):
    """The backward kernel alone: (grad_x, grad_y) for the given row coefficients, (N, 5),
    (N, 6) with C_lift (the symmetric case only) or (N, 2), the hinge backward's (H_pos, H_neg). Used by fused losses that chain passes and
    merge their backward into one (NT-Xent, Lifted Structure), and by tests. symmetric=True
    (y is x, y_labels is x_labels): grad_x is the sum of both gradients, grad_y zero.
    coef_terms: which of B_pos (1) and C_lift (2) row_coef uses; Triton compiles the others
    away (-1: it reads the values, a host sync on a GPU). The other backends ignore it."""
    args = _backward_args(x, y, x_labels, y_labels, row_in, row_coef, transform, mining, params, exclude_diag,
                          symmetric)
    if backend == "reference":
        return reference.engine_backward(*args)
    if backend == "triton":
        if _direct_call_ok(*args[:6]) and not torch._C._are_functorch_transforms_active():
            # no autograd here: only the dispatcher hop is skipped (functorch's wrappers need it)
            return _tk.engine_backward(*args, coef_terms=int(coef_terms))
        return pair_engine_backward_triton(*args, int(coef_terms))
    return torch.ops.dmlkern.pair_engine_backward.default(*args)
