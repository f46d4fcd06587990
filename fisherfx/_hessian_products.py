"""Hessian-vector products by differentiating the gradient's inner product with ``v``, formed from the
layers' output gradients.

.. math::
    H v = \\nabla_θ \\, s(θ), \\qquad
    s(θ) = \\langle \\nabla_θ L, v \\rangle
         = \\sum_{\\text{calls } c} \\langle \\partial L / \\partial y_c, \\; \\mathrm{layer}_c(x_c; v) \\rangle
         + \\sum_{\\text{other } θ_r} \\langle \\partial L / \\partial θ_r, v_r \\rangle

Every layer the tap engine knows (:mod:`.engines._tap_layers`) is linear in its own parameters, so the
derivative of a call's output ``y_c`` along ``v`` is the layer evaluated at ``v`` on the call's own
input ``x_c``. The first backward (with ``create_graph``) therefore stops at the layers' outputs and forms
no weight gradient; the second differentiates ``s`` through both passes. Per matrix-multiplying layer that
is 8 matrix products where reverse over reverse needs 9 (its first backward forms the weight gradient,
whose value nothing needs). Parameters outside the recorded calls (no supported layer holds them, or they
are also used elsewhere, or the layer's forward is not the known formula, or its output is changed in
place) enter ``s`` through their own gradient.

``K`` vectors share the forward and the first backward; each has its own ``s_k`` and second backward,
where forward over reverse batches ``K`` tangents through both passes (measured 1.3-1.4x slower at ``K = 8``
on CPU). For one vector the saved product is offset by the extra elementwise passes of ``s`` and by
PyTorch's double backward of a convolution's input gradient, so :func:`~fisherfx.hvp` keeps reverse over
reverse there (``engine="auto"``).
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._products import forward_of, grad_leaves
from .engines import _tap_checks as checks
from .engines import _tap_layers as layers
from .engines.taps import NO_LAYER, OUTSIDE, check_outputs
from .losses import summed_nll
from .problems import Prepared, Problem
from .vectors import Vector

IN_PLACE = "its layer's output is changed in place after the call"

ATTRS = ("weight", "bias")


class _Call(NamedTuple):
    """One call of a supported layer holding a parameter of the product: enough to evaluate it again."""

    module: nn.Module
    args: tuple
    kwargs: dict
    y: Tensor  # its output, with its autograd graph
    keys: dict[str, str]  # {"weight" | "bias": parameter name}
    node: Any  # y.grad_fn (for the coverage check)
    stop: Any  # the input's grad_fn
    version: int  # y._version right after the call


@contextmanager
def _recorded(model: nn.Module, leaves: Mapping[str, Tensor]) -> Iterator[list[_Call]]:
    """Record the calls of supported layers whose forward is PyTorch's own (or checked to be the known
    formula) and that hold one of ``leaves``; the hooks live only inside the ``with`` block.
    """
    k = layers.kinds()
    name_of = {id(t): name for name, t in leaves.items()}
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, y: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        keys = {attr: name_of[id(t)] for attr in ATTRS
                if isinstance(t := getattr(module, attr, None), Tensor) and id(t) in name_of}
        if not keys or not isinstance(x, Tensor) or not isinstance(y, Tensor) or y.grad_fn is None:
            return
        if checks.trusted(module) or checks.formula_holds(module, x, y, k):
            calls.append(_Call(module, args, dict(kwargs), y, keys, y.grad_fn, x.grad_fn, y._version))

    handles = [m.register_forward_hook(hook, with_kwargs=True, prepend=True)
               for m in model.modules() if layers.supported(m, k)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _tangent(call: _Call, v: Mapping[str, Tensor], served: set[str]) -> Tensor:
    """``layer(x; v)``: the call's output with its parameters replaced by their tangents (zero for the
    parameters of the call that are not served through it).
    """
    values = {}
    for attr in ATTRS:
        p = getattr(call.module, attr, None)
        if isinstance(p, Tensor):
            name = call.keys.get(attr)
            values[attr] = v[name] if name in served else torch.zeros_like(p)
    return functional_call(call.module, values, call.args, call.kwargs)


def hessian_product(where: str, problem: Problem, params: Vector, prepared: Prepared, vs: list[Vector],
                    strict: bool = False) -> tuple[list[Vector], dict[str, str]]:
    """``H v`` of the summed NLL for each ``v`` of ``vs`` (see the module docstring).

    Returns:
        The products, and ``{name: why}`` for the parameters that entered ``s`` through their own gradient,
        with the tap engine's reasons (the caller raises on them for ``engine="taps"`` with
        :func:`~.engines.taps.refusal`; ``strict``: then nothing is computed).

    """
    leaves = grad_leaves(params)
    forward = forward_of(where, problem, prepared)
    with torch.enable_grad():
        with _recorded(problem.model, leaves) as calls:
            out = forward(leaves)
        check_outputs(where, problem, out, prepared)  # shapes and targets, before the loss reads them
        loss = summed_nll(problem, out, prepared)
        covered, unused, _ = checks.graph_covered(out, calls, leaves)
        changed = {name for c in calls if c.y._version != c.version for name in c.keys.values()}
        held = {name for c in calls for name in c.keys.values()}
        served = covered - changed
        calls = [c for c in calls if served & set(c.keys.values())]
        rest = [name for name in leaves if name not in served and name not in unused]
        why = {name: IN_PLACE if name in changed else OUTSIDE if name in held else NO_LAYER for name in rest}
        if strict and rest:
            return [], why
        grads = torch.autograd.grad(loss, [c.y for c in calls] + [leaves[name] for name in rest], create_graph=True,
                                    allow_unused=True)
        results = []
        for i, v in enumerate(vs):
            s = out.new_zeros(())
            for c, g in zip(calls, grads, strict=False):
                if g is not None:
                    s = s + (g * _tangent(c, v, served)).sum()
            for name, g in zip(rest, grads[len(calls):], strict=True):
                if g is not None and g.requires_grad:
                    s = s + (g * v[name]).sum()
            if not s.requires_grad:  # the loss is linear in every parameter along v: H v = 0
                results.append({name: torch.zeros_like(p) for name, p in leaves.items()})
                continue
            hv = torch.autograd.grad(s, list(leaves.values()), retain_graph=i < len(vs) - 1, allow_unused=True)
            results.append({name: torch.zeros_like(leaves[name]) if h is None else h
                            for name, h in zip(leaves, hv, strict=True)})
    return results, why


__all__ = ["hessian_product"]
