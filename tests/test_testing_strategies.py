"""The public Hypothesis strategies of ``fisherfx.testing``: what they draw; importing needs no hypothesis."""

import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisherfx as ffx
from fisherfx import testing
from fisherfx.testing import SAME_MATH_F64, SeqModel, build, seq_batch, seq_specs


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 4), t=st.integers(1, 4), min_per_row=st.sampled_from([0, 1]), data=st.data())
def test_masks_have_an_active_position_and_the_asked_rows(n, t, min_per_row, data):
    mask = data.draw(testing.masks(n, t, min_per_row))
    assert mask.shape == (n, t) and mask.dtype == torch.bool and mask.any()
    if min_per_row:
        assert mask.any(-1).all()


@settings(max_examples=20, deadline=None)
@given(spec=seq_specs(max_n=3, max_t=4, min_n=2))
def test_seq_batch_masks_the_targets(spec):
    x, y = seq_batch(spec)
    assert x.shape == (spec.n, spec.t, 3) and 2 <= spec.n <= 3
    assert torch.equal(y != -100, spec.mask)


@settings(max_examples=20, deadline=None)
@given(batch=testing.lm_batches(max_n=3, max_t=5, labels=True))
def test_lm_batches_pad_and_keep_an_active_position(batch):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    assert ids.shape == mask.shape == labels.shape and int(ids.max()) < testing.VOCAB
    assert ((labels != -100) <= mask).all()  # no label on padding
    lengths, t = mask.sum(-1).tolist(), ids.shape[1]
    left, right = testing.spans(lengths, t, left=True), testing.spans(lengths, t)
    assert torch.equal(mask, left) or torch.equal(mask, right)
    problem = ffx.causal_lm(build(testing.tiny_gpt2, 0))
    assert int(problem.prepare(batch).active.sum()) >= 1


@settings(max_examples=10, deadline=None)
@given(tl=testing.padded_lengths(max_n=3, max_t=4), cuts=testing.splits(5))
def test_padded_lengths_and_splits(tl, cuts):
    t, lengths = tl
    assert 1 <= len(lengths) <= 3 and max(lengths) >= 2 and all(1 <= n <= t for n in lengths)
    assert cuts[0] == 0 and cuts[-1] == 5 and cuts == sorted(set(cuts))


@settings(max_examples=6, deadline=None)
@given(model=testing.models(), seed=testing.seeds)
def test_models_are_built_in_float64_eval_mode(model, seed):
    assert not model.training and all(p.dtype == torch.float64 for p in model.parameters())
    width = 3 if isinstance(model, SeqModel) else 4
    x = testing.randn(seed, 2, 3, width)
    assert model(x).shape[:2] == (2, 3)


def test_build_is_reproducible_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build(SeqModel, 3), build(SeqModel, 3)
    assert torch.equal(torch.random.get_rng_state(), state)
    testing.assert_tree_close(ffx.params_of(a), ffx.params_of(b), **testing.BITWISE)


# the example of the module's docstring, as a user would write it
@settings(max_examples=10, deadline=None)
@given(spec=testing.seq_specs(max_n=4, max_t=5, min_per_row=1), seed=testing.seeds)
def test_fisher_is_the_mean_of_single_sample_fishers(spec, seed):
    model = testing.build(testing.SeqModel, seed)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    x, y = testing.seq_batch(spec)
    whole = ffx.diag_fisher(problem, params, (x, y), dtype=torch.float64)
    parts = [ffx.diag_fisher(problem, params, (x[i : i + 1], y[i : i + 1]), dtype=torch.float64)
             for i in range(spec.n)]
    testing.assert_tree_close(whole.value, ffx.combine(parts).value, **SAME_MATH_F64)


def test_import_needs_no_hypothesis():
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import fisherfx.testing as t, fisherfx.testing_strategies as s\n"
            "assert t.build(t.SeqModel, 0) is not None\n"
            "try:\n    t.seeds\nexcept ImportError as e:\n    assert 'pip install hypothesis' in str(e)\n"
            "else:\n    raise AssertionError('seeds without hypothesis')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
