"""Benchmarks of dmlkern's fused losses: ``python -m dmlkern.bench --help``. Imports no torch: the
points run in worker processes (dmlkern.bench.worker)."""


def main(argv=None):
    from .cli import main as _main

    return _main(argv)
