"""Percolation experiments: concentrated perturbations, their predicted risk and their measured damage.

A *concentrated perturbation* of ``θ`` moves only the entries of the ``k`` most (or least, or
randomly) important groups (channels, heads) and has a fixed Frobenius norm ``ε``: the same mass of
change, spread over a fraction ``C`` of the groups. Its *risk* is the damage predicted before it is
applied,

.. math::
    R(δ) = \\tfrac12 δ^\\top F δ,

and its *damage* is what is measured after: the mean loss increase and the mean
``KL(p_θ ‖ p_{θ+δ})`` over active positions. For any ``θ`` the exact Fisher gives the second-order
term of the KL, ``KL(p_θ ‖ p_{θ+δ}) = ½ δᵀFδ + O(‖δ‖³)`` (Amari 1998, "Natural gradient works
efficiently in learning"; Pascanu & Bengio 2014, "Revisiting natural gradient for deep networks"),
while it predicts the loss increase only near a minimum, where the gradient term vanishes.

Percolation in the sense of this module: how the damage of a fixed-norm change grows as it
concentrates on the groups the Fisher ranks first, against random and bottom-ranked groups (the
question behind Fisher pruning, e.g. Theis et al. 2018, "Faster gaze prediction with dense networks
and Fisher pruning", and Liu et al. 2021, "Group Fisher pruning for practical network compression").
"""

import csv
import io
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from .._errors import FisherError
from .._kfac import KFAC, kfac_vp
from .._options import check_generator, choice
from ..fisher import NORMALIZES, Normalize, check_params
from ..groups import Group, Groups, check_groups, expand_groups, some_names
from ..operators import batches_of
from ..problems import Problem
from ..state import Estimate
from ..vectors import Vector, check_vector, random_like
from .damage import ACCUMULATE, base_runs, measured_damage

Select = Literal["top", "bottom", "random"]
Scope = Literal["global", "per_param"]
Score = Literal["total", "mean"]
SELECTS = ("top", "bottom", "random")
SCOPES = ("global", "per_param")
SCORES = ("total", "mean")
DIRECTIONS = ("gaussian", "sign")


class Selection(NamedTuple):
    """What :func:`concentrated_perturbation` chose and applied."""

    mask: dict[str, Tensor]  # {name: [G...] bool}: the chosen groups, for the names in groups
    chosen: list[tuple[str, tuple[int, ...]]]  # (name, group index) in rank order
    delta: dict[str, Tensor]  # {name: [*P]}: θ_new − θ for every name of params (zero outside the groups)




class SweepRecord(NamedTuple):
    """One row of :func:`percolation_sweep`: a concentration, an ε and a selection, over the repeats."""

    concentration: float
    epsilon: float
    select: str
    risk: float  # mean over the repeats of ½ δᵀFδ
    loss_increase_mean: float
    loss_increase_std: float  # sample standard deviation over the repeats (0 for one repeat)
    kl_mean: float
    kl_std: float
    risk_std: float
    chosen: int  # k, the number of groups perturbed
    repeats: int  # perturbations drawn (1 when nothing in them is random)


class Matvec(Protocol):
    """A curvature as a product: ``v ↦ F v`` on ``{name: tensor}`` vectors."""

    def __call__(self, v: Vector) -> Vector: ...


class HasMatvec(Protocol):
    """A curvature value that carries its product ``F v`` as a method (any factored approximation)."""

    def matvec(self, v: Vector) -> Vector: ...


Curvature = Estimate | Mapping[str, Tensor] | KFAC | Matvec | HasMatvec


# --- small checks ---------------------------------------------------------------------------------

def _number(where: str, option: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FisherError(f"{where}: {option} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _concentration(where: str, value: Any) -> float:
    c = _number(where, "concentration", value)
    if not 0.0 < c <= 1.0:
        raise FisherError(f"{where}: concentration must lie in (0, 1], got {value!r}")
    return c


def _epsilon(where: str, value: Any) -> float:
    eps = _number(where, "epsilon", value)
    if not 0.0 <= eps < math.inf:
        raise FisherError(f"{where}: epsilon must be a finite number ≥ 0, got {value!r}")
    return eps


def values_of(where: str, option: str, x: Any) -> dict[str, Tensor]:
    """``x.value`` of an :class:`Estimate`, or a ``{name: tensor}`` dict, checked: tensors, finite."""
    values = x.value if isinstance(x, Estimate) else x
    if not isinstance(values, Mapping) or not values:
        raise FisherError(f"{where}: {option} must be an Estimate or a non-empty {{name: tensor}} dict, got "
                          f"{type(x).__name__}")
    for name, v in values.items():
        if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
            got = f"dtype {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise FisherError(f"{where}: {option}[{name!r}] must be a floating-point tensor, got {got}")
        if not bool(torch.isfinite(v).all()):
            raise FisherError(f"{where}: {option}[{name!r}] holds inf or NaN")
    return dict(values)


def k_of(concentration: float, n_groups: int) -> int:
    """``k = max(1, ⌊C·G⌋)``, the product taken up to rounding (a few ulps below an integer counts as
    that integer, so ``C = 0.29`` of ``G = 100`` groups is 29, not the 28 of ``⌊28.999999999999996⌋``).
    """
    return max(1, min(n_groups, math.floor(concentration * n_groups * (1.0 + 8 * sys.float_info.epsilon))))


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


# --- ranking and the perturbation -----------------------------------------------------------------

def _scores(where: str, importance: dict[str, Tensor], checked: dict[str, Group], params: Mapping[str, Tensor],
            score: str) -> dict[str, Tensor]:
    """``{name: [G...] float64}``: the group totals, or means per entry (``score="mean"``)."""
    missing = [k for k in checked if k not in importance]
    extra = [k for k in importance if k not in checked]
    if missing or extra:
        raise FisherError(f"{where}: importance must have the names of groups; missing {missing}, unexpected {extra}")
    out = {}
    for name, group in checked.items():
        sizes = group.reduce(torch.ones_like(params[name], dtype=ACCUMULATE))  # [G...]: |g|
        value = importance[name]
        if value.shape != sizes.shape:
            raise FisherError(f"{where}: importance[{name!r}] has shape {tuple(value.shape)}; group pattern "
                              f"{group.pattern!r} gives {tuple(sizes.shape)} for parameter {name!r} of shape "
                              f"{tuple(params[name].shape)}")
        value = value.to(device=sizes.device, dtype=ACCUMULATE)
        out[name] = value if score == "total" else value / sizes
    return out


def _rank(scores: Tensor, select: str, generator: torch.Generator | None) -> Tensor:
    """Positions of ``scores`` ``[G]`` in rank order; ties keep the earlier position first."""
    if select == "random":
        return torch.randperm(scores.numel(), generator=generator, device=generator.device if generator else "cpu")
    return torch.sort(scores.cpu(), descending=select == "top", stable=True).indices


def _choose(scores: dict[str, Tensor], concentration: float, select: str, scope: str,
            generator: torch.Generator | None) -> list[tuple[str, tuple[int, ...]]]:
    names = list(scores)
    if scope == "global":
        flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
        owner = [(name, i) for name in names for i in range(scores[name].numel())]
        order = _rank(flat, select, generator)[: k_of(concentration, flat.numel())].tolist()
        picked = [owner[j] for j in order]
    else:
        picked = []
        for name in names:
            order = _rank(scores[name].reshape(-1), select, generator)
            picked += [(name, j) for j in order[: k_of(concentration, scores[name].numel())].tolist()]
    return [(name, _unravel(j, tuple(scores[name].shape))) for name, j in picked]


def _work_dtype(like: Mapping[str, Tensor]) -> torch.dtype:
    """float64 when a parameter is float64, else float32: the dtype of the full-size temporaries."""
    return torch.float64 if any(p.dtype == torch.float64 for p in like.values()) else torch.float32


def _direction(where: str, direction: Any, like: dict[str, Tensor], generator: torch.Generator | None) -> Vector:
    """Raw direction ``{name: [*P]}`` over the grouped parameters, drawn as one flat vector."""
    work = _work_dtype(like)
    if isinstance(direction, str):
        choice(where, "direction", direction, DIRECTIONS)
        distribution = "gaussian" if direction == "gaussian" else "rademacher"
        return random_like(like, generator=generator, distribution=distribution, dtype=work)
    if not isinstance(direction, Mapping):
        raise FisherError(f"{where}: direction must be 'gaussian', 'sign' or a {{name: tensor}} dict shaped like the "
                          f"parameters, got {type(direction).__name__}")
    given = {k: v for k, v in direction.items() if k in like}  # names outside the groups are not perturbed
    given, _ = check_vector(where, given, like, option="direction", batched=False)
    return {name: v.to(device=like[name].device, dtype=work) for name, v in given.items()}


def concentrated_perturbation(
    params: Mapping[str, Tensor],
    importance: Estimate | Mapping[str, Tensor],
    groups: Groups,
    concentration: float,
    epsilon: float,
    generator: torch.Generator | None = None,
    select: Select = "top",
    scope: Scope = "global",
    relative: bool = False,
    score: Score = "total",
    direction: str | Mapping[str, Tensor] = "gaussian",
) -> tuple[dict[str, Tensor], Selection]:
    """A perturbation of norm ``ε`` on the ``k`` top-, bottom- or randomly-ranked groups.

    .. math::
        δ = ε \\frac{m ⊙ d}{\\lVert m ⊙ d \\rVert_F}, \\qquad
        k = \\max(1, \\lfloor C G \\rfloor), \\qquad θ' = θ + δ

    with ``G`` the number of groups in the scope, ``m`` the 0/1 mask of the entries of the ``k`` chosen
    groups and ``d`` the direction. ``‖δ‖_F = ε`` over all parameters together (``relative=True``:
    ``ε ‖m ⊙ θ‖_F``, the norm of the selected entries of ``θ``), so at a fixed ``ε`` every ``C`` moves
    ``θ`` by the same distance, more or less concentrated.

    Ranking (``select``): ``"top"`` by decreasing score, ``"bottom"`` by increasing score, ties broken
    by position (the order of ``groups``, then row-major within a parameter), so the choice is
    deterministic and top selections are nested in ``C``; ``"random"``: a uniformly random order from
    ``generator`` (also nested in ``C`` for the same generator state). ``score="total"`` ranks by the
    group's importance ``I_g`` (for a group Fisher the trace of the block, which favours large groups);
    ``score="mean"`` by ``I_g / |g|``, the mean per entry, which compares groups of unequal size and is
    what a perturbation of fixed norm spread evenly over a group feels (``½ε²I_g/|g|²`` under the
    group approximation). Both are monotone in ``I_g`` within a parameter whose groups are equal in
    size, so they differ only across parameters (``scope="global"``). ``scope="global"`` ranks all
    groups of all named parameters together (``G`` = their number); ``"per_param"`` chooses
    ``max(1, ⌊C·G_p⌋)`` groups in each parameter, ``G_p`` its groups.

    Direction: ``"gaussian"`` (``d ~ N(0, I)``), ``"sign"`` (``d`` uniform in ``{−1, +1}``: every chosen
    entry moves by the same ``ε/√(entries)``) or a ``{name: [*P]}`` dict (e.g. a gradient; names outside
    ``groups`` are ignored). Random draws come from ``generator`` (torch's global generator when
    ``None``): the random order first (``select="random"``), then ``d`` as one flat vector over the
    grouped parameters in the order of ``groups``, so the same state gives the same ``δ`` and nested
    selections share ``d`` on their common entries. ``d`` is drawn in float32 (float64 when a parameter
    is float64), norms are accumulated in float64 and ``δ`` is stored in each parameter's dtype.

    Args:
        params: ``θ``, ``{name: [*P]}``; not modified.
        importance: ``{name: [G...]}`` for exactly the names in ``groups``: a group estimate's ``value``
            (:func:`~fisherfx.group_fisher`, :func:`~fisherfx.mask_importance`), an
            :func:`~fisherfx.ema_value`, :func:`~fisherfx.from_flat` of stored ``"<param>|<group>"``
            values, or an :class:`~fisherfx.Estimate`.
        groups: ``{name: Group | pattern}`` (:func:`~fisherfx.channels`, :func:`~fisherfx.heads`, …)
            naming parameters of ``params``.
        concentration: ``C`` in ``(0, 1]``.
        epsilon: ``ε ≥ 0``.
        generator: seeds the random order and direction.
        select: ``"top"``, ``"bottom"`` or ``"random"``.
        scope: ``"global"`` or ``"per_param"``.
        relative: scale ``ε`` by ``‖m ⊙ θ‖_F``.
        score: ``"total"`` or ``"mean"``.
        direction: ``"gaussian"``, ``"sign"`` or ``{name: [*P]}``.

    Returns:
        ``(new_params, selection)``: ``{name: [*P]}`` = ``θ + δ`` for every name of ``params`` (new
        tensors for the grouped names, the inputs themselves for the others), and a :class:`Selection`
        with the ``mask`` ``{name: [G...] bool}``, the ``chosen`` ``(name, index)`` pairs in rank order
        (``scope="per_param"``: parameter by parameter, in the order of ``groups``) and ``delta``
        ``{name: [*P]}`` for every name of ``params``.

    Raises:
        FisherError: ``concentration`` outside ``(0, 1]``; ``epsilon < 0``; ``select``, ``scope``,
            ``score`` or ``direction`` not one of the values listed; ``groups`` naming parameters not in
            ``params`` or with patterns that do not fit them; ``importance`` with other names than
            ``groups`` or shapes other than the group shapes, or non-finite; a direction that is zero on
            every chosen entry.

    Example:
        >>> import torch
        >>> from fisherfx.metrics import concentrated_perturbation
        >>> params = {"w": torch.ones(4, 3, dtype=torch.float64)}
        >>> importance = {"w": torch.tensor([4.0, 1.0, 3.0, 2.0])}
        >>> new, sel = concentrated_perturbation(params, importance, {"w": "o i -> o"}, 0.5, 0.1,
        ...                                      generator=torch.Generator().manual_seed(0))
        >>> sel.chosen, round(float(sel.delta["w"].norm()), 12)
        ([('w', (0,)), ('w', (2,))], 0.1)

    """
    where = "concentrated_perturbation"
    concentration = _concentration(where, concentration)
    epsilon = _epsilon(where, epsilon)
    choice(where, "select", select, SELECTS)
    choice(where, "scope", scope, SCOPES)
    choice(where, "score", score, SCORES)
    if not isinstance(relative, bool):
        raise FisherError(f"{where}: relative must be True or False, got {relative!r}")
    check_generator(where, generator)
    if not isinstance(params, Mapping) or not params:
        raise FisherError(f"{where}: params must be a non-empty {{name: tensor}} dict")
    if not isinstance(groups, Mapping) or not groups:
        raise FisherError(f"{where}: groups must be a non-empty {{name: Group | pattern}} dict")
    checked = check_groups(groups, params, where)
    scores = _scores(where, values_of(where, "importance", importance), checked, params, score)
    chosen = _choose(scores, concentration, select, scope, generator)
    mask = {name: torch.zeros(s.shape, dtype=torch.bool, device=s.device) for name, s in scores.items()}
    for name, index in chosen:
        mask[name][index] = True
    like = {name: params[name] for name in checked}
    raw = _direction(where, direction, like, generator)
    entries = expand_groups({k: m.to(_work_dtype(like)) for k, m in mask.items()}, checked, like)  # 1 where chosen
    masked = {name: raw[name] * entries[name].to(raw[name].device) for name in like}
    # the norm accumulates in float64 (and on the CPU: parameters may sit on several devices)
    norm = torch.stack([torch.linalg.vector_norm(v, dtype=ACCUMULATE).cpu() ** 2 for v in masked.values()]).sum().sqrt()
    if float(norm) == 0.0:
        raise FisherError(f"{where}: direction is zero on every entry of the chosen groups "
                          f"{some_names(f'{n}{list(i)}' for n, i in chosen)}; it cannot be scaled to norm epsilon")
    target = epsilon
    if relative:
        selected = torch.stack([torch.linalg.vector_norm(p * entries[name].to(p.dtype), dtype=ACCUMULATE).cpu() ** 2
                                for name, p in like.items()])
        target = epsilon * float(selected.sum().sqrt())
    delta = {}
    for name, p in params.items():
        if name in masked:
            delta[name] = (masked[name] * (target / float(norm))).to(dtype=p.dtype, device=p.device)  # ‖δ‖ = target
        else:
            delta[name] = torch.zeros_like(p)
    new_params = {name: p + delta[name] if name in masked else p for name, p in params.items()}
    return new_params, Selection(mask, chosen, delta)


# --- predicted risk -------------------------------------------------------------------------------

def check_delta(where: str, delta: Any, like: Mapping[str, Tensor], option: str = "curvature") -> dict[str, Tensor]:
    """``delta`` for the names of ``like``: every name present with its shape; names beyond ``like`` only
    where ``delta`` is zero (a :class:`Selection`'s delta covers all of ``params``).
    """
    if not isinstance(delta, Mapping) or not delta:
        raise FisherError(f"{where}: delta must be a non-empty {{name: tensor}} dict, got {type(delta).__name__}")
    missing = [k for k in like if k not in delta]
    if missing:
        raise FisherError(f"{where}: delta lacks {missing}, which {option} has; delta has {some_names(delta)}")
    for name, d in delta.items():
        if not isinstance(d, Tensor) or not d.dtype.is_floating_point:
            got = f"dtype {d.dtype}" if isinstance(d, Tensor) else type(d).__name__
            raise FisherError(f"{where}: delta[{name!r}] must be a floating-point tensor, got {got}")
        if name not in like and bool((d != 0).any()):
            raise FisherError(f"{where}: delta[{name!r}] is nonzero but {option} has no entry for {name!r}; "
                              f"{option} covers {some_names(like)}")
    return {name: delta[name] for name in like}


def quadratic_terms(where: str, curvature: Mapping[str, Tensor], delta: Any, groups: Groups | None,
                    option: str = "curvature") -> dict[str, Tensor]:
    """``F ⊙ δ²`` per entry ``{name: [*P]}`` (diagonal ``F``), or per group ``{name: [G...]}`` with
    ``groups``, float64.

    With ``groups`` each value of ``curvature`` is either group-shaped, a group Fisher ``F_g`` whose
    entries are taken as equal (``F_ii ≈ F_g/|g|``, so the term is ``F_g Σ_{i∈g} δ_i² / |g|``), or
    parameter-shaped, a diagonal whose terms are summed per group (exact). Shapes decide; the two
    readings agree where they coincide (every group a single entry).
    """
    if groups is None:
        d = check_delta(where, delta, curvature, option)
        for name, f in curvature.items():
            if f.shape != d[name].shape:
                raise FisherError(f"{where}: delta[{name!r}] has shape {tuple(d[name].shape)} but {option}[{name!r}] "
                                  f"{tuple(f.shape)}; a diagonal curvature is shaped like the parameters (pass "
                                  "groups= for a group estimate)")
        return {name: f.to(ACCUMULATE) * d[name].to(device=f.device, dtype=ACCUMULATE) ** 2
                for name, f in curvature.items()}
    if not isinstance(groups, Mapping):
        raise FisherError(f"{where}: groups must be a {{name: Group | pattern}} dict or None, got "
                          f"{type(groups).__name__}")
    unknown = [k for k in curvature if k not in groups]
    if unknown:
        raise FisherError(f"{where}: {option} has {unknown}, which groups do not cover; groups cover "
                          f"{some_names(groups)}")
    d = check_delta(where, delta, curvature, option)
    checked = check_groups({k: groups[k] for k in curvature}, d, where)
    out = {}
    for name, f in curvature.items():
        group, dd = checked[name], d[name].to(device=f.device, dtype=ACCUMULATE)
        if f.shape == dd.shape:
            out[name] = group.reduce(f.to(ACCUMULATE) * dd**2)
            continue
        sizes = group.reduce(torch.ones_like(dd))
        if f.shape != sizes.shape:
            raise FisherError(f"{where}: {option}[{name!r}] has shape {tuple(f.shape)}; expected the group shape "
                              f"{tuple(sizes.shape)} of pattern {group.pattern!r} or the parameter shape "
                              f"{tuple(dd.shape)} of delta[{name!r}]")
        out[name] = f.to(ACCUMULATE) * group.reduce(dd**2) / sizes
    return out


def _matvec_of(curvature: Any) -> Callable[[Vector], Vector] | None:
    """``v ↦ F v`` of a product curvature: a K-FAC value (its factored product), an object with a
    ``matvec`` method, or a callable; ``None`` for anything else.
    """
    if isinstance(curvature, KFAC):
        return lambda v: kfac_vp(curvature, v)
    method = getattr(curvature, "matvec", None)
    if callable(method):
        return method
    if callable(curvature):
        return curvature
    return None


def risk_score(curvature: Curvature, delta: Mapping[str, Tensor], groups: Groups | None = None) -> Tensor:
    """The damage a perturbation is predicted to do, before it is applied: ``½ δᵀ F δ``.

    .. math::
        R(δ) = \\tfrac12 δ^\\top F δ

    ``curvature`` is one of

    - a diagonal ``F``: an :class:`~fisherfx.Estimate` of :func:`~fisherfx.diag_fisher` or a
      ``{name: [*P]}`` dict: ``R = ½ Σ_i F_ii δ_i²`` (the off-diagonal terms are dropped);
    - a group estimate ``{name: [G...]}`` (:func:`~fisherfx.group_fisher`, an EMA of it) with its
      ``groups``: the entries of a group are taken as equal, ``F_ii ≈ F_g/|g|``, so
      ``R ≈ ½ Σ_g (F_g/|g|) Σ_{i∈g} δ_i²`` (an approximation: exact when ``δ`` or ``diag F`` is
      constant within each group; a parameter-shaped value among them is read as a diagonal);
    - a product ``v ↦ F v``: any callable on ``{name: tensor}`` vectors, e.g.
      ``functools.partial(ffx.ggn_vp, problem, params, batch)`` (the exact Fisher: ``R`` is then the
      second-order KL of :func:`perturbation_damage` at the same ``normalize``), or an object with a
      ``matvec(v)`` method;
    - a :class:`~fisherfx.KFAC` (:func:`~fisherfx.kfac`, ``ekfac``): ``½ ⟨δ, kfac_vp(fac, δ)⟩``, the
      Kronecker-factored ``F`` (exact for a single layer with a Gaussian likelihood and ``kind="exact"``).

    ``R`` is in the normalisation of ``F``: compare it with a :class:`~fisherfx.Damage` of the same ``Z``.

    Args:
        curvature: as above.
        delta: ``{name: [*P]}``, the perturbation (e.g. :attr:`Selection.delta`). For a diagonal or
            group curvature it must have every name of the curvature; further names are allowed where
            ``delta`` is zero. A product receives ``delta`` as it is.
        groups: the group spec of a group estimate (``None`` for a diagonal or a product).

    Returns:
        A 0-d float64 tensor.

    Raises:
        FisherError: a ``delta`` whose names or shapes differ from the curvature's (or nonzero where the
            curvature has no entry; for a K-FAC, names it does not cover), a curvature of none of these
            kinds, ``groups`` with a product, a product that returns other names or shapes than ``delta``.

    """
    where = "risk_score"
    if isinstance(curvature, (Estimate, Mapping)):
        terms = quadratic_terms(where, values_of(where, "curvature", curvature), delta, groups)
        return 0.5 * torch.stack([t.sum().cpu() for t in terms.values()]).sum()
    matvec = _matvec_of(curvature)
    if matvec is None:
        raise FisherError(f"{where}: curvature must be an Estimate, a {{name: tensor}} diagonal or group estimate, "
                          f"a KFAC, a callable v -> F v or an object with a matvec method, got "
                          f"{type(curvature).__name__}")
    if groups is not None:
        raise FisherError(f"{where}: groups apply to a group estimate, not to a product v -> F v")
    if not isinstance(delta, Mapping) or not delta:
        raise FisherError(f"{where}: delta must be a non-empty {{name: tensor}} dict, got {type(delta).__name__}")
    delta = dict(delta)
    product = matvec(delta)
    if not isinstance(product, Mapping):
        raise FisherError(f"{where}: curvature(delta) must return a {{name: tensor}} dict, got "
                          f"{type(product).__name__}")
    check_vector(where, product, delta, option="curvature(delta)", batched=False)
    return 0.5 * torch.stack([(delta[k].to(ACCUMULATE) * product[k].to(delta[k].device, ACCUMULATE)).sum().cpu()
                              for k in delta]).sum()


# --- sweeps ---------------------------------------------------------------------------------------

def _std(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _floats(where: str, option: str, values: Any, check: Callable[[str, Any], float]) -> list[float]:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise FisherError(f"{where}: {option} must be a sequence of numbers, got {type(values).__name__}")
    out = [check(where, v) for v in values]
    if not out:
        raise FisherError(f"{where}: {option} is empty")
    return out


def percolation_sweep(
    problem: Problem,
    params: Mapping[str, Tensor],
    batches: Any,
    importance: Estimate | Mapping[str, Tensor],
    groups: Groups,
    concentrations: Sequence[float],
    epsilons: Sequence[float],
    selects: Sequence[str] = ("top", "random", "bottom"),
    repeats: int = 5,
    curvature: Curvature | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    normalize: Normalize = "samples",
    **perturbation: Any,
) -> list[SweepRecord]:
    """Predicted risk against measured damage over concentrations, norms and selections.

    For every ``C`` in ``concentrations``, ``ε`` in ``epsilons`` and ``select`` in ``selects``, draws
    ``repeats`` perturbations :func:`concentrated_perturbation` ``(params, importance, groups, C, ε,
    generator, select, **perturbation)`` and records the mean and standard deviation over them of
    :func:`risk_score` and of :func:`perturbation_damage` on ``batches``. When nothing in a perturbation
    is random (``select`` top or bottom with a given direction dict) it is drawn once.

    The unperturbed model runs once per batch; its outputs are kept for the whole sweep while they fit
    in 256 MiB (recomputed per perturbation beyond that).

    Args:
        problem, params: as :func:`perturbation_damage`.
        batches: one batch or a list / iterable of batches (read once).
        importance, groups: as :func:`concentrated_perturbation`.
        concentrations: values ``C`` in ``(0, 1]``.
        epsilons: values ``ε ≥ 0``.
        selects: some of ``"top"``, ``"random"``, ``"bottom"``.
        repeats: perturbations per setting, ``≥ 1``.
        curvature: what :func:`risk_score` takes; default ``importance`` read as a group Fisher with
            ``groups`` (meaningful when it is one, in the normalisation ``normalize`` names).
        generator: seeds every draw, in the loop order ``C``, ``ε``, ``select``, repeat.
        progress: a tqdm bar (also off when stderr is not a terminal).
        normalize: ``Z`` of the damage: ``"samples"``, ``"tokens"`` or ``"none"``.
        **perturbation: ``scope``, ``relative``, ``score``, ``direction`` of
            :func:`concentrated_perturbation`.

    Returns:
        One :class:`SweepRecord` per setting, in the loop order; :func:`to_csv` writes them.

    Raises:
        FisherError: as :func:`concentrated_perturbation`, :func:`risk_score` and
            :func:`perturbation_damage`; empty ``concentrations`` or ``epsilons``; ``repeats < 1``;
            unknown keyword arguments.

    """
    from tqdm.auto import tqdm

    where = "percolation_sweep"
    cs = _floats(where, "concentrations", concentrations, _concentration)
    epss = _floats(where, "epsilons", epsilons, _epsilon)
    selects = list(selects) if not isinstance(selects, str) else [selects]
    for s in selects:
        choice(where, "selects", s, SELECTS)
    if not selects:
        raise FisherError(f"{where}: selects is empty; expected some of {list(SELECTS)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise FisherError(f"{where}: repeats must be an integer ≥ 1, got {repeats!r}")
    unknown = sorted(set(perturbation) - {"scope", "relative", "score", "direction"})
    if unknown:
        raise FisherError(f"{where}: unknown keyword arguments {unknown}; expected some of "
                          "['scope', 'relative', 'score', 'direction']")
    choice(where, "normalize", normalize, NORMALIZES)
    params = check_params(where, problem, params)
    runs, count = base_runs(where, problem, params, list(batches_of(batches)), normalize, keep=True)
    risk_args = (importance, groups) if curvature is None else (curvature, None)
    given = isinstance(perturbation.get("direction", "gaussian"), Mapping)
    draws = {s: 1 if given and s != "random" else repeats for s in selects}
    records = []
    with tqdm(total=len(cs) * len(epss) * sum(draws.values()), disable=None if progress else True,
              desc="percolation", leave=False) as bar:
        for c in cs:
            for eps in epss:
                for s in selects:
                    risks, losses, kls, k = [], [], [], 0
                    for _ in range(draws[s]):
                        new, sel = concentrated_perturbation(params, importance, groups, c, eps, generator=generator,
                                                             select=s, **perturbation)
                        risks.append(float(risk_score(risk_args[0], sel.delta, risk_args[1])))
                        damage = measured_damage(where, problem, params, new, runs, count)
                        losses.append(float(damage.loss_increase))
                        kls.append(float(damage.kl))
                        k = len(sel.chosen)
                        bar.update()
                    records.append(SweepRecord(c, eps, s, statistics.fmean(risks), statistics.fmean(losses),
                                               _std(losses), statistics.fmean(kls), _std(kls), _std(risks), k,
                                               draws[s]))
    return records


def to_csv(records: Sequence[NamedTuple], path: str | os.PathLike | None = None) -> str:
    """The records as CSV text (a header of the field names, one row per record); also written to
    ``path`` when given.

    Raises:
        FisherError: no records, or records of different kinds.

    """
    if not records:
        raise FisherError("to_csv: no records to write")
    fields = getattr(records[0], "_fields", None)
    if fields is None or any(getattr(r, "_fields", None) != fields for r in records):
        raise FisherError("to_csv: records must be NamedTuples of one kind (e.g. SweepRecord)")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows(tuple(r) for r in records)
    text = out.getvalue()
    if path is not None:
        with open(path, "w", newline="") as f:
            f.write(text)
    return text


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1  # ties share their mean rank
        i = j + 1
    return ranks


def risk_correlation(records: Sequence[SweepRecord], against: str = "kl_mean") -> float:
    """Spearman's rank correlation (Spearman 1904) between the records' ``risk`` and a measured field.

    .. math::
        ρ = \\operatorname{corr}(\\operatorname{rank}(R), \\operatorname{rank}(D))

    Pearson's correlation of the ranks, ties given their mean rank; NaN when either side is constant.

    Args:
        records: from :func:`percolation_sweep`.
        against: ``"kl_mean"`` or ``"loss_increase_mean"``.

    Raises:
        FisherError: fewer than two records, or an unknown field.

    """
    if against not in ("kl_mean", "loss_increase_mean"):
        raise FisherError(f"risk_correlation: against must be 'kl_mean' or 'loss_increase_mean', got {against!r}")
    if len(records) < 2:
        raise FisherError(f"risk_correlation: needs at least two records, got {len(records)}")
    a, b = _ranks([r.risk for r in records]), _ranks([getattr(r, against) for r in records])
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    var = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return cov / var if var > 0 else math.nan


__all__ = ["HasMatvec", "Matvec", "Selection", "SweepRecord", "concentrated_perturbation",
           "percolation_sweep", "risk_correlation", "risk_score", "to_csv"]
