"""PML computes log(1 + e^z) terms as logsumexp with an added zero (or -log of a probability), so a
term whose e^z is below half an ulp of 1 is exactly 0, and AvgNonZeroReducer / ThresholdReducer
leave it out of their mean. The fused losses compute the same terms accurately (log1p); they
must still give exactly 0 there, or their mean divides by more terms than PML's.

Each case uses tight, well separated clusters, so that PML has exact zeros and non-zeros (checked
here: without both the case could not fail), and compares dmlkern's fused path with PML under
AvgNonZeroReducer: values, gradients, and the number of exact zeros per element. At the other
end, NT-Xent's PML term -log(p + tiny) is capped at -log tiny: the fused path must notice."""
import math

import pytest
import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.reducers as pml_reducers
import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu

import dmlkern.distances as our_distances
import dmlkern.losses as our_losses
import dmlkern.reducers as our_reducers
from dmlkern.triton import interpret_mode

CLASSES, PER_CLASS, D = 6, 4, 16
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-4, atol=1e-6)}


def clustered(dtype, spread=0.02, norm=1.0, per_class=PER_CLASS, antipodal=False):
    """Rows near their class centre: orthonormal centres (negatives' terms far below an ulp: no
    sum near PML's rounding boundary, whose summation order differs by CPU) except classes 0 and 1
    at cosine 0.89 (their terms are not 0). antipodal: three classes, the third opposite the
    first (AngularLoss's terms vanish only where every negative points away)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(CLASSES, D, dtype=torch.float64)
    centres[1] = torch.nn.functional.normalize(centres[0] + 0.5 * centres[1], dim=0)
    if antipodal:
        centres = torch.stack([centres[0], centres[1], -centres[0]])
    labels = torch.arange(len(centres)).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    return (norm * x).to(dtype), labels, centres


# name, constructor kwargs, dtype, how the batch is made, whether an all-pairs tuple is passed
CASES = [
    ("TupletMarginLoss", {}, torch.float32, {}, False),
    ("TupletMarginLoss", {}, torch.float32, {}, True),  # the listed-pairs path
    ("TupletMarginLoss", dict(margin=10, scale=64), torch.float64, {}, False),
    ("NCALoss", dict(softmax_scale=64), torch.float64, dict(per_class=2), False),  # one positive: p is 1, not a sum
    ("NCALoss", dict(softmax_scale=16), torch.float32, dict(per_class=2), False),
    ("MultiSimilarityLoss", dict(alpha=50, beta=50, base=0.5), torch.float32, {}, False),
    ("MultiSimilarityLoss", dict(alpha=100, beta=100, base=0.5), torch.float64, {}, False),
    ("AngularLoss", {}, torch.float64, dict(norm=10.0, antipodal=True), False),
    ("AngularLoss", {}, torch.float32, dict(norm=10.0, antipodal=True), True),
    ("SupConLoss", dict(temperature=0.03), torch.float32, dict(per_class=2), False),
]


def _run(lib, reducers, name, kwargs, x, labels, tup, reducer):
    loss = getattr(lib, name)(reducer=getattr(reducers, reducer)(), **kwargs)
    xx = x.clone().requires_grad_()
    value = loss(xx, labels, tup)
    if reducer == "DoNothingReducer":
        return value, loss
    value.backward()
    return (value.detach(), xx.grad), loss


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[2])[6:]}{'-listed' if c[4] else ''}")
def test_exact_zero_terms_are_left_out_as_in_pml(case):
    name, kwargs, dtype, batch_kwargs, listed = case
    x, labels, _ = clustered(dtype, **batch_kwargs)
    tup = pml_lmu.get_all_pairs_indices(labels) if listed else None
    theirs, _ = _run(pml_losses, pml_reducers, name, kwargs, x, labels, tup, "DoNothingReducer")
    terms = theirs["loss"]["losses"]
    assert (terms == 0).any() and (terms != 0).any(), "the batch must give PML exact zeros and non-zeros"
    (vo, go), ours = _run(our_losses, our_reducers, name, kwargs, x, labels, tup, "AvgNonZeroReducer")
    assert ours.last_backend not in (None, "reference", "zero"), ours.last_fallback
    (vt, gt), _ = _run(pml_losses, pml_reducers, name, kwargs, x, labels, tup, "AvgNonZeroReducer")
    torch.testing.assert_close(vo, vt, **TOL[dtype])
    torch.testing.assert_close(go, gt, **TOL[dtype])


@pytest.mark.parametrize("name,kwargs,entry", [("ProxyAnchorLoss", {}, "pos_loss"),
                                               ("ProxyNCALoss", dict(softmax_scale=32), "loss")])
def test_proxy_exact_zero_terms_are_left_out_as_in_pml(name, kwargs, entry):
    """Proxies at the class centres: ProxyAnchor's positive terms log(1 + sum e^(-alpha (s -
    margin))) and ProxyNCA's -log p round to 0 in PML, except class 1's, whose proxy is moved
    away (the class path's cross-entropy, shared by the margin-softmax losses)."""
    x, labels, centres = clustered(torch.float32)
    centres = centres.clone()
    centres[1] = torch.eye(D, dtype=centres.dtype)[1]  # cosine 0.45 with class 1's rows
    x[2 * PER_CLASS] = centres[2].to(x.dtype)  # on its proxy: a target logit of exactly 0 (no rounding of t)
    out = []
    for lib, reducers in ((our_losses, our_reducers), (pml_losses, pml_reducers)):
        loss = getattr(lib, name)(CLASSES + 1, D, reducer=reducers.AvgNonZeroReducer(), **kwargs)
        with torch.no_grad():
            loss.proxies.copy_(torch.cat([centres, -centres[:1]]).to(loss.proxies.dtype))
        xx = x.clone().requires_grad_()
        value = loss(xx, labels)
        value.backward()
        out.append((value.detach(), xx.grad, loss.proxies.grad))
        if lib is pml_losses:
            terms = getattr(lib, name)(CLASSES + 1, D, reducer=pml_reducers.DoNothingReducer(), **kwargs)
            terms.proxies.data = loss.proxies.data
            terms = terms(x, labels)[entry]["losses"]
            assert (terms == 0).any() and (terms != 0).any()
        else:
            assert loss.last_backend not in (None, "reference", "zero"), loss.last_fallback
    for ours, theirs in zip(*out):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_npairs_exact_zero_terms_are_left_out_as_in_pml(dtype):
    """NPairsLoss's cross-entropy over the first pair of each class, on the raw dot product of
    rows of norm 10: an anchor 100 above every other positive has PML's exact 0; classes 0 and 1
    (cosine 0.89) do not."""
    x, labels, _ = clustered(dtype, norm=10.0, per_class=2)
    out = []
    for lib, reducers, dist in ((pml_losses, pml_reducers, pml_distances), (our_losses, our_reducers, our_distances)):
        def make(reducer):
            return lib.NPairsLoss(distance=dist.DotProductSimilarity(normalize_embeddings=False), reducer=reducer)
        if lib is pml_losses:
            terms = make(reducers.DoNothingReducer())(x, labels)["loss"]["losses"]
            assert (terms == 0).any() and (terms != 0).any(), "the batch must give PML exact zeros and non-zeros"
        loss = make(reducers.AvgNonZeroReducer())
        xx = x.clone().requires_grad_()
        value = loss(xx, labels)
        value.backward()
        out.append((value.detach(), xx.grad))
        if lib is our_losses:
            assert loss.last_backend not in (None, "reference", "zero"), loss.last_fallback
    for theirs, ours in zip(*out):
        torch.testing.assert_close(ours, theirs, **TOL[dtype])


def test_npairs_one_pair_is_an_exact_zero_as_in_pml():
    """One pair: PML's cross-entropy over a 1 x 1 matrix is exactly 0, so AvgNonZeroReducer returns
    its zero loss, sum(embeddings * 0): NaN here, from a NaN entry in a row outside the pair."""
    x, labels, _ = clustered(torch.float64)
    x, labels = x[[0, 1, 4, 8]].clone(), torch.tensor([0, 0, 1, 2])
    x[3, 0] = float("nan")
    out = []
    for lib, reducers in ((pml_losses, pml_reducers), (our_losses, our_reducers)):
        terms = lib.NPairsLoss(reducer=reducers.DoNothingReducer())(x, labels)["loss"]["losses"]
        loss = lib.NPairsLoss(reducer=reducers.AvgNonZeroReducer())
        out.append((terms, loss(x, labels)))
        if lib is our_losses:
            assert loss.last_backend not in (None, "reference", "zero"), loss.last_fallback
    (pml_terms, pml_value), (our_terms, our_value) = out
    assert pml_terms.tolist() == [0.0] and our_terms.tolist() == [0.0]
    assert torch.isnan(pml_value) and torch.isnan(our_value)


def _ntxent_cap_case(case):
    """(x, labels, our kwargs, PML's kwargs): a positive pair far below its negatives."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8])
    our_kw, pml_kw = {}, {}
    if case == "cosine_small_temperature":  # row 1 opposite its positive row 0, next to row 2
        x[1], x[2] = -x[0], -x[0] + 0.01 * x[3]
        x = x.float()
        our_kw = pml_kw = dict(temperature=0.01)
    elif case.startswith("unnormalised_lp"):  # -d^p / t of rows of norm ~25, row 1 opposite its positive row 0
        x[1] = -x[0]
        x = 10 * x
        power, t = (1, 0.05) if case.endswith("power1") else (2, 0.5)
        our_kw = dict(temperature=t, distance=our_distances.LpDistance(normalize_embeddings=False, power=power))
        pml_kw = dict(temperature=t, distance=pml_distances.LpDistance(normalize_embeddings=False, power=power))
    return x, labels, our_kw, pml_kw


def _value_and_grad(loss, x, labels):
    xx = x.clone().requires_grad_()
    value = loss(xx, labels)
    value.backward()
    return value.detach(), xx.grad


NTXENT_CAP_CASES = ["cosine_small_temperature", "unnormalised_lp", "unnormalised_lp_power1", "usual"]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", NTXENT_CAP_CASES)
def test_ntxent_terms_past_pmls_cap_are_fused_as_pml(case, backend):
    """PML's NT-Xent term is -log(p + tiny), at most -log tiny (87 in fp32, 708 in fp64): a positive
    pair far below its negatives gets that capped value (and almost no gradient). The fused
    kernels floor p at tiny in the pos_softplus pass (params.log_floor), so they give PML's value
    and gradient on the fused path."""
    if backend == "triton" and (torch.cuda.is_available() or not interpret_mode()):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 and no GPU")
    x, labels, our_kw, pml_kw = _ntxent_cap_case(case)
    terms = pml_losses.NTXentLoss(reducer=pml_reducers.DoNothingReducer(), **pml_kw)(x, labels)["loss"]["losses"]
    capped = bool((terms >= -math.log(torch.finfo(x.dtype).tiny) - 1).any())
    assert capped == (case != "usual"), "the case must (or must not) reach PML's cap"
    fused = our_losses.NTXentLoss(**our_kw)
    fused.backend = backend
    ours = _value_and_grad(fused, x, labels)
    assert fused.last_backend == backend, fused.last_fallback
    theirs = _value_and_grad(pml_losses.NTXentLoss(**pml_kw), x, labels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[x.dtype])


def test_ntxent_past_pmls_cap_under_compile():
    """The cap is in the kernels, not a host-side check: torch.compile(fullgraph=True) gives it too."""
    x, labels, our_kw, pml_kw = _ntxent_cap_case("cosine_small_temperature")
    loss = our_losses.NTXentLoss(**our_kw)
    compiled = torch.compile(lambda e, lab: loss(e, lab), fullgraph=True, backend="aot_eager")
    ours = _value_and_grad(compiled, x, labels)
    theirs = _value_and_grad(pml_losses.NTXentLoss(**pml_kw), x, labels)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[x.dtype])
