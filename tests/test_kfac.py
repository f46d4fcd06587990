"""K-FAC and EKFAC: curvlinops' scaling, exact cases, masks, operations on the factors, EMA and combine.

Float64 throughout. The exact cases need no tolerance tuning (one Linear with one sample; deep linear
networks with weight sharing, Eschenhagen et al. 2023); the dense references are those of
:mod:`fisherfx.testing` (``Jᵀ H J`` from ``jacrev``, looped per-sample gradients), which never touch
fisherfx's engines.
"""

import functools
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fisherfx as ffx
from fisherfx import testing, vectors
from fisherfx.spectrum import cg_solve
from tests.cases import BY_NAME, CASES, LM_CASES, Transposed, build, case_id

# the module (``fisherfx.kfac`` is the function)
K = importlib.import_module("fisherfx._kfac")

F64 = torch.float64
EXACT = {"rtol": 1e-10, "atol": 1e-13}  # the same sums in another order (float64)
KINDS = ("empirical", "mc", "exact")
MODES = ("expand", "reduce")

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=F64)


def seeded(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().to(F64).eval()


def offsets(params: dict[str, Tensor]) -> dict[str, slice]:
    out, start = {}, 0
    for name, p in params.items():
        out[name] = slice(start, start + p.numel())
        start += p.numel()
    return out


def block(dense: Tensor, params: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
    """The rows and columns of ``names`` (in the flat order of ``params``)."""
    where = offsets(params)
    idx = torch.cat([torch.arange(where[n].start, where[n].stop) for n in names])
    return dense[idx][:, idx]


@functools.cache
def case_kfac(name: str, kind: str, mode: str, normalize: str = "tokens") -> K.KFAC:
    b = build(BY_NAME[name])
    return K.kfac(b.problem, b.params, b.batch, kind=kind, mode=mode, normalize=normalize, dtype=F64,
                  generator=gen(3))


# --- agreement with curvlinops' KFACLinearOperator -----------------------------------------------

class Tagger(nn.Module):
    """A position-wise sequence model: ``[N, T, d]`` features → ``[N, T, C]`` logits."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def peer_workload(name: str):
    """``(fisherfx model, curvlinops model, inputs, targets, normalize)`` for a mean-reduced cross-entropy."""
    if name == "mlp":
        model = seeded(lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
        return model, model, randn(1, 7, 5), torch.randint(0, 3, (7,), generator=gen(2)), "samples"
    if name == "cnn":
        model = seeded(lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2),
                                             nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)))
        return model, model, randn(3, 5, 2, 4, 4), torch.randint(0, 3, (5,), generator=gen(4)), "samples"
    model = seeded(Tagger)  # sequences: curvlinops reads [N, C, T] logits, its mean runs over the N·T positions
    return model, Transposed(model), randn(5, 3, 4, 4), torch.randint(0, 5, (3, 4), generator=gen(6)), "tokens"


FISHER_TYPES = {"type-2": "exact", "empirical": "empirical"}


def curvlinops_dense(name: str, fisher_type: str, mode: str, mc_samples: int = 1) -> Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    model, theirs, x, y, _ = peer_workload(name)
    params = list(model.parameters())
    op = curvlinops.KFACLinearOperator(theirs, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type=fisher_type,
                                       kfac_approx=mode, mc_samples=mc_samples, separate_weight_and_bias=False,
                                       check_deterministic=False)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=F64)


def ours_dense(name: str, kind: str, mode: str, n_samples: int = 1) -> Tensor:
    model, _, x, y, normalize = peer_workload(name)
    fac = K.kfac(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y), kind=kind, mode=mode,
                 n_samples=n_samples, generator=gen(7), normalize=normalize, dtype=F64)
    assert not fac.diagonal, "every parameter has Kronecker factors here"
    return K.kfac_dense(fac)


# every combination but type-2 + reduce on sequences: a documented difference (its own test below)
PEER_SETTINGS = [(name, fisher_type, mode) for name in ("mlp", "cnn", "sequence")
                 for fisher_type in sorted(FISHER_TYPES) for mode in MODES
                 if (name, fisher_type, mode) != ("sequence", "type-2", "reduce")]


@pytest.mark.parametrize(("name", "fisher_type", "mode"), PEER_SETTINGS, ids="-".join)
def test_equals_curvlinops(name, fisher_type, mode):
    torch.testing.assert_close(ours_dense(name, FISHER_TYPES[fisher_type], mode),
                               curvlinops_dense(name, fisher_type, mode), **EXACT)


MC_DRAWS = 2000
MC_SCALE_TOL = 0.1  # both sides average 2000 draws per position (~2% relative noise); a wrong 1/S, 1/N or 1/T is ≥ 2×


@pytest.mark.parametrize("name", ["mlp", "sequence"])
def test_mc_scaling_equals_curvlinops(name):
    theirs, ours = curvlinops_dense(name, "mc", "expand", MC_DRAWS), ours_dense(name, "mc", "expand", MC_DRAWS)
    assert float((ours - theirs).norm() / theirs.norm()) < MC_SCALE_TOL


def test_curvlinops_type2_reduce_on_sequences():
    """curvlinops' type-2 backpropagates each Hessian square-root column at all positions of a sample at once,
    so with ``reduce`` its ``G`` holds cross-position terms ``S_t S_{t'}ᵀ`` that its own MC estimator has zero in
    expectation; fisherfx's exact kind is that expectation (one position at a time)."""
    exact = ours_dense("sequence", "exact", "reduce")
    assert float((curvlinops_dense("sequence", "type-2", "reduce") - exact).norm() / exact.norm()) > 0.1
    theirs_mc = curvlinops_dense("sequence", "mc", "reduce", MC_DRAWS)
    assert float((theirs_mc - exact).norm() / exact.norm()) < MC_SCALE_TOL


# --- exact cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_one_linear_one_sample_is_exact(kind):
    """One Linear, Gaussian likelihood, one sample: ``(x̃ x̃ᵀ) ⊗ (S Sᵀ)`` is the GGN (``r rᵀ``: the EF) exactly."""
    model = seeded(lambda: nn.Linear(4, 3))
    x, y = randn(1, 1, 4), randn(2, 1, 3)
    problem, params = ffx.supervised(model, ffx.Gaussian(sigma=0.7)), ffx.params_of(model)
    nlls = testing.supervised_nlls(model, ffx.Gaussian(sigma=0.7), x, y)
    want = testing.exact_fisher(nlls, params, 1) if kind == "exact" else \
        testing.empirical_fisher(testing.loop_grads(nlls, params), params, 1)
    fac = K.kfac(problem, params, (x, y), kind=kind, dtype=F64)
    assert list(fac.layers) == ["weight"] and fac.layers["weight"].names == ("weight", "bias")
    torch.testing.assert_close(K.kfac_dense(fac), want, **EXACT)


class DeepLinear(nn.Module):
    """Linear layers shared over the positions of ``[N, T, d]`` inputs; ``pool``: summed over positions first
    (the reduce setting), else one output per position (the expand setting)."""

    def __init__(self, pool: bool):
        super().__init__()
        self.pool = pool
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(self.a(x))
        return self.c(h.sum(1) if self.pool else h)


@pytest.mark.parametrize("mode", MODES)
def test_deep_linear_weight_sharing_is_exact(mode):
    """Eschenhagen et al. (2023): K-FAC-expand is the exact GGN block for a deep linear network in the expand
    setting (a loss per position), K-FAC-reduce in the reduce setting (positions summed before the loss)."""
    model = seeded(lambda: DeepLinear(pool=mode == "reduce"))
    x = randn(3, 5, 6, 3)
    y = randn(4, 5, 2) if mode == "reduce" else randn(4, 5, 6, 2)
    likelihood = ffx.Gaussian(sigma=1.3)
    params = ffx.params_of(model)
    normalize = "samples"
    fac = K.kfac(ffx.supervised(model, likelihood), params, (x, y), kind="exact", mode=mode, normalize=normalize,
                 dtype=F64)
    ggn = testing.exact_fisher(testing.supervised_nlls(model, likelihood, x, y), params, count=5)
    got = K.kfac_dense(fac)
    for layer in fac.layers.values():
        torch.testing.assert_close(block(got, params, layer.names), block(ggn, params, layer.names), **EXACT)
    assert len(fac.layers) == 3 and not fac.diagonal


def assert_psd(m: Tensor, what: str) -> None:
    if m.ndim == 1:
        assert bool((m >= 0).all()), what
        return
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-14 * float(m.abs().max()), msg=what)
    assert float(torch.linalg.eigvalsh(m).min()) >= -1e-12 * float(m.abs().max()), what


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_symmetric_psd(case, kind, mode):
    """Every factor and diagonal is symmetric PSD (so is their Kronecker product); the dense matrix too, on the
    cases small enough to form it quickly."""
    fac = case_kfac(case.name, kind, mode)
    for key, layer in fac.layers.items():
        assert_psd(layer.A, f"{key}: A")
        assert_psd(layer.G, f"{key}: G")
        assert float(layer.G.abs().max()) > 0, f"{key}: G = 0"
    for name, d in fac.diagonal.items():
        assert_psd(d.reshape(-1), name)
    if case.family is None:
        assert_psd(K.kfac_dense(fac), "dense")


class Mixing(nn.Module):
    """Positions mixed causally (a running sum, as attention mixes them) between two position-wise Linears."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x).cumsum(1)))


MC_RUNS, MC_PER_RUN = 6, 300
Z_BOUND = 6.0  # |mean − exact| ≤ 6 standard errors of the mean over runs, per entry (plus a rounding floor)


@pytest.mark.parametrize("mode", MODES)
def test_mc_approaches_exact(mode):
    """The mean of MC factors is the exact kind's, for layers that mix positions too: ``G`` within a tolerance
    derived from the spread of independent runs, ``A`` (label-free) exactly."""
    model = seeded(Mixing)
    x = randn(8, 4, 5, 3)
    y = torch.randint(0, 3, (4, 5), generator=gen(9))
    y[0, 1] = y[2, 4] = -100
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    exact = K.kfac(problem, params, (x, y), kind="exact", mode=mode, dtype=F64)
    runs = [K.kfac(problem, params, (x, y), kind="mc", mode=mode, n_samples=MC_PER_RUN, generator=gen(100 + r),
                   dtype=F64) for r in range(MC_RUNS)]
    for key, layer in exact.layers.items():
        g = torch.stack([run.layers[key].G for run in runs])
        mean, se = g.mean(0), g.std(0) / math.sqrt(MC_RUNS)
        assert bool(((mean - layer.G).abs() <= Z_BOUND * se + 1e-12).all()), key
        assert float((mean - layer.G).norm() / layer.G.norm()) < 0.1, key  # and close: not a vacuous spread
        torch.testing.assert_close(runs[0].layers[key].A, layer.A, **EXACT)


# --- masks ----------------------------------------------------------------------------------------

def _rows(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Each sequence of a padded causal-LM batch alone, its padding stripped."""
    mask = batch["attention_mask"].bool()
    return [{"input_ids": batch["input_ids"][n][mask[n]][None], "labels": batch["labels"][n][mask[n]][None]}
            for n in range(mask.shape[0])]


@pytest.mark.parametrize("normalize", ["tokens", "samples"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_padding_contributes_nothing(case, mode, normalize):
    """A padded batch with -100 labels gives the combination of its rows run alone, unpadded."""
    b = build(case)
    whole = K.kfac(b.problem, b.params, b.batch, kind="empirical", mode=mode, normalize=normalize, dtype=F64)
    alone = K.kfac_combine([K.kfac(b.problem, b.params, row, kind="empirical", mode=mode, normalize=normalize,
                                   dtype=F64) for row in _rows(b.batch)])
    for key, layer in whole.layers.items():
        torch.testing.assert_close(layer.A, alone.layers[key].A, **EXACT)
        torch.testing.assert_close(layer.G, alone.layers[key].G, **EXACT)
        assert int(layer.a_count) == int(alone.layers[key].a_count)
    testing.assert_tree_close(whole.diagonal, alone.diagonal, **EXACT)


def test_tagger_padding_contributes_nothing():
    """Ignored targets of a position-wise tagger: the batch equals its rows cut to their active positions."""
    b = build(BY_NAME["embed-layernorm-tokens"])
    ids, targets = b.batch
    whole = K.kfac(b.problem, b.params, b.batch, normalize="tokens", dtype=F64)
    keep = targets != -100
    parts = [K.kfac(b.problem, b.params, (ids[n][keep[n]][None], targets[n][keep[n]][None]), normalize="tokens",
                    dtype=F64) for n in range(ids.shape[0])]
    alone = K.kfac_combine(parts)
    for key, layer in whole.layers.items():
        torch.testing.assert_close(layer.A, alone.layers[key].A, **EXACT)
        torch.testing.assert_close(layer.G, alone.layers[key].G, **EXACT)
    assert whole.layers["embed.weight"].A.ndim == 1  # the Embedding's A: token counts, diagonal
    torch.testing.assert_close(whole.layers["embed.weight"].A.sum(), torch.tensor(1.0, dtype=F64))


# --- layers and documented choices ----------------------------------------------------------------

def _calls(model: nn.Module, module: nn.Module, problem, params, batch) -> list[tuple[Tensor, Tensor]]:
    """``(x, g)`` of every call of ``module``: inputs and output gradients of the summed empirical loss."""
    seen: list = []

    def hook(_, args, out):
        out.register_hook(lambda g, x=args[0]: seen.append((x.detach(), g.detach())))

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            loss = ffx.nll(problem, leaves, batch, normalize="none")
            torch.autograd.grad(loss, list(leaves.values()))
    finally:
        handle.remove()
    return seen


def test_module_called_twice_is_one_layer_over_both_calls():
    """The calls of a module are more positions of its weight-sharing axis (expand): ``A`` averages ``x̃ x̃ᵀ``
    over both calls, ``G`` sums ``g gᵀ`` over both."""
    b = build(BY_NAME["module-twice"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    layer = fac.layers["block.weight"]
    assert layer.names == ("block.weight", "block.bias") and int(layer.a_count) == 8
    calls = _calls(b.model, b.model.block, b.problem, b.params, b.batch)
    assert len(calls) == 2
    xs = torch.cat([torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1) for x, _ in calls])
    gs = torch.cat([g for _, g in calls])
    torch.testing.assert_close(layer.A, xs.T @ xs / 8, **EXACT)
    torch.testing.assert_close(layer.G, gs.T @ gs / 4, **EXACT)


def test_tied_weight_is_one_layer_and_biases_their_own():
    b = build(BY_NAME["tied-weights"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    assert {k: layer.names for k, layer in fac.layers.items()} == {
        "enc.weight": ("enc.weight",), "enc.bias": ("enc.bias",), "dec.bias": ("dec.bias",)}
    (x_enc, g_enc), = _calls(b.model, b.model.enc, b.problem, b.params, b.batch)
    (x_dec, g_dec), = _calls(b.model, b.model.dec, b.problem, b.params, b.batch)
    xs, gs = torch.cat([x_enc, x_dec]), torch.cat([g_enc, g_dec])
    torch.testing.assert_close(fac.layers["enc.weight"].A, xs.T @ xs / 12, **EXACT)
    torch.testing.assert_close(fac.layers["enc.weight"].G, gs.T @ gs / 6, **EXACT)
    torch.testing.assert_close(fac.layers["dec.bias"].G, g_dec.T @ g_dec / 6, **EXACT)
    torch.testing.assert_close(fac.layers["enc.bias"].A, torch.ones(1, 1, dtype=F64), **EXACT)


def test_gpt2_tied_embedding_is_diagonal():
    """GPT-2's ``wte`` is both an Embedding and the Linear head: no one Kronecker structure, so its diagonal."""
    b = build(BY_NAME["gpt2-right-pad"])
    fac = case_kfac("gpt2-right-pad", "empirical", "expand")
    assert "transformer.wte.weight" in fac.diagonal and "transformer.h.0.ln_1.weight" in fac.diagonal
    diag = ffx.diag_fisher(b.problem, b.params, b.batch, normalize="tokens", dtype=F64)
    testing.assert_tree_close(fac.diagonal, {k: diag.value[k] for k in fac.diagonal}, **EXACT)
    assert fac.layers["transformer.h.1.attn.c_attn.weight"].transposed  # HF Conv1D: [in, out]


def test_conv_patches_and_counts():
    b = build(BY_NAME["cnn-conv2d"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    layer = fac.layers["0.weight"]
    assert layer.A.shape == (2 * 9 + 1, 2 * 9 + 1) and layer.G.shape == (3, 3)
    assert int(layer.a_count) == 3 * 9  # samples × output pixels
    reduce = K.kfac(b.problem, b.params, b.batch, mode="reduce", dtype=F64)
    assert int(reduce.layers["0.weight"].a_count) == 3


# --- operations -----------------------------------------------------------------------------------

OPS_CASES = ["mlp-categorical", "cnn-conv2d", "embed-layernorm-tokens", "gpt2-right-pad", "tied-weights"]
LAMBDA = 0.3


def flat_vector(fac: K.KFAC, seed: int, k: int | None = None) -> dict[str, Tensor]:
    like = {n: torch.empty(s, dtype=F64) for n, s in fac.shapes.items()}
    return vectors.random_like(like, k=k, generator=gen(seed), distribution="gaussian")


def as_flat(fac: K.KFAC, v: dict[str, Tensor]) -> Tensor:
    return vectors.flatten(v, {n: torch.empty(s) for n, s in fac.shapes.items()})


@pytest.mark.parametrize("name", OPS_CASES)
def test_vp_solve_diag_trace_logdet_eigenvalues(name):
    fac = case_kfac(name, "exact", "expand")
    dense = K.kfac_dense(fac)
    v = flat_vector(fac, 1, k=2)
    torch.testing.assert_close(as_flat(fac, K.kfac_vp(fac, v)), as_flat(fac, v) @ dense, **EXACT)
    damped = dense + LAMBDA * torch.eye(dense.shape[0], dtype=F64)
    want = torch.linalg.solve(damped, as_flat(fac, v).T).T
    with_eig = K.kfac_eig(fac)
    for f in (fac, with_eig):
        torch.testing.assert_close(as_flat(fac, K.kfac_solve(f, v, LAMBDA)), want, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(as_flat(fac, K.kfac_diag(fac)), dense.diagonal(), **EXACT)
    torch.testing.assert_close(K.kfac_trace(fac), dense.trace(), **EXACT)
    torch.testing.assert_close(K.kfac_logdet(with_eig, LAMBDA), torch.linalg.slogdet(damped)[1], rtol=1e-9, atol=1e-9)
    top = torch.linalg.eigvalsh(dense).flip(0)[:5]
    torch.testing.assert_close(K.kfac_eigenvalues(with_eig, 5), top, rtol=1e-8, atol=1e-12)
    assert fac.eig is None and with_eig.eig is not None  # a new value; fac unchanged


@pytest.mark.parametrize("name", OPS_CASES)
def test_pi_damping(name):
    """``(G + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹`` per layer, ``π = sqrt((tr A/dim A)/(tr G/dim G))``."""
    fac = case_kfac(name, "empirical", "expand")
    v = flat_vector(fac, 2)
    got = K.kfac_solve(fac, v, LAMBDA, damping_kind="pi")
    root = math.sqrt(LAMBDA)
    for layer in fac.layers.values():
        a = torch.diag(layer.A) if layer.A.ndim == 1 else layer.A
        pi = math.sqrt(float(a.trace() / a.shape[0]) / float(layer.G.trace() / layer.G.shape[0]))
        da = a + pi * root * torch.eye(a.shape[0], dtype=F64)
        dg = layer.G + root / pi * torch.eye(layer.G.shape[0], dtype=F64)
        m = K._join(layer, v, fac.shapes)
        want = torch.linalg.solve(da, torch.linalg.solve(dg, m.T).T) if layer.transposed else \
            torch.linalg.solve(dg, torch.linalg.solve(da, m.T).T)
        torch.testing.assert_close(K._join(layer, got, fac.shapes), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", OPS_CASES)
def test_inverse_is_the_pi_solve(name):
    fac = case_kfac(name, "empirical", "expand")
    v = flat_vector(fac, 6)
    inverse = K.kfac_inverse(fac, LAMBDA)
    testing.assert_tree_close(K.kfac_vp(inverse, v), K.kfac_solve(fac, v, LAMBDA, damping_kind="pi"),
                              rtol=1e-9, atol=1e-12)
    testing.assert_tree_close(K.kfac_vp(K.kfac_inverse(K.kfac_eig(fac), LAMBDA), v), K.kfac_vp(inverse, v),
                              rtol=1e-9, atol=1e-12)


def test_kfac_as_a_matvec_for_cg():
    fac = case_kfac("mlp-categorical", "exact", "expand")
    v = flat_vector(fac, 3)
    cg = cg_solve(functools.partial(K.kfac_vp, fac), v, damping=LAMBDA, tol=1e-12)
    testing.assert_tree_close(cg.x, K.kfac_solve(fac, v, LAMBDA), rtol=1e-8, atol=1e-10)


# --- EKFAC ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp-categorical", "cnn-conv2d", "embed-layernorm-tokens", "module-twice"])
def test_ekfac_is_the_empirical_fisher_diagonal_in_the_eigenbasis(name):
    b = build(BY_NAME[name])
    fac = K.ekfac(b.problem, b.params, b.batch, kind="empirical", normalize="samples", dtype=F64)
    ef = testing.empirical_fisher(testing.loop_grads(b.nlls, b.params), b.params, count=len(b.nlls))
    like = {n: torch.empty(s) for n, s in fac.shapes.items()}
    index = vectors.unflatten(torch.arange(ef.shape[0], dtype=F64), like)
    for key, layer in fac.layers.items():
        e = fac.eig[key]
        order = K._join(layer, index, fac.shapes).long()  # the layout's entries as flat indices
        sub = ef[order.reshape(-1)][:, order.reshape(-1)]
        ql, qr, _, _ = K._bases(layer, e)
        q = torch.kron(torch.eye(order.shape[0], dtype=F64) if ql is None else ql.contiguous(),
                       torch.eye(order.shape[1], dtype=F64) if qr is None else qr.contiguous())
        torch.testing.assert_close(e.scale, (q.T @ sub @ q).diagonal().reshape(order.shape), **EXACT)
    dense = K.kfac_dense(fac)  # EKFAC's own operator: Q diag(s) Qᵀ, PSD, its diagonal kfac_diag's
    torch.testing.assert_close(as_flat(fac, K.kfac_diag(fac)), dense.diagonal(), **EXACT)
    v = flat_vector(fac, 4)
    x = K.kfac_solve(fac, v, LAMBDA)
    testing.assert_tree_close(vectors.add(K.kfac_vp(fac, x), x, LAMBDA), v, rtol=1e-8, atol=1e-10)


def test_ekfac_keeps_the_basis_of_given_factors():
    b = build(BY_NAME["mlp-categorical"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    e = K.ekfac(b.problem, b.params, b.batch, factors=fac, kind="exact", dtype=F64)
    torch.testing.assert_close(e.eig["0.weight"].g_vectors, K.kfac_eig(fac).eig["0.weight"].g_vectors, **EXACT)


# --- EMA and combine ------------------------------------------------------------------------------

def test_ema_of_constant_factors_is_them():
    fac = case_kfac("embed-layernorm-tokens", "empirical", "expand")
    state = K.kfac_ema_init(fac, decay=0.9)
    for _ in range(3):
        state = K.kfac_ema_update(state, fac)
    value = K.kfac_ema_value(state)
    for key, layer in fac.layers.items():
        torch.testing.assert_close(value.layers[key].A, layer.A, **EXACT)
        torch.testing.assert_close(value.layers[key].G, layer.G, **EXACT)
    testing.assert_tree_close(value.diagonal, fac.diagonal, **EXACT)
    raw = K.kfac_ema_value(state, bias_corrected=False)
    torch.testing.assert_close(raw.layers["head.weight"].G, (1 - 0.9**3) * fac.layers["head.weight"].G, **EXACT)


def test_ema_update_is_pure_and_weighs_the_latest():
    b = build(BY_NAME["mlp-categorical"])
    x, y = b.batch
    f1 = K.kfac(b.problem, b.params, (x[:2], y[:2]), dtype=F64)
    f2 = K.kfac(b.problem, b.params, (x[2:], y[2:]), dtype=F64)
    state = K.kfac_ema_update(K.kfac_ema_init(f1, 0.5), f1)
    before = state.G.mean["0.weight"].clone()
    new = K.kfac_ema_update(state, f2)
    torch.testing.assert_close(state.G.mean["0.weight"], before, rtol=0, atol=0)
    want = (0.5 * 0.5 * f1.layers["0.weight"].G + 0.5 * f2.layers["0.weight"].G) / (1 - 0.25)
    torch.testing.assert_close(K.kfac_ema_value(new).layers["0.weight"].G, want, **EXACT)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", ["samples", "tokens"])
def test_combine_of_a_split_batch_is_the_whole(mode, normalize):
    b = build(BY_NAME["embed-layernorm-tokens"])
    ids, targets = b.batch
    whole = K.kfac(b.problem, b.params, b.batch, mode=mode, normalize=normalize, dtype=F64)
    parts = K.kfac_combine([K.kfac(b.problem, b.params, (ids[s], targets[s]), mode=mode, normalize=normalize,
                                   dtype=F64) for s in (slice(0, 1), slice(1, 4))])
    torch.testing.assert_close(K.kfac_dense(parts), K.kfac_dense(whole), **EXACT)


@pytest.mark.parametrize("mode", MODES)
def test_batch_size_equal_to_a_length(mode):
    """``N = T``: the engine cuts the batch in two to tell samples from positions; the parts' factors add up to the
    batch's (``A`` weighted by its rows)."""
    model = seeded(Tagger)
    x, y = randn(11, 4, 4, 4), torch.randint(0, 5, (4, 4), generator=gen(12))
    y[1, 2:] = -100
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    whole = K.kfac(problem, params, (x, y), mode=mode, normalize="tokens", dtype=F64)
    parts = K.kfac_combine([K.kfac(problem, params, (x[s], y[s]), mode=mode, normalize="tokens", dtype=F64)
                            for s in (slice(0, 3), slice(3, 4))])
    torch.testing.assert_close(K.kfac_dense(whole), K.kfac_dense(parts), **EXACT)
    h = x.reshape(-1, 4)[(y != -100).reshape(-1)]
    if mode == "expand":
        xt = torch.cat([h, torch.ones(h.shape[0], 1, dtype=F64)], 1)
        torch.testing.assert_close(whole.layers["hidden.weight"].A, xt.T @ xt / h.shape[0], **EXACT)


class TokenTagger(nn.Module):
    """Embedding → Linear → mixing over positions (a running mean) → Linear: ``[N, T]`` ids → ``[N, T, C]``."""

    def __init__(self):
        super().__init__()
        self.embed, self.inp, self.out = nn.Embedding(7, 4), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.inp(self.embed(ids)))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return self.out(h.cumsum(1) / steps)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(1, 6), seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(MODES),
       normalize=st.sampled_from(["samples", "tokens"]))
def test_batch_invariances(n, t, seed, mode, normalize):
    """Permuting the samples changes nothing; a batch equals the combination of its samples alone; every factor
    is symmetric PSD."""
    model = seeded(TokenTagger)
    ids = torch.randint(0, 7, (n, t), generator=gen(seed))
    y = torch.randint(0, 3, (n, t), generator=gen(seed + 1))
    drop = torch.rand(n, t, generator=gen(seed + 2)) < 0.3
    drop[:, 0] = False  # every row keeps an active position
    y[drop] = -100
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    options = dict(kind="exact", mode=mode, normalize=normalize, dtype=F64)
    whole = K.kfac(problem, params, (ids, y), **options)
    order = torch.randperm(n, generator=gen(seed + 3))
    permuted = K.kfac(problem, params, (ids[order], y[order]), **options)
    alone = K.kfac_combine([K.kfac(problem, params, (ids[i:i + 1], y[i:i + 1]), **options) for i in range(n)])
    dense = K.kfac_dense(whole)
    torch.testing.assert_close(K.kfac_dense(permuted), dense, **EXACT)
    torch.testing.assert_close(K.kfac_dense(alone), dense, **EXACT)
    for key, layer in whole.layers.items():
        assert_psd(layer.A, f"{key}: A")
        assert_psd(layer.G, f"{key}: G")


def test_float32_by_default():
    b = build(BY_NAME["mlp-categorical"])
    fac = K.kfac(b.problem, b.params, b.batch)
    assert fac.layers["0.weight"].A.dtype == torch.float32 and fac.layers["0.weight"].G.dtype == torch.float32


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input():
    b = build(BY_NAME["mlp-categorical"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    v = flat_vector(fac, 5)
    with pytest.raises(ffx.FisherError, match=r"kfac_vp: .*missing \['2.bias'\]"):
        K.kfac_vp(fac, {k: x for k, x in v.items() if k != "2.bias"})
    with pytest.raises(ffx.FisherError, match=r"kfac_vp: v\['0.weight'\] has shape \(6, 5\)"):
        K.kfac_vp(fac, {**v, "0.weight": torch.zeros(6, 5, dtype=F64)})
    with pytest.raises(ffx.FisherError, match="mode must be one of"):
        K.kfac(b.problem, b.params, b.batch, mode="diagonal")
    with pytest.raises(ffx.FisherError, match="normalize must be one of"):
        K.kfac(b.problem, b.params, b.batch, normalize="none")
    for damping in (0.0, -1.0, float("nan")):
        with pytest.raises(ffx.FisherError, match="damping must be a finite number > 0"):
            K.kfac_solve(fac, v, damping)
    with pytest.raises(ffx.FisherError, match="damping_kind must be one of"):
        K.kfac_solve(fac, v, 0.1, damping_kind="levenberg")
    other = build(BY_NAME["mlp-gaussian"])
    state = K.kfac_ema_init(fac)
    with pytest.raises(ffx.FisherError, match="kfac_ema_update: the factors do not match the state's: other "
                                              "parameters or shapes"):
        K.kfac_ema_update(state, K.kfac(other.problem, other.params, other.batch, dtype=F64))
    with pytest.raises(ffx.FisherError, match="another mode or kind"):
        K.kfac_ema_update(state, K.kfac(b.problem, b.params, b.batch, mode="reduce", dtype=F64))
    with pytest.raises(ffx.FisherError, match="ema_value: .*no update yet"):
        K.kfac_ema_value(state)
    with pytest.raises(ffx.FisherError, match="expected a KFAC"):
        K.kfac_vp(v, v)
    with pytest.raises(ffx.FisherError, match="kfac_inverse: damping must be a finite number > 0"):
        K.kfac_inverse(fac, 0.0)
    with pytest.raises(ffx.FisherError, match="EKFAC eigenvalues, which are not a Kronecker product"):
        K.kfac_inverse(K.ekfac(b.problem, b.params, b.batch, dtype=F64), 0.1)
    with pytest.raises(ffx.FisherError, match="damping_kind='pi' damps Kronecker factors"):
        K.kfac_solve(K.ekfac(b.problem, b.params, b.batch, dtype=F64), v, 0.1, damping_kind="pi")


def test_taps_only_names_the_layers_without_factors():
    b = build(BY_NAME["gpt2-right-pad"])
    with pytest.raises(ffx.FisherError, match=r"engine='taps' has no Kronecker factors .*'transformer.wte.weight': "
                                              r"it is shared by layers of different kinds"):
        K.kfac(b.problem, b.params, b.batch, engine="taps")

    class Outside(nn.Module):  # a weight also used outside its layer
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + x @ self.lin.weight

    model = seeded(Outside)
    problem = ffx.supervised(model, ffx.Gaussian())
    batch = (randn(1, 4, 3), randn(2, 4, 3))
    with pytest.raises(ffx.FisherError, match=r"'lin.weight': its gradient does not all come through tapped layers"):
        K.kfac(problem, ffx.params_of(model), batch, engine="taps")
    fac = K.kfac(problem, ffx.params_of(model), batch, dtype=F64)  # auto: its diagonal
    assert "lin.weight" in fac.diagonal and "lin.bias" in fac.diagonal


# --- provenance ------------------------------------------------------------------------------------

def test_factors_carry_their_provenance():
    b = build(BY_NAME["mlp-categorical"])
    fac = K.kfac(b.problem, b.params, b.batch, kind="mc", n_samples=2, generator=gen(0), normalize="tokens",
                 dtype=F64)
    assert fac.provenance == ffx.Provenance("kfac", "mc", "sample", "tokens", 2, "float64", None, None)
    assert K.ekfac(b.problem, b.params, b.batch, dtype=F64).provenance.quantity == "ekfac"
    # a KFAC built by hand (positional or by keyword, as before) has unknown provenance and mixes with any
    hand = K.KFAC(fac.layers, fac.diagonal, fac.count, fac.shapes, fac.mode, fac.kind)
    keyword = K.KFAC(layers=fac.layers, diagonal=fac.diagonal, count=fac.count, shapes=fac.shapes, mode=fac.mode,
                     kind=fac.kind, eig=None)
    assert hand.provenance == keyword.provenance == ffx.Provenance()
    assert K.kfac_combine([hand, fac]).provenance == fac.provenance
    state = K.kfac_ema_update(K.kfac_ema_init(fac, 0.9), fac)
    assert state.provenance == fac.provenance and K.kfac_ema_value(state).provenance == fac.provenance
    # EKFAC's factors are K-FAC's: averaging them drops the eigenvalues, and gives "kfac" factors
    e = K.ekfac(b.problem, b.params, b.batch, kind="mc", n_samples=2, generator=gen(0), normalize="tokens", dtype=F64)
    assert K.kfac_combine([e, fac]).provenance == fac.provenance


def test_combine_and_ema_refuse_other_kinds_normalisations_and_modes():
    b = build(BY_NAME["mlp-categorical"])
    fac = K.kfac(b.problem, b.params, b.batch, dtype=F64)
    mc = K.kfac(b.problem, b.params, b.batch, kind="mc", generator=gen(0), dtype=F64)
    tokens = K.kfac(b.problem, b.params, b.batch, normalize="tokens", dtype=F64)
    reduce = K.kfac(b.problem, b.params, b.batch, mode="reduce", dtype=F64)
    with pytest.raises(ffx.FisherError, match="kfac_combine: cannot mix estimates of different kind: factors 0: "
                                              "kind='empirical'; factors 1: kind='mc'"):
        K.kfac_combine([fac, mc])
    with pytest.raises(ffx.FisherError, match="kfac_combine: cannot mix estimates of different normalize: "
                                              "factors 0 to 1: normalize='samples'; factors 2"):
        K.kfac_combine([fac, fac, tokens])
    with pytest.raises(ffx.FisherError, match="kfac_combine: .*another mode or kind: .*mode='expand', the "
                                              "factors' mode='reduce'"):
        K.kfac_combine([fac, reduce])
    state = K.kfac_ema_init(fac)
    with pytest.raises(ffx.FisherError, match="kfac_ema_update: cannot mix estimates of different normalize: "
                                              "the state: normalize='samples'; the factors: normalize='tokens'"):
        K.kfac_ema_update(state, tokens)
    hand = mc._replace(provenance=ffx.Provenance())  # no provenance: the structure's kind still refuses
    with pytest.raises(ffx.FisherError, match="kfac_ema_update: .*kind='empirical', the factors' kind='mc'"):
        K.kfac_ema_update(state, hand)
