"""The table of tiny float64 test cases: a model, its problem, a batch, the parameters and reference losses.

Each :class:`Case` is built lazily and once (:func:`build`); tests must not modify what it returns.
Batch sizes differ between cases on purpose, models are in eval mode, and nothing is downloaded (the
HuggingFace models are built from small configs).
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import fisherfx as ffx
from fisherfx import testing

DTYPE = torch.float64
IGNORE = -100

# Tolerances for comparing an estimator with its dense reference.
FLOAT64_TOL = {"rtol": 1e-9, "atol": 1e-11}
"""float64 throughout: the two computations differ only in summation order (errors ~1e-14 of the
largest entry); 1e-9 leaves room for cancellation in ``θᵀFθ`` and still catches any formula error."""
FLOAT32_NORM_TOL = {"rtol": 1e-5, "atol": 1e-9}
"""LLaMA's RMSNorm computes in float32 even in a float64 model, so cotangents passing through it are
rounded to float32 (ε ≈ 1.2e-7); the exact Fisher pulls back different cotangents in the two
computations, which then agree to ~3e-7 relative. 1e-5 allows for cancellation in ``θᵀFθ``."""


class Built(NamedTuple):
    model: nn.Module
    problem: ffx.Problem
    batch: Any
    params: dict[str, Tensor]  # the parameters estimated (a subset for the language models)
    nlls: list[testing.SampleNLL]  # reference per-sample losses, computed independently of fisherfx


class Heads(NamedTuple):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    fused_qkv: bool  # GPT-2's c_attn: one Conv1D weight [in, 3 * out]


class Case(NamedTuple):
    name: str
    make: Callable[[], Built]
    heads: Heads | None = None  # attention models only
    family: str | None = None  # padded LMs: cases of one family hold the same sequences and model
    tol: dict = FLOAT64_TOL


def build(case: Case) -> Built:
    """The case's model, problem, batch, parameters and reference losses (built once, seeded)."""
    return _build(case.name)


@functools.cache
def _build(name: str) -> Built:
    case = BY_NAME[name]
    with torch.random.fork_rng():
        torch.manual_seed(sum(map(ord, case.family or case.name)))  # one model per family
        return case.make()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _supervised(model: nn.Module, likelihood: Any, inputs: Any, targets: Tensor) -> Built:
    model = model.to(DTYPE).eval()
    return Built(model, ffx.supervised(model, likelihood), (inputs, targets), ffx.params_of(model),
                 testing.supervised_nlls(model, likelihood, inputs, targets))


def _mlp(n_in: int, n_hidden: int, n_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out))


# --- supervised models --------------------------------------------------------------------------

def mlp_categorical() -> Built:
    g = _gen(1)
    x = torch.randn(5, 4, generator=g, dtype=DTYPE)
    return _supervised(_mlp(4, 6, 3), ffx.Categorical(), x, torch.randint(0, 3, (5,), generator=g))


def mlp_gaussian() -> Built:
    g = _gen(2)
    x, y = torch.randn(4, 3, generator=g, dtype=DTYPE), torch.randn(4, 2, generator=g, dtype=DTYPE)
    return _supervised(_mlp(3, 5, 2), ffx.Gaussian(sigma=0.7), x, y)


def mlp_bernoulli() -> Built:
    g = _gen(3)
    x = torch.randn(3, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 2, (3, 3), generator=g).to(DTYPE)  # multi-label: 3 independent labels
    return _supervised(_mlp(4, 5, 3), ffx.Bernoulli(), x, y)


def cnn_conv1d() -> Built:
    g = _gen(4)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 3))
    x = torch.randn(4, 2, 5, generator=g, dtype=DTYPE)
    return _supervised(model, ffx.Categorical(), x, torch.randint(0, 3, (4,), generator=g))


def cnn_conv2d() -> Built:
    g = _gen(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    x = torch.randn(3, 2, 5, 5, generator=g, dtype=DTYPE)
    return _supervised(model, ffx.Gaussian(sigma=1.5), x, torch.randn(3, 2, generator=g, dtype=DTYPE))


class Transposed(nn.Module):
    """``[N, T, C]`` outputs as the ``[N, C, T]`` that ``nn.CrossEntropyLoss`` reads over sequences (for peers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).transpose(1, 2)


class Tagger(nn.Module):
    """Embedding → LayerNorm → Linear per position: logits ``[N, T, C]``."""

    def __init__(self, vocab: int = 11, width: int = 6, classes: int = 4):
        super().__init__()
        self.embed, self.norm, self.head = nn.Embedding(vocab, width), nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.embed(ids))))


def embed_layernorm_tokens() -> Built:
    g = _gen(6)
    ids = torch.randint(0, 11, (4, 5), generator=g)
    targets = torch.randint(0, 4, (4, 5), generator=g)
    targets[0, 1] = targets[2, 0] = targets[2, 4] = IGNORE
    targets[3, 1:] = IGNORE  # a row with one active position
    model = Tagger()
    with torch.no_grad():  # LayerNorm starts at weight 1, bias 0: move it off that special point
        model.norm.weight.add_(0.3 * torch.randn(6, generator=g))
        model.norm.bias.add_(0.3 * torch.randn(6, generator=g))
    return _supervised(model, ffx.Categorical(), ids, targets)


class TwoInputs(nn.Module):
    """Takes keyword inputs ``x`` and ``z`` (the batch inputs are a dict)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(x) + self.b(z)))


def dict_input() -> Built:
    g = _gen(7)
    inputs = {"x": torch.randn(3, 3, generator=g, dtype=DTYPE), "z": torch.randn(3, 2, generator=g, dtype=DTYPE)}
    return _supervised(TwoInputs(), ffx.Categorical(), inputs, torch.randint(0, 3, (3,), generator=g))


class Tied(nn.Module):
    """Encoder and decoder share one weight Parameter (``dec.weight is enc.weight``)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.dec(torch.tanh(self.enc(x)))


def tied_weights() -> Built:
    g = _gen(8)
    x, y = torch.randn(6, 4, generator=g, dtype=DTYPE), torch.randn(6, 4, generator=g, dtype=DTYPE)
    return _supervised(Tied(), ffx.Gaussian(sigma=1.0), x, y)


class Twice(nn.Module):
    """One block applied twice, then a scalar logit ``[N]``."""

    def __init__(self):
        super().__init__()
        self.block, self.head = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.block(x))
        return self.head(torch.tanh(self.block(h)))[:, 0]


def module_twice() -> Built:
    g = _gen(9)
    x = torch.randn(4, 3, generator=g, dtype=DTYPE)
    return _supervised(Twice(), ffx.Bernoulli(), x, torch.randint(0, 2, (4,), generator=g).to(DTYPE))


# --- padded causal language models --------------------------------------------------------------

VOCAB = 40
LENGTHS = (5, 3, 4)  # tokens per row; the batch is padded to 5


def _padded_batch(padding: str, seed: int) -> dict[str, Tensor]:
    """Rows of LENGTHS random tokens, padded left or right; padded labels hold real token ids (the
    attention mask alone must make them inactive), and two real labels are ``-100``.
    """
    g = _gen(seed)
    width = max(LENGTHS)
    ids = torch.randint(0, VOCAB, (len(LENGTHS), width), generator=g)
    labels = ids.clone()
    labels[0, 2] = labels[2, 3] = IGNORE
    mask = torch.zeros_like(ids)
    for n, length in enumerate(LENGTHS):
        mask[n, :length] = 1
    garbage = torch.randint(0, VOCAB, ids.shape, generator=g)
    ids, labels = torch.where(mask.bool(), ids, 0), torch.where(mask.bool(), labels, garbage)
    if padding == "left":  # same tokens, moved to the end of each row
        shift = [width - length for length in LENGTHS]
        ids, labels, mask = (torch.stack([r.roll(s) for r, s in zip(x, shift)]) for x in (ids, labels, mask))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _causal_lm(model: nn.Module, padding: str, names: tuple[str, ...]) -> Built:
    model = model.to(DTYPE).eval()
    with torch.no_grad():  # biases start at 0 and norm weights at 1: move them off these special points
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    batch = _padded_batch(padding, seed=10)
    all_params = ffx.params_of(model)
    params = {k: all_params[k] for k in names}  # a subset keeps the dense references small
    return Built(model, ffx.causal_lm(model), batch, params, testing.causal_lm_nlls(model, batch))


GPT2_HEADS = Heads(num_heads=4, num_kv_heads=4, head_dim=4, fused_qkv=True)
LLAMA_HEADS = Heads(num_heads=4, num_kv_heads=2, head_dim=4, fused_qkv=False)


def gpt2(padding: str) -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=16, n_layer=2, n_head=GPT2_HEADS.num_heads,
                        n_inner=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    names = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
             "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight",
             "transformer.h.1.attn.c_attn.bias", "transformer.h.1.attn.c_proj.weight",
             "transformer.h.1.attn.c_proj.bias")
    return _causal_lm(model, padding, names)


def llama(padding: str) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=LLAMA_HEADS.num_heads, num_key_value_heads=LLAMA_HEADS.num_kv_heads,
                         max_position_embeddings=8, initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                         attn_implementation="eager")
    model = LlamaForCausalLM(config)
    names = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.post_attention_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight",
             "model.layers.1.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight")
    return _causal_lm(model, padding, names)


CASES = [
    Case("mlp-categorical", mlp_categorical),
    Case("mlp-gaussian", mlp_gaussian),
    Case("mlp-bernoulli", mlp_bernoulli),
    Case("cnn-conv1d", cnn_conv1d),
    Case("cnn-conv2d", cnn_conv2d),
    Case("embed-layernorm-tokens", embed_layernorm_tokens),
    Case("dict-input", dict_input),
    Case("tied-weights", tied_weights),
    Case("module-twice", module_twice),
    Case("gpt2-right-pad", functools.partial(gpt2, "right"), GPT2_HEADS, "gpt2"),
    Case("gpt2-left-pad", functools.partial(gpt2, "left"), GPT2_HEADS, "gpt2"),
    Case("llama-right-pad", functools.partial(llama, "right"), LLAMA_HEADS, "llama", FLOAT32_NORM_TOL),
    Case("llama-left-pad", functools.partial(llama, "left"), LLAMA_HEADS, "llama", FLOAT32_NORM_TOL),
]
LM_CASES = [c for c in CASES if c.family is not None]
BY_NAME = {c.name: c for c in CASES}


def case_id(case: Case) -> str:
    return case.name
