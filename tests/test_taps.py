"""The tap engine equals the generic engine, serves what it should, and falls back where it must.

Every comparison is in float64 between ``engine="auto"`` (taps where they serve) and
``engine="generic"`` on the same batch, generator and options; each also checks *which*
parameters the taps served, so that a test cannot pass because everything fell back.
"""

import pickle
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

import fisherfx as ffx
from fisherfx.engines import _tap_common as taps_common
from fisherfx.engines import _tap_estimators as taps_estimators
from fisherfx.engines import _tap_plain as taps_plain
from fisherfx.engines import taps
from fisherfx.fisher import prepare_batch
from fisherfx.testing import assert_tree_close as assert_values_close

F64 = torch.float64
# the same sums of products in a different order (batched einsum vs per-sample vmap), float64
TAPS_VS_GENERIC = {"rtol": 1e-9, "atol": 1e-12}
IGNORE = -100


seeds = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=generator(seed), dtype=F64)


def randint(seed: int, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=generator(seed))


# --- models -------------------------------------------------------------------------------------

def _build(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    model = model.to(F64).eval()
    with torch.no_grad():  # biases at 0 and norm weights at 1 would hide mistakes
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator(seed + 1), dtype=F64))
    return model


class Tagger(nn.Module):
    """Tokens → classes per position; the running sum mixes positions (like attention)."""

    def __init__(self, vocab: int = 9, d: int = 4, c: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.norm(self.emb(ids)))).cumsum(1))


class PositionWise(nn.Module):
    """Tokens → classes, each position on its own; ``mid`` is called twice."""

    def __init__(self, vocab: int = 9, d: int = 4, c: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norm = nn.RMSNorm(d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, c)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.mid(torch.tanh(self.mid(self.norm(self.emb(ids))))))


class Tied(nn.Module):
    """Embedding and output layer share one weight (as GPT-2's ``wte``/``lm_head``)."""

    def __init__(self, vocab: int = 7, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))).cumsum(1))


class HFConv(nn.Module):
    """HuggingFace ``Conv1D`` layers (weights ``[in, out]``) and a LayerNorm, position-wise."""

    def __init__(self, d: int = 4, c: int = 3):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = Conv1D(5, d)
        self.norm = nn.LayerNorm(5)
        self.proj = Conv1D(c, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(torch.relu(self.fc(x))))


class Custom(nn.Module):
    """A free parameter in arbitrary operations, and a Linear weight also used outside its layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.out = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x)) * self.scale + 0.1 * nn.functional.linear(x, self.lin.weight)
        return self.out(h)


def _cnn2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(3, 4, 2, dilation=2, padding=1, padding_mode="reflect"), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def _cnn1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 4, padding="same"), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2, bias=False),
                         nn.Flatten(), nn.Linear(2 * 3, 3))


def _mlp(c: int) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, c))


def _tokens(n: int, t: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    ids = randint(seed, vocab, n, t)
    labels = randint(seed + 1, 3, n, t)
    if t > 1:
        labels[0, -1] = IGNORE  # padding at the end of row 0
    if n > 1:
        labels[-1, 0] = IGNORE
    return ids, labels


# --- cases ----------------------------------------------------------------------------------------

VOCAB = 11


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2, n_inner=12,
                                      bos_token_id=0, eos_token_id=0, initializer_range=0.3,
                                      attn_implementation="eager"))


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=0, initializer_range=0.3,
                                        attn_implementation="eager"))


def _lm_batch(left: bool) -> dict[str, Tensor]:
    ids = randint(3, VOCAB, 3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3])
    if left:
        mask = mask.flip(1)
    labels = ids.clone()
    labels[0, 3] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Case(NamedTuple):
    name: str
    make: Callable[[], tuple[Any, Any]]  # () -> (problem, batch)
    token_local: Callable[[str], bool] | None = None  # served per token; None: every served parameter
    outside: tuple[str, ...] = ()  # never served by the taps


def _supervised(factory, likelihood, inputs, targets):
    def make():
        return ffx.supervised(_build(factory), likelihood), (inputs, targets)

    return make


def _lm(factory, left):
    def make():
        return ffx.causal_lm(_build(factory)), _lm_batch(left)

    return make


def _last_block(prefix: str) -> Callable[[str], bool]:
    """GPT-2/LLaMA per token: what follows the last attention's keys and values is position-wise."""
    early = ("attn.c_attn", "k_proj", "v_proj", "input_layernorm", "ln_1")
    final = {"transformer.ln_f.weight", "transformer.ln_f.bias", "model.norm.weight", "lm_head.weight"}
    return lambda name: name in final or (name.startswith(prefix) and not any(e in name for e in early))


CASES = [
    Case("mlp-categorical", _supervised(lambda: _mlp(3), ffx.Categorical(), randn(1, 5, 5), randint(2, 3, 5))),
    Case("mlp-gaussian", _supervised(lambda: _mlp(2), ffx.Gaussian(sigma=0.7), randn(1, 4, 5), randn(2, 4, 2))),
    Case("mlp-bernoulli", _supervised(lambda: _mlp(3), ffx.Bernoulli(), randn(1, 4, 5),
                                      randint(2, 2, 4, 3).to(F64))),
    Case("cnn-conv2d", _supervised(_cnn2d, ffx.Categorical(), randn(1, 3, 2, 6, 6), randint(2, 3, 3))),
    Case("cnn-conv1d", _supervised(_cnn1d, ffx.Categorical(), randn(1, 4, 2, 7), randint(2, 3, 4))),
    Case("tagger", _supervised(Tagger, ffx.Categorical(), *_tokens(3, 4, 9, 5)),
         token_local=lambda name: name.startswith("head")),
    Case("position-wise", _supervised(PositionWise, ffx.Categorical(), *_tokens(3, 4, 9, 6))),
    Case("tied", _supervised(Tied, ffx.Categorical(), randint(7, 7, 3, 4), randint(8, 7, 3, 4)),
         token_local=lambda name: False),
    Case("hf-conv1d", _supervised(HFConv, ffx.Gaussian(), randn(1, 3, 5, 4), randn(2, 3, 5, 3))),
    Case("custom", _supervised(Custom, ffx.Categorical(), randn(1, 4, 4), randint(2, 3, 4)),
         outside=("lin.weight", "scale")),
    Case("gpt2-left-pad", _lm(_tiny_gpt2, left=True), token_local=_last_block("transformer.h.1.")),
    Case("llama-right-pad", _lm(_tiny_llama, left=False), token_local=_last_block("model.layers.1.")),
    Case("gpt2-right-pad", _lm(_tiny_gpt2, left=False), token_local=_last_block("transformer.h.1.")),
    Case("llama-left-pad", _lm(_tiny_llama, left=True), token_local=_last_block("model.layers.1.")),
]


def served(problem, params, batch, kind: str, per: str, requests=None) -> set[str]:
    """The parameters the tap engine serves for these options."""
    b = prepare_batch("test", problem, params, batch, kind, 2, generator(0), "samples")
    requests = requests or {k: taps.Request() for k in params}
    result = taps.estimate(problem, params, b.prepared, requests, kind=kind, per=per, noise=b.noise, dtype=F64)
    return set(result.sums)


def expected_served(case: Case, params, kind: str, per: str, t: int) -> set[str]:
    names = {k for k in params if k not in case.outside}
    if t > 1 and (per == "token" or kind == "exact") and case.token_local is not None:
        names = {k for k in names if case.token_local(k)}
    return names


def _t(problem, batch) -> int:
    return problem.prepare(batch).active.shape[1]


# --- every case × kind × per: the diagonal --------------------------------------------------------

@pytest.mark.parametrize("per", ["sample", "token"])
@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_diagonal_equals_generic(case, kind, per):
    problem, batch = case.make()
    params = ffx.params_of(problem.model)
    options = {"kind": kind, "per": per, "n_samples": 2, "dtype": F64}
    got = ffx.diag_fisher(problem, params, batch, generator=generator(0), engine="auto", **options)
    want = ffx.diag_fisher(problem, params, batch, generator=generator(0), engine="generic", **options)
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
    assert served(problem, params, batch, kind, per) == expected_served(case, params, kind, per, _t(problem, batch))


# --- groups and mask importance -----------------------------------------------------------------

def _group_specs(problem, params, which: str) -> dict:
    model = problem.model
    if which == "channels":
        return ffx.channels(params, model)
    if which == "inputs":
        return ffx.inputs(params, model)
    if which == "heads":
        return ffx.heads(params, num_heads=2, num_kv_heads=1 if "model.norm.weight" in params else None, model=model)
    return ffx.whole(params)


GROUP_CASES = [(c, w) for c in CASES for w in ("channels", "inputs", "whole")] + \
    [(c, "heads") for c in CASES if c.name.startswith(("gpt2", "llama"))]


@pytest.mark.parametrize("estimator", ["group", "mask"])
@pytest.mark.parametrize(("case", "which"), GROUP_CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_groups_and_mask_importance_equal_generic(case, which, estimator):
    problem, batch = case.make()
    params = ffx.params_of(problem.model)
    groups = _group_specs(problem, params, which)
    fn = ffx.group_fisher if estimator == "group" else ffx.mask_importance
    got = fn(problem, params, batch, groups, kind="mc", generator=generator(1), dtype=F64, engine="auto")
    want = fn(problem, params, batch, groups, kind="mc", generator=generator(1), dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
    requests = {k: taps.Request(g.pattern, g.sizes, estimator == "mask") for k, g in groups.items()}
    sub = {k: params[k] for k in groups}
    assert served(problem, sub, batch, "mc", "sample", requests) == expected_served(case, sub, "mc", "sample", 1)


@pytest.mark.parametrize("estimator", ["group", "mask"])
@pytest.mark.parametrize("pattern", ["o i -> o", "o i -> i", "(h d) i -> h", "o (h d) -> h", "(a o) (b i) -> a b",
                                     "o i -> ", "(o two) i -> two"])
def test_any_group_pattern_per_token(pattern, estimator):
    """Row, column and mixed groups (the last two need the full diagonal) on a position-wise model."""
    problem, batch = CASES[6].make()  # position-wise: per token served by the taps
    params = {"mid.weight": ffx.params_of(problem.model)["mid.weight"]}
    axes = set(pattern.replace("(", " ").replace(")", " ").split())
    groups = {"mid.weight": ffx.Group(pattern, {a: 2 for a in ("h", "a", "b", "two") if a in axes})}
    fn = ffx.group_fisher if estimator == "group" else ffx.mask_importance
    options = {"per": "token", "dtype": F64, "normalize": "tokens"}
    got = fn(problem, params, batch, groups, engine="taps", **options)
    want = fn(problem, params, batch, groups, engine="generic", **options)
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


@pytest.mark.parametrize("estimator", ["group", "mask"])
@pytest.mark.parametrize("pattern", ["o i -> o", "o i -> i"])
@pytest.mark.parametrize(("d", "t"), [(8, 2), (2, 6)], ids=["gram", "explicit"])
def test_gram_and_explicit_group_paths(d, t, pattern, estimator):
    """Per-sample group sums over ``T`` positions: Gram matrices when ``T (o + i) < o i``, else per-sample
    gradients."""
    problem = ffx.supervised(_build(lambda: TokenMLP(d, d + 1, 3)), ffx.Categorical())
    params = ffx.params_of(problem.model)
    groups = {k: pattern for k, p in params.items() if p.ndim == 2}
    batch = (randn(4, 3, t, d), randint(5, 3, 3, t))
    fn = ffx.group_fisher if estimator == "group" else ffx.mask_importance
    got = fn(problem, params, batch, groups, dtype=F64, engine="taps")
    want = fn(problem, params, batch, groups, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


# --- Hypothesis: shapes, padding, options -----------------------------------------------------------

OPTIONS = st.fixed_dictionaries({"kind": st.sampled_from(["empirical", "mc", "exact"]),
                                 "per": st.sampled_from(["sample", "token"]),
                                 "normalize": st.sampled_from(["samples", "tokens", "none"]),
                                 "n_samples": st.integers(1, 2)})
ESTIMATORS = st.sampled_from(["diag", "rows", "cols", "mask-rows", "mask-cols"])


def _estimate(estimator: str, problem, params, batch, engine: str, seed: int, **options):
    if estimator == "diag":
        return ffx.diag_fisher(problem, params, batch, engine=engine, generator=generator(seed), **options)
    patterns = {k: ("o ... -> o" if "rows" in estimator else "o i ... -> i") if p.ndim > 1 else "o -> o"
                for k, p in params.items()}
    fn = ffx.group_fisher if estimator in ("rows", "cols") else ffx.mask_importance
    return fn(problem, params, batch, patterns, engine=engine, generator=generator(seed), **options)


def _check(estimator, problem, params, batch, seed, options):
    got = _estimate(estimator, problem, params, batch, "taps", seed, dtype=F64, **options)
    want = _estimate(estimator, problem, params, batch, "generic", seed, dtype=F64, **options)
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


class TokenMLP(nn.Module):
    def __init__(self, d: int, hidden: int, c: int):
        super().__init__()
        self.inp, self.out = nn.Linear(d, hidden), nn.Linear(hidden, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)))


@settings(max_examples=30)
@given(n=st.integers(1, 4), t=st.integers(1, 5), d=st.integers(1, 6), hidden=st.integers(1, 9),
       seed=seeds, options=OPTIONS, estimator=ESTIMATORS, data=st.data())
def test_position_wise_linear_any_shape(n, t, d, hidden, seed, options, estimator, data):
    """Linear layers on ``[N, T, D]``: one position per unit, Gram and explicit paths by shape."""
    mask = data.draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t).filter(any))
    y = torch.where(torch.tensor(mask).reshape(n, t), randint(seed, 3, n, t), IGNORE)
    problem = ffx.supervised(_build(lambda: TokenMLP(d, hidden, 3), seed % 1000), ffx.Categorical())
    _check(estimator, problem, ffx.params_of(problem.model), (randn(seed, n, t, d), y), seed, options)


@settings(max_examples=30)
@given(n=st.integers(1, 3), t=st.integers(1, 5), seed=seeds, options=OPTIONS, estimator=ESTIMATORS,
       mixing=st.booleans())
def test_token_models_any_shape(n, t, seed, options, estimator, mixing):
    """Embedding, norms, a module called twice; with ``mixing`` per-token falls back for most layers."""
    ids, labels = _tokens(n, t, 9, seed)
    problem = ffx.supervised(_build(Tagger if mixing else PositionWise, seed % 1000), ffx.Categorical())
    params = ffx.params_of(problem.model)
    engine = "auto" if mixing else "taps"
    got = _estimate(estimator, problem, params, (ids, labels), engine, seed, dtype=F64, **options)
    want = _estimate(estimator, problem, params, (ids, labels), "generic", seed, dtype=F64, **options)
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


class SequenceFirst(nn.Module):
    """A Linear applied to ``[T, N, d]``: its output's first axis holds positions, not samples."""

    def __init__(self, vocab: int = 9, d: int = 4, c: int = 3):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, c)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # [N, T, d]
        h = torch.tanh(self.lin(h.transpose(0, 1))).transpose(0, 1).cumsum(1)  # positions mix
        return self.out(h)


@settings(max_examples=30)
@given(n=st.integers(1, 5), shift=st.sampled_from([0, 0, 1, -1]), seed=seeds, options=OPTIONS,
       estimator=ESTIMATORS, model=st.sampled_from([Tagger, SequenceFirst]))
def test_batch_size_equal_to_the_sequence_length(n, shift, seed, options, estimator, model):
    """``N = T`` (a batch is cut in two parts, or probed) and its neighbours, against the generic engine."""
    t = max(1, n + shift)
    ids, labels = _tokens(n, t, 9, seed)
    problem = ffx.supervised(_build(model, seed % 1000), ffx.Categorical())
    params = ffx.params_of(problem.model)
    got = _estimate(estimator, problem, params, (ids, labels), "auto", seed, dtype=F64, **options)
    want = _estimate(estimator, problem, params, (ids, labels), "generic", seed, dtype=F64, **options)
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


def test_batch_size_equal_to_the_sequence_length_needs_no_probe(monkeypatch):
    """``N = T``: the batch is cut where the shapes tell the sample axis; no probe backward runs, and
    a layer whose first axis holds positions still falls back."""
    calls = []
    monkeypatch.setattr(taps.checks, "probe", lambda *a, **k: calls.append(1) or {})
    ids, labels = _tokens(4, 4, 9, 0)
    for model, unserved in ((Tagger, set()), (SequenceFirst, {"lin.weight", "lin.bias"})):
        problem = ffx.supervised(_build(model, 0), ffx.Categorical())
        params = ffx.params_of(problem.model)
        assert set(params) - served(problem, params, (ids, labels), "empirical", "sample") == unserved
    assert calls == []
    assert taps.split_point(problem.prepare((ids, labels))) == 2
    assert taps.split_point(problem.prepare(_tokens(4, 5, 9, 0))) is None
    assert taps.padding(problem.prepare((ids, labels))) == 1
    assert taps.padding(problem.prepare(_tokens(4, 5, 9, 0))) == 0


def test_batch_size_equal_to_the_sequence_length_runs_one_pass(monkeypatch):
    """``N = T``: one forward over the batch and an inactive copy of its first sample (``N + 1`` samples);
    the copy adds nothing (empirical, MC with its draws, groups, K-FAC factors)."""
    forwards = []
    guarded = taps_common.guarded_forward
    monkeypatch.setattr(taps_common, "guarded_forward", lambda *a, **k: forwards.append(a[3]) or guarded(*a, **k))
    ids, labels = _tokens(4, 4, 9, 0)
    problem = ffx.supervised(_build(Tagger, 0), ffx.Categorical())
    params = ffx.params_of(problem.model)
    for options in ({"kind": "empirical"}, {"kind": "mc", "n_samples": 2}):
        forwards.clear()
        got = ffx.diag_fisher(problem, params, (ids, labels), generator=generator(0), dtype=F64, **options)
        assert [x.shape[0] for x in forwards] == [5]
        want = ffx.diag_fisher(problem, params, (ids, labels), generator=generator(0), dtype=F64, engine="generic",
                               **options)
        assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
        assert int(got.count) == 4
    fac = ffx.kfac(problem, params, (ids, labels), dtype=F64)
    whole = ffx.kfac(problem, params, (torch.cat([ids, ids[:1]]), torch.cat([labels, torch.full_like(labels[:1],
                                                                                                   IGNORE)])),
                     dtype=F64)
    torch.testing.assert_close(ffx.kfac_dense(fac), ffx.kfac_dense(whole) * 5 / 4, **TAPS_VS_GENERIC)


@st.composite
def conv_layers(draw) -> dict[str, Any]:
    """Keyword arguments of a Conv1d/Conv2d with 2 input and 3 output channels."""
    same = draw(st.booleans())
    return {"dims": draw(st.sampled_from([1, 2])), "kernel_size": draw(st.integers(1, 3)),
            "stride": 1 if same else draw(st.integers(1, 2)),
            "padding": "same" if same else draw(st.sampled_from([0, 1, 2, "valid"])),
            "dilation": draw(st.integers(1, 2)), "bias": draw(st.booleans()),
            "padding_mode": draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))}


class ConvNet(nn.Module):
    def __init__(self, dims: int, size: int, **conv: Any):
        super().__init__()
        self.conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(2, 3, **conv)
        with torch.no_grad():
            out = self.conv(torch.zeros(1, 2, *[size] * dims)).numel()
        self.head = nn.Linear(out, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@settings(max_examples=40)
@given(conv=conv_layers(), n=st.integers(1, 3), seed=seeds, estimator=ESTIMATORS,
       kind=st.sampled_from(["empirical", "mc", "exact"]))
def test_convolutions_any_stride_padding_dilation(conv, n, seed, estimator, kind):
    size, dims = 5, conv["dims"]
    problem = ffx.supervised(_build(lambda: ConvNet(size=size, **conv), seed % 1000), ffx.Categorical())
    params = ffx.params_of(problem.model)
    batch = (randn(seed, n, 2, *[size] * dims), randint(seed + 1, 3, n))
    _check(estimator, problem, params, batch, seed, {"kind": kind})


# --- coverage and fallbacks --------------------------------------------------------------------------

def test_engine_taps_names_what_it_cannot_serve():
    problem, batch = CASES[9].make()  # custom
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: engine='taps' cannot serve ") as err:
        ffx.diag_fisher(problem, ffx.params_of(problem.model), batch, engine="taps")
    assert "'scale': no supported layer holds it" in str(err.value)
    assert "'lin.weight': its gradient does not all come through tapped layers" in str(err.value)
    assert "'lin.bias'" not in str(err.value) and "engine='auto'" in str(err.value)


def test_engine_taps_refuses_per_token_through_attention():
    problem, batch = CASES[10].make()  # gpt2
    params = ffx.params_of(problem.model)
    with pytest.raises(ffx.FisherError, match=r"'transformer.wte.weight': its layer's output at one position feeds "
                                              r"the losses of several positions"):
        ffx.diag_fisher(problem, params, batch, per="token", engine="taps")
    local = {k: v for k, v in params.items() if k.startswith("transformer.h.1.mlp")}
    ffx.diag_fisher(problem, local, batch, per="token", engine="taps")  # position-wise: served


class ScaledLinear(nn.Linear):
    """A subclass whose forward the taps' formula does not describe."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class SeqFirst(nn.Module):
    """Runs its Linear on ``[T, N, D]``: the first axis is not the samples."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x.transpose(0, 1)).transpose(0, 1).cumsum(1)


class Broadcast(nn.Module):
    """A ``[1, T, D]`` embedding broadcast over the batch, added (served) or multiplied (not)."""

    def __init__(self, add: bool):
        super().__init__()
        self.add, self.tok, self.pos, self.head = add, nn.Embedding(5, 3), nn.Embedding(4, 3), nn.Linear(3, 2)

    def forward(self, ids: Tensor) -> Tensor:
        pos = self.pos(torch.arange(ids.shape[1])[None])
        h = self.tok(ids) + pos if self.add else self.tok(ids) * pos
        return self.head(torch.tanh(h).cumsum(1))


@pytest.mark.parametrize(("factory", "batch", "not_served"), [
    (lambda: nn.Sequential(ScaledLinear(4, 3), nn.Tanh(), nn.Linear(3, 2)), (randn(1, 3, 4), randint(2, 2, 3)),
     {"0.weight"}),
    (SeqFirst, (randn(1, 2, 3, 3), randint(2, 3, 2, 3)), {"lin.weight", "lin.bias"}),  # T != N
    (SeqFirst, (randn(1, 3, 3, 3), randint(2, 3, 3, 3)), {"lin.weight", "lin.bias"}),  # T == N: probed
    (lambda: Broadcast(add=True), (randint(1, 5, 3, 4), randint(2, 2, 3, 4)), set()),
    (lambda: Broadcast(add=False), (randint(1, 5, 3, 4), randint(2, 2, 3, 4)), {"pos.weight"}),
], ids=["subclass", "seq-first", "seq-first-t-eq-n", "broadcast-add", "broadcast-mul"])
def test_fallbacks_are_detected_and_exact(factory, batch, not_served):
    problem = ffx.supervised(_build(factory), ffx.Categorical())
    params = ffx.params_of(problem.model)
    got = ffx.diag_fisher(problem, params, batch, dtype=F64)
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
    assert served(problem, params, batch, "empirical", "sample") == set(params) - not_served


class ScaledConv1D(Conv1D):
    """A subclass of HF ``Conv1D`` whose forward the taps' formula does not describe."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), 2 * self.weight).reshape(*x.shape[:-1], -1)


def _conv1d_net(layer: type) -> nn.Module:
    return nn.Sequential(layer(4, 3), nn.Tanh(), Conv1D(2, 4))  # Conv1D(nf=out, nx=in): 3 -> 4 -> 2


@pytest.mark.parametrize(("layer", "not_served"), [(Conv1D, set()), (ScaledConv1D, {"0.weight"})],
                         ids=["conv1d", "conv1d-subclass"])
def test_hf_conv1d_is_checked_by_its_formula(layer, not_served):
    """An exact HF ``Conv1D`` is served after a one-sample formula check; a subclass that computes
    something else is caught (by the arithmetic check) and falls back, and the result stays exact."""
    problem = ffx.supervised(_build(lambda: _conv1d_net(layer)), ffx.Categorical())
    params = ffx.params_of(problem.model)
    batch = (randn(1, 5, 3), randint(2, 2, 5))
    got = ffx.diag_fisher(problem, params, batch, dtype=F64)
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
    assert served(problem, params, batch, "empirical", "sample") == set(params) - not_served


def test_other_forward_hooks_and_in_place_ops_do_not_disturb_the_taps():
    model = _build(lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)))
    handle = model[0].register_forward_hook(lambda m, a, out: out * 2)  # the model's own hook
    try:
        problem = ffx.supervised(model, ffx.Categorical())
        params, batch = ffx.params_of(model), (randn(1, 4, 4), randint(2, 3, 4))
        got = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="taps")
        want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    finally:
        handle.remove()
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


class Spare(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        self.spare = nn.Linear(2, 2)  # never called

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_parameters_at_other_values_and_unused_layers():
    """``params`` values are used (not the module's), and a layer the forward never calls gets zeros."""
    model = _build(Spare)
    problem = ffx.supervised(model, ffx.Categorical())
    params = {k: v + 0.3 for k, v in ffx.params_of(model).items()}
    batch = (randn(1, 5, 4), randint(2, 2, 5))
    got = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="taps")
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)
    assert got.value["spare.weight"].abs().sum() == 0
    partial = {k: params[k] for k in ("net.0.weight", "net.2.bias")}  # a subset: the rest at the module's values
    got = ffx.diag_fisher(problem, partial, batch, dtype=F64, engine="auto")
    want = ffx.diag_fisher(problem, partial, batch, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


def test_auto_merges_taps_and_generic_at_the_given_values():
    problem, batch = CASES[9].make()  # custom: lin.weight and scale through the generic engine
    params = {k: v * 1.5 for k, v in ffx.params_of(problem.model).items()}
    got = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="auto")
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


# --- the plain pass ------------------------------------------------------------------------------

@pytest.fixture
def plain_spy(monkeypatch):
    """Records, per call of the tap engine, whether its plain pass served it (``True``) or left it to
    the full pass (``False``)."""
    seen: list[bool] = []
    plain = taps_plain.plain

    def spy(*args, **kwargs):
        result = plain(*args, **kwargs)
        seen.append(result is not None)
        return result

    monkeypatch.setattr(taps_plain, "plain", spy)
    return seen


PLAIN = {"mlp-categorical", "mlp-gaussian", "mlp-bernoulli", "cnn-conv1d", "tagger"}  # PyTorch layers, each once


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_full_pass_equals_generic_where_the_plain_pass_serves(case, kind, monkeypatch, plain_spy):
    """Every case through the full pass alone (plain pass off) equals the generic engine; the plain pass
    serves exactly the models made of PyTorch's layers, each called once, outputs unchanged."""
    problem, batch = case.make()
    params = ffx.params_of(problem.model)
    options = {"kind": kind, "n_samples": 2, "dtype": F64}
    plain = ffx.diag_fisher(problem, params, batch, generator=generator(0), **options)
    assert all(served is (case.name in PLAIN) for served in plain_spy)
    assert plain_spy or (kind == "exact" and _t(problem, batch) > 1)  # positions one by one: never plain
    monkeypatch.setattr(taps_plain, "plain", lambda *args, **kwargs: None)
    full = ffx.diag_fisher(problem, params, batch, generator=generator(0), **options)
    want = ffx.diag_fisher(problem, params, batch, generator=generator(0), engine="generic", **options)
    assert_values_close(full.value, want.value, **TAPS_VS_GENERIC)
    assert_values_close(plain.value, want.value, **TAPS_VS_GENERIC)


@settings(max_examples=30)
@given(n=st.integers(1, 6), widths=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=seeds,
       kind=st.sampled_from(["empirical", "mc", "exact"]), bias=st.booleans(),
       which=st.sampled_from(["diag", "channels", "inputs", "whole", "mask"]), given_as=st.sampled_from(
           ["own", "copies", "moved", "subset"]))
def test_plain_pass_any_mlp(n, widths, seed, kind, bias, which, given_as):
    """MLPs of any widths and batch sizes (N = 1 and N equal to a width included), every estimator, with
    the parameters given as the module's own tensors (called directly), as copies, at other values or a
    subset (through ``functional_call``): the plain pass serves them all and equals the generic engine."""
    sizes = [4, *widths, 3]
    layers_ = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b, bias=bias), nn.Tanh())][:-1]
    problem = ffx.supervised(_build(lambda: nn.Sequential(*layers_), seed % 1000), ffx.Categorical())
    params = ffx.params_of(problem.model)
    params = {"own": params, "copies": {k: v.clone() for k, v in params.items()},
              "moved": {k: v + 0.1 for k, v in params.items()},
              "subset": {k: v for k, v in params.items() if k.startswith("0.")}}[given_as]
    batch = (randn(seed, n, 4), randint(seed + 1, 3, n))
    options = {"kind": kind, "dtype": F64, "n_samples": 2}
    if which == "diag":
        def fn(engine):
            return ffx.diag_fisher(problem, params, batch, generator=generator(seed), engine=engine, **options)
    else:
        spec = {"channels": ffx.channels, "inputs": ffx.inputs, "whole": ffx.whole, "mask": ffx.channels}[which](
            params)
        estimator = ffx.mask_importance if which == "mask" else ffx.group_fisher

        def fn(engine):
            return estimator(problem, params, batch, spec, generator=generator(seed), engine=engine, **options)
    seen = []
    plain = taps_plain.plain
    try:
        taps_plain.plain = lambda *a, **k: seen.append(plain(*a, **k)) or seen[-1]
        got = fn("taps")
    finally:
        taps_plain.plain = plain
    assert seen and all(r is not None for r in seen)
    assert_values_close(got.value, fn("generic").value, **TAPS_VS_GENERIC)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("factory", [
    lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)),  # an output changed in place
    Twice,  # a layer called twice
    Custom,  # a weight also used outside its layer
    lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Dropout(0.0)),
], ids=["in-place", "twice", "outside", "dropout-eval"])
def test_plain_pass_falls_back_once_per_model_and_shape(factory, plain_spy, monkeypatch):
    """Where a check of the plain pass fails after its forward, the full pass serves the call (the same
    numbers as the generic engine), and the next call with the same model and shapes skips the plain pass."""
    problem = ffx.supervised(_build(factory), ffx.Categorical())
    params = ffx.params_of(problem.model)
    batch = (randn(1, 5, 4), randint(2, 3, 5))
    forwards = []
    guarded = taps_common.guarded_forward
    monkeypatch.setattr(taps_common, "guarded_forward", lambda *a, **k: forwards.append(1) or guarded(*a, **k))
    first = ffx.diag_fisher(problem, params, batch, dtype=F64)
    once = len(forwards)
    second = ffx.diag_fisher(problem, params, batch, dtype=F64)
    twice = len(forwards)
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(first.value, want.value, **TAPS_VS_GENERIC)
    assert_values_close(second.value, want.value, **TAPS_VS_GENERIC)
    if factory is Custom or isinstance(problem.model, nn.Sequential) and isinstance(problem.model[-1], nn.Dropout):
        assert plain_spy[0] is (factory is not Custom)  # the dropout model is plain; Custom fails its graph check
        return
    assert plain_spy == [False, False] and once == 2 and twice == 3  # the second call: one forward


def test_plain_pass_budget_and_frozen_parameters(plain_spy, monkeypatch):
    """Output gradients over the budget go to the full pass; frozen parameters given explicitly are
    evaluated through ``functional_call`` leaves; both equal the generic engine."""
    model = _build(lambda: _mlp(3))
    model[0].weight.requires_grad_(False)
    problem = ffx.supervised(model, ffx.Categorical())
    params = {k: v.detach() for k, v in model.named_parameters()}  # the frozen weight included
    batch = (randn(1, 5, 5), randint(2, 3, 5))
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert_values_close(ffx.diag_fisher(problem, params, batch, dtype=F64).value, want.value, **TAPS_VS_GENERIC)
    assert plain_spy == [True]
    monkeypatch.setattr(taps_plain, "PLAIN_BUDGET", 4)
    other = ffx.supervised(_build(lambda: _mlp(3)), ffx.Categorical())
    params = ffx.params_of(other.model)
    got = ffx.diag_fisher(other, params, batch, dtype=F64, engine="taps")
    assert_values_close(got.value, ffx.diag_fisher(other, params, batch, dtype=F64, engine="generic").value,
                        **TAPS_VS_GENERIC)
    assert plain_spy == [True, False]


def test_plain_pass_leaves_no_forward_behind_even_when_the_forward_raises():
    model = _build(lambda: _mlp(3))
    problem = ffx.supervised(model, ffx.Categorical())
    ffx.diag_fisher(problem, ffx.params_of(model), (randn(1, 5, 5), randint(2, 3, 5)))
    with pytest.raises(ffx.FisherError):
        ffx.diag_fisher(problem, ffx.params_of(model), (randn(1, 5, 4), randint(2, 3, 5)))  # 4 features for 5
    assert not any("forward" in vars(m) for m in model.modules())
    pickle.dumps(model)


def test_an_mlp_batch_as_wide_as_its_input_is_not_cut():
    problem = ffx.supervised(_build(lambda: _mlp(3)), ffx.Categorical())
    assert taps.split_point(problem.prepare((randn(1, 5, 5), randint(2, 3, 5)))) is None


@pytest.mark.parametrize("factory", [lambda: _mlp(3), _tiny_gpt2, _tiny_llama, Tied,
                                     lambda: nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential())])
def test_one_walk_reads_the_model_as_torch_does(factory):
    """:func:`fisherfx._walk.walk` lists what ``named_parameters``/``named_buffers``/``modules`` list (ties
    and shared modules under every name), and the first BatchNorm in train mode."""
    from fisherfx._walk import walk

    model = factory()
    shared = nn.Linear(2, 2)
    model.add_module("again", nn.ModuleList([shared, shared]))
    index = walk(model)
    assert list(index.params) == [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert all(index.params[n] is p for n, p in model.named_parameters(remove_duplicate=False))
    assert list(index.buffers) == [n for n, _ in model.named_buffers(remove_duplicate=False)]
    assert index.modules == list(model.modules())
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d)]
    assert index.training_batchnorm == (bn[0] if bn else None)
    model.eval()
    assert walk(model).training_batchnorm is None


# --- scope, randomness, chunks, dtypes -----------------------------------------------------------

class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.shape[0] > 1:  # only the batched forward fails
            raise RuntimeError("boom")
        return self.lin(x)


def test_no_hook_outlives_a_call_even_when_the_forward_raises():
    problem, batch = CASES[5].make()
    ffx.diag_fisher(problem, ffx.params_of(problem.model), batch, per="token")
    pickle.dumps(problem.model)  # a hook left behind (a local function) could not be pickled
    boom = ffx.supervised(_build(Boom), ffx.Categorical())
    with pytest.raises(RuntimeError, match="boom"):
        ffx.diag_fisher(boom, ffx.params_of(boom.model), (randn(1, 3, 3), randint(2, 2, 3)), engine="taps")
    pickle.dumps(boom.model)


def test_dropout_in_train_mode_is_refused_and_the_global_rng_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64).train()
    problem, params, batch = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (randn(1, 3, 3),
                                                                                            randint(2, 2, 3))
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: the model draws random numbers \(dropout in train mode"):
        ffx.diag_fisher(problem, params, batch, engine="taps")
    prepared = problem.prepare(batch)
    state = torch.get_rng_state()
    with pytest.raises(ffx.FisherError, match=r"the model draws random numbers"):
        taps.estimate(problem, params, prepared, {k: taps.Request() for k in params}, kind="empirical",
                      per="sample", noise=None, dtype=F64)
    assert torch.equal(torch.get_rng_state(), state)  # the taps' forward drew, and gave the state back


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[10]], ids=lambda c: c.name)
def test_chunks_change_nothing(case):
    problem, batch = case.make()
    params = ffx.params_of(problem.model)
    whole = ffx.group_fisher(problem, params, batch, ffx.channels(params, problem.model), dtype=F64)
    chunked = ffx.group_fisher(problem, params, batch, ffx.channels(params, problem.model), dtype=F64, chunk_size=1)
    assert_values_close(chunked.value, whole.value, **TAPS_VS_GENERIC)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("hf-conv1d", "position-wise", "llama-right-pad",
                                                                  "gpt2-left-pad")], ids=lambda c: c.name)
def test_scratch_smaller_than_one_sample_gradient(case, monkeypatch):
    """A unit's gradient larger than the scratch budget (a language model's head) is formed in row blocks."""
    monkeypatch.setattr(taps_estimators, "BUDGET", 24)
    problem, batch = case.make()
    params = ffx.params_of(problem.model)
    got = ffx.diag_fisher(problem, params, batch, engine="auto", dtype=F64, kind="mc", n_samples=2,
                          generator=generator(3))
    want = ffx.diag_fisher(problem, params, batch, engine="generic", dtype=F64, kind="mc", n_samples=2,
                           generator=generator(3))
    assert_values_close(got.value, want.value, **TAPS_VS_GENERIC)


def test_float32_model_accumulates_in_float64_on_request():
    problem, batch = CASES[5].make()
    problem.model.float()
    params = ffx.params_of(problem.model)
    got = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="taps")
    want = ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic")
    assert all(v.dtype == F64 for v in got.value.values())
    assert_values_close(got.value, want.value, rtol=1e-4, atol=1e-6)  # float32 forward and backward


class Unused(nn.Module):
    """A layer called but its output never used, beside a plain MLP."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.aux = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        self.aux(x)  # computed and dropped: its parameters get zero
        return self.net(x)


def test_plain_pass_leaves_a_layer_whose_output_is_unused_to_the_full_pass(plain_spy):
    problem = ffx.supervised(_build(Unused), ffx.Categorical())
    params, batch = ffx.params_of(problem.model), (randn(1, 5, 4), randint(2, 3, 5))
    got = ffx.diag_fisher(problem, params, batch, dtype=F64)
    assert_values_close(got.value, ffx.diag_fisher(problem, params, batch, dtype=F64, engine="generic").value,
                        **TAPS_VS_GENERIC)
    assert plain_spy == [False] and got.value["aux.weight"].abs().sum() == 0


def test_per_position_probe_separates_positions_in_bfloat16():
    """The probe's scalars differ by more than a bfloat16 model's tolerance (random ones in [1, 2) could
    fall within 2% of each other and let a layer that mixes two positions pass: 150% off, found by
    Hypothesis): the mixing layer goes to the generic engine."""
    from fisherfx.testing_strategies import SeqModel

    model = _build(lambda: SeqModel(3, 4)).to(torch.bfloat16)
    x = randn(0, 2, 4, 3).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, IGNORE, IGNORE], [IGNORE] * 4])  # one sample, two active positions
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    got = ffx.diag_fisher(problem, params, (x, labels), kind="exact", engine="auto")
    want = ffx.diag_fisher(problem, params, (x, labels), kind="exact", engine="generic")
    assert served(problem, params, (x, labels), "exact", "sample") == {"out.weight", "out.bias"}
    for name in ("inp.weight", "inp.bias"):
        assert torch.equal(got.value[name], want.value[name])
    for name in ("out.weight", "out.bias"):
        assert float((got.value[name] - want.value[name]).norm()) <= 0.05 * float(want.value[name].norm())


@pytest.mark.parametrize("n", [4, 5])
def test_a_failed_forward_shows_the_callers_batch(n):
    """With ``N = T`` the forward runs on ``N + 1`` samples; its failure still shows the caller's ``N``."""
    ids, labels = _tokens(n, 4, 9, 0)
    ids[1, 2] = 9  # not in the vocabulary: the embedding raises
    problem = ffx.supervised(_build(Tagger, 0), ffx.Categorical())
    with pytest.raises(ffx.FisherError) as info:
        ffx.diag_fisher(problem, ffx.params_of(problem.model), (ids, labels))
    assert f"({n}, 4)" in str(info.value) and f"({n + 1}, 4)" not in str(info.value), str(info.value)
