"""Hypothesis strategies, tiny seeded models and assertion helpers for the property tests.

The strategies, seeded tensors, tiny models and tolerances are fisherfx's public ones
(:mod:`fisherfx.testing_strategies`, also importable from :mod:`fisherfx.testing`); this module
re-exports them under the names the suite uses and adds a few assertion helpers.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from fisherfx.testing import assert_tree_close
from fisherfx.testing_strategies import (  # noqa: F401  (re-exported for the suite)
    BITWISE,
    SAME_MATH_F32,
    SAME_MATH_F64,
    VOCAB,
    AttentionNet,
    SeqModel,
    SeqSpec,
    TinyAttention,
    build,
    generator,
    lm_batches,
    masks,
    models,
    padded_lengths,
    randint,
    randn,
    seeds,
    seq_batch,
    seq_specs,
    spans,
    splits,
    tiny_gpt2,
    tiny_llama,
)

# --- assertions ---------------------------------------------------------------------------------

# ``assert_close`` per key (dtype and device included), naming every failing key: the public helper.
assert_values_close = assert_tree_close


def assert_values_differ(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    """At least one entry differs (guards against results that ignore their input)."""
    assert any(not torch.equal(a[k], b[k]) for k in a), "results are identical"


def total(values: Mapping[str, Tensor]) -> float:
    return float(sum(v.double().sum() for v in values.values()))
