"""One helper for the autograd.Functions of the fused paths."""
import torch


def applier(function):
    """`function.apply` for an autograd.Function in the split form (forward without ctx, then
    setup_context: the form torch.func needs). Outside torch.func transforms and torch.compile
    the call goes through a twin with ctx in forward, the same forward, setup_context and
    backward: torch binds a split-form forward's arguments with inspect.signature on every apply
    (about 15 us of host time, each call)."""
    def forward(ctx, *args):
        out = function.forward(*args)
        function.setup_context(ctx, args, out)
        return out

    twin = type(function.__name__, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(function.backward)})

    def apply(*args):
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            return function.apply(*args)
        return twin.apply(*args)

    return apply
