"""Ready-made group specs on real layer layouts, and the flat export.

Head tests use weights whose entries encode their own index as a power of two (``2**col``): a
group sum then *is* a bitmask of the entries it covered, so a head that mixes q, k and v columns
(or the wrong rows) shows up as the wrong set of indices, not as a slightly wrong number.
"""

import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import fisherfx as ffx
from fisherfx.testing import assert_tree_close
from tests.strategies import (
    SAME_MATH_F64,
    VOCAB,
    build,
    randint,
    randn,
    tiny_gpt2,
    tiny_llama,
)

F64 = torch.float64


class Zoo(nn.Module):
    """One of each layer layout. ``c_fc`` is a Conv1D under a GPT-2 name, ``proj`` one under another name,
    ``c_proj`` a Linear under a GPT-2 name."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.conv1 = nn.Conv1d(2, 4, 3)
        self.conv2 = nn.Conv2d(2, 3, (2, 3))
        self.c_fc = Conv1D(6, 5)  # weight [in=5, out=6]
        self.proj = Conv1D(4, 5)  # weight [in=5, out=4]
        self.c_proj = nn.Linear(4, 2)  # weight [out=2, in=4]


# Per-entry values x -> expected group sums, written with plain torch reductions per layout.
CHANNELS = {"linear": lambda x: x.sum(1), "conv1d": lambda x: x.sum((1, 2)), "conv2d": lambda x: x.sum((1, 2, 3)),
            "hf_conv1d": lambda x: x.sum(0), "bias": lambda x: x}
INPUTS = {"linear": lambda x: x.sum(0), "conv1d": lambda x: x.sum((0, 2)), "conv2d": lambda x: x.sum((0, 2, 3)),
          "hf_conv1d": lambda x: x.sum(1)}
LAYOUT = {"lin.weight": "linear", "lin.bias": "bias", "conv1.weight": "conv1d", "conv1.bias": "bias",
          "conv2.weight": "conv2d", "conv2.bias": "bias", "c_fc.weight": "hf_conv1d", "c_fc.bias": "bias",
          "proj.weight": "hf_conv1d", "proj.bias": "bias", "c_proj.weight": "linear", "c_proj.bias": "bias"}
# names whose layout can be read without the module: proj (Conv1D, non-GPT-2 name) and c_proj (Linear,
# GPT-2 name) need model=
BY_NAME = ("lin", "conv1", "conv2", "c_fc")


def probe(params, seed=0):
    return {k: randn(seed + i, *p.shape) for i, (k, p) in enumerate(params.items())}


@pytest.fixture(scope="module")
def zoo():
    model = build(Zoo, 0)
    return model, ffx.params_of(model)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "names"])
def test_channels(zoo, with_model):
    model, params = zoo
    if not with_model:
        params = {k: v for k, v in params.items() if k.split(".")[0] in BY_NAME}
    groups = ffx.channels(params, model=model if with_model else None)
    assert set(groups) == set(params)
    x = probe(params)
    expected = {k: CHANNELS[LAYOUT[k]](x[k]) for k in params}
    assert_tree_close(ffx.reduce_groups(x, groups), expected, **SAME_MATH_F64)
    assert ffx.reduce_groups(x, groups)["c_fc.weight"].shape == (6,)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "names"])
def test_inputs(zoo, with_model):
    model, params = zoo
    if not with_model:
        params = {k: v for k, v in params.items() if k.split(".")[0] in BY_NAME}
    groups = ffx.inputs(params, model=model if with_model else None)
    assert set(groups) == {k for k in params if k.endswith("weight")}  # biases have no input axis
    x = probe(params)
    expected = {k: INPUTS[LAYOUT[k]](x[k]) for k in groups}
    assert_tree_close(ffx.reduce_groups(x, groups), expected, **SAME_MATH_F64)


def test_whole(zoo):
    _, params = zoo
    x = probe(params)
    got = ffx.reduce_groups(x, ffx.whole(params))
    assert_tree_close(got, {k: v.sum() for k, v in x.items()}, **SAME_MATH_F64)
    assert all(v.shape == () for v in got.values())


def test_conv1d_with_and_without_model_agree_for_gpt2():
    model = build(tiny_gpt2, 0)
    params = ffx.params_of(model)
    assert ffx.channels(params, model=model) == ffx.channels(params)
    assert ffx.inputs(params, model=model) == ffx.inputs(params)
    assert ffx.channels(params)["transformer.h.0.mlp.c_fc.weight"].pattern == "i o -> o"


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2, 3, 2)  # [N, 2, 4, 4] -> [N, 3, 3, 3]
        self.conv1 = nn.Conv1d(3, 2, 3)  # [N, 3, 9] -> [N, 2, 7]
        self.c_fc = Conv1D(4, 14)  # [N, 14] -> [N, 4]

    def forward(self, x):
        h = torch.tanh(self.conv2(x)).flatten(2)
        return self.c_fc(torch.tanh(self.conv1(h)).flatten(1))


_CNN_LAYOUT = {"conv2.weight": "conv2d", "conv2.bias": "bias", "conv1.weight": "conv1d", "conv1.bias": "bias",
               "c_fc.weight": "hf_conv1d", "c_fc.bias": "bias"}


def test_channel_fisher_of_a_cnn_matches_the_diagonal():
    model = build(_Cnn, 0)
    params = ffx.params_of(model)
    problem = ffx.supervised(model, ffx.Categorical())
    batch = (randn(0, 3, 2, 4, 4), randint(1, 4, 3))
    diag = ffx.diag_fisher(problem, params, batch, dtype=F64)
    grouped = ffx.group_fisher(problem, params, batch, ffx.channels(params, model=model), dtype=F64)
    expected = {k: CHANNELS[_CNN_LAYOUT[k]](diag.value[k]) for k in params}
    assert_tree_close(grouped.value, expected, **SAME_MATH_F64)


# --- heads ------------------------------------------------------------------------------------------

def index_bits(*shape: int, axis: int) -> torch.Tensor:
    """``2**j`` at every entry whose index along ``axis`` is ``j`` (float64, exact for sums here)."""
    index = torch.arange(shape[axis], dtype=F64)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return (2.0 ** index).reshape(view).expand(shape)


def covered(value: torch.Tensor, copies: int) -> set[int]:
    """Indices encoded in a group sum of :func:`index_bits` entries, each index seen ``copies`` times."""
    n = int(value) // copies
    assert n * copies == int(value) == float(value), f"{value} is not {copies} × a bitmask"
    return {j for j in range(n.bit_length()) if n >> j & 1}


def head_columns(h: int, d: int, num_heads: int, parts: tuple[int, ...] = (0, 1, 2)) -> set[int]:
    """Columns (or rows) of head ``h`` in a fused ``(three h d)`` axis, for the q/k/v parts listed."""
    return {s * num_heads * d + h * d + j for s in parts for j in range(d)}


@pytest.fixture(scope="module")
def gpt2():
    model = build(lambda: tiny_gpt2(n_embd=8, n_head=2), 0)  # head dim 4; c_attn.weight [8, 24]
    return model, ffx.params_of(model)


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "names"])
def test_heads_gpt2_fused_c_attn_keeps_q_k_v_of_a_head_apart(gpt2, with_model):
    model, params = gpt2
    groups = ffx.heads(params, num_heads=2, model=model if with_model else None)
    attn = "transformer.h.0.attn."
    assert set(groups) == {attn + "c_attn.weight", attn + "c_attn.bias", attn + "c_proj.weight"}
    values = ffx.reduce_groups({attn + "c_attn.weight": index_bits(8, 24, axis=1),
                                attn + "c_attn.bias": index_bits(24, axis=0),
                                attn + "c_proj.weight": index_bits(8, 8, axis=0)}, groups)
    for h in range(2):
        assert covered(values[attn + "c_attn.weight"][h], copies=8) == head_columns(h, 4, 2)
        assert covered(values[attn + "c_attn.bias"][h], copies=1) == head_columns(h, 4, 2)
        # c_proj is a Conv1D [in = (h d), out]: head h owns input rows h*4 .. h*4+3
        assert covered(values[attn + "c_proj.weight"][h], copies=8) == set(range(4 * h, 4 * h + 4))


def test_heads_gpt2_split_qkv(gpt2):
    model, params = gpt2
    groups = ffx.heads(params, num_heads=2, model=model, split_qkv=True)
    name = "transformer.h.0.attn.c_attn.weight"
    value = ffx.reduce_groups({name: index_bits(8, 24, axis=1)}, {name: groups[name]})[name]
    assert value.shape == (3, 2)
    for s in range(3):
        for h in range(2):
            assert covered(value[s, h], copies=8) == head_columns(h, 4, 2, parts=(s,))


def test_heads_gpt2_group_fisher_matches_column_slices_of_the_diagonal(gpt2):
    model, params = gpt2
    problem = ffx.causal_lm(model)
    batch = {"input_ids": randint(0, VOCAB, 2, 5)}
    name = "transformer.h.0.attn.c_attn.weight"
    diag = ffx.diag_fisher(problem, {name: params[name]}, batch, dtype=F64).value[name]
    groups = ffx.heads(params, num_heads=2, model=model, split_qkv=True)
    got = ffx.group_fisher(problem, params, batch, {name: groups[name]}, dtype=F64).value[name]
    expected = torch.stack([torch.stack([diag[:, sorted(head_columns(h, 4, 2, parts=(s,)))].sum() for h in range(2)])
                            for s in range(3)])
    torch.testing.assert_close(got, expected, **SAME_MATH_F64)


@pytest.fixture(scope="module")
def llama_gqa():
    model = build(lambda: tiny_llama(hidden=8, num_heads=4, num_kv_heads=2), 0)  # head dim 2: k_proj [4, 8]
    return model, ffx.params_of(model)


GQA_HOW = {"shapes": lambda m: {"num_heads": 4}, "config": lambda m: {"model": m},
           "explicit": lambda m: {"num_heads": 4, "num_kv_heads": 2, "model": m}}


@pytest.mark.parametrize("how", list(GQA_HOW))
def test_heads_llama_grouped_query_attention(llama_gqa, how):
    """From the shapes alone, from the config alone, or told: each k/v group holds one real 2-row kv head."""
    model, params = llama_gqa
    groups = ffx.heads(params, **GQA_HOW[how](model))
    attn = "model.layers.0.self_attn."
    assert set(groups) == {attn + p + "_proj.weight" for p in "qkvo"}
    rows = {attn + "q_proj.weight": index_bits(8, 8, axis=0), attn + "k_proj.weight": index_bits(4, 8, axis=0),
            attn + "v_proj.weight": index_bits(4, 8, axis=0), attn + "o_proj.weight": index_bits(8, 8, axis=1)}
    values = ffx.reduce_groups(rows, groups)
    assert values[attn + "q_proj.weight"].shape == (4,) and values[attn + "o_proj.weight"].shape == (4,)
    assert values[attn + "k_proj.weight"].shape == (2,) and values[attn + "v_proj.weight"].shape == (2,)
    for h in range(4):
        assert covered(values[attn + "q_proj.weight"][h], copies=8) == {2 * h, 2 * h + 1}
        assert covered(values[attn + "o_proj.weight"][h], copies=8) == {2 * h, 2 * h + 1}
    for h in range(2):
        assert covered(values[attn + "k_proj.weight"][h], copies=8) == {2 * h, 2 * h + 1}
        assert covered(values[attn + "v_proj.weight"][h], copies=8) == {2 * h, 2 * h + 1}


def _llama(layers: int = 2, hidden: int = 16, num_heads: int = 4, num_kv_heads: int = 2, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=num_heads,
                                        num_key_value_heads=num_kv_heads, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager",
                                        **config))


def test_heads_llama_head_dim_other_than_hidden_over_heads():
    """``head_dim`` 4 with hidden 8 and 4 heads: q rows 16, k rows 8; the hidden size must not be used."""
    model = build(lambda: _llama(layers=1, hidden=8, head_dim=4), 0)
    params = ffx.params_of(model)
    attn = "model.layers.0.self_attn."
    assert params[attn + "k_proj.weight"].shape == (8, 8)
    for kwargs in ({"num_heads": 4}, {"model": model}):
        groups = ffx.heads(params, **kwargs)
        values = ffx.reduce_groups({attn + "k_proj.weight": index_bits(8, 8, axis=0)}, groups)
        assert [covered(v, copies=8) for v in values[attn + "k_proj.weight"]] == [{0, 1, 2, 3}, {4, 5, 6, 7}]


LLAMA_CONTRADICTIONS = {
    "num_kv_heads-vs-config-and-shapes": (
        lambda m: {"num_heads": 4, "num_kv_heads": 4, "model": m},
        "heads: the key/value heads of layer 'model.layers.0.self_attn.' do not agree: num_kv_heads=4; "
        "model.config.num_key_value_heads=2; 'model.layers.0.self_attn.k_proj.weight': 4 rows / head size 2 = 2 "
        "key/value heads; 'model.layers.0.self_attn.v_proj.weight': 4 rows / head size 2 = 2 key/value heads"),
    "num_kv_heads-vs-shapes": (
        lambda m: {"num_heads": 4, "num_kv_heads": 4},
        "heads: the key/value heads of layer 'model.layers.0.self_attn.' do not agree: num_kv_heads=4; "
        "'model.layers.0.self_attn.k_proj.weight': 4 rows / head size 2 = 2 key/value heads"),
    "num_heads-not-dividing-q-rows": (
        lambda m: {"num_heads": 3},
        "heads: group pattern '(h d) i -> h' with {'h': 3} does not fit parameter "
        "'model.layers.0.self_attn.q_proj.weight' of shape (8, 8): its 8 rows are not a multiple of num_heads=3"),
    "num_heads-vs-config": (
        lambda m: {"num_heads": 2, "model": m},
        "heads: the query heads of layer 'model.layers.0.self_attn.' do not agree: num_heads=2; "
        "model.config.num_attention_heads=4"),
    "no-num_heads-and-no-model": (
        lambda m: {},
        "heads: num_heads is needed for 'model.layers.0.self_attn.q_proj.weight': no model was given"),
    "num_kv_heads-not-positive": (lambda m: {"num_heads": 4, "num_kv_heads": 0},
                                  "heads: num_kv_heads must be a positive int, got 0"),
}


@pytest.mark.parametrize("which", list(LLAMA_CONTRADICTIONS))
def test_heads_contradicting_the_llama_shapes_or_config(llama_gqa, which):
    model, params = llama_gqa
    kwargs, message = LLAMA_CONTRADICTIONS[which]
    with pytest.raises(ffx.FisherError, match=re.escape(message)):
        ffx.heads(params, **kwargs(model))


HAND_MADE_CONTRADICTIONS = {
    "q-and-o-head-sizes": (
        {"a.q_proj.weight": (8, 8), "a.o_proj.weight": (8, 16)}, {},
        "heads: the head sizes of layer 'a.' do not agree: 'a.q_proj.weight': 8 rows / 4 heads = head size 2; "
        "'a.o_proj.weight': 16 columns / 4 heads = head size 4"),
    "kv-rows-not-a-multiple-of-the-head-size": (
        {"a.q_proj.weight": (8, 8), "a.k_proj.weight": (5, 8)}, {},
        "heads: 'a.k_proj.weight' of shape (5, 8) has 5 rows, not a multiple of the head size 2 "
        "('a.q_proj.weight': 8 rows / 4 heads = head size 2)"),
    "kv-heads-not-dividing-query-heads": (
        {"a.q_proj.weight": (8, 8), "a.k_proj.weight": (6, 8)}, {},
        "heads: 3 key/value heads ('a.k_proj.weight': 6 rows / head size 2 = 3 key/value heads) do not divide the "
        "4 query heads (num_heads=4) of layer 'a.'"),
    "kv-only-layer": (
        {"a.k_proj.weight": (4, 8), "a.v_proj.weight": (4, 8)}, {},
        "heads: cannot tell the key/value heads of 'a.k_proj.weight', 'a.v_proj.weight': layer 'a.' has no q, "
        "output or fused projection to give the head size and no model states it; pass num_kv_heads= or model="),
    "fused-under-gqa": (
        {"attn.qkv.weight": (24, 8)}, {"num_kv_heads": 2},
        "heads: fused projection 'attn.qkv.weight' with num_kv_heads=2 != num_heads=4: its q, k and v parts"),
}


@pytest.mark.parametrize("which", list(HAND_MADE_CONTRADICTIONS))
def test_heads_contradicting_shapes(which):
    shapes, kwargs, message = HAND_MADE_CONTRADICTIONS[which]
    with pytest.raises(ffx.FisherError, match=re.escape(message)):
        ffx.heads({k: torch.zeros(s) for k, s in shapes.items()}, num_heads=4, **kwargs)


def test_heads_kv_only_layer_with_num_kv_heads():
    params = {"a.k_proj.weight": torch.zeros(4, 8), "a.v_proj.bias": torch.zeros(4)}
    assert ffx.heads(params, num_heads=4, num_kv_heads=2) == {
        "a.k_proj.weight": ffx.Group("(h d) i -> h", {"h": 2}), "a.v_proj.bias": ffx.Group("(h d) -> h", {"h": 2})}


def test_heads_per_layer():
    """Every layer is worked out on its own: a second layer with other shapes gets its own key/value heads."""
    params = {"l0.attn.q_proj.weight": torch.zeros(8, 8), "l0.attn.k_proj.weight": torch.zeros(4, 8),
              "l1.attn.q_proj.weight": torch.zeros(16, 8), "l1.attn.k_proj.weight": torch.zeros(16, 8)}
    groups = ffx.heads(params, num_heads=4)
    assert groups["l0.attn.k_proj.weight"].sizes == {"h": 2} and groups["l1.attn.k_proj.weight"].sizes == {"h": 4}


def test_heads_gpt2_from_the_model_alone(gpt2):
    model, params = gpt2
    assert ffx.heads(params, model=model) == ffx.heads(params, num_heads=2, model=model) == ffx.heads(params, 2)
    with pytest.raises(ffx.FisherError, match=re.escape("heads: the query heads of layer 'transformer.h.0.attn.' "
                                                        "do not agree: num_heads=4; transformer.h.0.attn.num_heads=2")):
        ffx.heads(params, num_heads=4, model=model)
    with pytest.raises(ffx.FisherError, match=re.escape("heads: fused projection 'transformer.h.0.attn.c_attn.weight' "
                                                        "with num_kv_heads=1 != num_heads=2")):
        ffx.heads(params, num_kv_heads=1, model=model)


class MHANet(nn.Module):
    def __init__(self, embed: int = 6, num_heads: int = 3, c: int = 4):
        super().__init__()
        self.attn = nn.MultiheadAttention(embed, num_heads, batch_first=True)
        self.head = nn.Linear(embed, c)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("split_qkv", [False, True])
def test_heads_multihead_attention_in_proj(split_qkv):
    model = build(MHANet, 0)  # embed 6, 3 heads of dim 2: in_proj_weight [18, 6]
    params = ffx.params_of(model)
    groups = ffx.heads(params, num_heads=3, model=model, split_qkv=split_qkv)
    assert set(groups) == {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight"}
    values = ffx.reduce_groups({"attn.in_proj_weight": index_bits(18, 6, axis=0),
                                "attn.in_proj_bias": index_bits(18, axis=0),
                                "attn.out_proj.weight": index_bits(6, 6, axis=1)}, groups)
    for h in range(3):
        assert covered(values["attn.out_proj.weight"][h], copies=6) == {2 * h, 2 * h + 1}
        for s in range(3):
            parts = (s,) if split_qkv else (0, 1, 2)
            weight = values["attn.in_proj_weight"][s, h] if split_qkv else values["attn.in_proj_weight"][h]
            bias = values["attn.in_proj_bias"][s, h] if split_qkv else values["attn.in_proj_bias"][h]
            assert covered(weight, copies=6) == head_columns(h, 2, 3, parts)
            assert covered(bias, copies=1) == head_columns(h, 2, 3, parts)
    expected_shape = (3, 3) if split_qkv else (3,)
    assert values["attn.in_proj_weight"].shape == expected_shape
    # and the Fisher itself runs through the module under the estimator
    batch = (randn(0, 2, 4, 6), randint(1, 4, 2, 4))
    est = ffx.group_fisher(ffx.supervised(model, ffx.Categorical()), params, batch, groups, dtype=F64)
    assert est.value["attn.in_proj_weight"].shape == expected_shape
    assert all(bool((v > 0).all()) for v in est.value.values())


def test_heads_multihead_attention_from_the_module():
    model = build(MHANet, 0)
    params = ffx.params_of(model)
    assert ffx.heads(params, model=model) == ffx.heads(params, num_heads=3, model=model)
    with pytest.raises(ffx.FisherError, match=re.escape("heads: the query heads of layer 'attn.' do not agree: "
                                                        "num_heads=2; attn.num_heads=3")):
        ffx.heads(params, num_heads=2, model=model)


def test_heads_multihead_attention_with_kdim_and_vdim():
    """Other key/value widths: separate ``q_proj_weight`` [6, 6], ``k_proj_weight`` [6, 4], ``v_proj_weight``
    [6, 5], rows ``(h d)`` each; the bias stays fused."""
    model = build(lambda: nn.MultiheadAttention(6, 3, kdim=4, vdim=5), 0)
    params = ffx.params_of(model)
    groups = ffx.heads(params, model=model)
    assert set(groups) == {"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight"}
    for name, width in (("q_proj_weight", 6), ("k_proj_weight", 4), ("v_proj_weight", 5)):
        value = ffx.reduce_groups({name: index_bits(6, width, axis=0)}, groups)[name]
        assert [covered(v, copies=width) for v in value] == [{0, 1}, {2, 3}, {4, 5}]


def test_heads_names_as_a_list_or_a_mapping():
    params = {"blk.query.weight": torch.zeros(6, 4), "blk.mix.weight": torch.zeros(4, 6)}
    by_list = ffx.heads(params, num_heads=3, names=["blk.query.weight"])
    assert by_list == {"blk.query.weight": ffx.Group("(h d) i -> h", {"h": 3})}
    by_map = ffx.heads(params, num_heads=3, names={"blk.query.weight": "q", "blk.mix.weight": "o"})
    assert by_map["blk.mix.weight"] == ffx.Group("o (h d) -> h", {"h": 3})


# --- head totals ------------------------------------------------------------------------------------

def _llama_totals_by_hand(values, layer: str, shared: str) -> torch.Tensor:
    """Per query head ``i`` of a 4-head, 2-kv-head layer: q and o value ``i``, k and v value ``i // 2``."""
    def v(p, i):
        return sum(values[f"{layer}{p}_proj.{leaf}"][i] for leaf in ("weight", "bias") if f"{layer}{p}_proj.{leaf}"
                   in values)

    w = 0.5 if shared == "split" else 1.0
    return torch.stack([v("q", i) + v("o", i) + w * (v("k", i // 2) + v("v", i // 2)) for i in range(4)])


@pytest.fixture(scope="module")
def llama_head_fisher():
    """Per-head group Fisher of a 2-layer LLaMA with 4 query and 2 key/value heads, q/k/v biases on."""
    model = build(lambda: _llama(attention_bias=True), 0)
    params = ffx.params_of(model)
    spec = ffx.heads(params, model=model)
    batch = {"input_ids": randint(0, VOCAB, 3, 5), "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2,
                                                                                    [1] * 4 + [0]])}
    est = ffx.group_fisher(ffx.causal_lm(model), params, batch, spec, dtype=F64)
    return spec, est.value


@pytest.mark.parametrize("shared", ["split", "full"])
def test_head_totals_llama_gqa_against_a_hand_sum(llama_head_fisher, shared):
    spec, values = llama_head_fisher
    layers = ["model.layers.0.self_attn.", "model.layers.1.self_attn."]
    assert values[layers[0] + "k_proj.weight"].shape == (2,) and values[layers[0] + "k_proj.bias"].shape == (2,)
    totals = ffx.head_totals(values, spec, shared=shared)
    assert list(totals) == layers
    for layer in layers:
        expected = _llama_totals_by_hand(values, layer, shared)
        assert bool((expected > 0).all())
        torch.testing.assert_close(totals[layer], expected, **SAME_MATH_F64)
    assert not torch.allclose(totals[layers[0]], totals[layers[1]])


def test_head_totals_split_sums_to_the_layer_total(llama_head_fisher):
    spec, values = llama_head_fisher
    totals = ffx.head_totals(values, spec, num_heads=4)
    for layer, total in totals.items():
        layer_total = sum(v.sum() for k, v in values.items() if k.startswith(layer))
        torch.testing.assert_close(total.sum(), layer_total, **SAME_MATH_F64)


@pytest.mark.parametrize("split_qkv", [False, True])
def test_head_totals_gpt2_fused_c_attn_against_a_hand_sum(gpt2, split_qkv):
    model, params = gpt2
    spec = ffx.heads(params, model=model, split_qkv=split_qkv)
    batch = {"input_ids": randint(0, VOCAB, 2, 5)}
    values = ffx.group_fisher(ffx.causal_lm(model), params, batch, spec, dtype=F64).value
    attn = "transformer.h.0.attn."
    fused = [values[attn + "c_attn.weight"], values[attn + "c_attn.bias"]]
    assert all(v.shape == ((3, 2) if split_qkv else (2,)) for v in fused)
    expected = torch.stack([sum(float(v[..., h].sum()) for v in fused) + values[attn + "c_proj.weight"][h]
                            for h in range(2)])
    for shared in ("split", "full"):  # no key/value head is shared: both rules are the plain sum
        totals = ffx.head_totals(values, spec, shared=shared)
        assert list(totals) == [attn]
        torch.testing.assert_close(totals[attn], expected, **SAME_MATH_F64)


def test_head_totals_layer_of_merges_sibling_modules():
    """BERT keeps q/k/v under ``attention.self`` and the output projection under ``attention.output``."""
    spec = {"enc.0.attention.self.query.weight": ffx.Group("(h d) i -> h", {"h": 2}),
            "enc.0.attention.output.dense.weight": ffx.Group("o (h d) -> h", {"h": 2})}
    values = {"enc.0.attention.self.query.weight": torch.tensor([1.0, 2.0]),
              "enc.0.attention.output.dense.weight": torch.tensor([10.0, 20.0])}
    assert list(ffx.head_totals(values, spec)) == ["enc.0.attention.self.", "enc.0.attention.output."]
    merged = ffx.head_totals(values, spec, layer_of=lambda name: name.split(".attention.")[0])
    assert_tree_close(merged, {"enc.0": torch.tensor([11.0, 22.0])}, rtol=0, atol=0)


def test_head_totals_ignores_groups_without_a_value():
    spec = {"a.q_proj.weight": ffx.Group("(h d) i -> h", {"h": 2}),
            "a.o_proj.weight": ffx.Group("o (h d) -> h", {"h": 2})}
    got = ffx.head_totals({"a.q_proj.weight": torch.tensor([1.0, 2.0])}, spec)
    assert_tree_close(got, {"a.": torch.tensor([1.0, 2.0])}, rtol=0, atol=0)


GQA_SPEC = {"a.q_proj.weight": ffx.Group("(h d) i -> h", {"h": 4}),
            "a.k_proj.weight": ffx.Group("(h d) i -> h", {"h": 2}),
            "a.qkv.weight": ffx.Group("(three h d) i -> three h", {"three": 3, "h": 4}), "a.fc.weight": "o i -> o",
            "b.k_proj.weight": ffx.Group("(h d) i -> h", {"h": 2}), "a.x.weight": ffx.Group("(h d) i -> h", {"h": 3})}
HEAD_TOTALS_ERRORS = {
    "no-group": ({"a.v_proj.weight": torch.ones(2)}, {},
                 "head_totals: no group spec for 'a.v_proj.weight'; the groups cover 'a.q_proj.weight'"),
    "not-a-head-group": ({"a.fc.weight": torch.ones(3)}, {},
                         "head_totals: the group of 'a.fc.weight' ('o i -> o') has no head axis"),
    "wrong-shape": ({"a.q_proj.weight": torch.ones(4), "a.k_proj.weight": torch.ones(4)}, {},
                    "head_totals: value for 'a.k_proj.weight' has shape (4,), expected (2,) from pattern "
                    "'(h d) i -> h' with {'h': 2}"),
    "fused-without-the-three-axis": ({"a.qkv.weight": torch.ones(4)}, {},
                                     "head_totals: value for 'a.qkv.weight' has shape (4,), expected (3, 4)"),
    "kv-heads-not-dividing": ({"a.q_proj.weight": torch.ones(4), "a.x.weight": torch.ones(3)}, {},
                              "head_totals: 'a.x.weight' has 3 heads, but layer 'a.' has 4 query heads"),
    "q-with-other-than-num_heads": ({"a.q_proj.weight": torch.ones(4)}, {"num_heads": 8},
                                    "head_totals: 'a.q_proj.weight' has 4 heads, but layer 'a.' has 8 query heads"),
    "kv-only-layer": ({"b.k_proj.weight": torch.ones(2)}, {},
                      "head_totals: layer 'b.' has key/value values only ('b.k_proj.weight'), which do not tell its "
                      "query heads; pass num_heads="),
    "unknown-rule": ({"a.q_proj.weight": torch.ones(4)}, {"shared": "mean"},
                     "head_totals: shared must be 'split' or 'full', got 'mean'"),
}


@pytest.mark.parametrize("which", list(HEAD_TOTALS_ERRORS))
def test_head_totals_refuses_mismatched_values(which):
    values, kwargs, message = HEAD_TOTALS_ERRORS[which]
    with pytest.raises(ffx.FisherError, match=re.escape(message)):
        ffx.head_totals(values, GQA_SPEC, **kwargs)


def test_head_totals_kv_only_layer_with_num_heads():
    got = ffx.head_totals({"b.k_proj.weight": torch.tensor([2.0, 4.0])}, GQA_SPEC, num_heads=4, shared="full")
    assert_tree_close(got, {"b.": torch.tensor([2.0, 2.0, 4.0, 4.0])}, rtol=0, atol=0)


# --- reduce_groups ----------------------------------------------------------------------------------

def test_reduce_groups_with_a_spec_for_more_parameters(gpt2):
    """A spec for the whole model applies to values of part of it (as expand_groups accepts them)."""
    model, params = gpt2
    spec = {**ffx.whole(params), **ffx.heads(params, model=model)}
    part = ["transformer.h.0.attn.c_attn.weight", "transformer.wte.weight"]
    x = probe({k: params[k] for k in part})
    got = ffx.reduce_groups({**x, "not.in.the.spec": torch.ones(3)}, spec)
    assert list(got) == [k for k in spec if k in part]  # in the order of the spec; values without a group left out
    assert_tree_close(got, {k: spec[k].reduce(x[k]) for k in part}, rtol=0, atol=0)
    back = ffx.expand_groups(got, spec, params)
    assert_tree_close(ffx.reduce_groups(back, spec), {k: v * (params[k].numel() // v.numel()) for k, v in got.items()},
                      **SAME_MATH_F64)


def test_reduce_groups_with_a_value_of_the_wrong_shape():
    with pytest.raises(ffx.FisherError, match=re.escape("reduce_groups: group pattern 'o i -> o' with {} does not fit "
                                                        "the value for 'w' of shape (3,)")):
        ffx.reduce_groups({"w": torch.ones(3)}, {"w": "o i -> o"})


# --- flat export ------------------------------------------------------------------------------------

def test_to_flat_from_flat_round_trip(gpt2):
    model, params = gpt2
    groups = {**ffx.whole(params), **ffx.heads(params, num_heads=2, model=model, split_qkv=True)}
    values = ffx.reduce_groups(probe(params), groups)
    flat = ffx.to_flat(values)
    assert_tree_close(ffx.from_flat(flat), values, rtol=0, atol=0)
    name = "transformer.h.0.attn.c_attn.weight"
    assert {k for k in flat if k.startswith(name + "|")} == {f"{name}|{s},{h}" for s in range(3) for h in range(2)}
    torch.testing.assert_close(flat[f"{name}|2,1"], values[name][2, 1], rtol=0, atol=0)
    assert "transformer.wte.weight|" in flat  # a whole-tensor group has an empty group index


def test_to_flat_keys_for_channels():
    values = {"fc.weight": torch.tensor([1.0, 2.0, 3.0])}
    flat = ffx.to_flat(values)
    assert_tree_close(flat, {f"fc.weight|{i}": torch.tensor(i + 1.0) for i in range(3)}, rtol=0, atol=0)
    assert ffx.to_flat(values, sep="/").keys() == {"fc.weight/0", "fc.weight/1", "fc.weight/2"}


def test_group_specs_pickle_and_copy():
    """Specs are plain values: they pickle (to be stored beside an estimate) and deep-copy."""
    import copy
    import pickle

    spec = {"w": ffx.Group("o ... -> o"), "h": ffx.Group("(h d) i -> h", {"h": 2})}
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert copy.deepcopy(spec) == spec
