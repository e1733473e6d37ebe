"""dmlkern.losses.CrossBatchMemory against PML 2.9.0's CrossBatchMemory around PML's loss: the same
loss values and gradients over consecutive batches (the queue wrapping around: memory_size is not a
multiple of the batch sizes), the same queue state after each step, with and without enqueue_mask,
with miners and a user indices_tuple, float labels, reset_queue, state_dict / pickling, the errors;
the fused losses run their kernels on CrossBatchMemory's lazy all-pairs tuple without listing it;
and the peak memory of a 65,536-slot queue."""
import copy
import pickle

import pytest
import torch
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
from pytorch_metric_learning.utils import loss_and_miner_utils as pml_lmu

from _kernel_cases import KERNEL_BACKENDS
from _peak_rss import peak_rss_growth_mib
from dmlkern import losses, miners
from dmlkern.fused import lazy_pairs

D, MEMORY = 8, 23
# Batch sizes: one-row batches first (PML keeps their self comparison; with one pair of each kind
# the `len <= 1` rule makes the loss zero), a batch of exactly memory_size, wrap-arounds.
SIZES = [1, 1, 7, 9, 6, 23, 8, 1, 7, 10, 5]

FUSED = {  # recognise the lazy all-pairs tuple: the engine on the rolled queue
    "MultiSimilarityLoss": dict(alpha=2, beta=10, base=0.5),
    "NTXentLoss": dict(temperature=0.2),
    "ContrastiveLoss": dict(pos_margin=0.1, neg_margin=0.9),
    "SupConLoss": dict(temperature=0.3),
}
OTHERS = {  # read the tuple: PML's listed pairs
    "CircleLoss": dict(),
    "TripletMarginLoss": dict(margin=0.3),
    "GeneralizedLiftedStructureLoss": dict(),
}


def _pair(name, kwargs, memory=MEMORY, miner=None, **cbm_kwargs):
    pml_miner = dml_miner = None
    if miner is not None:
        pml_miner, dml_miner = getattr(pml_miners, miner[0])(**miner[1]), getattr(miners, miner[0])(**miner[1])
    ours = losses.CrossBatchMemory(getattr(losses, name)(**kwargs), D, memory_size=memory, miner=dml_miner,
                                   **cbm_kwargs)
    theirs = pml_losses.CrossBatchMemory(getattr(pml_losses, name)(**kwargs), D, memory_size=memory,
                                         miner=pml_miner, **cbm_kwargs)
    return ours, theirs


def _same_state(ours, theirs):
    assert ours.queue_idx == theirs.queue_idx
    assert ours.has_been_filled == theirs.has_been_filled
    assert ours.embedding_memory.dtype == theirs.embedding_memory.dtype
    assert ours.label_memory.dtype == theirs.label_memory.dtype
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    assert torch.equal(ours.label_memory, theirs.label_memory)
    if hasattr(theirs, "curr_batch_idx"):
        assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)


def _batch(gen, n, dtype, classes=4, float_labels=False):
    x = torch.randn(n, D, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=gen)
    if float_labels:
        labels = labels.to(torch.float64) * 0.5 + 0.25
    return x, labels


def _step(ours, theirs, x, labels, rtol, atol, **kwargs):
    """One call of each on the same batch: values, gradients and queue state compared."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ours(xa, labels, **kwargs), theirs(xb, labels, **kwargs)
    torch.testing.assert_close(a.detach(), b.detach().to(a.dtype), rtol=rtol, atol=atol)
    ga = torch.autograd.grad(a, xa, allow_unused=True)[0] if a.requires_grad else None
    gb = torch.autograd.grad(b, xb, allow_unused=True)[0] if b.requires_grad else None
    ga = torch.zeros_like(x) if ga is None else ga
    gb = torch.zeros_like(x) if gb is None else gb
    torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)
    _same_state(ours, theirs)
    return float(a)


def _run(ours, theirs, dtype=torch.float64, sizes=SIZES, rtol=1e-10, atol=1e-10, seed=0, mask=False,
         float_labels=False, backends=None):
    gen = torch.Generator().manual_seed(seed)
    values = []
    for n in sizes:
        x, labels = _batch(gen, n, dtype, float_labels=float_labels)
        kwargs = {}
        if mask:
            kwargs["enqueue_mask"] = torch.rand(n, generator=gen) < 0.5
        values.append(_step(ours, theirs, x, labels, rtol, atol, **kwargs))
        if backends is not None:
            backends.append(ours.loss.last_backend)
    assert any(v != 0 for v in values)  # not every step degenerate
    return values


@pytest.fixture
def count_listings(monkeypatch):
    """How many times a lazy all-pairs tuple was listed (read by something)."""
    calls = []
    build = lazy_pairs._AllPairsListing.build
    monkeypatch.setattr(lazy_pairs._AllPairsListing, "build", lambda self: calls.append(1) or build(self))
    return calls


# ----------------------------------------------------------------------------- values and state
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_losses_match_pml_fp64(name, count_listings):
    ours, theirs = _pair(name, FUSED[name])
    backends = []
    _run(ours, theirs, backends=backends)
    assert set(backends) <= {"cpp", "zero"} and backends.count("cpp") >= len(SIZES) - 3, backends
    assert backends[0] == "zero"  # one row, its self comparison only: PML's `len <= 1` zero
    assert not count_listings  # the pairs were never listed


@pytest.mark.parametrize("name", list(FUSED))
def test_degenerate_batches(name):
    """Batches without a positive pair once the self comparisons are gone (Multi-Similarity and
    Contrastive: a non-zero loss from the negatives; NT-Xent and SupCon: zero), or without a
    negative pair."""
    ours, theirs = _pair(name, FUSED[name])
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    backends = []
    for rows, labels in (([0, 1], [0, 1]), ([2, 3, 4], [2, 3, 4]), ([5, 6], [7, 7])):
        _step(ours, theirs, x[rows], torch.tensor(labels), 1e-10, 1e-10)
        backends.append(ours.loss.last_backend)
    expected_first = "zero" if name in ("NTXentLoss", "SupConLoss") else "cpp"
    assert backends[:2] == [expected_first] * 2 and backends[2] == "cpp", backends
    ours, theirs = _pair(name, FUSED[name])
    _step(ours, theirs, x[:3], torch.tensor([4, 4, 4]), 1e-10, 1e-10)  # no negative pair
    assert ours.loss.last_backend == ("zero" if name in ("NTXentLoss", "SupConLoss") else "cpp")


@pytest.mark.parametrize("name", list(FUSED))
def test_static_shape_paths(name, monkeypatch):
    """The paths torch.compile traces (degenerate batches zeroed with torch.where, no early return)."""
    from dmlkern import _tracing

    monkeypatch.setattr(_tracing, "FORCE_STATIC_SHAPES", True)
    ours, theirs = _pair(name, FUSED[name])
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    # (distinct rows: a row and an identical one in the queue are at a unit distance of ~1e-8, not 0)
    for rows, labels in (([0, 1], [0, 1]), ([2, 3, 4], [2, 3, 4]), ([5, 6], [7, 7]), ([7, 8, 9, 10], [0, 7, 0, 1])):
        _step(ours, theirs, x[rows], torch.tensor(labels), 1e-10, 1e-10)
        assert ours.loss.last_backend == "cpp"
    _run(ours, theirs, sizes=[7, 9, 6, 8], seed=19)


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_losses_match_pml_fp32(name):
    ours, theirs = _pair(name, FUSED[name])
    backends = []
    _run(ours, theirs, dtype=torch.float32, rtol=2e-5, atol=2e-6, seed=1, backends=backends)
    assert "cpp" in backends


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKENDS if p.id == "triton-interpret"])
@pytest.mark.parametrize("name", ["MultiSimilarityLoss", "NTXentLoss"])
def test_fused_losses_on_triton(name, backend, device):
    ours, theirs = _pair(name, FUSED[name])
    ours.loss.backend = backend
    backends = []
    _run(ours, theirs, sizes=[7, 9, 12], seed=2, backends=backends)
    assert backends == [backend] * 3


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_losses_read_the_listed_pairs(name, count_listings):
    ours, theirs = _pair(name, OTHERS[name])
    _run(ours, theirs, sizes=[7, 9, 6, 1, 8, 10])
    # Every step; a pair loss gets no tuple for the one-row batch (nothing left out: its own all pairs).
    assert len(count_listings) == (5 if isinstance(ours.loss, losses.GenericPairLoss) else 6)


@pytest.mark.parametrize("name", losses.CrossBatchMemory.supported_losses())
def test_every_supported_loss(name):
    """Each loss PML's CrossBatchMemory takes, with its defaults, with and without enqueue_mask (no
    one-row batch: there PML's TupletMargin has a NaN gradient from the row's self comparison,
    README "Deviations")."""
    for mask in (False, True):
        ours, theirs = _pair(name, {})
        _run(ours, theirs, sizes=[7, 9, 6, 8, 10], seed=17, mask=mask)


@pytest.mark.parametrize("name", list(FUSED) + ["TripletMarginLoss"])
def test_enqueue_mask(name):
    """Only the masked rows enter the queue, the others are compared with it (no self comparison
    removed): a pair loss takes the rows against the queue as its own all pairs."""
    ours, theirs = _pair(name, {**FUSED, **OTHERS}[name])
    backends = []
    _run(ours, theirs, sizes=[6, 9, 12, 7, 10, 8], seed=3, mask=True, backends=backends)
    if name in FUSED:
        assert "cpp" in backends and set(backends) <= {"cpp", "zero"}, backends


@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "enqueue-mask"])
@pytest.mark.parametrize("name", list(FUSED))
def test_several_calls_then_one_backward(name, mask):
    """Calls that write the queue in place before the first call's backward (a summed loss, or
    gradient accumulation with the graph kept): the fused loss kept the queue's rows of its own
    call, so each call's gradient is PML's."""
    ours, theirs = _pair(name, FUSED[name], memory=12)
    gen = torch.Generator().manual_seed(5)
    batches = [_batch(gen, 8, torch.float64) for _ in range(3)]
    enqueue = torch.arange(8) % 2 == 0 if mask else None
    grads, totals = [], []
    for loss in (ours, theirs):
        xs = [x.clone().requires_grad_() for x, _ in batches]
        total = sum(loss(x, labels, enqueue_mask=enqueue) for x, (_, labels) in zip(xs, batches))
        total.backward()
        totals.append(total.detach())
        grads.append([x.grad for x in xs])
    assert totals[1] != 0
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-10, atol=1e-10)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-10)
    _same_state(ours, theirs)


def test_enqueue_mask_all_or_nothing():
    ours, theirs = _pair("MultiSimilarityLoss", {})
    gen = torch.Generator().manual_seed(4)
    x, labels = _batch(gen, 6, torch.float64)
    _step(ours, theirs, x, labels, 1e-10, 1e-10, enqueue_mask=torch.zeros(6, dtype=torch.bool))
    assert ours.has_been_filled  # PML: nothing enqueued, queue_idx unchanged, so "filled"
    _step(ours, theirs, x, labels, 1e-10, 1e-10, enqueue_mask=torch.ones(6, dtype=torch.bool))  # no row left
    _step(ours, theirs, *_batch(gen, 5, torch.float64), 1e-10, 1e-10)


def test_float_labels():
    for name in ("MultiSimilarityLoss", "ContrastiveLoss"):
        ours, theirs = _pair(name, FUSED[name])
        backends = []
        _run(ours, theirs, sizes=[7, 9, 6, 8], seed=5, float_labels=True, backends=backends)
        assert "cpp" in backends
        assert theirs.label_memory.dtype == torch.float64


def test_label_dtype_changes_between_calls():
    """PML casts the label queue to each batch's label dtype."""
    ours, theirs = _pair("MultiSimilarityLoss", {})
    gen = torch.Generator().manual_seed(6)
    for n, float_labels in ((7, False), (6, True), (9, False)):
        _step(ours, theirs, *_batch(gen, n, torch.float64, float_labels=float_labels), 1e-10, 1e-10)


# ----------------------------------------------------------------------------- miners and tuples
@pytest.mark.parametrize("loss_name,miner", [
    ("MultiSimilarityLoss", ("MultiSimilarityMiner", dict(epsilon=0.3))),
    ("TripletMarginLoss", ("TripletMarginMiner", dict(margin=0.4, type_of_triplets="semihard"))),
    ("ContrastiveLoss", ("TripletMarginMiner", dict(margin=0.4))),
])
@pytest.mark.parametrize("mask", [False, True], ids=["no-mask", "enqueue-mask"])
def test_with_a_miner(loss_name, miner, mask):
    ours, theirs = _pair(loss_name, {**FUSED, **OTHERS}[loss_name], miner=miner)
    _run(ours, theirs, sizes=[7, 9, 6, 8, 10, 1, 7], seed=7, mask=mask)


@pytest.mark.parametrize("form", ["pairs", "triplets"])
def test_user_indices_tuple(form):
    """A user tuple is appended to the all-pairs one (triplets converted to pairs). (A pair-based
    loss: arbitrary pairs may be listed as positive and negative.)"""
    ours, theirs = _pair("ContrastiveLoss", FUSED["ContrastiveLoss"])
    gen = torch.Generator().manual_seed(8)
    for n in (7, 9, 6, 8):
        x, labels = _batch(gen, n, torch.float64)
        idx = [torch.randint(0, n, (5,), generator=gen) for _ in range(4 if form == "pairs" else 3)]
        _step(ours, theirs, x, labels, 1e-10, 1e-10, indices_tuple=tuple(idx))


def test_user_pairs_with_a_triplet_miner():
    ours, theirs = _pair("TripletMarginLoss", dict(margin=0.3), miner=("TripletMarginMiner", dict(margin=0.5)))
    gen = torch.Generator().manual_seed(9)
    for n in (7, 9, 8):
        x, labels = _batch(gen, n, torch.float64)
        a1 = torch.arange(n)
        pairs = (a1, torch.roll(a1, 1), a1, torch.roll(a1, 2))
        _step(ours, theirs, x, labels, 1e-10, 1e-10, indices_tuple=pairs)


def test_lazy_tuple_is_pmls_list():
    """LazyAllPairs read: PML's get_all_pairs_indices less remove_self_comparisons, index for index,
    the batch's slots wrapping around the queue's end or not."""
    gen = torch.Generator().manual_seed(10)
    for memory, start, n in ((23, 0, 7), (23, 19, 7), (23, 16, 7), (23, 5, 23), (30, 3, 11), (11, 10, 2)):
        ref_labels = torch.randint(0, 3, (memory,), generator=gen)
        slots = torch.arange(start, start + n) % memory
        labels = ref_labels[slots].clone()
        expected = pml_lmu.remove_self_comparisons(pml_lmu.get_all_pairs_indices(labels, ref_labels), slots, memory)
        pairs = lazy_pairs.LazyAllPairs(labels, ref_labels, start)
        assert isinstance(pairs, tuple) and not pairs.is_materialized
        got = torch.cat(pairs)  # a torch function reads it
        assert pairs.is_materialized
        assert torch.equal(got, torch.cat(expected))
        assert all(torch.equal(a, b) for a, b in zip(pickle.loads(pickle.dumps(pairs)), expected))
        rolled = pairs.rolled(ref_labels)
        assert torch.equal(rolled[:n], labels)


def test_reset_queue():
    ours, theirs = _pair("NTXentLoss", FUSED["NTXentLoss"])
    _run(ours, theirs, sizes=[7, 9, 10], seed=11)
    ours.reset_queue()
    theirs.reset_queue()
    _same_state(ours, theirs)
    assert ours.embedding_memory.dtype == torch.float32 and ours.label_memory.dtype == torch.int64
    _run(ours, theirs, sizes=[8, 9, 10], seed=12)


# ----------------------------------------------------------------------------- module behaviour
def test_attributes_state_dict_and_pickle():
    ours, theirs = _pair("MultiSimilarityLoss", {})
    assert not hasattr(ours, "curr_batch_idx") and not hasattr(theirs, "curr_batch_idx")
    assert ours._record_these == theirs._record_these
    assert (ours.embedding_size, ours.memory_size, ours.miner) == (D, MEMORY, None)
    _run(ours, theirs, sizes=[7, 9, 10], seed=13)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
    # A fresh module loads the queue (not queue_idx / has_been_filled: plain attributes, as in PML).
    fresh_ours, fresh_theirs = _pair("MultiSimilarityLoss", {})
    fresh_ours.load_state_dict(ours.state_dict())
    fresh_theirs.load_state_dict(theirs.state_dict())
    assert fresh_ours.queue_idx == fresh_theirs.queue_idx == 0
    _same_state(fresh_ours, fresh_theirs)
    # Pickled / deep-copied: the whole state, and the next steps agree.
    ours_copy, theirs_copy = pickle.loads(pickle.dumps(ours)), copy.deepcopy(theirs)
    _same_state(ours_copy, theirs_copy)
    _run(ours_copy, theirs_copy, sizes=[8, 6], seed=14)


def test_supported_losses_and_constructor():
    assert losses.CrossBatchMemory.supported_losses() == pml_losses.CrossBatchMemory.supported_losses()
    with pytest.raises(Exception, match="not supported for ArcFaceLoss"):
        pml_losses.CrossBatchMemory(pml_losses.ArcFaceLoss(3, D), D)
    with pytest.raises(Exception, match="not supported for ArcFaceLoss"):
        losses.CrossBatchMemory(losses.ArcFaceLoss(3, D), D)
    cbm = losses.CrossBatchMemory(losses.NTXentLoss(), D, 17, collect_stats=True)
    assert cbm.collect_stats and cbm.memory_size == 17 and cbm.embedding_memory.shape == (17, D)


def _bad_inputs():
    x, labels = torch.randn(6, D), torch.randint(0, 3, (6,))
    pairs = tuple(torch.zeros(1, dtype=torch.long) for _ in range(4))
    return [  # (kwargs, error type dmlkern raises, message fragment, whether PML rejects it too)
        (dict(embeddings=x, labels=labels, indices_tuple=pairs, enqueue_mask=torch.ones(6, dtype=torch.bool)),
         ValueError, "mutually exclusive", True),
        (dict(embeddings=x, labels=labels, enqueue_mask=torch.ones(5, dtype=torch.bool)),
         AssertionError, "enqueue_mask", True),
        (dict(embeddings=torch.randn(MEMORY + 1, D), labels=torch.zeros(MEMORY + 1, dtype=torch.long)),
         AssertionError, "memory_size", True),
        (dict(embeddings=torch.randn(6, D + 1), labels=labels), ValueError, "embedding_size", True),
        (dict(embeddings=x, labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels", True),
        (dict(embeddings=x, labels=None), ValueError, "labels", True),
        (dict(embeddings=torch.randn(0, D), labels=torch.zeros(0, dtype=torch.long)), ValueError, "embeddings",
         True),
        (dict(embeddings=torch.randn(6), labels=labels), ValueError, "embeddings", True),
        # PML silently misbehaves: an int mask indexes rows, ~mask negates the ints
        (dict(embeddings=x, labels=labels, enqueue_mask=torch.ones(6, dtype=torch.long)),
         TypeError, "enqueue_mask", False),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_raise_naming_the_argument(case):
    kwargs, error, fragment, pml_rejects = _bad_inputs()[case]
    ours, theirs = _pair("MultiSimilarityLoss", {})
    gen = torch.Generator().manual_seed(15)
    _step(ours, theirs, *_batch(gen, 7, torch.float32), 1e-5, 1e-6)
    before = copy.deepcopy(ours)
    with pytest.raises(error, match=fragment):
        ours(**kwargs)
    if pml_rejects:
        with pytest.raises(Exception):
            theirs(**kwargs)
    _same_state(ours, before)  # checked before the queue changes


# ----------------------------------------------------------------------------- memory
_MEMORY_SETUP = """
    torch.manual_seed(0)
    memory, n = 65536, 1024
    def filled(loss):
        cbm = losses.CrossBatchMemory(loss, 128, memory_size=memory)
        cbm.embedding_memory.normal_()
        cbm.label_memory.random_(0, 1000)
        cbm.has_been_filled, cbm.queue_idx = True, 1000  # the batch's slots start at 1000
        return cbm
    names = ("MultiSimilarityLoss", "NTXentLoss", "ContrastiveLoss")
    queues = {name: filled(getattr(losses, name)()) for name in names}
    x = torch.randn(n, 128, requires_grad=True)
    labels = torch.randint(0, 1000, (n,))
    warm = losses.CrossBatchMemory(losses.MultiSimilarityLoss(), 128, memory_size=300)
    warm(torch.randn(200, 128, requires_grad=True), labels[:200]).backward()  # loads the kernels' code
"""


def test_peak_memory_of_a_large_queue():
    """memory_size 65,536, batch 1024, D = 128, fp32 on the CPU: PML lists ~67M pairs (four int64
    tensors, ~2 GiB, and its N x M matrices); each fused loss's fwd+bwd (on the rolled queue, a
    32 MiB copy) grows the peak RSS by < 256 MiB beyond the queues."""
    growth = peak_rss_growth_mib(_MEMORY_SETUP, """
        for name, cbm in queues.items():
            loss = cbm(x, labels)
            loss.backward()
            assert cbm.loss.last_backend == "cpp", (name, cbm.loss.last_backend, cbm.loss.last_fallback)
            assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
            x.grad = None
    """)
    print(f"peak RSS growth {growth:.0f} MiB")
    assert growth < 256, growth
