"""dmlkern has every public class and function of PML 2.9.0's losses, miners, distances, reducers,
regularizers, utils.loss_and_miner_utils, utils.common_functions, utils.module_with_records and
utils.module_with_records_and_reducer modules, with PML's name and a compatible signature:
each PML parameter with the same name, kind, default and (for positional ones) position; extra
dmlkern parameters only with defaults. Checked for constructors, ``forward`` and functions, so a
change on either side fails here. Names left out on purpose are listed in LEFT_OUT with why."""
import importlib
import inspect

import pytest
import torch

from dmlkern import _api_table

MODULES = ["losses", "miners", "distances", "reducers", "regularizers", "utils.loss_and_miner_utils",
           "utils.common_functions", "utils.module_with_records", "utils.module_with_records_and_reducer"]

# (module, name) -> why dmlkern does not have it (yet); the README table shows the same reasons
LEFT_OUT = _api_table.NOT_PROVIDED

# (module, name) -> (why, the exact problems _compatible reports): signature differences kept on
# purpose. The test fails if the problems change, so a fix (or new drift) shows here.
KNOWN_DIFFERENCES = {
    ("losses", "BaseMetricLossFunction"): (
        "PML's first positional parameters are the embedding regularizer's (its mixin's __init__ comes "
        "first); dmlkern's base takes distance / reducer / collect_stats positionally and the "
        "regularizer by keyword. Subclasses, which everyone instantiates, match PML.",
        [
            "BaseMetricLossFunction.__init__: 'embedding_regularizer' is keyword-only at 4, PML: positional or keyword at 0",
            "BaseMetricLossFunction.__init__: 'embedding_reg_weight' is keyword-only at 5, PML: positional or keyword at 1",
        ],
    ),
}


CASES = [(m, n) for m in MODULES for n in _api_table.pml_public_names(m)]


def _params(fn):
    return list(inspect.signature(fn).parameters.values())


def _init_params(cls):
    """The constructor's parameters as a caller sees them: the class's own ``__init__``, then,
    while the chain passes ``**kwargs`` on, the defaulted parameters of its bases' (as
    keyword-only), up to torch.nn.Module."""
    own = _params(cls.__init__)[1:]
    if not any(p.kind is p.VAR_KEYWORD for p in own):
        return own
    seen = {p.name for p in own}
    extra = []
    for base in cls.__mro__[1:]:
        if base is torch.nn.Module or base is object:
            break
        init = base.__dict__.get("__init__")
        for p in _params(init)[1:] if init is not None else []:
            if p.name not in seen and p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                seen.add(p.name)
                extra.append(p.replace(kind=p.KEYWORD_ONLY))
    return own + extra


def _same_default(a, b):
    if callable(a) and callable(b):  # e.g. PerAnchorReducer's aggregation function: behaviour is tested elsewhere
        return True
    return a is b or a == b


def _compatible(ours, theirs, where):
    """Problems (strings) with `ours` as a drop-in for `theirs` (inspect.Parameter lists): PML's
    positional parameters at the same position, its keyword-only ones accepted by keyword, the
    same defaults, **kwargs where PML has it; extra parameters need a default unless PML takes
    *args (which stand for named parameters of a base)."""
    problems = []
    by_name = {p.name: (i, p) for i, p in enumerate(ours)}
    kinds = {p.kind for p in ours}
    for i, p in enumerate(theirs):
        if p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            if p.VAR_KEYWORD not in kinds:
                problems.append(f"{where}: PML takes **{p.name}, dmlkern does not")
            continue
        if p.name not in by_name:
            problems.append(f"{where}: parameter {p.name!r} missing")
            continue
        j, q = by_name[p.name]
        if p.kind is p.POSITIONAL_OR_KEYWORD and (q.kind is not p.kind or i != j):
            problems.append(f"{where}: {p.name!r} is {q.kind.description} at {j}, PML: {p.kind.description} at {i}")
        if p.kind is p.KEYWORD_ONLY and q.kind not in (q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY):
            problems.append(f"{where}: {p.name!r} cannot be passed by keyword")
        if not _same_default(q.default, p.default):
            problems.append(f"{where}: {p.name!r} defaults to {q.default!r}, PML: {p.default!r}")
    pml_names = {p.name for p in theirs}
    pml_args = any(p.kind is p.VAR_POSITIONAL for p in theirs)
    for q in ours:
        required = q.kind not in (q.VAR_KEYWORD, q.VAR_POSITIONAL) and q.default is q.empty
        if q.name not in pml_names and required and not pml_args:
            problems.append(f"{where}: extra parameter {q.name!r} without a default")
    return problems


def test_left_out_names_are_still_pml_names():
    """A LEFT_OUT entry that PML no longer has, or that dmlkern now has, is stale."""
    for module_name, name in LEFT_OUT:
        assert (module_name, name) in CASES
        ours = importlib.import_module(f"dmlkern.{module_name}")
        assert not hasattr(ours, name), f"dmlkern.{module_name}.{name} exists now: remove it from LEFT_OUT"


def test_every_module_is_covered():
    assert len(CASES) > 80  # the six modules hold ~90 public names in PML 2.9.0
    for module_name in MODULES:
        importlib.import_module(f"dmlkern.{module_name}")


@pytest.mark.parametrize("module_name,name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_name_and_signature(module_name, name):
    if (module_name, name) in LEFT_OUT:
        pytest.skip(f"left out on purpose: {LEFT_OUT[module_name, name]}")
    theirs = getattr(importlib.import_module(f"pytorch_metric_learning.{module_name}"), name)
    ours_module = importlib.import_module(f"dmlkern.{module_name}")
    assert hasattr(ours_module, name), f"dmlkern.{module_name} has no {name}"
    ours = getattr(ours_module, name)
    problems = []
    if inspect.isclass(theirs):
        assert inspect.isclass(ours), f"{name} is a class in PML"
        problems += _compatible(_init_params(ours), _init_params(theirs), f"{name}.__init__")
        if hasattr(theirs, "forward"):
            problems += _compatible(_params(ours.forward), _params(theirs.forward), f"{name}.forward")
    else:
        assert callable(ours) and not inspect.isclass(ours), f"{name} is a function in PML"
        problems += _compatible(_params(ours), _params(theirs), name)
    expected = KNOWN_DIFFERENCES.get((module_name, name), ("", []))[1]
    assert problems == expected, "\n".join(problems)


def test_checker_reports_drift():
    def pml(embeddings, labels=None, *, margin=0.1, **kwargs):
        pass

    def ours_ok(embeddings, labels=None, margin=0.1, extra=3, **kwargs):
        pass

    def ours_bad(labels, embeddings=None, margin=0.2, required=None):
        pass

    assert _compatible(_params(ours_ok), _params(pml), "f") == []
    problems = _compatible(_params(ours_bad), _params(pml), "f")
    assert problems == [
        "f: 'embeddings' is positional or keyword at 1, PML: positional or keyword at 0",
        "f: 'embeddings' defaults to None, PML: <class 'inspect._empty'>",
        "f: 'labels' is positional or keyword at 0, PML: positional or keyword at 1",
        "f: 'labels' defaults to <class 'inspect._empty'>, PML: None",
        "f: 'margin' defaults to 0.2, PML: 0.1",
        "f: PML takes **kwargs, dmlkern does not",
    ]


# ----------------------------------------------------------------------------- the README class table
def test_class_table_lists_every_pml_class_once():
    rows = _api_table.rows()
    pml = {(m, n) for m in _api_table.MODULES for n in _api_table.pml_public_names(m)
           if inspect.isclass(getattr(importlib.import_module(f"pytorch_metric_learning.{m}"), n))}
    listed = [(m, n) for m, n, s in rows if not s.startswith("not in PML")]
    assert sorted(listed) == sorted(pml) and len(set(listed)) == len(listed)
    table = _api_table.markdown().splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 4 for line in table)


def test_class_table_status_comes_from_the_code():
    status = {(m, n): s for m, n, s in _api_table.rows()}
    assert status["losses", "MultiSimilarityLoss"] == "fused"  # overrides fused_loss_dict
    assert status["losses", "FastAPLoss"] == "fused"  # blocked path, fused/ranking.py
    assert status["losses", "SignalToNoiseRatioContrastiveLoss"] == "fused"  # blocked path, fused/snr_contrastive.py
    assert status["losses", "PNPLoss"] == "fused"  # blocked path, fused/pnp.py
    assert status["losses", "ManifoldLoss"] == "reference"
    assert status["losses", "MultipleLosses"] == "provided"
    assert status["losses", "CrossBatchMemory"] == "provided"
    assert status["losses", "CenterLoss"] == "not in PML; reference"
    assert status["miners", "MultiSimilarityMiner"] == "fused (lazy tuple, mined in the loss)"
    assert status["miners", "BatchHardMiner"] == "row blocks"  # through its base BatchEasyHardMiner
    assert status["miners", "UniformHistogramMiner"] == "row blocks"
    assert status["miners", "EmbeddingsAlreadyPackagedAsTriplets"] == "reference"
    assert status["miners", "MaximumLossMiner"] == "not in PML; reference"
    assert status["regularizers", "LpRegularizer"] == "provided"
    allowed = {"fused", "reference", "provided", "row blocks", "fused (lazy tuple, mined in the loss)"}
    for s in status.values():
        assert s.removeprefix("not in PML; ") in allowed or s.startswith("not provided: ")


def test_readme_class_table_is_the_generated_one():
    """The README's copy between its api-table markers is what the code generates today."""
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- api-table: start -->\n", "\n<!-- api-table: end -->"
    assert start in readme and end in readme, "README.md lost its api-table markers"
    copy = readme.split(start, 1)[1].split(end, 1)[0]
    assert copy == _api_table.markdown(), "README.md's class table is stale: paste `python -m dmlkern._api_table`"


# module-level helper functions of PML's files that dmlkern does not re-export
_PML_FILE_HELPERS = {"find_hard_negatives", "filter_pairs", "aggregation_func"}


@pytest.mark.parametrize("package", ["losses", "miners", "reducers", "distances", "regularizers"])
def test_pml_module_paths_import(package):
    """Every file of PML's packages imports under dmlkern's name (`from dmlkern.reducers.mean_reducer
    import MeanReducer`, `from dmlkern.losses.mixins import WeightRegularizerMixin`, ...) and holds
    the classes PML defines in it, as dmlkern's own objects: code written against PML's files keeps
    working after the rename. The list comes from the installed PML, so a file it adds is checked."""
    import pkgutil

    pml_package = importlib.import_module(f"pytorch_metric_learning.{package}")
    ours = importlib.import_module(f"dmlkern.{package}")
    checked = 0
    for info in pkgutil.iter_modules(pml_package.__path__):
        pml_name = f"pytorch_metric_learning.{package}.{info.name}"
        pml_module = importlib.import_module(pml_name)
        defined = [n for n, o in vars(pml_module).items() if not n.startswith("_") and n not in _PML_FILE_HELPERS
                   and (inspect.isclass(o) or inspect.isfunction(o)) and getattr(o, "__module__", "") == pml_name]
        module = importlib.import_module(f"dmlkern.{package}.{info.name}")
        for name in defined:
            assert getattr(module, name) is getattr(ours, name, getattr(module, name)), (info.name, name)
            assert getattr(module, name).__module__.startswith("dmlkern"), (info.name, name)
            checked += 1
    assert checked >= 5
