"""One switch for the code paths torch.compile needs (no host syncs, no data-dependent shapes
or branches). They are on while torch.compile traces; tests turn them on eagerly
(FORCE_STATIC_SHAPES) to check those paths against the reference without compiling."""
import torch

FORCE_STATIC_SHAPES = False


def static_shapes():
    return FORCE_STATIC_SHAPES or torch.compiler.is_compiling()


def forward_ad_active():
    """Whether forward-mode AD is recording (torch.func.jvp, torch.autograd.forward_ad.dual_level):
    the kernels' autograd has no jvp (and torch.library's autograd layer drops tangents silently),
    so torch's ops run instead."""
    return torch.autograd.forward_ad._current_level >= 0
