"""MC draws independent of the padding layout, memory bounded by vectors, chunking that changes nothing,
and the generic engine's progress bar (issues 11 and 12).

Everything numerical runs in float64, so the two sides of each equality differ only by summation
order. The memory test runs in a subprocess and reads the kernel's peak resident set size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisherfx as ffx
from fisherfx.engines import generic
from fisherfx.testing import assert_tree_close
from tests.strategies import (
    SAME_MATH_F64,
    VOCAB,
    SeqModel,
    assert_values_differ,
    build,
    generator,
    randint,
    randn,
    seeds,
    tiny_gpt2,
    tiny_llama,
)

F64 = torch.float64
ENGINES = ("auto", "generic")
PERS = ("sample", "token")
D, C = 3, 4  # input features and classes per position of the sequence model
CHUNK_EQUAL = {"rtol": 1e-9, "atol": 1e-12}  # issue 11: chunked, unchunked and the tap engine, float64


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Biases at 0 and norm weights at 1 would hide mistakes: move them."""
    g = generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


LM_FACTORIES = {"gpt2": tiny_gpt2, "llama-gqa": tiny_llama}  # tiny_llama: 4 query heads, 2 key/value heads


def _lm(name: str, seed: int = 0) -> tuple[ffx.Problem, dict, torch.nn.Module]:
    model = _perturbed(build(LM_FACTORIES[name], seed), seed + 1)
    return ffx.causal_lm(model), ffx.params_of(model), model


# --- 1. MC draws do not depend on the padding layout ---------------------------------------------

LENGTHS = (5, 3, 4)  # tokens per real row


def _lm_batch(width: int = 6, left: bool = False, before: int = 0, after: int = 0, seed: int = 7) -> dict:
    """The same three sequences (one real label ignored), padded to ``width`` on the left or right,
    with ``before``/``after`` fully padded rows; pads hold token 0 and garbage labels.
    """
    g = generator(seed)
    seqs = [torch.randint(1, VOCAB, (n,), generator=g) for n in LENGTHS]
    n_rows = before + len(seqs) + after
    ids = torch.zeros(n_rows, width, dtype=torch.long)
    labels = torch.randint(0, VOCAB, (n_rows, width), generator=generator(seed + 1 + width + before))  # garbage
    mask = torch.zeros(n_rows, width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        row, span = before + i, (slice(width - len(seq), width) if left else slice(0, len(seq)))
        ids[row, span], labels[row, span], mask[row, span] = seq, seq, 1
        if i == 0:
            labels[row, span.start + 2] = -100  # an ignored real label: it must not consume a draw either
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


LAYOUTS = {
    "left-padded": {"left": True},
    "padded rows first": {"before": 2},
    "padded rows last": {"after": 2},
    "wider, left-padded, padded rows around": {"width": 8, "left": True, "before": 1, "after": 1},
}
N_TOKENS = sum(n - 1 for n in LENGTHS) - 1  # the causal shift, and one ignored label


def _mc(fn, problem, params, batch, *args, seed: int = 0, **options):
    return fn(problem, params, batch, *args, kind="mc", generator=generator(seed), normalize="tokens", dtype=F64,
              **options)


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("n_samples", [1, 4])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("model_name", sorted(LM_FACTORIES))
def test_mc_fisher_of_a_causal_lm_does_not_depend_on_the_padding_layout(model_name, engine, n_samples, per):
    problem, params, model = _lm(model_name)
    groups = ffx.channels(params, model)
    options = {"n_samples": n_samples, "engine": engine, "per": per}
    base = _lm_batch()  # right padding, no padded row
    want_diag = _mc(ffx.diag_fisher, problem, params, base, **options)
    want_group = _mc(ffx.group_fisher, problem, params, base, groups, **options)
    assert int(want_diag.count) == int(want_group.count) == N_TOKENS
    for layout, how in LAYOUTS.items():
        batch = _lm_batch(**how)
        got_diag = _mc(ffx.diag_fisher, problem, params, batch, **options)
        got_group = _mc(ffx.group_fisher, problem, params, batch, groups, **options)
        assert int(got_diag.count) == int(got_group.count) == N_TOKENS, layout
        assert_tree_close(got_diag.value, want_diag.value, **SAME_MATH_F64)
        assert_tree_close(got_group.value, want_group.value, **SAME_MATH_F64)
    # the result does follow the draws (another seed differs), so the equalities above are not vacuous
    assert_values_differ(_mc(ffx.diag_fisher, problem, params, base, seed=1, **options).value, want_diag.value)


def _seq(likelihood: str, seed: int = 3):
    model = _perturbed(build(lambda: SeqModel(D, C), seed), seed + 1)
    lik = ffx.Categorical() if likelihood == "categorical" else ffx.Gaussian(sigma=0.7)
    return ffx.supervised(model, lik), ffx.params_of(model)


def _seq_batches(likelihood: str, seed: int = 11) -> dict[str, tuple]:
    """One supervised batch (4 rows, 5 positions, some masked) and the same data with masked
    positions added: a masked row inserted (by ``-100`` targets or by the mask), a masked position
    appended to every row (SeqModel is causal along positions: earlier outputs do not change).
    """
    n, t = 4, 5
    x = randn(seed, n, t, D)
    mask = torch.rand(n, t, generator=generator(seed + 1)) < 0.7
    mask[0, 0] = True
    x_row, x_col = randn(seed + 2, 1, t, D), randn(seed + 3, n, 1, D)
    col_false, row_false = torch.zeros(n, 1, dtype=torch.bool), torch.zeros(1, t, dtype=torch.bool)

    def insert(a, row):  # a row inserted at index 2
        return torch.cat([a[:2], row, a[2:]])

    if likelihood == "categorical":
        y = torch.where(mask, randint(seed + 4, C, n, t), -100)
        y_row, y_col = torch.full((1, t), -100), torch.full((n, 1), -100)
        return {"base": (x, y),
                "ignored row inserted": (insert(x, x_row), insert(y, y_row)),
                "masked row inserted": (insert(x, x_row), insert(y, randint(seed + 5, C, 1, t)),
                                        insert(mask, row_false)),
                "ignored position appended": (torch.cat([x, x_col], 1), torch.cat([y, y_col], 1)),
                "masked row mask [N]": (insert(x, x_row), insert(y, y_row.clamp(min=0)),
                                        torch.tensor([True, True, False, True, True]))}
    y = randn(seed + 4, n, t, C)
    y_row, y_col = randn(seed + 5, 1, t, C), randn(seed + 6, n, 1, C)
    return {"base": (x, y, mask),
            "masked row inserted": (insert(x, x_row), insert(y, y_row), insert(mask, row_false)),
            "masked position appended": (torch.cat([x, x_col], 1), torch.cat([y, y_col], 1),
                                         torch.cat([mask, col_false], 1))}


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("n_samples", [1, 4])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_masked_positions_consume_no_draws(likelihood, engine, n_samples, per):
    problem, params = _seq(likelihood)
    batches = _seq_batches(likelihood)
    groups = ffx.channels(params)
    options = {"n_samples": n_samples, "engine": engine, "per": per}
    base = batches.pop("base")
    want_diag = _mc(ffx.diag_fisher, problem, params, base, **options)
    want_group = _mc(ffx.group_fisher, problem, params, base, groups, **options)
    for name, batch in batches.items():
        got_diag = _mc(ffx.diag_fisher, problem, params, batch, **options)
        assert int(got_diag.count) == int(want_diag.count), name
        assert_tree_close(got_diag.value, want_diag.value, **SAME_MATH_F64)
        assert_tree_close(_mc(ffx.group_fisher, problem, params, batch, groups, **options).value, want_group.value,
                          **SAME_MATH_F64)
    assert_values_differ(_mc(ffx.diag_fisher, problem, params, base, seed=1, **options).value, want_diag.value)


PROBLEMS = {
    "gpt2": lambda: _lm("gpt2")[:2] + (_lm_batch(left=True, before=1),),
    "llama-gqa": lambda: _lm("llama-gqa")[:2] + (_lm_batch(after=1),),
    "categorical": lambda: _seq("categorical") + (_seq_batches("categorical")["ignored row inserted"],),
    "gaussian": lambda: _seq("gaussian") + (_seq_batches("gaussian")["masked row inserted"],),
}


@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("n_samples", [1, 4])
@pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
def test_mc_fisher_agrees_between_engines_and_chunk_sizes(problem_name, n_samples, per):
    """The noise is drawn once per call, so the same generator gives the same estimate whichever engine
    and however the generic engine cuts samples and draws (``chunk_size`` below ``S`` cuts a sample's draws).
    """
    problem, params, batch = PROBLEMS[problem_name]()
    options = {"n_samples": n_samples, "per": per}
    want = _mc(ffx.diag_fisher, problem, params, batch, engine="generic", chunk_size=None, **options)
    for engine, chunk_size in (("generic", 1), ("generic", 3), ("auto", None), ("auto", 1)):
        got = _mc(ffx.diag_fisher, problem, params, batch, engine=engine, chunk_size=chunk_size, **options)
        assert_tree_close(got.value, want.value, **SAME_MATH_F64)


# --- 2. memory bounded by chunk_size vectors for kind="exact" and per="token" -------------------

# Runs in a fresh interpreter: a small LLaMA (hidden 128, 2 layers, vocabulary 96, ~517k parameters,
# one gradient vector ~2 MiB in float32). The peak resident set size is reset before each call
# (Linux: /proc/self/clear_refs), so every number is the extra peak of that call alone. glibc is
# told to give large freed blocks back at once, so the resident size follows live memory.
MEMORY_CHILD = r"""
import gc, json, sys, time
import torch
import fisherfx as ffx
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def extra_peak(fn):
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    t0 = time.perf_counter()
    fn()
    return status("VmHWM") - base, time.perf_counter() - t0

torch.manual_seed(0)
config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
model = LlamaForCausalLM(config).eval()
problem, params = ffx.causal_lm(model), ffx.params_of(model)
n_params = sum(p.numel() for p in params.values())
vector = 4 * n_params
ids = torch.randint(1, 96, (2, 48), generator=torch.Generator().manual_seed(0))
token_batch = {"input_ids": ids}           # per="token": T = 47 vectors per sample
exact_batch = {"input_ids": ids[:1, :6]}   # kind="exact": T * C = 5 * 96 = 480 vectors per sample

def diag(batch, **options):
    return lambda: ffx.diag_fisher(problem, params, batch, engine="generic", **options)

def forward_backward():
    loss = model(**token_batch, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None

# warm-up: kernels, allocator, lazily built state
diag({"input_ids": ids[:1, :3]}, kind="exact", chunk_size=4)()
diag(token_batch, per="token", chunk_size=4)()
forward_backward()

out = {"n_params": n_params, "vector": vector, "token_t": 47, "exact_tc": 480, "times": {}}
out["calibration"] = extra_peak(lambda: torch.ones(50 * n_params))[0] / (50 * vector)
out["forward_backward"] = extra_peak(forward_backward)[0]
for name, fn in [("exact_4", diag(exact_batch, kind="exact", chunk_size=4)),
                 ("exact_16", diag(exact_batch, kind="exact", chunk_size=16)),
                 ("token_4", diag(token_batch, per="token", chunk_size=4)),
                 ("token_16", diag(token_batch, per="token", chunk_size=16)),
                 ("token_47", diag(token_batch, per="token", chunk_size=47))]:
    out[name], out["times"][name] = extra_peak(fn)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def memory() -> dict:
    if not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set size")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
           "TQDM_DISABLE": "1"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, env=env, cwd=root,
                          timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    sizes = ("forward_backward", "exact_4", "exact_16", "token_4", "token_16", "token_47")
    print(f"{result['n_params']} parameters, extra peak in vectors of {result['vector'] / 2**20:.2f} MiB:",
          {k: round(result[k] / result["vector"], 1) for k in sizes}, "seconds:", result["times"])
    return result


# Bound on a generic-engine call's extra peak: its chunk of vectors (held once, plus the square of one
# parameter's slice at a time in the reducer, plus slack for the one-hot cotangents and vmap's buffers),
# the model's own activations (one forward+backward of the batch, twice over) and a constant.
VECTOR_COPIES = 3
CONSTANT = 16 * 2**20


def _bound(memory: dict, chunk: int) -> float:
    return VECTOR_COPIES * chunk * memory["vector"] + 2 * memory["forward_backward"] + CONSTANT


def _in_vectors(memory: dict, key: str) -> str:
    return f"{key}: {memory[key] / memory['vector']:.1f} vectors ({memory[key] / 2**20:.1f} MiB)"


def test_memory_measurement_sees_an_allocation(memory):
    """The child's peak reading sees a tensor of 50 vectors as 50 vectors (the method works)."""
    assert 0.95 < memory["calibration"] < 1.1, memory


def test_exact_fisher_memory_is_bounded_by_chunk_size(memory):
    vector, all_vectors = memory["vector"], memory["exact_tc"] * memory["vector"]
    small, large = memory["exact_4"], memory["exact_16"]
    report = "; ".join(_in_vectors(memory, k) for k in ("exact_4", "exact_16", "forward_backward"))
    assert small < all_vectors / 10, report  # T·C = 480 vectors (0.9 GiB) were once held at once
    assert small < _bound(memory, 4), report
    assert large < _bound(memory, 16), report
    assert large - small < VECTOR_COPIES * 12 * vector, report  # 12 more vectors per call


def test_per_token_memory_is_bounded_by_chunk_size(memory):
    vector, all_vectors = memory["vector"], memory["token_t"] * memory["vector"]
    small, large, whole = memory["token_4"], memory["token_16"], memory["token_47"]
    report = "; ".join(_in_vectors(memory, k) for k in ("token_4", "token_16", "token_47", "forward_backward"))
    assert small < all_vectors / 2, report  # T = 47 vectors
    assert small < _bound(memory, 4), report
    assert large < _bound(memory, 16), report
    assert large - small < VECTOR_COPIES * 12 * vector, report
    assert whole - small < VECTOR_COPIES * 43 * vector, report


def test_one_chunk_of_vectors_at_a_time(memory):
    """12 more vectors per chunk cost about 12 vectors (measured: ~2 x 12 when a chunk's vectors outlived
    it, 1.0-1.2 x 12 since ``map_samples`` drops them before the next chunk's vjp)."""
    report = "; ".join(_in_vectors(memory, k) for k in ("exact_4", "exact_16", "token_4", "token_16"))
    for kind in ("exact", "token"):
        assert memory[f"{kind}_16"] - memory[f"{kind}_4"] < 1.5 * 12 * memory["vector"], report


# --- 3. chunking over positions changes nothing -------------------------------------------------

def _llama_batch(n: int, t: int, seed: int, lengths: list[int]) -> dict:
    """``n`` rows of ``t + 1`` tokens (``t`` positions after the causal shift), right-padded to
    ``lengths`` (row 0 full), one label ignored.
    """
    ids = randint(seed, VOCAB, n, t + 1)
    mask = (torch.arange(t + 1)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.clone()
    if t >= 2:
        labels[0, 1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@st.composite
def llama_shapes(draw) -> tuple[int, int, list[int]]:
    """``(N, T, lengths)`` with ``T`` positions; ``N = T``, ``N = T ± 1`` and ``N = 1`` often."""
    n = draw(st.integers(1, 4))
    t = max(1, min(5, n + draw(st.sampled_from([0, 0, -1, 1, 2]))))
    lengths = [t + 1] + [draw(st.integers(1, t + 1)) for _ in range(n - 1)]
    return n, t, lengths


@settings(max_examples=15, deadline=None)
@given(shape=llama_shapes(), chunk_size=st.integers(1, 7), kind=st.sampled_from(["empirical", "mc", "exact"]),
       per=st.sampled_from(PERS), normalize=st.sampled_from(["samples", "tokens", "none"]),
       n_samples=st.integers(1, 2), seed=seeds)
def test_generic_chunking_over_positions_changes_nothing(shape, chunk_size, kind, per, normalize, n_samples, seed):
    n, t, lengths = shape
    problem, params, _ = _lm("llama-gqa", seed % 7)
    batch = _llama_batch(n, t, seed, lengths)
    options = {"kind": kind, "per": per, "normalize": normalize, "n_samples": n_samples, "dtype": F64}

    def diag(**more):
        return ffx.diag_fisher(problem, params, batch, generator=generator(seed), **options, **more)

    want = diag(engine="generic", chunk_size=None)
    assert_tree_close(diag(engine="generic", chunk_size=chunk_size).value, want.value, **CHUNK_EQUAL)
    assert_tree_close(diag(engine="auto").value, want.value, **CHUNK_EQUAL)


# --- 4. a progress bar on long generic-engine calls ----------------------------------------------

def _token_call(fn=ffx.diag_fisher, *args, **options):
    problem, params, _ = _lm("llama-gqa")
    return fn(problem, params, _lm_batch(), *args, per="token", engine="generic", dtype=F64, **options)


@pytest.mark.parametrize("estimator", ["diag_fisher", "group_fisher"])
def test_long_call_shows_a_progress_bar(estimator, monkeypatch, capsys):
    monkeypatch.setattr(generic, "PROGRESS_DELAY", 0)
    if estimator == "diag_fisher":
        _token_call(chunk_size=2)
    else:
        _, params, model = _lm("llama-gqa")
        _token_call(ffx.group_fisher, ffx.channels(params, model), chunk_size=2)
    err = capsys.readouterr().err
    # the rows are cut to the longest (5 tokens): T = 4 positions per sample, one vector each
    assert f"{estimator} ({max(LENGTHS) - 1} vjps/sample)" in err, err


def test_fast_call_prints_nothing(capsys):
    assert generic.PROGRESS_DELAY > 0.5
    _token_call(chunk_size=2)
    _token_call()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == "", captured
