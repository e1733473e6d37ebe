"""Helpers for the autograd.Functions of the fused paths."""
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


def vjp(fn, primal, cotangent):
    """The vector-Jacobian product of `fn` at `primal` with `cotangent`. Plain autograd in an
    ordinary backward; torch.func.vjp under torch.func transforms (whose wrapped tensors take no
    requires_grad_), torch.compile, or a backward that builds a graph (create_graph=True). Not
    torch.func.vjp everywhere: its first call imports torch._dynamo (~1 s, ~100 MiB of modules)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        _, pull = torch.func.vjp(fn, primal)
        return pull(cotangent)[0]
    with torch.enable_grad():
        leaf = primal.detach().requires_grad_(True)
        out = fn(leaf)
    if not out.requires_grad:  # out does not depend on primal (torch.func.vjp's zeros)
        return torch.zeros_like(primal)
    (grad,) = torch.autograd.grad(out, leaf, cotangent, allow_unused=True)
    return torch.zeros_like(primal) if grad is None else grad
