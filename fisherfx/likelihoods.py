"""Likelihoods: per-position negative log-likelihood, sampling and the exact-Fisher square root.

All methods work on *canonical* tensors: outputs ``[N, T, C]`` (samples, positions, outputs per
position), targets ``[N, T]`` (class indices) or ``[N, T, C]`` (real or binary values) and an
active mask ``[N, T]``. ``canonical_outputs`` and ``canonical_targets`` bring the usual model shapes there:

================  ==================  ==================
likelihood        outputs             targets
================  ==================  ==================
``Categorical``   ``[N, C]``          ``[N]``
``Categorical``   ``[N, T, C]``       ``[N, T]``
``Gaussian``      ``[N]``/``[N, C]``  same as outputs
``Bernoulli``     ``[N]``/``[N, C]``  same as outputs (0/1)
================  ==================  ==================

(``Gaussian`` and ``Bernoulli`` also take ``[N, T, C]``.) A sample with ``[N, C]`` outputs has a
single position ``T = 1``.
"""

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ._errors import FisherError


class Likelihood(Protocol):
    """What the engines need from a likelihood ``p(y | f)`` of the model outputs ``f``."""

    def canonical_outputs(self, outputs: Tensor) -> Tensor:
        """Model outputs ``[N, ...]`` → ``[N, T, C]``."""

    def canonical_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Targets ``[N, ...]`` → (targets in canonical shape, active mask ``[N, T]``)."""

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Negative log-likelihood per position: ``[..., C]`` outputs → ``[...]``."""

    def nll_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``∂ nll / ∂ outputs`` per position, ``[..., C]``, in closed form."""

    def noise(self, outputs_shape: torch.Size, n_samples: int, generator) -> Tensor:
        """Random numbers ``[S, *outputs_shape[:-1] or outputs_shape]`` for :meth:`sample`."""

    def sample(self, outputs: Tensor, noise: Tensor) -> Tensor:
        """Targets ``y ~ p(· | outputs)``, a deterministic function of ``outputs`` and ``noise``."""

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        """``S`` ``[..., C, K]`` with ``S Sᵀ = ∂²nll/∂f²`` (independent of the targets)."""

    def hessian_vp(self, outputs: Tensor, u: Tensor) -> Tensor:
        """``(∂²nll/∂f²) u`` per position, ``u`` ``[..., C]`` broadcasting against ``outputs`` ``[..., C]``;
        equals ``S (Sᵀ u)`` with :meth:`hessian_sqrt`'s ``S``, in closed form (no ``C × C`` matrix).
        """


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _three_d(outputs: Tensor, name: str) -> Tensor:
    """``[N]`` → ``[N, 1, 1]``, ``[N, C]`` → ``[N, 1, C]``, ``[N, T, C]`` unchanged."""
    if outputs.ndim == 1:
        return outputs[:, None, None]
    if outputs.ndim == 2:
        return outputs[:, None, :]
    if outputs.ndim == 3:
        return outputs
    raise FisherError(
        f"{name}: expected outputs/targets of shape [N], [N, C] or [N, T, C], got {tuple(outputs.shape)}"
    )


class Categorical(NamedTuple):
    """Softmax cross-entropy over the last output axis; targets equal to ``ignore_index`` are inactive.

    .. math::
        \\ell_{n,t} = -\\log \\operatorname{softmax}(f_{n,t})_{y_{n,t}}
    """

    ignore_index: int = -100

    def canonical_outputs(self, outputs: Tensor) -> Tensor:
        if outputs.ndim == 2:
            return outputs[:, None, :]
        if outputs.ndim == 3:
            return outputs
        raise FisherError(
            f"Categorical: expected logits of shape [N, C] or [N, T, C], got {tuple(outputs.shape)}"
        )

    def canonical_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        if targets.dtype.is_floating_point or targets.dtype == torch.bool:
            raise FisherError(f"Categorical: expected integer class targets, got dtype {targets.dtype}")
        if targets.ndim == 1:
            targets = targets[:, None]
        if targets.ndim != 2:
            raise FisherError(
                f"Categorical: expected targets of shape [N] or [N, T], got {tuple(targets.shape)}"
            )
        active = targets != self.ignore_index
        return torch.where(active, targets, 0), active

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        logp = torch.log_softmax(outputs, dim=-1)
        return -torch.gather(logp, -1, targets[..., None])[..., 0]

    def nll_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        grad = torch.softmax(outputs, dim=-1)  # softmax(f) − onehot(y), written into the softmax (no one-hot)
        if targets.shape != grad.shape[:-1]:  # targets with leading draw axes ([S, ..., T])
            grad = grad.expand(*targets.shape, grad.shape[-1]).clone()
        index = targets[..., None]
        return grad.scatter_add_(-1, index, torch.full_like(index, -1.0, dtype=grad.dtype))

    def noise(self, outputs_shape: torch.Size, n_samples: int, generator=None) -> Tensor:
        return torch.rand((n_samples, *outputs_shape[:-1]), generator=generator, device=_device(generator))

    def sample(self, outputs: Tensor, noise: Tensor) -> Tensor:
        # inverse CDF: y = #{c : cdf_c < u}, vmap-friendly and exact for any seed
        cdf = torch.cumsum(torch.softmax(outputs.detach().float(), dim=-1), dim=-1)
        y = (cdf < noise.to(cdf)[..., None]).sum(-1)
        return y.clamp(max=outputs.shape[-1] - 1)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)
        sqrt_p = p.sqrt()
        # S = diag(√p) − p √pᵀ, so S Sᵀ = diag(p) − p pᵀ
        return torch.diag_embed(sqrt_p) - p[..., :, None] * sqrt_p[..., None, :]

    def hessian_vp(self, outputs: Tensor, u: Tensor) -> Tensor:
        p = torch.softmax(outputs, dim=-1)  # (diag(p) − p pᵀ) u = p ⊙ u − p (pᵀ u), in two passes over u
        pu = p * u
        return pu.addcmul_(p, pu.sum(-1, keepdim=True), value=-1)


class Gaussian(NamedTuple):
    """Isotropic Gaussian with fixed standard deviation ``sigma``.

    .. math::
        \\ell_{n,t} = \\lVert y_{n,t} - f_{n,t} \\rVert^2 / (2\\sigma^2)

    (constants dropped), so the Fisher is ``Jᵀ J / σ²``. PyTorch's ``MSELoss(reduction="sum")``
    is the NLL of ``Gaussian(sigma=sqrt(0.5))`` up to a constant.
    """

    sigma: float = 1.0

    def canonical_outputs(self, outputs: Tensor) -> Tensor:
        return _three_d(outputs, "Gaussian")

    def canonical_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        if not targets.dtype.is_floating_point:
            raise FisherError(f"Gaussian: expected floating-point targets, got dtype {targets.dtype}")
        targets = _three_d(targets, "Gaussian")
        return targets, torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return ((targets - outputs) ** 2).sum(-1) / (2 * self.sigma**2)

    def nll_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs - targets.to(outputs)) / self.sigma**2

    def noise(self, outputs_shape: torch.Size, n_samples: int, generator=None) -> Tensor:
        return torch.randn((n_samples, *outputs_shape), generator=generator, device=_device(generator))

    def sample(self, outputs: Tensor, noise: Tensor) -> Tensor:
        return outputs.detach() + self.sigma * noise.to(outputs)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        eye = torch.eye(outputs.shape[-1], dtype=outputs.dtype, device=outputs.device)
        return (eye / self.sigma).expand(*outputs.shape, outputs.shape[-1])

    def hessian_vp(self, outputs: Tensor, u: Tensor) -> Tensor:
        return u / self.sigma**2


class Bernoulli(NamedTuple):
    """Independent Bernoulli per output with logits ``f`` (binary cross-entropy with logits).

    .. math::
        \\ell_{n,t} = -\\sum_c y_c \\log \\sigma(f_c) + (1 - y_c) \\log(1 - \\sigma(f_c))
    """

    def canonical_outputs(self, outputs: Tensor) -> Tensor:
        return _three_d(outputs, "Bernoulli")

    def canonical_targets(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        targets = _three_d(targets, "Bernoulli")
        if not targets.dtype.is_floating_point:
            targets = targets.float()
        return targets, torch.ones(targets.shape[:2], dtype=torch.bool, device=targets.device)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs), reduction="none"
        ).sum(-1)

    def nll_grad(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return torch.sigmoid(outputs) - targets.to(outputs)

    def noise(self, outputs_shape: torch.Size, n_samples: int, generator=None) -> Tensor:
        return torch.rand((n_samples, *outputs_shape), generator=generator, device=_device(generator))

    def sample(self, outputs: Tensor, noise: Tensor) -> Tensor:
        return (noise.to(outputs) < torch.sigmoid(outputs.detach())).to(outputs)

    def hessian_sqrt(self, outputs: Tensor) -> Tensor:
        p = torch.sigmoid(outputs)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def hessian_vp(self, outputs: Tensor, u: Tensor) -> Tensor:
        p = torch.sigmoid(outputs)
        return p * (1 - p) * u


def check_likelihood(likelihood: Likelihood, where: str) -> None:
    """Raise :class:`FisherError` for a likelihood class instead of an instance, or a bad ``sigma``."""
    if isinstance(likelihood, type):
        raise FisherError(f"{where}: expected a likelihood instance such as {likelihood.__name__}(), got the class "
                          f"{likelihood.__name__}")
    if isinstance(likelihood, Gaussian):
        sigma = likelihood.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < float(sigma) < float("inf"):
            raise FisherError(f"{where}: Gaussian sigma must be a finite number > 0, got {sigma!r}")


def check_shapes(likelihood: Likelihood, outputs: Tensor, targets: Tensor, where: str) -> None:
    """Raise :class:`FisherError` unless canonical ``outputs`` and ``targets`` fit together."""
    want = outputs.shape[:-1] if isinstance(likelihood, Categorical) else outputs.shape
    if targets.shape != want:
        raise FisherError(
            f"{where}: targets of shape {tuple(targets.shape)} do not fit model outputs of shape "
            f"{tuple(outputs.shape)} (canonical [N, T, C]); expected targets {tuple(want)}"
        )


def check_classes(likelihood: Likelihood, outputs: Tensor, targets: Tensor, active: Tensor, where: str) -> None:
    """Raise :class:`FisherError` unless every active target is a value the likelihood can take:
    a class of ``outputs`` for ``Categorical``, a probability in [0, 1] for ``Bernoulli``.
    """
    if isinstance(likelihood, Bernoulli):
        values = targets[active]
        if values.numel() and (float(values.min()) < 0 or float(values.max()) > 1):
            raise FisherError(f"{where}: Bernoulli targets must lie in [0, 1], got targets from "
                              f"{float(values.min()):g} to {float(values.max()):g}")
        return
    if not isinstance(likelihood, Categorical):
        return
    c = outputs.shape[-1]
    low, high = (int(v) for v in torch.aminmax(targets))  # all of them: in range, the active ones are
    if low < 0 or high >= c:  # then the active ones alone (inactive ones count as 0)
        low, high = (int(v) for v in torch.aminmax(torch.where(active, targets, 0)))
    if low < 0 or high >= c:
        classes = targets[active]
        raise FisherError(
            f"{where}: class targets must lie in [0, {c}) for model outputs with {c} classes (or equal "
            f"ignore_index={likelihood.ignore_index}), got targets from {int(classes.min())} to {int(classes.max())}"
        )


__all__ = ["Bernoulli", "Categorical", "Gaussian", "Likelihood", "check_classes", "check_likelihood", "check_shapes"]
