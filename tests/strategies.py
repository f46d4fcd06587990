"""Hypothesis strategies, tiny seeded models and assertion helpers for the property tests.

Strategies draw sizes, seeds, masks and option names only. Every float tensor is built from a
seeded ``torch.Generator`` (never drawn as an array), so examples shrink fast and values stay
finite. Models are built under a forked global RNG seeded from a drawn seed, so the test run's
own RNG is untouched.
"""

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from fisherfx.testing import assert_tree_close

# --- tolerances ---------------------------------------------------------------------------------

# float64 end to end, the same maths in a different summation order (batch splits, chunks,
# permutations, extra zero rows): only rounding of a few dozen additions separates the two sides.
SAME_MATH_F64 = {"rtol": 1e-10, "atol": 1e-13}
# float32 end to end, the same maths in a different order.
SAME_MATH_F32 = {"rtol": 1e-5, "atol": 1e-7}
# Identical computation on identical inputs: bit for bit.
BITWISE = {"rtol": 0.0, "atol": 0.0}

# --- seeds and tensors --------------------------------------------------------------------------

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    return (scale * torch.randn(shape, generator=generator(seed), dtype=torch.float64)).to(dtype)


def randint(seed: int, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=generator(seed))


# --- masks --------------------------------------------------------------------------------------

@st.composite
def masks(draw, n: int, t: int, min_per_row: int = 0) -> Tensor:
    """A bool mask ``[n, t]`` with at least one True overall and ``min_per_row`` (0 or 1) per row."""
    rows = [draw(st.lists(st.booleans(), min_size=t, max_size=t)) for _ in range(n)]
    for row in rows:
        if min_per_row and not any(row):
            row[draw(st.integers(0, t - 1))] = True
    if not any(any(row) for row in rows):
        rows[draw(st.integers(0, n - 1))][draw(st.integers(0, t - 1))] = True
    return torch.tensor(rows, dtype=torch.bool)


def spans(lengths: list[int], t: int, left: bool = False) -> Tensor:
    """Attention masks ``[len(lengths), t]``: ``lengths[n]`` ones, right- (or left-) aligned."""
    pos = torch.arange(t)
    lengths_ = torch.tensor(lengths)[:, None]
    return (pos >= t - lengths_) if left else (pos < lengths_)


class SeqSpec(NamedTuple):
    """A drawn sequence batch: sizes, a seed for its tensors and the active mask."""

    n: int
    t: int
    seed: int
    mask: Tensor  # [n, t] bool


@st.composite
def seq_specs(draw, max_n: int = 4, max_t: int = 4, min_n: int = 1, min_per_row: int = 0) -> SeqSpec:
    n = draw(st.integers(min_n, max_n))
    t = draw(st.integers(1, max_t))
    return SeqSpec(n, t, draw(seeds), draw(masks(n, t, min_per_row)))


# --- tiny models --------------------------------------------------------------------------------

def build(factory: Callable[[], nn.Module], seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``factory()`` initialised from ``seed`` (global RNG forked and restored), cast, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    return model.to(dtype).eval()


class SeqModel(nn.Module):
    """``[N, T, D] -> [N, T, C]``; a running sum over positions makes per-sample and per-token differ."""

    def __init__(self, d: int = 3, c: int = 4, hidden: int = 5):
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.out = nn.Linear(hidden, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x)).cumsum(-2))


class TinyAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``."""

    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.h = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # [N, T, D]
        n, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.reshape(n, t, self.h, d // self.h).transpose(1, 2)  # [N, h, T, d/h]

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(n, t, d))


class AttentionNet(nn.Module):
    """``[N, T, D] -> [N, T, C]``: one attention block (parameters ``attn.*_proj.*``) and a head."""

    def __init__(self, d: int = 4, num_heads: int = 2, c: int = 3):
        super().__init__()
        self.attn = TinyAttention(d, num_heads)
        self.head = nn.Linear(d, c)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x + self.attn(x))


VOCAB = 11


def tiny_gpt2(n_embd: int = 8, n_head: int = 2, n_positions: int = 8) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=1, n_head=n_head,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


def tiny_llama(hidden: int = 8, num_heads: int = 4, num_kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


def seq_batch(spec: SeqSpec, d: int = 3, c: int = 4, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, t, d]`` and class targets ``[n, t]`` with -100 where ``spec.mask`` is False."""
    x = randn(spec.seed, spec.n, spec.t, d, dtype=dtype)
    y = randint(spec.seed + 1, c, spec.n, spec.t)
    return x, torch.where(spec.mask, y, torch.full_like(y, -100))


# --- assertions ---------------------------------------------------------------------------------

# ``assert_close`` per key (dtype and device included), naming every failing key: the public helper.
assert_values_close = assert_tree_close


def assert_values_differ(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    """At least one entry differs (guards against results that ignore their input)."""
    assert any(not torch.equal(a[k], b[k]) for k in a), "results are identical"


def total(values: Mapping[str, Tensor]) -> float:
    return float(sum(v.double().sum() for v in values.values()))
