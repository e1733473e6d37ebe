"""Reference losses with PML 2.9.0 semantics that are neither pair/tuple nor ranking losses:
IntraPairVariance, ThresholdConsistentMargin, Instance, VICReg, P2SGrad, Manifold and
DynamicSoftMargin's parts. Inputs are prepared as in ``embedding_losses``; each
``<name>_loss_dict`` returns PML's loss dict.
"""

import torch
import torch.nn.functional as F

from ._embedding_common import _entry, _rows
from .indices import convert_to_pairs, convert_to_triplets

__all__ = [
    "intra_pair_variance_loss_dict",
    "tcm_loss_dict",
    "instance_loss_dict",
    "vicreg_loss_dict",
    "p2sgrad_loss_dict",
    "manifold_loss_dict",
    "soft_margin_differences",
    "soft_margin_histogram",
    "soft_margin_weigh",
]


# =============================================================================== IntraPairVariance
def intra_pair_variance_loss_dict(pos_pair, neg_pair, indices_tuple, *, pos_eps, neg_eps, is_inverted):
    """Per pair, relu of its deviation from the side's mean, squared: positives below
    (1 - pos_eps) * mean (similarities; above (1 + pos_eps) * mean for distances), negatives
    the other way round with neg_eps. ``pos_pair`` / ``neg_pair``: GenericPairLoss's values."""

    def deviation(pairs, eps, incentivize_increase):
        if len(pairs) == 0:
            return 0
        mean = torch.mean(pairs)
        var = (1 - eps) * mean - pairs if incentivize_increase else pairs - (1 + eps) * mean
        return F.relu(var) ** 2

    a1, p, a2, n = indices_tuple
    return {
        "pos_loss": _entry(deviation(pos_pair, pos_eps, is_inverted), (a1, p), "pos_pair"),
        "neg_loss": _entry(deviation(neg_pair, neg_eps, not is_inverted), (a2, n), "neg_pair"),
    }


# =============================================================================== TCM
def tcm_loss_dict(embeddings, labels, indices_tuple, ref_labels, *, lambda_plus, lambda_minus, margin_plus,
                  margin_minus):
    """lambda_plus * mean(margin_plus - s) over positive pairs with s <= margin_plus +
    lambda_minus * mean(s - margin_minus) over negative pairs with s >= margin_minus (a side with
    none adds 0), s the cosine similarity; already reduced. As in PML both members of a pair are
    rows of ``embeddings`` (a ``ref_emb`` only enters through the pairs built from ``ref_labels``)."""
    a1, p, a2, n = convert_to_pairs(indices_tuple, labels, ref_labels)
    pos_sims = F.cosine_similarity(embeddings[a1], embeddings[p])
    neg_sims = F.cosine_similarity(embeddings[a2], embeddings[n])

    def side(values, kept):
        count = kept.sum()
        return 0 if count == 0 else (values * kept).sum() / count

    pos = side(margin_plus - pos_sims, pos_sims <= margin_plus)
    neg = side(neg_sims - margin_minus, neg_sims >= margin_minus)
    return {"loss": _entry(lambda_plus * pos + lambda_minus * neg, None, "already_reduced")}


# =============================================================================== Instance
def instance_loss_dict(embeddings, labels, *, gamma, distance):
    """Cross-entropy of each row over the batch: logits gamma * s(row, all rows), target the
    row's class index (labels ranked, ``torch.unique``) read as a column of the batch."""
    logits = distance(embeddings) * gamma
    _, target = torch.unique(labels, return_inverse=True)
    return {"loss": _entry(F.cross_entropy(logits, target, reduction="none"), _rows(embeddings), "element")}


# =============================================================================== VICReg
def vicreg_loss_dict(embeddings, ref_emb, *, invariance_lambda, variance_mu, covariance_v, eps):
    """VICReg's four sub-losses for two views: invariance (per row, mean squared difference),
    variance of each view (per dimension, relu(1 - std) / 2, std with eps), covariance (sum of
    the squared off-diagonal covariances of both views / D, already reduced)."""
    n, d = embeddings.size()
    invariance = invariance_lambda * torch.mean((embeddings - ref_emb) ** 2, dim=1)
    variances = [F.relu(1 - torch.sqrt(x.var(dim=0) + eps)) / 2 for x in (embeddings, ref_emb)]
    off_diagonal = ~torch.eye(d, device=embeddings.device, dtype=torch.bool)
    covariance = 0
    for x in (embeddings, ref_emb):
        centred = x - x.mean(dim=0)
        cov = (centred.T @ centred) / (n - 1)
        covariance = covariance + cov[off_diagonal].pow(2).sum() / d
    dims = torch.arange(d, device=embeddings.device)
    return {
        "invariance_loss": _entry(invariance, _rows(invariance), "element"),
        "variance_loss1": _entry(variance_mu * variances[0], dims, "element"),
        "variance_loss2": _entry(variance_mu * variances[1], dims, "element"),
        "covariance_loss": _entry(covariance_v * covariance, None, "already_reduced"),
    }


# =============================================================================== P2SGrad
def check_unit_columns(weight, dtype):
    """PML's assertion that P2SGrad's weight columns have unit norm."""
    rtol = 1e-2 if dtype == torch.float16 else 1e-5
    if not torch.all(torch.abs(weight.pow(2).sum(0).pow(0.5) - 1.0) < rtol):
        raise AssertionError("P2SGradLoss: the weight's columns must have unit norm")


def p2sgrad_loss_dict(embeddings, labels, weight):
    """Mean squared error between cos(x, W_c) (clamped to [-1, 1]) and the one-hot labels over
    every (row, class); W's columns must be unit (AssertionError otherwise, as in PML)."""
    check_unit_columns(weight, embeddings.dtype)
    cos = (embeddings.mm(weight) / embeddings.pow(2).sum(1).pow(0.5).view(-1, 1)).clamp(-1, 1)
    with torch.no_grad():
        target = torch.zeros_like(cos).scatter_(1, labels.view(-1, 1), 1)
    return {"loss": _entry(F.mse_loss(cos, target), None, "already_reduced")}


# =============================================================================== Manifold
def _hinge_lse(scores, own, margin):
    """mean over rows of log(1 + sum_k exp(scores_k - scores_own + margin)) over the k != own
    whose term is >= 0."""
    rows = torch.arange(scores.size(0), device=scores.device)
    terms = scores - scores[rows, own].view(-1, 1) + margin
    drop = (terms < 0) | (torch.arange(scores.size(1), device=scores.device) == own.view(-1, 1))
    terms = terms.masked_fill(drop, -torch.inf)
    return torch.log(1 + torch.sum(torch.exp(terms), dim=1)).mean()


def manifold_loss_dict(embeddings, proxies, meta_classes, *, lambdaC, alpha, margin, distance):
    """The random-walk manifold similarity F of the rows and the K proxies (similarities
    exp(relu(s) / 0.5), symmetrically normalised, F = (1 - alpha)(I - alpha S)^-1); intrinsic
    loss on F(row, proxies), context loss on the cosine of F's rows with the proxies' rows, each a
    hinge log-sum-exp against the row's meta class; loss_int + lambdaC * loss_ctx."""
    n, k = len(embeddings), len(proxies)
    loss_int = torch.zeros(1, device=embeddings.device, dtype=embeddings.dtype)
    both = torch.cat([embeddings, proxies], dim=0)
    s = torch.exp(distance(both, both).clamp(0, torch.inf) / 0.5)
    eye = torch.eye(n + k, device=s.device, dtype=s.dtype)
    s = s - s * eye
    d_inv_half = torch.pow(torch.sum(s, dim=1), -1 / 2).diag()
    s_bar = d_inv_half.mm(s).mm(d_inv_half)
    walk = torch.inverse(eye.float() - alpha * s_bar.float()).to(s_bar.dtype)  # no fp16 inverse
    f = (1 - alpha) * walk
    if lambdaC != torch.inf:
        loss_int = _hinge_lse(f[:n, n:], meta_classes, margin)
    ctx = F.cosine_similarity(f[:n, :], f[n:, :].unsqueeze(1), dim=-1).t()
    return {"loss": _entry(loss_int + lambdaC * _hinge_lse(ctx, meta_classes, margin), None, "already_reduced")}


# =============================================================================== DynamicSoftMargin
def soft_margin_differences(embeddings, labels, indices_tuple, ref_emb, ref_labels, distance):
    """d_ap - d_an: per triplet (``convert_to_triplets(..., "all")``) with labels; without labels
    row i's positive is ref row i and its negative the nearest other entry of row i or column i."""
    mat = distance(embeddings, ref_emb)
    if labels is not None:
        a, p, n = convert_to_triplets(indices_tuple, labels, ref_labels, t_per_anchor="all")
        return mat[a, p] - mat[a, n]
    r, c = mat.size()
    size = max(r, c)
    d_pos = torch.cat([mat.diag(), mat.new_zeros(size - min(r, c))])
    off = mat.masked_fill(torch.eye(r, c, dtype=torch.bool, device=mat.device), torch.inf)
    min_col = torch.cat([torch.min(off, dim=0)[0], off.new_zeros(size - c)])
    min_row = torch.cat([torch.min(off, dim=1)[0], off.new_zeros(size - r)])
    return d_pos - torch.min(min_col, min_row)


def _bins(data, min_val, delta):
    return (data - min_val) / delta


def soft_margin_histogram(hist, data, min_val, delta, momentum):
    """The running histogram after adding ``data`` (linear interpolation between the two nearest
    bins; the first batch, on an all-zero histogram, replaces it), normalised. Bin indices outside
    the histogram are clamped to its first / last bin (PML raises an index error there)."""
    pos = _bins(data, min_val, delta)
    last = hist.numel() - 1
    idx, frac = torch.floor(pos).to(dtype=torch.long), torch.frac(pos)
    if hist.sum() == 0:
        momentum = 1.0
    hist = torch.scatter_add((1.0 - momentum) * hist, 0, idx.clamp(0, last), momentum * (1 - frac))
    hist = torch.scatter_add(hist, 0, (idx + 1).clamp(0, last), momentum * frac)
    return hist / hist.sum()


def soft_margin_weigh(hist, data, min_val, delta):
    """data times the histogram's CDF at data's bin (clamped to the last bin)."""
    idx = torch.floor(_bins(data, min_val, delta)).to(dtype=torch.long).clamp(0, hist.numel() - 1)
    return torch.cumsum(hist, 0)[idx] * data
