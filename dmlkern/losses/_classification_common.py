"""Shared helpers for the proxy / classification loss modules (private)."""

import torch


def ref_not_supported(embeddings, labels, ref_emb, ref_labels):
    """PML's rule: these losses compare the batch with their weights, never with a ref set."""
    if ref_emb is not embeddings or ref_labels is not labels:
        raise ValueError("ref_emb is not supported for this loss function")


def cast_parameter(param, dtype, device):
    """Move a parameter's data to the embeddings' dtype/device in place (PML's ``cast_types``)."""
    if param.dtype != dtype or param.device != device:
        param.data = param.data.to(device=device, dtype=dtype)


def new_weight(*shape):
    """An uninitialised parameter, to be filled by ``weight_init_func`` (as PML does)."""
    return torch.nn.Parameter(torch.empty(*shape))
