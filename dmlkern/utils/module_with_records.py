"""PML 2.9.0's ``pytorch_metric_learning.utils.module_with_records``: ``ModuleWithRecords``, the
base to subclass for a module with PML-style recordable attributes.

``ModuleWithRecords(collect_stats=None)``: ``collect_stats`` defaults to
``dmlkern.utils.common_functions.COLLECT_STATS`` read at construction;
``add_to_recordable_attributes(name=None, list_of_names=None, is_stat=False)`` registers attributes
(statistics only when the module collects them) and ``reset_stats()`` sets the statistics to 0.

dmlkern's own losses, miners, reducers and distances share the same behaviour through
``common_functions.RecordsMixin`` but do not derive from this class (their hierarchy is dmlkern's).
"""
import torch

from . import common_functions as c_f

__all__ = ["ModuleWithRecords"]


class ModuleWithRecords(c_f.RecordsMixin, torch.nn.Module):
    def __init__(self, collect_stats=None):
        super().__init__()
        self._init_records(collect_stats)
