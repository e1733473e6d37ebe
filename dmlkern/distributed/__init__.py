"""dmlkern on torch.distributed (gloo on a CPU, NCCL on GPUs): the collectives with the gradient
rules the exact global-batch losses need (`collectives.py`), PML's loss and miner wrappers
(`wrappers.py`; public as `dmlkern.utils.distributed`), the row-sharded loss forms they run
(`row_sharded.py`) and the class-sharded margin softmax (`class_sharded.py`,
`dmlkern.distributed.ClassShardedLoss`)."""


def __getattr__(name):
    # Imported on first use: it imports dmlkern.losses, which the collectives don't need.
    if name == "ClassShardedLoss":
        from .class_sharded import ClassShardedLoss

        return ClassShardedLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
