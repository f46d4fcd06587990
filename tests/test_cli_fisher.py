"""``fisherfx fisher`` / ``fisherfx show`` end to end on tiny models written with save_pretrained (offline)."""

import json

import pytest
import torch

import fisherfx as ffx
from fisherfx import _cli_fisher
from fisherfx.cli import main
from fisherfx.io import read_header

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat on mat ran far and".split()
TEXT = "the cat sat on the mat and the dog ran far\n" * 4


def _llama_dir(path, tokenizer: bool = True):
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    if tokenizer:  # a WordLevel tokenizer built in code: no hub
        vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                             pad_token="[PAD]").save_pretrained(path)
    return path


ROWS = [[2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 2, 3, 4, 5, 6, 7, 8], [5], [3, 4, 5]]  # [5]: nothing to predict


@pytest.fixture
def model_dir(tmp_path):
    return _llama_dir(tmp_path / "tiny-llama")


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"input_ids": r, "text": "ignored"}) + "\n" for r in ROWS))
    return path


def _run(*argv):
    main([str(a) for a in argv])


def test_jsonl_heads_empirical_equals_collect_and_is_shown(model_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    _run("fisher", model_dir, jsonl, "--groups", "heads", "--kind", "empirical", "--out", out, "--batch-size", 2,
         "--max-tokens", 8, "--no-progress")
    assert "saved" in capsys.readouterr().out
    est = ffx.load(out)
    # the same estimate by hand: truncated to 8 tokens, [5] dropped, right-padded batches of 2
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    params = ffx.params_of(model)
    seqs = [r[:8] for r in ROWS if len(r) >= 2]
    batches = list(_cli_fisher.batches(seqs, 2, 1, "cpu"))
    assert batches[0]["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]
    ref = ffx.collect(ffx.causal_lm(model), params, batches, groups=ffx.heads(params, model=model),
                      kind="empirical", normalize="tokens", progress=False).fisher
    assert int(est.count) == int(ref.count) == sum(len(s) - 1 for s in seqs)
    for name in ref.value:
        torch.testing.assert_close(est.value[name], ref.value[name])
    assert est.provenance.normalize == "tokens" and est.provenance.kind == "empirical"
    meta = read_header(out).fields["metadata"]
    assert meta["model"] == "tiny-llama" and meta["data"] == "data.jsonl" and meta["data_format"] == "jsonl"
    assert meta["config"]["num_key_value_heads"] == 2 and len(meta["config_sha256"]) == 64
    assert meta["options"]["groups"] == "heads" and meta["options"]["max_tokens"] == 8
    assert meta["batches"] == 2 and meta["tokens"] == int(est.count)

    _run("show", out, "--top", 2)
    shown = capsys.readouterr().out
    for text in ("type: Estimate", "quantity=group", "kind=empirical", "normalize=tokens", f"count: {int(est.count)}",
                 "metadata.model: tiny-llama", "torch " + torch.__version__, "top 2 groups per layer",
                 "model.layers.1.self_attn.k_proj.weight [(h d) i -> h]"):
        assert text in shown, text


def test_text_with_tokenizer_mc_channels_and_diagonal(model_dir, tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    out = tmp_path / "c.safetensors"
    common = ("--batch-size", 3, "--max-tokens", 10, "--seed", 3, "--no-progress", "--max-batches", 1)
    _run("fisher", model_dir, data, "--groups", "channels", "--kind", "mc", "--out", out, *common)
    est = ffx.load(out)
    assert int(est.count) == 3 * 9  # one batch of three 10-token blocks
    assert est.provenance.kind == "mc" and est.provenance.quantity == "group"
    assert read_header(out).fields["metadata"]["data_format"] == "text"
    _run("fisher", model_dir, data, "--groups", "channels", "--kind", "mc", "--out", tmp_path / "again.safetensors",
         *common)
    again = ffx.load(tmp_path / "again.safetensors")  # seeded: the same draws
    for name in est.value:
        torch.testing.assert_close(est.value[name], again.value[name])

    diag = tmp_path / "d.safetensors"
    _run("fisher", model_dir, data, "--groups", "none", "--kind", "empirical", "--out", diag, *common)
    d = ffx.load(diag)
    assert d.provenance.quantity == "diagonal" and d.value["lm_head.weight"].shape == (16, 16)
    capsys.readouterr()
    _run("show", diag)
    shown = capsys.readouterr().out
    assert "top 5 parameters by total" in shown and "quantity=diagonal" in shown


def test_gpt2_jsonl_channels(tmp_path, jsonl):
    cfg = transformers.GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "g.safetensors"
    _run("fisher", tmp_path / "gpt2", jsonl, "--out", out, "--no-progress")
    est = ffx.load(out)
    assert est.value["transformer.h.0.attn.c_attn.weight"].shape == (24,)  # Conv1D [i, o]: per output channel


def test_errors_exit_with_a_message(tmp_path, jsonl):
    bare = _llama_dir(tmp_path / "bare", tokenizer=False)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit, match="no tokenizer"):
        _run("fisher", bare, text, "--out", out)
    with pytest.raises(SystemExit, match="no model directory"):
        _run("fisher", tmp_path / "missing", jsonl, "--out", out)
    with pytest.raises(SystemExit, match="no data file"):
        _run("fisher", bare, tmp_path / "missing.jsonl", "--out", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"ids": [1]}\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2: no 'input_ids'"):
        _run("fisher", bare, bad, "--out", out)
    with pytest.raises(SystemExit, match="max-tokens"):
        _run("fisher", bare, jsonl, "--out", out, "--max-tokens", 1)
    with pytest.raises(SystemExit, match="fisherfx show: .*no file"):
        _run("show", out)
    assert not out.exists()


def test_missing_transformers_is_a_clear_error(monkeypatch, tmp_path, jsonl):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit, match="pip install transformers"):
        _run("fisher", tmp_path, jsonl, "--out", tmp_path / "x.safetensors")
