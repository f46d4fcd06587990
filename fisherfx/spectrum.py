"""Solves and spectra of any symmetric operator on parameter-space vectors.

A *matvec* is any function ``{name: [*P]} -> {name: [*P]}`` (it may also accept ``{name: [K, *P]}``
for ``K`` vectors at once), for example ``functools.partial(ffx.ggn_vp, problem, params, batch)``.
"""

from typing import NamedTuple

from torch import Tensor


class CGResult(NamedTuple):
    """The result of :func:`cg_solve`."""

    x: dict[str, Tensor]  # the solution, shaped like b
    residuals: Tensor  # [iterations + 1] relative residual norms ‖b − (A + λI)x_i‖ / ‖b‖
    iterations: int
    converged: bool


class Eigen(NamedTuple):
    """Eigenpairs: ``values`` ``[k]`` descending, ``vectors`` ``{name: [k, *P]}`` (orthonormal)."""

    values: Tensor
    vectors: dict[str, Tensor]
