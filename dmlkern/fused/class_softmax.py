"""Softmax cross-entropy over class weights without N x C logits: the shared path of the
margin-softmax and proxy losses (ArcFace, CosFace, SphereFace, L-Softmax, NormalizedSoftmax,
Softmax, ProxyNCA; SoftTriple and SubCenterArcFace bring their own block kernel).

    loss_i = log(1 + e^(lse_i - t_i))

t_i is the target class's (margin-modified) logit, from the target's weight row alone in
O(N D); lse_i is the log-sum-exp of the other classes' logits. `class_lse` computes lse over
column blocks of the weights (`ClassLayout.blocks`), forward and backward: a block kernel turns a
block of weight rows into its log-sum-exp (forward) and into the gradients of x and of those
rows (backward, recomputing the block). The engine's kernel (`EngineBlock`) is one lse2 pass
with the block's classes as the engine's columns and `arange(c0, c1)` their labels, so a row's
own class is its one "positive" and every other class a "negative": only the negatives' lse is
kept. The grouped losses' kernel (`GroupedBlock`: K weight rows per class) runs the C++ op
`dmlkern::grouped_class_lse` on CPU fp32 / fp64 blocks (csrc/cpu/grouped_class_cpu.cpp), its Triton
twin on the Triton backend (triton/grouped_class.py) and its torch ops elsewhere. The only C x D
buffer made is the weights' gradient."""
from typing import NamedTuple

import torch

from .._autograd import applier
from .._determinism import _CHUNK, logaddexp
from .._tracing import static_shapes
from ..engine_spec import MINING_NONE, PASS_LSE2, TRANSFORM_DOT, EngineParams, stats_dtype
from ..ops import grouped_class_op, unit_rows_op
from ..ops import pair_engine as pe
from ..ops.fixed_mm_op import fixed_mm
from ._common import _NORMALIZE_EPS, int_from_env
from ._epilogue import _log1p_exp, _pml_zeros

BLOCK_BYTES = 8 << 20  # one block of prepared weight rows (its gradient and temporaries alike)
BLOCK_LOGITS = 2 << 20  # GroupedBlock's torch ops: one block's (N, rows) fp32 cosines (and its few temporaries alike)
MIN_BLOCK = 1024


# An eager class-weight loss with fewer logits than this (N x C x K; DMLKERN_SMALL_CLASS_LOGITS,
# 0: never) and at most SMALL_PROBLEM_MAX_COLUMNS weight rows (C x K) runs the reference, whose
# materialised logits then cost less than the blocked path's fixed host cost (2-core CPU, fp32,
# D=128, forward + backward: ArcFace N=64, C=100 1.00 ms against 1.33 ms fused; N=256, C=500 2.6
# against 3.1 ms). Past 2^17 logits (512 KiB in fp32) the reference slows like PML's (ArcFace N=256,
# C=1000 6.5 against 4.7 ms fused), and with more weight rows its work on W outweighs the fixed
# cost (N=64, C=1000 3.5 against 2.8 ms). On the CPU the reference's products (fixed_mm) and
# softmax are bit-identical across thread counts, as the blocked path's.
DEFAULT_SMALL_PROBLEM_LOGITS = 1 << 17
SMALL_PROBLEM_LOGITS = int_from_env("DMLKERN_SMALL_CLASS_LOGITS", DEFAULT_SMALL_PROBLEM_LOGITS, "logits")
SMALL_PROBLEM_MAX_COLUMNS = 512


def small_problem(embeddings, columns):
    """Why the reference runs this eager class-weight loss call against `columns` weight rows (C x K)
    (a str), or None. Asked first by the loss's forward (`small_problem_reason`)."""
    if (embeddings.shape[0] * columns >= SMALL_PROBLEM_LOGITS or columns > SMALL_PROBLEM_MAX_COLUMNS
            or static_shapes()):
        return None
    return (f"a small problem ({embeddings.shape[0]} x {columns} logits, under "
            f"DMLKERN_SMALL_CLASS_LOGITS={SMALL_PROBLEM_LOGITS}, at most {SMALL_PROBLEM_MAX_COLUMNS} weight rows: "
            "the reference's logits cost less than the "
            "blocked path's fixed cost)")


class ClassLayout(NamedTuple):
    """Where the classes' weight rows are: `weight` (D, C * K) with a class's rows as columns
    (columns=True: PML's W, fc) or (C * K, D) (proxies); K = group consecutive rows per class
    (SubCenterArcFace's sub-centres, SoftTriple's centres; 1 otherwise)."""
    columns: bool
    num_classes: int
    group: int = 1

    def rows(self, weight):
        return weight.t() if self.columns else weight

    def block(self, weight, c0, c1):
        """The rows of classes c0 .. c1 - 1: ((c1 - c0) * K, D), a view."""
        return self.rows(weight)[c0 * self.group:c1 * self.group]

    def blocks(self, weight, itemsize, max_rows=None):
        """(c0, c1) class ranges of about BLOCK_BYTES of weight rows each (at most max_rows rows
        if given), in order."""
        row_bytes = self.group * self.rows(weight).shape[1] * itemsize
        size = max(MIN_BLOCK, BLOCK_BYTES // max(row_bytes, 1))
        if max_rows is not None:
            size = max(1, min(size, max_rows // self.group))
        return [(c0, min(c0 + size, self.num_classes)) for c0 in range(0, self.num_classes, size)]

    def _target_index(self, labels):
        if static_shapes():  # labels could not be range-checked: keep the gather in bounds
            labels = labels.clamp(0, self.num_classes - 1)
        if self.group == 1:
            return labels
        return (labels[:, None] * self.group + torch.arange(self.group, device=labels.device)).reshape(-1)

    def target(self, weight, labels):
        """Each sample's class rows: (N, D), or (N, K, D) for K > 1. index_select: its backward is
        index_add, serial on a CPU (deterministic), unlike indexing's accumulate-put."""
        rows = self.rows(weight).index_select(0, self._target_index(labels))
        return rows if self.group == 1 else rows.view(len(labels), self.group, rows.shape[1])

    def add_target_grad(self, grad_weight, labels, grad_target):
        rows = self.rows(grad_weight)
        rows.index_add_(0, self._target_index(labels), grad_target.reshape(-1, rows.shape[1]).to(rows.dtype))


def autocast_off(t):
    """A context without torch.autocast on t's device: the block kernels' own products and norms
    run in their inputs' dtype (the autocast rounding is applied to their inputs explicitly)."""
    return torch.autocast(t.device.type, enabled=False)


class RowsScratch:
    """Buffers for the block-sized temporaries of a loop over column blocks (the unit weight
    rows; the elementwise products under the rows' dot products), reused from block to block,
    in the layout a fresh tensor would have. Fresh block-sized tensors per block are page-faulted
    anew where glibc hands them back to the system between blocks (with the columns' gradient
    written in place, pe.engine_backward_into: ~10 % of an ArcFace forward + backward at
    C = 262144 on this CPU). Unused under autograd (the reference's graph would save a block's
    rows that the next block overwrites) and under tracing (static_shapes: no strided out=)."""

    UNIT, PRODUCT = 0, 1

    def __init__(self):
        self.flat = [None, None]

    def like(self, rows, slot, dtype=None):
        """An uninitialised tensor of rows' shape and layout (dtype: rows' unless given) in the
        slot's buffer, or None."""
        if static_shapes() or torch.is_grad_enabled() or rows.dim() != 2:
            return None
        dtype = dtype or rows.dtype
        flat = self.flat[slot]
        if flat is None or flat.numel() < rows.numel() or flat.dtype != dtype or flat.device != rows.device:
            flat = self.flat[slot] = torch.empty(rows.numel(), dtype=dtype, device=rows.device)
        r, d = rows.shape
        flat = flat[:r * d]
        return flat.view(d, r).t() if r > 1 and rows.stride(0) == 1 else flat.view(r, d)


def row_dots(a, b, scratch=None):
    """torch.linalg.vecdot(a, b, dim=-1) (the same bits: its product, then the sum), the product
    in the scratch's buffer when one is given."""
    out = None if scratch is None else scratch.like(a, RowsScratch.PRODUCT)
    if out is None or a.stride() != b.stride():
        return torch.linalg.vecdot(a, b, dim=-1)
    return torch.mul(a, b, out=out).sum(-1)


def unit(rows, scratch=None):
    """rows / max(|rows|, eps), as F.normalize (no graph: the block kernels differentiate by hand)."""
    return unit_and_norm(rows, scratch)[0]


def row_norms(rows, scratch=None):
    """|rows| per row, (R, 1) in rows' dtype: the square root of the rows' dot products with
    themselves, accumulated in fp32 for half rows. Not torch.linalg.vector_norm: on a CPU that is
    ~10x slower for a block of weight rows (7 ms for 16384 x 128, strided or not), the largest
    cost outside the engine of a class-softmax call."""
    r = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    with autocast_off(rows):  # (CPU autocast runs vecdot in bf16: norms 2^-9 off, logits by scale times that)
        return row_dots(r, r, scratch).sqrt_().unsqueeze(-1).to(rows.dtype)


def normalized(rows):
    """rows / max(|rows|, eps) along the last axis with autograd, as PML's F.normalize (a zero row:
    gradient 0; unit's square root would give NaN there)."""
    return torch.nn.functional.normalize(rows, dim=-1, eps=_NORMALIZE_EPS)


def no_grad_at_short_rows(x):
    """x, with no gradient for its rows shorter than F.normalize's eps (a zero row): where PML's
    logits are cos * |x| (L-Softmax, SphereFace) the norm's gradient there is 0, so is PML's
    whole gradient of such a row; <x, w>, their value, would give it one."""
    short = torch.linalg.vector_norm(x.detach(), dim=1, keepdim=True) < _NORMALIZE_EPS
    return torch.where(short, x.detach(), x)


def unit_and_norm(rows, scratch=None):
    """(unit(rows), |rows|): the norm kept for unit_backward_, so a block's norms are taken once;
    the unit rows in the RowsScratch's buffer when one is given (and usable). Without a graph to
    record, CPU fp32 / fp64 rows take the op dmlkern::unit_rows (two sweeps over the block where
    these torch ops take five; its norms summed in double)."""
    out = None if scratch is None else scratch.like(rows, RowsScratch.UNIT)
    if unit_rows_op.runs_kernel(rows):
        out = torch.empty_like(rows) if out is None else out
        return out, unit_rows_op.unit_rows(rows, _NORMALIZE_EPS, out)
    norm = row_norms(rows, scratch)
    if out is None:
        return rows / norm.clamp_min(_NORMALIZE_EPS), norm
    return torch.div(rows, norm.clamp_min(_NORMALIZE_EPS), out=out), norm


def unit_backward_(grad, y, norm, out=None, scratch=None):
    """The gradient of unit(rows) given the gradient of its output (as fused._common._UnitRows),
    computed over `grad` (a block's fresh gradient, or the block of the weights' gradient that
    holds it) and written to `out` (e.g. the block's view of the weights' gradient), else
    returned in `grad`; y, norm = unit_and_norm(rows). Without a graph to record, CPU fp32 / fp64
    takes the op dmlkern::unit_rows_backward (two sweeps where these torch ops take nine)."""
    target = grad if out is None else out
    if unit_rows_op.runs_kernel(grad, y, norm, target) and target.shape == grad.shape:
        return unit_rows_op.unit_rows_backward(grad, y, norm, _NORMALIZE_EPS, target)
    with autocast_off(grad):
        radial = row_dots(y, grad, scratch).unsqueeze(1) * (norm >= _NORMALIZE_EPS)
    grad.addcmul_(y, radial, value=-1)
    if out is None or static_shapes():  # (torch.compile takes no non-contiguous out=)
        return _write(grad.div_(norm.clamp_min(_NORMALIZE_EPS)), out)
    return torch.div(grad, norm.clamp_min(_NORMALIZE_EPS), out=out)


def _write(grad, out):
    """grad into out (a block of the weights' gradient) when given, else grad itself."""
    return grad if out is None else out.copy_(grad)


class EngineBlock:
    """Block kernel for logits sc * <x_i, w_j> + off (w_j the weight row, or its unit vector):
    one lse2 engine pass per block. x comes prepared (normalised or raw) by the caller."""

    def __init__(self, unit_columns, scale, offset, backend, x, autocast_rounding=True):
        self.unit_columns = unit_columns
        # Only the negatives' lse is kept (a row's own class is its one "positive"): the positives
        # take a zero scale, so their unused values sit in a zero-width window (the CPU engine's
        # fixed shift then never recomputes a row for them).
        self.params = EngineParams(sc_pos=0.0, off_pos=0.0, sc_neg=scale, off_neg=offset)
        self.backend = backend
        # Under CPU autocast x holds rows rounded to the autocast dtype in fp32 (pe.autocast_rows):
        # the weight rows get the same rounding, in the forward and in the backward alike (not
        # for a Euclidean distance, autocast_rounding=False: PML's cdist runs in fp32).
        cpu_autocast = (autocast_rounding and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                        and x.dtype != torch.float64)
        self.round_to = torch.get_autocast_dtype("cpu") if cpu_autocast else None

    def _columns(self, rows, x, unit_rows=None, scratch=None):
        cols = (unit(rows, scratch) if unit_rows is None else unit_rows) if self.unit_columns else rows
        if self.round_to is not None:
            cols = cols.to(self.round_to)
        cols = cols.to(x.dtype)
        # the C++ engine reads a block of PML's (D, C) W (column-major) as it is: no transposing copy
        return cols if self.backend == "cpp" and x.device.type == "cpu" else cols.contiguous()

    def max_rows(self, x):
        return None  # the engine tiles the block itself

    @staticmethod
    def _labels(labels, c0, c1):
        """(the rows' labels, the block's columns' labels) for the engine, counted from c0: a row
        whose class is outside the block gets -1. The same pairs of equal labels as (labels,
        arange(c0, c1)), but spanning at most c1 - c0 + 1 values, so the C++ engine codes them by
        an offset (engine_cpu.h, label_codes) instead of a hash and a sort of N + (c1 - c0) labels
        (~2 ms a block, serial: ~0.15 T_mm of an ArcFace call at C = 262144, N = 1024)."""
        inside = (labels >= c0) & (labels < c1)
        return torch.where(inside, labels - c0, -1), torch.arange(c1 - c0, device=labels.device)

    def forward(self, x, rows, labels, c0, c1, backend=None, scratch=None):
        out = pe.engine_forward(x, self._columns(rows, x, scratch=scratch), *self._labels(labels, c0, c1),
                                pass_kind=PASS_LSE2, params=self.params, backend=backend or self.backend)
        return out[:, 1]

    def backward(self, x, rows, labels, c0, c1, grad, lse, out=None, scratch=None):
        stats = stats_dtype(x.dtype)
        zero = torch.zeros_like(lse)
        coef = torch.stack([zero, zero, grad.to(stats), lse, zero], dim=1)
        y, norm = unit_and_norm(rows, scratch) if self.unit_columns else (None, None)
        cols = self._columns(rows, x, y)
        args = (x, cols, *self._labels(labels, c0, c1), torch.zeros(x.shape[0], 3, dtype=stats, device=x.device),
                coef)
        kwargs = dict(transform=TRANSFORM_DOT, mining=MINING_NONE, params=self.params, exclude_diag=False,
                      backend=self.backend, coef_terms=0)
        if out is not None and out.dtype == x.dtype:  # the columns' gradient straight into the block of out
            gx = pe.engine_backward_into(out, *args, **kwargs)
            return gx, unit_backward_(out, y, norm, scratch=scratch) if self.unit_columns else out
        gx, gcols = pe.engine_backward_raw(*args, **kwargs)
        gcols = gcols.to(rows.dtype)
        return gx, unit_backward_(gcols, y, norm, out, scratch) if self.unit_columns else _write(gcols, out)


# `last_backend` of a grouped loss whose blocks ran as torch ops (the C++ backend on CUDA tensors or
# with fp16 / bf16: there is no grouped CUDA C++ kernel)
TORCH_BLOCKS = "blocked"


class GroupedBlock:
    """Block kernel for classes of K weight rows (SubCenterArcFace, SoftTriple): per class,
    logit_ic = scale * reduce.value(s_ic1 .. s_icK) with s the cosines of x (unit rows) and the
    class's unit rows; `reduce` maps (N, c, K) to (N, c) (`value`) and back (`grad`: the gradient
    of s from that of the value), and names itself to the C++ kernel (`kind`, `inv_gamma`).
    On the C++ backend with CPU fp32 / fp64 rows the block runs the op `dmlkern::grouped_class_lse`
    and its backward (ops/grouped_class_op.py), on the Triton backend the Triton kernel
    (triton/grouped_class.py, K <= 64; `kernel_ops`): the tiles stay in the kernel, blocks of
    BLOCK_BYTES weight rows as EngineBlock's. Otherwise (the C++ backend on CUDA tensors or with
    fp16 / bf16, and the reference's graph) torch ops: elementwise over the K slices,
    whose bits do not depend on the CPU thread count (a torch reduction over a short last dim
    does), over the block's (N, c * K) cosines (at most BLOCK_LOGITS bytes of them, `max_rows`)
    from `ops.fixed_mm` products (deterministic too). Those are the kernel's readable twin and
    the yardstick of their tests (tests/test_grouped_class_kernel.py, test_grouped_class_triton.py)."""

    def __init__(self, reduce, scale, group, backend=None):
        self.reduce, self.scale, self.group, self.backend = reduce, scale, group, backend
        self.ran = None  # after a forward: the backend whose kernel ran it ("cpp", "triton") or TORCH_BLOCKS

    def kernel_ops(self, x):
        """The module whose grouped_class_lse / grouped_class_lse_backward run blocks of rows like `x`:
        the C++ op's (the C++ backend, CPU fp32 / fp64), the Triton kernel's (the Triton backend),
        or None (torch ops)."""
        if self.backend == "cpp" and grouped_class_op.runs_kernel(x):
            return grouped_class_op
        if self.backend == "triton" and grouped_class_op.TRITON.supports(x, self.group):
            return grouped_class_op.TRITON
        return None

    def runs_kernel(self, x):
        """Whether blocks of rows like `x` run a kernel (C++ or Triton) rather than torch ops."""
        return self.kernel_ops(x) is not None

    def max_rows(self, x):
        if self.runs_kernel(x):
            return None  # the kernel tiles the block itself: no (N, rows) buffer
        return max(self.group, BLOCK_LOGITS // (max(x.shape[0], 1) * 4))

    def _op_args(self, c0):
        return c0, self.group, self.reduce.kind, self.scale, self.reduce.inv_gamma

    def _logits(self, cos, labels, c0, c1):
        s = cos.view(cos.shape[0], c1 - c0, self.group)
        value = self.reduce.value(s)
        own = torch.arange(c0, c1, device=labels.device) == labels[:, None]
        return s, value, torch.where(own, float("-inf"), self.scale * value.to(stats_dtype(cos.dtype)))

    def forward(self, x, rows, labels, c0, c1, backend=None, scratch=None):
        ops = self.kernel_ops(x) if backend != "reference" else None
        if ops is not None:  # unit rows in rows' layout: read in place
            self.ran = self.backend
            return ops.grouped_class_lse(x, unit(rows, scratch).to(x.dtype), labels, *self._op_args(c0))
        if backend != "reference":
            self.ran = TORCH_BLOCKS
        mm = (lambda a, b: a @ b.t()) if backend == "reference" else fixed_mm  # reference: differentiable
        return self.torch_lse(x, unit(rows, scratch).to(x.dtype), labels, c0, c1, mm)

    def backward(self, x, rows, labels, c0, c1, grad, lse, out=None, scratch=None):
        y, norm = unit_and_norm(rows, scratch)
        ops = self.kernel_ops(x)
        if ops is grouped_class_op and out is not None and out.dtype == x.dtype and not static_shapes():
            # the C++ op writes the rows' gradient straight into the block of out (rows' layout)
            gx = ops.grouped_class_lse_backward_into(out, x, y.to(x.dtype), labels, *self._op_args(c0), grad, lse)
            return gx, unit_backward_(out, y, norm, scratch=scratch)
        if ops is not None:
            # the C++ op gives gcols in y's layout, rows' (a block of PML's W (D, C K) is a transposed
            # view): the normalisation's backward and its write into `out` run without a transposition
            gx, gcols = ops.grouped_class_lse_backward(
                x, y.to(x.dtype), labels, *self._op_args(c0), grad, lse)
        else:
            gx, gcols = self.torch_grads(x, y.to(x.dtype), labels, c0, c1, grad, lse)
        return gx, unit_backward_(gcols.to(rows.dtype), y, norm, out, scratch)

    def torch_lse(self, x, cols, labels, c0, c1, mm=fixed_mm):
        """The block's lse in torch ops (the op grouped_class_lse's twin); cols: the classes
        c0 .. c1 - 1's unit rows in x's dtype."""
        return row_lse(self._logits(mm(x, cols), labels, c0, c1)[2])

    def torch_grads(self, x, cols, labels, c0, c1, grad, lse):
        """(grad_x, the gradient of cols) in torch ops (the op grouped_class_lse_backward's twin),
        given the gradient of lse and the full lse over every block."""
        s, value, logits = self._logits(fixed_mm(x, cols), labels, c0, c1)
        # the softmax over the other classes (0 at the own class, also when there is no other)
        weights = torch.where(torch.isneginf(logits), 0.0, torch.exp(logits - lse[:, None]))
        g = self.reduce.grad(s, value, (weights * (grad[:, None] * self.scale)).to(s.dtype))
        g = g.view(x.shape[0], -1)
        return fixed_mm(g, cols.t()), fixed_mm(g.t(), x.t())


def row_lse(t):
    """torch.logsumexp(t, dim=1); one row in chunks (a single output's reduction would be split
    by the CPU thread count past torch's grain size)."""
    if t.shape[0] != 1 or t.shape[1] <= _CHUNK:
        return torch.logsumexp(t, dim=1)
    pad = (-t.shape[1]) % _CHUNK
    chunks = torch.nn.functional.pad(t, (0, pad), value=float("-inf")).view(-1, _CHUNK)
    return torch.logsumexp(torch.logsumexp(chunks, dim=1), dim=0, keepdim=True)


def _lse_over_blocks(x, weight, labels, kernel, layout, backend=None):
    lse, scratch = None, RowsScratch()
    for c0, c1 in layout.blocks(weight, x.element_size(), kernel.max_rows(x)):
        part = kernel.forward(x, layout.block(weight, c0, c1), labels, c0, c1, backend, scratch)
        lse = part if lse is None else logaddexp(lse, part)
    return lse


class _ClassLSE(torch.autograd.Function):
    """(lse, w_t): lse_i = log sum_{j != labels[i]} exp(logit_ij) over the classes of `weight`, by
    column blocks, and w_t = layout.target(weight, labels); differentiable in x and weight.
    Backward: one kernel backward per block (the block's rows recomputed), x's gradient summed
    over the blocks in order (deterministic), weight's written block by block, then w_t's added
    to it in place: the weight gets ONE C x D gradient (a separate gather would add a second)."""

    @staticmethod
    def forward(x, weight, labels, kernel, layout):
        return _lse_over_blocks(x, weight, labels, kernel, layout), layout.target(weight, labels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, labels, kernel, layout = inputs
        ctx.save_for_backward(x, weight, labels, output[0])
        ctx.config = (kernel, layout)

    @staticmethod
    def backward(ctx, grad, grad_target):
        x, weight, labels, lse = ctx.saved_tensors
        kernel, layout = ctx.config
        needs = ctx.needs_input_grad[:2]
        if pe.backward_needs_graph(x):  # create_graph=True: the materialising reference's graph
            def forward(x, weight):
                return _lse_over_blocks(x, weight, labels, kernel, layout, backend="reference"), layout.target(weight, labels)
            return (*pe.reference_gradient(forward, (x, weight), needs, (grad, grad_target)), None, None, None)
        with torch.no_grad():
            gx, gw = blocked_backward(x, weight, labels, kernel, layout, grad, lse, needs)
            if gw is not None:
                layout.add_target_grad(gw, labels, grad_target)
        return (None if gx is None else gx.to(x.dtype)), gw, None, None, None


def blocked_backward(x, weight, labels, kernel, layout, grad, lse, needs):
    """(x's gradient in lse's dtype, the weights' gradient without the target rows' term), each
    None unless `needs` says so: x's summed over the column blocks in order, the weights' written
    block by block (its one C x D buffer)."""
    gx = torch.zeros(x.shape, dtype=lse.dtype, device=x.device) if needs[0] else None
    gw = None
    if needs[1]:  # the blocks write every row when they cover the weight: no zero fill then
        covered = layout.num_classes * layout.group == layout.rows(weight).shape[0]
        gw = torch.empty_like(weight) if covered else torch.zeros_like(weight)
    scratch = RowsScratch()
    for c0, c1 in layout.blocks(weight, x.element_size(), kernel.max_rows(x)):
        out = None if gw is None else layout.block(gw, c0, c1)
        gx_b, _ = kernel.backward(x, layout.block(weight, c0, c1), labels, c0, c1, grad, lse, out, scratch)
        if gx is not None:
            gx += gx_b
    return gx, gw


class_lse = applier(_ClassLSE)


def class_cross_entropy(target_logit, lse, dtype):
    """Per-sample cross-entropy from the target logit and the other classes' log-sum-exp, in the
    statistics dtype: log(1 + e^(lse - t)) (0 when there is no other class: lse = -inf), exactly 0
    where PML's log_softmax gives 0 (1 + e^(lse - t) rounds to 1 in `dtype`, the embeddings':
    _pml_zeros), and without t's rounding (logaddexp(t, lse) - t loses the terms below t's ulp)."""
    return _pml_zeros(_log1p_exp(lse - target_logit.to(lse.dtype)), dtype)
