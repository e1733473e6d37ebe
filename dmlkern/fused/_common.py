"""What the fused losses share: when a configuration is fusable, the backend choice, the
normalisation, the engine's rows and terms for each distance it expresses (`engine_rows`,
`value_params`), and pair counts from labels in O(N) (no N x M mask)."""
import math
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import distances as dist
from .._autograd import applier
from .._determinism import fixed_order_sum
from ..engine_spec import TRANSFORM_DOT, TRANSFORM_UNIT_DISTANCE, EngineParams, stats_dtype
from ..ops import pair_engine as pe
from ..ops import unit_rows_op
from .._tracing import forward_ad_active, static_shapes  # (the fused losses import static_shapes from here)
from ..reducers import MeanReducer

CPP_CPU_DTYPES = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def is_unit_cosine(distance):
    """Cosine similarity of L2-normalised rows (CosineSimilarity, or the default DotProductSimilarity)."""
    return (type(distance) in (dist.CosineSimilarity, dist.DotProductSimilarity)
            and distance.normalize_embeddings and distance.power == 1 and distance.is_inverted)


def _lp_distance(distance, normalize, power):
    """LpDistance with p = 2, not inverted, of this normalisation and power."""
    return (type(distance) is dist.LpDistance and bool(distance.normalize_embeddings) == normalize
            and distance.p == 2 and distance.power == power and not distance.is_inverted)


def is_unit_euclidean(distance):
    """PML's default LpDistance: Euclidean distance of L2-normalised rows, not squared."""
    return _lp_distance(distance, True, 1)


def is_raw_dot(distance):
    """DotProductSimilarity(normalize_embeddings=False): the dot product of the rows as given."""
    return (type(distance) is dist.DotProductSimilarity and not distance.normalize_embeddings
            and distance.power == 1 and distance.is_inverted)


def is_plain_mean(reducer):
    return type(reducer) is MeanReducer


def engine_backend(tensor, backend):
    """The engine backend for `tensor`, or None when only the reference can run this call."""
    chosen = pe.choose_backend(backend, tensor.device)
    if chosen == "reference":
        return None
    if tensor.device.type == "cpu" and tensor.dtype not in CPP_CPU_DTYPES:
        return None  # fp16/bf16 on CPU: no kernel, the reference handles it
    if tensor.device.type == "cuda" and tensor.dtype not in GPU_DTYPES:
        return None
    return chosen


def reference_backend_reason(backend, device):
    """Why choose_backend(backend, device) is the reference (the `last_fallback` text), or None."""
    if pe.choose_backend(backend, device) != "reference":
        return None
    if forward_ad_active():
        return "forward-mode AD (torch.func.jvp, forward_ad.dual_level: the fused kernels have no jvp)"
    if backend == "reference" or pe.resolve_backend(backend, device) == "reference":
        return "backend='reference' requested (loss.backend or DMLKERN_BACKEND)"
    return f"no pair engine for {device.type} tensors in this install"


def no_engine_reason(tensor, backend):
    """Why engine_backend(tensor, backend) is None: the `last_fallback` text (README lists them)."""
    reason = reference_backend_reason(backend, tensor.device)
    return reason or f"{tensor.dtype} on {tensor.device.type} (no kernel for that dtype there)"


def int_from_env(name, default, unit):
    """The integer environment variable `name` (default when unset), else an error naming it."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer (a count of {unit}), got {value!r}") from None


# An eager CPU call of SupCon or N-pairs (all pairs), of a loss on listed pairs or triplets (an
# indices_tuple) or of ContrastiveLoss on a PairMarginMiner's pairs with fewer pairs N x M than
# this (DMLKERN_SMALL_PAIRS; 0: never), times its path's SMALL_PROBLEM_SCALE, runs the reference,
# whose N x M matrix then costs less than these paths' fixed host cost. Where each crosses
# (2-core Xeon, fp32, D=128, forward + backward, the reference against the fused path, the
# bench's N/8 classes of 8): PairMarginMiner + Contrastive between N=80 and 96 (96: 2.16 against
# 2.01 ms), BatchHardMiner + Triplet at ~112 (1.96 against 1.96 ms), SupCon at ~128-144 (128:
# 2.06 against 2.14 ms, 160: 2.50 against 2.37), N-pairs at ~300 (256: 1.31 against 1.41 ms, 384:
# 1.92 against 1.58; PML's N-pairs builds one pair per label). Its CPU products (fixed_mm,
# fixed_cdist) and softmax keep the fused paths' bit-identity across thread counts
# (tests/test_deterministic_reference.py).
DEFAULT_SMALL_PROBLEM_PAIRS = 80 * 80
SMALL_PROBLEM_PAIRS = int_from_env("DMLKERN_SMALL_PAIRS", DEFAULT_SMALL_PROBLEM_PAIRS, "pairs")
SMALL_PROBLEM_SCALE = {"supcon": 2.5, "n_pairs": 12}  # (others: 1) N < 126 and N < 277 at the default


def small_problem(embeddings, ref_emb, path=None):
    """Why the reference runs this call of the paths above (a str), or None; path: a key of
    SMALL_PROBLEM_SCALE."""
    n, m = embeddings.shape[0], ref_emb.shape[0]
    limit = SMALL_PROBLEM_PAIRS * SMALL_PROBLEM_SCALE.get(path, 1)
    if n * m >= limit or embeddings.device.type != "cpu" or static_shapes():
        return None
    scale = f"{SMALL_PROBLEM_SCALE[path]:g} x " if path in SMALL_PROBLEM_SCALE else ""
    return (f"a small problem ({n} x {m} pairs on the CPU, under {scale}DMLKERN_SMALL_PAIRS={SMALL_PROBLEM_PAIRS}: "
            "the reference costs less than the fused path's fixed host cost)")


def decline(module, reason):
    """A fused epilogue leaves this call to the reference: records why (`last_fallback`)."""
    module.last_fallback = reason


_NORMALIZE_EPS = 1e-12  # F.normalize's default


class _UnitRows(torch.autograd.Function):
    """F.normalize(x, dim=1), i.e. x / max(|x|, eps) per row, with a short backward:
    (g - y (y . g)) / |x| where |x| >= eps (the clamp passes its gradient there, as clamp_min's
    does), g / eps elsewhere. The same forward ops; 8 backward ops instead of the 14 of
    F.normalize's graph (each a kernel launch on a GPU, in the tail after the engine's backward).
    Under create_graph=True, F.normalize's own differentiable gradient."""

    # The split form (forward without ctx, setup_context): what torch.func transforms need. The
    # norm is returned as a second, non-differentiable output so that setup_context can save it.

    @staticmethod
    def forward(x):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / norm.clamp_min(_NORMALIZE_EPS), norm

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, norm = output
        ctx.mark_non_differentiable(norm)
        ctx.set_materialize_grads(False)  # no zeros for the norm's (absent) gradient
        ctx.save_for_backward(inputs[0], y, norm)

    @staticmethod
    def backward(ctx, grad, _grad_norm):
        x, y, norm = ctx.saved_tensors
        if grad is None:
            return None
        if pe.backward_needs_graph(x):
            return pe.reference_gradient(lambda x: F.normalize(x, dim=1), (x,), (True,), grad)[0]
        with torch.no_grad():  # under torch.func.grad grad mode is on
            if unit_rows_op.runs_kernel(grad, y, norm):
                # CPU fp32 / fp64: the same formula in two sweeps, one output (dmlkern::unit_rows_backward)
                return unit_rows_op.unit_rows_backward(grad, y, norm, _NORMALIZE_EPS, torch.empty_like(grad))
            radial = (y * grad).sum(dim=1, keepdim=True) * (norm >= _NORMALIZE_EPS)
            return (grad - y * radial) / norm.clamp_min(_NORMALIZE_EPS)


def _distinct(tensors):
    """The non-None tensors, each once (ref_emb is often the embeddings themselves)."""
    return [t for i, t in enumerate(tensors) if t is not None and all(t is not u for u in tensors[:i])]


def _holds_somewhere(test, tensors):
    """Whether test(t) (a bool tensor) has a True for one of the distinct, non-None tensors: one
    host read each. detach: no graph is needed, and float() of a tensor requiring grad warns."""
    return any(bool(test(t.detach()).any()) for t in _distinct(tensors))


def has_short_rows(*tensors):
    """Whether a row is shorter than F.normalize's eps (1e-12, e.g. an all-zero row): normalised,
    it stays shorter than 1, and the unit-distance transform d = sqrt(2 - 2s) assumes unit rows
    (PML's cdist takes the true distance). Reads the values, eager only: one host read on CUDA;
    under torch.compile it can't, and such rows get d = sqrt(2 - 2s) (README)."""
    # (norm < eps), not norm.amin() < eps: a NaN row's norm would hide a short row from amin
    return not static_shapes() and _holds_somewhere(lambda t: torch.linalg.vector_norm(t, dim=1) < 1e-12, tensors)


def has_entry(test, embeddings, ref_emb=None):
    """Whether test (e.g. torch.isinf) holds for an entry of embeddings or ref_emb, eager off CUDA:
    one O(N D) read; False where `branch_free` (a host sync on CUDA, a data-dependent branch under
    torch.compile)."""
    if branch_free(embeddings):
        return False
    tensors = (embeddings, ref_emb)
    if test in (torch.isinf, torch.isnan) and all_finite_sums(tensors):
        return False
    return _holds_somewhere(test, tensors)


def all_finite_sums(tensors):
    """Whether each distinct, non-None tensor's sum is finite, which proves its every entry finite:
    one op and one host read each (~4 us at 64 x 128 on a CPU, where isinf(t).any() takes ~20). A
    non-finite sum (an inf or NaN entry, or finite entries that overflow) proves nothing."""
    return all(math.isfinite(float(t.detach().sum())) for t in _distinct(tensors))


_apply_unit_rows = applier(_UnitRows)


def unit_rows(x, full_precision=False):
    """The rows of x scaled to unit L2 norm, as F.normalize(x, dim=1); under torch.autocast in the
    engine's autocast dtype (pe.autocast_rows), matmul's rule, as PML's CosineSimilarity.
    full_precision=True: no autocast rounding, fp16 / bf16 rows widened to fp32 under autocast: the
    rows of a Euclidean distance (PML's torch.cdist, which autocast runs in fp32, as CUDA's
    autocast F.normalize's norm) and of PML's elementwise products (AngularLoss's u_a . u_p)."""
    if not full_precision:
        return pe.autocast_rows(_apply_unit_rows(x)[0])
    if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
        x = x.float()
    return _apply_unit_rows(x)[0]


SHORT_ROWS = "an embedding row shorter than 1e-12 (e.g. all zeros) with a Euclidean fused loss"
RAW_EUCLIDEAN_DTYPE = "LpDistance(normalize_embeddings=False) in {} (the fused path runs it on fp32 / fp64 rows)"


class EngineRows(NamedTuple):
    """What the engine reads for a distance: its query rows x, reference rows y (y is x when the
    pairs are those of one tensor with itself, for the symmetric kernels) and the transform that
    gives the distance's value from their dot products."""
    x: torch.Tensor
    y: torch.Tensor
    transform: int


# The distances the engine expresses: kind -> (test, rows, transform, scale, shift). rows: "unit"
# (F.normalize'd), "unit_cdist" (the same without autocast's rounding: `unit_rows`), "raw" (as
# given) or "augmented" (`euclidean_rows`: s = 1 - |x - y|^2 / 2). The
# distance's value (PML's matrix entry) is scale * v + shift, v the engine's value of the rows'
# dot product s: s itself (transform 0) or d = sqrt(max(2 - 2s, 0)) (transform 1); the squared
# distances are d^2 = 2 - 2s (transform 0, scale -2, shift 2).
_KINDS = {
    "unit_cosine": (is_unit_cosine, "unit", TRANSFORM_DOT, 1.0, 0.0),
    "raw_dot": (is_raw_dot, "raw", TRANSFORM_DOT, 1.0, 0.0),
    "unit_euclidean": (is_unit_euclidean, "unit_cdist", TRANSFORM_UNIT_DISTANCE, 1.0, 0.0),
    "raw_euclidean": (lambda d: _lp_distance(d, False, 1), "augmented", TRANSFORM_UNIT_DISTANCE, 1.0, 0.0),
    "unit_squared_euclidean": (lambda d: _lp_distance(d, True, 2), "unit_cdist", TRANSFORM_DOT, -2.0, 2.0),
    "raw_squared_euclidean": (lambda d: _lp_distance(d, False, 2), "augmented", TRANSFORM_DOT, -2.0, 2.0),
}
DOT_KINDS = ("unit_cosine", "raw_dot")  # the similarities: for the losses written for cosine
DISTANCE_KINDS = ("unit_euclidean", "raw_euclidean")  # d itself (transform 1): not squared


def engine_distance(distance):
    """The `_KINDS` name of `distance`, or None (the engine doesn't express it: the reference runs)."""
    return next((kind for kind, (test, *_) in _KINDS.items() if test(distance)), None)


def engine_transform(distance):
    """The engine's transform for `distance` (`_KINDS`)."""
    return _KINDS[engine_distance(distance)][2]


def value_params(distance, sc_pos=0.0, off_pos=0.0, sc_neg=0.0, off_neg=0.0, eps=0.0):
    """EngineParams for the logits / hinge terms sc * value + off written on the distance's own
    value, as the engine's sc' * v + off' (value = scale * v + shift)."""
    _, _, _, scale, shift = _KINDS[engine_distance(distance)]
    return EngineParams(sc_pos=sc_pos * scale, off_pos=off_pos + sc_pos * shift, sc_neg=sc_neg * scale,
                        off_neg=off_neg + sc_neg * shift, eps=eps)


def matrix_dtype(distance, rows):
    """The dtype of PML's distance matrix for these rows (embeddings, or their `engine_rows`): under
    torch.autocast a similarity (a matmul) comes out in the autocast dtype and a Euclidean distance
    (cdist) in fp32, fp64 staying fp64; outside autocast (or for a distance the engine does not
    express), the rows' dtype."""
    kind = engine_distance(distance)
    if rows.dtype == torch.float64 or kind is None or not torch.is_autocast_enabled(rows.device.type):
        return rows.dtype
    if _KINDS[kind][1] in ("unit", "raw"):
        return torch.get_autocast_dtype(rows.device.type)
    return torch.float32


def engine_rows_reason(distance, embeddings, ref_emb, kinds=None):
    """Why `engine_rows` can't take this call (the `last_fallback` text), or None. kinds: the
    `engine_distance` kinds the loss's passes allow (default: all)."""
    kind = engine_distance(distance)
    if kind is None:
        return f"non-default distance {type(distance).__name__}"
    if kinds is not None and kind not in kinds:
        what = kind.replace("_", " ")
        return f"non-default distance {type(distance).__name__} ({what}: not on this loss's fused path)"
    if _KINDS[kind][1] == "augmented" and embeddings.dtype not in CPP_CPU_DTYPES:
        return RAW_EUCLIDEAN_DTYPE.format(embeddings.dtype)  # |x|^2 / 2 would cancel at half precision
    if kind in ("unit_euclidean", "unit_squared_euclidean") and has_short_rows(embeddings, ref_emb):
        return SHORT_ROWS  # d^2 = 2 - 2s assumes unit rows
    return None


def engine_rows(distance, embeddings, ref_emb):
    """The engine's rows and transform for `distance` (`engine_rows_reason` None for it; `_KINDS`):
    - cosine: unit rows, transform 0; the raw dot product: the rows as given, transform 0;
    - unit-Euclidean: unit rows, transform 1 (d = sqrt(2 - 2s)), squared: transform 0 (2 - 2s);
    - raw Euclidean: augmented rows (`euclidean_rows`), whose dot products are 1 - |x - y|^2 / 2,
      transform 1 (squared: transform 0). Rows and columns then differ (no symmetric kernels); the
      self pairs excluded by the masks are still those of equal index.
    Build the pass's params with `value_params` (the squared distances' scale and shift)."""
    _, rows, transform, _, _ = _KINDS[engine_distance(distance)]
    if rows == "augmented":
        return EngineRows(*euclidean_rows(embeddings, ref_emb), transform)
    rows = {"unit": unit_rows, "unit_cdist": lambda t: unit_rows(t, full_precision=True), "raw": pe.autocast_rows}[rows]
    x = rows(embeddings)
    return EngineRows(x, x if ref_emb is embeddings else rows(ref_emb), transform)


def widened(embeddings, ref_emb):
    """(embeddings, ref_emb) in the statistics dtype: fp16 / bf16 widened to fp32, for the blocked
    and listed torch paths that compute in fp32 and return the loss in the embeddings' dtype;
    ref_emb stays the same tensor as embeddings when it was."""
    wide = stats_dtype(embeddings.dtype)
    emb_w = embeddings.to(wide)
    return emb_w, emb_w if ref_emb is embeddings else ref_emb.to(wide)


def column_nanmedian(t):
    """torch.nanmedian(t, dim=0).values. On CUDA from a sort instead: nanmedian's CUDA kernel (which
    also returns indices) has no deterministic version, and raises under
    torch.use_deterministic_algorithms(True)."""
    if t.device.type != "cuda":
        return torch.nanmedian(t, dim=0).values
    return sorted_nanmedian(t)


def sorted_nanmedian(t):
    """Each column's median over its non-NaN values, the lower middle one for an even count (as
    torch.median); NaN for an all-NaN column. NaN sorts last."""
    count = (~torch.isnan(t)).sum(dim=0)
    middle = (count - 1).clamp(min=0) // 2
    return torch.sort(t, dim=0).values.gather(0, middle[None]).squeeze(0)


def euclidean_rows(embeddings, ref_emb):
    """(x~, y~) with x~_i . y~_j = 1 - |x_i - y_j|^2 / 2 (so sqrt(2 - 2 s) is the distance):
    x~ = [x, 1 - |x|^2 / 2, 1], y~ = [y, 1, -|y|^2 / 2], autograd through the augmentation giving
    the gradients. Both sides are first shifted by the reference rows' per-coordinate median
    (detached: distances don't depend on it), so the norms, and the cancellation of |x|^2 + |y|^2
    - 2 x.y, are those of the data's spread rather than of its offset (PML's torch.cdist cancels
    on the raw norms). The rows stay in the input dtype (fp32 / fp64): no autocast rounding, as
    cdist (autocast runs it in fp32)."""
    with torch.no_grad():
        if ref_emb.shape[0] == 0:
            center = ref_emb.new_zeros(ref_emb.shape[1])
        else:  # NaN rows ignored; a column of NaN or inf: no shift there
            center = column_nanmedian(ref_emb.detach())
            center = torch.nan_to_num(center, nan=0.0, posinf=0.0, neginf=0.0)
    x = embeddings - center
    y = x if ref_emb is embeddings else ref_emb - center
    ones_x, ones_y = x.new_ones(x.shape[0], 1), y.new_ones(y.shape[0], 1)
    half_sq_x = (x * x).sum(dim=1, keepdim=True) * 0.5  # one output per row: one thread each
    half_sq_y = half_sq_x if y is x else (y * y).sum(dim=1, keepdim=True) * 0.5
    return torch.cat([x, 1 - half_sq_x, ones_x], dim=1), torch.cat([y, ones_y, -half_sq_y], dim=1)


def _computed_once(fn):
    """A property computed on first read (functools.cached_property takes a lock that
    torch.compile cannot trace)."""
    def get(self):
        if fn.__name__ not in self._cache:
            self._cache[fn.__name__] = fn(self)
        return self._cache[fn.__name__]

    return property(get, doc=fn.__doc__)


class LabelStats:
    """Per query row: the number of same-label reference rows (self-pair removed when the
    labels are one tensor, as the losses exclude it then) and of different-label ones, in
    O((N + M) log M) with static shapes (sort + searchsorted, so torch.compile can trace it).
    Lazy: each statistic is computed when first read, so only the ones a loss needs are, and
    (see Degenerate) after its kernels are launched. `run_q` / `run_r`: where each query /
    reference row's label run starts among the sorted reference labels, an id for per-class sums."""

    def __init__(self, labels, ref_labels, exclude_diag=None):
        self.labels, self.ref_labels = labels, ref_labels
        # exclude_diag with two tensors: pair (i, i) is a self comparison, its labels equal
        # (`AllPairsPlan`); by default the self pairs are excluded when the labels are one tensor.
        self.exclude_diag = ref_labels is labels if exclude_diag is None else exclude_diag
        self.n, self.m = labels.shape[0], ref_labels.shape[0]
        self._cache = {}

    @_computed_once
    def sorted_ref(self):
        return torch.sort(self.ref_labels).values

    @_computed_once
    def run_q(self):
        return torch.searchsorted(self.sorted_ref, self.labels)

    @_computed_once
    def run_r(self):
        return self.run_q if self.ref_labels is self.labels else torch.searchsorted(self.sorted_ref, self.ref_labels)

    @_computed_once
    def same(self):
        return torch.searchsorted(self.sorted_ref, self.labels, right=True) - self.run_q

    @_computed_once
    def pos(self):
        return self.same - 1 if self.exclude_diag else self.same

    @_computed_once
    def same_total(self):
        return self.same.sum()

    @_computed_once
    def pos_total(self):
        """The number of positive pairs in the batch (0-dim tensor)."""
        return self.same_total - self.n if self.exclude_diag else self.same_total

    @_computed_once
    def neg_total(self):
        return self.n * self.m - self.same_total


def class_sums_for_rows(stats, y):
    """For each query row, the sum of the reference rows y with its label (0 if none): O(M D)."""
    sums = y.new_zeros(y.shape[0] + 1, y.shape[1]).index_add(0, stats.run_r, y)
    # index_select, not sums[run_q]: the gather's backward sums each class's many rows, and
    # indexing's backward (index_put_ with accumulate) does it with parallel atomic adds on a
    # CPU (fp32): bits change between calls and thread counts. index_select's backward is
    # index_add, serial over the index on a CPU (as the index_add above): deterministic.
    return sums.index_select(0, stats.run_q) * (stats.same > 0).to(y.dtype)[:, None]


def short_circuit(stats):
    """PML's `len <= 1` rule on all pairs from labels: at most one positive and one negative
    pair. A 0-dim bool tensor (no host sync under torch.compile)."""
    return (stats.pos_total <= 1) & (stats.neg_total <= 1)


def no_pos_or_neg(stats):
    """No positive pair, or no negative pair, anywhere in the batch (0-dim bool tensor)."""
    return (stats.pos_total == 0) | (stats.neg_total == 0)


def branch_free(like):
    """No data-dependent branch for tensors like `like`: under torch.compile, and on CUDA
    (a branch on a value would sync the host with the GPU)."""
    return static_shapes() or like.is_cuda


class Degenerate:
    """Whether a batch is degenerate, i.e. its loss is the reference's zero loss: the OR of its
    terms (`include`). A term is a Python bool decided from shapes (no work), or a function
    returning a 0-dim bool tensor computed from the labels or the kernels' statistics.

    Eager on the CPU it is decided at once: `returns_zero_now()` is True for a degenerate batch
    and the caller returns before any kernel runs (last_backend "zero"). On CUDA tensors (a
    branch would sync the host with the GPU) and under torch.compile (no data-dependent branch)
    only the Python terms can return early; `zero_where(losses)` zeroes the losses with
    torch.where for the tensor terms (the same value; gradient 0). These are computed only there,
    after the caller has launched its kernels: the GPU starts on them while the host issues
    these small ops."""

    def __init__(self, like, term):
        self.branchless = branch_free(like)
        self.known = False
        self._pending, self._value = [], None
        self.include(term)

    def include(self, term):
        if isinstance(term, bool):
            self.known = self.known or term
        else:
            self._pending.append(term)

    def _tensor_value(self):
        for compute in self._pending:
            term = compute()
            self._value = term if self._value is None else self._value | term
        self._pending = []
        return self._value

    def now(self):
        """Decided at once (a host sync on a GPU): for eager-only paths."""
        value = self._tensor_value()
        return self.known or (value is not None and bool(value))

    def returns_zero_now(self):
        return self.known or (not self.branchless and self.now())

    def zero_where(self, losses):
        if not self.branchless:
            return losses  # decided already: returns_zero_now() was False
        value = self._tensor_value()
        return losses if value is None else torch.where(value, 0.0, losses)


class AllPairsPlan:
    """How a fused pair loss runs PML's all-pairs tuple (`lazy_pairs.LazyAllPairs`: every pair of
    the N query rows with the M reference rows, less each row's self comparison when the tuple has
    a `self_offset`) on the engine, without listing a pair.

    `ref_emb` / `ref_labels` are the reference rows and labels rolled so that query row i's own
    copy is reference row i (`LazyAllPairs.rolled`): the self comparisons are the diagonal, which
    the engine's `exclude_diag` drops from the positives (they are positive pairs: a row's own copy
    has its label). `labels` / `ref_labels` are the tuple's (int64 ids, the loss's own labels
    compared the same way). `stats` counts the tuple's pairs (`LabelStats`).

    PML's degenerate rules for the tuple (`pair_rule`, `pair_rule_or_no_pos_or_neg`) are decided
    from `stats.pos_total` / `stats.neg_total`: the counts over every listed pair."""

    def __init__(self, pairs, ref_emb):
        self.labels, ref_labels = pairs.mining_labels()
        self.exclude_diag = pairs.self_offset is not None
        self.ref_emb, self.ref_labels = pairs.rolled(ref_emb), pairs.rolled(ref_labels)
        self.stats = LabelStats(self.labels, self.ref_labels, exclude_diag=self.exclude_diag)

    def pair_rule(self):
        """PML's `len <= 1` rule: at most one positive and one negative pair (a Degenerate term)."""
        return lambda: short_circuit(self.stats)

    def pair_rule_or_no_pos_or_neg(self):
        """PML's `len <= 1` rule, or no positive or no negative pair at all (SupCon, NT-Xent)."""
        return lambda: short_circuit(self.stats) | no_pos_or_neg(self.stats)


def all_pairs_plan(indices_tuple, embeddings, ref_emb):
    """An `AllPairsPlan` when indices_tuple is the lazy all-pairs tuple (`lazy_pairs.LazyAllPairs`)
    of these row counts, else None (any other tuple: the loss's listed or reference path)."""
    from .lazy_pairs import LazyAllPairs

    if not isinstance(indices_tuple, LazyAllPairs) or not indices_tuple.shape_matches(embeddings, ref_emb):
        return None
    return AllPairsPlan(indices_tuple, ref_emb)


ROW_BLOCK_VALUES = 1 << 20  # pair values per row block of the blocked paths (4 MiB in fp32)
# on a GPU, fewer and larger blocks: each of a block's torch ops is a kernel launch (ranking.py's
# blocks alike); 64 MiB per fp32 (rows, M) tensor
GPU_ROW_BLOCK_VALUES = 1 << 24


def block_values(device=None):
    """Pair values per row block on `device`: ROW_BLOCK_VALUES on the CPU (and when not given),
    GPU_ROW_BLOCK_VALUES elsewhere."""
    return ROW_BLOCK_VALUES if device is None or torch.device(device).type == "cpu" else GPU_ROW_BLOCK_VALUES


# Against more than WIDE_COLUMNS columns a block has at least MIN_BLOCK_ROWS rows (as long as that
# is within 16 block_values): a block's product reads all of y, so fewer rows make skinny products
# that re-read it block after block (N = 65536, D = 128, fwd+bwd on 2 CPU cores: 16-row blocks took
# ContrastiveLoss + its miner 30 s and TripletMarginLoss 140 s; 128-row blocks 12.5 s and 68 s).
MIN_BLOCK_ROWS, WIDE_COLUMNS = 128, 1 << 14


def block_rows(m, device=None):
    """Rows of a block of about `block_values(device)` pair values against m columns (at least 1;
    past WIDE_COLUMNS columns at least MIN_BLOCK_ROWS, within 16 block_values)."""
    values = block_values(device)
    rows = values // max(1, m)
    if m > WIDE_COLUMNS:
        rows = max(rows, min(MIN_BLOCK_ROWS, 16 * values // m))
    return max(1, rows)


def row_blocks(n, m, device=None):
    """(r0, r1) row blocks of `block_rows(m, device)` rows each, in order."""
    step = block_rows(m, device)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


class Buffers:
    """Named scratch buffers of one blocked call, reused block after block: `get(name, rows, cols)`
    is a (rows, cols) view of the name's buffer, grown when too small, its contents whatever was
    written last. A fresh (rows x M) buffer per block costs its page faults (~as much as the
    block's product where freed memory goes back to the OS, as under MALLOC_MMAP_THRESHOLD_);
    `fixed_mm(..., out=)` writes into these instead."""

    def __init__(self, like):
        self._like = like
        self._store = {}

    def get(self, name, rows, cols):
        buf = self._store.get(name)
        if buf is None or buf.numel() < rows * cols:
            buf = self._store[name] = None  # the old one freed first
            self._store[name] = buf = self._like.new_empty(rows * cols)
        return buf[:rows * cols].view(rows, cols)


def row_sums(t):
    """Per-row sums whose bits don't depend on the CPU thread count (torch splits a reduction with
    one output over threads; with several outputs each output has one thread)."""
    if t.shape[0] == 1:
        return fixed_order_sum(t).reshape(1)
    return t.sum(dim=1)


def block_masks(labels_b, ref_labels, row0, exclude_diag):
    """(positive, negative) pair masks of a row block starting at row row0 against ref_labels."""
    same = labels_b[:, None] == ref_labels[None, :]
    pos = same.clone()
    if exclude_diag:
        rows = torch.arange(len(labels_b), device=same.device)
        pos[rows, rows + row0] = False
    return pos, ~same


def reduced_sub_loss(kind, total, nonzero, count, reducer, embeddings):
    """A sub-loss's reduced value from its total, its number of losses > 0 and of terms (pairs or
    triplets): kind "sum", "mean", else AvgNonZero."""
    if kind == "sum":
        return total
    if kind == "mean":  # over every pair, zeros included; no pair: the sum is 0
        return total / count.clamp(min=1).to(total.dtype)
    # AvgNonZero: the mean of the losses > 0; none: the reducer's grad-carrying zero
    return value_or_zero(nonzero > 0, total / nonzero.clamp(min=1), reducer, embeddings)


def value_or_zero(has_terms, value, reducer, embeddings):
    """value where has_terms (a 0-dim bool tensor), else the reducer's grad-carrying zero. Eager off
    CUDA by PML's branch, so that the zero's graph is PML's: it leaves the terms out, so a ref_emb
    or a parameter only they read gets no gradient, and a NaN term none; a select where
    `branch_free`."""
    zero = reducer.zero_loss(embeddings).to(value.dtype)
    if not branch_free(value):
        return value if bool(has_terms) else zero
    return torch.where(has_terms, value, zero)
