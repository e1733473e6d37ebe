"""A miner's result as PML's tuple, computed only if something reads it: the Multi-Similarity
miner's pairs (`LazyMinedPairs`), the Triplet-Margin miner's triplets (`LazyMinedTriplets`) and
the Pair-Margin miner's pairs (`LazyMarginPairs`);
and CrossBatchMemory's all pairs of a batch with its queue, less the self comparisons
(`LazyAllPairs`, which the fused pair losses run on the engine: `_common.all_pairs_plan`).

`LazyMinedPairs` is a real `tuple` of four LongTensors (a1, p, a2, n) (`LazyMinedTriplets` of
three, (a, p, n)), so everything PML's result
allows works with it: unpacking, indexing, `torch.cat(pairs)`, `pairs + (...)`, `isinstance(pairs,
tuple)`, PML's `convert_to_weights`, pickle / `torch.save` / `copy.deepcopy` (they give a plain
tuple). Its tensors are `PendingIndices`: placeholders whose values, all at once, are
computed the first time any torch function reads one of them (PML's miner, on a snapshot of the
inputs taken at mining time).

A fused MultiSimilarityLoss that gets the pairs reads none of them: it checks that its
embeddings still hold the mined values and then mines inside its kernel with the snapshot's
labels and epsilon, so the pair indices are never built (docs/ARCHITECTURE.md); a fused
TripletMarginLoss does the same with the triplets (the miner's type and margin,
`fused/triplet.py`), a fused ContrastiveLoss with the Pair-Margin miner's pairs (its margins,
`fused/pair_margin_contrastive.py`). The snapshot
(a copy of the embeddings and labels, O(N D)) makes the result independent of what happens
between miner and loss, as PML's is: an in-place update of the embeddings or labels, a new
`miner.epsilon`, mining on `emb.detach()`.
"""
import copy
import weakref

import torch

from .._tracing import static_shapes
from . import _common


def _fill_pending(obj):
    """Compute every PendingIndices among a torch function's arguments (nested lists too)."""
    if isinstance(obj, PendingIndices):
        obj.fill()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _fill_pending(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _fill_pending(item)


def _plain(tensor):
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.as_subclass(torch.Tensor)


class PendingIndices(torch.Tensor):
    """One of the index tensors of a LazyMined tuple: an int64 tensor that computes its
    values (with its siblings) the first time a torch function reads it, then behaves as
    that tensor; operations on it return plain tensors."""

    _mining = None  # the _Mining that fills it

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        _fill_pending(args)
        _fill_pending(kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def fill(self):
        if self._mining is not None:
            self._mining.compute()

    def __deepcopy__(self, memo):
        self.fill()
        return _plain(self).clone()

    def __reduce_ex__(self, protocol):
        self.fill()
        return _plain(self).__reduce_ex__(protocol)


def _same_memory(t, ref, version):
    """Whether t views the same memory as ref, untouched since `version` (ref's version counter
    at mining time; views and detach() share it). Reads no values: no host sync on a GPU."""
    try:
        return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device == ref.device and t.dtype == ref.dtype
                and t.shape == ref.shape and t.stride() == ref.stride()
                and t.storage_offset() == ref.storage_offset() and t.data_ptr() == ref.data_ptr()
                and t._version == version)
    except (RuntimeError, NotImplementedError):  # e.g. functorch wrappers have no storage
        return False


_SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits(t):
    """t's bits as integers: equal exactly where the values are identical, NaN included."""
    t = t.detach()
    return t.view(_SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t


class _Snapshot:
    """One side's embeddings as the miner saw them: the tensor (detached, so that the caller's
    autograd graph is not kept alive), its version counter and a copy of its values. Under
    torch.compile only the tensor: identity decides there, and nothing is copied in the graph."""

    def __init__(self, embeddings):
        if static_shapes():
            self.tensor, self.version, self.values = embeddings, None, None
        else:
            self.tensor, self.version = embeddings.detach(), embeddings._version
            self.original = weakref.ref(embeddings)  # the caller's object, without its graph
            self.values = self.tensor.clone()

    def mined_values(self):
        return self.tensor if self.values is None else self.values

    def holds(self, t):
        """Whether t has the values mined on. A GPU tensor viewing the mined memory, untouched
        since, does without reading values (no host sync); otherwise (and on the CPU, where it
        is cheap and also sees changes made through .data) the values are compared."""
        if self.values is None:
            return t is self.tensor
        if _common.branch_free(t) and (t is self.original() and t._version == self.version
                               or _same_memory(t, self.tensor, self.version)):
            return True
        v = self.values
        return t.shape == v.shape and t.dtype == v.dtype and t.device == v.device and torch.equal(_bits(t), _bits(v))


class _Deferred:
    """An index tuple computed on first use: `build()` gives its tensors; `compute()` runs it once
    and fills the placeholders (`make_placeholders`) with them."""

    result = None

    def build(self):
        raise NotImplementedError

    def compute(self):
        if self.result is None:
            self.result = tuple(_plain(t) for t in self.build())
            for get_placeholder, values in zip(self.placeholders, self.result):
                placeholder = get_placeholder()
                if placeholder is not None:
                    with torch.inference_mode(placeholder.is_inference()), torch._C.DisableTorchFunctionSubclass():
                        placeholder.set_(values)
        return self.result

    def make_placeholders(self, device, size):
        """The `size` PendingIndices: views of one empty allocation (one op, not `size`)."""
        self.placeholders = []  # weak references: a placeholder keeps its owner alive, not the reverse
        self.empty = torch.empty((size, 0), dtype=torch.long, device=device)
        if type(self.empty) is not torch.Tensor:  # a tracing mode's tensor (make_fx, fake tensors):
            return self.empty.unbind(0)  # no subclass of it; only a fused loss can use the result there
        out = [t.as_subclass(PendingIndices) for t in self.empty.unbind(0)]
        for t in out:
            t._mining = self
            # (under torch.compile a plain closure: dynamo traces no weakref)
            self.placeholders.append((lambda t=t: t) if static_shapes() else weakref.ref(t))
        return out


class _Mining(_Deferred):
    """A miner's call, replayable: the miner's settings (`settings`, read at mining time), a
    snapshot of its inputs and `mine(mining, query, ref, labels, ref_labels)`, PML's miner on them.
    `compute()` runs it (once) and fills the placeholders."""

    def __init__(self, miner, embeddings, labels, ref_emb, ref_labels, settings, mine):
        keep = (lambda t: t) if static_shapes() else (lambda t: t.clone())
        self.settings, self.mine = settings, mine
        # (a shallow copy: its settings as at mining time; 5 us where a deep copy costs 70)
        self.distance = miner.distance if static_shapes() else copy.copy(miner.distance)
        # PML's miner: without ref_emb the batch is its own reference (ref_labels is labels then).
        self.same_embeddings = ref_emb is None or ref_emb is embeddings
        if ref_emb is None:
            ref_labels = labels
        self.query = _Snapshot(embeddings)
        self.ref = None if self.same_embeddings else _Snapshot(ref_emb)
        self.labels = keep(labels)
        # PML drops the positive pairs (i, i) when ref_labels is labels or absent.
        self.ref_labels_same = ref_labels is None or ref_labels is labels
        self.ref_labels_none = ref_labels is None
        self.ref_labels = None if self.ref_labels_same else keep(ref_labels)
        self.n, self.m = embeddings.shape[0], (embeddings if ref_emb is None else ref_emb).shape[0]

    def build(self):
        query = self.query.mined_values()
        ref = query if self.ref is None else self.ref.mined_values()
        ref_labels = None if self.ref_labels_none else self.labels if self.ref_labels_same else self.ref_labels
        with torch.no_grad():
            return self.mine(self, query, ref, self.labels, ref_labels)


class LazyMined(tuple):
    """A miner's index tuple as PendingIndices (module docstring); the subclasses say which miner.

    `labels_as_given`: the miner's int64 labels for the caller's `given_labels` (a loss given
    that very labels tensor reuses them). What a fused loss mines with: the subclass's settings,
    `distance`, `mining_labels()`, `exclude_diag`; `kernel_can_mine` says whether the kernel's one
    diagonal rule matches the miner's.
    """

    size = None  # the number of index tensors

    @staticmethod
    def settings(miner):
        """The miner's settings the result depends on, read at mining time."""
        raise NotImplementedError

    @staticmethod
    def mine(mining, query, ref, labels, ref_labels):
        """PML's miner on the snapshot: the index tuple."""
        raise NotImplementedError

    def __new__(cls, miner, embeddings, labels, ref_emb, ref_labels, given_labels=(None, None)):
        mining = _Mining(miner, embeddings, labels, ref_emb, ref_labels, cls.settings(miner), cls.mine)
        self = super().__new__(cls, mining.make_placeholders(embeddings.device, cls.size))
        self.mining = mining
        self.given_labels = given_labels
        self.labels_as_given, self.ref_labels_as_given = labels, ref_labels
        return self

    @property
    def is_materialized(self):
        return self.mining.result is not None

    def materialize(self):
        """The index tuple as plain LongTensors: PML's miner on the mining-time inputs."""
        return self.mining.compute()

    @property
    def distance(self):
        return self.mining.distance

    @property
    def distance_kind(self):
        """"euclidean" / "cosine" for the miner's unit-row distances, else None (`triplet.distance_kind`)."""
        from .triplet import distance_kind
        return distance_kind(self.mining.distance)

    @property
    def exclude_diag(self):
        return self.mining.same_embeddings

    @property
    def kernel_can_mine(self):
        """The kernel applies one diagonal rule to the pairs and to the miner's extrema; PML drops
        (i, i) from the positives when ref_labels is labels, and from the extrema when ref_emb is
        embeddings. Only when both agree can the kernel mine as the miner did."""
        return self.mining.ref_labels_same == self.mining.same_embeddings

    def mining_labels(self):
        """(labels, ref_labels) as mined: one tensor twice when the diagonal is excluded."""
        m = self.mining
        return m.labels, m.labels if m.ref_labels_same else m.ref_labels

    def shape_matches(self, embeddings, ref_emb):
        """Whether a loss's (embeddings, ref_emb) have the row counts mined on (anything else:
        False, and the loss validates the materialised pairs as any indices_tuple)."""
        return (torch.is_tensor(embeddings) and torch.is_tensor(ref_emb) and embeddings.dim() >= 1
                and ref_emb.dim() >= 1 and embeddings.shape[0] == self.mining.n and ref_emb.shape[0] == self.mining.m)

    def empty_stand_in(self):
        """What input validation sees instead of the pairs (valid by construction, not computed)."""
        return self.mining.empty.unbind(0)  # plain views: reading them computes nothing

    def holds_inputs(self, embeddings, ref_emb):
        """Whether (embeddings, ref_emb) still hold the values mined on (ref_emb is embeddings for
        a batch compared with itself): then a fused loss may mine in its kernel."""
        m = self.mining
        if not m.query.holds(embeddings):
            return False
        if m.ref is None:
            return ref_emb is embeddings
        return ref_emb is not embeddings and m.ref.holds(ref_emb)

    def __reduce_ex__(self, protocol):  # pickle, torch.save, copy: a plain tuple, as PML's
        return _plain_tuple, (self.materialize(),)

    def __repr__(self):
        if not self.is_materialized:
            settings = ", ".join(f"{k}={v!r}" for k, v in self.mining.settings.items())
            return f"{type(self).__name__}(not computed yet, {settings})"
        return repr(self.materialize())


class LazyMinedPairs(LazyMined):
    """(a1, p, a2, n) of MultiSimilarityMiner; a fused MultiSimilarityLoss mines with `epsilon`."""

    size = 4

    @staticmethod
    def settings(miner):
        return {"epsilon": float(miner.epsilon)}

    @staticmethod
    def mine(mining, query, ref, labels, ref_labels):
        from ..reference.miners import multi_similarity_miner  # (the reference imports no fused code)

        return multi_similarity_miner(mining.distance(query, ref), labels, ref_labels, mining.settings["epsilon"],
                                      mining.distance.is_inverted, mining.same_embeddings)

    @property
    def epsilon(self):
        return self.mining.settings["epsilon"]


class LazyMinedTriplets(LazyMined):
    """(a, p, n) of TripletMarginMiner; a fused TripletMarginLoss keeps the triplets of `window`
    (the miner's type_of_triplets, PML treating any other string as "all") by `window_margin`."""

    size = 3

    @staticmethod
    def settings(miner):
        kind = miner.type_of_triplets if miner.type_of_triplets in ("hard", "semihard", "easy") else "all"
        return {"margin": float(miner.margin), "type_of_triplets": kind}

    @staticmethod
    def mine(mining, query, ref, labels, ref_labels):
        from ..reference.miners import triplet_margin_miner

        return triplet_margin_miner(mining.distance(query, ref), labels, ref_labels, mining.settings["margin"],
                                    mining.settings["type_of_triplets"], mining.distance.is_inverted)

    @property
    def window(self):
        return self.mining.settings["type_of_triplets"]

    @property
    def window_margin(self):
        return self.mining.settings["margin"]

    def count(self):
        """The number of triplets (the miner's num_triplets) without listing them, unless listed."""
        from .triplet import TripletRule, count_kept

        if self.is_materialized:
            return len(self.mining.result[0])
        m = self.mining
        cdist = self.distance_kind == "euclidean"
        query = _common.unit_rows(m.query.mined_values(), cdist)
        ref = query if m.ref is None else _common.unit_rows(m.ref.mined_values(), cdist)
        labels, ref_labels = self.mining_labels()
        rule = TripletRule(0.0, False, self.distance_kind == "euclidean", self.window, self.window_margin)
        return count_kept(query, ref, labels, ref_labels, rule, m.ref_labels_same)


class LazyMarginPairs(LazyMined):
    """(a1, p, a2, n) of PairMarginMiner; a fused ContrastiveLoss keeps the positive pairs beyond
    `pos_margin` and the negative pairs within `neg_margin` of the miner's distance
    (`fused/pair_margin_contrastive.py`) without listing them."""

    size = 4

    @staticmethod
    def settings(miner):
        return {"pos_margin": float(miner.pos_margin), "neg_margin": float(miner.neg_margin)}

    @staticmethod
    def mine(mining, query, ref, labels, ref_labels):
        from . import blocked_miners

        return blocked_miners.pair_margin_miner(mining.distance, query, labels, ref, ref_labels,
                                                mining.settings["pos_margin"], mining.settings["neg_margin"])


class _AllPairsListing(_Deferred):
    """The listing behind a LazyAllPairs: PML's get_all_pairs_indices(labels, ref_labels) (two
    tensors: no diagonal dropped), then remove_self_comparisons' rule for `self_offset`."""

    def __init__(self, labels, ref_labels, self_offset):
        # Copies: the caller may update its tensors in place (CrossBatchMemory's label queue).
        self.labels, self.ref_labels, self.self_offset = labels.clone(), ref_labels.clone(), self_offset
        self.n, self.m = labels.shape[0], ref_labels.shape[0]
        self.settings = {"self_offset": self_offset}

    def build(self):
        same = self.labels[:, None] == self.ref_labels[None, :]
        a2, n = torch.where(~same)
        if self.self_offset is not None:
            rows = torch.arange(self.n, device=same.device)
            same[rows, (rows + self.self_offset) % self.m] = False
        a1, p = torch.where(same)
        return a1, p, a2, n


class LazyAllPairs(LazyMined):
    """(a1, p, a2, n): every positive and every negative pair of the N query rows with the M
    reference rows, as PML's get_all_pairs_indices(labels, ref_labels) of two tensors lists them
    (row-major); with `self_offset`, less the positive pairs (i, (self_offset + i) % M), each query
    row compared with its own copy among the reference rows (PML's remove_self_comparisons for
    CrossBatchMemory's queue, where row i sits in slot self_offset + i). Those pairs are positive:
    the caller guarantees ref_labels[(self_offset + i) % M] == labels[i].

    `labels` / `ref_labels`: int64 ids (compared with ==), copied. A fused pair loss reads no index:
    it runs the engine on the reference rows `rolled` so that the self comparisons are the diagonal
    (`fused._common.all_pairs_plan`); anything else that reads one computes the whole tuple."""

    size = 4

    def __new__(cls, labels, ref_labels, self_offset=None):
        listing = _AllPairsListing(labels, ref_labels, self_offset)
        self = tuple.__new__(cls, listing.make_placeholders(labels.device, cls.size))
        self.mining = listing
        self.given_labels = (None, None)  # (BaseMetricLossFunction.forward: no labels to swap in)
        self.labels_as_given = self.ref_labels_as_given = None
        return self

    @property
    def self_offset(self):
        return self.mining.self_offset

    def mining_labels(self):
        """(labels, ref_labels) the pairs are listed from."""
        return self.mining.labels, self.mining.ref_labels

    def rolled(self, ref):
        """The reference rows (or labels) `ref` rolled so that row i is query row i's own copy
        (row self_offset + i): `ref` itself without a self_offset."""
        offset = self.self_offset
        if offset is None or offset % len(ref) == 0:
            return ref
        offset %= len(ref)
        return torch.cat([ref[offset:], ref[:offset]])


def _plain_tuple(items):
    """What a pickled LazyMinedPairs loads as: PML's plain tuple of tensors."""
    return tuple(items)


# torch.load(weights_only=True), torch's default, loads only allow-listed globals; a pickled pair
# tuple names this function (a tuple subclass cannot pickle as a plain tuple).
torch.serialization.add_safe_globals([_plain_tuple])
