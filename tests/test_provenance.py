"""Provenance: every estimate says what it measures, and estimates of different things never mix."""

import pytest
import torch
from torch import nn

import fisherfx as ffx
from fisherfx.state import NO_PROVENANCE, Provenance, merge_provenance
from fisherfx.testing import assert_tree_close
from tests.strategies import BITWISE, SAME_MATH_F64, build, randint, randn

F64 = torch.float64
CHANNELS = {"w": ffx.Group("o i -> o"), "b": ffx.Group("o -> o")}
DIAG = Provenance("diagonal", "empirical", "sample", "samples", 1, "float64", None, None)


def estimate(seed: int, count: int = 3, provenance: Provenance = DIAG, grouped: bool = False) -> ffx.Estimate:
    shapes = {"w": (2,), "b": (2,)} if grouped else {"w": (2, 3), "b": (2,)}
    value = {k: randn(seed + i, *s).abs() for i, (k, s) in enumerate(shapes.items())}
    return ffx.Estimate(value, torch.tensor(count), provenance)


def updates():
    """The three ways of folding an estimate into something: (name, fold(first, second))."""
    return [
        ("combine", lambda a, b: ffx.combine([a, b])),
        ("ema_update", lambda a, b: ffx.ema_update(ffx.ema_update(ffx.ema_init(a, 0.5), a), b)),
        ("sum_update", lambda a, b: ffx.sum_update(ffx.sum_update(ffx.sum_init(a), a), b)),
    ]


UPDATES = updates()


# --- construction -----------------------------------------------------------------------------------

def test_estimate_without_provenance_still_constructs():
    value, count = {"w": torch.ones(2)}, torch.tensor(4)
    for est in (ffx.Estimate(value, count), ffx.Estimate(value=value, count=count)):
        assert est.provenance == Provenance() == NO_PROVENANCE
        assert all(field == "unknown" for field in est.provenance)
        assert est.value is value and est.count is count


def test_states_without_provenance_still_construct():
    state = ffx.EMAState({"w": torch.zeros(2)}, torch.tensor(0), 0.9)
    sums = ffx.SumState(total={"w": torch.zeros(2)}, count=torch.tensor(0))
    assert state.provenance == sums.provenance == NO_PROVENANCE


@pytest.fixture(scope="module")
def tiny():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), seed=0)
    problem = ffx.supervised(model, ffx.Categorical())
    batch = (randn(1, 5, 3), randint(2, 2, 5))
    return problem, ffx.params_of(model), batch


@pytest.mark.parametrize("kind", ["empirical", "mc", "exact"])
@pytest.mark.parametrize(("per", "normalize"), [("sample", "samples"), ("token", "tokens"), ("sample", "none")])
def test_diag_fisher_records_its_options(tiny, kind, per, normalize):
    problem, params, batch = tiny
    est = ffx.diag_fisher(problem, params, batch, kind=kind, per=per, normalize=normalize, n_samples=3,
                          generator=torch.Generator().manual_seed(0), dtype=F64)
    assert est.provenance == Provenance("diagonal", kind, per, normalize, 3 if kind == "mc" else 1, "float64", None,
                                        None)


def test_group_estimates_record_their_spec(tiny):
    problem, params, batch = tiny
    spec = {"0.weight": "o i -> o", "2.weight": ffx.Group("o i -> i")}
    grouped = ffx.group_fisher(problem, params, batch, spec)
    masked = ffx.mask_importance(problem, params, batch, spec, kind="mc", generator=torch.Generator().manual_seed(1))
    want = {"0.weight": ffx.Group("o i -> o"), "2.weight": ffx.Group("o i -> i")}
    shapes = {"0.weight": (4, 3), "2.weight": (2, 4)}
    assert grouped.provenance == Provenance("group", "empirical", "sample", "samples", 1, "float32", want, shapes)
    assert masked.provenance == Provenance("mask_importance", "mc", "sample", "samples", 1, "float32", want, shapes)


def test_storage_dtype_keeps_the_accumulation_dtype_in_the_provenance(tiny):
    problem, params, batch = tiny
    est = ffx.diag_fisher(problem, params, batch, storage_dtype=torch.bfloat16, device="cpu")
    assert all(v.dtype == torch.bfloat16 for v in est.value.values())
    assert est.provenance.dtype == "float32" and est.provenance.quantity == "diagonal"


def test_cast_keeps_the_provenance():
    est = estimate(0)
    assert ffx.cast(est, torch.bfloat16, device="cpu").provenance == est.provenance
    assert ffx.cast(est).provenance == est.provenance


# --- what passes through --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fold"), UPDATES, ids=[u[0] for u in UPDATES])
def test_updates_keep_a_shared_provenance(name, fold):
    folded = fold(estimate(0), estimate(5, count=2))
    assert folded.provenance == DIAG


def test_sum_value_and_init_carry_the_provenance():
    est = estimate(0)
    state = ffx.sum_update(ffx.sum_init(est), est)
    assert state.provenance == ffx.sum_value(state).provenance == DIAG
    assert ffx.ema_init(est, 0.9).provenance == DIAG


def test_a_state_initialised_from_params_takes_the_first_estimates_provenance():
    est = estimate(0)
    for init in (ffx.sum_init(est.value), ffx.ema_init(est.value, 0.9)):
        assert init.provenance == NO_PROVENANCE
    assert ffx.sum_update(ffx.sum_init(est.value), est).provenance == DIAG
    assert ffx.ema_update(ffx.ema_init(est.value, 0.9), est).provenance == DIAG


@pytest.mark.parametrize(("name", "fold"), UPDATES, ids=[u[0] for u in UPDATES])
@pytest.mark.parametrize("unknown_first", [True, False], ids=["unknown-first", "known-first"])
def test_unknown_provenance_mixes_with_anything_and_the_known_one_wins(name, fold, unknown_first):
    known, unknown = estimate(0), estimate(1, provenance=Provenance())
    pair = (unknown, known) if unknown_first else (known, unknown)
    assert fold(*pair).provenance == DIAG


def test_unknown_fields_are_filled_one_by_one():
    partial = Provenance(kind="mc", groups=None)
    other = Provenance(quantity="diagonal", normalize="tokens", n_samples=4)
    assert merge_provenance("test", partial, other) == Provenance("diagonal", "mc", "unknown", "tokens", 4,
                                                                  "unknown", None, "unknown")


@pytest.mark.parametrize(("field", "value"), [("n_samples", 8), ("dtype", "float32")])
def test_recorded_only_fields_become_mixed(field, value):
    got = ffx.combine([estimate(0), estimate(1, provenance=DIAG._replace(**{field: value}))])
    assert got.provenance == DIAG._replace(**{field: "mixed"})


def test_combine_values_are_unchanged_by_provenance():
    a, b = estimate(0, count=2), estimate(1, count=5, provenance=Provenance())
    got = ffx.combine([a, b])
    assert_tree_close(got.value, {k: (2 * a.value[k] + 5 * b.value[k]) / 7 for k in a.value}, **SAME_MATH_F64)


def test_string_and_group_specs_are_the_same_spec():
    a = DIAG._replace(quantity="group", groups={"w": "o i -> o", "b": ffx.Group("o -> o")})
    b = DIAG._replace(quantity="group", groups=CHANNELS)
    assert ffx.combine([estimate(0, provenance=a, grouped=True),
                        estimate(1, provenance=b, grouped=True)]).provenance.groups == CHANNELS


# --- what is refused ------------------------------------------------------------------------------------

GROUP = DIAG._replace(quantity="group", groups=CHANNELS, shapes={"w": (2, 3), "b": (2,)})
CONFLICTS = [
    ("kind", DIAG, DIAG._replace(kind="mc"), r"different kind: .*: kind='empirical'; .*: kind='mc'$"),
    ("per", DIAG, DIAG._replace(per="token"), r"different per: .*: per='sample'; .*: per='token'$"),
    ("normalize", DIAG, DIAG._replace(normalize="tokens"),
     r"different normalize: .*: normalize='samples'; .*: normalize='tokens'$"),
    ("quantity", GROUP, GROUP._replace(quantity="mask_importance"),
     r"different quantity: .*: quantity='group'; .*: quantity='mask_importance'$"),
    ("pattern", GROUP, GROUP._replace(groups={**CHANNELS, "w": ffx.Group("o i -> i")}),
     r"different group specs: for 'w', .*: 'o i -> o'; .*: 'o i -> i'$"),
    ("sizes", GROUP._replace(groups={**CHANNELS, "w": ffx.Group("(h d) i -> h", {"h": 2})}),
     GROUP._replace(groups={**CHANNELS, "w": ffx.Group("(h d) i -> h", {"h": 1})}),
     r"for 'w', .*: '\(h d\) i -> h' with \{'h': 2\}; .*: '\(h d\) i -> h' with \{'h': 1\}$"),
    ("per-entry", GROUP, GROUP._replace(groups=None, shapes=None),
     r"group values and per-entry values: .*: a group spec; .*: groups=None$"),
    ("shapes", GROUP, GROUP._replace(shapes={"w": (2, 5), "b": (2,)}),
     r"of parameters of different shapes: 'w' has shape \(2, 3\) in .*, \(2, 5\) in .*$"),
]


@pytest.mark.parametrize(("name", "fold"), UPDATES, ids=[u[0] for u in UPDATES])
@pytest.mark.parametrize(("field", "first", "second", "message"), CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_different_estimates_do_not_mix(name, fold, field, first, second, message):
    a, b = estimate(0, provenance=first, grouped=True), estimate(1, provenance=second, grouped=True)
    with pytest.raises(ffx.FisherError, match=rf"^{name}: cannot mix estimates of "):
        fold(a, b)
    with pytest.raises(ffx.FisherError, match=message):
        fold(a, b)


def test_state_errors_name_the_state_and_the_estimate():
    state = ffx.ema_init(estimate(0), 0.9)
    with pytest.raises(ffx.FisherError, match=r"ema_update: .* the state: kind='empirical'; the estimate: "
                                              r"kind='mc'"):
        ffx.ema_update(state, estimate(1, provenance=DIAG._replace(kind="mc")))


def test_combine_names_the_estimate_that_differs():
    parts = [estimate(0), estimate(1), estimate(2, provenance=DIAG._replace(normalize="none"))]
    with pytest.raises(ffx.FisherError, match=r"combine: .* estimates 0 to 1: normalize='samples'; estimate 2: "
                                              r"normalize='none'"):
        ffx.combine(parts)


def test_an_empirical_fisher_is_never_averaged_into_a_true_one(tiny):
    problem, params, batch = tiny
    mc = ffx.diag_fisher(problem, params, batch, kind="mc", generator=torch.Generator().manual_seed(0))
    empirical = ffx.diag_fisher(problem, params, batch)
    state = ffx.ema_update(ffx.ema_init(mc, 0.9), mc)
    with pytest.raises(ffx.FisherError, match="the state: kind='mc'; the estimate: kind='empirical'"):
        ffx.ema_update(state, empirical)


def test_the_refused_update_leaves_the_state_as_it_was():
    state = ffx.sum_update(ffx.sum_init(estimate(0)), estimate(0))
    before = {k: v.clone() for k, v in state.total.items()}
    with pytest.raises(ffx.FisherError):
        ffx.sum_update(state, estimate(1, provenance=DIAG._replace(kind="exact")))
    assert_tree_close(state.total, before, **BITWISE)


# --- count 0: an empty shard ------------------------------------------------------------------------

def test_a_zero_count_part_adds_nothing():
    est, empty = estimate(0, count=3), ffx.Estimate({"w": torch.zeros(2, 3, dtype=F64),
                                                     "b": torch.zeros(2, dtype=F64)}, torch.tensor(0), DIAG)
    assert_tree_close(ffx.combine([empty, est]).value, est.value, **SAME_MATH_F64)
    sums = ffx.sum_update(ffx.sum_update(ffx.sum_init(est), empty), est)
    assert_tree_close(ffx.sum_value(sums).value, est.value, **SAME_MATH_F64)


def test_zero_counts_only_are_refused():
    empty = ffx.Estimate({"w": torch.zeros(2)}, torch.tensor(0))
    with pytest.raises(ffx.FisherError, match="combine: every estimate has count 0"):
        ffx.combine([empty, empty])
    with pytest.raises(ffx.FisherError, match="ema_update: the estimate has count 0"):
        ffx.ema_update(ffx.ema_init(empty, 0.9), empty)
