"""Forgetting and merging between tasks with diagonal (or group) Fishers.

Each task ``A`` has its parameters ``θ_A`` and a Fisher ``F_A`` at them. The functions here read a
diagonal Fisher as an :class:`~fisherfx.Estimate` or a ``{name: tensor}`` dict, shaped like the
parameters (and, where ``groups`` are taken, a group estimate).

The Fisher to give them is the *average per-sample* Fisher of the task's data,
``F = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (empirical) or its expectation over the model's labels (``kind="mc"``,
``"exact"``), as :func:`~fisherfx.diag_fisher` returns with ``normalize="samples"``: squared
*per-sample* gradients, not the square of a minibatch-mean gradient (``1/B²`` of one sample's scale
plus cross terms) nor that of a summed gradient. See ``docs/forgetting.md``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._errors import FisherError
from ..groups import Groups, check_groups, reduce_groups, some_names
from ..state import Estimate
from .percolation import ACCUMULATE, quadratic_terms, values_of


class Overlap(NamedTuple):
    """What :func:`fisher_overlap` returns (0-d float64 tensors)."""

    total: Tensor  # over all parameters, each Fisher normalised by its total trace
    per_param: dict[str, Tensor]  # {name: ()}: each parameter's Fishers normalised by their own traces


class WeightedDamage(NamedTuple):
    """What :func:`fisher_weighted_damage` returns (float64 tensors)."""

    total: Tensor  # shape=(): ½ Σ_i F_ii δ_i²
    per_param: dict[str, Tensor]  # {name: ()} or, with groups, {name: [G...]}: the terms of the total
    normalized: Tensor  # shape=(): Σ F δ² / (mean(F) ‖δ‖²), 1 for a change that ignores the Fisher


def _same(where: str, a: Mapping[str, Tensor], b: Mapping[str, Tensor], names: tuple[str, str]) -> None:
    missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
    if missing or extra:
        raise FisherError(f"{where}: {names[0]} and {names[1]} must have the same names; missing from {names[1]} "
                          f"{missing}, not in {names[0]} {extra}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise FisherError(f"{where}: {names[0]}[{k!r}] has shape {tuple(a[k].shape)} but {names[1]}[{k!r}] "
                              f"{tuple(b[k].shape)}")


def _nonnegative(where: str, option: str, values: Mapping[str, Tensor]) -> None:
    for name, v in values.items():
        if bool((v < 0).any()):
            raise FisherError(f"{where}: {option}[{name!r}] has negative entries (down to {float(v.min()):g}); a "
                              "Fisher is positive semi-definite, its diagonal ≥ 0")


def _diagonal(where: str, option: str, fisher: Any) -> dict[str, Tensor]:
    values = values_of(where, option, fisher)
    _nonnegative(where, option, values)
    return {k: v.to(ACCUMULATE) for k, v in values.items()}


def _strength(where: str, value: Any) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < float("inf"):
        raise FisherError(f"{where}: strength must be a finite number ≥ 0, got {value!r}")
    return float(value)


def fisher_overlap(fa: Estimate | Mapping[str, Tensor], fb: Estimate | Mapping[str, Tensor],
                   groups: Groups | None = None) -> Overlap:
    """How much two tasks' Fishers share: ``1 − ½‖√F̂_a − √F̂_b‖²`` of the trace-normalised diagonals.

    .. math::
        F̂ = \\frac{F}{\\operatorname{tr} F}, \\qquad
        O(F_a, F_b) = 1 − \\tfrac12 \\big\\lVert \\sqrt{F̂_a} − \\sqrt{F̂_b} \\big\\rVert_2^2
                   = \\sum_i \\sqrt{F̂_{a,i} F̂_{b,i}}

    Kirkpatrick et al. (2017, "Overcoming catastrophic forgetting in neural networks", Fig. 3) measure
    task overlap as ``1 − d²`` with ``d`` the Fréchet distance of the normalised Fishers,
    ``d² = ½ tr(F̂_a + F̂_b − 2(F̂_a F̂_b)^{1/2})``; for diagonals this is the formula above (a
    Bhattacharyya coefficient of the two normalised diagonals). ``O`` lies in ``[0, 1]``: 1 exactly
    when ``F̂_a = F̂_b`` (a Fisher and any positive multiple of it), 0 when the supports are disjoint.
    It ignores the Fishers' scales.

    ``total`` normalises each Fisher by its trace over all parameters; ``per_param[name]`` by the
    trace of that parameter alone (so each lies in ``[0, 1]``; NaN where either trace is 0). With
    ``groups`` the diagonals are first summed per group (:func:`~fisherfx.reduce_groups`), comparing
    channel or head importances instead of entries (names without a group are compared entry by entry).

    Args:
        fa, fb: diagonal Fishers ``{name: [*P]}`` (or group estimates ``{name: [G...]}`` without
            ``groups``) with the same names and shapes, entries ``≥ 0``.
        groups: ``{name: Group | pattern}`` to sum over first, or ``None``.

    Returns:
        :class:`Overlap` ``(total, per_param)``.

    Raises:
        FisherError: different names or shapes, negative or non-finite entries, a zero total trace,
            a group pattern that does not fit.

    """
    where = "fisher_overlap"
    a, b = _diagonal(where, "fa", fa), _diagonal(where, "fb", fb)
    _same(where, a, b, ("fa", "fb"))
    if groups is not None:
        if not isinstance(groups, Mapping):
            raise FisherError(f"{where}: groups must be a {{name: Group | pattern}} dict or None")
        spec = check_groups({k: v for k, v in groups.items() if k in a}, a, where)
        a, b = ({**x, **reduce_groups(x, spec)} for x in (a, b))
    traces = {}
    for option, x in (("fa", a), ("fb", b)):
        traces[option] = torch.stack([v.sum().cpu() for v in x.values()]).sum()
        if float(traces[option]) == 0.0:
            raise FisherError(f"{where}: {option} is zero everywhere; its trace-normalised form is undefined")
    root = {k: (a[k] * b[k].to(a[k].device)).sqrt().sum().cpu() for k in a}  # Σ_i √(F_a,i F_b,i) per name
    total = torch.stack(list(root.values())).sum() / (traces["fa"] * traces["fb"]).sqrt()
    per_param = {k: root[k] / (a[k].sum().cpu() * b[k].sum().cpu()).sqrt() for k in a}
    return Overlap(total.clamp(max=1.0), {k: v.clamp(max=1.0) for k, v in per_param.items()})


def ewc_penalty(params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Estimate | Mapping[str, Tensor],
                strength: float = 1.0) -> Tensor:
    """Elastic weight consolidation (Kirkpatrick et al. 2017): ``(λ/2) Σ_i F_i (θ_i − θ*_i)²``.

    .. math::
        Ω(θ) = \\frac{λ}{2} \\sum_i F_{A,i} (θ_i − θ^*_{A,i})^2

    the quadratic (diagonal Laplace) approximation of task ``A``'s negative log-posterior around its
    solution ``θ*_A``, to add to task ``B``'s loss. With ``F_A`` the average per-sample Fisher
    (``normalize="samples"``) and ``B``'s loss a mean over samples, ``λ = N_A`` (task ``A``'s number
    of samples) is the Laplace approximation proper; in practice ``λ`` is tuned.

    Differentiable in ``params`` (``torch.func.grad``, ``backward``): ``∇_θ Ω = λ F_A ⊙ (θ − θ*_A)``.
    ``anchor`` and ``fisher`` are constants (detached).

    Args:
        params: ``θ``, ``{name: [*P]}``; every name of ``fisher`` must be there (further names, e.g.
            all of ``dict(model.named_parameters())``, are ignored).
        anchor: ``θ*_A`` with (at least) the names of ``fisher``.
        fisher: ``F_A``, a diagonal :class:`~fisherfx.Estimate` or ``{name: [*P]}``, entries ``≥ 0``.
        strength: ``λ ≥ 0``.

    Returns:
        A 0-d tensor in the promoted dtype of ``params`` and ``fisher``, on the device of ``params``.

    Raises:
        FisherError: a name of ``fisher`` missing from ``params`` or ``anchor``; shapes that differ;
            negative or non-finite Fisher entries; a negative ``strength``.

    """
    where = "ewc_penalty"
    lam = _strength(where, strength)
    f = values_of(where, "fisher", fisher)
    _nonnegative(where, "fisher", f)
    for option, x in (("params", params), ("anchor", anchor)):
        if not isinstance(x, Mapping):
            raise FisherError(f"{where}: {option} must be a {{name: tensor}} dict, got {type(x).__name__}")
        missing = [k for k in f if k not in x]
        if missing:
            raise FisherError(f"{where}: {option} lacks {missing}, which fisher has; {option} has {some_names(x)}")
        for k in f:
            if not isinstance(x[k], Tensor) or x[k].shape != f[k].shape:
                got = tuple(x[k].shape) if isinstance(x[k], Tensor) else type(x[k]).__name__
                raise FisherError(f"{where}: {option}[{k!r}] has shape {got} but fisher[{k!r}] {tuple(f[k].shape)}")
    terms = [(f[k].detach().to(params[k].device) * (params[k] - anchor[k].detach().to(params[k].device)) ** 2).sum()
             for k in f]
    return 0.5 * lam * sum(terms[1:], terms[0])


def fisher_weighted_damage(fisher_a: Estimate | Mapping[str, Tensor], delta: Mapping[str, Tensor],
                           fisher_b: Estimate | Mapping[str, Tensor] | None = None, symmetric: bool = False,
                           groups: Groups | None = None) -> WeightedDamage:
    """The loss increase on task ``A`` predicted for a parameter change ``δ``: ``½ Σ_i F_{A,i} δ_i²``.

    .. math::
        D_A(δ) = \\tfrac12 \\sum_i F_{A,i} \\, δ_i^2, \\qquad
        \\tilde D_A(δ) = \\frac{\\sum_i F_{A,i} δ_i^2}{\\bar F_A \\lVert δ \\rVert^2}, \\quad
        \\bar F_A = \\frac{1}{D} \\sum_i F_{A,i}

    with ``δ`` e.g. ``θ_after_B − θ_A``, the change training on task ``B`` made. ``D_A`` is the
    second-order term of task ``A``'s loss at its minimum ``θ_A`` (the diagonal approximation: the
    off-diagonal terms of ``F_A`` are dropped), in ``F_A``'s normalisation (per sample for
    ``normalize="samples"``); it is the quantity EWC penalises (:func:`ewc_penalty` with ``λ = 1``).
    The *normalised* form ``D̃_A`` divides by the damage of a change of the same norm that ignores
    ``F_A`` (``½ F̄_A ‖δ‖²``, e.g. isotropic noise in expectation): 1 when ``δ`` falls on ``A``'s
    entries no more than on the others, above 1 when it concentrates on ``A``'s important entries,
    at most ``D · max_i F̂_{A,i}``. It is scale-free in both ``F_A`` and ``δ``.

    ``symmetric=True`` averages both tasks' predictions, ``½(D_A + D_B)`` (and ``½(D̃_A + D̃_B)``),
    a symmetric interference score for a change that both tasks undergo (e.g. moving to a merged
    model). With ``groups``, each Fisher value is either parameter-shaped (a diagonal; the terms are
    summed per group) or a group estimate ``F_g`` (entries taken as equal, ``F_ii ≈ F_g/|g|``, an
    approximation), and ``per_param`` holds the terms per group; ``D`` is then the number of entries
    all the same.

    Args:
        fisher_a: ``F_A``, a diagonal :class:`~fisherfx.Estimate` or ``{name: [*P]}`` (or a group
            estimate with ``groups``), entries ``≥ 0``.
        delta: ``{name: [*P]}`` with every name of ``fisher_a`` (further names only where zero).
        fisher_b: ``F_B`` like ``fisher_a``, for ``symmetric=True`` (and only then).
        symmetric: average the predictions for ``A`` and ``B``.
        groups: the group spec of group estimates, or a grouping of the terms.

    Returns:
        :class:`WeightedDamage` ``(total, per_param, normalized)``: ``per_param`` ``{name: ()}`` or,
        with ``groups``, ``{name: [G...]}``, summing to ``total``; ``normalized`` is NaN for ``δ = 0``.

    Raises:
        FisherError: ``delta`` whose names or shapes differ from the Fisher's; negative or non-finite
            Fisher entries; ``symmetric=True`` without ``fisher_b``, or ``fisher_b`` without
            ``symmetric=True``; ``fisher_b`` with other names than ``fisher_a``; a Fisher that is zero
            everywhere (no normalised form).

    """
    where = "fisher_weighted_damage"
    if not isinstance(symmetric, bool):
        raise FisherError(f"{where}: symmetric must be True or False, got {symmetric!r}")
    if symmetric and fisher_b is None:
        raise FisherError(f"{where}: symmetric=True averages two tasks' predictions; pass fisher_b")
    if fisher_b is not None and not symmetric:
        raise FisherError(f"{where}: fisher_b is used only with symmetric=True (for task B alone, pass it as "
                          "fisher_a)")
    fishers = [_diagonal(where, "fisher_a", fisher_a)]
    if fisher_b is not None:
        fishers.append(_diagonal(where, "fisher_b", fisher_b))
        _same(where, fishers[0], fishers[1], ("fisher_a", "fisher_b"))
    parts = []
    for option, f in zip(("fisher_a", "fisher_b"), fishers):
        terms = quadratic_terms(where, f, delta, groups, option=option)
        halves = {k: 0.5 * (t if groups is not None else t.sum()).cpu() for k, t in terms.items()}
        total = torch.stack([h.sum() for h in halves.values()]).sum()
        norm2 = torch.stack([(delta[k].to(ACCUMULATE) ** 2).sum().cpu() for k in f]).sum()
        # F̄ = Σ_i F_ii / D: a group value F_g is the sum of its entries' F_ii, so the sum of values serves both
        mean = torch.stack([v.sum().cpu() for v in f.values()]).sum() / sum(delta[k].numel() for k in f)
        if float(mean) == 0.0:
            raise FisherError(f"{where}: {option} is zero everywhere; the normalised damage is undefined")
        parts.append((total, halves, 2 * total / (mean * norm2)))
    if len(parts) == 1:
        return WeightedDamage(*parts[0][:2], parts[0][2])
    (ta, ha, na), (tb, hb, nb) = parts
    return WeightedDamage(0.5 * (ta + tb), {k: 0.5 * (ha[k] + hb[k]) for k in ha}, 0.5 * (na + nb))


def fisher_merge(params_list: Sequence[Mapping[str, Tensor]], fishers: Sequence[Estimate | Mapping[str, Tensor]],
                 eps: float = 1e-8, weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Fisher-weighted averaging of models (Matena & Raffel 2022, "Merging models with Fisher-weighted
    averaging"): per entry ``θ = Σ_m λ_m F_m θ_m / Σ_m λ_m F_m``.

    .. math::
        θ_i = \\frac{\\sum_m λ_m (F_{m,i} + ε) \\, θ_{m,i}}{\\sum_m λ_m (F_{m,i} + ε)}

    the maximiser of ``Σ_m λ_m log N(θ; θ_m, (F_m + ε)^{-1})``, the product of the models' diagonal
    Laplace posteriors. ``ε > 0`` keeps entries where every Fisher is zero defined (they get the
    ``λ``-weighted plain average) and is negligible elsewhere when small next to the Fishers. The
    weights enter through differences from the first model, ``θ = θ_1 + Σ_m w_m (θ_m − θ_1)``, so equal
    models give exactly that model back. Computed in float64, stored in each parameter's dtype.

    The Fishers are per-sample averages (``normalize="samples"``), so models trained on different
    amounts of data weigh equally unless ``weights`` say otherwise (Matena & Raffel's ``λ_m``; use
    ``N_m`` for the summed-loss Laplace posteriors).

    Args:
        params_list: the models ``θ_m``, ``{name: [*P]}`` with the same names and shapes.
        fishers: their diagonal Fishers ``F_m`` (:class:`~fisherfx.Estimate` or ``{name: [*P]}``), one
            per model, with the models' names and shapes, entries ``≥ 0``.
        eps: ``ε > 0``.
        weights: ``λ_m > 0``, one per model (default all 1).

    Returns:
        ``{name: [*P]}``, the merged parameters, in the names' order of the first model.

    Raises:
        FisherError: no models, or a different number of Fishers or weights; names or shapes that
            differ; negative or non-finite Fisher entries; ``eps`` or a weight not a finite number ``> 0``.

    """
    where = "fisher_merge"
    if isinstance(params_list, Mapping) or not isinstance(params_list, Sequence) or not params_list:
        raise FisherError(f"{where}: params_list must be a non-empty list of {{name: tensor}} dicts")
    if isinstance(fishers, (Mapping, Estimate)) or not isinstance(fishers, Sequence) or len(fishers) != len(
            params_list):
        got = len(fishers) if isinstance(fishers, Sequence) and not isinstance(fishers, Estimate) else "not a list"
        raise FisherError(f"{where}: fishers must be a list with one Fisher per model ({len(params_list)}), got {got}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < float(eps) < float("inf"):
        raise FisherError(f"{where}: eps must be a finite number > 0, got {eps!r}")
    lams = [1.0] * len(params_list) if weights is None else list(weights)
    if len(lams) != len(params_list) or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < float(w) < float("inf") for w in lams):
        raise FisherError(f"{where}: weights must be {len(params_list)} finite numbers > 0, got {weights!r}")
    models = []
    for m, p in enumerate(params_list):
        if not isinstance(p, Mapping) or not p:
            raise FisherError(f"{where}: params_list[{m}] must be a non-empty {{name: tensor}} dict")
        models.append(dict(p))
    fs = [_diagonal(where, f"fishers[{m}]", f) for m, f in enumerate(fishers)]
    for m in range(len(models)):
        _same(where, models[0], models[m], ("params_list[0]", f"params_list[{m}]"))
        _same(where, models[0], fs[m], ("params_list[0]", f"fishers[{m}]"))
    merged = {}
    for name, first in models[0].items():
        base = first.to(ACCUMULATE)
        w = [lam * (f[name].to(base.device) + eps) for lam, f in zip(lams, fs)]
        total = torch.stack(w).sum(0)
        step = sum(wm / total * (p[name].to(device=base.device, dtype=ACCUMULATE) - base)
                   for wm, p in zip(w[1:], models[1:]))
        merged[name] = (base + step).to(first.dtype) if len(models) > 1 else first.clone()
    return merged


__all__ = ["Overlap", "WeightedDamage", "ewc_penalty", "fisher_merge", "fisher_overlap", "fisher_weighted_damage"]
