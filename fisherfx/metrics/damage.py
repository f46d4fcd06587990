"""Measured damage of a parameter change: the mean loss increase and the mean KL divergence.

.. math::
    ΔL = \\frac{1}{Z} \\sum_n \\big[ℓ_n(θ') − ℓ_n(θ)\\big], \\qquad
    \\mathrm{KL} = \\frac{1}{Z} \\sum_n \\sum_{t ∈ \\mathrm{active}(n)}
        \\mathrm{KL}\\big(p_θ(\\cdot \\mid x_n)_t \\,\\|\\, p_{θ'}(\\cdot \\mid x_n)_t\\big)

with the conventions of :func:`~fisherfx.nll` (padding and ``ignore_index`` labels excluded). For the
exact Fisher ``KL = ½ δᵀFδ + O(‖δ‖³)`` at any ``θ``: what :func:`~fisherfx.risk_score` predicts.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._errors import FisherError
from .._options import choice
from ..engines.taps import check_outputs
from ..fisher import NORMALIZES, Normalize, check_params, normalizer
from ..likelihoods import Bernoulli, Categorical, Gaussian
from ..losses import summed_nll
from ..operators import batches_of
from ..problems import Prepared, Problem, forward_failure
from ..vectors import check_vector

ACCUMULATE = torch.float64  # norms, risks and KLs: sums of many terms of very different sizes
_OUTPUT_CACHE = 256 * 2**20  # bytes of base outputs a sweep keeps instead of recomputing them


class Damage(NamedTuple):
    """What :func:`perturbation_damage` measures (0-d float64 tensors)."""

    loss_increase: Tensor  # (1/Z) Σ_n [ℓ_n(θ + δ) − ℓ_n(θ)]
    kl: Tensor  # (1/Z) Σ_n Σ_{t ∈ active(n)} KL(p_θ(·|x_n)_t ‖ p_{θ+δ}(·|x_n)_t)


def position_kl(likelihood: Any, outputs: Tensor, other: Tensor) -> Tensor:
    """``KL(p(·|f) ‖ p(·|f'))`` per position, outputs ``[..., C]`` → ``[...]``.

    Categorical: ``Σ_c p_c (log p_c − log q_c)`` with ``p = softmax(f)``, ``q = softmax(f')``.
    Gaussian(σ): ``‖f' − f‖² / (2σ²)``. Bernoulli: ``Σ_c p_c log(p_c/q_c) + (1 − p_c) log((1 − p_c)/(1 − q_c))``
    with ``p = σ(f)``, ``q = σ(f')`` (computed from log-sigmoids). Another likelihood serves if it has
    a method ``kl(outputs, other)``.
    """
    if isinstance(likelihood, Categorical):
        logp, logq = torch.log_softmax(outputs, -1), torch.log_softmax(other, -1)
        return (logp.exp() * (logp - logq)).sum(-1)
    if isinstance(likelihood, Gaussian):
        return ((other - outputs) ** 2).sum(-1) / (2 * likelihood.sigma**2)
    if isinstance(likelihood, Bernoulli):
        logp, log1p = torch.nn.functional.logsigmoid(outputs), torch.nn.functional.logsigmoid(-outputs)
        logq, log1q = torch.nn.functional.logsigmoid(other), torch.nn.functional.logsigmoid(-other)
        return (logp.exp() * (logp - logq) + log1p.exp() * (log1p - log1q)).sum(-1)
    method = getattr(likelihood, "kl", None)
    if callable(method):
        return method(outputs, other)
    raise FisherError(f"perturbation_damage: no KL divergence for likelihood {type(likelihood).__name__}; give it a "
                      "method kl(outputs, other) -> per-position KL")


class _Base(NamedTuple):
    """The unperturbed model on each batch: the prepared batch, its outputs (or ``None`` when not kept)
    and its summed NLL.
    """

    prepared: Prepared
    outputs: Tensor | None  # [N, T, C] float64
    nll: Tensor  # shape=() float64: Σ_n ℓ_n(θ)


def _outputs(where: str, problem: Problem, params: Mapping[str, Tensor], prepared: Prepared) -> Tensor:
    with torch.no_grad():
        try:
            out = problem.forward(problem.model, params, prepared.inputs)
        except FisherError:
            raise
        except Exception as err:
            raise forward_failure(where, problem, params, prepared.inputs, err) from err
    check_outputs(where, problem, out, prepared)
    return out.to(ACCUMULATE)


def base_runs(where: str, problem: Problem, params: Mapping[str, Tensor], batches: Any, normalize: str,
          keep: bool) -> tuple[list[_Base], int]:
    """The base runs and ``Σ_b Z_b``; outputs kept while they fit in the cache budget (``keep``)."""
    runs, count, kept = [], 0, 0
    for batch in batches_of(batches):
        prepared = problem.prepare(batch)
        n_active = int(prepared.active.sum())
        if n_active == 0:
            raise FisherError(f"{where}: a batch has no active position (all targets ignored or padded)")
        out = _outputs(where, problem, params, prepared)
        kept += out.numel() * out.element_size()
        store = out if keep and kept <= _OUTPUT_CACHE else None
        runs.append(_Base(prepared, store, summed_nll(problem, out, prepared)))
        count += normalizer(prepared.active, normalize, n_active)
    if not runs:
        raise FisherError(f"{where}: batch is an empty collection of batches; expected one batch or a non-empty list")
    return runs, count


def measured_damage(where: str, problem: Problem, params: Mapping[str, Tensor], new_params: Mapping[str, Tensor],
            runs: list[_Base], count: int) -> Damage:
    loss, kl = torch.zeros((), dtype=ACCUMULATE), torch.zeros((), dtype=ACCUMULATE)
    for run in runs:
        old = run.outputs if run.outputs is not None else _outputs(where, problem, params, run.prepared)
        new = _outputs(where, problem, new_params, run.prepared)
        loss = loss + (summed_nll(problem, new, run.prepared) - run.nll).cpu()
        per_position = position_kl(problem.likelihood, old, new)  # [N, T]
        kl = kl + torch.where(run.prepared.active, per_position, torch.zeros_like(per_position)).sum().cpu()
    return Damage(loss / count, kl / count)


def check_pair(where: str, problem: Problem, params: Mapping[str, Tensor], new_params: Mapping[str, Tensor],
                normalize: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    choice(where, "normalize", normalize, NORMALIZES)
    params = check_params(where, problem, params)
    new_params, _ = check_vector(where, check_params(where, problem, new_params), params, option="new_params",
                                 batched=False)
    return params, new_params


def perturbation_damage(problem: Problem, params: Mapping[str, Tensor], new_params: Mapping[str, Tensor], batch: Any,
                        normalize: Normalize = "samples") -> Damage:
    """The measured damage of moving ``θ`` to ``θ' = θ + δ``: mean loss increase and mean KL.

    .. math::
        ΔL = \\frac{1}{Z} \\sum_n \\big[ℓ_n(θ') − ℓ_n(θ)\\big], \\qquad
        \\mathrm{KL} = \\frac{1}{Z} \\sum_n \\sum_{t ∈ \\mathrm{active}(n)}
            \\mathrm{KL}\\big(p_θ(\\cdot \\mid x_n)_t \\,\\|\\, p_{θ'}(\\cdot \\mid x_n)_t\\big)

    with ``ℓ_n`` and ``Z`` those of :func:`~fisherfx.nll` (padding and ``ignore_index`` labels
    excluded, ``Z`` = samples, active positions or 1) and the per-position KL of the likelihood (see
    :func:`position_kl`). ``ΔL`` uses the dataset's labels; the KL does not. For the exact Fisher of the
    same ``Z``, ``KL = ½ δᵀFδ + O(‖δ‖³)`` at any ``θ`` (:func:`risk_score`), while
    ``ΔL = ∇Lᵀδ + ½ δᵀHδ + O(‖δ‖³)`` only approaches the risk near a minimum. Outputs are compared in
    float64; the model runs as it is (call ``model.eval()`` first) under ``torch.no_grad``.

    Args:
        problem: from :func:`~fisherfx.supervised` or :func:`~fisherfx.causal_lm`.
        params: ``θ``, ``{name: [*P]}`` (any subset of the model's; the others keep the model's values).
        new_params: ``θ'``, with the names and shapes of ``params``.
        batch: one batch as ``problem`` reads it, or a list / iterable of batches (``Z`` summed over them).
        normalize: ``Z`` = ``"samples"``, ``"tokens"`` or ``"none"``.

    Returns:
        :class:`Damage` ``(loss_increase, kl)``, 0-d float64 tensors.

    Raises:
        FisherError: a bad ``normalize``; ``params`` or ``new_params`` naming unknown parameters or
            differing in names or shapes; a batch with no active position; targets that do not fit the
            outputs; a failing forward (naming the module).

    """
    where = "perturbation_damage"
    params, new_params = check_pair(where, problem, params, new_params, normalize)
    runs, count = base_runs(where, problem, params, batch, normalize, keep=False)
    return measured_damage(where, problem, params, new_params, runs, count)



__all__ = ["Damage", "perturbation_damage", "position_kl"]
