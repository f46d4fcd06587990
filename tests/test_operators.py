"""Curvature products equal their dense matrices times ``v`` (:mod:`fisherfx.testing`), in float64.

The dense references never touch fisherfx's engines (see ``tests/test_reference.py``): the exact
Fisher is ``Jᵀ H J`` from ``jacrev`` and ``hessian``, the empirical Fisher the outer products of
looped per-sample gradients, the Hessian ``torch.func.hessian`` of each sample's loss, and language
models run on each sequence alone without padding.
"""

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfx as ffx
from fisherfx import operators, testing, vectors
from fisherfx.testing import assert_tree_close
from tests.cases import BY_NAME, CASES, FLOAT32_NORM_TOL, FLOAT64_TOL, LM_CASES, Case, build, case_id
from tests.strategies import generator

NORMALIZES = ("samples", "tokens", "none")
K = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def dense(name: str, which: str) -> Tensor:
    """The dense operator ``[D, D]`` of a case, unnormalised (``Z = 1``)."""
    b = build(BY_NAME[name])
    if which == "ggn":
        return testing.exact_fisher(b.nlls, b.params, count=1)
    if which == "hessian":
        return testing.hessian_matrix(b.nlls, b.params, count=1)
    per = {"empirical": "sample", "empirical-token": "token"}[which]
    return testing.empirical_fisher(testing.loop_grads(b.nlls, b.params, per), b.params, count=1)


def tolerance(case: Case, want: dict[str, Tensor]) -> dict:
    """The case's tolerance; where a float32 norm rounds every cotangent (LLaMA's RMSNorm), an absolute
    part of 1e-6 of the largest expected entry too: a product sums many rounded terms, so its small
    entries carry the rounding of its large ones (~1e-7 relative)."""
    if case.tol is not FLOAT32_NORM_TOL:
        return case.tol
    scale = max(float(x.abs().max()) for x in want.values())
    return {**case.tol, "atol": max(case.tol["atol"], 1e-6 * scale)}


def assert_product_close(case: Case, got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert_tree_close(got, want, **tolerance(case, want))


def probes(params: dict[str, Tensor], k: int | None = K, seed: int = 1) -> dict[str, Tensor]:
    return vectors.random_like(params, k=k, generator=generator(seed), distribution="gaussian")


def product(which: str, b, v, normalize: str = "samples", batch=None):
    batch = b.batch if batch is None else batch
    if which == "ggn":
        return ffx.ggn_vp(b.problem, b.params, batch, v, normalize=normalize)
    if which == "hessian":
        return ffx.hvp(b.problem, b.params, batch, v, normalize=normalize)
    per = {"empirical": "sample", "empirical-token": "token"}[which]
    return ffx.empirical_fisher_vp(b.problem, b.params, batch, v, normalize=normalize, per=per)


def expected(case: Case, which: str, v: dict[str, Tensor], normalize: str) -> dict[str, Tensor]:
    b = build(case)
    z = testing.normalizer(b.nlls, normalize)
    return vectors.unflatten(vectors.flatten(v, b.params) @ dense(case.name, which) / z, b.params)


# --- every product equals its dense matrix -----------------------------------------------------------

WHICH = ("ggn", "empirical", "empirical-token", "hessian")


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_product_equals_dense(case: Case, which: str):
    b = build(case)
    v = probes(b.params)
    got = product(which, b, v)
    assert_product_close(case, got, expected(case, which, v, "samples"))


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("case", [BY_NAME["embed-layernorm-tokens"], BY_NAME["gpt2-left-pad"]], ids=case_id)
def test_normalizations(case: Case, which: str, normalize: str):
    b = build(case)
    v = probes(b.params, k=None)
    assert_product_close(case, product(which, b, v, normalize), expected(case, which, v, normalize))


def test_fisher_vp_is_ggn_vp():
    assert ffx.fisher_vp is ffx.ggn_vp


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("case", [BY_NAME["cnn-conv2d"], BY_NAME["llama-left-pad"]], ids=case_id)
def test_k_vectors_equal_k_calls(case: Case, which: str):
    b = build(case)
    v = probes(b.params)
    batched = product(which, b, v)
    for i in range(K):
        single = product(which, b, {k: x[i] for k, x in v.items()})
        # hvp: forward over reverse for K vectors, reverse over reverse for one (rounding differs)
        tol = tolerance(case, single) if case.tol is FLOAT32_NORM_TOL else {"rtol": 1e-10, "atol": 1e-13}
        assert_tree_close({k: x[i] for k, x in batched.items()}, single, **tol)


# --- the empirical and MC products' two routes: taps and jvp/vjp -------------------------------------

ROUTES = ("auto", "taps", "generic")
# cases whose every parameter the taps serve position by position (no attention): per="token" through them too
PER_POSITION = {c.name for c in CASES if c.family is None}


def gradient_product(b, v, per: str, engine: str, kind: str = "empirical", normalize: str = "samples", batch=None):
    batch = b.batch if batch is None else batch
    if kind == "empirical":
        return ffx.empirical_fisher_vp(b.problem, b.params, batch, v, normalize=normalize, per=per, engine=engine)
    return ffx.mc_fisher_vp(b.problem, b.params, batch, v, n_samples=2, generator=generator(7), normalize=normalize,
                            per=per, engine=engine)


@pytest.mark.parametrize("engine", ROUTES)
@pytest.mark.parametrize("per", ("sample", "token"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empirical_routes_equal_dense(case: Case, per: str, engine: str):
    """Every route of ``empirical_fisher_vp`` is the dense empirical Fisher times ``v``; ``engine="taps"``
    refuses, naming them, the parameters whose layers mix positions (attention) for ``per="token"``."""
    b = build(case)
    v = probes(b.params)
    which = {"sample": "empirical", "token": "empirical-token"}[per]
    if engine == "taps" and per == "token" and case.name not in PER_POSITION:
        with pytest.raises(ffx.FisherError, match=r"engine='taps' cannot serve '.*feeds the losses of several"):
            gradient_product(b, v, per, engine)
        return
    assert_product_close(case, gradient_product(b, v, per, engine), expected(case, which, v, "samples"))


@pytest.mark.parametrize("per", ("sample", "token"))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mc_routes_agree(case: Case, per: str):
    """The same generator state draws the same labels in both routes, so the MC products agree."""
    b = build(case)
    v = probes(b.params)
    engine = "taps" if per == "sample" or case.name in PER_POSITION else "auto"
    taps_route = gradient_product(b, v, per, engine, kind="mc")
    assert_product_close(case, taps_route, gradient_product(b, v, per, "generic", kind="mc"))


class Mixed(nn.Module):
    """A parameter the taps serve (``a``, ``b.bias``), one no tapped layer holds (PReLU's) and a weight also
    used outside its layer (``b.weight``): a product of both routes."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 5), nn.PReLU(5, init=0.3), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.a(x))
        return self.b(h) + 0.5 * torch.tanh(h @ self.b.weight.T)


@functools.cache
def mixed_case():
    torch.manual_seed(0)
    model = Mixed().double().eval()
    g = generator(12)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    nlls = testing.supervised_nlls(model, ffx.Categorical(), x, y)
    return problem, params, (x, y), testing.empirical_fisher(testing.loop_grads(nlls, params, "sample"), params, 1)


@pytest.mark.parametrize("k", (None, K))
def test_a_mix_of_routes_is_the_exact_sum(k: int | None):
    """``s_n`` adds the taps' and the jvp's parts before each route pulls it back: the dense product, exactly."""
    problem, params, batch, dense_ef = mixed_case()
    served = ffx.explain(problem, params, batch)
    assert {r.name for r in served.rows if r.engine == "generic"} == {"act.weight", "b.weight"}  # a real mix
    v = probes(params, k=k)
    want = vectors.unflatten(vectors.flatten(v, params) @ dense_ef / batch[0].shape[0], params)
    got = ffx.empirical_fisher_vp(problem, params, batch, v)
    assert_tree_close(got, want, **FLOAT64_TOL)
    with pytest.raises(ffx.FisherError, match=r"engine='taps' cannot serve 'act\.weight'"):
        ffx.empirical_fisher_vp(problem, params, batch, v, engine="taps")
    mc = {e: ffx.mc_fisher_vp(problem, params, batch, v, n_samples=3, generator=generator(5), engine=e)
          for e in ("auto", "generic")}
    assert_tree_close(mc["auto"], mc["generic"], **FLOAT64_TOL)


@pytest.mark.parametrize("k", (None, K))
@pytest.mark.parametrize("engine", ROUTES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hessian_routes_equal_dense(case: Case, engine: str, k: int | None):
    """Every route of ``hvp``, for one vector and ``K``, is the dense Hessian times ``v``."""
    b = build(case)
    v = probes(b.params, k=k)
    got = ffx.hvp(b.problem, b.params, b.batch, v, engine=engine)
    assert_product_close(case, got, expected(case, "hessian", v, "samples"))


class InPlaceTail(nn.Module):
    """``b``'s output is changed in place after its call (``relu_``): the recorder cannot use that call."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu_(self.b(torch.tanh(self.a(x)))))


def test_hessian_of_an_output_changed_in_place():
    """A layer output changed in place after its call: ``hvp`` takes that layer's parameters from autograd
    (the dense Hessian times ``v``); ``engine="taps"`` names them and says why."""
    torch.manual_seed(0)
    model = InPlaceTail().double().eval()
    g = generator(3)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    v = probes(params)
    nlls = testing.supervised_nlls(model, ffx.Categorical(), x, y)
    want = vectors.unflatten(vectors.flatten(v, params) @ testing.hessian_matrix(nlls, params, count=1) / 6, params)
    assert_tree_close(ffx.hvp(problem, params, (x, y), v), want, **FLOAT64_TOL)
    with pytest.raises(ffx.FisherError, match=r"hvp: engine='taps' cannot serve 'b\.weight': its layer's output is "
                                               r"changed in place after the call; 'b\.bias': "):
        ffx.hvp(problem, params, (x, y), v, engine="taps")


@pytest.mark.parametrize("k", (None, K))
def test_hessian_mix_is_exact(k: int | None):
    """Parameters no recorded layer call accounts for enter ``⟨∇L, v⟩`` through their own gradient."""
    problem, params, batch, _ = mixed_case()
    model = problem.model
    x, y = batch
    nlls = testing.supervised_nlls(model, ffx.Categorical(), x, y)
    v = probes(params, k=k)
    want = vectors.unflatten(vectors.flatten(v, params) @ testing.hessian_matrix(nlls, params, count=1) / x.shape[0],
                             params)
    assert_tree_close(ffx.hvp(problem, params, batch, v), want, **FLOAT64_TOL)
    with pytest.raises(ffx.FisherError, match=r"hvp: engine='taps' cannot serve 'act\.weight': no supported layer "
                                               r"holds it .*; 'b\.weight': its gradient does not all come through "
                                               r"tapped layers .*Use engine='auto' to compute these with autograd"):
        ffx.hvp(problem, params, batch, v, engine="taps")


@pytest.mark.parametrize("engine", ("taps", "generic"))
def test_routes_with_lists_subsets_and_normalizations(engine: str):
    """A list of batches, a parameter subset and each normalisation, through each route (per position too)."""
    case = BY_NAME["embed-layernorm-tokens"]
    b = build(case)
    names = ["embed.weight", "head.bias"]
    sub = {k: b.params[k] for k in names}
    v = probes(sub)
    x, y = b.batch
    for per, which in (("sample", "empirical"), ("token", "empirical-token")):
        for normalize in NORMALIZES:
            got = ffx.empirical_fisher_vp(b.problem, sub, [(x[:1], y[:1]), (x[1:], y[1:])], v, normalize=normalize,
                                          per=per, engine=engine)
            full_v = {**v, **{k: torch.zeros(K, *p.shape, dtype=p.dtype) for k, p in b.params.items() if k not in sub}}
            want = expected(case, which, full_v, normalize)
            assert_tree_close(got, {k: want[k] for k in names}, **case.tol)


def test_unknown_engine_is_refused(mlp):
    problem, params, batch = mlp
    with pytest.raises(ffx.FisherError, match="engine must be"):
        ffx.empirical_fisher_vp(problem, params, batch, probes(params, k=None), engine="jvp")


# --- diagonals are the estimators' values ----------------------------------------------------------

def unit_vectors(params: dict[str, Tensor]) -> dict[str, Tensor]:
    d = vectors.dimension(params)
    first = next(iter(params.values()))
    return vectors.unflatten(torch.eye(d, dtype=first.dtype), params)


def diagonal(out: dict[str, Tensor], params: dict[str, Tensor]) -> dict[str, Tensor]:
    return vectors.unflatten(vectors.flatten(out, params).diagonal(), params)


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("kind, per", [("exact", "sample"), ("empirical", "sample"), ("empirical", "token")])
@pytest.mark.parametrize("case", [BY_NAME["mlp-bernoulli"], BY_NAME["embed-layernorm-tokens"], BY_NAME["tied-weights"]],
                         ids=case_id)
def test_unit_vectors_give_diag_fisher(case: Case, kind: str, per: str, normalize: str):
    b = build(case)
    eye = unit_vectors(b.params)
    if kind == "exact":
        out = ffx.ggn_vp(b.problem, b.params, b.batch, eye, normalize=normalize)
    else:
        out = ffx.empirical_fisher_vp(b.problem, b.params, b.batch, eye, normalize=normalize, per=per)
    est = ffx.diag_fisher(b.problem, b.params, b.batch, kind=kind, per=per, normalize=normalize, dtype=torch.float64)
    assert_tree_close(diagonal(out, b.params), est.value, **case.tol)


@pytest.mark.parametrize("per", ("sample", "token"))
@pytest.mark.parametrize("case", [BY_NAME["mlp-categorical"], BY_NAME["gpt2-right-pad"]], ids=case_id)
def test_mc_unit_vectors_give_mc_diag_fisher(case: Case, per: str):
    """The same generator state draws the same labels in both (active positions only, in order)."""
    b = build(case)
    eye = unit_vectors(b.params)
    out = ffx.mc_fisher_vp(b.problem, b.params, b.batch, eye, n_samples=3, generator=generator(7), per=per,
                           normalize="tokens")
    est = ffx.diag_fisher(b.problem, b.params, b.batch, kind="mc", n_samples=3, generator=generator(7), per=per,
                          normalize="tokens", dtype=torch.float64)
    assert_tree_close(diagonal(out, b.params), est.value, **case.tol)


def test_mc_product_approaches_ggn():
    """The mean of many MC products lies within 5 standard errors of the exact one, entry by entry."""
    case = BY_NAME["mlp-categorical"]
    b = build(case)
    v = probes(b.params, k=None)
    calls, draws = 60, 50
    g = generator(11)
    samples = torch.stack([vectors.flatten(ffx.mc_fisher_vp(b.problem, b.params, b.batch, v, n_samples=draws,
                                                            generator=g), b.params) for _ in range(calls)])
    exact = vectors.flatten(ffx.ggn_vp(b.problem, b.params, b.batch, v), b.params)
    se = samples.std(0) / calls**0.5
    assert float((se / exact.abs().clamp_min(1e-3)).median()) < 0.1  # the test is not vacuous
    assert bool(((samples.mean(0) - exact).abs() <= 5 * se + 1e-12).all())


def test_mc_same_generator_same_product():
    b = build(BY_NAME["gpt2-left-pad"])
    v = probes(b.params)
    one = ffx.mc_fisher_vp(b.problem, b.params, b.batch, v, n_samples=2, generator=generator(3))
    two = ffx.mc_fisher_vp(b.problem, b.params, b.batch, v, n_samples=2, generator=generator(3))
    assert_tree_close(one, two, rtol=0, atol=0)


def test_hvp_equals_ggn_for_a_linear_model():
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    v = probes(params)
    assert_tree_close(ffx.hvp(problem, params, (x, y), v), ffx.ggn_vp(problem, params, (x, y), v),
                      rtol=1e-12, atol=1e-14)


def test_hvp_is_the_hessian_of_nll():
    case = BY_NAME["dict-input"]
    b = build(case)
    v = probes(b.params, k=None)
    theta = vectors.flatten(b.params)

    def loss(flat):
        return ffx.nll(b.problem, vectors.unflatten(flat, b.params), b.batch, normalize="tokens")

    dense_h = torch.func.jacrev(torch.func.grad(loss))(theta)  # reverse over reverse (see testing.hessian_matrix)
    got = ffx.hvp(b.problem, b.params, b.batch, v, normalize="tokens")
    assert_tree_close(got, vectors.unflatten(dense_h @ vectors.flatten(v, b.params), b.params), **case.tol)


# --- padding, lists of batches, parameter subsets ----------------------------------------------------

def rows_alone(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Each row as its own batch, its padding stripped."""
    out = []
    for n in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][n].bool()
        out.append({k: x[n][keep][None] for k, x in batch.items()})
    return out


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_padded_batch_equals_rows_alone(case: Case, which: str):
    """Padding and ``-100`` labels change nothing: the padded batch equals its rows run alone, count-weighted."""
    b = build(case)
    v = probes(b.params)
    whole = product(which, b, v, "tokens")
    alone = product(which, b, v, "tokens", batch=rows_alone(b.batch))
    assert_product_close(case, whole, alone)


@pytest.mark.parametrize("which", WHICH)
def test_list_of_batches_is_the_count_weighted_average(which: str):
    case = BY_NAME["mlp-gaussian"]
    b = build(case)
    x, y = b.batch
    v = probes(b.params)
    n = x.shape[0]
    assert n >= 3
    splits = [(x[:1], y[:1]), (x[1:n - 1], y[1:n - 1]), (x[n - 1:], y[n - 1:])]
    assert_tree_close(product(which, b, v, batch=splits), product(which, b, v), **case.tol)
    assert_tree_close(product(which, b, v, batch=iter(splits)), product(which, b, v), **case.tol)


def test_parameter_subset_is_the_diagonal_block():
    case = BY_NAME["mlp-categorical"]
    b = build(case)
    names = list(b.params)[:2]
    sub = {k: b.params[k] for k in names}
    v = probes(sub)
    full_v = {**v, **{k: torch.zeros(K, *p.shape, dtype=p.dtype) for k, p in b.params.items() if k not in sub}}
    full = ffx.ggn_vp(b.problem, b.params, b.batch, full_v)
    assert_tree_close(ffx.ggn_vp(b.problem, sub, b.batch, v), {k: full[k] for k in names}, **case.tol)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sdpa_attention_equals_eager(family: str, which: str):
    """HF's default attention (SDPA) gives the eager model's products (the math backend serves jvp)."""
    case = BY_NAME[f"{family}-left-pad"]
    b = build(case)
    sdpa = type(b.model)(b.model.config.__class__(**{**b.model.config.to_dict(), "attn_implementation": "sdpa"}))
    sdpa = sdpa.to(torch.float64).eval()
    sdpa.load_state_dict(b.model.state_dict())
    v = probes(b.params)
    problem = ffx.causal_lm(sdpa)
    got = {"ggn": ffx.ggn_vp, "hessian": ffx.hvp}.get(which)
    if got is None:
        per = {"empirical": "sample", "empirical-token": "token"}[which]
        out = ffx.empirical_fisher_vp(problem, b.params, b.batch, v, per=per)
    else:
        out = got(problem, b.params, b.batch, v)
    assert_product_close(case, out, product(which, b, v))


# --- invariants over random models and batches --------------------------------------------------------

@functools.cache
def small_problem(likelihood: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    lik = {"categorical": ffx.Categorical(), "gaussian": ffx.Gaussian(0.7), "bernoulli": ffx.Bernoulli()}[likelihood]
    return model, ffx.supervised(model, lik)


def small_batch(likelihood: str, n: int, seed: int):
    g = generator(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    if likelihood == "categorical":
        return x, torch.randint(0, 2, (n,), generator=g)
    if likelihood == "gaussian":
        return x, torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 2, (n, 2), generator=g).double()


FNS = {"ggn": ffx.ggn_vp, "empirical": ffx.empirical_fisher_vp, "hessian": ffx.hvp,
       "mc": functools.partial(ffx.mc_fisher_vp, n_samples=1)}  # one draw: a split batch draws the same labels


@settings(max_examples=40, deadline=None)
@given(likelihood=st.sampled_from(["categorical", "gaussian", "bernoulli"]), which=st.sampled_from(sorted(FNS)),
       n=st.integers(1, 6), seed=st.integers(0, 2**16), split=st.integers(1, 5), engine=st.sampled_from(ROUTES))
def test_invariants(likelihood: str, which: str, n: int, seed: int, split: int, engine: str):
    """Symmetry ``uᵀAv = vᵀAu``, ``vᵀAv ≥ 0`` for the GGN and the empirical and MC Fisher, linearity, splits
    combine (each route of the empirical, MC and Hessian products; MC with the same generator state in every
    call)."""
    model, problem = small_problem(likelihood)
    params = ffx.params_of(model)
    batch = small_batch(likelihood, n, seed)
    options = {"engine": engine} if which in ("empirical", "mc", "hessian") else {}

    def fn(*args):
        extra = {"generator": generator(seed)} if which == "mc" else {}
        return FNS[which](*args, **options, **extra)

    uv = probes(params, k=2, seed=seed)
    out = fn(problem, params, batch, uv)
    u, v = ({k: x[i] for k, x in uv.items()} for i in (0, 1))
    au, av = ({k: x[i] for k, x in out.items()} for i in (0, 1))
    scale = 1 + float(vectors.dot(au, au)) ** 0.5 * float(vectors.dot(v, v)) ** 0.5
    assert abs(float(vectors.dot(u, av) - vectors.dot(v, au))) <= 1e-10 * scale
    if which != "hessian":
        assert float(vectors.dot(v, av)) >= -1e-12 * scale
    combo = fn(problem, params, batch, vectors.add(vectors.scale(u, 2.0), v, -3.0))
    assert_tree_close(combo, vectors.add(vectors.scale(au, 2.0), av, -3.0), rtol=1e-9, atol=1e-11)
    if n > 1:
        cut = min(split, n - 1)
        x, y = batch
        parts = fn(problem, params, [(x[:cut], y[:cut]), (x[cut:], y[cut:])], uv)
        assert_tree_close(parts, out, rtol=1e-9, atol=1e-12)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp():
    b = build(BY_NAME["mlp-categorical"])
    return b.problem, b.params, b.batch


@pytest.mark.parametrize("fn", [ffx.ggn_vp, ffx.empirical_fisher_vp, ffx.mc_fisher_vp, ffx.hvp],
                         ids=lambda f: f.__name__)
def test_bad_vectors(mlp, fn):
    problem, params, batch = mlp
    name, first = next(iter(params.items()))
    good = probes(params, k=None)
    with pytest.raises(ffx.FisherError, match=re.escape(f"missing [{name!r}]")):
        fn(problem, params, batch, {k: x for k, x in good.items() if k != name})
    with pytest.raises(ffx.FisherError, match="unexpected"):
        fn(problem, params, batch, {**good, "nope": first})
    with pytest.raises(ffx.FisherError, match=re.escape(f"v[{name!r}] has shape")):
        fn(problem, params, batch, {**good, name: first.new_zeros(3, 3)})
    with pytest.raises(ffx.FisherError, match="inf or NaN"):
        fn(problem, params, batch, {**good, name: torch.full_like(first, float("nan"))})
    with pytest.raises(ffx.FisherError, match="same number K"):
        fn(problem, params, batch, {**good, name: torch.stack([first, first])})
    with pytest.raises(ffx.FisherError, match="empty collection of batches"):
        fn(problem, params, [], good)
    with pytest.raises(ffx.FisherError, match="normalize"):
        fn(problem, params, batch, good, normalize="mean")
    with pytest.raises(ffx.FisherError, match="unknown parameter"):
        fn(problem, {"nope": first}, batch, {"nope": first})


def test_bad_options(mlp):
    problem, params, batch = mlp
    v = probes(params, k=None)
    with pytest.raises(ffx.FisherError, match="per must be"):
        ffx.empirical_fisher_vp(problem, params, batch, v, per="position")
    with pytest.raises(ffx.FisherError, match="n_samples"):
        ffx.mc_fisher_vp(problem, params, batch, v, n_samples=0)


@pytest.mark.parametrize("fn", [ffx.ggn_vp, ffx.hvp], ids=lambda f: f.__name__)
def test_bad_targets_are_named(mlp, fn):
    problem, params, batch = mlp
    x, y = batch
    v = probes(params, k=None)
    with pytest.raises(ffx.FisherError, match="class targets must lie in"):
        fn(problem, params, (x, y + 100), v)
    with pytest.raises(ffx.FisherError, match="no active position"):
        fn(problem, params, (x, torch.full_like(y, -100)), v)


def test_non_finite_product_is_refused(mlp):
    problem, params, batch = mlp
    x, y = batch
    v = probes(params, k=None)
    with pytest.raises(ffx.FisherError, match="non-finite"):
        ffx.ggn_vp(problem, params, (x * float("inf"), y), v)


def test_operators_module_names():
    assert set(operators.__all__) >= {"ggn_vp", "fisher_vp", "empirical_fisher_vp", "mc_fisher_vp", "hvp"}


# --- the operators in the solvers and spectra ---------------------------------------------------------

def test_operators_drive_the_solvers_and_spectra():
    """Lanczos on ggn_vp gives the dense GGN's top eigenvalues, CG on it the dense damped solve, Hutchinson
    on hvp the dense Hessian's trace (within 4 standard errors), on a real model rather than a matrix."""
    case = BY_NAME["tied-weights"]
    b = build(case)
    z = testing.normalizer(b.nlls, "samples")
    ggn = functools.partial(ffx.ggn_vp, b.problem, b.params, b.batch)
    dense_g = dense(case.name, "ggn") / z
    top = ffx.lanczos(ggn, b.params, k=3, generator=generator(0))
    torch.testing.assert_close(top.values, torch.linalg.eigvalsh(dense_g).flip(0)[:3], rtol=1e-8, atol=1e-10)
    rhs = probes(b.params, k=None)
    solved = ffx.cg_solve(ggn, rhs, damping=0.1, tol=1e-10)
    assert solved.converged
    want = torch.linalg.solve(dense_g + 0.1 * torch.eye(dense_g.shape[0], dtype=dense_g.dtype),
                              vectors.flatten(rhs, b.params))
    torch.testing.assert_close(vectors.flatten(solved.x, b.params), want, rtol=1e-7, atol=1e-9)
    hessian = functools.partial(ffx.hvp, b.problem, b.params, b.batch)
    trace = ffx.hutchinson_trace(hessian, b.params, n_probes=64, generator=generator(1))
    exact = float(dense(case.name, "hessian").trace()) / z
    assert abs(float(trace.estimate) - exact) <= 4 * float(trace.standard_error)


@pytest.mark.parametrize("which", WHICH)
def test_list_with_normalize_none_is_the_sum_over_batches(which: str):
    """No normalisation means none for the whole list: the product on the concatenated data, whatever the split."""
    case = BY_NAME["mlp-categorical"]
    b = build(case)
    x, y = b.batch
    v = probes(b.params)
    splits = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert_tree_close(product(which, b, v, "none", batch=splits), product(which, b, v, "none"), **case.tol)
