"""One walk over a model per call: what the estimators read from its module tree.

Checking the parameters, refusing a BatchNorm in train mode, finding the layers the tap engine
serves and passing the buffers to ``functional_call`` each need the module tree; one walk
(:func:`walk`) serves them all. Nothing is cached between calls: a model changed between two calls
(a module replaced, a parameter reassigned, ``train()``) is read afresh.
"""

from typing import NamedTuple

from torch import Tensor, nn


class ModelIndex(NamedTuple):
    """The module tree of a model at one moment."""

    params: dict[str, Tensor]  # every name of every parameter, ties included (named_parameters(remove_duplicate=False))
    buffers: dict[str, Tensor]  # every buffer, ties included
    modules: list[nn.Module]  # each module once, in named_modules() order
    training_batchnorm: str | None  # the first BatchNorm module in train mode, or None


def walk(model: nn.Module) -> ModelIndex:
    """Read ``model``'s parameters, buffers and modules in one pass (see :class:`ModelIndex`)."""
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    modules: list[nn.Module] = []
    seen: set[int] = set()
    training_batchnorm = None
    stack = [("", model)]  # depth first, children in order: the order of named_modules(remove_duplicate=False)
    while stack:
        prefix, module = stack.pop()
        dot = prefix + "." if prefix else ""
        if module._parameters:
            params.update((dot + attr, p) for attr, p in module._parameters.items() if p is not None)
        if module._buffers:
            buffers.update((dot + attr, b) for attr, b in module._buffers.items() if b is not None)
        if id(module) not in seen:
            seen.add(id(module))
            modules.append(module)
            if training_batchnorm is None and module.training and isinstance(module, nn.modules.batchnorm._BatchNorm):
                training_batchnorm = prefix
        if module._modules:
            stack.extend((dot + name, child) for name, child in reversed(module._modules.items()) if child is not None)
    return ModelIndex(params, buffers, modules, training_batchnorm)


__all__ = ["ModelIndex", "walk"]
