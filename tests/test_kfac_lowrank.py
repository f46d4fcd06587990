"""Low-rank input factors: every K-FAC operation on ``A`` kept as its rows equals the same operation on the dense ``A``.

Float64 throughout. Each case is computed with ``a_form="dense"`` (the ``i × i`` matrix, as before low-rank
factors existed) and ``a_form="lowrank"`` (every ``A`` as its rows, also where they outnumber the inputs), and
``"auto"`` where it picks the rows; the operations must agree to rounding. Cases: a CNN with a wide head
(``A`` of 325 inputs from 5 rows; the convolution's from more rows than inputs), an MLP with fewer samples
than inputs, a module called twice, a padded GPT-2 (HF ``Conv1D``'s transposed layout, an Embedding's
diagonal ``A``, masks), a tagger with ``-100`` targets; expand and reduce, the three kinds.
"""

import functools
import importlib
import json
import math
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import Tensor, nn
from torch.func import functional_call, grad

import fisherfx as ffx
from fisherfx import _factor, testing, vectors
from fisherfx._factor import LowRank
from fisherfx.natural import apply_updates, kfac_optimizer
from tests.cases import BY_NAME, build

K = importlib.import_module("fisherfx._kfac")

F64 = torch.float64
SAME = {"rtol": 1e-9, "atol": 1e-12}  # one quantity through two factorisations in float64 (seen: ~1e-14)
EXACT = {"rtol": 1e-10, "atol": 1e-13}  # the same sums in another order
LAMBDA = 0.3
DATA = pathlib.Path(__file__).resolve().parent / "data"

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seeded(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().to(F64).eval()


class Setting:
    """A model, its problem, parameters and one batch."""

    def __init__(self, problem, params, batch):
        self.problem, self.params, self.batch = problem, params, batch


def wide_cnn() -> Setting:
    """A convolution (10 inputs, 405 rows) and a head of 324 inputs (+ bias) on 5 images: auto keeps its rows."""
    model = seeded(lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(324, 3)))
    x = torch.randn(5, 1, 9, 9, generator=gen(1), dtype=F64)
    y = torch.randint(0, 3, (5,), generator=gen(2))
    return Setting(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y))


def wide_mlp() -> Setting:
    """An MLP whose first layer has 300 inputs and 6 samples."""
    model = seeded(lambda: nn.Sequential(nn.Linear(300, 5), nn.Tanh(), nn.Linear(5, 3)))
    x = torch.randn(6, 300, generator=gen(3), dtype=F64)
    return Setting(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, torch.randint(0, 3, (6,),
                                                                                                     generator=gen(4))))


class WideTwice(nn.Module):
    """One block of 10 inputs applied twice (its rows: both calls), then a logit per sample."""

    def __init__(self):
        super().__init__()
        self.block, self.head = nn.Linear(10, 10), nn.Linear(10, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))[:, 0]


def wide_twice() -> Setting:
    """A module called twice on 2 samples: 4 rows of 11 inputs."""
    model = seeded(WideTwice)
    x, y = torch.randn(2, 10, generator=gen(5), dtype=F64), torch.randint(0, 2, (2,), generator=gen(6)).to(F64)
    return Setting(ffx.supervised(model, ffx.Bernoulli()), ffx.params_of(model), (x, y))


def from_case(name: str) -> Setting:
    b = build(BY_NAME[name])
    return Setting(b.problem, b.params, b.batch)


SETTINGS = {"wide-cnn": wide_cnn, "wide-mlp": wide_mlp, "wide-twice": wide_twice,
            "module-twice": functools.partial(from_case, "module-twice"),
            "gpt2-right-pad": functools.partial(from_case, "gpt2-right-pad"),
            "tagger-ignore": functools.partial(from_case, "embed-layernorm-tokens")}


@functools.cache
def setting(name: str) -> Setting:
    return SETTINGS[name]()


@functools.cache
def factors(name: str, kind: str, mode: str, a_form: str) -> K.KFAC:
    s = setting(name)
    return K.kfac(s.problem, s.params, s.batch, kind=kind, mode=mode, normalize="tokens", dtype=F64,
                  generator=gen(7), a_form=a_form)


def low_rank_layers(fac: K.KFAC) -> list[str]:
    return [key for key, layer in fac.layers.items() if isinstance(layer.A, LowRank)]


def random_vector(fac: K.KFAC, seed: int, k: int | None = None) -> dict[str, Tensor]:
    like = {n: torch.empty(s, dtype=F64) for n, s in fac.shapes.items()}
    return vectors.random_like(like, k=k, generator=gen(seed), distribution="gaussian")


def assert_ops_equal(got: K.KFAC, want: K.KFAC) -> None:
    """Every operation of ``got`` equals ``want``'s: the dense matrix, products, both solves (with and without cached
    eigendecompositions), the π-damped inverse, diagonal, trace, log-determinant and the whole spectrum."""
    dense = K.kfac_dense(want)
    torch.testing.assert_close(K.kfac_dense(got), dense, **SAME)
    v = random_vector(want, 1, k=2)
    testing.assert_tree_close(K.kfac_vp(got, v), K.kfac_vp(want, v), **SAME)
    for damping_kind in ("tikhonov", "pi"):
        expected = K.kfac_solve(want, v, LAMBDA, damping_kind)
        for f in (got, K.kfac_eig(got)):
            testing.assert_tree_close(K.kfac_solve(f, v, LAMBDA, damping_kind), expected, **SAME)
    expected = K.kfac_vp(K.kfac_inverse(want, LAMBDA), v)
    for f in (got, K.kfac_eig(got)):
        testing.assert_tree_close(K.kfac_vp(K.kfac_inverse(f, LAMBDA), v), expected, **SAME)
    testing.assert_tree_close(K.kfac_diag(got), K.kfac_diag(want), **SAME)
    torch.testing.assert_close(K.kfac_trace(got), K.kfac_trace(want), **SAME)
    torch.testing.assert_close(K.kfac_logdet(got, LAMBDA), K.kfac_logdet(want, LAMBDA), **SAME)
    spectrum = torch.linalg.eigvalsh(dense).flip(0)
    scale = float(spectrum.abs().max())
    torch.testing.assert_close(K.kfac_eigenvalues(K.kfac_eig(got)), spectrum, rtol=1e-9, atol=1e-12 * scale)
    top = min(3, spectrum.numel())
    torch.testing.assert_close(K.kfac_eigenvalues(got, top), spectrum[:top], rtol=1e-9, atol=1e-12 * scale)


OPS = [(name, kind, mode) for name in ("wide-cnn", "wide-mlp", "wide-twice", "module-twice")
       for kind in ("empirical", "mc", "exact") for mode in ("expand", "reduce")]
OPS += [(name, kind, mode) for name in ("gpt2-right-pad", "tagger-ignore") for kind in ("empirical", "mc")
        for mode in ("expand", "reduce")]


@pytest.mark.parametrize(("name", "kind", "mode"), OPS)
def test_every_operation_equals_the_dense_one(name, kind, mode):
    dense, low = factors(name, kind, mode, "dense"), factors(name, kind, mode, "lowrank")
    assert not low_rank_layers(dense) and low_rank_layers(low), "both forms are exercised"
    for key, layer in low.layers.items():  # the factors themselves: A = Uᵀ diag(w) U, G unchanged
        torch.testing.assert_close(_factor.dense(layer.A), _factor.dense(dense.layers[key].A), **EXACT)
        torch.testing.assert_close(layer.G, dense.layers[key].G, **EXACT)
        assert int(layer.a_count) == int(dense.layers[key].a_count)
    assert_ops_equal(low, dense)


@pytest.mark.parametrize("name", ["wide-cnn", "wide-mlp"])
def test_auto_keeps_the_rows_of_wide_layers_only(name):
    """``"auto"``: the rows where they are at most half the inputs (256 or more); the rest dense."""
    fac = factors(name, "empirical", "expand", "auto")
    head = "3.weight" if name == "wide-cnn" else "0.weight"
    assert low_rank_layers(fac) == [head]
    assert fac.layers[head].A.U.shape == ((5 if name == "wide-cnn" else 6), (325 if name == "wide-cnn" else 301))
    assert_ops_equal(fac, factors(name, "empirical", "expand", "dense"))


def test_the_rule():
    assert _factor.chooses_low_rank("auto", 128, 256) and not _factor.chooses_low_rank("auto", 129, 256)
    assert not _factor.chooses_low_rank("auto", 2, 255)  # small layers stay dense
    assert _factor.chooses_low_rank("lowrank", 1000, 10) and not _factor.chooses_low_rank("dense", 1, 10_000)
    s = setting("wide-mlp")
    with pytest.raises(ffx.FisherError, match=r"kfac: a_form must be one of \['auto', 'dense', 'lowrank'\]"):
        K.kfac(s.problem, s.params, s.batch, a_form="sparse")


def test_the_lowrank_factor_is_the_rows_scaled():
    """``A = (1/M) Uᵀ U`` with ``U`` the counted rows ``[x, 1]`` (no copy of the model's inputs kept)."""
    s = setting("wide-mlp")
    a = factors("wide-mlp", "empirical", "expand", "lowrank").layers["0.weight"].A
    x = s.batch[0]
    torch.testing.assert_close(a.U, torch.cat([x, torch.ones(6, 1, dtype=F64)], 1), rtol=0, atol=0)
    torch.testing.assert_close(a.weights, torch.full((6,), 1 / 6, dtype=F64), rtol=0, atol=0)
    assert a.shift == 0.0
    no_bias = seeded(lambda: nn.Linear(300, 2, bias=False))
    fac = K.kfac(ffx.supervised(no_bias, ffx.Categorical()), ffx.params_of(no_bias), s.batch[:1] + (s.batch[1] % 2,),
                 dtype=F64)
    assert fac.layers["weight"].A.U.data_ptr() != x.data_ptr()


# --- eigenbases and EKFAC -------------------------------------------------------------------------------

def test_thin_eigenbasis():
    """A low-rank ``A`` gets ``Q`` ``[i, k]`` with orthonormal columns and eigenvalue 0 on the complement."""
    e = K.kfac_eig(factors("wide-mlp", "exact", "expand", "lowrank")).eig["0.weight"]
    assert e.a_vectors.shape == (301, 6) and float(e.a_rest) == 0.0
    torch.testing.assert_close(e.a_vectors.T @ e.a_vectors, torch.eye(6, dtype=F64), rtol=0, atol=1e-13)
    dense = K.kfac_eig(factors("wide-mlp", "exact", "expand", "dense")).eig["0.weight"]
    torch.testing.assert_close(e.a_values, dense.a_values[-6:], rtol=1e-9, atol=1e-14)
    # the null space the thin basis leaves implicit
    assert float(dense.a_values[:-6].abs().max()) < 1e-14 * float(dense.a_values.max())


def test_more_rows_than_inputs_give_a_complete_basis():
    e = K.kfac_eig(factors("wide-cnn", "empirical", "expand", "lowrank")).eig["0.weight"]  # 405 rows, 10 inputs
    assert e.a_vectors.shape == (10, 10) and e.a_rest is None


# gradients in the span of A's rows: expand, every position with a gradient counted, factors of this batch
IN_SPAN = [(name, kind) for name in ("wide-cnn", "wide-mlp", "wide-twice") for kind in ("empirical", "exact")]


@pytest.mark.parametrize(("name", "kind"), IN_SPAN)
def test_ekfac_equals_the_dense_basis_where_gradients_lie_in_the_rows(name, kind):
    """Each per-unit gradient ``Σ_p g x̃ᵀ`` lies in the span of the rows ``x̃`` that ``A`` averages: its share in
    ``A``'s null space is zero (checked), so the thin basis' EKFAC is the dense basis' exactly."""
    s = setting(name)
    options = dict(kind=kind, mode="expand", normalize="samples", dtype=F64)
    low = K.ekfac(s.problem, s.params, s.batch, a_form="lowrank", **options)
    dense = K.ekfac(s.problem, s.params, s.batch, a_form="dense", **options)
    thin = [key for key, e in low.eig.items() if e.scale_rest is not None]
    assert thin, "a thin basis is exercised"
    for key in thin:
        e = low.eig[key]
        assert float(e.scale_rest.abs().max()) <= 1e-12 * float(e.scale.abs().max()), key
    torch.testing.assert_close(K.kfac_dense(low), K.kfac_dense(dense), **SAME)
    testing.assert_tree_close(K.kfac_diag(low), K.kfac_diag(dense), **SAME)
    v = random_vector(dense, 5)
    testing.assert_tree_close(K.kfac_solve(low, v, LAMBDA), K.kfac_solve(dense, v, LAMBDA), **SAME)
    torch.testing.assert_close(K.kfac_logdet(low, LAMBDA), K.kfac_logdet(dense, LAMBDA), **SAME)


def _completed(q: Tensor) -> Tensor:
    """``[Q, Q⊥]``: an orthonormal basis of the whole space whose first columns are ``Q``'s."""
    n, k = q.shape
    full, _ = torch.linalg.qr(torch.cat([q, torch.randn(n, n, generator=gen(0), dtype=q.dtype)], 1))
    return torch.cat([q, full[:, k:]], 1)


@pytest.mark.parametrize(("name", "mode"), [("wide-cnn", "reduce"), ("wide-mlp", "expand"),
                                            ("gpt2-right-pad", "expand"), ("gpt2-right-pad", "reduce")])
def test_ekfac_thin_basis_is_the_diagonal_in_that_basis(name, mode):
    """The definition, where gradients may also leave the rows' span (reduce over positions, ``-100`` positions
    that feed later ones): ``s`` is the empirical Fisher's diagonal on ``Q_G ⊗ Q_A``, and ``scale_rest`` its mean
    over ``Q_G ⊗`` any orthonormal basis of the complement; the trace equals the dense basis' EKFAC's."""
    b = build(BY_NAME[name]) if name in BY_NAME else None
    s = setting(name)
    nlls = b.nlls if b is not None else testing.supervised_nlls(s.problem.model, ffx.Categorical(), *s.batch)
    options = dict(kind="empirical", mode=mode, normalize="samples", dtype=F64)
    low = K.ekfac(s.problem, s.params, s.batch, a_form="lowrank", **options)
    ef = testing.empirical_fisher(testing.loop_grads(nlls, s.params), s.params, count=len(nlls))
    like = {n: torch.empty(shape) for n, shape in low.shapes.items()}
    index = vectors.unflatten(torch.arange(ef.shape[0], dtype=F64), like)
    thin = 0
    for key, layer in low.layers.items():
        e = low.eig[key]
        if e.scale_rest is None:
            continue
        thin += 1
        order = K._canon(layer, K._join(layer, index, low.shapes)).long()  # [o, i] flat indices, G on the rows
        sub = ef[order.reshape(-1)][:, order.reshape(-1)]
        q = torch.kron(e.g_vectors.contiguous(), _completed(e.a_vectors))
        diagonal = (q.T @ sub @ q).diagonal().reshape(order.shape)
        k = e.a_values.shape[0]
        torch.testing.assert_close(K._canon(layer, e.scale), diagonal[:, :k], **EXACT)
        torch.testing.assert_close(e.scale_rest, diagonal[:, k:].mean(1), rtol=1e-9, atol=1e-14)
    assert thin
    dense = K.ekfac(s.problem, s.params, s.batch, a_form="dense", **options)
    torch.testing.assert_close(K.kfac_trace(low), K.kfac_trace(dense), **SAME)


# --- shapes: rows fewer and more than inputs ------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), t=st.integers(1, 3), i=st.integers(1, 9), o=st.integers(1, 3), bias=st.booleans(),
       mode=st.sampled_from(["expand", "reduce"]), seed=st.integers(0, 2**31 - 1))
def test_shapes(n, t, i, o, bias, mode, seed):
    """One Linear shared over ``t`` positions, Gaussian likelihood: both forms agree whatever the rows (``n t`` or
    ``n``) against the inputs (``i`` or ``i + 1``)."""
    model = seeded(lambda: nn.Linear(i, o, bias=bias), seed % 1000)
    x = torch.randn(n, t, i, generator=gen(seed), dtype=F64)
    y = torch.randn(n, t, o, generator=gen(seed + 1), dtype=F64)
    problem, params = ffx.supervised(model, ffx.Gaussian(sigma=0.8)), ffx.params_of(model)
    options = dict(kind="exact", mode=mode, dtype=F64)
    low = K.kfac(problem, params, (x, y), a_form="lowrank", **options)
    dense = K.kfac(problem, params, (x, y), a_form="dense", **options)
    assert isinstance(low.layers["weight"].A, LowRank)
    assert_ops_equal(low, dense)
    e = K.ekfac(problem, params, (x, y), kind="empirical", mode=mode, dtype=F64, a_form="lowrank")
    torch.testing.assert_close(K.kfac_trace(e), K.kfac_trace(K.ekfac(problem, params, (x, y), kind="empirical",
                                                                      mode=mode, dtype=F64)), **SAME)


# --- combine and EMA: rows concatenate until they stop paying ---------------------------------------------

def narrow() -> Setting:
    """A layer of 20 inputs (+ bias: i = 21) and batches of 4 samples: 2 batches' rows pay (8 ≤ 10.5), 3 do not."""
    model = seeded(lambda: nn.Sequential(nn.Linear(20, 3), nn.Tanh(), nn.Linear(3, 2)))
    x = torch.randn(16, 20, generator=gen(8), dtype=F64)
    y = torch.randint(0, 2, (16,), generator=gen(9))
    return Setting(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y))


def quarters(s: Setting, a_form: str) -> list[K.KFAC]:
    x, y = s.batch
    return [K.kfac(s.problem, s.params, (x[j:j + 4], y[j:j + 4]), dtype=F64, a_form=a_form) for j in range(0, 16, 4)]


def test_combine_concatenates_rows_then_densifies():
    s = narrow()
    low, dense = quarters(s, "lowrank"), quarters(s, "dense")
    for parts, form in ((1, LowRank), (2, LowRank), (3, Tensor)):
        got = K.kfac_combine(low[:parts])
        assert isinstance(got.layers["0.weight"].A, form), parts
        if form is LowRank:
            assert got.layers["0.weight"].A.U.shape == (4 * parts, 21)
        want = K.kfac_combine(dense[:parts])
        torch.testing.assert_close(_factor.dense(got.layers["0.weight"].A), want.layers["0.weight"].A, **EXACT)
        assert_ops_equal(got, want)
    mixed = K.kfac_combine([low[0], dense[1]])  # a dense part makes the sum dense
    assert isinstance(mixed.layers["0.weight"].A, Tensor)
    torch.testing.assert_close(K.kfac_dense(mixed), K.kfac_dense(K.kfac_combine(dense[:2])), **SAME)
    whole = K.kfac(s.problem, s.params, s.batch, dtype=F64, a_form="dense")
    torch.testing.assert_close(K.kfac_dense(K.kfac_combine(low)), K.kfac_dense(whole), **SAME)


def test_ema_concatenates_rows_then_densifies():
    s = narrow()
    low, dense = quarters(s, "lowrank"), quarters(s, "dense")
    state_low, state_dense = K.kfac_ema_init(low[0], 0.7), K.kfac_ema_init(dense[0], 0.7)
    assert state_low.A.mean["0.weight"].U.shape == (0, 21)  # m_0 = 0: no rows
    for step, (fl, fd) in enumerate(zip(low + low[:1], dense + dense[:1], strict=True), start=1):
        before = state_low
        state_low, state_dense = K.kfac_ema_update(state_low, fl), K.kfac_ema_update(state_dense, fd)
        a = state_low.A.mean["0.weight"]
        assert isinstance(a, LowRank if step <= 2 else Tensor), step  # 4, 8 rows; then 12 > 10.5: dense
        for bias_corrected in (True, False):
            got, want = K.kfac_ema_value(state_low, bias_corrected), K.kfac_ema_value(state_dense, bias_corrected)
            for key, layer in want.layers.items():
                torch.testing.assert_close(_factor.dense(got.layers[key].A), layer.A, **EXACT)
            assert_ops_equal(got, want)
        if isinstance(before.A.mean["0.weight"], LowRank):  # the update left the old state as it was
            assert before.A.mean["0.weight"].U.shape[0] == 4 * (step - 1)


def test_the_optimiser_with_lowrank_factors_steps_as_with_dense_ones():
    """``kfac_optimizer`` on an MLP whose first layer keeps its rows (40 of 301): its EMA stays low-rank for three
    updates (120 rows), so do its damped inverses, and each step equals the dense computation's."""
    model = seeded(lambda: nn.Sequential(nn.Linear(300, 4), nn.Tanh(), nn.Linear(4, 3)))
    problem = ffx.supervised(model, ffx.Categorical())
    x, y = torch.randn(40, 300, generator=gen(10), dtype=F64), torch.randint(0, 3, (40,), generator=gen(11))
    loss = grad(lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y))
    opt = kfac_optimizer(problem, lr=0.1, damping=0.05, inverse_every=2, kl_clip=None, dtype=F64)
    params = ffx.params_of(model)
    state, ema, inverse = opt.init(params), None, None
    for step in range(4):
        g = loss(params)
        updates, state = opt.update(g, state, params, (x, y))
        fac = K.kfac(problem, params, (x, y), kind="mc", generator=gen(step), dtype=F64, a_form="dense")
        ema = K.kfac_ema_update(K.kfac_ema_init(fac, 0.95) if ema is None else ema, fac)
        if step % 2 == 0:
            inverse = K.kfac_inverse(K.kfac_ema_value(ema), 0.05)
        testing.assert_tree_close(updates, {k: -0.1 * v for k, v in K.kfac_vp(inverse, g).items()}, **SAME)
        params = apply_updates(params, updates)
        assert isinstance(state.factors.A.mean["0.weight"], LowRank if step < 3 else Tensor), step
        assert isinstance(state.inverse.layers["0.weight"].A, LowRank), step  # from the low-rank averages


# --- files ---------------------------------------------------------------------------------------------

def header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["fisherfx"])


def assert_same_factor(got, want) -> None:
    assert type(got) is type(want)
    if isinstance(want, LowRank):
        assert torch.equal(got.U, want.U) and torch.equal(got.weights, want.weights) and got.shift == want.shift
    else:
        assert torch.equal(got, want)


def assert_same(got: K.KFAC, want: K.KFAC) -> None:
    for key, layer in want.layers.items():
        assert_same_factor(got.layers[key].A, layer.A)
        assert torch.equal(got.layers[key].G, layer.G) and got.layers[key].names == layer.names
    assert (got.eig is None) == (want.eig is None)
    for key, e in (want.eig or {}).items():
        for field, t in e._asdict().items():
            have = getattr(got.eig[key], field)
            assert (have is None) == (t is None) and (t is None or torch.equal(have, t)), (key, field)
    assert (got.shapes, got.mode, got.kind, got.provenance) == (want.shapes, want.mode, want.kind, want.provenance)


def test_save_and_load_lowrank_factors(tmp_path):
    s = setting("wide-mlp")
    fac = factors("wide-mlp", "empirical", "expand", "auto")
    inverse = K.kfac_inverse(fac, LAMBDA)
    assert isinstance(inverse.layers["0.weight"].A, LowRank) and inverse.layers["0.weight"].A.shift > 0
    e = K.ekfac(s.problem, s.params, s.batch, dtype=F64)
    state = K.kfac_ema_update(K.kfac_ema_init(fac, 0.9), fac)
    for obj in (fac, K.kfac_eig(fac), inverse, e):
        ffx.save(tmp_path / "f.safetensors", obj)
        assert header(tmp_path / "f.safetensors")["format_version"] == 2
        assert_same(ffx.load(tmp_path / "f.safetensors", params=s.params), obj)
    ffx.save(tmp_path / "f.safetensors", {"ema": state, "dense": factors("wide-mlp", "empirical", "expand", "dense")})
    got = ffx.load(tmp_path / "f.safetensors")
    assert_same_factor(got["ema"].A.mean["0.weight"], state.A.mean["0.weight"])
    assert_same(K.kfac_ema_value(got["ema"]), K.kfac_ema_value(state))
    assert_same(got["dense"], factors("wide-mlp", "empirical", "expand", "dense"))
    ffx.save(tmp_path / "d.safetensors", factors("wide-mlp", "empirical", "expand", "dense"))
    assert header(tmp_path / "d.safetensors")["format_version"] == 1  # readable by fisherfx before low-rank factors
    with pytest.raises(ffx.FisherError, match="layer '0.weight': the file's factors are A 301, G 5"):
        ffx.load(tmp_path / "f.safetensors", params={**s.params, "0.weight": torch.zeros(5, 299, dtype=F64)})


def test_show_prints_lowrank_factors(tmp_path, capsys):
    from fisherfx._cli_fisher import show

    fac = factors("wide-mlp", "empirical", "expand", "auto")
    ffx.save(tmp_path / "k.safetensors", {"f": fac, "ema": K.kfac_ema_update(K.kfac_ema_init(fac, 0.9), fac)})
    show(str(tmp_path / "k.safetensors"), top=1)
    out = capsys.readouterr().out
    assert "layer 0.weight (0.weight, 0.bias): A low-rank (6 rows) 301, G 5, a_count 6" in out
    assert f"[f] trace: {float(K.kfac_trace(fac)):.6g}" in out


def v1_setting() -> Setting:
    """The model and batch of ``tests/data/kfac-v1.safetensors``, written by fisherfx at 2c8bfe7 (before low-rank
    factors) as ``{"kfac": kfac_eig(kfac(...)), "ekfac": ekfac(...), "ema": EMA (decay 0.9) of the factors of the
    first 3 samples, then of all 7}``, float64, empirical, expand, ``normalize="samples"``."""
    g = gen(11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64).eval()
    x = torch.randn(7, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (7,), generator=g)
    return Setting(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y))


@pytest.mark.parametrize("a_form", ["dense", "lowrank"])
def test_a_file_written_before_lowrank_factors_loads(a_form):
    s = v1_setting()
    path = DATA / "kfac-v1.safetensors"
    assert header(path)["format_version"] == 1
    got = ffx.load(path, params=s.params)
    fac = K.kfac(s.problem, s.params, s.batch, dtype=F64, a_form=a_form)
    half = K.kfac(s.problem, s.params, (s.batch[0][:3], s.batch[1][:3]), dtype=F64, a_form=a_form)
    for key, layer in fac.layers.items():
        torch.testing.assert_close(got["kfac"].layers[key].A, _factor.dense(layer.A), **EXACT)
    assert_ops_equal(got["kfac"], fac)
    ekfac = K.ekfac(s.problem, s.params, s.batch, dtype=F64)
    torch.testing.assert_close(K.kfac_dense(got["ekfac"]), K.kfac_dense(ekfac), **SAME)
    state = K.kfac_ema_update(K.kfac_ema_update(K.kfac_ema_init(fac, 0.9), half), fac)
    assert_ops_equal(K.kfac_ema_value(got["ema"]), K.kfac_ema_value(state))
    assert int(got["ema"].A.step) == 2
    # the old state goes on averaging with factors in either form
    more = K.kfac_ema_value(K.kfac_ema_update(got["ema"], fac))
    assert_ops_equal(more, K.kfac_ema_value(K.kfac_ema_update(state, fac)))


# --- against curvlinops --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "mode"), [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce"),
                                            ("sequence", "expand")])
def test_lowrank_equals_curvlinops(name, mode):
    from tests.test_kfac import curvlinops_dense, peer_workload

    model, _, x, y, normalize = peer_workload(name)
    fac = K.kfac(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y), kind="exact", mode=mode,
                 normalize=normalize, dtype=F64, a_form="lowrank")
    torch.testing.assert_close(K.kfac_dense(fac), curvlinops_dense(name, "type-2", mode), **EXACT)


def test_a_cnn_head_keeps_only_its_rows_in_float32():
    """A CNN as the benchmark's, smaller (a 1,569-input head, float32, the default dtype): the head's ``A`` is its
    64 rows, and the π-damped solve through them agrees with the dense matrix's inverse (a Cholesky factorisation).
    """
    model = seeded(lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10)))
    model = model.float()
    x, y = torch.randn(64, 3, 16, 16, generator=gen(12)), torch.randint(0, 10, (64,), generator=gen(13))
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    fac = K.kfac(problem, params, (x, y), kind="mc", generator=gen(14))
    a = fac.layers["3.weight"].A
    assert isinstance(a, LowRank) and a.U.shape == (64, 1569) and a.U.dtype == torch.float32
    dense = fac._replace(layers={**fac.layers, "3.weight": fac.layers["3.weight"]._replace(A=_factor.dense(a))})
    v = {k: t.float() for k, t in random_vector(fac, 15).items()}
    got, want = K.kfac_solve(fac, v, 1e-2, "pi"), K.kfac_vp(K.kfac_inverse(dense, 1e-2), v)
    scale = max(float(t.abs().max()) for t in want.values())
    testing.assert_tree_close(got, want, rtol=1e-3, atol=1e-4 * scale)
    assert math.isfinite(float(K.kfac_logdet(fac, 1e-2)))
