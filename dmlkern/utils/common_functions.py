"""Statistics bookkeeping with pytorch-metric-learning 2.9.0 semantics
(``pytorch_metric_learning.utils.common_functions``).

``COLLECT_STATS``: the global switch. A loss, miner, reducer, distance or regularizer built with
``collect_stats=None`` (the default) reads it when it is constructed, as in PML.

``pos_inf``, ``neg_inf``, ``small_val``, ``torch_arange_from_size``: PML's helpers of the same names.

A module lists its recordable attributes in ``_record_these`` (hyper-parameters) and
``_record_these_stats`` (statistics; only created when the module collects statistics), and
``reset_stats`` sets every listed statistic to 0 at the start of each forward.
"""

import torch

COLLECT_STATS = False


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
    ``_init_records(collect_stats)`` in ``__init__`` (after ``torch.nn.Module.__init__``)."""

    def _init_records(self, collect_stats):
        self.collect_stats = COLLECT_STATS if collect_stats is None else collect_stats

    def add_to_recordable_attributes(self, name=None, list_of_names=None, is_stat=False):
        if is_stat and not self.collect_stats:
            return
        add_to_recordable_attributes(self, name=name, list_of_names=list_of_names, is_stat=is_stat)

    def reset_stats(self):
        reset_stats(self)
