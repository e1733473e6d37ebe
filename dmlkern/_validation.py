"""Input validation for every dmlkern loss.

``validate_inputs`` raises a clear ``ValueError`` / ``TypeError`` whose message names the
offending argument. PML's own ``ValueError`` conditions are kept (same conditions, same type):

* labels whose length differs from the batch, or that are not 1-D;
* ref_labels whose length differs from ref_emb, or that are not 1-D;
* labels missing where the loss needs them; labels and indices_tuple both missing for losses
  that need one of them.

Added checks (PML crashes later with an obscure error, or silently misbehaves):

* embeddings / ref_emb not a tensor, not floating point (TypeError), not 2-D (ValueError; PML
  raises that one too). Empty ones are accepted: the losses return PML's grad-carrying zero, the
  miners empty index tuples;
* ref_emb width differs from embeddings (ValueError), dtype differs (TypeError), device differs
  (ValueError);
* labels / ref_labels complex (TypeError). Integer, bool and float labels are accepted, as PML
  accepts them: PML compares them with ``==``, so ``as_class_ids`` / ``class_id_pair`` map them to
  int64 ids equal exactly where the values are (1.5 and 1.7 are two classes; NaN labels raise, see ``_no_nan``). Where labels index class weights (``label_kind="indices"``: the softmax family,
  ProxyAnchor, SoftTriple, Center) PML fails on float/bool labels, and so does dmlkern, with a
  TypeError naming labels; ProxyNCA (``"class_ids"``) compares them with ``arange(num_classes)``
  as PML does, so integral values are accepted (non-integral ones raise as out-of-range ids do);
* ref_emb given without ref_labels, labels given, no indices_tuple, and ref_emb has a different
  number of rows than labels (ValueError: PML would silently compare wrong rows or crash);
* indices_tuple not a tuple/list of 3 or 4 1-D integer tensors, mismatched lengths, or entries
  out of range (ValueError / TypeError).

labels, ref_labels and indices_tuple on another device than embeddings are accepted (PML moves
labels to the embeddings' device; ``prepare_inputs`` does the same).
"""

import torch

from ._tracing import static_shapes

__all__ = ["validate_inputs", "prepare_inputs", "as_class_ids", "class_id_pair", "InvalidInputError"]


class InvalidInputError(ValueError, AssertionError):
    """A ValueError that is also an AssertionError: raised where PML only ``assert``s."""


def _is_int_dtype(dtype):
    return (not dtype.is_floating_point) and (not dtype.is_complex) and dtype != torch.bool


def _check_emb(x, name):
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2D tensor of shape (batch_size, embedding_size), got shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_labels(lab, name, n, emb_name):
    if not torch.is_tensor(lab):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lab).__name__}")
    if lab.ndim != 1:
        raise ValueError(f"{name} must be a 1D tensor of shape (batch_size,), got shape {tuple(lab.shape)}")
    if lab.shape[0] != n:
        raise ValueError(
            f"Number of {emb_name} must equal number of {name}: {name} has {lab.shape[0]} entries, "
            f"{emb_name} has {n} rows"
        )
    if lab.dtype.is_complex:
        raise TypeError(f"{name} must be an integer, bool or float tensor, got dtype {lab.dtype}")


def _check_indices_tuple(indices_tuple, n_query, n_ref):
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must be a tuple of 3 tensors (anchors, positives, negatives) or 4 tensors "
            "(anchors1, positives, anchors2, negatives)"
        )
    if len(indices_tuple) == 3:
        names = ("anchors", "positives", "negatives")
        bounds = (n_query, n_ref, n_ref)
        groups = [(0, 1, 2)]
    else:
        names = ("anchors1", "positives", "anchors2", "negatives")
        bounds = (n_query, n_ref, n_query, n_ref)
        groups = [(0, 1), (2, 3)]
    for x, nm, hi in zip(indices_tuple, names, bounds):
        if not torch.is_tensor(x):
            raise TypeError(f"indices_tuple entry '{nm}' must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 1:
            raise ValueError(f"indices_tuple entry '{nm}' must be 1D, got shape {tuple(x.shape)}")
        if not _is_int_dtype(x.dtype):
            raise TypeError(f"indices_tuple entry '{nm}' must be an integer tensor, got dtype {x.dtype}")
        if x.numel() > 0:
            lo, top = int(x.min()), int(x.max())
            if lo < 0 or top >= hi:
                raise ValueError(
                    f"indices_tuple entry '{nm}' is out of range: values must be in [0, {hi}), "
                    f"got min {lo}, max {top}"
                )
    for g in groups:
        lens = {len(indices_tuple[i]) for i in g}
        if len(lens) != 1:
            raise ValueError(
                "indices_tuple entries " + ", ".join(f"'{names[i]}'" for i in g) + " must have equal lengths"
            )


def validate_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, labels_required):
    """Raise ValueError/TypeError (naming the argument) for malformed loss inputs.

    labels_required: True (labels must be given), False (labels or indices_tuple must be given),
    None (no requirement).
    """
    _check_emb(embeddings, "embeddings")
    n = embeddings.shape[0]
    if labels is not None:
        _check_labels(labels, "labels", n, "embeddings")
    if labels_required is True and labels is None:
        raise ValueError("labels are required for this loss function")
    if labels_required is False and labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    m = n
    if ref_emb is not None:
        _check_emb(ref_emb, "ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb must have the same embedding size as embeddings: {ref_emb.shape[1]} != "
                f"{embeddings.shape[1]}"
            )
        if ref_emb.dtype != embeddings.dtype:
            raise TypeError(f"ref_emb dtype {ref_emb.dtype} differs from embeddings dtype {embeddings.dtype}")
        if ref_emb.device != embeddings.device:
            raise ValueError(
                f"ref_emb is on device {ref_emb.device} but embeddings is on {embeddings.device}"
            )
        m = ref_emb.shape[0]
        if ref_labels is not None:
            _check_labels(ref_labels, "ref_labels", m, "ref_emb")
        elif labels is not None and m != n and (labels_required is True or indices_tuple is None):
            raise ValueError(
                f"ref_labels is required when ref_emb ({m} rows) and embeddings ({n} rows) differ in size"
            )
    if indices_tuple is not None:
        _check_indices_tuple(indices_tuple, n, m)


def _dense_ids(values):
    """int64 ids of a 1-D tensor's values, equal exactly where the values are ``==`` (PML's
    comparison) and ordered as the values: sort, a new id where a value differs from the one
    before (so each NaN, unequal to everything, gets its own; -0.0 and 0.0 share one). O(N log N),
    static shapes (no torch.unique), no host sync: traceable by torch.compile."""
    ordered, order = torch.sort(values, stable=True)
    starts = torch.cat([torch.ones_like(ordered[:1], dtype=torch.bool), ordered[1:] != ordered[:-1]])
    ids = torch.cumsum(starts, 0)
    return torch.empty_like(ids).scatter_(0, order, ids - 1)


def _no_nan(labels, name):
    """NaN labels raise (eager; one host read, float labels only): PML compares them with ==,
    so a NaN-labelled row is no other row's positive and, as PML builds its negatives before
    removing the self pairs, its own negative: a silently meaningless loss."""
    if not static_shapes() and labels.numel() > 0 and bool(torch.isnan(labels).any()):
        raise ValueError(f"{name} contain NaN: PML treats a NaN-labelled row as a class of its own and as "
                         f"its own negative pair; give every row a class id")


def as_class_ids(labels, device, name="labels"):
    """Labels as every path takes them: contiguous int64 on the embeddings' device (PML accepts
    any integer dtype; the kernels and F.one_hot need int64; searchsorted warns on a strided
    view). The same object when it is already that, so the ``ref_labels is labels`` identity
    survives. Integer and bool labels are cast (True is 1, as ``==`` takes it); float labels
    become ids equal where the values are equal (``_dense_ids``)."""
    if labels is None:
        return None
    labels = labels.to(device=device)
    if labels.dtype.is_floating_point:
        _no_nan(labels, name)
        return _dense_ids(labels)
    return labels.to(dtype=torch.int64).contiguous()


def class_id_pair(labels, ref_labels, device):
    """``(as_class_ids(labels), as_class_ids(ref_labels))`` with ids shared by the two tensors, so
    that ``ids == ref_ids`` exactly where PML's ``labels == ref_labels`` holds (in the promoted
    dtype, as ``==`` compares an int with a float tensor). ``ref_labels`` None or the same object
    as ``labels``: it stays so."""
    if ref_labels is None or ref_labels is labels or labels is None:
        ids = as_class_ids(labels, device)
        return ids, (ids if ref_labels is labels else as_class_ids(ref_labels, device, "ref_labels"))
    if not (labels.dtype.is_floating_point or ref_labels.dtype.is_floating_point):
        return as_class_ids(labels, device), as_class_ids(ref_labels, device)
    for lab, name in ((labels, "labels"), (ref_labels, "ref_labels")):
        if lab.dtype.is_floating_point:
            _no_nan(lab, name)
    common = torch.promote_types(labels.dtype, ref_labels.dtype)
    both = torch.cat([labels.to(device=device, dtype=common), ref_labels.to(device=device, dtype=common)])
    ids = _dense_ids(both)
    return ids[:labels.shape[0]], ids[labels.shape[0]:]


def _labels_of_kind(labels, kind, name):
    """Labels that index class weights (``kind``, see the module docstring): PML fails on float
    and bool ones (F.one_hot, indexing, cross_entropy), so does dmlkern, naming the argument;
    ProxyNCA compares them with its class indices, so integral values are those ids."""
    if labels is None or kind == "compared" or not (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        return labels
    if kind == "indices":
        raise TypeError(f"labels must be an integer tensor of class ids for {name} (they index its class "
                        f"weights, as in PML), got dtype {labels.dtype}")
    if labels.dtype.is_floating_point and not static_shapes() and not bool(torch.all(labels == labels.round())):
        raise ValueError(f"labels must be class ids in [0, num_classes) for {name}: got non-integral values")
    return labels.to(torch.int64)


def _to_dev(x, device):
    if x is not None and x.device != device:
        return x.to(device)
    return x


def prepare_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels, *, labels_required,
                   label_kind="compared", loss_name="this loss"):
    """validate_inputs, then PML's input handling; returns (embeddings, labels, indices_tuple,
    ref_emb, ref_labels).

    * labels, ref_labels and indices are moved to the embeddings' device; labels and ref_labels
      become int64 ids (``class_id_pair``; ``label_kind``: see ``_labels_of_kind``);
    * without ref_emb, ref_emb/ref_labels are embeddings/labels themselves (the same objects:
      the ``ref_labels is labels`` identity is what excludes self-pairs);
    * ref_emb given without ref_labels: ref_labels is labels (PML's pair utilities fall back the
      same way).
    """
    validate_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels, labels_required=labels_required)
    dev = embeddings.device
    labels = _labels_of_kind(labels, label_kind, loss_name)
    if indices_tuple is not None:
        indices_tuple = tuple(_to_dev(x, dev) for x in indices_tuple)
    if ref_emb is None:  # a given ref_labels without ref_emb is ignored, as in PML
        ref_labels = None
    labels, ref_labels = class_id_pair(labels, ref_labels, dev)
    if ref_emb is None:
        ref_emb = embeddings
    if ref_labels is None:
        ref_labels = labels
    return embeddings, labels, indices_tuple, ref_emb, ref_labels
