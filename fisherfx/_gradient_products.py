"""The empirical and MC Fisher products, ``(1/R) Σ_r Σ_u s_{r,u} ∇ℓ_{r,u}`` with ``s_{r,u} = ∇ℓ_{r,u}ᵀ v``
(``u`` a sample, or an active position for ``per="token"``; ``r`` the draw), by two routes.

* ``jvp``/``vjp`` (:func:`along`, :func:`spread`): ``s`` from one forward with tangents,
  ``Σ_{t∈u} a_tᵀ (J v)_t`` with ``a = ∂ℓ/∂f`` the output vectors of :func:`~.engines.taps.output_vectors`,
  and the weighted sum as the pull-back of ``Σ_r a_r s_r / R``.
* taps (:mod:`.engines._tap_products`): ``s`` and the weighted sum from the layer inputs and output
  gradients of one forward and one backward per draw, for all ``K`` vectors at once.

A mix (parameters the taps do not serve) adds the ``jvp``'s part of ``s`` to the taps' before each route
pulls ``s`` back, so the product is exactly the one of a single route.
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._options import choice
from ._products import accumulate, check, like_params, per_vector, push, push_stacked
from .engines import _tap_products as tap_products
from .engines import taps
from .fisher import ENGINES, PERS, _fixing
from .problems import Prepared, Problem
from .vectors import Vector


def along(a: Tensor, jv: Tensor, per: str) -> Tensor:
    """``s = ∇ℓ_uᵀ v`` per unit ``[R, (K,) N, T or 1]``: ``Σ_{t ∈ u} a_{n,t}ᵀ (J v)_{n,t}`` from the output
    vectors ``a`` ``[R, N, T, C]`` (``∂ℓ/∂f`` per draw ``r``) and the tangents ``J v`` ``[(K,) N, T, C]``.
    """
    jv = jv.to(a.dtype)
    lead = jv.ndim - 3  # 0, or 1 for K vectors
    a_ = a.reshape(a.shape[0], *[1] * lead, *a.shape[1:])  # [R, (1,) N, T, C]
    along = (a_ * jv).sum(-1)  # [R, (K,) N, T]: a_{n,t}ᵀ (J v)_{n,t}
    return along.sum(-1, keepdim=True) if per == "sample" else along


def spread(a: Tensor, s: Tensor) -> Tensor:
    """The cotangent ``u = Σ_r a_r s_r / R`` ``[(K,) N, T, C]`` whose pull-back ``Jᵀ u`` is ``(1/R) Σ_{r,u} s_{r,u}
    ∇ℓ_{r,u}``, for ``s`` as :func:`along` gives it.
    """
    lead = s.ndim - 3
    a_ = a.reshape(a.shape[0], *[1] * lead, *a.shape[1:])
    return (a_ * s.to(a.dtype)[..., None]).sum(0) / a.shape[0]


def gradient_cotangent(problem: Problem, out: Tensor, jv: Tensor, prepared: Prepared, *, kind: str, per: str,
                       noise: Tensor | None) -> Tensor:
    """``u = Σ_r a_r (a_rᵀ J v) / R`` with ``a_r = ∂ℓ/∂f`` per sample (or position) and draw ``r``."""
    a = taps.output_vectors(problem, out.detach(), prepared, kind, noise)  # [R, N, T, C], zero where inactive
    return spread(a, along(a, jv, per))


def gradient_product(where: str, problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                     normalize: str, kind: str, per: str, engine: str, n_samples: int = 1,
                     generator: torch.Generator | None = None) -> Vector:
    """The empirical or MC Fisher product, by route (see :func:`~fisherfx.empirical_fisher_vp`'s ``engine``):
    through the taps where they serve and by ``jvp``/``vjp`` for the rest, or by ``jvp``/``vjp`` alone.
    """
    choice(where, "engine", engine, ENGINES)
    params, v, k = check(where, problem, params, v, normalize)
    choice(where, "per", per, PERS)
    tangents = like_params(v, params)
    stacked = tangents if k is not None else {name: t[None] for name, t in tangents.items()}

    def product(prepared: Prepared, noise: Tensor | None) -> Vector:
        if engine == "generic" or (engine == "auto" and taps.units_are_positions(prepared, kind, per)):
            return per_vector(problem, tangents, k, lambda t, k_: _pushed(
                where, problem, params, prepared, noise, t, k_, kind, per))
        out = _tapped(where, problem, params, prepared, noise, stacked, kind, per, engine == "taps")
        return out if k is not None else {name: x[0] for name, x in out.items()}

    return accumulate(where, problem, params, batch, normalize, product, kind, n_samples, generator)


def _pushed(where: str, problem: Problem, params: Vector, prepared: Prepared, noise: Tensor | None, v: Vector,
            k: int | None, kind: str, per: str) -> Vector:
    """The product by ``jvp``/``vjp``: ``s`` from one forward with tangents, pulled back through its graph."""
    out, jv, pull = push(where, problem, params, prepared, v, k)
    return pull(gradient_cotangent(problem, out, jv.detach(), prepared, kind=kind, per=per, noise=noise))


def _tapped(where: str, problem: Problem, params: Vector, prepared: Prepared, noise: Tensor | None, v: Vector,
            kind: str, per: str, strict: bool) -> Vector:
    """``(1/R) Σ_r Σ_u s_{r,u} ∇ℓ_{r,u}`` with ``s_{r,u} = ∇ℓ_{r,u}ᵀ v`` for ``v`` ``{name: [K, *P]}``, ``R`` the
    draws: ``s`` adds the taps' part (:mod:`.engines._tap_products`) and the ``jvp``'s of the other parameters,
    then each part is pulled back by its own route.
    """
    first = next(iter(params.values()))
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    n, t = prepared.active.shape
    draws = 1 if noise is None else noise.shape[0]
    collected = tap_products.Collected(n, t if per == "token" else 1, draws, prepared.active, dtype)
    result = taps.estimate(problem, params, prepared, {name: taps.Request() for name in params}, kind=kind, per=per,
                           noise=noise, dtype=dtype, where=where, consume=collected)
    if strict and result.missing:
        raise taps.refusal(where, result.missing, "jvp and vjp")
    served = set(result.sums)
    s = collected.inner({name: v[name] for name in served}, served)  # [R, K, N, T or 1]
    rest = {name: p for name, p in params.items() if name not in served}
    if rest:
        fixed = _fixing(problem, params, rest)
        f, jv, pull = push_stacked(where, fixed, rest, prepared, {name: v[name] for name in rest})
        a = taps.output_vectors(problem, f.detach(), prepared, kind, noise)
        s = s + along(a, jv.detach(), per).to(dtype)
    got = collected.weighted(s, {name: params[name].shape for name in served}, served)
    k = s.shape[1]
    out = {name: (got[name] / draws if name in got else torch.zeros((k, *p.shape), dtype=dtype, device=p.device))
           .to(p.dtype) for name, p in params.items() if name in served}  # not in got: unused by the forward
    if rest:
        out.update(pull(spread(a, s)))
    return {name: out[name] for name in params}


__all__ = ["along", "gradient_cotangent", "gradient_product", "spread"]
