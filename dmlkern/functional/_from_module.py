"""The functional losses, generated from the loss classes: one dispatcher serves modules and
functions, no signature is written twice.

A function's keyword hyperparameters are its class's ``__init__`` keywords (collected along the
MRO, the subclass's default winning), its tensor arguments are ``forward``'s (or, for the losses
with class weights, ``embeddings, labels, <weight>, indices_tuple``). A call builds the module
(or takes it from a per-thread cache when every hyperparameter is a plain hashable value and no
``distance`` / ``reducer`` object is given) and runs ``module(...)``: ``BaseMetricLossFunction.forward``,
i.e. the fused engine whenever the module would use it, with the same values and gradients.
A weight tensor enters through ``torch.func.functional_call`` after a differentiable cast to the
embeddings' dtype and device; the module's own weight is never used (it is built on the meta
device, without initialisation, so a call allocates no weight and draws no random numbers).
"""
import inspect
import threading

import torch

from ..losses.base import WeightMixin

# Keywords of the base classes that the functions do not take (regularizers act on module
# state; collect_stats and weight_init_func have no meaning for one call).
_BASE_KEYWORDS = ("distance", "reducer", "collect_stats", "embedding_regularizer", "embedding_reg_weight",
                  "weight_regularizer", "weight_reg_weight", "weight_init_func")
_BASE_MODULE = "dmlkern.losses.base"
_HASHABLE = (bool, int, float, str, type(None))
_CACHE_SIZE = 64

_local = threading.local()  # per thread: the module cache and the module of the last call


def _no_init(tensor):
    """weight_init_func for the weight a function never uses (functional_call replaces it)."""


def hyperparameters(cls):
    """{name: default} of the keywords of cls.__init__ along the MRO (inspect.Parameter.empty: required)."""
    found = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if klass.__module__ == _BASE_MODULE:  # the base classes' machinery (mat_based_loss, regularizers)
            break
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in found:
                found[p.name] = p.default
        if not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            break
    return {k: v for k, v in found.items() if k not in _BASE_KEYWORDS}


def _cache():
    cache = getattr(_local, "modules", None)
    if cache is None:
        cache = _local.modules = {}
    return cache


def last_module():
    """The module this thread's last functional call ran (its ``last_backend`` tells the path)."""
    return getattr(_local, "last", None)


class _Spec:
    def __init__(self, cls, hyper, weight, weight_dims, extra_keywords):
        self.cls, self.hyper, self.weight, self.weight_dims = cls, hyper, weight, weight_dims
        self.extra_keywords = extra_keywords  # distance and/or reducer

    def module(self, hyper, weight, extra):
        """A module for these hyperparameters and the tensors it must hold for this call
        (functional_call's mapping)."""
        tensors = {k: v for k, v in hyper.items() if torch.is_tensor(v)}
        plain = {k: v for k, v in hyper.items() if k not in tensors}
        plain.update({k: weight.shape[d] for k, d in self.weight_dims.items() if k not in plain})
        key = None
        if not tensors and all(v is None for v in extra.values()):
            key = (self.cls, *plain.items())
            if not all(isinstance(v, _HASHABLE) for v in plain.values()):
                key = None
        module = _cache().get(key) if key is not None else None
        if module is None:
            module = self._build(plain, tensors, weight, extra)
            # Cached only when it holds no parameter of its own (MarginLoss's learned beta is one).
            if key is not None and {n for n, _ in module.named_parameters()} <= {self.weight}:
                cache = _cache()
                if len(cache) >= _CACHE_SIZE:
                    cache.clear()
                cache[key] = module
        bind = dict(tensors)
        if self.weight is not None:
            bind[self.weight] = weight
        return module, bind

    def _build(self, plain, tensors, weight, extra):
        kwargs = {**plain, **{k: v for k, v in extra.items() if v is not None}}
        # A tensor hyperparameter (MarginLoss's beta) is bound per call: build with the default.
        kwargs.update({k: self.hyper[k] for k in tensors})
        if self.weight is None:
            module = self.cls(**kwargs)
        else:
            if issubclass(self.cls, WeightMixin):
                kwargs["weight_init_func"] = _no_init
            with torch.device("meta"):
                module = self.cls(**kwargs)
        module.eval()  # a function updates no state (CenterLoss's centers)
        return module


def _call(spec, hyper, extra, weight, embeddings, labels, indices_tuple, ref_emb, ref_labels):
    if spec.weight is not None and torch.is_tensor(embeddings) and embeddings.is_floating_point():
        weight = weight.to(device=embeddings.device, dtype=embeddings.dtype)  # differentiable, not in place
    module, bind = spec.module(hyper, weight, extra)
    _local.last = module
    args = (embeddings, labels, indices_tuple, ref_emb, ref_labels)
    if not bind:
        return module(*args)
    plain = {k: v for k, v in bind.items() if k not in module._parameters and k not in module._buffers}
    for name, value in plain.items():  # tensor attributes of a fresh module (not cached)
        setattr(module, name, value)
    bound = {k: v for k, v in bind.items() if k not in plain}
    return torch.func.functional_call(module, bound, args) if bound else module(*args)


def make_function(name, cls, note, weight=None, weight_dims=None, extra_keywords=("distance", "reducer"),
                  module_name=None, not_taken=()):
    """The function `name` for loss class `cls`: a real Python function (generated source, so its
    signature is a plain one and its arguments bind at Python speed) calling `_call`.

    weight: the class's weight attribute (then the function takes it after labels); weight_dims:
    {constructor keyword: weight dimension} for the sizes read from it; the other keywords
    without a default (SoftTriple's num_classes) stay required keywords. not_taken: constructor
    keywords that mean nothing for one call (CenterLoss's update rate alpha)."""
    hyper = hyperparameters(cls)
    weight_dims = weight_dims or {}
    for k in (*weight_dims, *not_taken):
        hyper.pop(k)
    spec = _Spec(cls, hyper, weight, weight_dims, extra_keywords)
    defaults = {}

    def param(p_name, default=inspect.Parameter.empty):
        if default is inspect.Parameter.empty:
            return p_name
        defaults[f"_d_{p_name}"] = default
        return f"{p_name}=_d_{p_name}"

    forward_params = list(inspect.signature(cls.forward).parameters)[1:]  # embeddings, labels, ...
    if weight is None:
        positional = [param(forward_params[0]), param(forward_params[1], None)]
        tensor_keywords = [param(p, None) for p in forward_params[2:]]
        tensor_keywords = tensor_keywords[1:] + tensor_keywords[:1]  # ref_emb, ref_labels, indices_tuple
    else:
        positional = [param(forward_params[0]), param(forward_params[1]), weight, param(forward_params[2], None)]
        tensor_keywords = []
    keywords = [param(k, v) for k, v in hyper.items()] + tensor_keywords + [param(k, None) for k in extra_keywords]
    hyper_dict = "{" + ", ".join(f"{k!r}: {k}" for k in hyper) + "}"
    extra_dict = "{" + ", ".join(f"{k!r}: {k}" for k in extra_keywords) + "}"
    taken = set(forward_params) if weight is None else set(forward_params[:3])
    call_args = ", ".join(k if k in taken else "None" for k in forward_params)
    source = (f"def {name}({', '.join(positional)}, *, {', '.join(keywords)}):\n"
              f"    return _call(_spec, {hyper_dict}, {extra_dict}, {weight or 'None'}, {call_args})\n")
    namespace = {"_call": _call, "_spec": spec, **defaults}
    exec(compile(source, f"<dmlkern.functional.{name}>", "exec"), namespace)  # noqa: S102
    fn = namespace[name]
    fn.__module__ = module_name or __name__
    fn.__qualname__ = name
    fn.__doc__ = _docstring(name, cls, note, weight, weight_dims, spec)
    fn.loss_class = cls
    return fn


def _docstring(name, cls, note, weight, weight_dims, spec):
    args = "embeddings, labels" + (f", {weight}, indices_tuple" if weight else ", ref_emb=..., ref_labels=..., "
                                                                              "indices_tuple=...")
    call = "embeddings, labels, indices_tuple" + ("" if weight else ", ref_emb, ref_labels")
    hyper = ", ".join(f"``{k}``" if v is inspect.Parameter.empty else f"``{k}={v!r}``" for k, v in spec.hyper.items())
    lines = [note, "",
             f"``{name}({args}, **hyperparameters)`` returns what ``dmlkern.losses.{cls.__name__}"
             f"(**hyperparameters)({call})`` returns (a 0-dim tensor, or the loss dict with "
             "``reducer=DoNothingReducer()``), through the same dispatcher: the fused engine wherever "
             "the module runs it, with the same values and gradients.", "",
             f"Keyword hyperparameters (the class's): {hyper or 'none'}; "
             + ", ".join(f"``{k}``" for k in spec.extra_keywords) + " default to the class's defaults."]
    if weight:
        sizes = ", ".join(f"``{k}`` = ``{weight}.shape[{d}]``" for k, d in weight_dims.items())
        lines.append(f"``{weight}`` is the module's weight for this call (cast differentiably to the embeddings' "
                     f"dtype and device, never in place); {sizes}.")
    doc = inspect.getdoc(cls)
    if doc:
        lines += ["", f"{cls.__name__}:", "", doc]
    return "\n".join(lines)
