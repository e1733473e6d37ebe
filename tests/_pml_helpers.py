"""Helpers for comparing dmlkern losses with pytorch-metric-learning 2.9.0 (tests only)."""
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.reducers as pml_reducers
import torch

import dmlkern.distances as our_distances
import dmlkern.losses as our_losses
import dmlkern.reducers as our_reducers
from dmlkern.functional import embedding as our_functional
from dmlkern.reference import embedding_losses as our_reference

# name -> (reference/functional function name, labels required, supports ref_emb)
EMBEDDING_LOSSES = {
    "ContrastiveLoss": ("contrastive_loss", False, True),
    "TripletMarginLoss": ("triplet_margin_loss", False, True),
    "MarginLoss": ("margin_loss", False, True),
    "MultiSimilarityLoss": ("multi_similarity_loss", False, True),
    "LiftedStructureLoss": ("lifted_structure_loss", False, True),
    "GeneralizedLiftedStructureLoss": ("generalized_lifted_structure_loss", False, True),
    "NPairsLoss": ("n_pairs_loss", True, False),
    "NTXentLoss": ("ntxent_loss", False, True),
    "SupConLoss": ("supcon_loss", False, True),
    "TupletMarginLoss": ("tuplet_margin_loss", False, True),
    "AngularLoss": ("angular_loss", True, True),
    "NCALoss": ("nca_loss", True, True),
    "CircleLoss": ("circle_loss", False, True),
}
LOSS_NAMES = list(EMBEDDING_LOSSES)

TOL = {torch.float64: (1e-6, 1e-9), torch.float32: (1e-4, 1e-5)}


# ----------------------------------------------------------------------------- builders
DISTANCES = {
    "lp": ("LpDistance", {}),
    "lp_sq": ("LpDistance", {"power": 2}),
    "lp_raw": ("LpDistance", {"normalize_embeddings": False}),
    "lp1": ("LpDistance", {"p": 1}),
    "cos": ("CosineSimilarity", {}),
    "dot_raw": ("DotProductSimilarity", {"normalize_embeddings": False}),
}


def distance_pair(spec):
    if spec is None:
        return None, None
    cls, kw = DISTANCES[spec]
    return getattr(our_distances, cls)(**kw), getattr(pml_distances, cls)(**kw)


def reducer_pair(spec, n_classes=4):
    """spec: None or (class name, kwargs); nested 'reducer' kwargs are specs too."""
    if spec is None:
        return None, None
    cls, kw = spec
    ours_kw, pml_kw = {}, {}
    for k, v in kw.items():
        if k in ("reducer", "default_reducer"):
            ours_kw[k], pml_kw[k] = reducer_pair(v, n_classes)
        elif k == "weights" and v == "random":
            w = torch.rand(n_classes, generator=torch.Generator().manual_seed(123)) + 0.5
            ours_kw[k], pml_kw[k] = w.clone(), w.clone()
        else:
            ours_kw[k], pml_kw[k] = v, v
    return getattr(our_reducers, cls)(**ours_kw), getattr(pml_reducers, cls)(**pml_kw)


def loss_pair(name, params=None, distance=None, reducer=None, n_classes=4, **extra):
    params = dict(params or {})
    d_ours, d_pml = distance_pair(distance)
    r_ours, r_pml = reducer_pair(reducer, n_classes)
    ours_kw, pml_kw = dict(params, **extra), dict(params, **extra)
    if d_ours is not None:
        ours_kw["distance"], pml_kw["distance"] = d_ours, d_pml
    if r_ours is not None:
        ours_kw["reducer"], pml_kw["reducer"] = r_ours, r_pml
    return getattr(our_losses, name)(**ours_kw), getattr(pml_losses, name)(**pml_kw)


# ----------------------------------------------------------------------------- inputs
def make_inputs(seed, batch, dim, n_classes, dtype, ref_rows=None):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, n_classes, (batch,), generator=g)
    ref = ref_labels = None
    if ref_rows is not None:
        ref = torch.randn(ref_rows, dim, generator=g, dtype=torch.float64).to(dtype)
        ref_labels = torch.randint(0, n_classes, (ref_rows,), generator=g)
    return emb, labels, ref, ref_labels


def random_indices(seed, kind, labels, ref_labels=None, n=12):
    """A label-consistent random tuple, drawn with replacement (so it has duplicates)."""
    g = torch.Generator().manual_seed(seed + 1000)
    same_object = ref_labels is None
    ref_labels = labels if ref_labels is None else ref_labels
    match = labels[:, None] == ref_labels[None, :]
    if same_object:
        match.fill_diagonal_(False)
    diff = labels[:, None] != ref_labels[None, :]
    a1, p = torch.where(match)
    a2, neg = torch.where(diff)

    def pick(x, k):
        if len(x) == 0:
            return torch.empty(0, dtype=torch.long)
        return torch.randint(0, len(x), (k,), generator=g)

    if kind == "pairs":
        i, j = pick(a1, n), pick(a2, n)
        if len(i) == 0 or len(j) == 0:
            e = torch.empty(0, dtype=torch.long)
            return (a1[i] if len(i) else e, p[i] if len(i) else e, a2[j] if len(j) else e, neg[j] if len(j) else e)
        return a1[i], p[i], a2[j], neg[j]
    # triplets
    trip = match[:, :, None] & diff[:, None, :]
    a, pp, nn_ = torch.where(trip)
    k = pick(a, n)
    if len(k) == 0:
        e = torch.empty(0, dtype=torch.long)
        return e, e.clone(), e.clone()
    return a[k], pp[k], nn_[k]


# ----------------------------------------------------------------------------- running
def run_loss(fn, emb, labels=None, indices_tuple=None, ref=None, ref_labels=None, params=(), seed=None):
    """Calls fn on fresh leaf copies; returns (value, [grad wrt emb, ref, *params])."""
    e = emb.detach().clone().requires_grad_(True)
    r = None if ref is None else ref.detach().clone().requires_grad_(True)
    for prm in params:
        prm.grad = None
    if seed is not None:
        torch.manual_seed(seed)
    out = fn(e, labels, indices_tuple=indices_tuple, ref_emb=r, ref_labels=ref_labels)
    if isinstance(out, dict):
        return out, []
    leaves = [e] + ([r] if r is not None else [])
    if out.requires_grad:
        out.backward()
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    grads += [prm.grad.clone() if prm.grad is not None else torch.zeros_like(prm) for prm in params]
    return out.detach(), grads


def assert_close(ours, ref, dtype, what="value"):
    rtol, atol = TOL[dtype]
    ours = torch.as_tensor(ours, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert ours.shape == ref.shape or ours.numel() == ref.numel() == 1, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    torch.testing.assert_close(
        ours.reshape(ref.shape), ref, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def assert_value_and_grads_close(got, got_grads, want, want_grads, **tol):
    """A loss value and its gradients (pairwise, as zip pairs them) against the expected ones."""
    torch.testing.assert_close(got, want, **tol)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tol)


def compare(ours_fn, pml_fn, emb, labels=None, indices_tuple=None, ref=None, ref_labels=None,
            ours_params=(), pml_params=(), seed=None):
    v_ours, g_ours = run_loss(ours_fn, emb, labels, indices_tuple, ref, ref_labels, ours_params, seed)
    v_pml, g_pml = run_loss(pml_fn, emb, labels, indices_tuple, ref, ref_labels, pml_params, seed)
    assert torch.isfinite(v_pml).all(), "PML gave a non-finite value: pick another case"
    assert_close(v_ours, v_pml, emb.dtype, "loss value")
    assert len(g_ours) == len(g_pml)
    for k, (a, b) in enumerate(zip(g_ours, g_pml)):
        assert_close(a, b, emb.dtype, f"gradient #{k}")
    return v_ours, v_pml


def assert_same_loss_dict(ours, pml, dtype):
    assert list(ours) == list(pml)
    for name in pml:
        o, p = ours[name], pml[name]
        assert o["reduction_type"] == p["reduction_type"], name
        assert set(o) == set(p), name
        if torch.is_tensor(p["losses"]):
            assert_close(o["losses"].detach(), p["losses"].detach(), dtype, f"{name} losses")
        else:
            assert not torch.is_tensor(o["losses"]) and o["losses"] == p["losses"]
        pi, oi = p["indices"], o["indices"]
        if pi is None:
            assert oi is None
        elif torch.is_tensor(pi):
            assert torch.equal(oi, pi)
        else:
            assert len(oi) == len(pi) and all(torch.equal(x, y) for x, y in zip(oi, pi))
        if "divisor" in p:
            assert int(o["divisor"]) == int(p["divisor"])


def reference_fn(name):
    return getattr(our_reference, EMBEDDING_LOSSES[name][0])


def functional_fn(name):
    return getattr(our_functional, EMBEDDING_LOSSES[name][0])
