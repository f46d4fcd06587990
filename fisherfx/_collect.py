"""Collecting a Fisher estimate over many batches: a running sum (exact) or an EMA, with budgets and an
adaptive stop on the standard error.

The running sum of ``Z_b · F_b`` and ``Z_b`` gives ``Σ_b Z_b F_b / Σ_b Z_b``, which for
``normalize="samples"`` or ``"tokens"`` *is* the estimate of the concatenated batches (with ``"none"``,
``Z_b = 1``: the mean over batches of each batch's sum, as :func:`~fisherfx.combine`).

The standard error treats the batches as independent draws (of data and, for ``kind="mc"``, of labels)
and the result as a ratio estimator: with batch sums ``s_b = Z_b t_b`` of a value ``t`` and
``T = Σ s_b / Σ Z_b``,

.. math::
    \\operatorname{se}(T)^2 = \\frac{B}{B - 1} \\, \\frac{\\sum_b (s_b - T Z_b)^2}{(\\sum_b Z_b)^2}

(for equal ``Z_b`` the usual ``s / √B`` of the batch means). The relative error is ``se(T) / |T|`` of the
trace (``Σ`` of all values) or, with ``rtol_of="groups"``, the largest over every group's value.

The module is named ``_collect`` so that the function :func:`collect` does not shadow it in ``fisherfx``.
"""

import inspect
import math
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from . import fisher
from ._errors import FisherError
from .groups import Groups, check_groups, reduce_groups
from .problems import Problem
from .state import EMAState, Estimate, cast, ema_init, ema_update, provenance, sum_init, sum_update, sum_value

RTOL_OF = ("trace", "groups")


class Collected(NamedTuple):
    """What :func:`collect` returns: the Fisher and how it was reached."""

    fisher: "Estimate | EMAState"  # the exact average over the batches, or with decay the EMA state
    batches: int  # batches used
    samples: int  # rows (samples) of those batches
    error: float | None  # relative standard error reached (trace, or the largest group's); None below 2 batches
    converged: bool | None  # with rtol: whether error <= rtol was reached; None without rtol


class _Moments(NamedTuple):
    """Float64 sums for the ratio estimator's standard error: ``Σ s``, ``Σ s²``, ``Σ s Z``, ``Σ Z``, ``Σ Z²``."""

    s: Tensor
    ss: Tensor
    sz: Tensor
    z: float
    zz: float
    b: int

    def add(self, s: Tensor, z: float) -> "_Moments":
        return _Moments(self.s + s, self.ss + s * s, self.sz + s * z, self.z + z, self.zz + z * z, self.b + 1)

    def relative_error(self) -> float | None:
        if self.b < 2 or self.z == 0:
            return None
        t = self.s / self.z
        q = (self.ss - 2 * t * self.sz + t * t * self.zz).clamp_min(0)  # Σ (s_b − T Z_b)²
        se = (self.b / (self.b - 1) * q).sqrt() / self.z
        rel = torch.where(t == 0, torch.zeros_like(se), se / t.abs())  # a value 0 in every batch: exact
        return float(rel.max())


def _moments(s: Tensor) -> _Moments:
    zero = torch.zeros_like(s)
    return _Moments(zero, zero, zero, 0.0, 0.0, 0)


def _batch_sums(est: Estimate, rtol_of: str) -> Tensor:
    """``Z_b · t_b`` in float64: the trace (0-d), or every group's value (1-D)."""
    z = float(est.count)
    if rtol_of == "trace":
        return z * torch.stack([v.double().sum().cpu() for v in est.value.values()]).sum()
    return z * torch.cat([v.double().reshape(-1).cpu() for v in est.value.values()])


def _defaults() -> dict[str, Any]:
    """The estimators' option defaults (one source: the signature of the function they all call)."""
    return {k: p.default for k, p in inspect.signature(fisher._estimate).parameters.items()
            if k in fisher.OPTIONS}


def _empty(params: Mapping[str, Tensor], groups: dict | None, options: dict[str, Any]) -> Estimate:
    """The zero-count estimate of a shard with no batch: zeros of the right names and shapes, count 0."""
    o = {**_defaults(), **options}
    dtype = o["dtype"]
    zeros = {k: torch.zeros(p.shape, dtype=dtype, device=p.device) for k, p in params.items()}
    value = zeros if groups is None else reduce_groups(zeros, groups)
    made = provenance("diagonal" if groups is None else "group", kind=o["kind"], per=o["per"],
                      normalize=o["normalize"], n_samples=o["n_samples"], dtype=dtype, groups=groups, params=params)
    return Estimate(value, torch.zeros((), dtype=torch.int64), made)


def _progress_bar(progress: bool | None, batches: Any, max_batches: int | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm import tqdm  # only when shown

    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(total=total, desc="fisher", unit="batch", file=sys.stderr, dynamic_ncols=True)


def collect(
    problem: Problem,
    params: Mapping[str, Tensor],
    batches: Iterable[Any],
    *,
    groups: Groups | None = None,
    decay: float | None = None,
    max_batches: int | None = None,
    progress: bool | None = None,
    rtol: float | None = None,
    max_samples: int | None = None,
    rtol_of: Literal["trace", "groups"] = "trace",
    min_batches: int = 10,
    **options: Any,
) -> Collected:
    """The diagonal (or, with ``groups``, the group) Fisher over an iterable of batches.

    Without ``decay``: the running sum, ``F = Σ_b Z_b F_b / Σ_b Z_b``, equal to the estimate of the
    concatenated batches (``normalize="samples"`` or ``"tokens"``). With ``decay``: the EMA
    ``m_k = β m_{k−1} + (1 − β) F_k`` of :func:`~fisherfx.ema_update`.

    Batches are drawn until the iterable ends, ``max_batches`` batches or ``max_samples`` rows have been
    used (the last batch whole), or, with ``rtol``, the relative standard error (module docstring) is at
    most ``rtol`` after at least ``min_batches`` batches. Each new batch brings new MC draws
    (``kind="mc"`` with a ``generator``), so the error covers both data and label sampling. No batch is
    drawn from the iterable beyond the one that meets a budget.

    Args:
        problem, params: as :func:`~fisherfx.diag_fisher`.
        batches: an iterable of batches as ``problem`` reads them (a DataLoader, a list, a generator).
        groups: a group spec: :func:`~fisherfx.group_fisher` instead of :func:`~fisherfx.diag_fisher`.
        decay: ``β`` in (0, 1): an EMA instead of the exact average (no ``rtol`` then).
        max_batches: at most this many batches.
        progress: a tqdm progress bar on stderr; default: when stderr is a terminal.
        rtol: stop once the relative standard error is at most this.
        max_samples: stop once this many rows have been used.
        rtol_of: ``"trace"`` (the sum of all values) or ``"groups"`` (every group's value; needs ``groups``).
        min_batches: with ``rtol``, batches before the error is trusted (≥ 2). The error of ``B`` batches
            is itself uncertain, about ``1 / √(2(B − 1))`` relative for well-behaved data; with 3 batches
            it is below half the true error one time in five and the run stops too early, with 10
            about one time in eighty.
        **options: the estimator's options (``kind``, ``n_samples``, ``generator``, ``per``, ``normalize``,
            ``engine``, ``dtype``, ``chunk_size``, ``storage_dtype``, ``device``). The sum is kept in the
            accumulation ``dtype``, and ``storage_dtype`` / ``device`` apply to the final estimate.

    Returns:
        :class:`Collected` ``(fisher, batches, samples, error, converged)``: ``fisher`` the
        :class:`~fisherfx.Estimate` (with provenance) or the :class:`~fisherfx.EMAState`. An empty
        iterable gives a zero-count estimate (zeros, count 0) that adds nothing in
        :func:`~fisherfx.combine` or ``all_reduce``: an empty shard; and with ``decay``, the state at step 0.

    Raises:
        FisherError: bad options, ``rtol`` with ``decay``, ``rtol_of="groups"`` without groups, and what the
            estimator raises for a batch (prefixed with the batch's index).

    """
    where = "collect"
    unknown = sorted(set(options) - set(fisher.OPTIONS))
    if unknown:
        raise FisherError(f"{where}: unknown options {unknown}; expected some of {list(fisher.OPTIONS)}")
    for name, value in (("max_batches", max_batches), ("max_samples", max_samples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise FisherError(f"{where}: {name} must be a positive int or None, got {value!r}")
    if rtol is not None and (not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not rtol > 0):
        raise FisherError(f"{where}: rtol must be a positive number or None, got {rtol!r}")
    if not isinstance(min_batches, int) or isinstance(min_batches, bool) or min_batches < 2:
        raise FisherError(f"{where}: min_batches must be an int ≥ 2 (a standard error needs two batches), got "
                          f"{min_batches!r}")
    if rtol_of not in RTOL_OF:
        raise FisherError(f"{where}: rtol_of must be one of {list(RTOL_OF)}, got {rtol_of!r}")
    if rtol_of == "groups" and groups is None:
        raise FisherError(f"{where}: rtol_of='groups' needs groups= (ffx.whole(params) gives one value per tensor)")
    if decay is not None and rtol is not None:
        raise FisherError(f"{where}: rtol needs the exact average; an EMA (decay={decay!r}) follows a moving target "
                          "and has no standard error here. Pass one of decay and rtol")
    o = {**_defaults(), **options}
    fisher.check_options(where, o["kind"], o["n_samples"], o["per"], o["normalize"], o["engine"], o["dtype"],
                         o["chunk_size"])
    checked = None if groups is None else check_groups(groups, params, where)
    if decay is not None:
        ema_init(params, decay)  # validates decay before any batch is drawn
    estimate_options = dict(options) if decay is not None else \
        {k: v for k, v in options.items() if k not in ("storage_dtype", "device")}

    def estimate(batch: Any) -> Estimate:
        if checked is None:
            return fisher.diag_fisher(problem, params, batch, **estimate_options)
        return fisher.group_fisher(problem, params, batch, checked, **estimate_options)

    state: Any = None
    moments: _Moments | None = None
    n_batches = n_samples = 0
    error: float | None = None
    converged = None if rtol is None else False
    bar = _progress_bar(progress, batches, max_batches)
    iterator = iter(batches)
    try:
        while not ((max_batches is not None and n_batches >= max_batches)
                   or (max_samples is not None and n_samples >= max_samples)):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            try:
                rows = int(problem.prepare(batch).active.shape[0])
                est = estimate(batch)
            except FisherError as err:
                raise FisherError(f"{where}: batch {n_batches}: {err}") from err
            if state is None:
                state = ema_init(est, decay) if decay is not None else sum_init(est)
            state = ema_update(state, est) if decay is not None else sum_update(state, est)
            n_batches, n_samples = n_batches + 1, n_samples + rows
            if decay is None:
                s = _batch_sums(est, rtol_of)
                moments = (moments or _moments(s)).add(s, float(est.count))
                error = moments.relative_error()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(samples=n_samples, **({} if error is None else {"rel_error": f"{error:.3g}"}))
            if rtol is not None and error is not None and n_batches >= min_batches and error <= rtol:
                converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    if decay is not None:
        result = state if state is not None else ema_init(_empty(params, checked, options), decay)
    else:
        result = sum_value(state) if state is not None else _empty(params, checked, options)
        storage, device = options.get("storage_dtype"), options.get("device")
        result = result if storage is None and device is None else cast(result, storage, device)
    return Collected(result, n_batches, n_samples, None if error is None or math.isnan(error) else error, converged)


__all__ = ["Collected", "collect"]
