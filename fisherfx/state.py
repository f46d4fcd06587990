"""Values that carry across batches and steps: estimates, EMA and running sums, all NamedTuples.

Pure arithmetic on values; no engine is imported here. Every update returns a new state and never
writes into its inputs.
"""

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._errors import FisherError

Values = dict[str, Tensor]


class Estimate(NamedTuple):
    """A Fisher estimate normalised by its count: ``value = (Σ contributions) / count``."""

    value: Values  # {name: tensor}, shaped like the parameter (or its group axes)
    count: Tensor  # shape=(), int64: the normaliser Z (samples, active tokens, or 1)


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
    batches. (Estimates with ``normalize="none"`` have count 1 each, so they are averaged.)
    """
    if not estimates:
        raise FisherError("combine: expected at least one estimate, got none")
    first = estimates[0]
    for other in estimates[1:]:
        check_like("combine", first.value, other.value, "first estimate")
    count = sum(e.count for e in estimates)
    value = {}
    for name, v in first.value.items():
        dtype = _acc_dtype(v)
        total = sum(e.value[name].to(dtype) * e.count.to(dtype) for e in estimates)
        value[name] = (total / count.to(dtype)).to(v.dtype)
    return Estimate(value, count)


def cast(estimate: Estimate, dtype: torch.dtype | None = None, device=None) -> Estimate:
    """The estimate stored as ``dtype`` (e.g. bf16) and/or on ``device`` (e.g. ``"cpu"``)."""
    value = {k: v.to(dtype=dtype or v.dtype, device=device or v.device) for k, v in estimate.value.items()}
    return Estimate(value, estimate.count.to(device or estimate.count.device))


# --- EMA ---------------------------------------------------------------------------------------

class EMAState(NamedTuple):
    """Exponential moving average of estimates (as ``optax.ema``)."""

    mean: Values  # m_k {name: tensor}, float32 (float64 if the estimate is)
    step: Tensor  # shape=(), int64: k, the number of updates
    decay: float  # β in (0, 1)


def ema_init(like: "Estimate | Mapping[str, Tensor]", decay: float = 0.99) -> EMAState:
    """``m_0 = 0``, step 0. ``like`` (an estimate or a ``{name: tensor}``) gives names, shapes,
    devices only.
    """
    if isinstance(decay, Tensor) and decay.numel() == 1:
        decay = decay.item()
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise FisherError(f"ema_init: decay must be a number in (0, 1), got {type(decay).__name__} {decay!r}")
    if not 0.0 < float(decay) < 1.0:
        raise FisherError(f"ema_init: decay must be in (0, 1), got {decay!r}")
    values = _names_shapes(like)
    mean = {k: torch.zeros(v.shape, dtype=_acc_dtype(v), device=v.device) for k, v in values.items()}
    return EMAState(mean, torch.zeros((), dtype=torch.int64), float(decay))


def ema_update(state: EMAState, estimate: "Estimate | Mapping[str, Tensor]") -> EMAState:
    """``m_k = β m_{k−1} + (1 − β) F_k``; returns a new state."""
    values = _names_shapes(estimate)
    check_like("ema_update", state.mean, values)
    beta = state.decay
    mean = {k: beta * m + (1.0 - beta) * values[k].to(m) for k, m in state.mean.items()}
    return EMAState(mean, state.step + 1, beta)


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


def sum_init(like: "Estimate | Mapping[str, Tensor]") -> SumState:
    """Zero sums with the names and shapes of ``like``."""
    values = _names_shapes(like)
    total = {k: torch.zeros(v.shape, dtype=_acc_dtype(v), device=v.device) for k, v in values.items()}
    return SumState(total, torch.zeros((), dtype=torch.int64))


def sum_update(state: SumState, estimate: Estimate) -> SumState:
    """Add ``count · value`` and ``count``; returns a new state."""
    if not isinstance(estimate, Estimate):
        raise FisherError(f"sum_update: expected an Estimate (value and count), got {type(estimate).__name__}")
    check_like("sum_update", state.total, estimate.value)
    total = {k: t + estimate.value[k].to(t) * estimate.count.to(t) for k, t in state.total.items()}
    return SumState(total, state.count + estimate.count.to(state.count.device))


def sum_value(state: SumState) -> Estimate:
    """The exact average ``Σ sums / Σ counts`` as an :class:`Estimate`."""
    if int(state.count) == 0:
        raise FisherError("sum_value: no estimate has been added yet (count 0)")
    return Estimate({k: t / state.count.to(t) for k, t in state.total.items()}, state.count)


__all__ = ["EMAState", "Estimate", "SumState", "cast", "combine", "ema_init", "ema_update", "ema_value",
           "sum_init", "sum_update", "sum_value"]
