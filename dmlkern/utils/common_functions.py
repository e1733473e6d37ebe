"""pytorch-metric-learning 2.9.0's ``pytorch_metric_learning.utils.common_functions`` (``c_f``):
every public name, with PML's signatures and behaviour.

* Statistics bookkeeping: ``COLLECT_STATS`` (the global switch: a loss, miner, reducer, distance or
  regularizer built with ``collect_stats=None``, the default, reads it when it is constructed),
  ``add_to_recordable_attributes``, ``reset_stats``, ``list_of_recordable_attributes_list_names``
  and ``RecordsMixin`` (dmlkern's form of PML's ``ModuleWithRecords`` for its own hierarchies).
  A module lists its recordable attributes in ``_record_these`` (hyper-parameters) and
  ``_record_these_stats`` (statistics; only created when the module collects statistics), and
  ``reset_stats`` sets every listed statistic to 0.
* Numeric and tensor helpers: ``pos_inf``, ``neg_inf``, ``small_val``, ``torch_arange_from_size``,
  ``to_dtype``, ``to_device``, ``numpy_to_torch``, ``to_numpy``, ``unslice_by_n``,
  ``torch_all_from_dim_to_end``, ``torch_standard_scaler``, ``shift_indices_tuple``,
  ``concatenate_indices_tuples``, ``safe_random_choice`` (draws from ``NUMPY_RANDOM``, replaceable).
* Input checks, as PML's losses use them: ``check_shapes``, ``set_ref_emb``, ``assert_distance_type``,
  ``labels_not_supported``, ``ref_not_supported``, ``indices_tuple_not_supported``,
  ``labels_required``, ``labels_or_indices_tuple_required``.
* Labels: ``LabelMapper``, ``get_label_map``, ``make_label_to_rank_dict``, ``map_labels``,
  ``get_hierarchy_label``, ``process_label``, ``get_labels_to_indices``.
* Data and models (PML's training helpers): ``EmbeddingDataset``, ``get_train_dataloader``,
  ``get_eval_dataloader``, ``try_next_on_generator``, ``set_requires_grad``, ``set_layers_to_eval``,
  ``modelpath_creator``, ``save_model``, ``load_model``, ``save_dict_of_models``,
  ``load_dict_of_models``, ``delete_dict_of_models``, ``operate_on_dict_of_models``,
  ``latest_version``, ``regex_wrapper``, ``regex_replace``, ``sqlite_obj_to_dict``,
  ``use_cuda_if_available``, ``TorchInitWrapper`` (the class ``dmlkern.losses`` uses),
  ``LOGGER`` / ``LOGGER_NAME`` / ``set_logger_name``.
* Small list helpers: ``is_list_or_tuple``, ``return_input``, ``exclude``, ``append_map``.

Only torch and numpy are imported (PML also imports scipy and tqdm here; dmlkern needs neither).
"""

import collections
import glob
import logging
import os
import re

import numpy as np
import torch

# PML's logger name, so that logging configured for PML applies to these helpers unchanged.
LOGGER_NAME = "PML"
LOGGER = logging.getLogger(LOGGER_NAME)
# safe_random_choice draws from this; assign e.g. np.random.RandomState(0) for reproducible draws.
NUMPY_RANDOM = np.random
COLLECT_STATS = False


def set_logger_name(name):
    global LOGGER_NAME, LOGGER
    LOGGER_NAME = name
    LOGGER = logging.getLogger(name)


# ----------------------------------------------------------------------------- numbers and tensors
def pos_inf(dtype):
    return torch.finfo(dtype).max


def neg_inf(dtype):
    """The most negative finite value (PML fills masked logits with it instead of -inf)."""
    return torch.finfo(dtype).min


def small_val(dtype):
    return torch.finfo(dtype).tiny


def torch_arange_from_size(input, size_dim=0):
    return torch.arange(input.size(size_dim), device=input.device)


def is_list_or_tuple(x):
    return isinstance(x, (list, tuple))


def return_input(x):
    return x


def numpy_to_torch(v):
    """``torch.from_numpy(v)``; ``v`` unchanged when torch cannot take it (not an array, or an
    array of a dtype torch lacks)."""
    try:
        return torch.from_numpy(v)
    except TypeError:
        return v


def to_numpy(v):
    """``v.cpu().numpy()`` (a tensor as a numpy array); ``v`` unchanged when it has no such methods."""
    try:
        return v.cpu().numpy()
    except AttributeError:
        return v


def to_dtype(x, tensor=None, dtype=None):
    """``x`` cast to ``dtype`` (default: ``tensor``'s dtype). Left unchanged under CUDA autocast,
    which picks the dtypes itself."""
    if torch.is_autocast_enabled():
        return x
    dtype = tensor.dtype if dtype is None else dtype
    return x if x.dtype == dtype else x.type(dtype)


def to_device(x, tensor=None, device=None, dtype=None):
    """``x`` moved to ``device`` (default: ``tensor``'s device), then cast as ``to_dtype`` does
    when ``dtype`` is given."""
    device = tensor.device if device is None else device
    if x.device != device:
        x = x.to(device)
    return x if dtype is None else to_dtype(x, dtype=dtype)


def unslice_by_n(input_tensors):
    """Interleaves n (rows, cols) tensors row by row into one (rows * n, cols) float tensor:
    row ``i * n + k`` is row ``i`` of ``input_tensors[k]``."""
    n = len(input_tensors)
    rows, cols = input_tensors[0].size()
    out = torch.zeros((rows * n, cols), device=input_tensors[0].device)
    for k, t in enumerate(input_tensors):
        out[k::n] = t
    return out


def torch_all_from_dim_to_end(x, dim):
    """``torch.all`` over every dimension from ``dim`` on."""
    return torch.all(x.view(*x.shape[:dim], -1), dim=-1)


def torch_standard_scaler(x):
    """Each column standardised: ``(x - mean) / std`` over dim 0 (unbiased std)."""
    return (x - torch.mean(x, dim=0)) / torch.std(x, dim=0)


def shift_indices_tuple(indices_tuple, batch_size):
    """The positive and negative indices of a triplet (a, p, n) or pair (a1, p, a2, n) tuple plus
    ``batch_size`` (the anchors, and empty tensors, unchanged); any other tuple unchanged."""
    if len(indices_tuple) == 3:
        shifted = (1, 2)
    elif len(indices_tuple) == 4:
        shifted = (1, 3)
    else:
        return indices_tuple
    return tuple(x + batch_size if i in shifted and len(x) > 0 else x for i, x in enumerate(indices_tuple))


def concatenate_indices_tuples(it1, it2):
    """Two index tuples joined element by element (``it2``'s tensors moved to ``it1``'s device)."""
    return tuple(torch.cat([x, to_device(y, x)], dim=0) for x, y in zip(it1, it2))


def safe_random_choice(input_data, size):
    """``size`` items of ``input_data`` drawn without replacement, or with replacement when there
    are fewer than ``size``; drawn by ``NUMPY_RANDOM.choice``."""
    return NUMPY_RANDOM.choice(input_data, size=size, replace=len(input_data) < size)


# ----------------------------------------------------------------------------- input checks
def check_shapes(embeddings, labels):
    if labels is not None and embeddings.shape[0] != labels.shape[0]:
        raise ValueError("Number of embeddings must equal number of labels")
    if labels is not None and labels.ndim != 1:
        raise ValueError("labels must be a 1D tensor of shape (batch_size,)")


def set_ref_emb(embeddings, labels, ref_emb, ref_labels):
    """``(ref_emb, ref_labels)``: the batch itself when ``ref_emb`` is None, else ``ref_emb`` with
    ``ref_labels`` moved to its device; shapes checked with ``check_shapes``."""
    if ref_emb is None:
        ref_emb, ref_labels = embeddings, labels
    elif ref_labels is not None:
        ref_labels = to_device(ref_labels, ref_emb)
    check_shapes(ref_emb, ref_labels)
    return ref_emb, ref_labels


def assert_distance_type(obj, distance_type=None, **kwargs):
    """Asserts that ``obj.distance`` is a ``distance_type`` (a class or a tuple of classes) and
    that each ``distance.<k> == v``."""
    obj_name = type(obj).__name__
    if distance_type is not None:
        if is_list_or_tuple(distance_type):
            wanted = "one of " + ", ".join(t.__name__ for t in distance_type)
        else:
            wanted = distance_type.__name__
        # a list is not a valid isinstance argument, as in PML (TypeError)
        assert isinstance(obj.distance, distance_type), f"{obj_name} requires the distance metric to be {wanted}"
    for k, v in kwargs.items():
        assert getattr(obj.distance, k) == v, f"{obj_name} requires distance.{k} to be {v}"


def labels_not_supported(labels, ref_labels):
    if labels is not None or ref_labels is not None:
        raise ValueError("labels are ref_labels are not supported for this loss function")


def ref_not_supported(embeddings, labels, ref_emb, ref_labels):
    """Raises unless ``ref_emb``/``ref_labels`` are the batch itself (as ``set_ref_emb`` sets them)."""
    if ref_emb is not embeddings or ref_labels is not labels:
        raise ValueError("ref_emb is not supported for this loss function")


def indices_tuple_not_supported(indices_tuple):
    if indices_tuple is not None:
        raise ValueError("indices_tuple is not supported for this loss function")


def labels_required(labels):
    if labels is None:
        raise ValueError("labels are required for this loss function")


def labels_or_indices_tuple_required(labels, indices_tuple):
    if labels is None and indices_tuple is None:
        raise ValueError("labels and indices_tuple cannot both be None")


# ----------------------------------------------------------------------------- labels
def make_label_to_rank_dict(label_set):
    """``{label: its rank in label_set}`` (0 for the smallest); ``label_set`` must not repeat a label."""
    if len(set(label_set)) != len(label_set):
        raise ValueError("label set must not have duplicates")
    ranks = np.argsort(np.argsort(np.asarray(label_set)))  # distinct labels: the rank of each
    return dict(zip(label_set, ranks))


def get_label_map(labels):
    """``{hierarchy_level: make_label_to_rank_dict(the labels of that level)}``: one level (0) for
    1-d labels, one per column for 2-d labels."""
    labels = np.array(labels)
    columns = [labels[:, h] for h in range(labels.shape[1])] if labels.ndim == 2 else [labels]
    return {h: make_label_to_rank_dict(list(set(col))) for h, col in enumerate(columns)}


class LabelMapper:
    """``map(labels, hierarchy_level)``: with ``set_min_label_to_zero``, each label replaced by its
    rank among ``dataset_labels`` of that level (an int array); otherwise the labels unchanged."""

    def __init__(self, set_min_label_to_zero=False, dataset_labels=None):
        self.set_min_label_to_zero = set_min_label_to_zero
        if dataset_labels is not None:
            self.label_map = get_label_map(dataset_labels)

    def map(self, labels, hierarchy_level):
        if not self.set_min_label_to_zero:
            return labels
        return np.array([self.label_map[hierarchy_level][x] for x in labels], dtype=int)


def map_labels(label_map, labels):
    """``label_map(labels, 0)`` for 1-d labels; for 2-d labels (or a list/tuple of 1-d ones, the
    columns) an int array with column h mapped by ``label_map(column, h)``."""
    if is_list_or_tuple(labels):
        labels = np.stack([to_numpy(sub) for sub in labels], axis=1)
    else:
        labels = to_numpy(labels)
    if labels.ndim != 2:
        return label_map(labels, 0)
    out = np.zeros(labels.shape, dtype=int)
    for h in range(labels.shape[1]):
        out[:, h] = label_map(labels[:, h], h)
    return out


def get_hierarchy_label(batch_labels, hierarchy_level):
    """The column(s) ``hierarchy_level`` (an int or a list of ints) of 2-d labels; 1-d labels,
    and ``hierarchy_level="all"``, unchanged."""
    if hierarchy_level == "all":
        return batch_labels
    max_level = max(hierarchy_level) if is_list_or_tuple(hierarchy_level) else hierarchy_level
    if max_level > 0:
        assert batch_labels.ndim == 2 and batch_labels.shape[1] > max_level
    if batch_labels.ndim == 2:
        batch_labels = batch_labels[:, hierarchy_level]
    return batch_labels


def process_label(labels, hierarchy_level, label_map):
    """``map_labels``, then ``get_hierarchy_label``, then a tensor (``numpy_to_torch``)."""
    labels = map_labels(label_map, labels)
    return numpy_to_torch(get_hierarchy_label(labels, hierarchy_level))


def get_labels_to_indices(labels):
    """``{label: int array of the positions holding it}`` (a defaultdict(list); labels may be a
    tensor, an array or a sequence)."""
    if torch.is_tensor(labels):
        labels = labels.cpu().numpy()
    labels_to_indices = collections.defaultdict(list)
    for i, label in enumerate(labels):
        labels_to_indices[label].append(i)
    for label, idx in labels_to_indices.items():
        labels_to_indices[label] = np.array(idx, dtype=int)
    return labels_to_indices


# ----------------------------------------------------------------------------- data and models
class EmbeddingDataset(torch.utils.data.Dataset):
    """A dataset of ``(embeddings[i], labels[i])``."""

    def __init__(self, embeddings, labels):
        self.embeddings = embeddings
        self.labels = labels

    def __len__(self):
        return len(self.embeddings)

    def __getitem__(self, idx):
        return self.embeddings[idx], self.labels[idx]


def get_train_dataloader(dataset, batch_size, sampler, num_workers, collate_fn):
    """A DataLoader for training: the ``sampler`` as batch sampler when it is a BatchSampler;
    otherwise batches of ``batch_size`` from ``sampler`` (shuffled when it is None), last partial
    batch dropped."""
    if isinstance(sampler, torch.utils.data.BatchSampler):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn, pin_memory=False
        )
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), sampler=sampler, drop_last=True, num_workers=num_workers,
        collate_fn=collate_fn, shuffle=sampler is None, pin_memory=False,
    )


def get_eval_dataloader(dataset, batch_size, num_workers, collate_fn):
    """A DataLoader for evaluation: in order, every sample kept."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=int(batch_size), drop_last=False, num_workers=num_workers,
        collate_fn=collate_fn, shuffle=False, pin_memory=False,
    )


def try_next_on_generator(gen, iterable):
    """``(gen, next item)``, restarting ``gen`` as ``iter(iterable)`` when it is exhausted."""
    try:
        return gen, next(gen)
    except StopIteration:
        gen = iter(iterable)
        return gen, next(gen)


def set_requires_grad(model, requires_grad):
    for param in model.parameters():
        param.requires_grad = requires_grad


def set_layers_to_eval(layer_name):
    """A function for ``model.apply``: puts in eval mode each module whose class name contains
    ``layer_name`` (e.g. "BatchNorm")."""

    def set_to_eval(m):
        if layer_name in type(m).__name__:
            m.eval()

    return set_to_eval


def use_cuda_if_available():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def modelpath_creator(folder, basename, identifier, extension=".pth"):
    """``folder/basename.pth``, or ``folder/basename_<identifier>.pth``."""
    name = basename if identifier is None else f"{basename}_{identifier}"
    return os.path.join(folder, name + extension)


def save_model(model, filepath):
    """Saves the state dict (of the wrapped module for DataParallel / DistributedDataParallel)."""
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    torch.save(model.state_dict(), filepath)


def load_model(model_def, model_filename, device):
    """Loads a state dict into ``model_def``. On a KeyError, it reloads the file and strips the
    first 7 characters of each key (the ``module.`` prefix of a file saved from DataParallel)."""
    try:
        model_def.load_state_dict(torch.load(model_filename, map_location=device))
    except KeyError:
        state_dict = torch.load(model_filename)
        model_def.load_state_dict(collections.OrderedDict((k[7:], v) for k, v in state_dict.items()))


def operate_on_dict_of_models(input_dict, suffix, folder, operation, logging_string="",
                              log_if_successful=False, assert_success=False):
    """``operation(model, modelpath_creator(folder, name, suffix))`` for each ``name: model``; an
    IOError is logged as a warning (and raised again as IOError with ``assert_success``)."""
    for name, model in input_dict.items():
        model_path = modelpath_creator(folder, name, suffix)
        try:
            operation(model, model_path)
            if log_if_successful:
                LOGGER.info("%s %s" % (logging_string, model_path))
        except IOError:
            LOGGER.warning("Could not %s %s" % (logging_string, model_path))
            if assert_success:
                raise IOError


def save_dict_of_models(input_dict, suffix, folder, **kwargs):
    operate_on_dict_of_models(input_dict, suffix, folder, save_model, "SAVE", **kwargs)


def load_dict_of_models(input_dict, suffix, folder, device, **kwargs):
    def operation(model, model_path):
        load_model(model, model_path, device)

    operate_on_dict_of_models(input_dict, suffix, folder, operation, "LOAD", **kwargs)


def delete_dict_of_models(input_dict, suffix, folder, **kwargs):
    def operation(model, model_path):
        if os.path.exists(model_path):
            os.remove(model_path)

    operate_on_dict_of_models(input_dict, suffix, folder, operation, "DELETE", **kwargs)


def regex_wrapper(x):
    """``re.compile(x)``, or a list of compiled patterns for a list."""
    return [re.compile(z) for z in x] if isinstance(x, list) else re.compile(x)


def regex_replace(search, replace, contents):
    return re.sub(search, replace, contents)


def latest_version(folder, string_to_glob="trunk_*.pth", best=False):
    """``(epoch, suffix)`` of the newest checkpoint in ``folder`` matching ``string_to_glob`` whose
    name ends in ``<epoch>.pth`` (``best<epoch>.pth`` with ``best``; suffix ``"best<epoch>"``
    then); ``(0, None)`` when nothing matches the glob."""
    items = glob.glob(os.path.join(folder, string_to_glob))
    if not items:
        return 0, None
    model_regex = re.compile(r"best[0-9]+\.pth$" if best else r"[0-9]+\.pth$")
    epoch_regex = re.compile(r"[0-9]+\.pth$")
    epochs = [int(epoch_regex.findall(x)[-1].split(".")[0]) for x in items if model_regex.search(x)]
    epoch = max(epochs)  # ValueError when none has an epoch, as in PML
    return epoch, f"best{epoch}" if best else epoch


def sqlite_obj_to_dict(sqlite_obj):
    """Rows (e.g. a list of ``sqlite3.Row``) as ``{column: [value of each row]}``."""
    return {k: [row[k] for row in sqlite_obj] for k in sqlite_obj[0].keys()}


def exclude(it, targets):
    return [x for x in it if x not in targets]


def append_map(it, suf):
    return [x + suf for x in it]


# ----------------------------------------------------------------------------- statistics
def add_to_recordable_attributes(input_obj, name=None, list_of_names=None, is_stat=False):
    attr_name_list_name = "_record_these_stats" if is_stat else "_record_these"
    if not hasattr(input_obj, attr_name_list_name):
        setattr(input_obj, attr_name_list_name, [])
    attr_name_list = getattr(input_obj, attr_name_list_name)
    if name is not None:
        if name not in attr_name_list:
            attr_name_list.append(name)
        if not hasattr(input_obj, name):
            setattr(input_obj, name, 0)
    if list_of_names is not None and is_list_or_tuple(list_of_names):
        for n in list_of_names:
            add_to_recordable_attributes(input_obj, name=n, is_stat=is_stat)


def reset_stats(input_obj):
    for r in getattr(input_obj, "_record_these_stats", []):
        setattr(input_obj, r, 0)


def list_of_recordable_attributes_list_names():
    return ["_record_these", "_record_these_stats"]


class RecordsMixin:
    """PML's ``ModuleWithRecords`` as a mixin for dmlkern's module hierarchies: call
    ``_init_records(collect_stats)`` in ``__init__`` (after ``torch.nn.Module.__init__``).
    ``dmlkern.utils.module_with_records.ModuleWithRecords`` is this mixin on ``torch.nn.Module``."""

    def _init_records(self, collect_stats):
        self.collect_stats = COLLECT_STATS if collect_stats is None else collect_stats

    def add_to_recordable_attributes(self, name=None, list_of_names=None, is_stat=False):
        if is_stat and not self.collect_stats:
            return
        add_to_recordable_attributes(self, name=name, list_of_names=list_of_names, is_stat=is_stat)

    def reset_stats(self):
        reset_stats(self)


def __getattr__(name):
    # TorchInitWrapper is defined with the losses that use it (dmlkern.losses.base, which imports
    # this module): imported on first use, so both names are the same class.
    if name == "TorchInitWrapper":
        from ..losses.base import TorchInitWrapper

        return TorchInitWrapper
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
