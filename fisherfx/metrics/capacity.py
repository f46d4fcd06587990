"""Capacity metrics of a curvature spectrum: trace, effective rank and dimension, condition number,
Fisher–Rao norm and the KL term of a Laplace PAC-Bayes bound.

Every metric here is a function of the eigenvalues ``λ_1 ≥ … ≥ λ_k`` of a symmetric matrix ``F``
(the Fisher, the GGN, a Hessian, or a diagonal approximation of one) and, for the two that involve
the parameters ``θ``, of ``θ``'s coordinates along the eigenvectors. The spectrum comes from
:func:`fisherfx.lanczos` (an :class:`~fisherfx.spectrum.Eigen`, usually truncated to the top
``k``), from a dense ``torch.linalg.eigvalsh`` (a 1-D tensor), or from :func:`fisherfx.diag_fisher`
(an :class:`~fisherfx.Estimate`, whose entries are the eigenvalues of the diagonal matrix).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._errors import FisherError
from ..spectrum import Eigen
from ..state import Estimate
from ..vectors import check_vector, dimension, dot, flatten

ACCUMULATE = torch.float64  # the metrics are sums of up to D terms of very different sizes


class Capacity(NamedTuple):
    """What :func:`capacity_report` returns; ``None`` where the inputs do not determine a field.

    The scalars are 0-d float64 tensors. When the spectrum is truncated (``complete`` is
    ``False``: ``k < D`` eigenvalues known), every field is computed from the known eigenvalues,
    the others counting as 0; see :func:`capacity_report` for what that makes of each field.
    """

    trace: Tensor  # Σ_i λ_i
    effective_rank: Tensor  # exp(H(p)), p_i = λ_i / Σ_{λ_j > 0} λ_j over λ_i > 0
    condition_number: Tensor  # λ_max / min{λ_i : λ_i > floor}; NaN when no λ_i > floor or λ_max ≤ 0
    effective_dimension: Tensor  # Σ_i λ_i / (λ_i + z)
    fisher_rao_norm: Tensor | None  # θᵀFθ = Σ_i λ_i ⟨u_i, θ⟩² (needs params and eigenvectors)
    pac_bayes_kl: Tensor | None  # KL(N(θ, (nF + λI)⁻¹) ‖ N(0, λ⁻¹I)) (needs params and n)
    dimension: int | None  # D, the number of parameters (None for bare eigenvalues without params)
    n_eigenvalues: int  # k, the number of eigenvalues the spectrum holds
    floor: Tensor  # the eigenvalue floor the condition number used

    @property
    def complete(self) -> bool | None:
        """``k == D``: the spectrum holds every eigenvalue (``None`` when ``D`` is unknown)."""
        return None if self.dimension is None else self.n_eigenvalues == self.dimension


def _number(where: str, option: str, value: Any, *, positive: bool = True) -> float:
    """A finite real number, ``> 0`` (or ``≥ 0`` with ``positive=False``); 0-d tensors are accepted."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FisherError(f"{where}: {option} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value == float("inf"):
        raise FisherError(f"{where}: {option} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return value


def _eigenvalues(where: str, values: Any, option: str) -> Tensor:
    if not isinstance(values, Tensor) or values.ndim != 1 or not values.dtype.is_floating_point:
        got = (f"shape {tuple(values.shape)}, dtype {values.dtype}" if isinstance(values, Tensor)
               else type(values).__name__)
        raise FisherError(f"{where}: {option} must be a 1-D floating-point tensor of eigenvalues, got {got}")
    if values.numel() == 0:
        raise FisherError(f"{where}: {option} holds no eigenvalue")
    if not bool(torch.isfinite(values).all()):
        raise FisherError(f"{where}: {option} holds inf or NaN")
    return values


def _params(where: str, params: Any, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``params`` checked against ``like`` (names and shapes), or on their own."""
    if isinstance(params, Mapping) and not params:
        raise FisherError(f"{where}: params must be a non-empty {{name: tensor}} dict")
    checked, _ = check_vector(where, params, params if like is None else like, option="params", batched=False)
    return checked


class _Spectrum(NamedTuple):
    values: Tensor  # [k] in the input's dtype
    along: Tensor | None  # [k] float64: ⟨u_i, θ⟩², the squared coordinates of θ along the eigenvectors
    theta: dict[str, Tensor] | None
    dimension: int | None


def _read(where: str, spectrum: Any, params: Any) -> _Spectrum:
    """One reading of the three kinds of spectrum: eigenvalues, eigenpairs, a diagonal."""
    if isinstance(spectrum, Eigen):
        values = _eigenvalues(where, spectrum.values, "spectrum.values")
        vectors = spectrum.vectors
        if not isinstance(vectors, Mapping) or not vectors:
            raise FisherError(f"{where}: spectrum.vectors must be a non-empty {{name: [k, *P]}} dict, got "
                              f"{type(vectors).__name__}")
        bad = next((name for name, v in vectors.items() if not isinstance(v, Tensor) or v.ndim == 0), None)
        if bad is not None:
            raise FisherError(f"{where}: spectrum.vectors[{bad!r}] must be a tensor [k, *P], got "
                              f"{type(vectors[bad]).__name__}")
        if params is None:
            like = {name: v[0] for name, v in vectors.items()}  # the shapes P are the trailing axes
            theta = None
        else:
            theta = like = _params(where, params)
        vectors, k = check_vector(where, vectors, like, option="spectrum.vectors", batched=True)
        if k != values.numel():
            raise FisherError(f"{where}: spectrum.vectors hold {k} vectors but spectrum.values {values.numel()} "
                              "eigenvalues")
        along = None if theta is None else dot(vectors, theta, like=theta).to(ACCUMULATE) ** 2  # [k]
        return _Spectrum(values, along, theta, dimension(like))
    if isinstance(spectrum, (Estimate, Mapping)):
        diag = spectrum.value if isinstance(spectrum, Estimate) else spectrum
        if not isinstance(diag, Mapping) or not diag:
            raise FisherError(f"{where}: a diagonal spectrum must be a non-empty {{name: tensor}} dict")
        diag, _ = check_vector(where, diag, diag, option="spectrum", batched=False)
        theta = None if params is None else _params(where, params, like=diag)
        values = flatten(diag)  # [D]
        along = None if theta is None else flatten(theta, diag).to(ACCUMULATE) ** 2  # the axes are the eigenvectors
        return _Spectrum(values, along, theta, values.numel())
    if isinstance(spectrum, Tensor):
        values = _eigenvalues(where, spectrum, "spectrum")
        theta = None if params is None else _params(where, params)
        return _Spectrum(values, None, theta, None if theta is None else dimension(theta))
    raise FisherError(f"{where}: spectrum must be a 1-D tensor of eigenvalues, an Eigen, an Estimate or a "
                      f"{{name: tensor}} diagonal, got {type(spectrum).__name__}")


def capacity_report(spectrum: Tensor | Eigen | Estimate | Mapping[str, Tensor], z: float = 1.0,
                    params: Mapping[str, Tensor] | None = None, n: float | None = None,
                    prior_precision: float = 1.0, floor: float | None = None) -> Capacity:
    """Capacity metrics of a symmetric PSD matrix ``F`` from its eigenvalues ``λ_1, …, λ_k``.

    With ``θ = params``, ``D`` the number of parameters, ``u_i`` the eigenvectors:

    - ``trace = Σ_i λ_i``.
    - ``effective_rank = exp(−Σ_i p_i ln p_i)``, ``p_i = λ_i / Σ_j λ_j`` over the positive
      eigenvalues only (Roy & Vetterli 2007, "The effective rank: a measure of effective
      dimensionality"); 0 when none is positive.
    - ``condition_number = λ_max / min{λ_i : λ_i > floor}``: the conditioning of ``F`` on the part
      of its range above the floor. ``floor`` defaults to ``λ_max · D · eps`` (``D`` replaced by
      ``k`` when unknown, ``eps = torch.finfo(dtype).eps`` of the spectrum's dtype): eigenvalues
      below it are indistinguishable from zero in that precision, the rule
      ``numpy.linalg.matrix_rank`` applies to singular values. NaN when ``λ_max ≤ 0`` or no
      eigenvalue exceeds the floor.
    - ``effective_dimension = Σ_i λ_i / (λ_i + z)`` (Maddox, Benton & Wilson 2020, "Rethinking
      parameter counting in deep models: effective dimensionality revisited"): about the number of
      eigenvalues above ``z``, the directions the data determine for a prior precision ``z``.
    - ``fisher_rao_norm = θᵀFθ = Σ_i λ_i ⟨u_i, θ⟩²`` (Liang, Poggio, Rakhlin & Stokes 2019,
      "Fisher–Rao metric, geometry, and complexity of neural networks"; their ``‖θ‖²_fr``). Needs
      ``params`` and the eigenvectors: an ``Eigen``, or a diagonal, whose eigenvectors are the
      coordinate axes (``Σ_i F_ii θ_i²``, the norm of the diagonal *approximation*, neither equal to
      nor a bound on the full ``θᵀFθ``). ``None`` for bare eigenvalues.
    - ``pac_bayes_kl``: the KL divergence of the Laplace posterior ``Q = N(θ, Σ_Q)``,
      ``Σ_Q = (nF + λI)⁻¹``, from the prior ``P = N(0, Σ_P)``, ``Σ_P = λ⁻¹I``,
      ``λ = prior_precision``: the complexity term of a PAC-Bayes bound (McAllester 1999; with a
      Laplace posterior as in Dziugaite & Roy 2017). From the Gaussian KL,

      ``KL = ½[tr(Σ_P⁻¹Σ_Q) + θᵀΣ_P⁻¹θ − D + ln(det Σ_P / det Σ_Q)]``

      with ``tr(Σ_P⁻¹Σ_Q) = Σ_i λ/(nλ_i + λ)``, ``θᵀΣ_P⁻¹θ = λ‖θ‖²`` and
      ``ln(det Σ_P / det Σ_Q) = Σ_i ln((nλ_i + λ)/λ)``, over all ``D`` eigenvalues, so

      ``KL = ½[Σ_i (λ/(nλ_i + λ) − 1 + ln(1 + nλ_i/λ)) + λ‖θ‖²]``,

      which is how it is computed (an eigenvalue 0 contributes 0 to the sum). Needs ``params`` and
      ``n``; requires ``nλ_i + λ > 0``.

    A truncated spectrum (``k < D``, e.g. Lanczos' top 20): the ``D − k`` eigenvalues it lacks
    count as 0. For a PSD ``F`` they are ``≥ 0`` and every term above is non-negative and
    non-decreasing in ``λ_i`` (the KL term's derivative in ``x = nλ_i/λ`` is ``x/(2(1 + x)²)``), so
    ``trace``, ``effective_dimension``, ``fisher_rao_norm`` (``θ`` projected on the top-``k``
    eigenvectors) and ``pac_bayes_kl`` are *lower bounds* of the full ``F``'s values: a PAC-Bayes
    bound computed from this KL is optimistic, not a valid bound. ``effective_rank`` and
    ``condition_number`` are those of the known eigenvalues. ``Capacity.complete`` says which case
    holds.

    Args:
        spectrum: a 1-D tensor of eigenvalues; an :class:`~fisherfx.spectrum.Eigen` (orthonormal
            ``vectors`` ``{name: [k, *P]}``, e.g. from :func:`fisherfx.lanczos`); or a diagonal
            ``F`` as an :class:`~fisherfx.Estimate` or ``{name: tensor}`` (its ``D`` entries are the
            eigenvalues, the coordinate axes the eigenvectors).
        z: the prior precision of the effective dimension, ``> 0``.
        params: ``θ``, ``{name: [*P]}`` with the names and shapes of the eigenvectors (or the
            diagonal); gives ``D`` for bare eigenvalues.
        n: the number of observations the posterior conditions on, ``> 0``: ``nF`` is the curvature
            of the *summed* NLL, so for ``F`` normalised by ``Z`` (``est.count``) ``n = Z``.
        prior_precision: ``λ`` of the prior ``N(0, λ⁻¹I)``, ``> 0``.
        floor: the eigenvalue floor of the condition number, ``≥ 0`` (default above).

    Returns:
        A :class:`Capacity`.

    Raises:
        FisherError: a spectrum of another type or shape, empty or not finite; ``params`` with other
            names or shapes than the eigenvectors or diagonal, or fewer entries than eigenvalues;
            ``z``, ``n``, ``prior_precision`` not positive, ``floor`` negative; ``λ_i + z ≤ 0`` or
            ``nλ_i + λ ≤ 0`` for some eigenvalue.

    """
    where = "capacity_report"
    z = _number(where, "z", z)
    prior = _number(where, "prior_precision", prior_precision)
    n = None if n is None else _number(where, "n", n)
    floor = None if floor is None else _number(where, "floor", floor, positive=False)
    s = _read(where, spectrum, params)
    k = s.values.numel()
    if s.dimension is not None and k > s.dimension:
        raise FisherError(f"{where}: the spectrum holds {k} eigenvalues but the parameters have only "
                          f"{s.dimension} entries")
    lam = s.values.to(ACCUMULATE)  # [k]
    lam_max = lam.max()

    positive = lam[lam > 0]
    p = positive / positive.sum()
    effective_rank = torch.exp(-(p * torch.log(p)).sum()) if positive.numel() else lam.new_zeros(())

    if floor is None:
        floor_t = lam_max.clamp(min=0) * (s.dimension or k) * torch.finfo(s.values.dtype).eps
    else:
        floor_t = lam.new_tensor(floor)
    above = lam[lam > floor_t]
    condition = lam_max / above.min() if above.numel() and lam_max > 0 else lam.new_tensor(float("nan"))

    if bool((lam + z <= 0).any()):
        raise FisherError(f"{where}: the effective dimension needs λ_i + z > 0, but the smallest eigenvalue is "
                          f"{lam.min().item():.6g} with z = {z:g}")
    effective_dimension = (lam / (lam + z)).sum()

    fisher_rao = None if s.along is None else (lam * s.along).sum()

    kl = None
    if n is not None and s.theta is not None:
        precision = n * lam + prior  # eigenvalues of Σ_Q⁻¹ = nF + λI
        if bool((precision <= 0).any()):
            raise FisherError(f"{where}: the Laplace posterior needs n·λ_i + prior_precision > 0, but the smallest "
                              f"eigenvalue is {lam.min().item():.6g} (n = {n:g}, prior_precision = {prior:g})")
        sq_norm = (flatten(s.theta).to(ACCUMULATE) ** 2).sum()
        kl = 0.5 * ((prior / precision - 1 + torch.log1p(n * lam / prior)).sum() + prior * sq_norm)

    return Capacity(trace=lam.sum(), effective_rank=effective_rank, condition_number=condition,
                    effective_dimension=effective_dimension, fisher_rao_norm=fisher_rao, pac_bayes_kl=kl,
                    dimension=s.dimension, n_eigenvalues=k, floor=floor_t)


__all__ = ["Capacity", "capacity_report"]
