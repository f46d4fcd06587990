"""The loss landscape around ``θ``: worst-case sharpness in a ball and flatness under weight noise.

Both perturb ``θ`` (the given ``params``; the model's other parameters stay fixed) and evaluate the
loss of :func:`fisherfx.nll`, ``L(θ) = (1/Z) Σ_n ℓ_n(θ)``, with the same ``normalize``. The model
runs as it is: in train mode, dropout makes every evaluation random and BatchNorm updates its
running statistics on each of the many forwards, so call ``model.eval()`` first.

The curvature counterparts (the Hessian's top eigenvalue and trace, which sharpness and flatness
approach for small radii) come from :func:`fisherfx.lanczos` and :func:`fisherfx.hutchinson_trace`
on :func:`fisherfx.hvp`.
"""

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value

from .._errors import FisherError
from .._options import check_generator, choice
from ..fisher import NORMALIZES, Normalize, check_params
from ..losses import nll
from ..problems import Problem
from ..vectors import Vector, add, dimension, dot, random_like, scale, unflatten
from .capacity import _number

Norm = Literal["l2", "linf-relative"]
NORMS = ("l2", "linf-relative")


class Sharpness(NamedTuple):
    """What :func:`sharpness` returns."""

    increase: Tensor  # shape=(): the largest L(θ + δ_t) − L(θ) over the iterates, max(history)
    delta: Vector  # {name: [*P]}: the iterate δ_t that reached it
    base_loss: Tensor  # shape=(): L(θ)
    history: Tensor  # [steps + 1]: L(θ + δ_t) − L(θ) for t = 0 (the random start), …, steps


class Flatness(NamedTuple):
    """What :func:`flatness` returns."""

    mean_increase: Tensor  # shape=(): the sample mean of the increases
    standard_error: Tensor  # shape=(): their sample standard deviation (ddof 1) / √n_draws
    increases: Tensor  # [n_draws]: L(θ + δ_j) − L(θ), one per draw


def _setup(where: str, problem: Problem, params: Mapping[str, Tensor], normalize: str,
           generator: Any) -> dict[str, Tensor]:
    choice(where, "normalize", normalize, NORMALIZES)
    check_generator(where, generator)
    params = check_params(where, problem, params)
    return {name: p.detach() for name, p in params.items()}


def _count(where: str, option: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise FisherError(f"{where}: {option} must be an integer ≥ {least}, got {value!r}")
    return value


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform_like(like: Mapping[str, Tensor], generator: torch.Generator | None) -> Vector:
    """Entries uniform on ``[−1, 1)``, drawn as one flat ``[D]`` tensor as :func:`random_like` draws."""
    first = next(iter(like.values()))
    flat = torch.rand(dimension(like), generator=generator, device=_device(generator), dtype=first.dtype)
    flat = flat.mul_(2).sub_(1)
    return {name: t.to(like[name]) for name, t in unflatten(flat, like).items()}


def _norm(v: Mapping[str, Tensor]) -> Tensor:
    return dot(v, v).sqrt()


def sharpness(problem: Problem, params: Mapping[str, Tensor], batch: Any, radius: float, steps: int = 20,
              step_size: float | None = None, norm: Norm = "l2", generator: torch.Generator | None = None,
              normalize: Normalize = "samples") -> Sharpness:
    """The largest loss increase found within a ball around ``θ``, by projected gradient ascent.

    .. math::
        \\max_{δ ∈ B} L(θ + δ) − L(θ), \\qquad
        B = \\{‖δ‖_2 ≤ r\\} \\ (\\texttt{"l2"}) \\quad \\text{or} \\quad
        B = \\{|δ_i| ≤ r(|θ_i| + 1)\\} \\ (\\texttt{"linf-relative"})

    The second is Keskar et al.'s (2017, "On large-batch training for deep learning: generalization
    gap and sharp minima") ε-sharpness box in the full parameter space (their ``A = I``), ``ε = r``;
    their reported number is ``100 · increase / (1 + base_loss)``. The iteration, with step ``η``
    (``step_size``, measured like ``radius``; default ``η = r``) and ``Π`` the Euclidean
    projection onto ``B``:

    - start: ``δ_0`` uniform in ``B`` (``"l2"``: ``r u^{1/D} ξ/‖ξ‖``, ``ξ ~ N(0, I)``, ``u ~ U(0, 1)``;
      ``"linf-relative"``: ``w ⊙ U(−1, 1)^D``, ``w_i = r(|θ_i| + 1)``), drawn from ``generator``
      (torch's global generator when ``None``), so that a gradient that vanishes at ``θ`` (a
      minimum) does not stall the ascent;
    - ``"l2"``: ``δ_{t+1} = Π(δ_t + η g_t/‖g_t‖)`` (normalised gradient ascent; ``Π`` rescales onto
      the sphere when outside);
    - ``"linf-relative"``: ``δ_{t+1} = Π(δ_t + η (|θ| + 1) ⊙ sign(g_t))`` (sign ascent, the
      steepest ascent for this box; ``Π`` clips each entry to ``[−w_i, w_i]``, so with ``η = r`` a
      step reaches the face it heads for from the centre),

    with ``g_t = ∇_δ L(θ + δ_t)`` by :func:`torch.func.grad_and_value` of :func:`fisherfx.nll`. The
    result is the best of ``δ_0, …, δ_steps``: a local maximiser, so a lower bound of the maximum
    (exact for a quadratic loss at a minimum in the L2 ball, where the ascent is a power iteration
    on the Hessian: ``½ r² λ_max``). ``steps`` gradient evaluations and one more loss.

    Sharpness depends on the parametrisation: rescaling the layers of a ReLU network changes it
    without changing the function (Dinh et al. 2017, "Sharp minima can generalize for deep nets");
    the relative box only partly corrects for that.

    Args:
        problem, params, batch: as for :func:`fisherfx.nll`; only ``params`` are perturbed.
        radius: ``r > 0``.
        steps: gradient steps, ``≥ 1``.
        step_size: ``η > 0`` (default ``radius``).
        norm: ``"l2"`` or ``"linf-relative"``.
        generator: seeds the random start; the same state gives the same result.
        normalize: ``Z`` of the loss: ``"samples"``, ``"tokens"`` or ``"none"``.

    Returns:
        A :class:`Sharpness`: the increase (``max(history)``), the ``δ`` reaching it, ``L(θ)`` and
        the increase at every iterate.

    Raises:
        FisherError: ``radius`` or ``step_size`` not a positive number, ``steps < 1``, an unknown
            ``norm`` or ``normalize``, bad ``params`` (as the estimators), a bad batch.

    """
    where = "sharpness"
    theta = _setup(where, problem, params, normalize, generator)
    radius = _number(where, "radius", radius)
    steps = _count(where, "steps", steps, 1)
    eta = radius if step_size is None else _number(where, "step_size", step_size)
    if norm not in NORMS:
        raise FisherError(f"{where}: norm must be one of {list(NORMS)}, got {norm!r}")

    def loss_at(delta: Vector) -> Tensor:
        return nll(problem, add(theta, delta), batch, normalize)

    width = None
    if norm == "l2":
        xi = random_like(theta, generator=generator, distribution="gaussian")
        u = float(torch.rand((), generator=generator, device=_device(generator), dtype=torch.float64))
        factor = radius * u ** (1.0 / dimension(theta)) / _norm(xi)
        delta = {name: (factor * x).to(theta[name]) for name, x in xi.items()}
    else:
        width = {name: radius * (t.abs() + 1) for name, t in theta.items()}  # the box's half-widths w
        delta = {name: width[name] * d for name, d in _uniform_like(theta, generator).items()}

    def step(delta: Vector, g: Vector) -> Vector:
        if norm == "l2":
            length = _norm(g)
            if length == 0:  # a stationary point: no direction to move in
                return delta
            moved = add(delta, g, eta / length)
            outside = _norm(moved)
            return scale(moved, radius / outside) if outside > radius else moved
        return {name: torch.clamp(d + eta * (theta[name].abs() + 1) * g[name].sign(), -width[name], width[name])
                for name, d in delta.items()}

    with torch.no_grad():
        base = nll(problem, theta, batch, normalize).detach()
    ascent = grad_and_value(loss_at)
    history, best, top = [], delta, None  # only the best iterate is kept, not all of them
    for t in range(steps + 1):
        if t < steps:
            g, value = ascent(delta)
        else:
            with torch.no_grad():
                value = loss_at(delta)
        increase = value.detach() - base
        history.append(increase)
        if top is None or increase > top:
            top, best = increase, delta
        if t < steps:
            delta = step(delta, g)
    return Sharpness(top, best, base, torch.stack(history))


def _sigmas(where: str, sigma: Any, theta: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
    """``{name: σ}`` with σ a number ``≥ 0`` or a non-negative tensor broadcasting to the parameter."""
    if not isinstance(sigma, Mapping):
        value = _number(where, "sigma", sigma)
        return dict.fromkeys(theta, value)
    missing, extra = [k for k in theta if k not in sigma], [k for k in sigma if k not in theta]
    if missing or extra:
        raise FisherError(f"{where}: sigma as a dict must have the names of params; missing {missing}, "
                          f"unexpected {extra}")
    out: dict[str, Tensor | float] = {}
    for name, p in theta.items():
        s = sigma[name]
        if isinstance(s, Tensor) and s.numel() != 1:
            try:
                fits = torch.broadcast_shapes(s.shape, p.shape) == p.shape
            except RuntimeError:
                fits = False
            if not fits or not s.dtype.is_floating_point:
                raise FisherError(f"{where}: sigma[{name!r}] must broadcast to the parameter's shape "
                                  f"{tuple(p.shape)} with a floating dtype; got shape {tuple(s.shape)}, {s.dtype}")
            if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                raise FisherError(f"{where}: sigma[{name!r}] must hold finite values ≥ 0")
            out[name] = s.to(p)
        else:
            out[name] = _number(where, f"sigma[{name!r}]", s, positive=False)
    return out


def flatness(problem: Problem, params: Mapping[str, Tensor], batch: Any, sigma: float | Mapping[str, Any],
             n_draws: int, generator: torch.Generator | None = None, normalize: Normalize = "samples") -> Flatness:
    """The mean loss increase under Gaussian weight noise, with its standard error.

    .. math::
        E_{δ ∼ N(0, \\mathrm{diag}(σ^2))}\\,[L(θ + δ) − L(θ)]
        ≈ \\frac{1}{m} \\sum_{j=1}^m L(θ + δ_j) − L(θ)

    over ``m = n_draws`` independent draws. To second order it is ``½ Σ_i σ_i² H_ii`` (``½ σ² tr H``
    for one ``σ``; exact for a quadratic loss), the noise counterpart of the worst case
    :func:`sharpness`: the "flatness" of PAC-Bayes generalisation measures (Neyshabur et al. 2017,
    "Exploring generalization in deep learning"; Jiang et al. 2020, "Fantastic generalization
    measures and where to find them"). Like sharpness it depends on the parametrisation; a
    per-parameter ``σ`` (e.g. proportional to ``|θ|``) is the usual remedy.

    Each ``δ_j`` is ``σ ⊙ ξ_j`` with ``ξ_j`` from :func:`fisherfx.vectors.random_like` (one flat
    ``[D]`` standard normal draw in the order of ``params`` on the generator's device), drawn one
    after the other from ``generator`` (torch's global generator when ``None``): the same state
    gives the same result. ``n_draws + 1`` forwards, no gradient.

    Args:
        problem, params, batch: as for :func:`fisherfx.nll`; only ``params`` are perturbed.
        sigma: the noise scale, a number ``> 0``, or ``{name: σ}`` for every name of ``params``
            with ``σ`` a number ``≥ 0`` or a non-negative tensor broadcasting to that parameter
            (e.g. per entry).
        n_draws: ``m ≥ 2`` (the standard error needs two).
        generator: seeds the noise.
        normalize: ``Z`` of the loss: ``"samples"``, ``"tokens"`` or ``"none"``.

    Returns:
        A :class:`Flatness`: the mean increase, its standard error ``s/√m`` (``s`` the sample
        standard deviation with ``m − 1``) and the ``m`` increases.

    Raises:
        FisherError: a bad ``sigma`` (not positive, negative entries, other names, a shape that does
            not broadcast), ``n_draws < 2``, an unknown ``normalize``, bad ``params``, a bad batch.

    """
    where = "flatness"
    theta = _setup(where, problem, params, normalize, generator)
    sigmas = _sigmas(where, sigma, theta)
    n_draws = _count(where, "n_draws", n_draws, 2)
    with torch.no_grad():
        base = nll(problem, theta, batch, normalize)
        increases = []
        for _ in range(n_draws):
            xi = random_like(theta, generator=generator, distribution="gaussian")
            noisy = {name: t + sigmas[name] * xi[name].to(t) for name, t in theta.items()}
            increases.append(nll(problem, noisy, batch, normalize) - base)
    increases = torch.stack(increases)  # [m]
    return Flatness(increases.mean(), increases.std(correction=1) / math.sqrt(n_draws), increases)


__all__ = ["Flatness", "Sharpness", "flatness", "sharpness"]
