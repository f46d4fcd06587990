"""Values that carry across batches and steps: estimates, EMA and running sums, all NamedTuples.

Pure arithmetic on values; no engine is imported here. Every update returns a new state and never
writes into its inputs.

Every estimate and state carries its :class:`Provenance`, the options that made it. Combining
(:func:`combine`, :func:`ema_update`, :func:`sum_update`, and ``all_reduce``) checks that the parts
measure the same thing: the same ``quantity``, ``kind``, ``per``, ``normalize``, group spec and
grouped parameters' shapes, or raises a :class:`FisherError` naming the field and both values. A
field that is ``"unknown"`` (an ``Estimate(value, count)`` built by hand) is compatible with anything
and the result takes the known value. ``n_samples`` and ``dtype`` are recorded, not checked: parts
that differ in them give ``"mixed"``.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._errors import FisherError
from .groups import Group, as_group

Values = dict[str, Tensor]

UNKNOWN = "unknown"  # a provenance field nobody recorded: compatible with any value
MIXED = "mixed"  # a recorded-only field (n_samples, dtype) on which combined parts differ


class Provenance(NamedTuple):
    """What an estimate measures and how: the options of the estimator that made it.

    ``quantity`` is ``"diagonal"`` (:func:`~fisherfx.diag_fisher`), ``"group"``
    (:func:`~fisherfx.group_fisher`) or ``"mask_importance"``; ``kind``, ``per``, ``normalize`` and
    ``n_samples`` are the estimator's options (``n_samples`` is 1 unless ``kind="mc"``), ``dtype``
    the accumulation dtype's name (``"float32"``); ``groups`` the group spec ``{name: Group}`` of a
    group or mask-importance estimate, ``None`` for per-entry values; ``shapes`` the shapes
    ``{name: (sizes)}`` of the parameters grouped (a group value alone does not tell them), ``None``
    for per-entry values (shaped like their parameters). Every field defaults to ``"unknown"``.
    """

    quantity: str = UNKNOWN
    kind: str = UNKNOWN
    per: str = UNKNOWN
    normalize: str = UNKNOWN
    n_samples: int | str = UNKNOWN
    dtype: str = UNKNOWN
    groups: "Mapping[str, Group] | None | str" = UNKNOWN  # never mutated (a NamedTuple default is shared)
    shapes: "Mapping[str, tuple[int, ...]] | None | str" = UNKNOWN


NO_PROVENANCE = Provenance()
_CHECKED = ("quantity", "kind", "per", "normalize")  # then groups, shapes; n_samples and dtype are recorded only


def provenance(quantity: str, *, kind: str, per: str, normalize: str, n_samples: int, dtype: torch.dtype,
               groups: "Mapping[str, Group | str] | None" = None,
               params: Mapping[str, Tensor] | None = None) -> Provenance:
    """The provenance of an estimator's result, in canonical form (dtype by name, groups as :class:`Group`);
    ``params`` gives the shapes of the grouped parameters.
    """
    spec = None if groups is None else {name: as_group(g) for name, g in groups.items()}
    shapes = None if groups is None else {name: tuple(params[name].shape) for name in groups} if params else UNKNOWN
    return Provenance(quantity, kind, per, normalize, int(n_samples) if kind == "mc" else 1,
                      str(dtype).removeprefix("torch."), spec, shapes)


def _spec(groups: Any) -> Any:
    return groups if groups is None or isinstance(groups, str) else {k: as_group(g) for k, g in groups.items()}


def _show(group: Group) -> str:
    return f"{group.pattern!r}" + (f" with {dict(group.sizes)}" if group.sizes else "")


def merge_provenance(where: str, have: Provenance, got: Provenance, what: tuple[str, str] = ("one estimate",
                     "another")) -> Provenance:
    """The provenance of ``have`` and ``got`` combined, or a FisherError naming the field that differs.

    ``what`` names the two sides in the message (``("the state", "the estimate")``).
    """
    have, got = have or NO_PROVENANCE, got or NO_PROVENANCE
    out = {}
    for field in _CHECKED:
        a, b = getattr(have, field), getattr(got, field)
        if a != UNKNOWN and b != UNKNOWN and a != b:
            raise FisherError(f"{where}: cannot mix estimates of different {field}: {what[0]}: {field}={a!r}; "
                              f"{what[1]}: {field}={b!r}")
        out[field] = b if a == UNKNOWN else a
    ga, gb = _spec(have.groups), _spec(got.groups)
    if UNKNOWN not in (ga, gb) and ga != gb:
        if ga is None or gb is None:
            grouped, entries = (what[0], what[1]) if gb is None else (what[1], what[0])
            raise FisherError(f"{where}: cannot mix estimates of group values and per-entry values: {grouped}: a "
                              f"group spec; {entries}: groups=None")
        name = next(k for k in sorted({*ga, *gb}) if ga.get(k) != gb.get(k))
        show = [_show(g[name]) if name in g else "no group" for g in (ga, gb)]
        raise FisherError(f"{where}: cannot mix estimates of different group specs: for {name!r}, {what[0]}: "
                          f"{show[0]}; {what[1]}: {show[1]}")
    out["groups"] = gb if isinstance(ga, str) else ga
    sa, sb = have.shapes, got.shapes
    if isinstance(sa, Mapping) and isinstance(sb, Mapping) and sa != sb:
        name = next(k for k in sorted({*sa, *sb}) if sa.get(k) != sb.get(k))
        raise FisherError(f"{where}: cannot mix estimates of parameters of different shapes: {name!r} has shape "
                          f"{sa.get(name)} in {what[0]}, {sb.get(name)} in {what[1]}")
    out["shapes"] = sb if isinstance(sa, str) else sa
    for field in ("n_samples", "dtype"):
        a, b = getattr(have, field), getattr(got, field)
        out[field] = b if a == UNKNOWN else a if b in (UNKNOWN, a) else MIXED
    return Provenance(**out)


class Estimate(NamedTuple):
    """A Fisher estimate normalised by its count: ``value = (Σ contributions) / count``.

    ``Estimate(value, count)`` builds one of unknown provenance; the estimators fill ``provenance``.
    """

    value: Values  # {name: tensor}, shaped like the parameter (or its group axes)
    count: Tensor  # shape=(), int64: the normaliser Z (samples, active tokens, or 1)
    provenance: Provenance = NO_PROVENANCE  # what the value measures (kind, per, normalize, groups, ...)


def _describe(values: Mapping[str, Tensor]) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in values.items()) + "}"


def check_like(where: str, have: Mapping[str, Tensor], got: Mapping[str, Tensor], what: str = "state") -> None:
    """Raise unless ``got`` has the names and shapes of ``have``, naming the differences."""
    missing, extra = sorted(set(have) - set(got)), sorted(set(got) - set(have))
    if missing or extra:
        raise FisherError(f"{where}: {what} and estimate have different parameters: missing from the "
                          f"estimate {missing}, not in the {what} {extra}")
    for name in have:
        if have[name].shape != got[name].shape:
            raise FisherError(f"{where}: shape mismatch for {name!r}: {what} has "
                              f"{tuple(have[name].shape)}, estimate has {tuple(got[name].shape)}")


def _names_shapes(like: "Estimate | Mapping[str, Tensor]") -> Values:
    values = like.value if isinstance(like, Estimate) else like
    if not isinstance(values, Mapping):
        raise FisherError(f"expected an Estimate or a {{name: tensor}} dict, got {type(like).__name__}")
    return dict(values)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --- estimates ---------------------------------------------------------------------------------

def combine(estimates: Sequence[Estimate]) -> Estimate:
    """Exact count-weighted combination: ``(Σ_b count_b · value_b) / Σ_b count_b``.

    For estimates normalised over samples or tokens this equals the estimate of the concatenated
    batches. (Estimates with ``normalize="none"`` have count 1 each, so they are averaged.) A part of
    count 0 (an empty shard) contributes nothing.

    Raises:
        FisherError: no estimate, different names or shapes, provenances that do not mix (see the
            module docstring), or a total count of 0.

    """
    if not estimates:
        raise FisherError("combine: expected at least one estimate, got none")
    first = estimates[0]
    prov = first.provenance
    for i, other in enumerate(estimates[1:], start=1):
        check_like("combine", first.value, other.value, "first estimate")
        before = "estimate 0" if i == 1 else f"estimates 0 to {i - 1}"
        prov = merge_provenance("combine", prov, other.provenance, (before, f"estimate {i}"))
    count = sum(e.count for e in estimates)
    if int(count) == 0:
        raise FisherError("combine: every estimate has count 0; there is nothing to average")
    value = {}
    for name, v in first.value.items():
        dtype = _acc_dtype(v)
        total = sum(e.value[name].to(dtype) * e.count.to(dtype) for e in estimates)
        value[name] = (total / count.to(dtype)).to(v.dtype)
    return Estimate(value, count, prov)


def cast(estimate: Estimate, dtype: torch.dtype | None = None, device=None) -> Estimate:
    """The estimate stored as ``dtype`` (e.g. bf16) and/or on ``device`` (e.g. ``"cpu"``); the provenance
    (which records the accumulation dtype) is kept.
    """
    value = {k: v.to(dtype=dtype or v.dtype, device=device or v.device) for k, v in estimate.value.items()}
    return Estimate(value, estimate.count.to(device or estimate.count.device), estimate.provenance)


# --- EMA ---------------------------------------------------------------------------------------

class EMAState(NamedTuple):
    """Exponential moving average of estimates (as ``optax.ema``)."""

    mean: Values  # m_k {name: tensor}, float32 (float64 if the estimate is)
    step: Tensor  # shape=(), int64: k, the number of updates
    decay: float  # β in (0, 1)
    provenance: Provenance = NO_PROVENANCE  # of the estimates averaged


def _provenance_of(like: Any) -> Provenance:
    return like.provenance if isinstance(like, Estimate) else NO_PROVENANCE


def _update_provenance(where: str, state: Any, estimate: Any) -> Provenance:
    return merge_provenance(where, state.provenance, _provenance_of(estimate), ("the state", "the estimate"))


def _check_counted(where: str, estimate: Any) -> None:
    if isinstance(estimate, Estimate) and int(estimate.count) == 0:
        raise FisherError(f"{where}: the estimate has count 0 (no data, e.g. an empty shard); its value is no "
                          "estimate. Skip it, or reduce it with the other ranks' estimates first (all_reduce)")


def ema_init(like: "Estimate | Mapping[str, Tensor]", decay: float = 0.99) -> EMAState:
    """``m_0 = 0``, step 0. ``like`` (an estimate or a ``{name: tensor}``) gives names, shapes,
    devices only, and an estimate's provenance: the state then accepts only estimates of that kind.
    """
    if isinstance(decay, Tensor) and decay.numel() == 1:
        decay = decay.item()
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise FisherError(f"ema_init: decay must be a number in (0, 1), got {type(decay).__name__} {decay!r}")
    if not 0.0 < float(decay) < 1.0:
        raise FisherError(f"ema_init: decay must be in (0, 1), got {decay!r}")
    values = _names_shapes(like)
    mean = {k: torch.zeros(v.shape, dtype=_acc_dtype(v), device=v.device) for k, v in values.items()}
    return EMAState(mean, torch.zeros((), dtype=torch.int64), float(decay), _provenance_of(like))


def ema_update(state: EMAState, estimate: "Estimate | Mapping[str, Tensor]") -> EMAState:
    """``m_k = β m_{k−1} + (1 − β) F_k``; returns a new state.

    Raises:
        FisherError: other names or shapes than the state's, an estimate whose provenance does not mix
            with the state's (another kind, per, normalize or group spec), or one of count 0.

    """
    values = _names_shapes(estimate)
    check_like("ema_update", state.mean, values)
    prov = _update_provenance("ema_update", state, estimate)
    _check_counted("ema_update", estimate)
    beta = state.decay
    mean = {k: beta * m + (1.0 - beta) * values[k].to(m) for k, m in state.mean.items()}
    return EMAState(mean, state.step + 1, beta, prov)


def ema_value(state: EMAState, bias_corrected: bool = True) -> Values:
    """``m_k / (1 − β^k)`` (or ``m_k``); the correction is computed in float64."""
    k = int(state.step)
    if k == 0:
        raise FisherError("ema_value: the EMA has had no update yet (step 0); call ema_update first")
    if not bias_corrected:
        return {name: m.clone() for name, m in state.mean.items()}  # the state stays untouched
    correction = 1.0 - float(state.decay) ** k
    return {name: m / correction for name, m in state.mean.items()}


# --- running sums ------------------------------------------------------------------------------

class SumState(NamedTuple):
    """Running sums for one exact average over many batches."""

    total: Values  # Σ_b count_b · value_b, float32 (float64 if the estimate is)
    count: Tensor  # shape=(), int64: Σ_b count_b
    provenance: Provenance = NO_PROVENANCE  # of the estimates summed


def sum_init(like: "Estimate | Mapping[str, Tensor]") -> SumState:
    """Zero sums with the names and shapes of ``like`` (and an estimate's provenance, as :func:`ema_init`)."""
    values = _names_shapes(like)
    total = {k: torch.zeros(v.shape, dtype=_acc_dtype(v), device=v.device) for k, v in values.items()}
    return SumState(total, torch.zeros((), dtype=torch.int64), _provenance_of(like))


def sum_update(state: SumState, estimate: Estimate) -> SumState:
    """Add ``count · value`` and ``count``; returns a new state. An estimate of count 0 adds nothing.

    Raises:
        FisherError: not an :class:`Estimate`, other names or shapes than the state's, or a provenance
            that does not mix with the state's.

    """
    if not isinstance(estimate, Estimate):
        raise FisherError(f"sum_update: expected an Estimate (value and count), got {type(estimate).__name__}")
    check_like("sum_update", state.total, estimate.value)
    prov = _update_provenance("sum_update", state, estimate)
    total = {k: t + estimate.value[k].to(t) * estimate.count.to(t) for k, t in state.total.items()}
    return SumState(total, state.count + estimate.count.to(state.count.device), prov)


def sum_value(state: SumState) -> Estimate:
    """The exact average ``Σ sums / Σ counts`` as an :class:`Estimate` (with the state's provenance)."""
    if int(state.count) == 0:
        raise FisherError("sum_value: no estimate has been added yet (count 0)")
    return Estimate({k: t / state.count.to(t) for k, t in state.total.items()}, state.count, state.provenance)


__all__ = ["EMAState", "Estimate", "Provenance", "SumState", "cast", "combine", "ema_init", "ema_update",
           "ema_value", "sum_init", "sum_update", "sum_value"]
