"""PML's module paths (`pytorch_metric_learning.reducers.mean_reducer`,
`...losses.base_metric_loss_function`, ...) under dmlkern's name, so that imports written against
PML's files keep working after the rename: `from dmlkern.reducers.mean_reducer import MeanReducer`.
Each path is a module holding the same objects as dmlkern's own module, registered in sys.modules
(the import system looks there before it needs the parent to be a package)."""
import sys
import types


def register(package, modules, source=None):
    """For each PML module name under `package` (a dmlkern module's __name__) and the names PML
    defines there, a module holding dmlkern's objects of those names, taken from `source` (default:
    the package itself)."""
    parent = sys.modules[package]
    source = source or parent
    for name, objects in modules.items():
        path = f"{package}.{name}"
        module = sys.modules.get(path) or types.ModuleType(path, f"PML's {path.replace('dmlkern', 'pytorch_metric_learning', 1)}.")
        for obj in objects:
            setattr(module, obj, getattr(source, obj))
        sys.modules[path] = module
        setattr(parent, name, module)
