"""Invariants of the estimators, groups and state, over drawn shapes, batch sizes, masks and seeds.

Everything runs in float64 unless the property is about dtypes, so the two sides of each
equality differ only by summation order (see the tolerances in ``strategies``).
"""

import math

import einops
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fisherfx as ffx
from fisherfx.testing import assert_tree_close
from tests.strategies import (
    BITWISE,
    SAME_MATH_F32,
    SAME_MATH_F64,
    VOCAB,
    AttentionNet,
    SeqModel,
    SeqSpec,
    assert_values_differ,
    build,
    generator,
    randint,
    randn,
    seeds,
    seq_batch,
    seq_specs,
    spans,
    tiny_gpt2,
    tiny_llama,
    total,
)

KINDS = ("empirical", "mc", "exact")
PERS = ("sample", "token")
ENGINES = ("auto", "generic")  # auto: the tap engine for every layer these models have
F64 = torch.float64
D, C = 3, 4  # input features and outputs per position of the sequence model

# A bf16 model's gradients carry ~3 significant digits; squared and summed over a tiny batch the
# diagonal stays within a few per cent of the float32 model's (relative error of the whole vector).
BF16_REL = 0.1


def seq_problem(seed: int, likelihood=None, dtype: torch.dtype = F64):
    model = build(lambda: SeqModel(D, C), seed, dtype)
    likelihood = ffx.Categorical() if likelihood is None else likelihood  # Bernoulli() is an empty tuple: falsy
    return ffx.supervised(model, likelihood), ffx.params_of(model)


LIKELIHOODS = {"categorical": ffx.Categorical(), "gaussian": ffx.Gaussian(sigma=0.7), "bernoulli": ffx.Bernoulli()}


def likelihood_batch(name: str, spec: SeqSpec) -> tuple:
    """A batch for ``LIKELIHOODS[name]``: ``-100`` targets (categorical) or an explicit mask."""
    if name == "categorical":
        return seq_batch(spec, D, C)
    x = randn(spec.seed, spec.n, spec.t, D)
    y = randn(spec.seed + 1, spec.n, spec.t, C)
    return x, (y if name == "gaussian" else (y > 0).to(F64)), spec.mask


def rows(batch: tuple, index) -> tuple:
    return tuple(b[index] for b in batch)


# --- diagonal ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=4)
@given(spec=seq_specs(), likelihood=st.sampled_from(sorted(LIKELIHOODS)))
def test_diagonal_is_nonnegative(kind, per, engine, spec, likelihood):
    problem, params = seq_problem(spec.seed, LIKELIHOODS[likelihood])
    est = ffx.diag_fisher(problem, params, likelihood_batch(likelihood, spec), kind=kind, per=per, n_samples=2,
                          generator=generator(spec.seed), dtype=F64, engine=engine)
    for name, value in est.value.items():
        assert value.shape == params[name].shape, name
        assert bool((value >= 0).all()), f"{name}: negative diagonal entries {value[value < 0]}"
    assert total(est.value) > 0  # at least one active position: not all zero


# --- groups -----------------------------------------------------------------------------------------

# Group sums written with plain reshapes, independent of einops: pattern -> f(x, sizes).
MANUAL = {
    "o ... -> o": lambda x, s: x.reshape(x.shape[0], -1).sum(1),
    "o i ... -> i": lambda x, s: x.transpose(0, 1).reshape(x.shape[1], -1).sum(1),
    "... -> ": lambda x, s: x.sum(),
    "(h d) i -> h": lambda x, s: x.reshape(s["h"], -1).sum(1),
    "(h d) -> h": lambda x, s: x.reshape(s["h"], -1).sum(1),
    "o (h d) -> h": lambda x, s: x.reshape(x.shape[0], s["h"], -1).sum((0, 2)),
    "(g r) i -> g": lambda x, s: x.reshape(s["g"], -1).sum(1),
    "o i -> i o": lambda x, s: x.T,
    "o (h d) -> h o": lambda x, s: x.reshape(x.shape[0], s["h"], -1).sum(2).T,
}
SPECS = ("channels", "inputs", "whole", "heads", "custom")


def group_spec(kind: str, params, num_heads: int) -> dict:
    if kind == "channels":
        return ffx.channels(params)
    if kind == "inputs":
        return ffx.inputs(params)
    if kind == "whole":
        return ffx.whole(params)
    if kind == "heads":
        return ffx.heads(params, num_heads=num_heads)
    return {"attn.q_proj.weight": ffx.Group("(g r) i -> g", {"g": num_heads}),
            "head.weight": "o i -> i o",
            "attn.o_proj.weight": ffx.Group("o (h d) -> h o", {"h": num_heads})}


attention_sizes = st.tuples(st.integers(1, 3), st.integers(1, 2))  # heads, head dim


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("spec_kind", SPECS)
@settings(max_examples=5)
@given(sizes=attention_sizes, spec=seq_specs(max_n=3, max_t=3), kind=st.sampled_from(KINDS))
def test_group_sums_equal_diagonal_sums(spec_kind, engine, sizes, spec, kind):
    h, dh = sizes
    model = build(lambda: AttentionNet(h * dh, h, C), spec.seed)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    x = randn(spec.seed, spec.n, spec.t, h * dh)
    y = torch.where(spec.mask, randint(spec.seed, C, spec.n, spec.t), -100)
    groups = group_spec(spec_kind, params, h)
    options = {"kind": kind, "dtype": F64}
    # the reference diagonal always from the generic engine; the group sums from the engine under test
    diag = ffx.diag_fisher(problem, params, (x, y), generator=generator(spec.seed), engine="generic", **options)
    grouped = ffx.group_fisher(problem, params, (x, y), groups, generator=generator(spec.seed), engine=engine,
                               **options)
    expected = {}
    for name, g in groups.items():
        g = ffx.Group(g) if isinstance(g, str) else g
        expected[name] = MANUAL[g.pattern](diag.value[name], g.sizes)
    assert_tree_close(grouped.value, expected, **SAME_MATH_F64)
    assert grouped.count == diag.count
    # every pattern here partitions its parameter, so the totals agree as well
    assert math.isclose(total(grouped.value), total({k: diag.value[k] for k in groups}), rel_tol=1e-10)


@pytest.mark.parametrize("spec_kind", SPECS)
@settings(max_examples=10)
@given(sizes=attention_sizes, seed=seeds)
def test_expand_groups_broadcasts_each_group_value(spec_kind, sizes, seed):
    h, dh = sizes
    params = ffx.params_of(build(lambda: AttentionNet(h * dh, h, C), seed))
    groups = {k: (ffx.Group(g) if isinstance(g, str) else g) for k, g in group_spec(spec_kind, params, h).items()}
    shapes = {k: g.reduce(torch.empty(params[k].shape, device="meta")).shape for k, g in groups.items()}
    values = {k: randn(seed + i, *s) for i, (k, s) in enumerate(shapes.items())}
    expanded = ffx.expand_groups(values, groups, params)
    probe = {k: randn(seed + 100 + i, *params[k].shape) for i, k in enumerate(groups)}
    reduced_probe = ffx.reduce_groups(probe, groups)
    for name, g in groups.items():
        assert expanded[name].shape == params[name].shape
        # every entry of a group holds the group's value: max and min over the group are that value
        for how in ("max", "min", "mean"):
            torch.testing.assert_close(einops.reduce(expanded[name], g.pattern, how, **g.sizes), values[name],
                                       **SAME_MATH_F64)
        size = params[name].numel() // values[name].numel()
        torch.testing.assert_close(ffx.reduce_groups(expanded, groups)[name], values[name] * size, **SAME_MATH_F64)
        # expansion is the adjoint of the group sum: <expand(v), x> = <v, reduce(x)>
        assert math.isclose(float((expanded[name] * probe[name]).sum()),
                            float((values[name] * reduced_probe[name]).sum()), rel_tol=1e-10, abs_tol=1e-12)


# --- padding and normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("via", ["ignore_index", "mask", "row_mask"])
@settings(max_examples=5)
@given(spec=seq_specs(max_n=3), extra=st.integers(1, 3), per=st.sampled_from(PERS), data=st.data())
def test_token_fisher_ignores_fully_padded_rows(via, engine, spec, extra, per, data):
    problem, params = seq_problem(spec.seed)
    x, y = seq_batch(spec, D, C)
    x_pad = randn(spec.seed + 2, extra, spec.t, D)
    y_pad = randint(spec.seed + 3, C, extra, spec.t)
    if via == "ignore_index":  # padded rows have every target ignored
        base, padded = (x, y), (torch.cat([x, x_pad]), torch.cat([y, torch.full_like(y_pad, -100)]))
    elif via == "mask":  # padded rows carry real labels but a False [N, T] mask
        y_full = torch.where(spec.mask, y, 0)
        base = (x, y_full, spec.mask)
        padded = (torch.cat([x, x_pad]), torch.cat([y_full, y_pad]),
                  torch.cat([spec.mask, torch.zeros(extra, spec.t, dtype=torch.bool)]))
    else:  # an [N] row mask on top of -100 targets
        row_mask = torch.cat([torch.ones(spec.n, dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)])
        base, padded = (x, y), (torch.cat([x, x_pad]), torch.cat([y, y_pad]), row_mask)
    perm = torch.tensor(data.draw(st.permutations(range(spec.n + extra))))
    padded = rows(padded, perm)
    options = {"per": per, "normalize": "tokens", "dtype": F64, "engine": engine}
    expected = ffx.diag_fisher(problem, params, base, **options)
    got = ffx.diag_fisher(problem, params, padded, **options)
    assert int(got.count) == int(spec.mask.sum()) == int(expected.count)
    assert_tree_close(got.value, expected.value, **SAME_MATH_F64)


@st.composite
def lm_lengths(draw, max_n: int = 3, max_t: int = 5) -> tuple[int, list[int]]:
    """Sequence length ``t`` and per-row token counts in ``[1, t]``, at least one row with 2 tokens."""
    t = draw(st.integers(2, max_t))
    lengths = draw(st.lists(st.integers(1, t), min_size=1, max_size=max_n))
    assume(max(lengths) >= 2)
    return t, lengths


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("via", ["attention_mask", "labels"])
@settings(max_examples=4)
@given(tl=lm_lengths(), extra=st.integers(1, 2), seed=seeds, per=st.sampled_from(PERS), data=st.data())
def test_token_fisher_ignores_fully_padded_rows_causal_lm(via, engine, tl, extra, seed, per, data):
    t, lengths = tl
    model = build(tiny_gpt2, seed)
    problem, params = ffx.causal_lm(model), ffx.params_of(model)
    n = len(lengths)
    ids, mask = randint(seed, VOCAB, n, t), spans(lengths, t).long()
    ids_pad = randint(seed + 1, VOCAB, extra, t)
    if via == "attention_mask":
        pad = {"attention_mask": torch.zeros(extra, t, dtype=torch.long), "labels": ids_pad}
    else:
        pad = {"attention_mask": torch.ones(extra, t, dtype=torch.long), "labels": torch.full_like(ids_pad, -100)}
    base = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    perm = torch.tensor(data.draw(st.permutations(range(n + extra))))
    padded = {"input_ids": torch.cat([ids, ids_pad])[perm],
              "attention_mask": torch.cat([mask, pad["attention_mask"]])[perm],
              "labels": torch.cat([ids, pad["labels"]])[perm]}
    options = {"per": per, "normalize": "tokens", "dtype": F64, "engine": engine}
    expected = ffx.diag_fisher(problem, params, base, **options)
    got = ffx.diag_fisher(problem, params, padded, **options)
    assert int(got.count) == sum(length - 1 for length in lengths) == int(expected.count)
    assert_tree_close(got.value, expected.value, **SAME_MATH_F64)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
@settings(max_examples=5)
@given(tl=lm_lengths(), seed=seeds, per=st.sampled_from(PERS), normalize=st.sampled_from(["samples", "tokens"]))
def test_left_and_right_padding_give_the_same_causal_lm_fisher(factory, engine, tl, seed, per, normalize):
    t, lengths = tl
    model = build(factory, seed)
    problem, params = ffx.causal_lm(model), ffx.params_of(model)
    n = len(lengths)
    tokens = randint(seed, VOCAB, n, t)  # row r's sequence is tokens[r, :lengths[r]]
    right_mask, left_mask = spans(lengths, t), spans(lengths, t, left=True)
    right = torch.where(right_mask, tokens, randint(seed + 1, VOCAB, n, t))  # different pad ids on each side
    left = randint(seed + 2, VOCAB, n, t)
    left[left_mask] = tokens[right_mask]
    options = {"per": per, "normalize": normalize, "dtype": F64, "engine": engine}
    got_right = ffx.diag_fisher(problem, params, {"input_ids": right, "attention_mask": right_mask.long()}, **options)
    got_left = ffx.diag_fisher(problem, params, {"input_ids": left, "attention_mask": left_mask.long()}, **options)
    assert int(got_left.count) == int(got_right.count)
    assert_tree_close(got_left.value, got_right.value, **SAME_MATH_F64)


# --- batch splits -----------------------------------------------------------------------------------

@st.composite
def splits(draw, n: int) -> list[int]:
    """Sorted cut points ``0 = c_0 < c_1 < ... < c_k = n``."""
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=n - 1)) if n > 1 else set()
    return [0, *sorted(cuts), n]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("normalize", ["samples", "tokens"])
@settings(max_examples=6)
@given(spec=seq_specs(max_n=5, min_n=2), kind=st.sampled_from(["empirical", "exact"]), per=st.sampled_from(PERS),
       data=st.data())
def test_combine_and_running_sums_of_splits_equal_the_whole_batch(normalize, engine, spec, kind, per, data):
    problem, params = seq_problem(spec.seed)
    batch = seq_batch(spec, D, C)
    cuts = data.draw(splits(spec.n))
    assume(all(spec.mask[a:b].any() for a, b in zip(cuts, cuts[1:])))
    options = {"kind": kind, "per": per, "normalize": normalize, "dtype": F64, "engine": engine}
    whole = ffx.diag_fisher(problem, params, batch, **options)
    parts = [ffx.diag_fisher(problem, params, rows(batch, slice(a, b)), **options) for a, b in zip(cuts, cuts[1:])]
    combined = ffx.combine(parts)
    assert int(combined.count) == int(whole.count)
    assert_tree_close(combined.value, whole.value, **SAME_MATH_F64)
    state = ffx.sum_init(parts[0])
    for part in parts:
        state = ffx.sum_update(state, part)
    summed = ffx.sum_value(state)
    assert int(summed.count) == int(whole.count)
    assert_tree_close(summed.value, whole.value, **SAME_MATH_F64)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("per", PERS)
@settings(max_examples=6)
@given(spec=seq_specs(max_n=4, min_per_row=1), kind=st.sampled_from(["empirical", "exact"]))
def test_batch_fisher_is_the_mean_of_single_sample_fishers(per, engine, spec, kind):
    problem, params = seq_problem(spec.seed)
    batch = seq_batch(spec, D, C)
    options = {"kind": kind, "per": per, "dtype": F64, "engine": engine}
    whole = ffx.diag_fisher(problem, params, batch, **options)
    singles = [ffx.diag_fisher(problem, params, rows(batch, slice(i, i + 1)), **options) for i in range(spec.n)]
    mean = {k: sum(s.value[k] for s in singles) / spec.n for k in params}
    assert int(whole.count) == spec.n
    assert_tree_close(whole.value, mean, **SAME_MATH_F64)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(spec=seq_specs(max_n=5), per=st.sampled_from(PERS), data=st.data())
def test_chunk_size_does_not_change_the_result(kind, engine, spec, per, data):
    problem, params = seq_problem(spec.seed)
    batch = seq_batch(spec, D, C)
    chunk = data.draw(st.integers(1, spec.n + 1))
    options = {"kind": kind, "per": per, "n_samples": 2, "dtype": F64, "engine": engine}
    whole = ffx.diag_fisher(problem, params, batch, generator=generator(spec.seed), **options)
    chunked = ffx.diag_fisher(problem, params, batch, generator=generator(spec.seed), chunk_size=chunk, **options)
    assert_tree_close(chunked.value, whole.value, **SAME_MATH_F64)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=8)
@given(spec=seq_specs(max_n=5), kind=st.sampled_from(["empirical", "exact"]), per=st.sampled_from(PERS),
       data=st.data())
def test_permuting_samples_changes_nothing(engine, spec, kind, per, data):
    problem, params = seq_problem(spec.seed)
    batch = seq_batch(spec, D, C)
    perm = torch.tensor(data.draw(st.permutations(range(spec.n))))
    options = {"kind": kind, "per": per, "dtype": F64, "engine": engine}
    expected = ffx.diag_fisher(problem, params, batch, **options)
    got = ffx.diag_fisher(problem, params, rows(batch, perm), **options)
    assert_tree_close(got.value, expected.value, **SAME_MATH_F64)


# Gaussian(σ): exact and MC Fisher are JᵀJ/σ² (MC: y = f + σε with the same ε, so ∇ℓ = −Jᵀε/σ);
# the empirical Fisher squares (f − y)/σ², so it scales as 1/σ⁴ (the loss scaled by c gives c²).
SIGMA_POWER = {"exact": 2, "mc": 2, "empirical": 4}


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(spec=seq_specs(), sigma=st.sampled_from([0.25, 0.5, 2.0, 3.0]), per=st.sampled_from(PERS))
def test_gaussian_fisher_scales_with_sigma(kind, spec, sigma, per):
    model = build(lambda: SeqModel(D, C), spec.seed)
    params = ffx.params_of(model)
    batch = likelihood_batch("gaussian", spec)
    options = {"kind": kind, "per": per, "n_samples": 2, "dtype": F64}
    unit = ffx.diag_fisher(ffx.supervised(model, ffx.Gaussian(1.0)), params, batch, generator=generator(spec.seed),
                           **options)
    scaled = ffx.diag_fisher(ffx.supervised(model, ffx.Gaussian(sigma)), params, batch,
                             generator=generator(spec.seed), **options)
    factor = sigma ** SIGMA_POWER[kind]
    assert_tree_close({k: v * factor for k, v in scaled.value.items()}, unit.value, **SAME_MATH_F64)


# --- Monte Carlo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@settings(max_examples=6)
@given(spec=seq_specs(), n_samples=st.integers(1, 3), per=st.sampled_from(PERS))
def test_mc_same_generator_state_gives_identical_results(likelihood, spec, n_samples, per):
    problem, params = seq_problem(spec.seed, LIKELIHOODS[likelihood])
    batch = likelihood_batch(likelihood, spec)
    options = {"kind": "mc", "n_samples": n_samples, "per": per}
    g = generator(spec.seed)
    first = ffx.diag_fisher(problem, params, batch, generator=g, **options)
    after_first = g.get_state()
    second = ffx.diag_fisher(problem, params, batch, generator=generator(spec.seed), **options)
    assert_tree_close(second.value, first.value, **BITWISE)
    # the generator's state advanced: a second call on it draws new labels
    assert not torch.equal(after_first, generator(spec.seed).get_state())


@settings(max_examples=8)
@given(spec=seq_specs(), seed_pair=st.lists(seeds, min_size=2, max_size=2, unique=True))
def test_mc_different_seeds_give_different_results_gaussian(spec, seed_pair):
    problem, params = seq_problem(spec.seed, ffx.Gaussian(0.5))
    batch = likelihood_batch("gaussian", spec)
    a, b = (ffx.diag_fisher(problem, params, batch, kind="mc", generator=generator(s)) for s in seed_pair)
    assert_values_differ(a.value, b.value)


def test_mc_different_seeds_give_different_results_categorical():
    # 4 × 6 positions × 3 draws of a 4-class label: the chance that all 72 draws agree is negligible
    spec = SeqSpec(4, 6, 0, torch.ones(4, 6, dtype=torch.bool))
    problem, params = seq_problem(0)
    batch = seq_batch(spec, D, C)
    a, b = (ffx.diag_fisher(problem, params, batch, kind="mc", n_samples=3, generator=generator(s)) for s in (1, 2))
    assert_values_differ(a.value, b.value)


# --- dtypes and storage -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=5)
@given(spec=seq_specs(), kind=st.sampled_from(KINDS))
def test_float64_accumulation_of_a_float32_model(engine, spec, kind):
    problem, params = seq_problem(spec.seed, dtype=torch.float32)
    x, y = seq_batch(spec, D, C, dtype=torch.float32)
    est32 = ffx.diag_fisher(problem, params, (x, y), kind=kind, generator=generator(spec.seed), engine=engine)
    est64 = ffx.diag_fisher(problem, params, (x, y), kind=kind, generator=generator(spec.seed), dtype=F64,
                            engine=engine)
    assert all(v.dtype == torch.float32 for v in est32.value.values())
    assert all(v.dtype == F64 for v in est64.value.values())
    assert_tree_close({k: v.float() for k, v in est64.value.items()}, est32.value, **SAME_MATH_F32)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=4)
@given(spec=seq_specs(), kind=st.sampled_from(["empirical", "exact"]))
def test_bfloat16_model_accumulates_in_float32(engine, spec, kind):
    model16 = build(lambda: SeqModel(D, C), spec.seed, torch.bfloat16)
    model32 = build(lambda: SeqModel(D, C), spec.seed, torch.bfloat16).float()  # same bf16-rounded weights
    x, y = seq_batch(spec, D, C, dtype=torch.bfloat16)
    est16 = ffx.diag_fisher(ffx.supervised(model16, ffx.Categorical()), ffx.params_of(model16), (x, y), kind=kind,
                            engine=engine)
    est32 = ffx.diag_fisher(ffx.supervised(model32, ffx.Categorical()), ffx.params_of(model32), (x.float(), y),
                            kind=kind, engine="generic")
    for name, value in est16.value.items():
        assert value.dtype == torch.float32, name
        reference = est32.value[name]
        assert float((value - reference).norm()) <= BF16_REL * float(reference.norm()) + 1e-6, name
    assert total(est16.value) > 0


@pytest.mark.parametrize("normalize", ["samples", "tokens", "none"])
@settings(max_examples=5)
@given(spec=seq_specs())
def test_storage_dtype_device_and_count(normalize, spec):
    problem, params = seq_problem(spec.seed, dtype=torch.float32)
    batch = seq_batch(spec, D, C, dtype=torch.float32)
    plain = ffx.diag_fisher(problem, params, batch, normalize=normalize)
    stored = ffx.diag_fisher(problem, params, batch, normalize=normalize, storage_dtype=torch.bfloat16, device="cpu")
    expected_count = {"samples": spec.n, "tokens": int(spec.mask.sum()), "none": 1}[normalize]
    for est in (plain, stored):
        assert est.count.dtype == torch.int64 and est.count.shape == ()
        assert int(est.count) == expected_count
    assert_tree_close(stored.value, {k: v.to(torch.bfloat16) for k, v in plain.value.items()}, **BITWISE)
    assert all(v.device == torch.device("cpu") for v in stored.value.values())
    groups = ffx.channels(params)
    grouped = ffx.group_fisher(problem, params, batch, groups, normalize=normalize, storage_dtype=torch.bfloat16,
                               device="cpu")
    assert int(grouped.count) == expected_count
    assert_tree_close(grouped.value, {k: v.to(torch.bfloat16) for k, v in
                                        ffx.reduce_groups(plain.value, groups).items()}, **BITWISE)
    masked = ffx.mask_importance(problem, params, batch, groups, normalize=normalize)
    masked16 = ffx.mask_importance(problem, params, batch, groups, normalize=normalize, storage_dtype=torch.bfloat16,
                                   device="cpu")
    assert int(masked16.count) == expected_count
    assert_tree_close(masked16.value, {k: v.to(torch.bfloat16) for k, v in masked.value.items()}, **BITWISE)


# --- EMA --------------------------------------------------------------------------------------------

decays = st.floats(min_value=0.01, max_value=0.99)
EMA_F32 = {"rtol": 1e-5, "atol": 1e-7}  # ≤ 30 float32 multiply-adds of positive values


def estimate(seed: int, count: int = 3, dtype: torch.dtype = torch.float32) -> ffx.Estimate:
    return ffx.Estimate({"w": randn(seed, 3, 2, dtype=dtype).abs(), "b": randn(seed + 1, 2, dtype=dtype).abs()},
                        torch.tensor(count))


@settings(max_examples=25)
@given(decay=decays, steps=st.integers(1, 30), seed=seeds)
def test_ema_of_a_constant_estimate_is_that_constant_after_bias_correction(decay, steps, seed):
    const = estimate(seed)
    state = ffx.ema_init(const, decay)
    for _ in range(steps):
        state = ffx.ema_update(state, const)
    assert int(state.step) == steps
    assert_tree_close(ffx.ema_value(state), const.value, **EMA_F32)


@settings(max_examples=15)
@given(decay=decays, steps=st.integers(1, 6), seed=seeds)
def test_ema_updates_never_mutate_their_inputs(decay, steps, seed):
    state = ffx.ema_init(estimate(seed), decay)
    for k in range(steps):
        est = estimate(seed + 10 * (k + 1), count=k + 1)
        before_state = {n: m.clone() for n, m in state.mean.items()}
        before_step = state.step.clone()
        before_est = {n: v.clone() for n, v in est.value.items()}
        new = ffx.ema_update(state, est)
        ffx.ema_value(new)
        ffx.ema_value(new, bias_corrected=False)
        assert_tree_close(state.mean, before_state, **BITWISE)
        assert_tree_close(est.value, before_est, **BITWISE)
        assert int(state.step) == int(before_step) and int(est.count) == k + 1
        assert_values_differ(new.mean, state.mean)  # the update did something
        state = new


@settings(max_examples=15)
@given(decay=decays, steps=st.integers(1, 8), seed=seeds)
def test_ema_value_without_bias_correction_is_m_k(decay, steps, seed):
    ests = [estimate(seed + 10 * k, dtype=F64) for k in range(steps)]
    state = ffx.ema_init(ests[0], decay)
    m = {n: torch.zeros_like(v) for n, v in ests[0].value.items()}
    for est in ests:
        state = ffx.ema_update(state, est)
        m = {n: decay * m[n] + (1 - decay) * est.value[n] for n in m}
    assert_tree_close(ffx.ema_value(state, bias_corrected=False), m, **SAME_MATH_F64)
    assert_tree_close(ffx.ema_value(state), {n: v / (1 - decay**steps) for n, v in m.items()}, **SAME_MATH_F64)


# --- parameters other than the module's own ----------------------------------------------------

@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_group_estimates_evaluate_the_model_at_all_given_params(engine):
    """Groups over a subset of ``params`` still evaluate the model at every value in ``params``."""
    gen = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    problem = ffx.supervised(model, ffx.Categorical())
    params = {k: v + 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in ffx.params_of(model).items()}
    batch = (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
    subset = {"2.weight": "o i -> o"}
    diag = ffx.diag_fisher(problem, params, batch, engine=engine, dtype=torch.float64)
    grouped = ffx.group_fisher(problem, params, batch, subset, engine=engine, dtype=torch.float64)
    assert_tree_close(grouped.value, ffx.reduce_groups({"2.weight": diag.value["2.weight"]}, subset), **SAME_MATH_F64)
    every = ffx.mask_importance(problem, params, batch, ffx.channels(params), engine=engine, dtype=torch.float64)
    one = ffx.mask_importance(problem, params, batch, subset, engine=engine, dtype=torch.float64)
    assert_tree_close(one.value, {"2.weight": every.value["2.weight"]}, **SAME_MATH_F64)
