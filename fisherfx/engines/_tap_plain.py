"""The tap engine's plain pass: models made of PyTorch's own layers, each called once.

Where every layer holding a requested parameter runs PyTorch's own ``forward`` (its formulas hold
by construction), holds its parameters alone and is called once, none of the full pass's checks
that cost a hook, a probe or a backward can fail except what is checked here after the forward (a
layer called twice or not at all, an output changed in place, a batch axis not first, a position
axis as long as the batch, a parameter used outside its layer, output gradients too large to hold
at once). Then one backward per output vector returns every layer's output gradient directly.
Where a check fails, :func:`plain` returns ``None`` and the full pass (:mod:`.taps`) serves the
call, with the same result.
"""

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._tree import tensors
from .._walk import ModelIndex
from ..problems import Prepared, Problem
from . import _tap_checks as checks
from . import _tap_common as common
from . import _tap_layers as layers
from ._tap_common import Consumer, Owners, Request, Result
from ._tap_estimators import Workspace, grouped, make_plan, one_position
from ._tap_layers import Use
from .cotangents import Kind

PLAIN_BUDGET = 1 << 22  # output-gradient entries the plain pass holds at once (all its layers' together)

# (holders, input shapes) where the plain pass did not apply, per model: it is not tried there again
# (a hint for speed only: the full pass serves those calls, with the same result)
_NOT_PLAIN: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class _Hit(NamedTuple):
    """One call of a tapped layer in the plain pass (``node``, ``stop``: what
    :func:`._tap_checks.used_only_inside` reads).
    """

    module: nn.Module
    x: Tensor  # its input, detached
    y: Tensor
    keys: dict[str, str]
    node: Any  # y.grad_fn
    stop: Any  # x.grad_fn


def _aliases(p: Tensor, own: Tensor | None) -> bool:
    """Whether ``p`` holds exactly the module's own tensor ``own`` (e.g. a detached view of it)."""
    return own is not None and p.dtype == own.dtype and type(p) in _PLAIN_TYPES and p.is_set_to(own)


_PLAIN_TYPES = (Tensor, nn.Parameter)  # not tensor subclasses (DTensor, ...): their storage may say nothing


def plain(problem: Problem, params: Mapping[str, Tensor], prepared: Prepared, requests: Mapping[str, Request],
          order: list[str], owners: Owners, missing: dict[str, str], k: layers.Kinds, *, kind: Kind,
          noise: Tensor | None, dtype: torch.dtype, chunk_size: int | None, where: str, index: ModelIndex,
          offset: int, consume: "Consumer | None" = None, scale: float = 1.0,
          batch_inputs: Any = None) -> Result | None:
    """The tap engine's pass where no check of the full pass can fail, or ``None`` (then the full pass runs).

    It applies to layers whose forward is PyTorch's own (their formulas hold by construction), each
    requested parameter held by one of them, each called once with the samples first and its output
    not changed afterwards, every use of the parameters inside their layer (the graph check runs on
    every call), and output gradients small enough to hold at once: then one backward per output
    vector gives every layer's output gradient directly, with no tensor hook, probe or streaming.
    A model whose parameters are given as the module's own tensors (:func:`~fisherfx.params_of`) is
    called directly, without ``functional_call``.
    """
    model, holders = problem.model, owners.holders
    n = prepared.active.shape[0]
    memo = (tuple(map(id, holders)), tuple(tuple(x.shape) for x in tensors(prepared.inputs)))
    if not owners.plain or memo in _NOT_PLAIN.get(model, ()):
        return None
    own = index.params

    def fail() -> None:
        _NOT_PLAIN.setdefault(model, set()).add(memo)

    direct = all(_aliases(p, own.get(name)) for name, p in params.items()) and all(own[m].requires_grad
                                                                                   for m in order)
    if direct:
        leaves, values = {name: own[name] for name in order}, {}
    else:
        leaves = {name: params[name].detach().requires_grad_() for name in order}
        values = {**index.buffers, **{name: p.detach() for name, p in params.items()}, **leaves}
    hits: list[tuple] = []
    device = leaves[order[0]].device
    try:  # each layer's own forward, recording its input and output (no hook: these are PyTorch's classes)
        for m in holders:
            object.__setattr__(m, "forward", _recording(m, hits))
        with torch.enable_grad():
            outputs = common.guarded_forward(where, problem, values, prepared.inputs, device, batch_inputs)
    finally:
        for m in holders:
            vars(m).pop("forward", None)
    common.check_forward(where, problem, outputs, prepared, offset)
    calls, size = [], 0
    if len(hits) != len(holders) or len({id(h[0]) for h in hits if h is not None}) != len(hits):
        return fail()  # a layer called twice, or not at all
    keys = dict(zip(map(id, holders), owners.keys, strict=True))
    for module, x, y, x_version, y_version in hits:
        if (y.grad_fn is None or y._version != y_version or x._version != x_version or y.ndim < 2
                or y.shape[0] != n or n in layers.position_shape(module, tuple(y.shape), k)):
            return fail()  # changed in place after the call, broadcast, or a position axis as long as the batch
        calls.append(_Hit(module, x.detach(), y, keys[id(module)], y.grad_fn, x.grad_fn))
        size += y.numel()
    if size > PLAIN_BUDGET:
        return fail()
    if not checks.used_only_inside(outputs, calls, leaves):
        return fail()
    vectors = common.output_vectors(problem, outputs, prepared, kind, noise)
    draws = vectors.shape[0]
    sums: dict[str, Tensor] = {}
    scaled: set[str] = set()  # the sums that came out scaled already
    plans: dict[str, tuple] = {}
    ws = Workspace()
    for r in range(draws):
        grads = torch.autograd.grad(outputs, [c.y for c in calls], vectors[r], retain_graph=r < draws - 1,
                                    allow_unused=True)
        found: dict[str, list[tuple[Use, None]]] = {}
        for c, g in zip(calls, grads, strict=True):
            if g is None:  # every name passed the graph check: each call's output reaches the outputs
                raise RuntimeError(f"{where}: tap engine invariant broken: a covered layer's output got no gradient "
                                   "(please report)")
            parts = None if consume is not None else _linear_squares(c, g, requests, params, plans, dtype, scale)
            if parts is not None:
                for name, part in parts.items():
                    sums[name] = part if name not in sums else sums[name] + part
                    scaled.add(name)
                continue
            view = layers.out_view(c.module, g, k)
            made = {} if view is None or view.shape[0] != n else layers.uses(c.module, c.x, view, c.keys, k, dtype)
            for name in c.keys.values():
                if name not in made:
                    raise RuntimeError(f"{where}: tap engine invariant broken: the plain pass cannot read the "
                                       f"gradient of {name!r} per sample (please report)")
                if consume is not None:
                    found.setdefault(name, []).append((made[name], None))
                    continue
                if name not in plans:
                    plans[name] = common.plan([made[name]], requests[name], params[name], dtype, prepared.active)
                part = common.accumulate_any([made[name]], plans[name][0], dtype, chunk_size, ws)
                sums[name] = part if name not in sums else sums[name] + part
        if consume is not None:
            consume(offset, r, found)
    if consume is not None:
        return Result({name: outputs.new_zeros((), dtype=dtype) for name in order},
                      {name: missing[name] for name in requests if name in missing}, outputs.shape[-1])
    out = {}
    for name in order:
        post, value = plans[name][1], sums[name]
        if scale != 1.0 and name not in scaled:
            value = value.mul_(scale)
        out[name] = (value if value.shape == params[name].shape else value.reshape(params[name].shape)) \
            if post is None else post(value)
    return Result(out, {name: missing[name] for name in requests if name in missing}, outputs.shape[-1])


def _recording(module: nn.Module, hits: list) -> Any:
    """``module``'s class forward, appending ``(module, x, y, x version, y version)`` (or ``None``) to ``hits``."""
    forward = type(module).forward

    def recorded(*args: Any, **kwargs: Any) -> Any:
        y = forward(module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        hits.append((module, x, y, x._version, y._version) if isinstance(x, Tensor) and isinstance(y, Tensor)
                    else None)
        return y

    return recorded


def _linear_squares(c: _Hit, g: Tensor, requests: Mapping[str, Request], params: Mapping[str, Tensor],
                    plans: dict[str, tuple], dtype: torch.dtype, scale: float = 1.0) -> dict[str, Tensor] | None:
    """A ``Linear`` call with one position per sample (``x`` ``[N, i]``, ``g`` ``[N, o]``): the diagonals
    ``(g²)ᵀ(x²)`` and ``Σ g²`` of its weight and bias, or their row/column group sums, times ``scale``,
    with ``scale·g²`` formed once for both; ``None`` for any other call or request (mask importance,
    K-FAC factors).
    """
    if type(c.module) is not nn.Linear or g.ndim != 2 or c.x.ndim != 2:
        return None
    names = c.keys.values()
    if any(requests[name].mask or requests[name].factors is not None for name in names):
        return None
    g2, x2, out = (g if g.dtype == dtype else g.to(dtype)).square(), None, {}
    if scale != 1.0:
        g2.mul_(scale)
    for attr, name in c.keys.items():
        size = (g.shape[1],) if attr == "bias" else (g.shape[1], c.x.shape[1])
        if name not in plans:
            plans[name] = make_plan([Use("vector", g, None, size)], requests[name], params[name], dtype)
        plan = plans[name][0]
        if attr == "bias":
            values = one_position(g2, None, plan.what)
        else:
            x2 = (c.x if c.x.dtype == dtype else c.x.to(dtype)).square() if x2 is None else x2
            values = one_position(g2, x2, plan.what)
        out[name] = grouped(values, plan)
    return out


__all__ = ["PLAIN_BUDGET", "plain"]
