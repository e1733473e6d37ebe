"""PML 2.9.0's ``pytorch_metric_learning.utils.module_with_records_and_reducer``: the bases to
subclass for a loss, miner or regularizer written PML-style, with dmlkern's reducers and distances.

* ``ModuleWithRecordsAndReducer(reducer=None, collect_stats=None)``: ``self.reducer`` set by
  ``set_reducer``: a ``MultipleReducers`` or ``DoNothingReducer`` is used as given; otherwise, with
  one name in ``sub_loss_names()`` (default ``["loss"]``), ``get_default_reducer()``
  (``MeanReducer()``) when ``reducer`` is None, else a deep copy of it; with several names, a
  ``MultipleReducers`` holding one such reducer per name.
* ``ModuleWithRecordsAndDistance(distance=None, collect_stats=None)``: ``self.distance`` is
  ``distance`` or ``get_default_distance()`` (``LpDistance(p=2)``).
* ``ModuleWithRecordsReducerAndDistance(**kwargs)``: both (reducer, distance, collect_stats by
  keyword).
"""
from ..distances import LpDistance
# DoNothingReducer and MultipleReducers: PML's module holds them too, so they import from here.
from ..reducers import DoNothingReducer, MeanReducer, MultipleReducers, resolve_reducer  # noqa: F401
from .module_with_records import ModuleWithRecords

__all__ = ["ModuleWithRecordsAndReducer", "ModuleWithRecordsAndDistance", "ModuleWithRecordsReducerAndDistance"]


class ModuleWithRecordsAndReducer(ModuleWithRecords):
    def __init__(self, reducer=None, **kwargs):
        super().__init__(**kwargs)
        self.set_reducer(reducer)

    def get_default_reducer(self):
        return MeanReducer()

    def set_reducer(self, reducer):
        # get_default_reducer is looked up on self, so a subclass's override is used
        self.reducer = resolve_reducer(reducer, self.sub_loss_names(), self.get_default_reducer)

    def sub_loss_names(self):
        return ["loss"]


class ModuleWithRecordsAndDistance(ModuleWithRecords):
    def __init__(self, distance=None, **kwargs):
        super().__init__(**kwargs)
        self.distance = self.get_default_distance() if distance is None else distance

    def get_default_distance(self):
        return LpDistance(p=2)


class ModuleWithRecordsReducerAndDistance(ModuleWithRecordsAndReducer, ModuleWithRecordsAndDistance):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
