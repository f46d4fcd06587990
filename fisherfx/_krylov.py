"""The machinery under :mod:`fisherfx.spectrum`: a matvec seen on flat ``[K, D]`` tensors, and the
Lanczos recurrence with full reorthogonalisation for ``P`` independent starts at once.

Vectors are flattened in the order of ``like``, each tensor row-major (:func:`fisherfx.vectors.flatten`).
The arithmetic runs in ``like``'s dtype promoted to at least float32; the matvec is called with
vectors in each parameter's own dtype and device.
"""

from collections.abc import Callable, Mapping
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import vectors
from ._errors import FisherError

Matvec = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]

# A Lanczos step breaks down (the Krylov space is invariant) when the new residual is below this many
# units of rounding of the operator's scale seen so far: full reorthogonalisation leaves a residual of
# a few eps·‖A‖·(step count) there, well under it; a genuine direction is far above it.
BREAKDOWN_EPS = 1e3


class Flat:
    """``matvec`` on flat ``[K, D]`` tensors in the order of ``like``.

    ``batched``: one call with ``{name: [K, *P]}`` for ``K > 1`` vectors; else one call per vector
    (``{name: [*P]}``). Every result is checked against ``like`` (names, shapes, finite).
    """

    def __init__(self, where: str, matvec: Matvec, like: Mapping[str, Tensor], batched: bool = True,
                 name: str = "matvec", like_name: str = "like"):
        if not callable(matvec):
            raise FisherError(f"{where}: {name} must be a function {{name: [*P]}} -> {{name: [*P]}}, got "
                              f"{type(matvec).__name__}")
        if not isinstance(batched, bool):
            raise FisherError(f"{where}: batched must be True or False, got {batched!r}")
        if not isinstance(like, Mapping) or not like:
            raise FisherError(f"{where}: {like_name} must be a non-empty {{name: tensor}} dict (shaped like the "
                              f"parameters), got {like if isinstance(like, Mapping) else type(like).__name__!r}")
        for key, p in like.items():
            if not isinstance(p, Tensor) or not p.dtype.is_floating_point:
                got = p.dtype if isinstance(p, Tensor) else type(p).__name__
                raise FisherError(f"{where}: {like_name}[{key!r}] must be a floating-point tensor, got {got}")
        devices = {p.device for p in like.values()}
        if len(devices) > 1:
            raise FisherError(f"{where}: {like_name}'s tensors lie on several devices {sorted(map(str, devices))}; "
                              "the solvers work on flat vectors on one device")
        self.where, self.matvec, self.batched, self.name = where, matvec, batched, name
        self.like = dict(like)
        dtype = torch.float32
        for p in like.values():
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype, self.device = dtype, devices.pop()
        self.dim = vectors.dimension(like)

    def vector(self, flat: Tensor) -> vectors.Vector:
        """``[*K, D]`` → ``{name: [*K, *P]}`` in each parameter's dtype."""
        parts = vectors.unflatten(flat, self.like)
        return {name: parts[name].to(p.dtype) for name, p in self.like.items()}

    def flat(self, v: Mapping[str, Tensor]) -> Tensor:
        """``{name: [*K, *P]}`` → ``[*K, D]`` in the working dtype, detached."""
        return vectors.flatten(v, self.like).detach().to(device=self.device, dtype=self.dtype)

    def read(self, option: str, v: Mapping[str, Tensor]) -> tuple[Tensor, int | None]:
        """A user's vector (checked: names, shapes, finite) as ``[D]`` or ``[K, D]``, with its ``K``."""
        v, k = vectors.check_vector(self.where, v, self.like, option=option)
        return self.flat(v), k

    def __call__(self, x: Tensor, chunk_size: int | None = None) -> Tensor:
        """``A x`` for ``x`` ``[K, D]``, in calls of at most ``chunk_size`` vectors (default all)."""
        step = x.shape[0] if chunk_size is None else chunk_size
        if x.shape[0] > step:
            return torch.cat([self(part) for part in x.split(step)])
        if self.batched and x.shape[0] > 1:
            return self._batch(x)
        return torch.stack([self._one(row) for row in x]) if x.shape[0] else x.clone()

    def _one(self, x: Tensor) -> Tensor:
        out, _ = vectors.check_vector(self.where, self.matvec(self.vector(x)), self.like, option=f"{self.name}(v)",
                                      batched=False)
        return self.flat(out)

    def _batch(self, x: Tensor) -> Tensor:
        k = x.shape[0]
        try:
            result = self.matvec(self.vector(x))
        except torch.cuda.OutOfMemoryError:
            raise  # not a matter of the call's form: chunk_size bounds the vectors per call
        except Exception as err:
            raise FisherError(f"{self.where}: {self.name} failed on {k} vectors at once ({{name: [K, *P]}} with "
                              f"K={k}): {type(err).__name__}: {err}; if it takes only single vectors "
                              "{name: [*P]}, pass batched=False") from err
        out, got = vectors.check_vector(self.where, result, self.like, option=f"{self.name}(v)", batched=True)
        if got != k:
            raise FisherError(f"{self.where}: {self.name}(v) returned {got} vectors for {k} (v had a leading axis "
                              f"K={k}); expected the same K")
        return self.flat(out)

    def probes(self, k: int, generator: torch.Generator | None,
               distribution: Literal["rademacher", "gaussian"]) -> Tensor:
        """``[k, D]`` random vectors, drawn as :func:`fisherfx.vectors.random_like` draws them."""
        return self.flat(vectors.random_like(self.like, k, generator, distribution, dtype=self.dtype))


def orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """``w − Bᵀ(B w)`` twice (classical Gram–Schmidt, repeated): ``w`` ``[P, D]``, ``basis`` ``[P, j, D]``."""
    for _ in range(2):
        w = w - torch.einsum("pj,pjd->pd", torch.einsum("pjd,pd->pj", basis, w), basis)
    return w


class Recurrence(NamedTuple):
    """``P`` Lanczos runs: ``T_p`` has diagonal ``alphas[p, :steps[p]]`` and off-diagonal
    ``betas[p, :steps[p] - 1]``; ``basis[p, :steps[p]]`` are the orthonormal Lanczos vectors.
    """

    alphas: Tensor  # [P, m] float64, CPU
    betas: Tensor  # [P, m - 1] float64, CPU (0 where a run was restarted)
    steps: list[int]  # per run, <= m (fewer when the Krylov space was exhausted and not restarted)
    basis: Tensor  # [P, m, D]


def lanczos_run(op: Flat, start: Tensor, m: int, restart: Callable[[], Tensor] | None = None) -> Recurrence:
    """``m`` Lanczos steps with full reorthogonalisation from each row of ``start`` ``[P, D]`` at once.

    ``A q_j = β_{j−1} q_{j−1} + α_j q_j + β_j q_{j+1}``, every new ``q`` orthogonalised twice against
    all earlier ones. The ``P`` products of a step are one (batched) matvec call. When ``β_j``
    vanishes (an invariant Krylov space): with ``restart`` the run continues from ``restart()`` ``[D]``
    orthogonalised against its basis (``β_j = 0``), else the run stops there (``steps < m``) and
    costs no further products.
    """
    p_runs, dim = start.shape
    basis = start.new_zeros(p_runs, m, dim)
    basis[:, 0] = start / start.norm(dim=-1, keepdim=True)
    alphas = torch.zeros(p_runs, m, dtype=torch.float64)
    betas = torch.zeros(p_runs, max(m - 1, 0), dtype=torch.float64)
    steps = [m] * p_runs
    active = list(range(p_runs))
    scale = torch.zeros(p_runs, dtype=torch.float64)
    threshold = BREAKDOWN_EPS * torch.finfo(op.dtype).eps
    beta_prev = start.new_zeros(p_runs)
    for j in range(m):
        q = basis[:, j]
        w = torch.zeros_like(q)
        w[active] = op(q[active])
        alpha = (q * w).sum(-1)
        w = w - alpha[:, None] * q
        if j:
            w = w - beta_prev[:, None] * basis[:, j - 1]
        w = orthogonalize(w, basis[:, : j + 1])
        alphas[:, j] = alpha.double().cpu()
        if j == m - 1:
            break
        beta = w.norm(dim=-1)
        beta_cpu = beta.double().cpu()
        scale = torch.maximum(scale, torch.maximum(alphas[:, j].abs(), beta_cpu))
        broken = [r for r in active if beta_cpu[r] <= threshold * scale[r]]
        basis[:, j + 1] = w / beta.clamp_min(torch.finfo(op.dtype).tiny)[:, None]
        for r in broken:
            beta[r] = beta_cpu[r] = 0.0
            if restart is None:
                basis[r, j + 1] = 0.0
                steps[r] = j + 1
                active.remove(r)
            else:
                v = orthogonalize(restart()[None], basis[r : r + 1, : j + 1])[0]
                basis[r, j + 1] = v / v.norm()
        betas[:, j] = beta_cpu
        beta_prev = beta
        if not active:
            break
    return Recurrence(alphas, betas, steps, basis)


def tridiagonal_eigh(alphas: Tensor, betas: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric tridiagonal ``T``, float64."""
    t = torch.diag(alphas.double())
    if betas.numel():
        off = torch.diag(betas.double(), 1)
        t = t + off + off.T
    return torch.linalg.eigh(t)
