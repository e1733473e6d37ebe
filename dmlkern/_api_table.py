"""The README's class table, generated from the code: every public class of PML 2.9.0's losses,
miners, distances, reducers and regularizers, and what dmlkern has for it.

* losses: ``fused`` when the class has a fused path (it overrides ``fused_loss_dict``),
  ``reference`` when only the materialising reference runs;
* miners: ``fused (lazy tuple, mined in the loss)`` when the module returns a lazy tuple
  (``fused.lazy_pairs``), ``row blocks`` when it mines on row blocks (``fused.blocked_miners``),
  ``reference`` otherwise;
* base classes, wrappers, distances, reducers, regularizers: ``provided`` (plain PyTorch, no kernel
  of their own);
* ``not provided``, with the reason, for the names in ``NOT_PROVIDED``.

Classes dmlkern adds (not in PML) follow, marked ``not in PML``. Needs pytorch-metric-learning
installed (it lists PML's names): ``python -m dmlkern._api_table`` prints the table.
"""

import importlib
import inspect

MODULES = ("losses", "miners", "distances", "reducers", "regularizers")

# (module, PML name) -> why dmlkern does not have it
NOT_PROVIDED = {}


def pml_public_names(module_name):
    """PML's public classes and functions defined in the package (not re-exported numpy / torch)."""
    mod = importlib.import_module(f"pytorch_metric_learning.{module_name}")
    return sorted(
        name for name, obj in vars(mod).items()
        if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
        and getattr(obj, "__module__", "").startswith("pytorch_metric_learning")
    )


def _uses(cls, fused_module):
    """Whether the module of the class or of one of its dmlkern bases uses something from
    dmlkern.fused.<fused_module>."""
    target = f"dmlkern.fused.{fused_module}"
    for base in cls.__mro__:
        if not base.__module__.startswith("dmlkern."):
            continue
        for obj in vars(inspect.getmodule(base)).values():
            if getattr(obj, "__name__", None) == target or getattr(obj, "__module__", None) == target:
                return True
    return False


def _defined_in(obj, module_name):
    mod = getattr(obj, "__module__", "")
    return mod == f"dmlkern.{module_name}" or mod.startswith(f"dmlkern.{module_name}.")


def status(module_name, cls):
    """What dmlkern has for ``cls`` (a class of ``dmlkern.<module_name>``)."""
    if module_name == "losses":
        from .losses.base import BaseMetricLossFunction

        if not issubclass(cls, BaseMetricLossFunction) or cls.__module__.endswith(".base"):
            return "provided"
        return "fused" if cls.fused_loss_dict is not BaseMetricLossFunction.fused_loss_dict else "reference"
    if module_name == "miners":
        if _uses(cls, "lazy_pairs"):
            return "fused (lazy tuple, mined in the loss)"
        if _uses(cls, "blocked_miners"):
            return "row blocks"
        return "provided" if cls.__module__.endswith(".base") else "reference"
    return "provided"


def rows():
    """(module, class name, status) for each PML class, then each class only dmlkern has."""
    out = []
    for module_name in MODULES:
        ours = importlib.import_module(f"dmlkern.{module_name}")
        pml = [n for n in pml_public_names(module_name)
               if inspect.isclass(getattr(importlib.import_module(f"pytorch_metric_learning.{module_name}"), n))]
        for name in pml:
            if (module_name, name) in NOT_PROVIDED:
                out.append((module_name, name, f"not provided: {NOT_PROVIDED[module_name, name]}"))
            else:
                out.append((module_name, name, status(module_name, getattr(ours, name))))
        extra = sorted(n for n, obj in vars(ours).items()
                       if inspect.isclass(obj) and _defined_in(obj, module_name) and not n.startswith("_")
                       and n not in pml and n not in _HELPERS)
        out += [(module_name, name, "not in PML; " + status(module_name, getattr(ours, name))) for name in extra]
    return out


# dmlkern classes in those modules that are helpers, not PML-style components
_HELPERS = {"InvalidInputError", "WeightMixin", "TorchInitWrapper", "BaseTupleMiner"}


def markdown():
    lines = ["| module | class | dmlkern |", "| --- | --- | --- |"]
    lines += [f"| {m} | `{name}` | {s} |" for m, name, s in rows()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
