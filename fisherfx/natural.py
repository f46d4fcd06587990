"""Natural gradients and a pure K-FAC optimiser.

.. math::
    \\tilde g = (F + λ I)^{-1} g

with ``F`` a diagonal :class:`~fisherfx.Estimate`, a :class:`~fisherfx.KFAC` (or EKFAC) or any
symmetric matvec ``v ↦ F v`` (solved by conjugate gradients, e.g. on the exact GGN with
``functools.partial(ffx.ggn_vp, problem, params, batch)``).

:func:`kfac_optimizer` is an optax-style pair of pure functions: ``init(params) -> state`` and
``update(grads, state, params, batch) -> (updates, state)``; the state (factor EMAs, the factors
whose eigendecomposition is in use, momentum, step) is a NamedTuple that is returned, never mutated,
and :func:`apply_updates` adds the updates to the parameters.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._errors import FisherError
from ._kfac import (
    DAMPINGS,
    KFAC,
    KFACEMAState,
    kfac,
    kfac_eig,
    kfac_ema_init,
    kfac_ema_update,
    kfac_ema_value,
    kfac_inverse,
    kfac_solve,
    kfac_vp,
)
from ._options import finite_number
from .problems import Problem
from .spectrum import cg_solve
from .state import Estimate
from .vectors import Vector, check_vector, dot

Matvec = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]


def natural_gradient(grads: Mapping[str, Tensor], curvature: "Estimate | KFAC | Matvec", damping: float,
                     damping_kind: str = "tikhonov", tol: float = 1e-6, max_iter: int | None = None) -> Vector:
    """``(F + λI)⁻¹ g`` for a diagonal estimate, a K-FAC or a matvec.

    Args:
        grads: ``{name: [*P]}`` (or ``{name: [K, *P]}``), e.g. the gradient of the mean loss.
        curvature: an :class:`~fisherfx.Estimate` of the diagonal (``g / (d + λ)``), a :class:`~fisherfx.KFAC`
            (:func:`~fisherfx.kfac_solve`) or a function ``v ↦ F v`` (:func:`~fisherfx.spectrum.cg_solve`).
            A diagonal or a K-FAC must cover exactly the names of ``grads``.
        damping: ``λ > 0``.
        damping_kind: for a K-FAC, ``"tikhonov"`` or ``"pi"`` (see :func:`~fisherfx.kfac_solve`).
        tol, max_iter: for conjugate gradients (a matvec).

    Returns:
        ``{name: [*P]}`` shaped like ``grads``.

    Raises:
        FisherError: ``damping ≤ 0``, grads not shaped like the curvature's parameters, a curvature of
            another type, CG that does not converge.

    """
    where = "natural_gradient"
    lam = finite_number(where, "damping", damping, strict=True)
    if isinstance(curvature, KFAC):
        return kfac_solve(curvature, grads, lam, damping_kind)
    if isinstance(curvature, Estimate):
        g, _ = check_vector(where, grads, curvature.value, option="grads")
        return {name: (x.to(curvature.value[name]) / (curvature.value[name] + lam)).to(x.dtype)
                for name, x in g.items()}
    if callable(curvature):
        result = cg_solve(curvature, grads, damping=lam, tol=tol, max_iter=max_iter)
        if not result.converged:
            raise FisherError(f"{where}: conjugate gradients did not reach tol={tol} in {result.iterations} steps "
                              f"(relative residual {float(result.residuals[-1]):.3g}); raise damping or max_iter")
        return result.x
    raise FisherError(f"{where}: curvature must be a diagonal Estimate, a KFAC or a matvec function, got "
                      f"{type(curvature).__name__}")


def apply_updates(params: Mapping[str, Tensor], updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``params + updates`` (a new dict; parameters without an update are kept as they are)."""
    unknown = sorted(set(updates) - set(params))
    if unknown:
        raise FisherError(f"apply_updates: updates for unknown parameters {unknown}")
    return {name: p + updates[name].to(p) if name in updates else p for name, p in params.items()}


class KFACOptState(NamedTuple):
    """The K-FAC optimiser's state (returned by ``init`` / ``update``, never mutated)."""

    step: Tensor  # shape=(), int64: updates so far
    factors: KFACEMAState | None  # EMAs of the factors; None before the first update
    inverse: KFAC | None  # refreshed every inverse_every: the damped inverse factors ("pi"), or the averaged
    # factors with their eigendecomposition ("tikhonov")
    momentum: dict[str, Tensor] | None  # the velocity, with momentum > 0


class KFACOptimizer(NamedTuple):
    """``init(params) -> state`` and ``update(grads, state, params, batch) -> (updates, state)``."""

    init: Callable[[Mapping[str, Tensor]], KFACOptState]
    update: Callable[..., tuple[dict[str, Tensor], KFACOptState]]


def _every(where: str, option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FisherError(f"{where}: {option} must be a positive integer, got {value!r}")
    return value


def kfac_optimizer(problem: Problem, lr: float = 0.3, damping: float = 1e-2, decay: float = 0.95,
                   curvature_every: int = 1, inverse_every: int = 10, kind: str = "mc", momentum: float = 0.0,
                   kl_clip: float | None = 1e-2, mode: str = "expand", normalize: str = "samples",
                   damping_kind: str = "pi", seed: int = 0, dtype: torch.dtype = torch.float32) -> KFACOptimizer:
    """K-FAC as an optax-style optimiser: preconditioned steps ``Δθ = −η ν (F̂ + λI)⁻¹ g``.

    Every ``curvature_every`` steps the factors of the batch (:func:`~fisherfx.kfac`, ``kind``) enter their EMA
    (decay ``β``, bias-corrected); every ``inverse_every`` steps the averaged factors are inverted: with
    ``damping_kind="pi"`` (default, Martens & Grosse 2015) into the damped inverse factors of
    :func:`~fisherfx.kfac_inverse` (each step then costs two matrix products per layer), with ``"tikhonov"``
    into eigendecompositions for the exact ``(F̂ + λI)⁻¹`` (four); every step solves with the latest inverse.
    ``ν = min(1, sqrt(c / (η² g̃ᵀ g)))`` with ``c = kl_clip`` bounds the predicted change of the model's
    distribution (Ba et al. 2017; ``None``: ``ν = 1``). With ``momentum`` ``μ``: ``v ← μ v + ν g̃``,
    ``Δθ = −η v``.

    Args:
        problem: the problem the factors are computed on (the batches passed to ``update``).
        lr: ``η``.
        damping: ``λ > 0``.
        decay: the factors' EMA decay ``β ∈ (0, 1)``.
        curvature_every, inverse_every: how often to add factors and to invert (or, ``"tikhonov"``,
            eigendecompose) their average.
        kind: ``"mc"`` (default), ``"empirical"`` or ``"exact"`` (see :func:`~fisherfx.kfac`).
        momentum: ``μ ∈ [0, 1)``.
        kl_clip: ``c > 0`` or ``None``.
        mode, normalize: as :func:`~fisherfx.kfac` (``normalize="samples"`` matches a loss averaged over
            samples, ``"tokens"`` one averaged over tokens).
        damping_kind: ``"pi"`` or ``"tikhonov"`` (see :func:`~fisherfx.kfac_solve`).
        seed: MC labels at step ``k`` come from a generator seeded with ``(seed, k)``: runs are reproducible.
        dtype: the factors' accumulation dtype.

    Returns:
        :class:`KFACOptimizer`.

    """
    where = "kfac_optimizer"
    lam = finite_number(where, "damping", damping, strict=True)
    for option, value, low in (("lr", lr, 0.0), ("momentum", momentum, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise FisherError(f"{where}: {option} must be a finite number >= {low}, got {value!r}")
    if momentum >= 1:
        raise FisherError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or not 0 < decay < 1:
        raise FisherError(f"{where}: decay must be in (0, 1), got {decay!r}")
    if kl_clip is not None and (not isinstance(kl_clip, (int, float)) or isinstance(kl_clip, bool) or kl_clip <= 0):
        raise FisherError(f"{where}: kl_clip must be a number > 0 or None, got {kl_clip!r}")
    if damping_kind not in DAMPINGS:
        raise FisherError(f"{where}: damping_kind must be one of {list(DAMPINGS)}, got {damping_kind!r}")
    curvature_every, inverse_every = _every(where, "curvature_every", curvature_every), \
        _every(where, "inverse_every", inverse_every)

    def init(params: Mapping[str, Tensor]) -> KFACOptState:
        if not isinstance(params, Mapping) or not params:
            raise FisherError(f"{where}.init: params must be a non-empty {{name: tensor}} dict")
        velocity = {name: torch.zeros_like(p) for name, p in params.items()} if momentum > 0 else None
        return KFACOptState(torch.zeros((), dtype=torch.int64), None, None, velocity)

    def update(grads: Mapping[str, Tensor], state: KFACOptState, params: Mapping[str, Tensor],
               batch: Any) -> tuple[dict[str, Tensor], KFACOptState]:
        if not isinstance(state, KFACOptState):
            raise FisherError(f"{where}.update: expected the state from init, got {type(state).__name__}")
        step = int(state.step)
        ema, inverse = state.factors, state.inverse
        if step % curvature_every == 0 or ema is None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            fac = kfac(problem, params, batch, kind=kind, mode=mode, generator=generator, normalize=normalize,
                       dtype=dtype)
            ema = kfac_ema_update(kfac_ema_init(fac, decay) if ema is None else ema, fac)
        if step % inverse_every == 0 or inverse is None:
            value = kfac_ema_value(ema)
            inverse = kfac_inverse(value, lam) if damping_kind == "pi" else kfac_eig(value)
        like = {name: torch.empty(shape, device="meta") for name, shape in inverse.shapes.items()}
        g, _ = check_vector(f"{where}.update", grads, like, option="grads", batched=False)
        nat = kfac_vp(inverse, g) if damping_kind == "pi" else kfac_solve(inverse, g, lam)
        scale = 1.0
        if kl_clip is not None:
            predicted = float(dot(nat, g)) * lr**2
            scale = min(1.0, math.sqrt(kl_clip / predicted)) if predicted > 0 else 1.0
        velocity = state.momentum
        if velocity is not None:
            velocity = {name: momentum * velocity[name] + scale * nat[name] for name in nat}
            direction = velocity
        else:
            direction = {name: scale * x for name, x in nat.items()}
        updates = {name: -lr * x for name, x in direction.items()}
        return updates, KFACOptState(state.step + 1, ema, inverse, velocity)

    return KFACOptimizer(init, update)


__all__ = ["KFACOptState", "KFACOptimizer", "apply_updates", "kfac_optimizer", "natural_gradient"]
