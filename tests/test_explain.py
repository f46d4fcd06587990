"""``ffx.explain``: which engine serves each parameter, and why, as ``engine="auto"`` would choose."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisherfx as ffx
from fisherfx import Explanation, Served
from fisherfx.engines.taps import MIXING, NO_LAYER, OUTSIDE
from tests.strategies import VOCAB, build, randint, randn

N, D, H, C = 5, 4, 6, 3


class Unserved(nn.Module):
    """An MLP with a free parameter (no layer holds it) and a weight also used in a raw ``F.linear``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.scale = nn.Parameter(torch.ones(H))
        self.fc2 = nn.Linear(H, C)

    def forward(self, x):
        h = torch.tanh(self.fc1(x)) * self.scale
        return self.fc2(h) + 0.5 * F.linear(h, self.fc2.weight)


class GroupedConv(nn.Module):
    """A grouped convolution (not served), a plain one and a head."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, groups=2)
        self.conv = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.conv(torch.tanh(self.grouped(x))).mean((-1, -2)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))


def supervised(factory, x_shape):
    model = build(factory, 0)
    x, y = randn(1, N, *x_shape), randint(2, C, N)
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y)


def tiny_gpt2_2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def gpt2():
    pytest.importorskip("transformers")
    model = build(tiny_gpt2_2, 0)
    return ffx.causal_lm(model), ffx.params_of(model), {"input_ids": randint(3, VOCAB, 3, 6)}


CASES = {
    "free-parameter-and-raw-linear": (Unserved, (D,), {"scale": NO_LAYER, "fc2.weight": OUTSIDE}),
    "grouped-conv": (GroupedConv, (2, 7, 7), {"grouped.weight": NO_LAYER, "grouped.bias": NO_LAYER}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unserved_layers_are_generic_with_their_reason(case):
    factory, x_shape, expected = CASES[case]
    problem, params, batch = supervised(factory, x_shape)
    ex = ffx.explain(problem, params, batch)
    assert isinstance(ex, Explanation) and all(isinstance(r, Served) for r in ex.rows)
    assert [r.name for r in ex.rows] == list(params)
    assert ex.generic == list(expected)
    assert {r.name: r.reason for r in ex.rows if r.engine == "generic"} == expected
    assert ex.taps == [name for name in params if name not in expected]
    for r in ex.rows:
        assert r.numel == params[r.name].numel() and r.shape == tuple(params[r.name].shape)
        assert (r.reason == "" and r.code == "") if r.engine == "taps" else (r.reason and r.code)
    share = sum(params[k].numel() for k in expected) / sum(p.numel() for p in params.values())
    assert ex.share == pytest.approx(share)
    assert f"{len(expected)} of {len(params)} parameters" in ex.summary


@pytest.mark.parametrize("case", list(CASES))
def test_explanation_agrees_with_forced_taps(case):
    """What explain calls taps, engine='taps' computes; what it calls generic, engine='taps' refuses."""
    factory, x_shape, expected = CASES[case]
    problem, params, batch = supervised(factory, x_shape)
    ex = ffx.explain(problem, params, batch)
    served = {k: params[k] for k in ex.taps}
    ffx.diag_fisher(problem, served, batch, engine="taps")
    with pytest.raises(ffx.FisherError, match="engine='taps' cannot serve"):
        ffx.diag_fisher(problem, params, batch, engine="taps")
    assert "engine='taps' raises FisherError" in ffx.explain(problem, params, batch, engine="taps").summary


def test_plain_mlp_is_all_taps():
    problem, params, batch = supervised(mlp, (D,))
    ex = ffx.explain(problem, params, batch, kind="mc", n_samples=2, generator=torch.Generator().manual_seed(0))
    assert ex.generic == [] and ex.taps == list(params) and ex.share == 0.0
    assert all(r.engine == "taps" and r.reason == "" for r in ex.rows)
    assert ex.summary == f"all {len(params)} parameters ({sum(p.numel() for p in params.values()):,} entries) " \
                         "are served by the tap engine"


def test_engine_generic_lists_everything_as_asked():
    problem, params, batch = supervised(mlp, (D,))
    ex = ffx.explain(problem, params, batch, engine="generic")
    assert ex.generic == list(params) and ex.share == 1.0
    assert {r.code for r in ex.rows} == {"asked"}


def test_gpt2_per_token_early_layers_are_mixing(gpt2):
    problem, params, batch = gpt2
    ex = ffx.explain(problem, params, batch, per="token")
    rows = ex.by_name
    last = "transformer.h.1."
    served = [k for k in params if k.startswith(last + "mlp.") or k.startswith(last + "ln_2.")
              or k.startswith(last + "attn.c_proj.") or k.startswith("transformer.ln_f.")]
    assert ex.taps == served
    assert all(rows[k].reason == MIXING and rows[k].code == "mixing" for k in ex.generic)
    assert all(k in ex.generic for k in params if k.startswith("transformer.h.0."))
    assert {"transformer.wte.weight", "transformer.wpe.weight", last + "ln_1.weight",
            last + "attn.c_attn.weight"} <= set(ex.generic)
    assert MIXING in str(ex)  # the legend gives the reason in full


def test_gpt2_per_sample_is_all_taps(gpt2):
    problem, params, batch = gpt2
    assert ffx.explain(problem, params, batch).generic == []


def test_groups_explain_group_fisher_requests(gpt2):
    problem, params, batch = gpt2
    groups = ffx.heads(params, model=problem.model)
    ex = ffx.explain(problem, params, batch, groups, per="token", normalize="tokens")
    assert [r.name for r in ex.rows] == list(groups)
    assert ex.generic == [k for k in groups if not k.startswith("transformer.h.1.attn.c_proj.")]
    assert ex.taps == [k for k in groups if k.startswith("transformer.h.1.attn.c_proj.")] != []
    # group_fisher with auto computes the same names with the engines explain names
    est = ffx.group_fisher(problem, params, batch, groups, per="token", normalize="tokens")
    assert list(est.value) == list(groups)


def test_groups_on_an_unserved_model():
    problem, params, batch = supervised(Unserved, (D,))
    ex = ffx.explain(problem, params, batch, {"fc1.weight": "o i -> o", "scale": "h -> h"})
    assert [(r.name, r.engine, r.reason) for r in ex.rows] == [("fc1.weight", "taps", ""),
                                                               ("scale", "generic", NO_LAYER)]


def test_table_contains_every_name_aligned():
    problem, params, batch = supervised(Unserved, (D,))
    ex = ffx.explain(problem, params, batch)
    text = str(ex)
    assert text == ex.table()
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "numel", "engine", "reason"]
    for name, p in params.items():
        line = next(li for li in lines if li.startswith(name + " "))
        assert f"{p.numel():,}" in line and ("generic" in line) == (name in ex.generic)
    table = lines[: 2 + len(params)]
    engine_column = {li.index(" taps") if " taps" in li else li.index(" generic") for li in table[2:]}
    assert len(engine_column) == 1  # the engine column starts at the same offset on every row
    assert ex.summary in lines
    assert any(NO_LAYER in li for li in lines) and any(OUTSIDE in li for li in lines)


def test_explain_leaves_no_hook_and_no_grad():
    problem, params, batch = supervised(Unserved, (D,))
    ffx.explain(problem, params, batch)
    for module in problem.model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.grad is None for p in problem.model.parameters())


@pytest.mark.parametrize("options, match", [
    ({"kind": "fisher"}, r"explain: kind must be one of"),
    ({"per": "position"}, r"explain: per must be one of"),
    ({"engine": "fast"}, r"explain: engine must be one of"),
    ({"n_samples": 0}, r"explain: n_samples must be a positive integer"),
    ({"chunk_size": -1}, r"explain: chunk_size must be a positive integer"),
    ({"dtype": torch.float16}, r"explain: dtype must be one of"),
    ({"engines": "auto"}, r"explain: unknown options \['engines'\]"),
])
def test_bad_options_raise(options, match):
    problem, params, batch = supervised(mlp, (D,))
    with pytest.raises(ffx.FisherError, match=match):
        ffx.explain(problem, params, batch, **options)


def test_bad_params_groups_and_batch_raise():
    problem, params, (x, y) = supervised(mlp, (D,))
    with pytest.raises(ffx.FisherError, match=r"explain: unknown parameter 'fc\.weight'"):
        ffx.explain(problem, {"fc.weight": params["0.weight"]}, (x, y))
    with pytest.raises(ffx.FisherError, match=r"explain: group pattern"):
        ffx.explain(problem, params, (x, y), {"0.weight": "a b c -> a"})
    with pytest.raises(ffx.FisherError, match=r"explain: the batch has no active position"):
        ffx.explain(problem, params, (x, torch.full_like(y, -100)))


def test_bad_batch_raises_without_tapped_layer():
    """A model with no served layer runs no tap forward; the outputs are still checked."""

    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(C, D))

        def forward(self, x):
            return x @ self.w.T

    problem, params, (x, y) = supervised(Free, (D,))
    assert ffx.explain(problem, params, (x, y)).generic == ["w"]
    with pytest.raises(ffx.FisherError, match=r"explain"):
        ffx.explain(problem, params, (x, y + C))  # class indices outside the outputs
