"""Conjugate gradients for ``(A + λI) x = b`` on parameter-space vectors; public as
:func:`fisherfx.spectrum.cg_solve` (see that module for what a matvec is).
"""

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ._errors import FisherError
from ._krylov import Flat, Matvec
from ._options import finite_number, positive_int


class CGResult(NamedTuple):
    """The result of :func:`cg_solve`."""

    x: dict[str, Tensor]  # the solution, shaped like b
    residuals: Tensor  # [iterations + 1] (or [iterations + 1, K]) relative residual norms ‖b − (A + λI)x_i‖ / ‖b‖
    iterations: int
    converged: bool


def cg_solve(matvec: Matvec, b: Mapping[str, Tensor], damping: float = 0.0, tol: float = 1e-6,
             max_iter: int | None = None, x0: Mapping[str, Tensor] | None = None,
             preconditioner: Matvec | None = None, like: Mapping[str, Tensor] | None = None,
             batched: bool = True) -> CGResult:
    """Solve ``(A + λI) x = b`` by (preconditioned) conjugate gradients.

    .. math::
        x_{i+1} = x_i + α_i p_i, \\quad r_{i+1} = r_i − α_i (A + λI) p_i, \\quad
        α_i = \\frac{r_i^\\top z_i}{p_i^\\top (A + λI) p_i}, \\quad z_i = M r_i, \\quad
        p_{i+1} = z_{i+1} + \\frac{r_{i+1}^\\top z_{i+1}}{r_i^\\top z_i} p_i

    (Hestenes & Stiefel 1952) with ``M`` the preconditioner (identity by default). It stops when the
    relative residual ``‖r_i‖ / ‖b‖ ≤ tol`` or after ``max_iter`` steps. ``A + λI`` must be positive
    definite: the Fisher/GGN is PSD (``λ > 0`` makes it definite), the Hessian may be indefinite.

    With ``like`` given, ``b`` may hold ``K`` right-hand sides (``{name: [K, *P]}``): the ``K`` systems
    run side by side, one (batched) matvec call per step for those not yet converged; a converged one
    is left as it is.

    Args:
        matvec: ``v ↦ A v`` on ``{name: [*P]}`` (and ``{name: [K, *P]}`` when ``batched``).
        b: ``{name: [*P]}``, the right-hand side (finite); or ``{name: [K, *P]}`` with ``like`` given.
        damping: ``λ ≥ 0``.
        tol: relative residual to reach, ``≥ 0``.
        max_iter: CG steps at most, ``≥ 1``. Default ``min(10·D, 1000)`` with ``D`` the dimension: CG
            reaches the solution in ``D`` steps in exact arithmetic, rounding can take a few times
            that on a small ill-conditioned system, and 1000 bounds the cost on a large one.
        x0: starting point shaped like ``b`` (default zero).
        preconditioner: ``r ↦ M r ≈ (A + λI)^{-1} r``, symmetric positive definite, on vectors shaped
            like ``b`` (e.g. ``lambda r: {k: r[k] / (fisher_diag[k] + λ) for k in r}``).
        like: ``{name: [*P]}`` (the parameters), needed only for ``K`` right-hand sides: it tells a
            leading axis from a parameter axis. Without it ``b`` is one vector and gives the shapes.
        batched: call ``matvec`` (and ``preconditioner``) with all ``K`` vectors at once; ``False``:
            once per vector.

    Returns:
        :class:`CGResult`: ``x`` shaped like ``b``, in the dtypes of ``like`` (or of ``b``);
        ``residuals`` ``[iterations + 1]`` (``[iterations + 1, K]``) the relative residual norms from
        ``x0`` on, the last one recomputed from ``x`` as ``‖b − (A + λI)x‖ / ‖b‖`` (one more product)
        rather than taken from the recurrence; ``iterations`` the CG steps taken; ``converged`` True
        only if that last residual is ``≤ tol`` for every system. A ``b`` of zero gives ``x = 0``
        and residual 0.

    Raises:
        FisherError: bad options, ``b``/``x0`` not shaped like ``like`` or non-finite, a matvec or
            preconditioner result of another structure, or a non-positive ``pᵀ(A + λI)p`` or
            ``rᵀMr`` (the system or the preconditioner is not positive definite).

    """
    where = "cg_solve"
    damping = finite_number(where, "damping", damping)
    tol = finite_number(where, "tol", tol)
    op = Flat(where, matvec, b if like is None else like, batched, like_name="b" if like is None else "like")
    rhs, k = op.read("b", b)
    max_iter = min(10 * op.dim, 1000) if max_iter is None else positive_int(where, "max_iter", max_iter)
    rhs = rhs.reshape(-1, op.dim)  # [K, D]
    if x0 is None:
        x = torch.zeros_like(rhs)
    else:
        x, k0 = op.read("x0", x0)
        if k0 != k:
            raise FisherError(f"{where}: x0 must be shaped like b ({'no leading axis' if k is None else f'K={k}'}), "
                              f"got {'no leading axis' if k0 is None else f'K={k0}'}")
        x = x.reshape(-1, op.dim).clone()
    precondition = None if preconditioner is None else Flat(where, preconditioner, op.like, batched, "preconditioner")

    def system(v: Tensor) -> Tensor:
        return op(v) + damping * v

    def apply_m(r: Tensor) -> Tensor:
        return r if precondition is None else precondition(r)

    def check_preconditioned(r: Tensor, rz: Tensor, step: int) -> None:
        if precondition is not None and bool(((rz <= 0) & (r.norm(dim=-1) > 0)).any()):
            raise FisherError(f"{where}: preconditioner is not positive definite (rᵀMr ≤ 0 at step {step}); "
                              "expected r ↦ M r with M symmetric positive definite")

    b_norm = rhs.norm(dim=-1)
    denominator = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    if x0 is not None and bool((b_norm == 0).any()):
        x[b_norm == 0] = 0.0
    r = rhs - system(x) if x0 is not None else rhs.clone()
    z = apply_m(r)
    p = z.clone()
    rz = (r * z).sum(-1)
    check_preconditioned(r, rz, 0)
    res = r.norm(dim=-1) / denominator
    history = [res.cpu()]
    iterations = 0
    while iterations < max_iter:
        todo = (res > tol).nonzero().flatten().tolist()
        if not todo:
            break
        ap = system(p[todo])
        pap = (p[todo] * ap).sum(-1)
        if bool((pap <= 0).any()):
            bad = float(pap[pap <= 0][0])
            raise FisherError(f"{where}: A + λI is not positive definite (pᵀ(A + λI)p = {bad:.3g} at step "
                              f"{iterations + 1}, damping={damping}); CG needs a positive-definite system: raise "
                              "damping (a Hessian may be indefinite)")
        alpha = rz[todo] / pap
        x[todo] += alpha[:, None] * p[todo]
        r[todo] -= alpha[:, None] * ap
        z_new = apply_m(r[todo])
        rz_new = (r[todo] * z_new).sum(-1)
        check_preconditioned(r[todo], rz_new, iterations + 1)
        p[todo] = z_new + (rz_new / rz[todo])[:, None] * p[todo]
        rz[todo] = rz_new
        res = res.clone()  # history holds the previous one (.cpu() of a CPU tensor is the tensor itself)
        res[todo] = r[todo].norm(dim=-1) / denominator[todo]
        iterations += 1
        history.append(res.cpu())
    if iterations:
        history[-1] = ((rhs - system(x)).norm(dim=-1) / denominator).cpu()
    residuals = torch.stack(history)  # [iterations + 1, K]
    converged = bool((residuals[-1] <= tol).all())
    solution = op.vector(x if k is not None else x[0])
    return CGResult(solution, residuals if k is not None else residuals[:, 0], iterations, converged)
