"""The loss that matches the Fisher's conventions: the normalised sum of per-sample NLLs.

.. math::
    L(θ) = \\frac{1}{Z} \\sum_n ℓ_n(θ), \\qquad ℓ_n(θ) = −\\sum_{t ∈ active(n)} \\log p(y_{n,t} | x_n, θ)

with the problem's own reading of the batch (causal shift, padding re-alignment, ``ignore_index``
labels) and the same ``Z`` as the estimators (``N``, active positions or 1). The Fisher of a batch
is then the curvature of exactly this loss, and the loss is the one to report next to it (HF's
own ``outputs.loss`` is a mean over tokens and treats left padding differently).
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._errors import FisherError
from ._options import choice
from .engines.taps import check_outputs
from .fisher import NORMALIZES, Normalize, check_params, normalizer
from .problems import Prepared, Problem, forward_failure


def nll(problem: Problem, params: Mapping[str, Tensor], batch: Any, normalize: Normalize = "samples") -> Tensor:
    """The negative log-likelihood of a batch, normalised as the Fisher estimators normalise.

    .. math::
        L(θ) = \\frac{1}{Z} \\sum_n \\sum_{t ∈ active(n)} −\\log p(y_{n,t} | x_n, θ)

    Differentiable with respect to ``params`` (and to the module's own parameters it falls back to),
    so it serves as a training loss, with ``torch.func.grad`` or ``loss.backward()``. The model is
    evaluated once on the whole batch, as it is (train or eval mode).

    Args:
        problem: from :func:`~fisherfx.supervised` or :func:`~fisherfx.causal_lm`.
        params: ``{name: [*P]}``, the values to evaluate the model at (any subset of its parameters,
            ``{}`` included); absent ones fall back to the module's own. Note that
            :func:`~fisherfx.params_of` gives detached tensors: for ``loss.backward()`` to fill the
            module's ``.grad``, pass ``dict(model.named_parameters())`` or ``{}``.
        batch: a batch as ``problem`` reads it.
        normalize: ``Z`` = ``"samples"`` (N rows), ``"tokens"`` (active positions) or ``"none"`` (1).

    Returns:
        A scalar tensor in the dtype of the model's outputs.

    Raises:
        FisherError: a bad ``normalize`` or ``params``, a batch the problem cannot read, a batch with
            no active position, targets that do not fit the outputs, or a forward that fails (naming
            the module).

    Example:
        >>> import torch, fisherfx as ffx
        >>> model = torch.nn.Linear(3, 2)
        >>> problem = ffx.supervised(model, ffx.Categorical())
        >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> loss = ffx.nll(problem, {}, (x, y))
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(model(x), y))
        True

    """
    where = "nll"
    choice(where, "normalize", normalize, NORMALIZES)
    params = check_params(where, problem, params, allow_empty=True, buffers=True)
    prepared = problem.prepare(batch)
    active = prepared.active  # [N, T]
    n_active = int(active.sum())
    if n_active == 0:
        raise FisherError(f"{where}: the batch has no active position (all targets ignored or padded); the loss "
                          "would be an empty sum")
    try:
        outputs = problem.forward(problem.model, params, prepared.inputs)  # [N, T, C]
    except Exception as err:
        raise forward_failure(where, problem, params, prepared.inputs, err) from err
    check_outputs(where, problem, outputs, prepared)
    return summed_nll(problem, outputs, prepared) / normalizer(active, normalize, n_active)


def summed_nll(problem: Problem, outputs: Tensor, prepared: Prepared) -> Tensor:
    """``Σ_n ℓ_n``, the unnormalised NLL of canonical ``outputs`` ``[N, T, C]`` over the active positions."""
    active = prepared.active
    targets = prepared.targets  # inactive positions may hold anything (a masked-out class -1, a NaN)
    targets = torch.where(active.reshape(*active.shape, *[1] * (targets.ndim - 2)), targets, torch.zeros_like(targets))
    per_position = problem.likelihood.nll(outputs, targets)  # [N, T]
    return torch.where(active, per_position, torch.zeros_like(per_position)).sum()


__all__ = ["nll"]
