"""Solves and spectra (fisherfx.spectrum) against dense references.

Every operator here is a dense symmetric float64 matrix acting on a dict of parameter-shaped tensors,
so nothing depends on the model operators; the references are ``torch.linalg.solve`` / ``eigh``.
"""

import math
import pathlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisherfx import spectrum, vectors
from fisherfx._errors import FisherError
from fisherfx.testing import assert_tree_close
from tests.strategies import BITWISE, generator, seeds

F64 = torch.float64
LIKE = {"layer.weight": torch.zeros(3, 4, dtype=F64), "layer.bias": torch.zeros(3, dtype=F64),
        "head.weight": torch.zeros(2, 3, dtype=F64)}
D = vectors.dimension(LIKE)  # 21

# Direct solves and full-length Krylov runs in float64: rounding of O(D) operations on
# well-conditioned matrices (condition numbers up to ~1e4) separates the two sides.
DENSE = {"rtol": 1e-8, "atol": 1e-10}
# The same arithmetic in another grouping (batched vs per-vector calls, chunks): last-bit differences.
REGROUPED = {"rtol": 1e-12, "atol": 1e-12}
# Eigenvectors from Lanczos/power iteration against eigh: |<u, v>| = 1 up to the eigenvalue gap's rounding.
ALIGNED = {"rtol": 0.0, "atol": 1e-8}


# --- dense operators -----------------------------------------------------------------------------

class Dense:
    """``v ↦ A v`` for a symmetric ``A`` ``[D, D]`` on vectors shaped like ``like``, counting calls.

    ``batched=False``: fails on a ``{name: [K, *P]}`` input (a single-vector matvec).
    """

    def __init__(self, matrix: torch.Tensor, like=LIKE, batched: bool = True):
        self.matrix, self.like, self.batched = matrix, like, batched
        self.calls = self.vectors = 0

    def __call__(self, v):
        flat = vectors.flatten(v, self.like)  # [*K, D]
        assert self.batched or flat.ndim == 1, "a single-vector matvec was given a batch"
        self.calls += 1
        self.vectors += flat.shape[0] if flat.ndim == 2 else 1
        return vectors.unflatten(flat @ self.matrix, self.like)


def spd(seed: int, dim: int = D, jitter: float = 0.1) -> torch.Tensor:
    m = torch.randn(dim, dim, generator=generator(seed), dtype=F64)
    return m @ m.T / dim + jitter * torch.eye(dim, dtype=F64)


def with_spectrum(seed: int, values: torch.Tensor) -> torch.Tensor:
    """``U diag(values) Uᵀ`` with a random orthogonal ``U``."""
    u, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator(seed), dtype=F64))
    return (u * values) @ u.T


def gapped(seed: int, dim: int = D) -> torch.Tensor:
    """Top eigenvalues 10, 5, 2.5, the rest in [0, 1]: a clear spectral gap."""
    rest = torch.rand(dim - 3, generator=generator(seed + 1), dtype=F64)
    return with_spectrum(seed, torch.cat([torch.tensor([10.0, 5.0, 2.5], dtype=F64), rest]))


def indefinite(seed: int, dim: int = D) -> torch.Tensor:
    """Eigenvalues from −8 to 3 (largest magnitude negative)."""
    return with_spectrum(seed, torch.linspace(-8.0, 3.0, dim, dtype=F64))


def rhs(seed: int, k: int | None = None) -> dict:
    shape = (D,) if k is None else (k, D)
    return vectors.unflatten(torch.randn(shape, generator=generator(seed), dtype=F64), LIKE)


def flat(v) -> torch.Tensor:
    return vectors.flatten(v, LIKE)


def assert_aligned(actual: dict, expected: torch.Tensor) -> None:
    """Each row of ``actual`` (``{name: [k, *P]}``) equals the same row of ``expected`` ``[k, D]`` up to sign."""
    overlap = (flat(actual) * expected).sum(-1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), **ALIGNED)


def top_eigh(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vecs = torch.linalg.eigh(matrix)
    return values.flip(0)[:k], vecs.flip(1)[:, :k].T


# --- cg_solve ------------------------------------------------------------------------------------

@pytest.mark.parametrize("damping", [0.0, 0.3], ids=["undamped", "damped"])
def test_cg_matches_dense_solve(damping):
    a, b = spd(0), rhs(1)
    result = spectrum.cg_solve(Dense(a), b, damping=damping, tol=1e-12)
    expected = torch.linalg.solve(a + damping * torch.eye(D, dtype=F64), flat(b))
    torch.testing.assert_close(flat(result.x), expected, **DENSE)
    assert result.converged and result.residuals.shape == (result.iterations + 1,)
    assert result.residuals[0] == 1.0 and result.residuals[-1] <= 1e-12


def test_cg_reports_non_convergence():
    a, b = spd(2, jitter=1e-3), rhs(3)
    result = spectrum.cg_solve(Dense(a), b, tol=1e-10, max_iter=3)
    assert not result.converged and result.iterations == 3 and result.residuals.shape == (4,)
    # the last residual is the true one of the returned x
    true = torch.linalg.norm(flat(b) - a @ flat(result.x)) / torch.linalg.norm(flat(b))
    torch.testing.assert_close(result.residuals[-1], true, **DENSE)
    assert result.residuals[-1] > 1e-10


def test_preconditioned_cg_takes_fewer_steps():
    scales = torch.logspace(0, 4, D, dtype=F64)
    a = torch.diag(scales) + 0.05 * spd(4)  # ill-conditioned, diagonally dominant
    diagonal = vectors.unflatten(torch.diagonal(a), LIKE)

    def jacobi(r):
        return {name: r[name] / diagonal[name] for name in r}

    b = rhs(5)
    plain = spectrum.cg_solve(Dense(a), b, tol=1e-10)
    preconditioned = spectrum.cg_solve(Dense(a), b, tol=1e-10, preconditioner=jacobi)
    assert plain.converged and preconditioned.converged
    assert preconditioned.iterations < plain.iterations
    torch.testing.assert_close(flat(preconditioned.x), torch.linalg.solve(a, flat(b)), **DENSE)


def test_cg_starts_from_x0():
    a, b = spd(6), rhs(7)
    exact = vectors.unflatten(torch.linalg.solve(a, flat(b)), LIKE)
    at_solution = spectrum.cg_solve(Dense(a), b, tol=1e-8, x0=exact)
    assert at_solution.iterations == 0 and at_solution.converged
    assert_tree_close(at_solution.x, exact, **BITWISE)
    near = vectors.add(exact, rhs(8), 1e-3)
    one_step_near = spectrum.cg_solve(Dense(a), b, max_iter=1, x0=near)
    one_step_cold = spectrum.cg_solve(Dense(a), b, max_iter=1)
    assert one_step_near.residuals[0] < 1e-2 < one_step_cold.residuals[0]
    assert one_step_near.residuals[-1] < one_step_cold.residuals[-1]


def test_cg_zero_rhs_gives_zero():
    zero = vectors.zeros_like(LIKE)
    result = spectrum.cg_solve(Dense(spd(9)), zero, x0=rhs(10))
    assert result.converged and result.iterations == 0
    assert_tree_close(result.x, zero, **BITWISE)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-vector"])
def test_cg_solves_several_right_hand_sides(batched):
    a, b = spd(11), rhs(12, k=3)
    op = Dense(a, batched=batched)
    result = spectrum.cg_solve(op, b, tol=1e-12, like=LIKE, batched=batched)
    expected = torch.linalg.solve(a, flat(b).T).T
    torch.testing.assert_close(flat(result.x), expected, **DENSE)
    assert result.converged and result.residuals.shape == (result.iterations + 1, 3)
    singles = [spectrum.cg_solve(Dense(a), vectors.unflatten(flat(b)[i], LIKE), tol=1e-12) for i in range(3)]
    assert result.iterations == max(s.iterations for s in singles)
    for i, single in enumerate(singles):
        torch.testing.assert_close(flat(result.x)[i], flat(single.x), **DENSE)
    # one call per step (plus the final residual) when batched
    assert op.calls == (result.iterations + 1 if batched else op.vectors)


def test_cg_refuses_an_indefinite_system():
    with pytest.raises(FisherError, match="not positive definite.*damping"):
        spectrum.cg_solve(Dense(indefinite(13)), rhs(14))


# --- lanczos and power iteration -----------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4])
def test_lanczos_matches_eigh(k):
    a = spd(15)
    result = spectrum.lanczos(Dense(a), LIKE, k, n_iter=D, generator=generator(0))
    values, vecs = top_eigh(a, k)
    torch.testing.assert_close(result.values, values, **DENSE)
    assert_aligned(result.vectors, vecs)
    gram = flat(result.vectors) @ flat(result.vectors).T
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64), **DENSE)


def test_lanczos_default_n_iter_finds_a_gapped_top():
    dim = 60  # > k + 20, so the default runs fewer than D steps
    like = {"w": torch.zeros(6, 10, dtype=F64)}
    a = with_spectrum(16, torch.cat([torch.tensor([100.0, 50.0, 25.0], dtype=F64),
                                     torch.rand(dim - 3, generator=generator(17), dtype=F64)]))
    op = Dense(a, like)
    result = spectrum.lanczos(op, like, 3, generator=generator(1))
    assert op.calls == 23  # min(D, max(2k, k + 20))
    torch.testing.assert_close(result.values, torch.tensor([100.0, 50.0, 25.0], dtype=F64), **DENSE)


@pytest.mark.parametrize("which", ["largest", "smallest", "largest_magnitude"])
def test_lanczos_on_an_indefinite_matrix(which):
    a = indefinite(18)
    values = torch.linalg.eigvalsh(a)  # ascending, -8 .. 3
    expected = {"largest": values[-3:], "smallest": values[:3],
                "largest_magnitude": values[values.abs().argsort(descending=True)[:3]]}[which]
    result = spectrum.lanczos(Dense(a), LIKE, 3, n_iter=D, generator=generator(2), which=which)
    torch.testing.assert_close(result.values, expected.sort(descending=True).values, **DENSE)


def test_lanczos_finds_repeated_eigenvalues():
    # the Krylov space of a start vector holds one direction per distinct eigenvalue: restarts find the rest
    a = with_spectrum(19, torch.tensor([5.0] * 4 + [1.0] * (D - 4), dtype=F64))
    result = spectrum.lanczos(Dense(a), LIKE, 5, generator=generator(3))
    torch.testing.assert_close(result.values, torch.tensor([5.0] * 4 + [1.0], dtype=F64), **DENSE)
    gram = flat(result.vectors) @ flat(result.vectors).T
    torch.testing.assert_close(gram, torch.eye(5, dtype=F64), **DENSE)


def test_power_iteration_with_deflation_matches_eigh():
    a = gapped(20)
    result = spectrum.power_iteration(Dense(a), LIKE, k=3, n_iter=500, tol=1e-10, generator=generator(4))
    values, vecs = top_eigh(a, 3)
    torch.testing.assert_close(result.values, values, **DENSE)
    assert_aligned(result.vectors, vecs)


def test_power_iteration_finds_the_dominant_eigenvalue_of_an_indefinite_matrix():
    a = with_spectrum(21, torch.cat([torch.tensor([-10.0, 4.0], dtype=F64), torch.linspace(-1, 1, D - 2,
                                                                                             dtype=F64)]))
    result = spectrum.power_iteration(Dense(a), LIKE, k=2, n_iter=500, tol=1e-10, generator=generator(5))
    torch.testing.assert_close(result.values, torch.tensor([4.0, -10.0], dtype=F64), **DENSE)


@pytest.mark.parametrize("solver", [spectrum.lanczos, spectrum.power_iteration], ids=["lanczos", "power"])
def test_eigen_same_generator_same_result(solver):
    a = gapped(22)
    first = solver(Dense(a), LIKE, 2, generator=generator(6))
    second = solver(Dense(a), LIKE, 2, generator=generator(6))
    torch.testing.assert_close(first.values, second.values, **BITWISE)
    assert_tree_close(first.vectors, second.vectors, **BITWISE)


def test_eigen_vectors_in_the_parameters_dtype():
    like32 = {name: p.float() for name, p in LIKE.items()}
    result = spectrum.lanczos(Dense(spd(23).float(), like32), like32, 2, generator=generator(7))
    assert result.values.dtype == torch.float32
    assert {name: v.shape for name, v in result.vectors.items()} == {n: (2, *p.shape) for n, p in LIKE.items()}
    assert all(v.dtype == torch.float32 for v in result.vectors.values())


# --- trace ---------------------------------------------------------------------------------------

def test_hutchinson_within_four_standard_errors():
    a = spd(24)
    estimate, error = spectrum.hutchinson_trace(Dense(a), LIKE, 50, generator=generator(8))
    assert 0 < error and abs(estimate - torch.trace(a)) < 4 * error


def low_rank_plus_noise(seed: int) -> torch.Tensor:
    """Rank-5 signal with eigenvalues 100..20, plus noise of norm ~0.1: Hutch++'s case."""
    g = torch.randn(D, 5, generator=generator(seed), dtype=F64)
    u, _ = torch.linalg.qr(g)
    return (u * torch.linspace(100.0, 20.0, 5, dtype=F64)) @ u.T + 0.1 * spd(seed + 1, jitter=0.0)


def test_hutchplusplus_beats_hutchinson_at_equal_budget():
    errors = {"hutchinson": [], "hutch++": []}
    for seed in range(6):
        a = low_rank_plus_noise(100 + seed)
        for method in errors:
            estimate, _ = spectrum.hutchinson_trace(Dense(a), LIKE, 18, generator=generator(seed), method=method)
            errors[method].append(float((estimate - torch.trace(a)) ** 2))
    assert sum(errors["hutch++"]) < 0.1 * sum(errors["hutchinson"])


def test_hutchplusplus_is_exact_when_the_sketch_holds_the_range():
    u, _ = torch.linalg.qr(torch.randn(D, 2, generator=generator(25), dtype=F64))
    a = (u * torch.tensor([3.0, 7.0], dtype=F64)) @ u.T  # rank 2, sketch of 3
    op = Dense(a)
    estimate, error = spectrum.hutchinson_trace(op, LIKE, 9, generator=generator(9), method="hutch++")
    torch.testing.assert_close(estimate, torch.tensor(10.0, dtype=F64), **DENSE)
    assert error < 1e-10 and op.vectors == 9 and op.calls == 2


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_same_generator_same_result_batched_or_not(method):
    a = spd(26)
    batched = spectrum.hutchinson_trace(Dense(a), LIKE, 12, generator=generator(10), method=method)
    again = spectrum.hutchinson_trace(Dense(a), LIKE, 12, generator=generator(10), method=method)
    single = Dense(a, batched=False)
    per_vector = spectrum.hutchinson_trace(single, LIKE, 12, generator=generator(10), method=method, batched=False)
    chunked = spectrum.hutchinson_trace(Dense(a), LIKE, 12, generator=generator(10), method=method, chunk_size=5)
    torch.testing.assert_close(tuple(again), tuple(batched), **BITWISE)
    torch.testing.assert_close(tuple(per_vector), tuple(batched), **REGROUPED)
    torch.testing.assert_close(tuple(chunked), tuple(batched), **REGROUPED)
    assert single.calls == 12


def test_hutchinson_one_probe_has_no_standard_error():
    estimate, error = spectrum.hutchinson_trace(Dense(spd(27)), LIKE, 1, generator=generator(11))
    assert math.isfinite(estimate) and math.isnan(error)


# --- stochastic Lanczos quadrature ---------------------------------------------------------------

def test_slq_weights_sum_to_one():
    sd = spectrum.spectral_density(Dense(spd(28)), LIKE, 4, 10, generator=generator(12))
    assert sd.nodes.shape == sd.weights.shape == (4, 10)
    torch.testing.assert_close(sd.weights.sum(-1), torch.ones(4, dtype=F64), **DENSE)
    assert bool((sd.weights >= 0).all())


@pytest.mark.parametrize("n_iter", [1, 5, D])
def test_slq_trace_is_hutchinson_on_the_same_probes(n_iter):
    # Σ_i w_i λ_i = e_1ᵀ T e_1 = vᵀ A v with v = z / ‖z‖ and ‖z‖² = D for Rademacher z: exact
    a = spd(29)
    sd = spectrum.spectral_density(Dense(a), LIKE, 6, n_iter, generator=generator(13))
    hutchinson = spectrum.hutchinson_trace(Dense(a), LIKE, 6, generator=generator(13))
    torch.testing.assert_close(spectrum.slq_trace(sd, LIKE), hutchinson.estimate, **DENSE)


def test_slq_quadrature_is_exact_for_low_degree_moments():
    # Gauss quadrature with m nodes is exact for polynomials of degree < 2m: Σ w λ^j = vᵀ A^j v
    a, m = spd(30), 3
    sd = spectrum.spectral_density(Dense(a), LIKE, 5, m, generator=generator(14))
    z = flat(vectors.random_like(LIKE, 5, generator(14)))  # the probes, drawn as documented
    v = z / z.norm(dim=-1, keepdim=True)
    for j in range(2 * m):
        moment = (sd.weights * sd.nodes**j).sum(-1)
        torch.testing.assert_close(moment, ((v @ torch.linalg.matrix_power(a, j)) * v).sum(-1), **DENSE)


def test_slq_full_length_nodes_are_the_eigenvalues():
    a = spd(31)
    sd = spectrum.spectral_density(Dense(a), LIKE, 1, D, generator=generator(15))
    values, vecs = torch.linalg.eigh(a)
    z = flat(vectors.random_like(LIKE, 1, generator(15)))[0]
    torch.testing.assert_close(sd.nodes[0], values, **DENSE)
    torch.testing.assert_close(sd.weights[0], (vecs.T @ z) ** 2 / D, **DENSE)


def test_slq_beyond_the_krylov_dimension_pads_with_zero_weight():
    a = with_spectrum(32, torch.tensor([2.0] * 10 + [0.5] * (D - 10), dtype=F64))  # 2 distinct eigenvalues
    op = Dense(a)
    sd = spectrum.spectral_density(op, LIKE, 3, 8, generator=generator(16))
    assert op.calls == 2  # the Krylov space is exhausted after 2 steps
    torch.testing.assert_close(sd.weights[:, 2:], torch.zeros(3, 6, dtype=F64), **BITWISE)
    torch.testing.assert_close(sd.nodes[:, :2], torch.tensor([[0.5, 2.0]] * 3, dtype=F64), **DENSE)


def test_density_integrates_to_one():
    a = spd(33)
    sd = spectrum.spectral_density(Dense(a), LIKE, 3, 8, generator=generator(17))
    top = float(torch.linalg.eigvalsh(a)[-1])
    grid = torch.linspace(-2.0, top + 2.0, 2001, dtype=F64)
    phi = spectrum.density(sd, grid, sigma=0.1)
    assert phi.shape == grid.shape and bool((phi >= 0).all())
    torch.testing.assert_close(torch.trapezoid(phi, grid), torch.tensor(1.0, dtype=F64), rtol=0, atol=1e-6)


def test_slq_same_generator_same_result_batched_or_not():
    a = spd(34)
    batched_op, single_op = Dense(a), Dense(a, batched=False)
    batched = spectrum.spectral_density(batched_op, LIKE, 4, 6, generator=generator(18))
    per_vector = spectrum.spectral_density(single_op, LIKE, 4, 6, generator=generator(18), batched=False)
    chunked = spectrum.spectral_density(Dense(a), LIKE, 4, 6, generator=generator(18), chunk_size=3)
    again = spectrum.spectral_density(Dense(a), LIKE, 4, 6, generator=generator(18))
    torch.testing.assert_close(tuple(again), tuple(batched), **BITWISE)
    for other in (per_vector, chunked):
        torch.testing.assert_close(other.nodes, batched.nodes, **REGROUPED)
        torch.testing.assert_close(other.weights, batched.weights, **REGROUPED)
    assert batched_op.calls == 6 and single_op.calls == 24


# --- scipy ---------------------------------------------------------------------------------------

def test_linear_operator_eigsh_and_cg_match_dense():
    sla = pytest.importorskip("scipy.sparse.linalg")
    a, b = spd(35), flat(rhs(36))
    op = spectrum.linear_operator(Dense(a), LIKE)
    assert op.shape == (D, D) and op.dtype == "float64"
    values = sla.eigsh(op, k=3, which="LA", return_eigenvectors=False)
    torch.testing.assert_close(torch.from_numpy(values).sort(descending=True).values, top_eigh(a, 3)[0], **DENSE)
    x, info = sla.cg(op, b.numpy(), rtol=1e-12, atol=0.0)
    assert info == 0
    torch.testing.assert_close(torch.from_numpy(x), torch.linalg.solve(a, b), **DENSE)


def test_linear_operator_flattens_in_the_order_of_params():
    pytest.importorskip("scipy")
    factors = {"layer.weight": 2.0, "layer.bias": 3.0, "head.weight": 5.0}

    def per_name(v):  # written without flatten: each parameter scaled by its own factor
        return {name: factors[name] * t for name, t in v.items()}

    x = torch.arange(D, dtype=F64)
    y = spectrum.linear_operator(per_name, LIKE).matvec(x.numpy())
    expected = flat({name: factors[name] * t for name, t in vectors.unflatten(x, LIKE).items()})
    torch.testing.assert_close(torch.from_numpy(y), expected, **BITWISE)


def test_linear_operator_matmat_is_one_batched_call():
    pytest.importorskip("scipy")
    a, dense = spd(37), Dense(spd(37))
    op = spectrum.linear_operator(dense, LIKE)
    columns = torch.randn(D, 4, generator=generator(19), dtype=F64)
    torch.testing.assert_close(torch.from_numpy(op.matmat(columns.numpy())), a @ columns, **DENSE)
    torch.testing.assert_close(torch.from_numpy(op.rmatvec(columns[:, 0].numpy())), a @ columns[:, 0], **DENSE)
    assert dense.calls == 2


def test_linear_operator_of_float32_params():
    pytest.importorskip("scipy")
    like32 = {name: p.float() for name, p in LIKE.items()}
    op = spectrum.linear_operator(Dense(spd(38).float(), like32), like32)
    assert op.dtype == "float32" and op.matvec(torch.ones(D, dtype=F64).numpy()).dtype == "float32"


def test_linear_operator_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(FisherError, match="pip install scipy"):
        spectrum.linear_operator(Dense(spd(39)), LIKE)


# --- properties ----------------------------------------------------------------------------------

shapes = st.lists(st.lists(st.integers(1, 4), max_size=2).map(tuple), min_size=1, max_size=3)


def split_like(shape_list) -> dict:
    return {f"p{i}": torch.zeros(shape, dtype=F64) for i, shape in enumerate(shape_list)}


@settings(max_examples=25)
@given(shape_list=shapes, seed=seeds, damping=st.sampled_from([0.0, 0.01, 1.0]))
def test_cg_solution_satisfies_the_system(shape_list, seed, damping):
    like = split_like(shape_list)
    dim = vectors.dimension(like)
    a = spd(seed, dim) + damping * torch.eye(dim, dtype=F64)
    b = vectors.unflatten(torch.randn(dim, generator=generator(seed + 1), dtype=F64), like)
    result = spectrum.cg_solve(Dense(a - damping * torch.eye(dim, dtype=F64), like), b, damping=damping, tol=1e-10)
    x, b_flat = vectors.flatten(result.x, like), vectors.flatten(b, like)
    assert result.converged
    assert torch.linalg.norm(a @ x - b_flat) <= 1e-9 * torch.linalg.norm(b_flat)


@settings(max_examples=25)
@given(shape_list=shapes, seed=seeds, data=st.data())
def test_lanczos_values_are_the_top_eigenvalues(shape_list, seed, data):
    like = split_like(shape_list)
    dim = vectors.dimension(like)
    k = data.draw(st.integers(1, dim))
    a = spd(seed, dim)
    result = spectrum.lanczos(Dense(a, like), like, k, n_iter=dim, generator=generator(seed))
    torch.testing.assert_close(result.values, torch.linalg.eigvalsh(a).flip(0)[:k], **DENSE)


# --- bad input -----------------------------------------------------------------------------------

def other_names(v):
    return {"elsewhere": torch.zeros(3)}


def other_shape(v):
    return {name: t.reshape(*t.shape[: t.ndim - LIKE[name].ndim], -1) for name, t in v.items()}


def not_finite(v):
    return {name: t * math.nan for name, t in v.items()}


@pytest.mark.parametrize("bad", [other_names, other_shape, not_finite], ids=lambda f: f.__name__)
@pytest.mark.parametrize("call", [
    lambda mv: spectrum.cg_solve(mv, rhs(0)),
    lambda mv: spectrum.lanczos(mv, LIKE, 2),
    lambda mv: spectrum.power_iteration(mv, LIKE),
    lambda mv: spectrum.hutchinson_trace(mv, LIKE, 3),
    lambda mv: spectrum.spectral_density(mv, LIKE, 2, 3),
], ids=["cg_solve", "lanczos", "power_iteration", "hutchinson_trace", "spectral_density"])
def test_a_matvec_of_another_structure_is_named(call, bad):
    with pytest.raises(FisherError, match=r"matvec\(v\)"):
        call(bad)


def test_a_preconditioner_of_another_structure_is_named():
    with pytest.raises(FisherError, match=r"cg_solve: preconditioner\(v\)"):
        spectrum.cg_solve(Dense(spd(40)), rhs(41), preconditioner=other_names)


def test_a_matvec_that_takes_no_batch_is_told_to_pass_batched_false():
    with pytest.raises(FisherError, match="batched=False"):
        spectrum.hutchinson_trace(Dense(spd(42), batched=False), LIKE, 4)


BAD_CALLS = {
    "k above D": (lambda: spectrum.lanczos(Dense(spd(0)), LIKE, D + 1), "k=22 exceeds the dimension D=21"),
    "k zero": (lambda: spectrum.lanczos(Dense(spd(0)), LIKE, 0), "lanczos: k must be"),
    "n_iter below k": (lambda: spectrum.lanczos(Dense(spd(0)), LIKE, 3, n_iter=2), "n_iter=2 is smaller than k=3"),
    "which": (lambda: spectrum.lanczos(Dense(spd(0)), LIKE, 1, which="top"), "which must be one of"),
    "power k above D": (lambda: spectrum.power_iteration(Dense(spd(0)), LIKE, D + 1), "power_iteration: k=22"),
    "power n_iter": (lambda: spectrum.power_iteration(Dense(spd(0)), LIKE, n_iter=0), "n_iter must be"),
    "power tol": (lambda: spectrum.power_iteration(Dense(spd(0)), LIKE, tol=-1.0), "tol must be"),
    "n_probes zero": (lambda: spectrum.hutchinson_trace(Dense(spd(0)), LIKE, 0), "n_probes must be"),
    "hutch++ n_probes": (lambda: spectrum.hutchinson_trace(Dense(spd(0)), LIKE, 2, method="hutch++"),
                         r"n_probes must be an integer >= 3"),
    "method": (lambda: spectrum.hutchinson_trace(Dense(spd(0)), LIKE, 3, method="xtrace"), "method must be"),
    "chunk_size": (lambda: spectrum.hutchinson_trace(Dense(spd(0)), LIKE, 3, chunk_size=0), "chunk_size must be"),
    "generator": (lambda: spectrum.hutchinson_trace(Dense(spd(0)), LIKE, 3, generator=0), "generator must be"),
    "slq n_probes": (lambda: spectrum.spectral_density(Dense(spd(0)), LIKE, 0, 3), "n_probes must be"),
    "slq n_iter": (lambda: spectrum.spectral_density(Dense(spd(0)), LIKE, 2, -1), "n_iter must be"),
    "damping": (lambda: spectrum.cg_solve(Dense(spd(0)), rhs(0), damping=-0.1), "damping must be"),
    "damping nan": (lambda: spectrum.cg_solve(Dense(spd(0)), rhs(0), damping=math.nan), "damping must be"),
    "tol": (lambda: spectrum.cg_solve(Dense(spd(0)), rhs(0), tol=-1e-3), "tol must be"),
    "max_iter": (lambda: spectrum.cg_solve(Dense(spd(0)), rhs(0), max_iter=0), "max_iter must be"),
    "b not finite": (lambda: spectrum.cg_solve(Dense(spd(0)), {**rhs(0), "layer.bias": torch.full((3,), math.inf,
                                                                                               dtype=F64)}),
                     r"b\['layer.bias'\] holds inf or NaN"),
    "b not a dict": (lambda: spectrum.cg_solve(Dense(spd(0)), torch.zeros(D)), "b must be a non-empty"),
    "b other shape for like": (lambda: spectrum.cg_solve(Dense(spd(0)), {"w": torch.zeros(2, 2)}, like=LIKE),
                               "b must have the names of params"),
    "x0 shape": (lambda: spectrum.cg_solve(Dense(spd(0)), rhs(0), x0=rhs(0, k=2), like=LIKE),
                 "x0 must be shaped like b"),
    "matvec not callable": (lambda: spectrum.lanczos("A", LIKE, 1), "matvec must be a function"),
    "like empty": (lambda: spectrum.lanczos(Dense(spd(0)), {}, 1), "like must be a non-empty"),
    "like integer": (lambda: spectrum.lanczos(Dense(spd(0)), {"w": torch.zeros(3, dtype=torch.int64)}, 1),
                     r"like\['w'\] must be a floating-point tensor"),
    "sigma": (lambda: spectrum.density(spectrum.SpectralDensity(torch.zeros(1, 2), torch.ones(1, 2) / 2),
                                       torch.linspace(0, 1, 5), 0.0), "sigma must be a finite number > 0"),
    "grid": (lambda: spectrum.density(spectrum.SpectralDensity(torch.zeros(1, 2), torch.ones(1, 2) / 2),
                                      torch.zeros(2, 2), 1.0), "grid must be a finite 1-D tensor"),
    "sd": (lambda: spectrum.slq_trace((torch.zeros(1, 2), torch.ones(1, 2)), LIKE), "sd must be a SpectralDensity"),
    "params": (lambda: spectrum.linear_operator(Dense(spd(0)), [torch.zeros(3)]), "params must be a non-empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_names_the_option(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(FisherError, match=message):
        call()


# --- docs ----------------------------------------------------------------------------------------

def test_the_self_contained_doc_example_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "spectrum.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    example = next(b for b in blocks if "def matvec" in b)  # the one block needing no model
    exec(compile(example, "docs/spectrum.md", "exec"), {})
