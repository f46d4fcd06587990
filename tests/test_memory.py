"""memory_estimate: entry counts equal the sizes of real estimates; bytes per dtype; meta-device configs."""

import pytest
import torch
from torch import nn

import fisherfx as ffx
from fisherfx._memory import MemoryEstimate, memory_estimate

transformers = pytest.importorskip("transformers")

REPS = ("full", "diagonal", "channels", "heads", "kfac")


def _llama(tied: bool = False):
    return transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def _gpt2():
    return transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                                   eos_token_id=0)


def _real_sizes(model: nn.Module, problem, batch) -> dict[str, int]:
    params = ffx.params_of(model)
    diag = ffx.diag_fisher(problem, params, batch)
    out = {"diagonal": sum(v.numel() for v in diag.value.values())}
    specs = {"channels": ffx.channels(params, model=model)}
    try:
        specs["heads"] = ffx.heads(params, model=model)
    except ffx.FisherError:
        pass
    for rep, spec in specs.items():
        out[rep] = sum(v.numel() for v in ffx.group_fisher(problem, params, batch, spec).value.values())
    fac = ffx.kfac(problem, params, batch)
    out["kfac"] = (sum(f.A.numel() + f.G.numel() for f in fac.layers.values())
                   + sum(v.numel() for v in fac.diagonal.values()))
    return out


@pytest.mark.parametrize("config", [_llama, lambda: _llama(tied=True), _gpt2], ids=["llama", "llama-tied", "gpt2"])
def test_counts_match_real_estimates_on_language_models(config):
    cfg = config()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    batch = {"input_ids": torch.randint(0, 40, (2, 5))}
    real = _real_sizes(model, ffx.causal_lm(model), batch)
    d = sum(p.numel() for p in ffx.params_of(model).values())
    for rep, entries in real.items():
        from_config, from_model = memory_estimate(cfg, rep), memory_estimate(model, rep)
        assert from_config.entries == from_model.entries == entries, rep
        assert from_config.parameters == d
    assert memory_estimate(cfg, "full").entries == d * d


def test_counts_match_real_estimates_on_mlp_and_cnn_with_biases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3, bias=False), nn.LayerNorm(3), nn.Linear(3, 4))
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    for model, x in ((mlp, torch.randn(6, 5)), (cnn, torch.randn(6, 2, 6, 6))):
        problem = ffx.supervised(model, ffx.Categorical())
        y = torch.randint(0, model(x).shape[-1], (6,))
        real = _real_sizes(model, problem, (x, y))
        for rep, entries in real.items():
            assert memory_estimate(model, rep).entries == entries, rep
    # the MLP's K-FAC by hand: (5+1)² + 7², 7² + 3², LayerNorm diagonal 3 + 3, (3+1)² + 4²
    assert memory_estimate(mlp, "kfac").entries == 36 + 49 + 49 + 9 + 6 + 16 + 16


def test_bytes_per_dtype_and_meta_device():
    with torch.device("meta"):
        model = nn.Linear(10, 4)
    e = memory_estimate(model, "full")
    assert isinstance(e, MemoryEstimate)
    assert e.entries == 44 * 44 and e.parameters == 44
    assert (e.float32, e.bfloat16, e.float64) == (4 * e.entries, 2 * e.entries, 8 * e.entries)
    assert e.bytes(torch.bfloat16) == e.bfloat16 and e.bytes("float64") == e.float64
    with pytest.raises(ffx.FisherError, match="dtype"):
        e.bytes(torch.int8)


def test_billion_parameter_config_without_weights():
    """The docs table (docs/representations.md): a LLaMA-style 1.35B config, measured in a second."""
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                   num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
    got = {rep: memory_estimate(cfg, rep) for rep in REPS}
    assert got["diagonal"].entries == 1_345_423_360
    assert got["full"].float32 == 4 * 1_345_423_360 ** 2
    assert got["channels"].float32 == 2_697_216
    assert got["heads"].float32 == 6144
    assert got["kfac"].float32 == 17_283_945_472


def test_errors():
    with pytest.raises(ffx.FisherError, match="representation"):
        memory_estimate(nn.Linear(2, 2), "dense")
    with pytest.raises(ffx.FisherError, match="nn.Module or a HuggingFace config"):
        memory_estimate({"hidden_size": 3}, "diagonal")
