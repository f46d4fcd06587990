"""Hypothesis strategies, tiny seeded models and seeded batches, for property tests of Fisher code.

These are the helpers fisherfx's own property tests are written with, public so that you can
property-test code built on fisherfx (a custom problem, a new group spec, a pipeline that combines
estimates) the same way. Everything is also importable from :mod:`fisherfx.testing`.

Design:

* Strategies draw **sizes, seeds, masks and option names only**. Every float tensor is built from a
  seeded ``torch.Generator`` (:func:`randn`, :func:`randint`), never drawn element by element, so
  examples shrink fast and values stay finite.
* Models are built by :func:`build` under a forked global RNG seeded from a drawn seed, so a test's
  own RNG is left untouched and a failing example replays exactly.
* Hypothesis is imported only when a strategy is called: ``import fisherfx.testing`` works without
  it (``pip install hypothesis`` to use the strategies). ``seeds`` (a strategy of integer seeds in
  ``[0, 2**31 - 1]``) is an attribute created on first access.

Strategies: ``seeds``, :func:`masks`, :func:`seq_specs`, :func:`padded_lengths`, :func:`lm_batches`,
:func:`splits`, :func:`models`. Seeded values: :func:`generator`, :func:`randn`, :func:`randint`,
:func:`spans`, :func:`seq_batch`. Models: :func:`build`, :class:`SeqModel`, :class:`AttentionNet`,
:func:`tiny_gpt2`, :func:`tiny_llama` (the last two need ``transformers``). Tolerances:
``SAME_MATH_F64``, ``SAME_MATH_F32``, ``BITWISE`` (keyword arguments of ``assert_tree_close``).

Example:
    A property of your own code, over drawn batch shapes and padding masks::

        import torch
        from hypothesis import given, settings
        import fisherfx as ffx
        from fisherfx import testing

        @settings(max_examples=20, deadline=None)
        @given(spec=testing.seq_specs(max_n=4, max_t=5, min_per_row=1), seed=testing.seeds)
        def test_fisher_is_the_mean_of_single_sample_fishers(spec, seed):
            model = testing.build(testing.SeqModel, seed)
            problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
            x, y = testing.seq_batch(spec)
            whole = ffx.diag_fisher(problem, params, (x, y), dtype=torch.float64)
            parts = [ffx.diag_fisher(problem, params, (x[i : i + 1], y[i : i + 1]), dtype=torch.float64)
                     for i in range(spec.n)]
            testing.assert_tree_close(whole.value, ffx.combine(parts).value, **testing.SAME_MATH_F64)

"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

# --- tolerances ---------------------------------------------------------------------------------

#: float64 end to end, the same maths in a different summation order (batch splits, chunks,
#: permutations, extra zero rows): only the rounding of a few dozen additions separates two sides.
SAME_MATH_F64 = {"rtol": 1e-10, "atol": 1e-13}
#: float32 end to end, the same maths in a different order.
SAME_MATH_F32 = {"rtol": 1e-5, "atol": 1e-7}
#: Identical computation on identical inputs: bit for bit.
BITWISE = {"rtol": 0.0, "atol": 0.0}

#: Vocabulary size of :func:`tiny_gpt2` and :func:`tiny_llama`.
VOCAB = 11

_SEED_MAX = 2**31 - 1


def _st() -> Any:
    """``hypothesis.strategies``, imported on first use."""
    try:
        from hypothesis import strategies
    except ImportError as error:  # pragma: no cover - exercised only without hypothesis
        raise ImportError("fisherfx's Hypothesis strategies need hypothesis: pip install hypothesis") from error
    return strategies


def __getattr__(name: str) -> Any:
    if name == "seeds":  # a module attribute, created on first access so hypothesis stays optional
        return _st().integers(min_value=0, max_value=_SEED_MAX)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- seeded tensors -----------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``scale · N(0, 1)`` of ``shape``, drawn in float64 from ``generator(seed)``, then cast to ``dtype``.

    Example:
        >>> randn(0, 2, 3).shape
        torch.Size([2, 3])

    """
    return (scale * torch.randn(shape, generator=generator(seed), dtype=torch.float64)).to(dtype)


def randint(seed: int, high: int, *shape: int) -> Tensor:
    """Integers in ``[0, high)`` of ``shape`` (int64) from ``generator(seed)``: class targets, token ids."""
    return torch.randint(0, high, shape, generator=generator(seed))


def spans(lengths: Sequence[int], t: int, left: bool = False) -> Tensor:
    """Attention masks ``[len(lengths), t]`` (bool): ``lengths[n]`` ones, right- (or left-) aligned.

    Example:
        >>> spans([1, 3], 3).int().tolist(), spans([1, 3], 3, left=True).int().tolist()
        ([[1, 0, 0], [1, 1, 1]], [[0, 0, 1], [1, 1, 1]])

    """
    pos = torch.arange(t)
    lengths_ = torch.tensor(list(lengths))[:, None]
    return (pos >= t - lengths_) if left else (pos < lengths_)


# --- masks, sequence batches --------------------------------------------------------------------

def masks(n: int, t: int, min_per_row: int = 0) -> Any:
    """Strategy: a bool mask ``[n, t]`` with at least one True overall and ``min_per_row`` (0 or 1) per row.

    Any pattern of active positions, including fully masked rows (unless ``min_per_row=1``) and
    holes inside a row, as ``-100`` labels produce.
    """
    st = _st()

    @st.composite
    def draw_mask(draw: Callable) -> Tensor:
        rows = [draw(st.lists(st.booleans(), min_size=t, max_size=t)) for _ in range(n)]
        for row in rows:
            if min_per_row and not any(row):
                row[draw(st.integers(0, t - 1))] = True
        if not any(any(row) for row in rows):
            rows[draw(st.integers(0, n - 1))][draw(st.integers(0, t - 1))] = True
        return torch.tensor(rows, dtype=torch.bool)

    return draw_mask()


class SeqSpec(NamedTuple):
    """A drawn sequence batch: sizes ``n`` (samples) and ``t`` (positions), a seed for its tensors and the mask.

    Attributes:
        n: number of samples.
        t: positions per sample.
        seed: seed of the batch's tensors (see :func:`seq_batch`).
        mask: ``[n, t]`` bool, the active positions.

    """

    n: int
    t: int
    seed: int
    mask: Tensor


def seq_specs(max_n: int = 4, max_t: int = 4, min_n: int = 1, min_per_row: int = 0) -> Any:
    """Strategy: a :class:`SeqSpec` with ``n`` in ``[min_n, max_n]``, ``t`` in ``[1, max_t]`` and a drawn mask.

    Turn it into tensors with :func:`seq_batch` (inputs and ``-100``-masked targets).
    """
    st = _st()

    @st.composite
    def draw_spec(draw: Callable) -> SeqSpec:
        n = draw(st.integers(min_n, max_n))
        t = draw(st.integers(1, max_t))
        return SeqSpec(n, t, draw(st.integers(0, _SEED_MAX)), draw(masks(n, t, min_per_row)))

    return draw_spec()


def seq_batch(spec: SeqSpec, d: int = 3, c: int = 4, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, t, d]`` and class targets ``[n, t]`` with ``-100`` where ``spec.mask`` is False.

    A batch for ``ffx.supervised(model, ffx.Categorical())`` with a ``[N, T, D] -> [N, T, C]``
    model such as :class:`SeqModel`.
    """
    x = randn(spec.seed, spec.n, spec.t, d, dtype=dtype)
    y = randint(spec.seed + 1, c, spec.n, spec.t)
    return x, torch.where(spec.mask, y, torch.full_like(y, -100))


def padded_lengths(max_n: int = 3, max_t: int = 5) -> Any:
    """Strategy: ``(t, lengths)``, a sequence width ``t ≥ 2`` and per-row token counts in ``[1, t]``.

    At least one row has two tokens, so a causal LM batch built from it has an active position
    (see :func:`spans` for the attention masks and :func:`lm_batches` for whole batches).
    """
    st = _st()

    @st.composite
    def draw_lengths(draw: Callable) -> tuple[int, list[int]]:
        t = draw(st.integers(2, max_t))
        lengths = draw(st.lists(st.integers(1, t), min_size=1, max_size=max_n))
        if max(lengths) < 2:
            lengths[draw(st.integers(0, len(lengths) - 1))] = draw(st.integers(2, t))
        return t, lengths

    return draw_lengths()


def lm_batches(max_n: int = 3, max_t: int = 5, vocab: int = VOCAB, padding: str | None = None,
               labels: bool = False) -> Any:
    """Strategy: a causal-LM batch ``{"input_ids", "attention_mask"[, "labels"]}`` with drawn padding.

    Padded positions hold arbitrary token ids, as real padding may; a property that should not
    depend on them can compare against the same rows unpadded. At least one position is active
    after the causal shift.

    Args:
        max_n: most rows.
        max_t: widest row (at least 2).
        vocab: token ids are drawn in ``[0, vocab)`` (from a drawn seed).
        padding: ``"right"``, ``"left"``, or ``None`` to draw either.
        labels: also draw ``"labels"``: the ids with ``-100`` at padding and at some drawn positions.

    """
    st = _st()

    @st.composite
    def draw_batch(draw: Callable) -> dict[str, Tensor]:
        t, lengths = draw(padded_lengths(max_n, max_t))
        side = padding or draw(st.sampled_from(["right", "left"]))
        seed = draw(st.integers(0, _SEED_MAX))
        mask = spans(lengths, t, left=side == "left")
        batch = {"input_ids": randint(seed, vocab, len(lengths), t), "attention_mask": mask.long()}
        if labels:
            keep = mask & draw(masks(len(lengths), t))
            row = max(range(len(lengths)), key=lambda r: lengths[r])  # one active position after the shift
            keep[row, t - 1 if side == "left" else lengths[row] - 1] = True
            batch["labels"] = torch.where(keep, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
        return batch

    return draw_batch()


def splits(n: int) -> Any:
    """Strategy: sorted cut points ``[0, c_1, ..., n]`` of a batch of ``n`` samples into contiguous parts.

    Example:
        ``parts = [batch[a:b] for a, b in zip(cuts, cuts[1:])]`` for ``cuts`` drawn from ``splits(n)``.

    """
    st = _st()

    @st.composite
    def draw_cuts(draw: Callable) -> list[int]:
        cuts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
        return [0, *sorted(cuts)] + [n]

    return draw_cuts()


# --- tiny models --------------------------------------------------------------------------------

def build(factory: Callable[[], nn.Module], seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``factory()`` initialised from ``seed`` (global RNG forked and restored), cast to ``dtype``, in eval mode.

    Example:
        >>> model = build(SeqModel, seed=0)
        >>> next(model.parameters()).dtype
        torch.float64

    """
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


def tiny_gpt2(n_embd: int = 8, n_head: int = 2, n_positions: int = 8) -> nn.Module:
    """A one-layer HuggingFace GPT-2 (``GPT2LMHeadModel``) with a vocabulary of ``VOCAB``; needs transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=1, n_head=n_head,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config)


def tiny_llama(hidden: int = 8, num_heads: int = 4, num_kv_heads: int = 2) -> nn.Module:
    """A one-layer HuggingFace LLaMA with grouped-query attention and a vocabulary of ``VOCAB``; needs transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    return LlamaForCausalLM(config)


_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "seq": SeqModel, "attention": AttentionNet, "gpt2": tiny_gpt2, "llama": tiny_llama,
}


def models(kinds: Sequence[str] = ("seq", "attention"), dtype: torch.dtype = torch.float64) -> Any:
    """Strategy: a tiny model, built by :func:`build` from a drawn kind and seed.

    Args:
        kinds: drawn among ``"seq"`` (:class:`SeqModel`, inputs ``[N, T, 3]``, 4 classes),
            ``"attention"`` (:class:`AttentionNet`, inputs ``[N, T, 4]``, 3 classes), ``"gpt2"`` and
            ``"llama"`` (causal LMs over ``VOCAB`` tokens; need transformers).
        dtype: the parameters' dtype.

    """
    st = _st()
    unknown = [k for k in kinds if k not in _FACTORIES]
    if unknown or not kinds:
        raise ValueError(f"models: kinds must be among {sorted(_FACTORIES)}, got {list(kinds)}")

    @st.composite
    def draw_model(draw: Callable) -> nn.Module:
        kind = draw(st.sampled_from(list(kinds)))
        return build(_FACTORIES[kind], draw(st.integers(0, _SEED_MAX)), dtype)

    return draw_model()


__all__ = ["BITWISE", "SAME_MATH_F32", "SAME_MATH_F64", "VOCAB", "AttentionNet", "SeqModel", "SeqSpec",
           "TinyAttention", "build", "generator", "lm_batches", "masks", "models", "padded_lengths", "randint",
           "randn", "seq_batch", "seq_specs", "spans", "splits", "tiny_gpt2", "tiny_llama"]
