"""DynamicSoftMarginLoss over every triplet without listing them (backend "blocked").

The loss of every triplet (a, p, n) is x = d_ap - d_an weighed by the CDF of a running histogram
of x (`reference.more_losses`: soft_margin_histogram, soft_margin_weigh). PML lists every triplet
(3 int64 each, after an N x N x N mask). Both the histogram and the loss depend on the triplets
only through two numbers per bin i of u = (x - min_val) / delta (i = floor(u), before the clamp to
the histogram): the count c_i and the sum F_i of u - i (u's fractional parts; kept apart from i
c_i, which would cancel them in float32: a bin of u just above an integer). The interpolation
weights sum to F_i, the x to delta F_i + (min_val + i delta) c_i, so

  hist = normalise((1 - momentum) hist_ + momentum (c - F) at clamp(i) + momentum F at clamp(i + 1))
  loss = sum_i CDF[clamp(i)] (delta F_i + (min_val + i delta) c_i) / sum_i c_i.

`ranking.row_stats` gets c and U per row (and bin) from row blocks of a `fixed_mm` product. Row a's
triplets of positive p fall in bins by thresholds on d_an (floor(u) >= i is d_an <= d_ap - min_val
- i delta); with the thresholds of all of a's positives sorted, one `searchsorted` per negative
gives its bucket, which fixes its bin for every positive, and prefix sums over the buckets give
each (positive, bin)'s count and sum of d_an. Work O(N M log(P K)) instead of PML's O(N^2 M);
memory O(B (M + P K) + N D) (P the largest class, K the bins). The backward recomputes each block
and gives each triplet's u its bin's gradient, written out: a negative's gradient is a sum over
the buckets above it (no autograd graph of the block). The bins of u span the distances' range
[0, d_max]: i in floor((-d_max - min_val) / delta) .. floor((d_max - min_val) / delta). The
epilogue is plain autograd on those 2 K numbers (float64: counts past 2^24 stay exact); U's
gradient is the gradient PML's autograd gives through frac (slope 1) and x. A difference within
a rounding of a bin's edge may fall in the other bin than PML's (the same happens between PML's
own CPU and GPU distances).

Declines (the reference runs): no labels, an indices_tuple, a ref_emb, a NaN entry (PML's bin index of NaN is
garbage), a row shorter than 1e-12, other distances (PML requires a normalised LpDistance(p=2);
powers 1 and 2 run here), more than 1024 bins over the range, dtypes other than fp32 / fp64,
torch.compile.
"""
import torch

from ._common import SHORT_ROWS, decline, has_entry, has_short_rows, is_unit_euclidean, row_sums
from ._common import _lp_distance
from ._epilogue import ZERO_LOSS
from ._stats import record_distance
from .pair_lists import unit_distance
from .ranking import ClassMembers, _binned_row_sums, _common_checks, _rows_of, _Spec, row_stats

BACKEND = "blocked"
_MAX_BINS = 1024  # bins of u over the distances' range: more means a tiny delta (the reference then)


class _SoftMarginSpec(_Spec):
    def __init__(self, labels, squared, min_val, delta, first_bin, n_bins):
        self.members, self.labels, self.squared = ClassMembers(labels), labels, squared
        self.min_val, self.delta, self.first_bin, self.n_bins = min_val, delta, first_bin, n_bins
        self.width = 2 * n_bins
        # live at once per row: ~8 (M,) tensors (distances, masks, buckets, gradients) and ~6 (P, K) ones
        self.values_per_row = 8 + -(-6 * self.members.width * n_bins // max(1, len(labels)))

    def _block(self, s, r0):
        """Per row a, its negatives binned by the sorted thresholds of all its positives at once.

        Positive p's triplet with negative n is in bin j of u when j of p's thresholds
        t_pj = d_ap - min_val - (first_bin + j) delta, j = 1 .. K-1, are >= d_an (floor(u) >=
        first_bin + j is d_an <= t_pj). With the row's Q = P (K - 1) thresholds sorted, a negative's
        bucket k (the number of thresholds < d_an) fixes its bin for every positive; per bucket, the
        negatives' count and distance sum. Returns d (B, M), the negative mask, the positives'
        columns and realness, the thresholds' sort order (B, Q), the bucket of each entry (B, M;
        Q + 1 for a non-negative), and ge (B, P, K + 1): the number of negatives in bins j .. K-1,
        with sd the sum of their distances (float64)."""
        b, m = s.shape
        d = torch.relu(2 - 2 * s) if self.squared else unit_distance(s)  # PML's cdist (squared for power 2)
        cols, real = self.members.block(r0, b, exclude_self=True)
        negative = self.labels[r0:r0 + b, None] != self.labels[None, :]
        d_ap = d.gather(1, cols).double()
        inner = self._bins(s.device)[1:]
        thresholds = ((d_ap[:, :, None] - self.min_val) - inner * self.delta).reshape(b, -1)  # (B, Q)
        sorted_t, t_order = torch.sort(thresholds.to(d.dtype), dim=1)
        q = sorted_t.shape[1]
        bucket = torch.where(negative, torch.searchsorted(sorted_t, d.contiguous()), q + 1)
        counts = _binned_row_sums(bucket, negative.to(torch.float64), q + 2)[:, :q + 1]
        sums = _binned_row_sums(bucket, torch.where(negative, d, 0).double(), q + 2)[:, :q + 1]
        # number and distance sum of the negatives <= the threshold at sorted position k: buckets 0..k
        at_most, sum_at_most = torch.cumsum(counts, dim=1)[:, :q], torch.cumsum(sums, dim=1)[:, :q]
        rank = torch.empty_like(t_order).scatter_(1, t_order, torch.arange(q, device=s.device).expand(b, q))
        shape = (b, cols.shape[1], self.n_bins - 1)
        n_neg, sum_neg = counts.sum(dim=1), sums.sum(dim=1)
        ge = torch.cat([n_neg[:, None, None].expand(*shape[:2], 1), at_most.gather(1, rank).view(shape),
                        n_neg.new_zeros(*shape[:2], 1)], dim=2)
        sd = torch.cat([sum_neg[:, None, None].expand(*shape[:2], 1), sum_at_most.gather(1, rank).view(shape),
                        sum_neg.new_zeros(*shape[:2], 1)], dim=2)
        return d, negative, cols, real, d_ap, t_order, bucket, ge, sd

    def rows(self, s, r0, differentiable=False):
        """Per row a: over its triplets, the count and the sum of u - i in each bin i of u: per
        positive, F_j = (c_j (d_ap - min_val - i delta) - (its bin's sum of d_an)) / delta."""
        _, _, _, real, d_ap, _, _, ge, sd = self._block(s, r0)
        counts = (ge[..., :-1] - ge[..., 1:]) * real[:, :, None]
        in_bin_d = sd[..., :-1] - sd[..., 1:]
        edge = (d_ap[:, :, None] - self.min_val) - self._bins(s.device) * self.delta  # (B, P, K)
        frac_sums = torch.where(real[:, :, None], counts * edge - in_bin_d, 0) / self.delta
        return torch.cat([counts.sum(dim=1), frac_sums.sum(dim=1)], dim=1).to(s.dtype)

    def _bins(self, device):
        """The bins' i (float64)."""
        return torch.arange(self.n_bins, device=device, dtype=torch.float64) + self.first_bin

    def grad_rows(self, s, r0, g_out):
        """The counts have no gradient; a triplet's u gets its bin's gradient G_pj (the row's G_j for a
        real positive), and du/dd_ap = -du/dd_an = 1 / delta. d_ap: sum_j G_pj c_pj / delta. A negative
        in bucket k: -F(k) / delta, F(k) = sum_p G_p(its bin) = sum_p G_p0 plus, for each threshold
        t_pj at a sorted position >= k, G_pj - G_p(j-1) (crossing it moves p's bin from j - 1 to j)."""
        d, negative, cols, real, _, t_order, bucket, ge, _ = self._block(s, r0)
        b = d.shape[0]
        g_bin = g_out[:, self.n_bins:].double()[:, None, :] * real[:, :, None]  # (B, P, K)
        g_ap = (g_bin * (ge[..., :-1] - ge[..., 1:])).sum(dim=2) / self.delta
        steps = (g_bin[..., 1:] - g_bin[..., :-1]).reshape(b, -1).gather(1, t_order)  # (B, Q), sorted order
        from_above = torch.flip(torch.cumsum(torch.flip(steps, [1]), dim=1), [1])  # sum over positions >= k
        per_bucket = torch.cat([from_above, steps.new_zeros(b, 1)], dim=1) + g_bin[..., 0].sum(dim=1, keepdim=True)
        g_d = torch.where(negative, per_bucket.gather(1, bucket.clamp(max=per_bucket.shape[1] - 1)), 0) / -self.delta
        g_d = g_d.scatter_add_(1, cols, g_ap).to(s.dtype)  # padded slots add exactly 0
        if self.squared:  # d = relu(2 - 2s)
            return torch.where(d > 0, -2 * g_d, 0)
        return torch.where(d > 0, -g_d / torch.where(d > 0, d, 1), 0)  # d = sqrt(2 - 2s), 0 at d = 0


def dynamic_soft_margin(module, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    why = "ref_emb (the blocked path: the batch against itself)" if ref_emb is not embeddings else None
    why = why or _common_checks(module, embeddings, labels, indices_tuple, ref_emb)
    power = getattr(module.distance, "power", None)
    if why is None and not (is_unit_euclidean(module.distance) or _lp_distance(module.distance, True, 2)):
        why = f"distance {type(module.distance).__name__} with power {power} (the blocked path: 1 or 2)"
    if why is None and has_entry(torch.isnan, embeddings, ref_emb):
        why = "a NaN embedding entry (PML's bin index of a NaN difference is garbage)"
    if why is None and has_short_rows(embeddings, ref_emb):
        why = SHORT_ROWS
    delta, min_val = module.delta, module.min_val
    d_max = 4.0 if power == 2 else 2.0
    first_bin = int(torch.floor(torch.tensor((-d_max - 1e-3 - min_val) / delta)))
    n_bins = int(torch.floor(torch.tensor((d_max + 1e-3 - min_val) / delta))) - first_bin + 1
    if why is None and n_bins > _MAX_BINS:
        why = f"{n_bins} bins of the differences' range (delta {delta}; the blocked path: {_MAX_BINS})"
    if why is not None:
        return decline(module, why)
    dtype = embeddings.dtype
    module.hist_ = module.hist_.to(device=embeddings.device, dtype=dtype)
    record_distance(module.distance, embeddings, ref_emb)
    spec = _SoftMarginSpec(labels, power == 2, min_val, delta, first_bin, n_bins)
    stats = row_stats(_rows_of(embeddings, "euclidean"), spec)
    totals = row_sums(stats.double().T.contiguous())  # per column, one thread each: fixed bits
    counts, frac_sums = totals[:n_bins], totals[n_bins:]
    if float(counts.detach().sum()) == 0:
        return ZERO_LOSS  # no triplet: PML's zero, the histogram unchanged
    bins = torch.arange(n_bins, device=counts.device) + first_bin  # each column's i
    hist = _histogram(module.hist_.double(), counts, frac_sums, bins, module.momentum)
    module.hist_ = hist.detach().to(dtype)
    low = bins.clamp(0, len(hist) - 1)
    edges = min_val + bins.double() * delta
    loss = torch.sum(torch.cumsum(hist, 0)[low] * (delta * frac_sums + edges * counts)) / counts.sum()
    return {"loss": {"losses": loss.to(dtype), "indices": None, "reduction_type": "already_reduced"}}, BACKEND


def _histogram(hist, counts, fractions, bins, momentum):
    """soft_margin_histogram from the per-bin counts and sums of u's fractional parts (float64) of
    the bins i = `bins`."""
    if float(hist.sum()) == 0:
        momentum = 1.0  # PML: the first batch replaces the all-zero histogram
    last = len(hist) - 1
    hist = (1.0 - momentum) * hist
    hist = hist.index_add(0, bins.clamp(0, last), momentum * (counts - fractions))
    hist = hist.index_add(0, (bins + 1).clamp(0, last), momentum * fractions)
    return hist / hist.sum()


__all__ = ["dynamic_soft_margin"]
