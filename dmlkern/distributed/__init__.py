"""dmlkern on torch.distributed (gloo on a CPU, NCCL on GPUs): the collectives with the gradient
rules the exact global-batch losses need (`collectives.py`), the loss and miner wrappers
(`wrappers.py`, PML's `utils.distributed` API) and the row-sharded loss forms (`row_sharded.py`).
The public names are in `dmlkern.utils.distributed`."""
