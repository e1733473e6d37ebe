"""RankedListLoss, FastAPLoss, HistogramLoss and SmoothAPLoss without an N x N matrix.

Each loss is a function of per-row statistics of one similarity row s_i = x_i . X (unit rows):
RankedList's weighted sums (4 per row), FastAP's soft histograms of the distances to the
positives and to the negatives (2 (num_bins + 1) per row), Histogram's soft histograms of the
positive and negative similarities of the pairs (i, j > i) (2 (n_bins + 1) per row, summed over
rows afterwards), SmoothAP's AP (1 per row, from a (g, N) block of sigmoids per anchor).
`_RowStats` walks row blocks of a few MiB (`fixed_mm` products: deterministic), writes each
block's statistics, and keeps only x: memory O(B N + N k + N D). Its backward recomputes each
block and differentiates the block's statistics with autograd (the reference's own ops, so the
gradient is PML's), or with SmoothAP's hand-written one (its autograd graph would hold several
(B, g, N) tensors); grad_x gets g_s @ X for the block's rows and g_sᵀ @ x_b for all rows, the
blocks added in order: bit-identical at any CPU thread count. The histograms add each value's
two non-zero bins per row (`_binned_row_sums`: scatter_add along the row on a CPU, masked
reductions elsewhere, where scatter_add's atomics would vary the order). The loss from the
statistics is plain autograd on O(N k) tensors, written as the reference writes it. Blocks hold
~1M values on a CPU, ~16M on a GPU (fewer kernel launches). FastAP and SmoothAP read a listed
indices_tuple as PML does, as per-query weights; any other indices_tuple, ref_emb, other
distances, other dtypes and torch.compile run the reference.
"""
import torch

from .._autograd import applier, vjp
from .._determinism import fixed_order_sum
from .._tracing import static_shapes
from ..engine_spec import stats_dtype
from ..ops import pair_engine as pe
from ..ops.fixed_mm_op import fixed_mm
from ..reference.indices import convert_to_weights
from ..reference.ranking_losses import ranked_list_weights
from . import _common
from ._common import decline, is_unit_cosine, is_unit_euclidean, reference_backend_reason, row_sums, unit_rows
from ._common import SHORT_ROWS
from ._epilogue import ZERO_LOSS
from ._stats import record_distance
from .lazy_pairs import LazyMined
from .pair_lists import unit_distance

BACKEND = "blocked"
_BLOCK_VALUES = 1 << 20  # live values of one block's largest intermediate (4 MiB in fp32)
_GPU_BLOCK_VALUES = 1 << 24  # on a GPU, fewer and larger blocks (each op is a kernel launch)
_SCATTER_DEVICE_TYPES = ("cpu",)  # where scatter_add along a row sums in a fixed order


def _binned_row_sums(bins, weights, n_bins):
    """(B, n_bins): per row, the sum of the weights falling in each bin (bins: (B, N) ids), in an
    order fixed by the data: on a CPU scatter_add along the row (one thread per row); elsewhere
    scatter_add's atomics would make the order vary: `_BinnedSums`."""
    if weights.device.type in _SCATTER_DEVICE_TYPES:
        return weights.new_zeros(weights.shape[0], n_bins).scatter_add(1, bins, weights)
    return _apply_binned_sums(bins, weights, n_bins)


class _BinnedSums(torch.autograd.Function):
    """scatter_add's binned row sums as reductions (a fixed order): the weights spread over a
    (rows, N, n_bins) tensor, zero off their bin, summed over N, a few rows at a time; the
    gradient is a gather."""

    @staticmethod
    def forward(bins, weights, n_bins):
        out = weights.new_empty(weights.shape[0], n_bins)
        bin_ids = torch.arange(n_bins, device=bins.device)
        step = max(1, _GPU_BLOCK_VALUES // max(1, weights.shape[1] * n_bins))
        for r0 in range(0, weights.shape[0], step):
            spread = torch.where(bins[r0:r0 + step, :, None] == bin_ids, weights[r0:r0 + step, :, None], 0)
            out[r0:r0 + step] = spread.sum(dim=1)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        (bins,) = ctx.saved_tensors
        return None, None if grad is None else grad.gather(1, bins), None


_apply_binned_sums = applier(_BinnedSums)


class _BlockOutOfRange(Exception):
    """A block found a value the reference can't take (HistogramLoss: outside [-1, 1] or NaN)."""


class _RowStats(torch.autograd.Function):
    """stats (N, k) = spec.rows(x[b] @ xᵀ, b) over row blocks b, differentiable in x."""

    @staticmethod
    def forward(x, spec):
        n = x.shape[0]
        out = torch.empty(n, spec.width, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for r0, r1 in spec.blocks(n, x.device):
                out[r0:r1] = spec.rows(fixed_mm(x[r0:r1], x), r0)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.spec = inputs[1]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        spec = ctx.spec
        if grad is None:
            return None, None
        if pe.backward_needs_graph(x):  # a differentiable gradient: all rows as one block
            return pe.reference_gradient(lambda x: spec.rows(x @ x.T, 0, differentiable=True),
                                         (x,), (True,), grad)[0], None
        grad_x = torch.zeros_like(x)
        with torch.no_grad():
            for r0, r1 in spec.blocks(x.shape[0], x.device):
                xb = x[r0:r1]
                g_s = spec.grad_rows(fixed_mm(xb, x), r0, grad[r0:r1])
                grad_x[r0:r1] += fixed_mm(g_s, x.T)
                grad_x += fixed_mm(g_s.T, xb.T)
        return grad_x, None


row_stats = applier(_RowStats)


class _Spec:
    """One loss's per-row statistics: `rows(s, r0)` for the block of rows r0.. with similarity
    rows s (B, N) gives (B, width); `grad_rows` their vector-Jacobian product in s."""
    width = 1
    values_per_row = 1  # live values per (row, column) of a block, relative to s

    def blocks(self, n, device):
        values = _BLOCK_VALUES if device.type == "cpu" else _GPU_BLOCK_VALUES
        step = max(1, values // max(1, n * self.values_per_row))
        for r0 in range(0, n, step):
            yield r0, min(n, r0 + step)

    def grad_rows(self, s, r0, g_out):
        """By autograd through `rows` on the recomputed block (`_autograd.vjp`: also inside
        torch.func transforms)."""
        return vjp(lambda s: self.rows(s, r0, differentiable=True), s, g_out)


def _block_labels(labels, r0, n_rows):
    """(same label, self pair) masks of the rows r0 .. r0 + n_rows against every row."""
    rows = torch.arange(r0, r0 + n_rows, device=labels.device)
    cols = torch.arange(labels.shape[0], device=labels.device)
    return labels[r0:r0 + n_rows, None] == labels[None, :], rows[:, None] == cols[None, :]


def _dense_ids(labels):
    """The labels as ids 0 .. C-1 (equal where the labels are), and the C class sizes."""
    _, ids, sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    return ids, sizes


class ClassMembers:
    """Each row's class members (the rows of its label, in row order), as (B, P) column indices per
    block of rows, P the largest class: PNP's and DynamicSoftMargin's per-row slots."""

    def __init__(self, labels):
        self.ids, self.sizes = _dense_ids(labels)
        self.order = torch.sort(self.ids, stable=True)[1]  # class c: order[starts[c]:starts[c] + sizes[c]]
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.width = int(self.sizes.max()) if len(labels) else 1

    def block(self, r0, b, exclude_self):
        """(cols, real) for rows r0 .. r0 + b: each row's members (padded with the row itself) and
        which slots hold one (exclude_self: not the row itself)."""
        device = self.ids.device
        rows = torch.arange(r0, r0 + b, device=device)[:, None]
        ids = self.ids[r0:r0 + b]
        slot = torch.arange(self.width, device=device)
        real = slot < self.sizes[ids][:, None]
        at = (self.starts[ids][:, None] + torch.where(real, slot, 0)).clamp(max=len(self.order) - 1)
        cols = torch.where(real, self.order[at], rows)
        return cols, (real & (cols != rows)) if exclude_self else real


def _common_checks(module, embeddings, labels, indices_tuple, ref_emb, weights_only=False):
    """Why the blocked path can't take the call, or None. `weights_only`: the loss reads an
    indices_tuple only as per-query weights (PML's convert_to_weights), so a listed one is fine."""
    if ref_emb is not embeddings:
        return "ref_emb (these losses take none; the module raises PML's error before this path)"
    if reason := reference_backend_reason(module.backend, embeddings.device):
        return reason
    if labels is None:
        return "no labels (pairs from indices_tuple only)"
    if indices_tuple is not None and not (weights_only and not isinstance(indices_tuple, LazyMined)):
        return "an indices_tuple (the blocked path takes every pair)"
    if static_shapes():
        return "torch.compile (the blocked ranking losses have data-dependent shapes)"
    if embeddings.dtype not in (torch.float32, torch.float64):
        return f"dtype {embeddings.dtype} (the blocked ranking losses run fp32 / fp64)"
    return None


def _checks_and_kind(module, embeddings, labels, indices_tuple, ref_emb):
    """(why the blocked path can't take the call or None, the distance kind) for the losses on
    the unit Euclidean distance or the cosine (RankedList, Histogram)."""
    why = _common_checks(module, embeddings, labels, indices_tuple, ref_emb)
    kind = _distance_kind(module.distance)
    if why is None and kind is None:
        why = f"distance {type(module.distance).__name__} (not unit Euclidean / cosine)"
    if why is None and kind == "euclidean" and _common.has_short_rows(embeddings):
        why = SHORT_ROWS
    return why, kind


def _rows_of(embeddings, kind):
    return unit_rows(embeddings, full_precision=kind == "euclidean").to(stats_dtype(embeddings.dtype))


# =============================================================================== RankedList
class _RankedListSpec(_Spec):
    width = 4
    values_per_row = 8

    def __init__(self, labels, euclidean, margin, alpha, Tp, Tn):
        self.labels, self.euclidean = labels, euclidean
        self.margin, self.alpha, self.Tp, self.Tn = margin, alpha, Tp, Tn

    def rows(self, s, r0, differentiable=False):
        """Per row: sum w_p (d - (alpha - margin)), sum (w_p + 1e-5), the same two for the
        negatives; the reference's expressions, elementwise on the block."""
        same, diag = _block_labels(self.labels, r0, s.shape[0])
        d = unit_distance(s) if self.euclidean else s
        mat = d - d * diag.to(d.dtype)  # PML's mat - mat * eye
        pos_limit, alpha = self.alpha - self.margin, self.alpha
        neg_star = torch.where(~same & (mat < alpha), mat, 0)
        pos_star = torch.where(same & ~diag & (mat > pos_limit), mat, 0)
        w_p, w_n = ranked_list_weights(pos_star, neg_star, pos_limit, alpha, self.Tp, self.Tn)
        return torch.stack([row_sums(w_p * (pos_star - pos_limit)), row_sums(w_p + 1e-5),
                            row_sums(w_n * (alpha - neg_star)), row_sums(w_n + 1e-5)], dim=1)


def ranked_list(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why, kind = _checks_and_kind(module, embeddings, labels, indices_tuple, ref_emb)
    if why is not None:
        return decline(module, why)
    record_distance(module.distance, embeddings, embeddings)
    spec = _RankedListSpec(labels, kind == "euclidean", module.margin, module.alpha, module.Tp, module.Tn)
    stats = row_stats(_rows_of(embeddings, kind), spec).to(embeddings.dtype)
    loss_p = stats[:, 0] / stats[:, 1]
    loss_n = stats[:, 2] / stats[:, 3]
    losses = (1 - module.imbalance) * loss_p + module.imbalance * loss_n
    indices = torch.arange(len(losses), device=losses.device)
    return {"loss": {"losses": losses, "indices": indices, "reduction_type": "element"}}, BACKEND


def _distance_kind(distance):
    if is_unit_euclidean(distance):
        return "euclidean"
    if is_unit_cosine(distance):
        return "cosine"
    return None


# =============================================================================== FastAP
class _FastAPSpec(_Spec):
    values_per_row = 8

    def __init__(self, labels, power, num_bins, dtype, device):
        self.labels, self.power = labels, power
        hist_max = 2 ** power
        self.delta = hist_max / num_bins
        self.edges = torch.linspace(0.0, hist_max, steps=num_bins + 1, device=device, dtype=dtype)
        self.width = 2 * (num_bins + 1)

    def rows(self, s, r0, differentiable=False):
        """Per row: the positives' histogram (num_bins + 1 edges), then the negatives'. A distance's
        triangular pulse relu(1 - |d - edge| / delta) (the reference's expression) is non-zero at
        the two edges around it only: those two, added by scatter_add into each row's bins."""
        same, diag = _block_labels(self.labels, r0, s.shape[0])
        # PML's distance: cdist (no gradient at 0), squared for power 2
        d = torch.relu(2 - 2 * s) if self.power == 2 else unit_distance(s)
        pos, neg = (same & ~diag).to(d.dtype), (~same).to(d.dtype)
        n_edges = len(self.edges)
        lower = torch.floor(torch.nan_to_num(d / self.delta)).clamp(0, n_edges - 2).to(torch.long)
        # a NaN distance makes its row's every bin NaN in the reference (NaN * 0 in the masked sums)
        nan_rows = row_sums(d * 0).unsqueeze(1)
        pos_hist, neg_hist = 0, 0
        for edge_index in (lower, lower + 1):
            pulse = torch.relu(1 - torch.abs(d - self.edges[edge_index]) / self.delta)
            pos_hist = pos_hist + _binned_row_sums(edge_index, pulse * pos, n_edges)
            neg_hist = neg_hist + _binned_row_sums(edge_index, pulse * neg, n_edges)
        return torch.cat([pos_hist + nan_rows, neg_hist + nan_rows], dim=1)


def fast_ap(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why = _common_checks(module, embeddings, labels, indices_tuple, ref_emb, weights_only=True)
    power = module.distance.power
    if why is None and not (type(module.distance).__name__ == "LpDistance" and module.distance.normalize_embeddings
                            and module.distance.p == 2 and not module.distance.is_inverted and power in (1, 2)):
        why = f"distance {type(module.distance).__name__} with power {power} (the blocked path: 1 or 2)"
    if why is None and _common.has_short_rows(embeddings):
        why = SHORT_ROWS
    if why is not None:
        return decline(module, why)
    dtype = embeddings.dtype
    miner_weights = convert_to_weights(indices_tuple, labels, dtype=dtype)
    labels, class_sizes = _dense_ids(labels)
    n_pos = (class_sizes[labels] - 1).to(dtype)  # PML's sum of I_pos per row
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return ZERO_LOSS
    record_distance(module.distance, embeddings, embeddings)
    spec = _FastAPSpec(labels, int(power), module.num_bins, stats_dtype(dtype), embeddings.device)
    hist = row_stats(_rows_of(embeddings, "euclidean"), spec).to(dtype)
    pos_hist, neg_hist = hist.chunk(2, dim=1)
    # the reference's epilogue (reference.ranking_losses.fast_ap_loss_dict)
    total_pos = torch.cumsum(pos_hist, dim=1)
    total = torch.cumsum(pos_hist + neg_hist, dim=1)
    h_pos = pos_hist * total_pos
    valid = (h_pos > 0) & (total > 0)
    if not bool(valid.any()):
        return ZERO_LOSS
    fast_ap_sum = torch.where(valid, h_pos / torch.where(valid, total, torch.ones_like(total)), 0).sum(dim=1)
    losses = (1 - fast_ap_sum[has_pos] / n_pos[has_pos]) * miner_weights[has_pos]
    return {"loss": {"losses": losses, "indices": torch.where(has_pos)[0], "reduction_type": "element"}}, BACKEND


# =============================================================================== Histogram
class _HistogramSpec(_Spec):
    values_per_row = 8

    def __init__(self, labels, has_pos, delta, euclidean):
        self.labels, self.has_pos, self.delta, self.euclidean = labels, has_pos, delta, euclidean
        self.nodes = round(1 + 2 / delta)
        self.width = 2 * self.nodes

    def rows(self, s, r0, differentiable=False):
        """Per row i: the soft histograms (PML's compute_density before the division by the
        number of values) of its positive, then its negative pairs (i, j > i). The pairs of PML's
        triplets: every same-label pair, and the different-label pairs with a positive on a side."""
        b, n = s.shape
        same, _ = _block_labels(self.labels, r0, b)
        rows = torch.arange(r0, r0 + b, device=s.device)
        upper = torch.arange(n, device=s.device)[None, :] > rows[:, None]
        pos = same & upper
        neg = ~same & upper & (self.has_pos[r0:r0 + b, None] | self.has_pos[None, :])
        v = unit_distance(s) if self.euclidean else s
        # PML's binning, bit for bit: the bin from the float32 value, the weights in v's dtype
        r = torch.floor((v.float() + 1) / self.delta).to(device=v.device, dtype=torch.long)
        kept = pos | neg
        if not differentiable and bool((kept & (torch.isnan(v) | (r < 0) | (r > self.nodes - 2))).any()):
            raise _BlockOutOfRange  # PML's scatter would fail: the reference runs (and raises)
        to_upper = ((v + 1 - r * self.delta) / self.delta).to(v.dtype)
        to_lower = (((r + 1) * self.delta - 1 - v) / self.delta).to(v.dtype)
        hists = []
        for side in (pos, neg):
            r_side = torch.where(side, r, 0)
            hists.append(_binned_row_sums(r_side + 1, torch.where(side, to_upper, 0), self.nodes)
                         + _binned_row_sums(r_side, torch.where(side, to_lower, 0), self.nodes))
        return torch.cat(hists, dim=1)


def histogram(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why, kind = _checks_and_kind(module, embeddings, labels, indices_tuple, ref_emb)
    if why is not None:
        return decline(module, why)
    labels, class_counts = _dense_ids(labels)
    has_pos = class_counts[labels] > 1
    if not (bool(has_pos.any()) and len(class_counts) > 1):
        return ZERO_LOSS  # no triplet
    # numbers of distinct positive and negative pairs (i < j) of PML's triplets
    class_counts = class_counts.double()
    n = float(len(labels))
    n_pos_pairs = float((class_counts * (class_counts - 1)).sum()) / 2
    singles = float((class_counts == 1).sum())
    n_neg_pairs = (n * n - float((class_counts * class_counts).sum())) / 2 - singles * (singles - 1) / 2
    record_distance(module.distance, embeddings, embeddings)
    spec = _HistogramSpec(labels, has_pos, module.delta, kind == "euclidean")
    try:
        hist = row_stats(_rows_of(embeddings, kind), spec).to(embeddings.dtype)
    except _BlockOutOfRange:
        return decline(module, "a pair value outside [-1, 1] or NaN (PML's histogram index fails)")
    pos_hist, neg_hist = hist.chunk(2, dim=1)
    phi = torch.cumsum(pos_hist.sum(dim=0) / n_pos_pairs, dim=0)
    loss = torch.sum(neg_hist.sum(dim=0) / n_neg_pairs * phi)
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}, BACKEND


# =============================================================================== SmoothAP
def _sigmoid(z):
    """1 / (1 + exp(-z)): torch.sigmoid's value (to an ulp) from exp, whose bits don't depend on the
    thread count (torch.sigmoid's vector and scalar loops differ)."""
    return 1 / (1 + torch.exp(-z))


class _SmoothAPSpec(_Spec):
    def __init__(self, group, temperature, n):
        self.group, self.temperature = group, temperature
        self.values_per_row = 4 * group  # a few (B, g, N) tensors live at once

    def _block(self, s, r0, sigmoid):
        b, n = s.shape
        g = self.group
        anchors = torch.arange(r0, r0 + b, device=s.device)
        cols = (anchors // g * g)[:, None] + torch.arange(g, device=s.device)  # (B, g): the anchor's group
        z = (s[:, None, :] - s.gather(1, cols)[:, :, None]) / self.temperature  # (B, g, N): s_k - s_j
        not_self = (cols[:, :, None] != torch.arange(n, device=s.device)).to(s.dtype)
        sig = sigmoid(z)
        ranked = sig * not_self  # PML's product with the mask (NaN stays NaN)
        all_rank = ranked.sum(dim=-1) + 1  # (B, g)
        pos_rank = ranked.gather(2, cols[:, None, :].expand(b, g, g)).sum(dim=-1) + 1
        return cols, sig, not_self, all_rank, pos_rank

    def rows(self, s, r0, differentiable=False):
        """Per anchor q: AP = mean over j in q's group of rank_group(j) / rank_all(j)."""
        _, _, _, all_rank, pos_rank = self._block(s, r0, torch.sigmoid if differentiable else _sigmoid)
        return (torch.sum(pos_rank / all_rank, dim=1) / self.group).unsqueeze(1)

    def grad_rows(self, s, r0, g_out):
        """dAP/dsig_jk = -P_j / (g A_j^2) + [k in the group] / (g A_j) for k != j; dsig/dz =
        sig (1 - sig); z = (s_k - s_j) / T."""
        g = self.group
        cols, sig, not_self, all_rank, pos_rank = self._block(s, r0, _sigmoid)
        scale = g_out[:, :1] / g  # (B, 1)
        d_all = -scale * pos_rank / (all_rank * all_rank)  # (B, g)
        d_pos = scale / all_rank
        anchors = torch.arange(r0, r0 + s.shape[0], device=s.device)
        in_group = (torch.arange(s.shape[1], device=s.device)[None, :] // g == (anchors // g)[:, None]).to(s.dtype)
        w = (d_all[:, :, None] + d_pos[:, :, None] * in_group[:, None, :]) * not_self
        w = w * (sig * (1 - sig)) / self.temperature  # dL/dz
        g_s = w.sum(dim=1)  # + dz/ds_k
        return g_s.scatter_add_(1, cols, -w.sum(dim=2))  # - dz/ds_j (distinct columns per row)


def smooth_ap(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why = _common_checks(module, embeddings, labels, indices_tuple, ref_emb, weights_only=True)
    if why is None and not is_unit_cosine(module.distance):
        why = f"distance {type(module.distance).__name__} (not unit cosine)"
    if why is None and bool(labels.min() < 0):
        why = "negative labels (PML's bincount raises)"
    if why is None:
        counts = torch.bincount(labels)
        counts = counts[counts > 0]
        if counts.unique().numel() != 1:
            why = "classes of unequal sizes (the reference raises PML's ValueError)"
    if why is not None:
        return decline(module, why)
    n = len(labels)
    n_groups = n // int(torch.unique(labels).numel())  # PML's "num_classes_batch"
    record_distance(module.distance, embeddings, embeddings)
    spec = _SmoothAPSpec(n // n_groups, module.temperature, n)
    ap = row_stats(_rows_of(embeddings, "cosine"), spec)[:, 0].to(torch.float32)  # float32 as PML's
    losses = (1 - ap) * convert_to_weights(indices_tuple, labels, dtype=ap.dtype)
    return {"ap_loss": {"losses": losses, "indices": torch.arange(n, device=losses.device),
                        "reduction_type": "element"}}, BACKEND


__all__ = ["ranked_list", "fast_ap", "histogram", "smooth_ap", "row_stats"]
