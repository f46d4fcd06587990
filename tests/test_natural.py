"""Natural gradients for each kind of curvature, and the pure K-FAC optimiser."""

import functools
import importlib

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

import fisherfx as ffx
from fisherfx import testing, vectors
from fisherfx.natural import KFACOptState, apply_updates, kfac_optimizer, natural_gradient
from fisherfx.operators import ggn_vp
from tests.cases import BY_NAME, build

# the module (``fisherfx.kfac`` is the function)
K = importlib.import_module("fisherfx._kfac")

F64 = torch.float64
LAMBDA = 0.1
SOLVED = {"rtol": 1e-8, "atol": 1e-10}  # a direct solve in float64 against the dense system

pytestmark = pytest.mark.usefixtures("one_thread")


def gradient(seed: int, like: dict[str, Tensor]) -> dict[str, Tensor]:
    return vectors.random_like(like, generator=torch.Generator().manual_seed(seed), distribution="gaussian")


def test_diagonal():
    b = build(BY_NAME["mlp-categorical"])
    est = ffx.diag_fisher(b.problem, b.params, b.batch, dtype=F64)
    g = gradient(0, b.params)
    testing.assert_tree_close(natural_gradient(g, est, LAMBDA), {k: g[k] / (est.value[k] + LAMBDA) for k in g},
                              **SOLVED)


@pytest.mark.parametrize("damping_kind", ["tikhonov", "pi"])
def test_kfac(damping_kind):
    b = build(BY_NAME["embed-layernorm-tokens"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    g = gradient(1, b.params)
    x = natural_gradient(g, fac, LAMBDA, damping_kind=damping_kind)
    testing.assert_tree_close(x, K.kfac_solve(fac, g, LAMBDA, damping_kind), **SOLVED)
    if damping_kind == "tikhonov":  # the residual of (F̂ + λI) x = g
        testing.assert_tree_close(vectors.add(K.kfac_vp(fac, x), x, LAMBDA), g, **SOLVED)


def test_matvec_is_cg_on_the_exact_ggn():
    b = build(BY_NAME["mlp-categorical"])
    g = gradient(2, b.params)
    x = natural_gradient(g, functools.partial(ggn_vp, b.problem, b.params, b.batch), LAMBDA, tol=1e-12)
    dense = testing.exact_fisher(b.nlls, b.params, count=len(b.nlls))
    want = torch.linalg.solve(dense + LAMBDA * torch.eye(dense.shape[0], dtype=F64), vectors.flatten(g))
    torch.testing.assert_close(vectors.flatten(x, b.params), want, rtol=1e-7, atol=1e-9)


def test_bad_input():
    b = build(BY_NAME["mlp-categorical"])
    est = ffx.diag_fisher(b.problem, b.params, b.batch, dtype=F64)
    g = gradient(3, b.params)
    for damping in (0, -0.1, float("inf")):
        with pytest.raises(ffx.FisherError, match="natural_gradient: damping must be a finite number > 0"):
            natural_gradient(g, est, damping)
    with pytest.raises(ffx.FisherError, match="curvature must be a diagonal Estimate, a KFAC or a matvec"):
        natural_gradient(g, {"0.weight": torch.ones(6, 4)}, 0.1)
    with pytest.raises(ffx.FisherError, match=r"natural_gradient: grads must have the names of params; missing "
                                              r"\['2.bias'\]"):
        natural_gradient({k: v for k, v in g.items() if k != "2.bias"}, est, 0.1)
    with pytest.raises(ffx.FisherError, match="did not reach tol"):
        natural_gradient(g, functools.partial(ggn_vp, b.problem, b.params, b.batch), 1e-3, tol=1e-14, max_iter=1)
    with pytest.raises(ffx.FisherError, match="apply_updates: updates for unknown parameters"):
        apply_updates(b.params, {"nope": torch.zeros(1)})
    problem = b.problem
    for option, value in (("lr", -1.0), ("damping", 0.0), ("decay", 1.0), ("momentum", 1.0), ("kl_clip", 0.0),
                          ("inverse_every", 0), ("curvature_every", 1.5), ("damping_kind", "levenberg")):
        with pytest.raises(ffx.FisherError, match=f"kfac_optimizer: {option} must"):
            kfac_optimizer(problem, **{option: value})


def test_apply_updates():
    params = {"a": torch.ones(2), "b": torch.zeros(3)}
    out = apply_updates(params, {"a": torch.tensor([1.0, -1.0])})
    torch.testing.assert_close(out["a"], torch.tensor([2.0, 0.0]))
    assert out["b"] is params["b"] and params["a"].tolist() == [1.0, 1.0]


# --- the optimiser --------------------------------------------------------------------------------

class Task:
    """A small classifier on a fixed random problem (Gaussian blobs), trained with mini-batches."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        centres = 2 * torch.randn(5, 12, generator=gen)
        self.y = torch.randint(0, 5, (400,), generator=gen)
        self.x = centres[self.y] + torch.randn(400, 12, generator=gen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).eval()
        self.problem = ffx.supervised(self.model, ffx.Categorical())

    def loss(self, params: dict, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(self.model, params, (x,)), y)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, 400, (64,), generator=torch.Generator().manual_seed(step))
        return self.x[idx], self.y[idx]


def run(task: Task, steps: int, opt=None, lr: float = 0.1) -> list[float]:
    """Full-data losses after each step, with ``opt`` (a K-FAC optimiser) or plain SGD at ``lr``."""
    params = ffx.params_of(task.model)
    state = opt.init(params) if opt is not None else None
    losses = []
    for step in range(steps):
        xb, yb = task.batch(step)
        g = grad(task.loss)(params, xb, yb)
        if opt is None:
            updates = {k: -lr * v for k, v in g.items()}
        else:
            updates, state = opt.update(g, state, params, (xb, yb))
        params = apply_updates(params, updates)
        losses.append(float(task.loss(params, task.x, task.y)))
    return losses


@pytest.mark.parametrize("damping_kind", ["pi", "tikhonov"])
def test_defaults_reach_sgds_loss_in_fewer_steps(damping_kind):
    task = Task()
    steps = 40
    sgd = run(task, steps, lr=0.1)
    ours = run(task, steps, kfac_optimizer(task.problem, damping_kind=damping_kind))
    reached = next(i for i, v in enumerate(ours) if v <= sgd[-1])
    assert reached < steps // 2, (reached, sgd[-1], ours[::5])
    assert ours[-1] < 0.5 * sgd[-1]


def test_update_is_pure_and_reproducible():
    task = Task()
    opt = kfac_optimizer(task.problem, momentum=0.5, inverse_every=2)
    params = ffx.params_of(task.model)
    state = opt.init(params)
    xb, yb = task.batch(0)
    g = grad(task.loss)(params, xb, yb)
    _, state = opt.update(g, state, params, (xb, yb))
    snapshot = (state.step.clone(), {k: v.clone() for k, v in state.momentum.items()},
                {k: v.clone() for k, v in state.factors.G.mean.items()})
    frozen = {k: v.clone() for k, v in params.items()}
    u1, s1 = opt.update(g, state, params, (xb, yb))
    u2, s2 = opt.update(g, state, params, (xb, yb))
    testing.assert_tree_close(u1, u2, rtol=0, atol=0)  # same state, same batch: same MC draws and update
    assert int(state.step) == int(snapshot[0]) == 1 and int(s1.step) == 2
    testing.assert_tree_close(state.momentum, snapshot[1], rtol=0, atol=0)
    testing.assert_tree_close(state.factors.G.mean, snapshot[2], rtol=0, atol=0)
    testing.assert_tree_close(params, frozen, rtol=0, atol=0)
    assert isinstance(s1, KFACOptState) and s1.inverse is state.inverse  # inverse_every=2: step 1 keeps it
    _, s3 = opt.update(g, s1, params, (xb, yb))
    assert s3.inverse is not s1.inverse  # step 2 refreshes it


def test_kl_clip_bounds_the_predicted_change():
    """Clipped: the step's predicted KL ``η² ν² g̃ᵀ g`` equals ``c``; ``ν`` scales the whole natural gradient."""
    task = Task()
    c, lr = 1e-4, 1.0
    opt = kfac_optimizer(task.problem, lr=lr, kl_clip=c)
    params = ffx.params_of(task.model)
    xb, yb = task.batch(0)
    g = grad(task.loss)(params, xb, yb)
    updates, state = opt.update(g, opt.init(params), params, (xb, yb))
    nat = K.kfac_vp(state.inverse, g)  # the default damping_kind="pi" keeps the damped inverse factors
    nu = float(updates["0.weight"].flatten()[0] / (-lr * nat["0.weight"].flatten()[0]))
    testing.assert_tree_close(updates, {k: -lr * nu * v for k, v in nat.items()}, rtol=1e-5, atol=1e-9)
    assert nu < 1
    assert lr**2 * nu**2 * float(vectors.dot(nat, g)) == pytest.approx(c, rel=1e-4)
