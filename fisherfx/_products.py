"""What the curvature products of :mod:`fisherfx.operators` share: batches, one forward with tangents
and its pull-back, the per-batch accumulation.

:func:`push` is the ``jvp``/``vjp`` route: one forward with tangents (:func:`torch.func.jvp`, ``K``
tangents batched over the one primal with :func:`torch.func.vmap`) whose primal keeps its autograd
graph, and ``pull(u) = Jᵀ u`` one backward through that graph per vector. :func:`accumulate` runs a
product on every batch of a list and divides by ``Σ_b Z_b``. Every product runs under the math SDPA
backend (:func:`math_sdpa`): torch's fused attention kernels have no forward-mode derivative on some
devices.
"""

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vmap

from ._errors import FisherError
from ._options import choice
from .engines import taps
from .fisher import NORMALIZES, check_params, prepare_batch
from .problems import Prepared, Problem
from .vectors import Vector, check_vector, non_finite


def math_sdpa() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the context manager
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _one_batch(batch: Any) -> bool:
    """A single batch: a dict (``causal_lm``) or ``(inputs, targets[, mask])`` with tensor targets."""
    if isinstance(batch, Mapping):
        return True
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and isinstance(batch[1], Tensor):
        return True
    return isinstance(batch, Tensor) or not isinstance(batch, Iterable)  # not a collection: prepare says what


def batches_of(batch: Any) -> Iterator[Any]:
    """The batches of ``batch``: itself when it is one batch, else its items (a list, a DataLoader)."""
    if _one_batch(batch):
        yield batch
    else:
        yield from batch


def grad_leaves(params: Mapping[str, Tensor]) -> Vector:
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}


def like_params(v: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Vector:
    return {name: v[name].to(dtype=p.dtype, device=p.device) for name, p in params.items()}


def forward_of(where: str, problem: Problem, prepared: Prepared) -> Any:
    """``values ↦ f`` on the prepared batch's inputs, through :func:`~.engines.taps.guarded_forward`."""
    device = prepared.active.device

    def forward(values: Mapping[str, Tensor]) -> Tensor:
        return taps.guarded_forward(where, problem, values, prepared.inputs, device)

    return forward


def push(where: str, problem: Problem, params: Vector, prepared: Prepared, v: Vector,
          k: int | None) -> tuple[Tensor, Tensor, Any]:
    """``(f, J v, pull)``: the outputs ``f`` ``[N, T, C]``, the tangents ``J v`` ``[(K,) N, T, C]`` and
    ``pull(u) = Jᵀ u`` for cotangents ``u`` shaped like ``J v``.

    One forward with tangents whose primal keeps its autograd graph (``K`` tangents batched over the
    one primal with ``vmap``); ``pull`` is one backward through that graph per vector. (A backward
    vmapped with ``is_grads_batched`` over that graph was measured slower than ``K`` backwards, and a
    vmapped ``torch.func.vjp`` costs a second primal forward for a few percent.)
    """
    forward = forward_of(where, problem, prepared)
    leaves = grad_leaves(params)
    with torch.enable_grad():
        if k is None:
            out, jv = jvp(forward, (leaves,), (v,))
        else:
            out, jv = vmap(lambda t: jvp(forward, (leaves,), (t,)), out_dims=(None, 0))(v)
    taps.check_outputs(where, problem, out.detach(), prepared)

    def backward(u: Tensor, keep: bool) -> list[Tensor]:
        grads = torch.autograd.grad(out, list(leaves.values()), u.to(out.dtype), allow_unused=True, retain_graph=keep)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves.values(), grads, strict=True)]

    def pull(u: Tensor) -> Vector:
        if k is None:
            return dict(zip(leaves, backward(u, False), strict=True))
        parts = [backward(u[i], i < k - 1) for i in range(k)]
        return {name: torch.stack([part[j] for part in parts]) for j, name in enumerate(leaves)}

    return out, jv, pull


def push_stacked(where: str, problem: Problem, params: Vector, prepared: Prepared,
                  v: Vector) -> tuple[Tensor, Tensor, Any]:
    """:func:`push` for ``v`` ``{name: [K, *P]}``: ``(f, J v [K, N, T, C], pull)`` with ``pull(u [K, ...])``
    ``{name: [K, *P]}``; for a model with convolutions one push per vector (see :func:`per_vector`).
    """
    k = next(iter(v.values())).shape[0]
    if k == 1 or not convolutional(problem.model):
        out, jv, pull = push(where, problem, params, prepared, v, k)
        return out, jv, pull
    pushes = [push(where, problem, params, prepared, {name: t[i] for name, t in v.items()}, None) for i in range(k)]

    def pull_each(u: Tensor) -> Vector:
        parts = [p(u[i]) for i, (_, _, p) in enumerate(pushes)]
        return {name: torch.stack([part[name] for part in parts]) for name in parts[0]}

    return pushes[0][0], torch.stack([jv for _, jv, _ in pushes]), pull_each


def convolutional(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


def per_vector(problem: Problem, tangents: Vector, k: int | None, one: Any) -> Vector:
    """``one(tangents, k)``, or for a model with convolutions ``K`` calls ``one(t_i, None)`` stacked:
    vmap's rule for a convolution with batched weights is slower on CPU than ``K`` products (measured
    1.5-2.3x the cost of ``K`` calls on the CNN workload), unlike that of a linear layer.
    """
    if k is None or not convolutional(problem.model):
        return one(tangents, k)
    parts = [one({name: t[i] for name, t in tangents.items()}, None) for i in range(k)]
    return {name: torch.stack([p[name] for p in parts]) for name in parts[0]}


def check(where: str, problem: Problem, params: Mapping[str, Tensor], v: Mapping[str, Tensor],
           normalize: str) -> tuple[Vector, Vector, int | None]:
    choice(where, "normalize", normalize, NORMALIZES)
    params = check_params(where, problem, params)
    v, k = check_vector(where, v, params)
    return params, v, k


def accumulate(where: str, problem: Problem, params: Vector, batch: Any, normalize: str, product: Any, kind: str,
                n_samples: int, generator: torch.Generator | None) -> Vector:
    """Run ``product(prepared, noise)`` (an unnormalised sum) on every batch and divide by ``Σ_b Z_b``
    (``normalize="none"``: by 1, the sum over the whole list, whatever its split into batches).
    """
    total: Vector | None = None
    count = 0
    for b in batches_of(batch):
        prepared = prepare_batch(where, problem, params, b, kind, n_samples, generator, normalize)
        with math_sdpa():
            part = product(prepared.prepared, prepared.noise)
        if total is None:
            total = part
        else:
            for name in total:
                total[name] += part[name]
        count = 1 if normalize == "none" else count + int(prepared.count)
    if total is None:
        raise FisherError(f"{where}: batch is an empty collection of batches; expected one batch or a non-empty "
                          "list (or iterable) of batches")
    bad = non_finite(total)
    if bad is not None:
        raise FisherError(f"{where}: the product is non-finite for parameter {bad!r} (inf or NaN in the model's "
                          "outputs or their derivatives)")
    return {name: x.div_(count) for name, x in total.items()} if count != 1 else total


__all__ = ["accumulate", "batches_of", "check", "convolutional", "forward_of", "grad_leaves", "like_params",
           "math_sdpa", "per_vector", "push", "push_stacked"]
