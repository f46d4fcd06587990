"""Capacity and landscape metrics against dense and brute-force references (float64 throughout)."""

import itertools
import math
import pathlib
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

import fisherfx as ffx
from fisherfx._errors import FisherError
from fisherfx.metrics import Capacity, capacity_report, flatness, sharpness
from fisherfx.spectrum import Eigen
from fisherfx.vectors import flatten, random_like, unflatten

F64 = torch.float64
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # the same sums in another order, float64
ASCENT = {"rtol": 1e-7, "atol": 1e-12}  # a converged ascent: power iteration / a vertex reached exactly
LIKE = {"a": torch.zeros(2, 2, dtype=F64), "b": torch.zeros(3, dtype=F64)}  # D = 7, two parameter shapes
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def close(actual, expected, **tol):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64), **tol)


# --- capacity: a random PSD F with known eigenpairs ----------------------------------------------

class Dense(NamedTuple):
    matrix: torch.Tensor  # [D, D]
    eigen: Eigen  # all D eigenpairs, descending
    theta: dict[str, torch.Tensor]


def dense_case(rank: int | None = None, seed: int = 0) -> Dense:
    g = torch.Generator().manual_seed(seed)
    d = sum(p.numel() for p in LIKE.values())
    b = torch.randn(d, rank or d, generator=g, dtype=F64)
    matrix = b @ b.T / d
    values, vectors = torch.linalg.eigh(matrix)
    values, vectors = values.flip(0), vectors.flip(1)
    eigen = Eigen(values, unflatten(vectors.T.contiguous(), LIKE))
    theta = unflatten(torch.randn(d, generator=g, dtype=F64), LIKE)
    return Dense(matrix, eigen, theta)


def truncate(eigen: Eigen, k: int) -> Eigen:
    return Eigen(eigen.values[:k], {name: v[:k] for name, v in eigen.vectors.items()})


def laplace_kl(curvature: torch.Tensor, theta: torch.Tensor, n: float, prior: float) -> torch.Tensor:
    """KL(N(θ, (nF + λI)⁻¹) ‖ N(0, λ⁻¹I)) by torch.distributions."""
    eye = torch.eye(theta.numel(), dtype=F64)
    posterior = MultivariateNormal(theta, precision_matrix=n * curvature + prior * eye)
    return kl_divergence(posterior, MultivariateNormal(torch.zeros_like(theta), covariance_matrix=eye / prior))


def test_capacity_of_full_eigen_equals_dense_brute_force():
    case = dense_case()
    z, n, prior = 0.3, 50, 2.0
    report = capacity_report(case.eigen, z=z, params=case.theta, n=n, prior_precision=prior)
    f, theta = case.matrix, flatten(case.theta)
    eye = torch.eye(f.shape[0], dtype=F64)
    p = torch.linalg.eigvalsh(f) / torch.trace(f)
    close(report.trace, torch.trace(f), **EXACT)
    close(report.effective_rank, torch.distributions.Categorical(probs=p).entropy().exp(), **EXACT)
    close(report.condition_number, torch.linalg.cond(f), rtol=1e-8, atol=0)
    close(report.effective_dimension, torch.trace(f @ torch.linalg.inv(f + z * eye)), **EXACT)
    close(report.fisher_rao_norm, theta @ f @ theta, **EXACT)
    close(report.pac_bayes_kl, laplace_kl(f, theta, n, prior), rtol=1e-9, atol=0)
    assert (report.dimension, report.n_eigenvalues, report.complete) == (7, 7, True)


def test_truncated_eigen_gives_the_rank_k_matrix_values_and_lower_bounds():
    case = dense_case(seed=1)
    k, n, prior = 3, 20, 1.0
    full = capacity_report(case.eigen, params=case.theta, n=n, prior_precision=prior)
    top = truncate(case.eigen, k)
    report = capacity_report(top, params=case.theta, n=n, prior_precision=prior)
    u = flatten(top.vectors, LIKE).T  # [D, k]
    f_k = u @ torch.diag(top.values) @ u.T  # the matrix the truncated spectrum describes
    theta = flatten(case.theta)
    close(report.trace, top.values.sum(), **EXACT)
    close(report.fisher_rao_norm, theta @ f_k @ theta, **EXACT)  # θ projected onto the top-k subspace
    close(report.pac_bayes_kl, laplace_kl(f_k, theta, n, prior), rtol=1e-9, atol=0)
    close(report.condition_number, top.values[0] / top.values[-1], **EXACT)
    assert (report.dimension, report.n_eigenvalues, report.complete) == (7, 3, False)
    for field in ("trace", "effective_dimension", "fisher_rao_norm", "pac_bayes_kl"):
        assert getattr(report, field) < getattr(full, field), field


@pytest.mark.parametrize("wrap", ["estimate", "dict"])
def test_diagonal_equals_the_tensor_of_its_entries_and_the_axis_eigenbasis(wrap):
    g = torch.Generator().manual_seed(2)
    diag = {name: torch.rand(p.shape, generator=g, dtype=F64) for name, p in LIKE.items()}
    theta = {name: torch.randn(p.shape, generator=g, dtype=F64) for name, p in LIKE.items()}
    spectrum = ffx.Estimate(diag, torch.tensor(10)) if wrap == "estimate" else diag
    options = {"z": 0.5, "params": theta, "n": 10, "prior_precision": 3.0}
    report = capacity_report(spectrum, **options)
    entries = flatten(diag)
    bare = capacity_report(entries, **options)
    order = entries.argsort(descending=True)
    axes = Eigen(entries[order], unflatten(torch.eye(entries.numel(), dtype=F64)[order], LIKE))
    as_eigen = capacity_report(axes, **options)
    for field in ("trace", "effective_rank", "condition_number", "effective_dimension", "pac_bayes_kl", "floor"):
        close(getattr(report, field), getattr(bare, field), **EXACT)
        close(getattr(report, field), getattr(as_eigen, field), **EXACT)
    close(report.fisher_rao_norm, (entries * flatten(theta) ** 2).sum(), **EXACT)
    close(report.fisher_rao_norm, as_eigen.fisher_rao_norm, **EXACT)
    assert bare.fisher_rao_norm is None  # eigenvalues alone do not place θ
    assert (report.dimension, report.complete) == (7, True)


def test_bare_eigenvalues_without_params_leave_the_theta_fields_none():
    report = capacity_report(torch.tensor([4.0, 1.0, 0.5], dtype=F64), n=10)
    assert report.fisher_rao_norm is None and report.pac_bayes_kl is None
    assert report.dimension is None and report.complete is None
    close(report.effective_dimension, 4 / 5 + 1 / 2 + 0.5 / 1.5, **EXACT)


def test_bare_eigenvalues_with_params_give_the_kl_of_the_missing_ones_as_zero():
    case = dense_case(rank=4, seed=3)  # eigenvalues 5..7 are zero up to rounding
    values = case.eigen.values[:4]
    report = capacity_report(values, params=case.theta, n=5, prior_precision=0.5)
    close(report.pac_bayes_kl, laplace_kl(case.matrix, flatten(case.theta), 5, 0.5), rtol=1e-9, atol=0)
    assert (report.dimension, report.complete) == (7, False)


def test_condition_number_floor_default_and_given():
    case = dense_case(rank=3, seed=4)
    values = case.eigen.values
    report = capacity_report(case.eigen)
    close(report.floor, values[0] * 7 * torch.finfo(F64).eps, **EXACT)
    close(report.condition_number, values[0] / values[2], **EXACT)  # the numerical zeros are left out
    floor = float(values[1] + values[2]) / 2
    given = capacity_report(case.eigen, floor=floor)
    close(given.floor, floor, **EXACT)
    close(given.condition_number, values[0] / values[1], **EXACT)
    assert torch.isnan(capacity_report(case.eigen, floor=float(values[0]) * 2).condition_number)


def test_float32_floor_uses_float32_eps():
    values = torch.tensor([2.0, 1.0, 1e-7])
    report = capacity_report(values)
    close(report.floor, 2.0 * 3 * torch.finfo(torch.float32).eps, **EXACT)
    close(report.condition_number, 2.0, **EXACT)


def test_report_is_a_namedtuple_of_the_documented_fields():
    assert Capacity._fields == ("trace", "effective_rank", "condition_number", "effective_dimension",
                                "fisher_rao_norm", "pac_bayes_kl", "dimension", "n_eigenvalues", "floor")


EIGEN = dense_case().eigen
THETA = dense_case().theta


@pytest.mark.parametrize(("spectrum", "options", "match"), [
    pytest.param(EIGEN.values, {"z": 0.0}, "z must be a finite number > 0", id="z-zero"),
    pytest.param(EIGEN.values, {"z": "1"}, "z must be a number", id="z-string"),
    pytest.param(EIGEN.values, {"n": -3, "params": THETA}, "n must be", id="n-negative"),
    pytest.param(EIGEN.values, {"prior_precision": 0}, "prior_precision must be", id="prior-zero"),
    pytest.param(EIGEN.values, {"floor": -1.0}, "floor must be a finite number ≥ 0", id="floor-negative"),
    pytest.param(EIGEN.values[None], {}, "spectrum must be a 1-D", id="2d-tensor"),
    pytest.param([1.0, 2.0], {}, "spectrum must be a 1-D tensor of eigenvalues, an Eigen", id="list"),
    pytest.param(torch.tensor([1.0, float("nan")]), {}, "spectrum holds inf or NaN", id="nan"),
    pytest.param(torch.tensor([]), {}, "spectrum holds no eigenvalue", id="empty"),
    pytest.param(Eigen(EIGEN.values[:2], EIGEN.vectors), {}, "hold 7 vectors but spectrum.values 2", id="k-mismatch"),
    pytest.param(EIGEN, {"params": {"a": THETA["a"]}}, r"vectors must have the names of params; .*unexpected \['b'\]",
                 id="params-names"),
    pytest.param({"a": THETA["a"], "b": THETA["b"]}, {"params": {"a": THETA["a"], "b": THETA["a"]}},
                 r"params\['b'\] has shape", id="params-shape"),
    pytest.param(torch.ones(8, dtype=F64), {"params": THETA}, "8 eigenvalues but the parameters have only 7",
                 id="too-many"),
    pytest.param(torch.tensor([1.0, -2.0]), {"z": 1.0}, "needs λ_i \\+ z > 0", id="below-minus-z"),
    pytest.param(torch.tensor([1.0] * 6 + [-0.5], dtype=F64), {"z": 1.0, "params": THETA, "n": 4},
                 "n·λ_i \\+ prior_precision > 0", id="indefinite-posterior"),
    pytest.param({}, {}, "non-empty", id="empty-diagonal"),
])
def test_capacity_bad_input(spectrum, options, match):
    with pytest.raises(FisherError, match=f"capacity_report: .*{match}"):
        capacity_report(spectrum, **options)


# --- landscape: a model whose loss is exactly quadratic in its weights ---------------------------

NOISE_SIGMA = 0.7  # the Gaussian likelihood's σ: L(θ) = ‖y − Xθ‖² / (2 σ² N)


class Quadratic(NamedTuple):
    problem: ffx.Problem
    batch: tuple
    hessian: torch.Tensor  # [D, D] = XᵀX / (N σ²), the same at every θ
    minimum: dict[str, torch.Tensor]
    design: torch.Tensor  # X [N, D], with a column of ones for a bias
    targets: torch.Tensor  # [N]

    def gradient(self, params) -> torch.Tensor:
        residual = self.design @ flatten(params) - self.targets
        return self.design.T @ residual / (len(self.targets) * NOISE_SIGMA**2)

    def increase(self, params, delta: torch.Tensor) -> torch.Tensor:
        """L(θ + δ) − L(θ) = gᵀδ + ½ δᵀHδ (δ flat, any leading axes)."""
        return delta @ self.gradient(params) + 0.5 * ((delta @ self.hessian) * delta).sum(-1)


def quadratic(d: int, bias: bool = False, seed: int = 0, correlated: bool = False) -> Quadratic:
    """``correlated``: features ``t_n a + 0.05 ε`` make H nearly rank one, ``≈ c aaᵀ``."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=bias).double()
    n = 16
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)  # a clear eigengap
    if correlated:
        x = torch.randn(n, 1, generator=g, dtype=F64) * torch.linspace(1.0, -1.5, d, dtype=F64) + 0.05 * x
    y = torch.randn(n, 1, generator=g, dtype=F64)
    design = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1) if bias else x
    solution = torch.linalg.lstsq(design, y).solution[:, 0]
    minimum = unflatten(solution, ffx.params_of(model))
    hessian = design.T @ design / (n * NOISE_SIGMA**2)
    return Quadratic(ffx.supervised(model, ffx.Gaussian(NOISE_SIGMA)), (x, y), hessian, minimum, design, y[:, 0])


def away(case: Quadratic, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: t + torch.randn(t.shape, generator=g, dtype=F64) for name, t in case.minimum.items()}


def ball_maximum(g: torch.Tensor, h: torch.Tensor, r: float) -> torch.Tensor:
    """max_{‖δ‖ ≤ r} gᵀδ + ½δᵀHδ for PSD H and g ≠ 0: δ = (μI − H)⁻¹g on the sphere, μ > λ_max (bisection)."""
    lam, u = torch.linalg.eigh(h)
    c = u.T @ g
    lo, hi = float(lam[-1]), float(lam[-1] + g.norm() / r + 1)  # ‖δ(hi)‖ < r < ‖δ(μ → λ_max)‖
    for _ in range(200):
        mu = (lo + hi) / 2
        lo, hi = (mu, hi) if float((c / (mu - lam)).norm()) > r else (lo, mu)
    delta = u @ (c / (hi - lam))
    return g @ delta + 0.5 * delta @ h @ delta


def test_sharpness_l2_at_the_minimum_is_half_r2_lambda_max():
    case = quadratic(3)
    r = 0.3
    result = sharpness(case.problem, case.minimum, case.batch, r, steps=60, generator=torch.Generator().manual_seed(0))
    close(result.increase, 0.5 * r**2 * torch.linalg.eigvalsh(case.hessian)[-1], **ASCENT)
    assert flatten(result.delta).norm() <= r * (1 + 1e-12)


def test_sharpness_l2_away_from_the_minimum_is_the_trust_region_maximum():
    case = quadratic(4, bias=True)
    theta, r = away(case), 0.5
    result = sharpness(case.problem, theta, case.batch, r, steps=60, generator=torch.Generator().manual_seed(1))
    expected = ball_maximum(case.gradient(theta), case.hessian, r)
    close(result.increase, expected, **ASCENT)
    # the reference is a maximum: no point of the sphere among many random ones beats it
    directions = torch.randn(20000, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    sampled = case.increase(theta, r * directions / directions.norm(dim=1, keepdim=True)).max()
    assert sampled <= expected * (1 + 1e-12) and sampled > expected * 0.99


def box_vertices(theta, r: float) -> torch.Tensor:
    width = r * (flatten(theta).abs() + 1)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=width.numel())), dtype=F64)
    return signs * width  # [2^D, D]


@pytest.mark.parametrize("at", ["near-rank-one-minimum", "away"])
def test_sharpness_linf_relative_is_the_best_box_vertex(at):
    # a convex function peaks at a vertex; in these two cases one vertex pair is the only stationary one
    # (the gradient's signs at θ + w ⊙ s equal s only for s = ±sign(a), or s = sign(g)), so the ascent finds it
    case = quadratic(3, correlated=at == "near-rank-one-minimum")
    theta = case.minimum if at != "away" else away(case, seed=6)
    r = 0.2
    result = sharpness(case.problem, theta, case.batch, r, steps=20, norm="linf-relative",
                       generator=torch.Generator().manual_seed(3))
    close(result.increase, case.increase(theta, box_vertices(theta, r)).max(), **ASCENT)


def test_sharpness_linf_relative_ends_at_a_stationary_vertex_in_general():
    # at the minimum of a generic quadratic several vertex pairs are local maxima: the result is one of
    # them (a lower bound of the maximum), as documented
    case = quadratic(3)
    r = 0.2
    result = sharpness(case.problem, case.minimum, case.batch, r, steps=20, norm="linf-relative",
                       generator=torch.Generator().manual_seed(3))
    delta = flatten(result.delta)
    width = r * (flatten(case.minimum).abs() + 1)
    close(delta.abs(), width, **EXACT)  # a vertex
    assert torch.equal(case.gradient(unflatten(flatten(case.minimum) + delta, case.minimum)).sign(), delta.sign())
    vertices = box_vertices(case.minimum, r)
    increases = case.increase(case.minimum, vertices)
    close(result.increase, case.increase(case.minimum, delta), **EXACT)
    assert result.increase <= increases.max()


@pytest.mark.parametrize("norm", ["l2", "linf-relative"])
def test_sharpness_result_is_consistent_and_reproducible(norm):
    case = quadratic(3, bias=True)
    theta = away(case)
    before = {name: t.clone() for name, t in theta.items()}
    run = lambda seed: sharpness(case.problem, theta, case.batch, 0.1, steps=5, norm=norm,  # noqa: E731
                                 generator=torch.Generator().manual_seed(seed))
    result = run(0)
    assert result.history.shape == (6,)
    assert result.increase == result.history.max()
    recomputed = ffx.nll(case.problem, {k: theta[k] + result.delta[k] for k in theta}, case.batch) - result.base_loss
    close(result.increase, recomputed, **EXACT)
    close(result.base_loss, ffx.nll(case.problem, theta, case.batch), **EXACT)
    again = run(0)
    assert torch.equal(again.history, result.history)
    assert not torch.equal(run(1).history[0], result.history[0])
    for name in theta:
        assert torch.equal(theta[name], before[name])


@pytest.mark.parametrize(("options", "match"), [
    pytest.param({"radius": 0.0}, "radius must be a finite number > 0", id="radius-zero"),
    pytest.param({"radius": -1.0}, "radius must be", id="radius-negative"),
    pytest.param({"steps": 0}, "steps must be an integer ≥ 1", id="steps-zero"),
    pytest.param({"steps": 2.5}, "steps must be an integer", id="steps-float"),
    pytest.param({"step_size": 0.0}, "step_size must be", id="step-size-zero"),
    pytest.param({"norm": "l1"}, r"norm must be one of \['l2', 'linf-relative'\]", id="norm"),
    pytest.param({"normalize": "mean"}, "normalize must be one of", id="normalize"),
    pytest.param({"generator": 0}, "generator must be a torch.Generator", id="generator"),
    pytest.param({"params": {"nope": torch.zeros(1)}}, "unknown parameter 'nope'", id="params"),
])
def test_sharpness_bad_input(options, match):
    case = quadratic(2)
    args = {"params": case.minimum, "radius": 0.1, **options}
    with pytest.raises(FisherError, match=f"sharpness: .*{match}"):
        sharpness(case.problem, args.pop("params"), case.batch, args.pop("radius"), **args)


# --- flatness -------------------------------------------------------------------------------------

def test_flatness_draws_are_the_documented_ones_and_the_increase_is_exact():
    case = quadratic(3, bias=True)
    theta, sigma = away(case), 0.2
    result = flatness(case.problem, theta, case.batch, sigma, 7, generator=torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    deltas = torch.stack([sigma * flatten(random_like(theta, generator=replay, distribution="gaussian"))
                          for _ in range(7)])
    close(result.increases, case.increase(theta, deltas), **EXACT)
    close(result.mean_increase, result.increases.mean(), **EXACT)
    close(result.standard_error, result.increases.std() / math.sqrt(7), **EXACT)


@pytest.mark.parametrize("at", ["minimum", "away"])
def test_flatness_mean_is_half_sigma2_trace_within_four_standard_errors(at):
    case = quadratic(4)
    theta = case.minimum if at == "minimum" else away(case)
    sigma = 0.1
    result = flatness(case.problem, theta, case.batch, sigma, 400, generator=torch.Generator().manual_seed(1))
    expected = 0.5 * sigma**2 * torch.trace(case.hessian)
    assert abs(result.mean_increase - expected) <= 4 * result.standard_error
    assert result.standard_error < 0.5 * expected  # not vacuous: the test can tell the mean apart from 0


def test_flatness_per_parameter_sigma_gives_the_weighted_hessian_diagonal():
    case = quadratic(3, bias=True)
    sigma = {"weight": torch.tensor([[0.05, 0.1, 0.2]], dtype=F64), "bias": 0.15}
    result = flatness(case.problem, case.minimum, case.batch, sigma, 400, generator=torch.Generator().manual_seed(2))
    per_entry = torch.tensor([0.05, 0.1, 0.2, 0.15], dtype=F64)
    expected = 0.5 * (per_entry**2 * torch.diagonal(case.hessian)).sum()
    assert abs(result.mean_increase - expected) <= 4 * result.standard_error
    assert result.standard_error < 0.5 * expected


def test_flatness_same_generator_same_result():
    case = quadratic(3)
    run = lambda seed: flatness(case.problem, case.minimum, case.batch, 0.1, 5,  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0).increases, run(0).increases)
    assert not torch.equal(run(0).increases, run(1).increases)


@pytest.mark.parametrize(("sigma", "n_draws", "match"), [
    pytest.param(0.0, 4, "sigma must be a finite number > 0", id="sigma-zero"),
    pytest.param(-0.1, 4, "sigma must be", id="sigma-negative"),
    pytest.param({"weight": 0.1, "bias": 0.1}, 4, r"unexpected \['bias'\]", id="sigma-names"),
    pytest.param({"weight": torch.ones(3)}, 4, r"sigma\['weight'\] must broadcast to the parameter's shape",
                 id="sigma-shape"),
    pytest.param({"weight": -torch.ones(1, 2)}, 4, r"sigma\['weight'\] must hold finite values ≥ 0",
                 id="sigma-entries"),
    pytest.param({"weight": -1.0}, 4, r"sigma\['weight'\] must be a finite number ≥ 0", id="sigma-entry-negative"),
    pytest.param(0.1, 1, "n_draws must be an integer ≥ 2", id="one-draw"),
])
def test_flatness_bad_input(sigma, n_draws, match):
    case = quadratic(2)
    with pytest.raises(FisherError, match=f"flatness: .*{match}"):
        flatness(case.problem, case.minimum, case.batch, sigma, n_draws)
