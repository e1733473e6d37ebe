"""dmlkern.utils.common_functions, module_with_records and module_with_records_and_reducer against
PML 2.9.0's modules of the same names: each helper called with the same inputs in both libraries
gives the same result (or the same exception); a user-written subclass of each ModuleWithRecords*
base, written once, behaves the same on both libraries' bases; DivisorReducer / ClassWeightedReducer
raise PML's exception classes."""
import collections
import logging
import sqlite3

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.utils import common_functions as pml_cf
from pytorch_metric_learning.utils import module_with_records as pml_mwr
from pytorch_metric_learning.utils import module_with_records_and_reducer as pml_mwrr

from dmlkern import distances, reducers
from dmlkern import utils
from dmlkern.utils import common_functions as cf
from dmlkern.utils import module_with_records as mwr
from dmlkern.utils import module_with_records_and_reducer as mwrr

# (common_functions, module_with_records, module_with_records_and_reducer, distances, reducers)
OURS = (cf, mwr, mwrr, distances, reducers)
PML = (pml_cf, pml_mwr, pml_mwrr, pml_distances, pml_reducers)


def _same(a, b):
    """Equal results, compared strictly: tensors and arrays (dtype, shape, values), dicts (key and
    value types too), sequences, plain values."""
    assert type(a) is type(b) or (torch.is_tensor(a) and torch.is_tensor(b)), (type(a), type(b))
    if torch.is_tensor(b):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, (a, b)
        assert torch.equal(a, b), (a, b)
    elif isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), (a, b)
    elif isinstance(b, dict):
        assert len(a) == len(b)
        for k in b:
            assert any(type(k) is type(j) and k == j for j in a), (k, list(a))
            _same(a[k], b[k])
    elif isinstance(b, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b, (a, b)


def _outcome(fn, *args, **kwargs):
    """("ok", result) or ("raises", exception class, message)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 (compared with PML's)
        return ("raises", type(e), str(e))


def _both(name, *args, **kwargs):
    """Calls common_functions.<name> of both libraries and checks the outcomes are the same."""
    ours, theirs = _outcome(getattr(cf, name), *args, **kwargs), _outcome(getattr(pml_cf, name), *args, **kwargs)
    assert ours[0] == theirs[0], (name, ours, theirs)
    if ours[0] == "raises":
        assert ours[1] is theirs[1] and ours[2] == theirs[2], (name, ours, theirs)
    else:
        _same(ours[1], theirs[1])
    return ours


# ----------------------------------------------------------------------------- package layout
def test_modules_exposed_like_pml():
    """PML's utils modules are imported as `from ...utils import <module>`; dmlkern's too (the ones
    that need reducers / distances on first use)."""
    for name in ["common_functions", "loss_and_miner_utils", "module_with_records",
                 "module_with_records_and_reducer", "distributed"]:
        assert getattr(utils, name).__name__ == f"dmlkern.utils.{name}"
    # PML's module holds the names it imports; code may import them from there
    for name in ["ModuleWithRecords", "LpDistance", "MeanReducer", "DoNothingReducer", "MultipleReducers"]:
        assert hasattr(pml_mwrr, name) and hasattr(mwrr, name)
    assert mwrr.LpDistance is distances.LpDistance and mwrr.MeanReducer is reducers.MeanReducer


def test_constants_match():
    assert cf.LOGGER_NAME == pml_cf.LOGGER_NAME and cf.LOGGER.name == pml_cf.LOGGER.name
    assert cf.NUMPY_RANDOM is pml_cf.NUMPY_RANDOM is np.random
    assert cf.COLLECT_STATS is pml_cf.COLLECT_STATS is False
    assert cf.list_of_recordable_attributes_list_names() == pml_cf.list_of_recordable_attributes_list_names()


def test_set_logger_name():
    old = cf.LOGGER_NAME, pml_cf.LOGGER_NAME
    try:
        cf.set_logger_name("dmlkern-test")
        pml_cf.set_logger_name("dmlkern-test")
        assert cf.LOGGER is pml_cf.LOGGER is logging.getLogger("dmlkern-test")
        assert cf.LOGGER_NAME == pml_cf.LOGGER_NAME
    finally:
        cf.set_logger_name(old[0])
        pml_cf.set_logger_name(old[1])


def test_torch_init_wrapper_is_the_losses_class():
    from dmlkern.losses.base import TorchInitWrapper

    assert cf.TorchInitWrapper is TorchInitWrapper
    weights = []
    for mod in (cf, pml_cf):
        weights.append(torch.empty(5, 3))
        torch.manual_seed(0)
        mod.TorchInitWrapper(torch.nn.init.uniform_, a=-2, b=-1)(weights[-1])
    _same(*weights)


# ----------------------------------------------------------------------------- numbers and tensors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finfo_values(dtype):
    for name in ["pos_inf", "neg_inf", "small_val"]:
        _both(name, dtype)


def test_small_helpers():
    x = torch.randn(3, 5)
    _both("torch_arange_from_size", x)
    _both("torch_arange_from_size", x, 1)
    for v in [[1], (1,), "ab", x, None]:
        _both("is_list_or_tuple", v)
        assert cf.return_input(v) is pml_cf.return_input(v) is v
    _both("exclude", ["a", "b", "c", "b"], ["b"])
    _both("append_map", ["a", "b"], "_x")
    _both("regex_replace", r"[0-9]+", "N", "trunk_12 and 3")
    assert cf.regex_wrapper("a+").pattern == pml_cf.regex_wrapper("a+").pattern
    assert [p.pattern for p in cf.regex_wrapper(["a", "b"])] == [p.pattern for p in pml_cf.regex_wrapper(["a", "b"])]
    _both("use_cuda_if_available")


def test_numpy_conversions():
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    for v in [arr, [1, 2], np.int64(3), np.array(["a", "b"], dtype=object), "text"]:
        _both("numpy_to_torch", v)
    for v in [torch.arange(4.0), torch.tensor([[1, 2]]), [1, 2], 3, arr]:
        _both("to_numpy", v)


def test_to_dtype_and_device():
    x = torch.arange(6).reshape(2, 3)
    f = torch.zeros(1, dtype=torch.float64)
    _both("to_dtype", x, f)
    _both("to_dtype", x, dtype=torch.float16)
    _both("to_dtype", f, dtype=torch.float64)
    _both("to_device", x, f)
    _both("to_device", x, device=torch.device("cpu"), dtype=torch.float32)
    _both("to_device", x, tensor=f, dtype=torch.bfloat16)
    if torch.cuda.is_available():
        _both("to_device", x, device=torch.device("cuda"))
        with torch.autocast("cuda"):  # under (CUDA) autocast, to_dtype leaves the dtype alone
            _both("to_dtype", x, dtype=torch.float16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # not CUDA autocast: cast as usual
        _both("to_dtype", x, dtype=torch.float16)


def test_to_dtype_under_autocast(monkeypatch):
    """Both ask torch.is_autocast_enabled() (CUDA autocast) and leave x alone when it is on
    (simulated, so that the check runs without a GPU)."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *args: True)
    x = torch.arange(3)
    _both("to_dtype", x, dtype=torch.float16)
    _both("to_device", x, device=torch.device("cpu"), dtype=torch.float64)
    assert cf.to_dtype(x, dtype=torch.float16) is x


def test_tensor_helpers():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    _both("unslice_by_n", parts)
    _both("unslice_by_n", [torch.arange(6).reshape(3, 2)])
    b = torch.rand(2, 3, 4, generator=g) > 0.2
    for dim in (0, 1, 2):
        _both("torch_all_from_dim_to_end", b, dim)
    _both("torch_standard_scaler", torch.randn(7, 3, generator=g))


def test_indices_tuple_helpers():
    t3 = (torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    t4 = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2, 3]), torch.tensor([4, 5]))
    empty = torch.tensor([], dtype=torch.long)
    for t in [t3, t4, (empty, empty, empty), (empty, empty, torch.tensor([1]), torch.tensor([2])),
              (torch.tensor([1]), torch.tensor([2]))]:
        _both("shift_indices_tuple", t, 10)
    _both("concatenate_indices_tuples", t3, t3)
    _both("concatenate_indices_tuples", t4, (torch.tensor([7]),) * 4)


def test_safe_random_choice_uses_numpy_random():
    old = cf.NUMPY_RANDOM, pml_cf.NUMPY_RANDOM
    try:
        for data, size in [(np.arange(10), 4), (np.arange(3), 8), ([5, 6, 7], 3)]:
            cf.NUMPY_RANDOM, pml_cf.NUMPY_RANDOM = np.random.RandomState(7), np.random.RandomState(7)
            _both("safe_random_choice", data, size)
    finally:
        cf.NUMPY_RANDOM, pml_cf.NUMPY_RANDOM = old


# ----------------------------------------------------------------------------- input checks
def test_check_shapes_and_set_ref_emb():
    e, lab = torch.randn(4, 2), torch.arange(4)
    for labels in [lab, None, torch.arange(3), lab.view(2, 2), lab.view(4, 1)]:
        _both("check_shapes", e, labels)
    r, rl = torch.randn(3, 2), torch.arange(3)
    for args in [(e, lab, None, None), (e, lab, r, rl), (e, lab, r, None), (e, lab, r, lab), (e, None, None, None)]:
        _both("set_ref_emb", *args)
    ours = cf.set_ref_emb(e, lab, None, None)
    assert ours[0] is e and ours[1] is lab


def test_not_supported_checks():
    e, lab, it = torch.randn(4, 2), torch.arange(4), (torch.tensor([0]),) * 3
    for args in [(None, None), (lab, None), (None, lab)]:
        _both("labels_not_supported", *args)
    for args in [(e, lab, e, lab), (e, lab, e.clone(), lab), (e, lab, e, lab.clone())]:
        _both("ref_not_supported", *args)
    for v in [None, it]:
        _both("indices_tuple_not_supported", v)
    for v in [None, lab]:
        _both("labels_required", v)
    for args in [(None, None), (lab, None), (None, it)]:
        _both("labels_or_indices_tuple_required", *args)


@pytest.mark.parametrize("case", [
    ("lp", None, {}), ("lp", "LpDistance", {}), ("lp", "CosineSimilarity", {}),
    ("lp", ("CosineSimilarity", "LpDistance"), {}), ("lp", ("CosineSimilarity", "DotProductSimilarity"), {}),
    ("cos", "CosineSimilarity", {"is_inverted": True}), ("lp", "LpDistance", {"power": 2}),
    ("lp", "LpDistance", {"p": 2, "normalize_embeddings": True}),
])
def test_assert_distance_type(case):
    """Same pass / AssertionError (and message) with each library's own distance classes."""
    dist, wanted, kwargs = case
    outcomes = []
    for mods in (OURS, PML):
        d = mods[3].LpDistance() if dist == "lp" else mods[3].CosineSimilarity()
        obj = type("Holder", (), {"distance": d})()
        if isinstance(wanted, tuple):
            cls = tuple(getattr(mods[3], w) for w in wanted)
        else:
            cls = None if wanted is None else getattr(mods[3], wanted)
        outcomes.append(_outcome(mods[0].assert_distance_type, obj, cls, **kwargs))
    ours, theirs = outcomes
    assert ours == theirs


# ----------------------------------------------------------------------------- labels
def test_label_ranks_and_maps():
    _both("make_label_to_rank_dict", [7, 3, 11, 5])
    _both("make_label_to_rank_dict", [np.int64(4), np.int64(-2)])
    _both("make_label_to_rank_dict", [1, 2, 1])
    _both("get_label_map", [5, 3, 5, 9])
    _both("get_label_map", np.array([[5, 0], [3, 2], [5, 2], [9, 7]]))
    _both("get_label_map", torch.tensor([4, 4, 8]).numpy())


@pytest.mark.parametrize("two_level", [False, True])
def test_label_mapper_and_process_label(two_level):
    dataset = np.array([[10, 1], [30, 1], [20, 5], [10, 9]]) if two_level else np.array([10, 30, 20, 10])
    batch = torch.tensor([[30, 9], [10, 1]]) if two_level else torch.tensor([30, 10, 20])
    levels = ["all", 0, 1, [0, 1]] if two_level else ["all", 0]
    for zero in (False, True):
        ours = cf.LabelMapper(set_min_label_to_zero=zero, dataset_labels=dataset)
        theirs = pml_cf.LabelMapper(set_min_label_to_zero=zero, dataset_labels=dataset)
        column = batch[:, 0].numpy() if two_level else batch.numpy()
        _same(ours.map(column, 0), theirs.map(column, 0))
        ours_mapped = cf.map_labels(ours.map, batch)
        _same(ours_mapped, pml_cf.map_labels(theirs.map, batch))
        for level in levels:
            _same(cf.get_hierarchy_label(ours_mapped, level), pml_cf.get_hierarchy_label(ours_mapped, level))
            _same(cf.process_label(batch, level, ours.map), pml_cf.process_label(batch, level, theirs.map))
    if two_level:  # a list of 1-d label tensors is stacked as columns
        mapper = cf.LabelMapper(True, dataset)
        split = [batch[:, 0], batch[:, 1]]
        _same(cf.map_labels(mapper.map, split), pml_cf.map_labels(pml_cf.LabelMapper(True, dataset).map, split))
    # without dataset labels, mapping to zero fails the same way
    o = _outcome(cf.LabelMapper(True).map, [1], 0)
    t = _outcome(pml_cf.LabelMapper(True).map, [1], 0)
    assert o[0] == t[0] == "raises" and o[1] is t[1]


def test_get_hierarchy_label_checks_the_level():
    flat = np.array([1, 2, 3])
    _both("get_hierarchy_label", flat, 0)
    _both("get_hierarchy_label", flat, 1)  # AssertionError: 1-d labels have one level
    _both("get_hierarchy_label", np.array([[1, 2], [3, 4]]), 2)
    _both("get_hierarchy_label", np.array([[1, 2], [3, 4]]), [1])


def test_get_labels_to_indices():
    for labels in [torch.tensor([3, 1, 3, 0, 1]), np.array([2, 2, 5]), [7, 8, 7], ["a", "b", "a"]]:
        ours, theirs = cf.get_labels_to_indices(labels), pml_cf.get_labels_to_indices(labels)
        assert isinstance(ours, collections.defaultdict) and ours.default_factory is theirs.default_factory
        _same(dict(ours), dict(theirs))


# ----------------------------------------------------------------------------- data and models
def _batches(loader):
    return [tuple(b) for b in loader]


def test_embedding_dataset_and_dataloaders():
    emb, lab = torch.randn(10, 3), torch.arange(10) % 4
    ours, theirs = cf.EmbeddingDataset(emb, lab), pml_cf.EmbeddingDataset(emb, lab)
    assert len(ours) == len(theirs) == 10
    _same(ours[3], theirs[3])
    _same(_batches(cf.get_eval_dataloader(ours, 4, 0, None)), _batches(pml_cf.get_eval_dataloader(theirs, 4, 0, None)))
    for sampler in [None, torch.utils.data.SequentialSampler(ours),
                    torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(ours), 3, False)]:
        torch.manual_seed(3)
        a = _batches(cf.get_train_dataloader(ours, 3.0, sampler, 0, None))
        torch.manual_seed(3)
        b = _batches(pml_cf.get_train_dataloader(theirs, 3.0, sampler, 0, None))
        _same(a, b)


def test_try_next_on_generator():
    data = [1, 2]
    results = []
    for mod in (cf, pml_cf):
        gen, out = iter(data), []
        for _ in range(5):
            gen, item = mod.try_next_on_generator(gen, data)
            out.append(item)
        results.append(out)
    assert results[0] == results[1]
    o, t = _outcome(cf.try_next_on_generator, iter([]), []), _outcome(pml_cf.try_next_on_generator, iter([]), [])
    assert o[0] == t[0] == "raises" and o[1] is t[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_set_requires_grad_and_layers_to_eval():
    states = []
    for mod in (cf, pml_cf):
        m = _model()
        mod.set_requires_grad(m, False)
        m.apply(mod.set_layers_to_eval("BatchNorm"))
        states.append(([p.requires_grad for p in m.parameters()], [x.training for x in m.modules()]))
    assert states[0] == states[1]


def test_model_files(tmp_path):
    """Paths, save / load (a DataParallel-wrapped model too) and the dict-of-models helpers give
    the same files and states; each library reads the other's files."""
    for args in [("f", "trunk", None), ("f", "trunk", 12), ("f", "embedder", "best3", ".pt")]:
        _both("modelpath_creator", *args)
    for mod, other in [(cf, pml_cf), (pml_cf, cf)]:
        folder = tmp_path / mod.__name__
        folder.mkdir()
        models = {"trunk": _model(), "embedder": torch.nn.DataParallel(torch.nn.Linear(2, 2))}
        mod.save_dict_of_models(models, 5, str(folder))
        assert sorted(p.name for p in folder.iterdir()) == ["embedder_5.pth", "trunk_5.pth"]
        fresh = {"trunk": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(),
                                              torch.nn.Linear(4, 2)), "embedder": torch.nn.Linear(2, 2)}
        other.load_dict_of_models(fresh, 5, str(folder), "cpu")
        for k in models:
            src = models[k].module if k == "embedder" else models[k]
            for (n1, v1), (n2, v2) in zip(src.state_dict().items(), fresh[k].state_dict().items()):
                assert n1 == n2 and torch.equal(v1, v2)
        other.delete_dict_of_models(models, 5, str(folder))
        assert list(folder.iterdir()) == []


def test_operate_on_dict_of_models_logs_and_raises(caplog):
    def failing(model, path):
        raise IOError("disk")

    records = []
    for mod in (cf, pml_cf):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="PML"):
            mod.operate_on_dict_of_models({"a": 1}, 2, "f", lambda m, p: None, "SAVE", log_if_successful=True)
            mod.operate_on_dict_of_models({"b": 1}, None, "f", failing, "LOAD")
            raised = _outcome(mod.operate_on_dict_of_models, {"c": 1}, 1, "f", failing, "LOAD", assert_success=True)
        records.append(([(r.name, r.levelname, r.getMessage()) for r in caplog.records], raised[:2]))
    assert records[0] == records[1]
    assert records[0][1] == ("raises", OSError)


def test_latest_version(tmp_path):
    _both("latest_version", str(tmp_path))
    for name in ["trunk_3.pth", "trunk_12.pth", "trunk_best7.pth", "trunk_best2.pth", "embedder_40.pth", "trunk_x.pth"]:
        (tmp_path / name).write_bytes(b"")
    for best in (False, True):
        _both("latest_version", str(tmp_path), best=best)
        _both("latest_version", str(tmp_path), "embedder_*.pth", best)  # best: no match, ValueError


def test_sqlite_obj_to_dict():
    con = sqlite3.connect(":memory:")
    con.row_factory = sqlite3.Row
    con.execute("create table t (epoch integer, acc real)")
    con.executemany("insert into t values (?, ?)", [(1, 0.5), (2, 0.75)])
    rows = con.execute("select * from t").fetchall()
    _both("sqlite_obj_to_dict", rows)
    _both("sqlite_obj_to_dict", [{"x": 1, "y": 2}, {"x": 3, "y": 4}])
    con.close()


def test_recordable_attribute_functions():
    states = []
    for mod in (cf, pml_cf):
        obj = type("Obj", (), {})()
        mod.add_to_recordable_attributes(obj, name="a")
        mod.add_to_recordable_attributes(obj, list_of_names=["b", "a"], is_stat=True)
        obj.b = 4
        mod.reset_stats(obj)
        states.append((obj._record_these, obj._record_these_stats, obj.a, obj.b))
    assert states[0] == states[1]


# ----------------------------------------------------------------------------- ModuleWithRecords*
def _user_classes(mods):
    """User code written once against PML's API: a loss with two sub-losses, a one-sub-loss loss with
    its own default reducer, a miner-like module with a distance, a stats-only module. `mods` is
    (common_functions, module_with_records, module_with_records_and_reducer, distances, reducers)."""
    c_f, m1, m2, dists, reds = mods

    class PairLoss(m2.ModuleWithRecordsReducerAndDistance):
        def __init__(self, margin=0.3, **kwargs):
            super().__init__(**kwargs)
            self.margin = margin
            self.add_to_recordable_attributes(list_of_names=["margin"], is_stat=False)
            self.add_to_recordable_attributes(list_of_names=["num_pos", "num_neg"], is_stat=True)

        def sub_loss_names(self):
            return ["pos_loss", "neg_loss"]

        def forward(self, embeddings, labels):
            self.reset_stats()
            mat = self.distance(embeddings)
            same = labels[:, None] == labels[None]
            same.fill_diagonal_(False)
            diff = labels[:, None] != labels[None]
            a1, p = torch.where(same)
            a2, n = torch.where(diff)
            if self.collect_stats:
                self.num_pos, self.num_neg = len(a1), len(a2)
            pos = torch.relu(mat[a1, p] - self.margin)
            neg = torch.relu(1 - mat[a2, n])
            loss_dict = {
                "pos_loss": {"losses": pos, "indices": (a1, p), "reduction_type": "pos_pair"},
                "neg_loss": {"losses": neg, "indices": (a2, n), "reduction_type": "neg_pair"},
            }
            return self.reducer(loss_dict, embeddings, labels)

    class NormLoss(m2.ModuleWithRecordsAndReducer):
        def get_default_reducer(self):
            return reds.SumReducer()

        def forward(self, embeddings, labels):
            losses = embeddings.norm(dim=1)
            loss_dict = {"loss": {"losses": losses, "indices": c_f.torch_arange_from_size(embeddings),
                                  "reduction_type": "element"}}
            return self.reducer(loss_dict, embeddings, labels)

    class NearestMiner(m2.ModuleWithRecordsAndDistance):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.add_to_recordable_attributes(name="num_mined", is_stat=True)

        def forward(self, embeddings, labels):
            self.reset_stats()
            mat = self.distance(embeddings).clone()
            mat.fill_diagonal_(c_f.neg_inf(mat.dtype) if self.distance.is_inverted else c_f.pos_inf(mat.dtype))
            nearest = mat.argmax(1) if self.distance.is_inverted else mat.argmin(1)
            self.num_mined = len(nearest)
            return nearest

    class Counter(m1.ModuleWithRecords):
        def __init__(self, step, **kwargs):
            super().__init__(**kwargs)
            self.step = step
            self.add_to_recordable_attributes(name="step")
            self.add_to_recordable_attributes(name="calls", is_stat=True)

        def forward(self, x):
            if self.collect_stats:
                self.calls += self.step
            return x * self.step

    return PairLoss, NormLoss, NearestMiner, Counter


def _state(module):
    """What a PML-style module exposes: its flags, recorded names and values, and its components
    (by class name and constructor settings)."""
    def describe(obj):
        if obj is None:
            return None
        if type(obj).__name__ == "MultipleReducers":
            return ("MultipleReducers", {k: describe(v) for k, v in obj.reducers.items()})
        if hasattr(obj, "is_inverted"):
            return (type(obj).__name__, obj.normalize_embeddings, obj.p, obj.power, obj.is_inverted, obj.collect_stats)
        return (type(obj).__name__, getattr(obj, "collect_stats", None))

    names = {k: list(getattr(module, k, [])) for k in ["_record_these", "_record_these_stats"]}
    values = {n: getattr(module, n) for k in names for n in names[k]}
    return (module.collect_stats, names, values, describe(getattr(module, "reducer", None)),
            describe(getattr(module, "distance", None)))


def _run_user_code(mods, collect_stats_global, kwargs_fn):
    """Builds each user class on `mods`' bases, runs it, returns everything observable."""
    c_f = mods[0]
    old = c_f.COLLECT_STATS
    c_f.COLLECT_STATS = collect_stats_global
    try:
        PairLoss, NormLoss, NearestMiner, Counter = _user_classes(mods)
        g = torch.Generator().manual_seed(1)
        emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
        labels = torch.arange(12) % 4
        out = []
        pair = PairLoss(**kwargs_fn(mods, "pair"))
        out += [_state(pair), pair(emb, labels), _state(pair)]
        norm = NormLoss(**kwargs_fn(mods, "norm"))
        out += [_state(norm), norm(emb, labels), _state(norm)]
        miner = NearestMiner(**kwargs_fn(mods, "miner"))
        out += [_state(miner), miner(emb, labels), _state(miner)]
        counter = Counter(3, **kwargs_fn(mods, "counter"))
        counter(emb)
        counter(emb)
        out += [_state(counter)]
        counter.reset_stats()
        out += [_state(counter)]
        return out
    finally:
        c_f.COLLECT_STATS = old


def _no_kwargs(mods, which):
    return {}


def _explicit_kwargs(mods, which):
    reds, dists = mods[4], mods[3]
    return {
        "pair": {"margin": 0.1, "distance": dists.CosineSimilarity(), "reducer": reds.AvgNonZeroReducer(),
                 "collect_stats": True},
        "norm": {"reducer": reds.MeanReducer(collect_stats=True)},
        "miner": {"distance": dists.LpDistance(power=2, normalize_embeddings=False), "collect_stats": False},
        "counter": {"collect_stats": True},
    }[which]


def _passthrough_kwargs(mods, which):
    reds = mods[4]
    if which == "pair":
        return {"reducer": reds.MultipleReducers({"pos_loss": reds.SumReducer()}, default_reducer=reds.MeanReducer())}
    if which == "norm":
        return {"reducer": reds.DoNothingReducer()}
    return {}


def _compare(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if torch.is_tensor(b) and b.is_floating_point():
            assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a, b)
        elif isinstance(b, dict) and "loss" in b:  # DoNothingReducer: the loss dict itself
            assert a.keys() == b.keys()
            assert torch.allclose(a["loss"]["losses"], b["loss"]["losses"]), (a, b)
        else:
            _same(a, b)


@pytest.mark.parametrize("collect_stats_global", [False, True])
@pytest.mark.parametrize("kwargs_fn", [_no_kwargs, _explicit_kwargs, _passthrough_kwargs])
def test_user_subclasses_behave_as_on_pml(collect_stats_global, kwargs_fn):
    _compare(_run_user_code(OURS, collect_stats_global, kwargs_fn), _run_user_code(PML, collect_stats_global, kwargs_fn))


def test_default_components_and_reducer_copies():
    """Defaults (MeanReducer, LpDistance(p=2)), positional arguments, and set_reducer's copy of a
    given reducer (a MultipleReducers / DoNothingReducer is kept as given)."""
    seen = []
    for mods in (OURS, PML):
        m2, reds = mods[2], mods[4]
        plain = m2.ModuleWithRecordsReducerAndDistance()
        given = reds.SumReducer()
        copied = m2.ModuleWithRecordsAndReducer(given)
        passthrough = reds.DoNothingReducer()
        kept = m2.ModuleWithRecordsAndReducer(passthrough, collect_stats=True)
        positional = m2.ModuleWithRecordsAndDistance(mods[3].CosineSimilarity(), collect_stats=True)
        records = mods[1].ModuleWithRecords(True)
        seen.append((_state(plain), _state(copied), copied.reducer is given, kept.reducer is passthrough,
                     _state(positional), records.collect_stats, _state(kept)))
        copied.set_reducer(None)
        seen[-1] += (_state(copied),)
    _compare(seen[0], seen[1])
    assert isinstance(OURS[2].ModuleWithRecordsReducerAndDistance().reducer, reducers.MeanReducer)
    assert isinstance(OURS[2].ModuleWithRecordsReducerAndDistance().distance, distances.LpDistance)


def test_module_with_records_signatures_in_mro_order():
    """The constructor chain takes the same keywords, in PML's order of the MRO."""
    ours = [c.__name__ for c in mwrr.ModuleWithRecordsReducerAndDistance.__mro__ if c.__name__.startswith("Module")]
    theirs = [c.__name__ for c in pml_mwrr.ModuleWithRecordsReducerAndDistance.__mro__ if c.__name__.startswith("Module")]
    assert ours == theirs
    with pytest.raises(TypeError):
        mwrr.ModuleWithRecordsReducerAndDistance(margin=1)
    with pytest.raises(TypeError):
        pml_mwrr.ModuleWithRecordsReducerAndDistance(margin=1)


# ----------------------------------------------------------------------------- reducer exceptions
def _loss_dict():
    return {"loss": {"losses": torch.rand(4), "indices": torch.arange(4), "reduction_type": "element"}}


def test_divisor_reducer_without_divisor_raises_pmls_class():
    emb, labels = torch.randn(4, 2), torch.arange(4)
    with pytest.raises(KeyError):
        pml_reducers.DivisorReducer()(_loss_dict(), emb, labels)
    with pytest.raises(KeyError, match="needs a 'divisor' entry"):
        reducers.DivisorReducer()(_loss_dict(), emb, labels)
    with pytest.raises(ValueError):  # dmlkern's earlier class still catches it
        reducers.DivisorReducer()(_loss_dict(), emb, labels)


def test_class_weighted_reducer_without_labels_raises_pmls_class():
    emb = torch.randn(4, 2)
    with pytest.raises(TypeError):
        pml_reducers.ClassWeightedReducer(torch.ones(4))(_loss_dict(), emb, None)
    with pytest.raises(TypeError, match="needs labels"):
        reducers.ClassWeightedReducer(torch.ones(4))(_loss_dict(), emb, None)
    with pytest.raises(ValueError):
        reducers.ClassWeightedReducer(torch.ones(4))(_loss_dict(), emb, None)
