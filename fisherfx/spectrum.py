"""Solves and spectra of any symmetric operator on parameter-space vectors.

A *matvec* is any function ``{name: [*P]} -> {name: [*P]}`` computing ``A v`` for a symmetric ``A``
on the space of vectors shaped like the parameters, for example
``functools.partial(ffx.ggn_vp, problem, params, batch)`` or ``ffx.hvp``. It may also accept
``{name: [K, *P]}`` (``K`` vectors at once, a leading axis on every entry) and return the same: the
fisherfx operator products do, and one call of ``K`` vectors costs much less than ``K`` calls. The
functions here make such calls wherever they have independent vectors (probes, Hutch++'s sketch,
several right-hand sides); ``batched=False`` makes them call the matvec once per vector instead.

``like`` (usually ``params``) gives the names, shapes, dtype and device of the vectors. An operator
bound to a subset of the parameters, with that subset as ``like``, gives the spectrum of that
diagonal block (one layer, one group: see ``docs/spectrum.md``). Vectors are flattened in the
order of ``like``, each tensor row-major (:func:`fisherfx.vectors.flatten`); the arithmetic runs in
``like``'s dtype promoted to at least float32. Randomness comes from ``generator`` only (``None``:
torch's global generator): the same generator state gives the same result.
"""

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor

from . import vectors
from ._cg import CGResult, cg_solve
from ._errors import FisherError
from ._krylov import Flat, Matvec, lanczos_run, orthogonalize, tridiagonal_eigh
from ._options import check_generator, finite_number, positive_int

if TYPE_CHECKING:
    from scipy.sparse.linalg import LinearOperator

Which = Literal["largest", "smallest", "largest_magnitude"]
WHICH = ("largest", "smallest", "largest_magnitude")
TraceMethod = Literal["hutchinson", "hutch++"]
TRACE_METHODS = ("hutchinson", "hutch++")


class Eigen(NamedTuple):
    """Eigenpairs: ``values`` ``[k]`` descending, ``vectors`` ``{name: [k, *P]}`` (orthonormal)."""

    values: Tensor
    vectors: dict[str, Tensor]


class TraceEstimate(NamedTuple):
    """A stochastic trace estimate and its standard error (0-d tensors); unpacks as a pair."""

    estimate: Tensor
    standard_error: Tensor


class SpectralDensity(NamedTuple):
    """Stochastic Lanczos quadrature: per probe ``p``, nodes ``λ_{p,i}`` and weights ``w_{p,i}``.

    Both ``[n_probes, n_iter]``; each probe's weights sum to 1. Beyond a probe's Krylov dimension
    (``n_iter`` larger than the number of distinct eigenvalues it sees) the nodes are 0 with weight 0.
    See :func:`density` and :func:`slq_trace`.
    """

    nodes: Tensor
    weights: Tensor

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        """The Gaussian-smoothed density on ``grid``: :func:`density` of this value."""
        return density(self, grid, sigma)


# --- eigenpairs -------------------------------------------------------------------------------------

def _eigen(op: Flat, values: Tensor, flat_vectors: Tensor) -> Eigen:
    """Sorted descending; ``values`` ``[k]``, ``flat_vectors`` ``[k, D]``."""
    order = torch.argsort(values, descending=True)
    values = values[order].to(device=op.device, dtype=op.dtype)
    return Eigen(values, op.vector(flat_vectors[order.to(flat_vectors.device)]))


def _select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of ``k`` of the ascending ``values`` picked by ``which``."""
    if which == "largest":
        return torch.arange(len(values) - k, len(values))
    if which == "smallest":
        return torch.arange(k)
    return torch.argsort(values.abs(), descending=True, stable=True)[:k]


def lanczos(matvec: Matvec, like: Mapping[str, Tensor], k: int, n_iter: int | None = None,
            generator: torch.Generator | None = None, which: Which = "largest") -> Eigen:
    """``k`` extreme eigenpairs of a symmetric ``A`` by Lanczos with full reorthogonalisation.

    From a random unit start ``q_1`` (Gaussian, from ``generator``), ``m = n_iter`` steps build an
    orthonormal basis ``Q_m`` of the Krylov space ``span{q_1, A q_1, …, A^{m−1} q_1}`` and the
    tridiagonal ``T_m = Q_mᵀ A Q_m``; each new Lanczos vector is orthogonalised twice against all
    earlier ones (no spurious copies of converged eigenvalues). The eigenpairs ``(θ_i, s_i)`` of
    ``T_m`` give the Ritz pairs ``(θ_i, Q_m s_i)``, which approach the extreme eigenpairs of ``A``
    first (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, §10.1). When the Krylov space is
    exhausted early (repeated eigenvalues), the run continues from a new random vector orthogonal to
    the basis, so ``k`` pairs are found for any ``k ≤ D``; with ``n_iter = D`` the result is exact up
    to rounding.

    "Top" is algebraic: ``which="largest"`` gives the ``k`` largest eigenvalues (for the PSD
    Fisher/GGN the largest in magnitude too); for an indefinite Hessian ``"smallest"`` gives the most
    negative curvature and ``"largest_magnitude"`` the ``k`` largest ``|λ|``. Whatever ``which``, the
    pairs are returned with ``values`` in descending order. Convergence is not measured: compare runs
    with a larger ``n_iter``.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}``, ``A`` symmetric; called ``n_iter`` times on single vectors.
        like: ``{name: [*P]}`` (the parameters, or any subset of them): names, shapes, dtype, device.
        k: number of eigenpairs, ``1 ≤ k ≤ D``.
        n_iter: Lanczos steps ``m`` (``k ≤ m``; more than ``D`` is taken as ``D``); default
            ``min(D, max(2k, k + 20))``.
        generator: seeds the start (and restart) vectors.
        which: ``"largest"``, ``"smallest"`` or ``"largest_magnitude"``.

    Returns:
        :class:`Eigen`: ``values`` ``[k]`` descending, ``vectors`` ``{name: [k, *P]}`` orthonormal
        (``⟨u_i, u_j⟩ = δ_ij`` over all names), each vector's sign arbitrary.

    Raises:
        FisherError: ``k`` or ``n_iter`` not a positive integer, ``k > D`` or ``k > n_iter``, an
            unknown ``which``, a matvec result not shaped like ``like`` or non-finite.

    """
    where = "lanczos"
    op = Flat(where, matvec, like)
    k = positive_int(where, "k", k)
    if k > op.dim:
        raise FisherError(f"{where}: k={k} exceeds the dimension D={op.dim} of like")
    if which not in WHICH:
        raise FisherError(f"{where}: which must be one of {list(WHICH)}, got {which!r}")
    check_generator(where, generator)
    m = min(op.dim, max(2 * k, k + 20)) if n_iter is None else min(op.dim, positive_int(where, "n_iter", n_iter))
    if m < k:
        raise FisherError(f"{where}: n_iter={n_iter} is smaller than k={k}; Lanczos needs at least k steps")
    run = lanczos_run(op, op.probes(1, generator, "gaussian"), m,
                      restart=lambda: op.probes(1, generator, "gaussian")[0])
    values, s = tridiagonal_eigh(run.alphas[0], run.betas[0])
    chosen = _select(values, k, which)
    ritz = s[:, chosen].T.to(device=op.device, dtype=op.dtype) @ run.basis[0]  # [k, D]
    return _eigen(op, values[chosen], ritz)


def power_iteration(matvec: Matvec, like: Mapping[str, Tensor], k: int = 1, n_iter: int = 100, tol: float = 1e-4,
                    generator: torch.Generator | None = None) -> Eigen:
    """The ``k`` dominant eigenpairs (largest ``|λ|``) of a symmetric ``A`` by power iteration with deflation.

    For ``i = 1, …, k`` in turn, with ``P_i = I − Σ_{j<i} u_j u_jᵀ`` projecting out the pairs found:

    .. math::
        v \\leftarrow \\frac{P_i A P_i v}{\\lVert P_i A P_i v \\rVert}, \\qquad λ = v^\\top A v

    from a random Gaussian start, until ``‖P_i A v − λ v‖ ≤ tol·|λ|`` or ``n_iter`` products. This is
    the method of PyHessian (Yao et al. 2020, "PyHessian: Neural Networks Through the Lens of the
    Hessian") for the top Hessian eigenvalues; it converges at the rate ``|λ_{i+1}/λ_i|`` and needs a
    spectral gap. For the PSD Fisher/GGN the dominant eigenvalues are the largest; for an indefinite
    Hessian they may be negative. :func:`lanczos` is cheaper for the same accuracy.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}``, ``A`` symmetric; up to ``k · n_iter`` calls on single vectors.
        like: ``{name: [*P]}``: names, shapes, dtype, device.
        k: number of eigenpairs, ``1 ≤ k ≤ D``.
        n_iter: products per eigenpair at most, ``≥ 1``.
        tol: relative residual ``‖A v − λ v‖ / |λ|`` at which a pair is accepted, ``≥ 0``.
        generator: seeds the ``k`` start vectors (drawn at once).

    Returns:
        :class:`Eigen`: ``values`` ``[k]`` sorted descending (not in the order found), ``vectors``
        ``{name: [k, *P]}`` orthonormal. A pair that did not reach ``tol`` is returned as it stands
        after ``n_iter`` products.

    Raises:
        FisherError: bad ``k``, ``n_iter``, ``tol``, ``k > D``, a matvec result not shaped like
            ``like`` or non-finite.

    """
    where = "power_iteration"
    op = Flat(where, matvec, like)
    k = positive_int(where, "k", k)
    n_iter = positive_int(where, "n_iter", n_iter)
    tol = finite_number(where, "tol", tol)
    if k > op.dim:
        raise FisherError(f"{where}: k={k} exceeds the dimension D={op.dim} of like")
    check_generator(where, generator)
    starts = op.probes(k, generator, "gaussian")
    found = starts.new_zeros(k, op.dim)
    values = starts.new_zeros(k)
    for i in range(k):
        basis = found[None, :i]

        def project(x: Tensor, basis: Tensor = basis) -> Tensor:
            return orthogonalize(x[None], basis)[0]

        v = project(starts[i])
        v = v / v.norm()
        lam = v.new_zeros(())
        for step in range(n_iter):
            w = project(op(v[None])[0])
            lam = v @ w  # the Rayleigh quotient of v
            w_norm = w.norm()
            if step == n_iter - 1 or bool(w_norm == 0) or bool((w - lam * v).norm() <= tol * lam.abs()):
                break
            v = w / w_norm
        found[i], values[i] = v, lam
    return _eigen(op, values, found)


# --- trace and density ------------------------------------------------------------------------------

def _mean_and_error(samples: Tensor) -> tuple[Tensor, Tensor]:
    """The sample mean and its standard error ``s / √n`` (NaN for one sample)."""
    n = samples.numel()
    error = samples.std(unbiased=True) / math.sqrt(n) if n > 1 else torch.full_like(samples[0], math.nan)
    return samples.mean(), error


def hutchinson_trace(matvec: Matvec, like: Mapping[str, Tensor], n_probes: int,
                     generator: torch.Generator | None = None, method: TraceMethod = "hutchinson",
                     batched: bool = True, chunk_size: int | None = None) -> TraceEstimate:
    """Stochastic estimate of ``tr(A)`` from ``n_probes`` matrix-vector products.

    ``method="hutchinson"`` (Hutchinson 1989), with Rademacher probes ``z_i`` (entries ±1):

    .. math::
        \\widehat{\\mathrm{tr}}(A) = \\frac{1}{n} \\sum_{i=1}^{n} z_i^\\top A z_i, \\qquad
        \\mathrm{SE} = s / \\sqrt{n}

    with ``s`` the sample standard deviation of the ``z_iᵀ A z_i``; unbiased, with variance
    ``2 (‖A‖_F² − Σ_i A_ii²) / n``.

    ``method="hutch++"`` (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
    Estimation") spends the same ``n`` products in three parts: ``s = ⌊n/3⌋`` on a sketch ``A S``
    (Rademacher ``S`` ``[D, s]``), orthonormalised to ``Q``; ``s`` on ``tr(Qᵀ A Q)`` exactly; the
    remaining ``g = n − 2s`` on Hutchinson for the deflated rest:

    .. math::
        \\widehat{\\mathrm{tr}}(A) = \\mathrm{tr}(Q^\\top A Q) + \\frac{1}{g} \\sum_{i=1}^{g}
        h_i^\\top A h_i, \\qquad h_i = (I − Q Q^\\top) z_i

    Given ``Q`` the first term is exact and the second unbiased for ``tr((I − QQᵀ) A (I − QQᵀ))``, so
    the standard error reported is that of the residual Hutchinson part, ``s_h / √g`` over the
    ``h_iᵀ A h_i`` (conditional on the sketch). For a matrix whose trace sits in a few large
    eigenvalues (a Fisher, typically) it is far below Hutchinson's at the same cost.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}`` (and ``{name: [K, *P]}`` when ``batched``).
        like: ``{name: [*P]}``: names, shapes, dtype, device.
        n_probes: matrix-vector products in all, ``≥ 1`` (``≥ 3`` for ``"hutch++"``).
        generator: seeds the probes; the same state gives the same estimate.
        method: ``"hutchinson"`` or ``"hutch++"``.
        batched: call ``matvec`` with many probes at once (``{name: [K, *P]}``); ``False``: one per call.
        chunk_size: probes per call at most (default all), to bound memory.

    Returns:
        :class:`TraceEstimate` ``(estimate, standard_error)``, 0-d tensors in the working dtype; the
        standard error is NaN when it rests on a single sample.

    Raises:
        FisherError: bad ``n_probes``, ``method``, ``chunk_size``, a matvec result not shaped like
            ``like`` or non-finite.

    """
    where = "hutchinson_trace"
    op = Flat(where, matvec, like, batched)
    if method not in TRACE_METHODS:
        raise FisherError(f"{where}: method must be one of {list(TRACE_METHODS)}, got {method!r}")
    n_probes = positive_int(where, "n_probes", n_probes, 3 if method == "hutch++" else 1)
    chunk_size = None if chunk_size is None else positive_int(where, "chunk_size", chunk_size)
    check_generator(where, generator)
    if method == "hutchinson":
        z = op.probes(n_probes, generator, "rademacher")
        return TraceEstimate(*_mean_and_error((z * op(z, chunk_size)).sum(-1)))
    s = n_probes // 3
    probes = op.probes(n_probes - s, generator, "rademacher")  # the sketch's s, then the g = n − 2s
    q = torch.linalg.qr(op(probes[:s], chunk_size).T).Q.T  # [min(s, D), D] orthonormal rows
    h = probes[s:] - (probes[s:] @ q.T) @ q  # [g, D]
    product = op(torch.cat([q, h]), chunk_size)
    low_rank = (q * product[: len(q)]).sum()
    rest, error = _mean_and_error((h * product[len(q) :]).sum(-1))
    return TraceEstimate(low_rank + rest, error)


def spectral_density(matvec: Matvec, like: Mapping[str, Tensor], n_probes: int, n_iter: int,
                     generator: torch.Generator | None = None, batched: bool = True,
                     chunk_size: int | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (SLQ) of the eigenvalue density of a symmetric ``A``.

    For each probe ``v_p = z_p / ‖z_p‖`` (``z_p`` Rademacher), ``m = n_iter`` Lanczos steps with full
    reorthogonalisation give ``T_p = Σ_i θ_{p,i} s_{p,i} s_{p,i}ᵀ``; the Gauss quadrature with nodes
    ``λ_{p,i} = θ_{p,i}`` and weights ``w_{p,i} = (s_{p,i})_1²`` is exact for polynomials of degree
    ``< 2m``: ``Σ_i w_{p,i} f(λ_{p,i}) = v_pᵀ f(A) v_p``. Averaged over probes it estimates the
    spectral density ``φ(t) = (1/D) Σ_j δ(t − λ_j)`` (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao
    2019, "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"; Yao et al.
    2020, PyHessian). The probes' Lanczos recurrences run side by side: one (batched) matvec call per
    step for all probes of a chunk.

    A probe whose Krylov space is exhausted before ``m`` steps (``n_iter`` above the number of distinct
    eigenvalues it sees, always when ``n_iter > D``) stops there: its quadrature is then exact, and its
    remaining nodes are 0 with weight 0.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}`` (and ``{name: [K, *P]}`` when ``batched``).
        like: ``{name: [*P]}``: names, shapes, dtype, device.
        n_probes: number of probes ``≥ 1``.
        n_iter: Lanczos steps per probe ``≥ 1``.
        generator: seeds the probes (drawn as :func:`hutchinson_trace` draws them: the same
            generator state gives the same probes).
        batched: call ``matvec`` with the probes of a chunk at once; ``False``: one per call.
        chunk_size: probes run side by side at most (default all). Memory: ``chunk_size · n_iter · D``
            numbers for the Lanczos bases.

    Returns:
        :class:`SpectralDensity` ``(nodes, weights)``, both ``[n_probes, n_iter]`` in the working dtype;
        ``weights.sum(-1)`` is 1 for every probe. Use :func:`density` and :func:`slq_trace`.

    Raises:
        FisherError: bad ``n_probes``, ``n_iter``, ``chunk_size``, a matvec result not shaped like
            ``like`` or non-finite.

    """
    where = "spectral_density"
    op = Flat(where, matvec, like, batched)
    n_probes = positive_int(where, "n_probes", n_probes)
    n_iter = positive_int(where, "n_iter", n_iter)
    chunk_size = n_probes if chunk_size is None else positive_int(where, "chunk_size", chunk_size)
    check_generator(where, generator)
    starts = op.probes(n_probes, generator, "rademacher")
    nodes = torch.zeros(n_probes, n_iter, dtype=torch.float64)
    weights = torch.zeros(n_probes, n_iter, dtype=torch.float64)
    for first in range(0, n_probes, chunk_size):
        run = lanczos_run(op, starts[first : first + chunk_size], min(n_iter, op.dim))
        for p, steps in enumerate(run.steps):
            theta, s = tridiagonal_eigh(run.alphas[p, :steps], run.betas[p, : steps - 1])
            nodes[first + p, :steps] = theta
            weights[first + p, :steps] = s[0] ** 2
    return SpectralDensity(nodes.to(device=op.device, dtype=op.dtype), weights.to(device=op.device, dtype=op.dtype))


def _check_density(where: str, sd: object) -> SpectralDensity:
    if not isinstance(sd, SpectralDensity):
        raise FisherError(f"{where}: sd must be a SpectralDensity (from spectral_density), got {type(sd).__name__}")
    return sd


def density(sd: SpectralDensity, grid: Tensor, sigma: float) -> Tensor:
    """The SLQ density smoothed by a Gaussian of width ``σ``, on ``grid``.

    .. math::
        φ_σ(t) = \\frac{1}{n_{\\text{probes}}} \\sum_p \\sum_i w_{p,i} \\,
        \\frac{1}{σ\\sqrt{2π}} \\exp\\Big(−\\frac{(t − λ_{p,i})^2}{2σ^2}\\Big)

    a probability density over ``t`` (it integrates to 1 over the real line, so a grid reaching a few
    ``σ`` beyond the extreme nodes gives ``torch.trapezoid(φ, grid) ≈ 1``). ``D · φ_σ`` counts eigenvalues
    per unit of ``t``.

    Args:
        sd: from :func:`spectral_density`.
        grid: ``[G]`` points ``t``, finite.
        sigma: the smoothing width ``σ > 0``, in the units of the eigenvalues.

    Returns:
        ``[G]``, in the dtype of ``grid`` (promoted with the nodes') on its device.

    Raises:
        FisherError: ``sd`` not a :class:`SpectralDensity`, ``grid`` not a finite 1-D tensor, ``σ ≤ 0``.

    """
    where = "density"
    sd = _check_density(where, sd)
    if not isinstance(grid, Tensor) or grid.ndim != 1 or not bool(torch.isfinite(grid).all()):
        got = f"shape {tuple(grid.shape)}" if isinstance(grid, Tensor) else type(grid).__name__
        raise FisherError(f"{where}: grid must be a finite 1-D tensor of points, got {got}")
    sigma = finite_number(where, "sigma", sigma, strict=True)
    dtype = torch.promote_types(grid.dtype, sd.nodes.dtype)
    t = grid.to(torch.float64)[:, None, None]  # [G, 1, 1]
    nodes, weights = sd.nodes.to(grid.device, torch.float64), sd.weights.to(grid.device, torch.float64)
    kernel = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))  # [G, P, m]
    return (kernel * weights).sum(dim=(1, 2)).div(nodes.shape[0]).to(dtype)


def slq_trace(sd: SpectralDensity, like: Mapping[str, Tensor]) -> Tensor:
    """The SLQ estimate of ``tr(A)``: ``D · mean_p Σ_i w_{p,i} λ_{p,i}``.

    ``Σ_i w_{p,i} λ_{p,i} = v_pᵀ A v_p = z_pᵀ A z_p / D`` for the Rademacher ``z_p``, so this equals
    :func:`hutchinson_trace` on the same probes (the same generator state), whatever ``n_iter``.

    Args:
        sd: from :func:`spectral_density`.
        like: the ``like`` it was computed with (for ``D``).

    Returns:
        A 0-d tensor.

    """
    where = "slq_trace"
    sd = _check_density(where, sd)
    if not isinstance(like, Mapping) or not like or not all(isinstance(p, Tensor) for p in like.values()):
        raise FisherError(f"{where}: like must be the non-empty {{name: tensor}} dict spectral_density was given")
    return vectors.dimension(like) * (sd.weights * sd.nodes).sum(-1).mean()


# --- scipy ------------------------------------------------------------------------------------------

def linear_operator(matvec: Matvec, params: Mapping[str, Tensor], batched: bool = True) -> "LinearOperator":
    """``matvec`` as a :class:`scipy.sparse.linalg.LinearOperator` of shape ``(D, D)``.

    A numpy vector ``x`` ``[D]`` is read in the order of ``params``, each tensor row-major
    (:func:`fisherfx.vectors.flatten` / :func:`~fisherfx.vectors.unflatten`), moved to the parameters'
    device and dtype, and ``A x`` is returned as numpy in the same order. ``matmat`` (``[D, K]``) is one
    call with ``{name: [K, *P]}`` when ``batched``. ``A`` is taken as symmetric: ``rmatvec`` is
    ``matvec``. So ``scipy.sparse.linalg.eigsh``, ``cg``, ``minres`` … apply to any fisherfx operator.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}`` (and ``{name: [K, *P]}`` when ``batched``).
        params: ``{name: [*P]}``: names, shapes, dtype, device (any subset of the parameters).
        batched: ``matmat`` in one call; ``False``: one call per column.

    Returns:
        A ``LinearOperator`` with ``shape = (D, D)`` and the numpy dtype of the working dtype
        (float32 for float32 / bfloat16 / float16 parameters, float64 for float64).

    Raises:
        FisherError: scipy is not installed (``pip install scipy``), ``params`` not a dict of
            floating-point tensors; when called, a matvec result not shaped like ``params``.

    """
    where = "linear_operator"
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator  # noqa: F811 (the optional import at call time)
    except ImportError as err:
        raise FisherError(f"{where}: needs scipy, which is not installed; pip install scipy") from err
    op = Flat(where, matvec, params, batched, like_name="params")
    numpy_dtype = torch.empty((), dtype=op.dtype).numpy().dtype

    def to_torch(x: Any) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(device=op.device, dtype=op.dtype)

    def matvec_np(x: Any) -> Any:
        return op(to_torch(x).reshape(1, op.dim))[0].cpu().numpy()

    def matmat_np(x: Any) -> Any:
        return op(to_torch(x).reshape(op.dim, -1).T).T.cpu().numpy()

    return LinearOperator((op.dim, op.dim), matvec=matvec_np, rmatvec=matvec_np, matmat=matmat_np,
                          rmatmat=matmat_np, dtype=numpy_dtype)


__all__ = ["CGResult", "Eigen", "SpectralDensity", "TraceEstimate", "cg_solve", "density", "hutchinson_trace",
           "lanczos", "linear_operator", "power_iteration", "slq_trace", "spectral_density"]
