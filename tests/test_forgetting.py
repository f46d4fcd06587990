"""Forgetting and merging: overlap, EWC, predicted damage and Fisher merging against their formulas."""

import math
import pathlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import grad

import fisherfx as ffx
from fisherfx import testing
from fisherfx._errors import FisherError
from fisherfx.metrics import (
    Overlap,
    WeightedDamage,
    concentrated_perturbation,
    ewc_penalty,
    fisher_merge,
    fisher_overlap,
    fisher_weighted_damage,
    perturbation_damage,
)
from fisherfx.vectors import flatten

F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-15}  # the same sums in another order, float64
SHAPES = {"w": (4, 3), "b": (4,)}
DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "forgetting.md"


def rand(seed: int, positive: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand if positive else torch.randn
    return {k: draw(s, generator=g, dtype=F64) for k, s in SHAPES.items()}


# --- overlap --------------------------------------------------------------------------------------

def brute_overlap(a: dict, b: dict) -> float:
    fa, fb = flatten(a), flatten(b)
    fa, fb = fa / fa.sum(), fb / fb.sum()
    return float(1 - 0.5 * ((fa.sqrt() - fb.sqrt()) ** 2).sum())


@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_overlap_with_itself_or_a_multiple_is_one(seed, scale):
    f = rand(seed)
    for other in (f, {k: scale * v for k, v in f.items()}):
        o = fisher_overlap(f, other)
        torch.testing.assert_close(o.total, torch.tensor(1.0, dtype=F64), **EXACT)
        for v in o.per_param.values():
            torch.testing.assert_close(v, torch.tensor(1.0, dtype=F64), **EXACT)


def test_overlap_of_disjoint_supports_is_zero():
    f = rand(0)
    a = {k: v * (torch.arange(v.numel()).reshape(v.shape) % 2 == 0) for k, v in f.items()}
    b = {k: v * (torch.arange(v.numel()).reshape(v.shape) % 2 == 1) for k, v in f.items()}
    o = fisher_overlap(a, b)
    assert float(o.total) == 0.0 and all(float(v) == 0.0 for v in o.per_param.values())


@given(seed=st.integers(0, 2**31 - 1))
def test_overlap_matches_the_formula(seed):
    a, b = rand(seed), rand(seed + 1)
    o = fisher_overlap(a, b)
    assert isinstance(o, Overlap) and 0 <= float(o.total) <= 1
    assert math.isclose(float(o.total), brute_overlap(a, b), rel_tol=1e-12)
    for k in SHAPES:
        assert math.isclose(float(o.per_param[k]), brute_overlap({k: a[k]}, {k: b[k]}), rel_tol=1e-12)


def test_overlap_of_estimates_and_over_groups():
    a, b = rand(2), rand(3)
    est = ffx.Estimate(a, torch.tensor(5))
    torch.testing.assert_close(fisher_overlap(est, b).total, fisher_overlap(a, b).total, **EXACT)
    spec = {"w": "o i -> o"}  # b has no group: compared entry by entry
    o = fisher_overlap(a, b, groups=spec)
    reduced = {"w": a["w"].sum(1), "b": a["b"]}, {"w": b["w"].sum(1), "b": b["b"]}
    assert math.isclose(float(o.total), brute_overlap(*reduced), rel_tol=1e-12)
    # equal channel totals, different entries: overlap 1 over channels only
    shuffled = {"w": a["w"].flip(1), "b": a["b"]}
    assert float(fisher_overlap(a, shuffled).total) < 1
    torch.testing.assert_close(fisher_overlap(a, shuffled, groups=spec).total, torch.tensor(1.0, dtype=F64), **EXACT)


# --- EWC ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0.0, 1.0, 37.5])
def test_ewc_penalty_and_its_gradient_equal_the_formula(strength):
    theta, anchor, fisher = rand(0, positive=False), rand(1, positive=False), rand(2)
    want = strength / 2 * sum(float((fisher[k] * (theta[k] - anchor[k]) ** 2).sum()) for k in SHAPES)
    assert math.isclose(float(ewc_penalty(theta, anchor, fisher, strength)), want, rel_tol=1e-12, abs_tol=1e-300)
    g = grad(lambda p: ewc_penalty(p, anchor, fisher, strength))(theta)
    testing.assert_tree_close(g, {k: strength * fisher[k] * (theta[k] - anchor[k]) for k in SHAPES}, **EXACT)


def test_ewc_penalty_in_a_training_loss():
    """Fisher over part of the model, params from named_parameters(), backward into .grad."""
    model = nn.Linear(3, 4).to(F64)
    anchor = {k: v.detach().clone() + 0.5 for k, v in model.named_parameters()}
    fisher = {"weight": rand(4)["w"]}
    ewc_penalty(dict(model.named_parameters()), anchor, ffx.Estimate(fisher, torch.tensor(8)), 3.0).backward()
    torch.testing.assert_close(model.weight.grad, 3.0 * fisher["weight"] * -0.5, **EXACT)
    assert model.bias.grad is None


# --- predicted damage ------------------------------------------------------------------------------

def test_weighted_damage_matches_the_formula():
    f, delta = rand(0), rand(1, positive=False)
    d = fisher_weighted_damage(f, delta)
    assert isinstance(d, WeightedDamage)
    torch.testing.assert_close(d.total, 0.5 * (flatten(f) * flatten(delta) ** 2).sum(), **EXACT)
    for k in SHAPES:
        torch.testing.assert_close(d.per_param[k], 0.5 * (f[k] * delta[k] ** 2).sum(), **EXACT)
    quadratic, mean = (flatten(f) * flatten(delta) ** 2).sum(), flatten(f).mean()
    torch.testing.assert_close(d.normalized, quadratic / (mean * flatten(delta).norm() ** 2), **EXACT)


def test_normalized_damage_is_one_for_a_fisher_blind_change_and_scale_free():
    f, delta = rand(0), rand(1, positive=False)
    flat = {k: torch.full_like(v, 0.3) for k, v in f.items()}
    torch.testing.assert_close(fisher_weighted_damage(flat, delta).normalized, torch.tensor(1.0, dtype=F64), **EXACT)
    scaled = fisher_weighted_damage({k: 7 * v for k, v in f.items()}, {k: 0.1 * v for k, v in delta.items()})
    torch.testing.assert_close(scaled.normalized, fisher_weighted_damage(f, delta).normalized, **EXACT)


def test_weighted_damage_per_group_and_with_a_group_estimate():
    f, delta = rand(0), rand(1, positive=False)
    spec = {"w": "o i -> o", "b": "o -> o"}
    d = fisher_weighted_damage(f, delta, groups=spec)
    torch.testing.assert_close(d.per_param["w"], 0.5 * (f["w"] * delta["w"] ** 2).sum(1), **EXACT)
    torch.testing.assert_close(d.total, fisher_weighted_damage(f, delta).total, **EXACT)
    group = {"w": f["w"].sum(1), "b": f["b"]}  # F_g, entries taken as equal
    dg = fisher_weighted_damage(group, delta, groups=spec)
    torch.testing.assert_close(dg.per_param["w"], 0.5 * f["w"].sum(1) / 3 * (delta["w"] ** 2).sum(1), **EXACT)
    torch.testing.assert_close(dg.normalized, d.normalized * dg.total / d.total, **EXACT)  # the same F̄


def test_symmetric_damage_averages_both_tasks():
    fa, fb, delta = rand(0), rand(5), rand(1, positive=False)
    s = fisher_weighted_damage(fa, delta, fisher_b=fb, symmetric=True)
    a, b = fisher_weighted_damage(fa, delta), fisher_weighted_damage(fb, delta)
    torch.testing.assert_close(s.total, (a.total + b.total) / 2, **EXACT)
    torch.testing.assert_close(s.normalized, (a.normalized + b.normalized) / 2, **EXACT)
    testing.assert_tree_close(s.per_param, {k: (a.per_param[k] + b.per_param[k]) / 2 for k in SHAPES}, **EXACT)


def test_predicted_damage_equals_the_measured_loss_increase_of_a_quadratic():
    """Gaussian linear model, least-squares solution, diagonal Gram matrix: the diagonal Fisher is exact."""
    x = torch.eye(3, dtype=F64).repeat(4, 1) * torch.tensor([1.0, 2.0, 0.5], dtype=F64)  # orthogonal columns
    y = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    model = nn.Linear(3, 2, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    problem, params = ffx.supervised(model, ffx.Gaussian(0.3)), ffx.params_of(model)
    fisher = ffx.diag_fisher(problem, params, (x, y), kind="exact", dtype=F64)
    new, sel = concentrated_perturbation(params, {"weight": torch.ones(2)}, {"weight": "o i -> o"}, 1.0, 0.4,
                                         generator=torch.Generator().manual_seed(1))
    measured = perturbation_damage(problem, params, new, (x, y)).loss_increase
    torch.testing.assert_close(fisher_weighted_damage(fisher, sel.delta).total, measured, rtol=1e-10, atol=0)


# --- merging --------------------------------------------------------------------------------------

def test_merging_equal_models_returns_them():
    theta = rand(0, positive=False)
    merged = fisher_merge([theta, {k: v.clone() for k, v in theta.items()}, theta], [rand(1), rand(2), rand(3)])
    testing.assert_tree_close(merged, theta, rtol=0, atol=0)
    testing.assert_tree_close(fisher_merge([theta], [rand(1)]), theta, rtol=0, atol=0)


def test_merge_matches_the_formula():
    models, fishers, lams = [rand(s, positive=False) for s in (0, 1, 2)], [rand(s) for s in (3, 4, 5)], [1.0, 2.0, 0.5]
    eps = 1e-3
    merged = fisher_merge(models, [ffx.Estimate(f, torch.tensor(1)) for f in fishers], eps=eps, weights=lams)
    want = {k: sum(w * (f[k] + eps) * m[k] for w, f, m in zip(lams, fishers, models))
            / sum(w * (f[k] + eps) for w, f in zip(lams, fishers)) for k in SHAPES}
    testing.assert_tree_close(merged, want, **EXACT)


def test_merge_follows_the_fisher_and_averages_where_it_is_zero():
    a, b = rand(0, positive=False), rand(1, positive=False)
    fa = {k: torch.where(torch.arange(v.numel()).reshape(v.shape) < 3, 1.0, 0.0).to(F64) for k, v in a.items()}
    fb = {k: 1 - v for k, v in fa.items()}
    merged = fisher_merge([a, b], [fa, fb], eps=1e-12)
    testing.assert_tree_close(merged, {k: torch.where(fa[k] > 0, a[k], b[k]) for k in SHAPES}, rtol=1e-10, atol=1e-12)
    zero = {k: torch.zeros_like(v) for k, v in a.items()}
    testing.assert_tree_close(fisher_merge([a, b], [zero, zero]), {k: (a[k] + b[k]) / 2 for k in SHAPES}, **EXACT)


def test_merge_keeps_dtypes():
    a = {k: v.float() for k, v in rand(0, positive=False).items()}
    merged = fisher_merge([a, rand(1, positive=False)], [rand(2), rand(3)])
    assert all(merged[k].dtype == torch.float32 for k in SHAPES)


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input():
    f, delta = rand(0), rand(1, positive=False)
    neg = {**f, "b": -f["b"]}
    with pytest.raises(FisherError, match=r"fisher_overlap: fa and fb must have the same names; missing from fb "
                                          r"\['b'\]"):
        fisher_overlap(f, {"w": f["w"]})
    with pytest.raises(FisherError, match=r"fisher_overlap: fa\['b'\] has shape \(4,\) but fb\['b'\] \(3,\)"):
        fisher_overlap(f, {**f, "b": torch.ones(3, dtype=F64)})
    with pytest.raises(FisherError, match=r"fisher_overlap: fb\['b'\] has negative entries"):
        fisher_overlap(f, neg)
    with pytest.raises(FisherError, match="fisher_overlap: fa is zero everywhere"):
        fisher_overlap({k: torch.zeros_like(v) for k, v in f.items()}, f)
    with pytest.raises(FisherError, match="fisher_overlap: group pattern 'o i j -> o'"):
        fisher_overlap(f, f, groups={"w": "o i j -> o"})
    with pytest.raises(FisherError, match=r"ewc_penalty: strength must be a finite number ≥ 0"):
        ewc_penalty(delta, delta, f, -1.0)
    with pytest.raises(FisherError, match=r"ewc_penalty: anchor lacks \['b'\]"):
        ewc_penalty(delta, {"w": delta["w"]}, f)
    with pytest.raises(FisherError, match=r"ewc_penalty: params\['w'\] has shape \(3, 4\)"):
        ewc_penalty({**delta, "w": delta["w"].T}, delta, f)
    with pytest.raises(FisherError, match=r"ewc_penalty: fisher\['b'\] has negative entries"):
        ewc_penalty(delta, delta, neg)
    with pytest.raises(FisherError, match="fisher_weighted_damage: symmetric=True averages two tasks"):
        fisher_weighted_damage(f, delta, symmetric=True)
    with pytest.raises(FisherError, match="fisher_weighted_damage: fisher_b is used only with symmetric=True"):
        fisher_weighted_damage(f, delta, fisher_b=f)
    with pytest.raises(FisherError, match=r"fisher_weighted_damage: delta lacks \['b'\], which fisher_a has"):
        fisher_weighted_damage(f, {"w": delta["w"]})
    with pytest.raises(FisherError, match=r"fisher_weighted_damage: delta\['w'\] has shape \(3, 4\) but "
                                          r"fisher_a\['w'\] \(4, 3\)"):
        fisher_weighted_damage(f, {**delta, "w": delta["w"].T})
    with pytest.raises(FisherError, match=r"fisher_weighted_damage: fisher_a\['w'\] has shape \(2,\); expected the "
                                          r"group shape \(4,\)"):
        fisher_weighted_damage({**f, "w": torch.ones(2, dtype=F64)}, delta, groups={"w": "o i -> o", "b": "o -> o"})
    with pytest.raises(FisherError, match="fisher_merge: fishers must be a list with one Fisher per model"):
        fisher_merge([delta, delta], [f])
    with pytest.raises(FisherError, match=r"fisher_merge: eps must be a finite number > 0"):
        fisher_merge([delta], [f], eps=0.0)
    with pytest.raises(FisherError, match=r"fisher_merge: weights must be 2 finite numbers > 0"):
        fisher_merge([delta, delta], [f, f], weights=[1.0, -1.0])
    with pytest.raises(FisherError, match=r"fisher_merge: params_list\[0\] and params_list\[1\] must have the same "
                                          r"names"):
        fisher_merge([delta, {"w": delta["w"]}], [f, f])
    with pytest.raises(FisherError, match=r"fisher_merge: params_list\[0\] and fishers\[1\] must have the same names"):
        fisher_merge([delta, delta], [f, {"w": f["w"]}])
