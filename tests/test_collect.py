"""collect: the running sum is the estimate of the concatenated batches; EMA, budgets, adaptive stop."""

import math

import pytest
import torch
from torch import nn

import fisherfx as ffx
from fisherfx._collect import Collected, collect
from fisherfx.state import Provenance
from fisherfx.testing import assert_tree_close
from tests.strategies import SAME_MATH_F64, SeqModel, SeqSpec, build, randint, randn, seq_batch, spans

F64 = torch.float64
SIZES = (3, 5, 2, 4)  # unequal batches


def mlp_batches():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), seed=0)
    batches = [(randn(10 + i, n, 3), randint(20 + i, 3, n)) for i, n in enumerate(SIZES)]
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batches, whole


def seq_batches():
    """Sequences with padding (-100) of different lengths per batch: tokens and samples differ."""
    model = build(SeqModel, seed=1)
    specs = [SeqSpec(n, 4, 30 + i, spans([(i + r) % 4 + 1 for r in range(n)], 4)) for i, n in enumerate(SIZES)]
    batches = [seq_batch(s) for s in specs]
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batches, whole


CASES = {"mlp": mlp_batches, "padded-seq": seq_batches}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("normalize", ["samples", "tokens"])
@pytest.mark.parametrize("grouped", [False, True], ids=["diagonal", "channels"])
def test_running_sum_is_the_estimate_of_the_concatenated_batches(case, normalize, grouped):
    problem, params, batches, whole = CASES[case]()
    groups = ffx.channels(params) if grouped else None
    got = collect(problem, params, batches, groups=groups, normalize=normalize, dtype=F64)
    if grouped:
        want = ffx.group_fisher(problem, params, whole, groups, normalize=normalize, dtype=F64)
    else:
        want = ffx.diag_fisher(problem, params, whole, normalize=normalize, dtype=F64)
    assert isinstance(got, Collected) and isinstance(got.fisher, ffx.Estimate)
    assert_tree_close(got.fisher.value, want.value, **SAME_MATH_F64)
    assert int(got.fisher.count) == int(want.count)
    assert got.fisher.provenance == want.provenance
    assert (got.batches, got.samples, got.converged) == (len(SIZES), sum(SIZES), None)


def test_exact_kind_collects_as_well():
    problem, params, batches, whole = mlp_batches()
    got = collect(problem, params, batches, kind="exact", dtype=F64)
    assert_tree_close(got.fisher.value, ffx.diag_fisher(problem, params, whole, kind="exact", dtype=F64).value,
                      **SAME_MATH_F64)


def test_mc_draws_follow_the_generator():
    problem, params, batches, _ = mlp_batches()
    got = collect(problem, params, batches, kind="mc", n_samples=2, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    want = ffx.combine([ffx.diag_fisher(problem, params, b, kind="mc", n_samples=2, generator=gen) for b in batches])
    assert_tree_close(got.fisher.value, want.value, rtol=1e-6, atol=0)
    assert got.fisher.provenance.n_samples == 2 and got.fisher.provenance.kind == "mc"


def test_decay_gives_the_ema_of_the_batches():
    problem, params, batches, _ = mlp_batches()
    got = collect(problem, params, batches, decay=0.7)
    ests = [ffx.diag_fisher(problem, params, b) for b in batches]
    state = ffx.ema_init(ests[0], 0.7)
    for est in ests:
        state = ffx.ema_update(state, est)
    assert isinstance(got.fisher, ffx.EMAState) and int(got.fisher.step) == len(batches)
    assert_tree_close(ffx.ema_value(got.fisher), ffx.ema_value(state), rtol=1e-6, atol=0)
    assert got.fisher.provenance.kind == "empirical" and got.error is None and got.converged is None


def test_storage_dtype_and_device_apply_to_the_sum():
    problem, params, batches, whole = mlp_batches()
    got = collect(problem, params, batches, storage_dtype=torch.bfloat16, device="cpu", dtype=F64)
    want = ffx.diag_fisher(problem, params, whole, dtype=F64)
    assert all(v.dtype == torch.bfloat16 for v in got.fisher.value.values())
    assert_tree_close(got.fisher.value, {k: v.to(torch.bfloat16) for k, v in want.value.items()}, rtol=0, atol=0)


# --- budgets -------------------------------------------------------------------------------------------

class Counting:
    """An iterable that records how many batches were drawn from it."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __iter__(self):
        for b in self.batches:
            self.drawn += 1
            yield b


@pytest.mark.parametrize(("budget", "used"), [({"max_batches": 2}, 2), ({"max_samples": 8}, 2),
                                              ({"max_samples": 9}, 3), ({"max_batches": 99}, 4)])
def test_budgets_stop_without_drawing_more(budget, used):
    problem, params, batches, _ = mlp_batches()
    source = Counting(batches)
    got = collect(problem, params, source, **budget)
    assert got.batches == source.drawn == used and got.samples == sum(SIZES[:used])
    want = ffx.combine([ffx.diag_fisher(problem, params, b) for b in batches[:used]])
    assert_tree_close(got.fisher.value, want.value, rtol=1e-6, atol=0)


def test_an_empty_shard_gives_a_zero_count_estimate():
    problem, params, batches, _ = mlp_batches()
    spec = ffx.channels(params)
    empty = collect(problem, params, [], groups=spec, normalize="tokens")
    one = collect(problem, params, batches[:1], groups=spec, normalize="tokens")
    assert int(empty.fisher.count) == 0 and empty.batches == empty.samples == 0 and empty.error is None
    assert {k: v.shape for k, v in empty.fisher.value.items()} == {k: v.shape for k, v in one.fisher.value.items()}
    assert empty.fisher.provenance == one.fisher.provenance
    assert_tree_close(ffx.combine([empty.fisher, one.fisher]).value, one.fisher.value, rtol=0, atol=0)
    ema = collect(problem, params, [], decay=0.9)
    assert int(ema.fisher.step) == 0 and ema.fisher.provenance.quantity == "diagonal"


# --- the adaptive stop -----------------------------------------------------------------------------------

class Offset(nn.Module):
    """``f(x) = x + b``: with ``x = 0``, ``b = 0`` and Gaussian(σ=1) the per-sample gradient of ``b_j`` is
    ``−y_j``, so the empirical Fisher of ``b_j`` is the mean of ``y_j²``.
    """

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2, dtype=F64))

    def forward(self, x):
        return x + self.b


def chi2_batches(seed: int, n_batches: int, rows: int = 10):
    """Targets ``y_0 ~ N(0, 1)`` (``y_0²`` is χ²₁: mean 1, variance 2) and ``y_1 = ±1`` (``y_1² = 1`` exactly)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.stack([torch.randn(rows, generator=gen, dtype=F64),
                         torch.randint(0, 2, (rows,), generator=gen).to(F64) * 2 - 1], dim=1)
        out.append((torch.zeros(rows, 2, dtype=F64), y))
    return out


@pytest.fixture(scope="module")
def offset():
    model = Offset().eval()
    return ffx.supervised(model, ffx.Gaussian(sigma=1.0)), ffx.params_of(model)


def ratio_error(sums, counts):
    """The ratio estimator's relative standard error, written out from per-batch sums and counts."""
    b, z = len(sums), sum(counts)
    t = sum(sums) / z
    se = math.sqrt(b / (b - 1) * sum((s - t * c) ** 2 for s, c in zip(sums, counts))) / z
    return se / abs(t)


def test_reported_error_is_the_ratio_estimators(offset):
    problem, params = offset
    batches = chi2_batches(0, 6, rows=7)
    batches[2] = tuple(x[:3] for x in batches[2])  # an uneven batch
    got = collect(problem, params, batches, dtype=F64)
    parts = [ffx.diag_fisher(problem, params, b, dtype=F64) for b in batches]
    counts = [int(p.count) for p in parts]
    trace = [c * float(p.value["b"].sum()) for p, c in zip(parts, counts)]
    assert got.error == pytest.approx(ratio_error(trace, counts), rel=1e-9)
    spec = {"b": "o -> o"}
    grouped = collect(problem, params, batches, groups=spec, rtol_of="groups", dtype=F64)
    per_group = [ratio_error([c * float(p.value["b"][j]) for p, c in zip(parts, counts)], counts) for j in (0, 1)]
    assert per_group[1] == pytest.approx(0, abs=1e-12)  # y_1² = 1 in every sample: no error at all
    assert grouped.error == pytest.approx(max(per_group), rel=1e-9)


def test_one_batch_has_no_error(offset):
    problem, params = offset
    assert collect(problem, params, chi2_batches(0, 1)).error is None


@pytest.mark.parametrize("rtol", [0.1, 0.05])
def test_rtol_stops_at_the_first_batch_that_reaches_it(offset, rtol):
    problem, params = offset
    batches = chi2_batches(1, 400, rows=5)
    got = collect(problem, params, batches, rtol=rtol, dtype=F64)
    assert got.converged is True and got.error <= rtol and got.batches >= 10  # min_batches
    before = collect(problem, params, batches, max_batches=got.batches - 1, dtype=F64)
    assert got.batches == 10 or before.error > rtol
    # y_0² has variance 2 and y_1² none: the trace Σ_j y_j² of a sample has mean 2 and variance 2, so the
    # relative error after N samples is √2 / (2 √N) and rtol needs N = 1 / (2 rtol²). Where the run stops
    # is random (the error is estimated); over 20 seeds it stopped between 0.45 and 1.9 times N.
    n_needed = 1 / (2 * rtol**2)
    assert 0.4 * n_needed < got.samples < 2.5 * n_needed


def test_min_batches_holds_back_a_lucky_early_stop(offset):
    problem, params = offset
    batches = chi2_batches(1, 400, rows=5)
    assert collect(problem, params, batches, rtol=0.2, min_batches=25).batches == 25


def test_rtol_of_groups_waits_for_the_noisiest_group(offset):
    problem, params = offset
    batches = chi2_batches(2, 600, rows=5)
    trace = collect(problem, params, batches, rtol=0.05, dtype=F64)
    grouped = collect(problem, params, batches, groups={"b": "o -> o"}, rtol=0.05, rtol_of="groups", dtype=F64)
    assert trace.converged and grouped.converged
    # group 0 alone has relative error √2 / √N, twice the trace's √2 / (2 √N): about 4× the samples
    # (between 2.8× and 8.8× over 20 seeds; the trace alone would stop at 1×)
    assert 2 < grouped.samples / trace.samples < 10


def test_a_budget_ends_an_unconverged_run(offset):
    problem, params = offset
    got = collect(problem, params, chi2_batches(3, 50), rtol=1e-3, max_samples=40)
    assert got.converged is False and got.samples == 40 and got.error > 1e-3


def test_the_reported_error_matches_the_actual_error(offset):
    # 24 independent runs of 12 batches of 10: the spread of the estimates around the truth (2, the
    # trace of the exact expected Fisher) matches the error each run reports
    problem, params = offset
    runs = [collect(problem, params, chi2_batches(100 + seed, 12), dtype=F64) for seed in range(24)]
    actual = math.sqrt(sum((float(r.fisher.value["b"].sum()) / 2 - 1) ** 2 for r in runs) / len(runs))
    reported = math.sqrt(sum(r.error**2 for r in runs) / len(runs))
    analytic = math.sqrt(2) / (2 * math.sqrt(120))
    assert reported == pytest.approx(analytic, rel=0.25)  # the error estimate is unbiased for the variance
    assert actual == pytest.approx(analytic, rel=0.45)  # 24 runs: the RMS itself is known to about ±15%


# --- progress and errors -----------------------------------------------------------------------------

def test_progress_bar_on_request_only(capsys):
    problem, params, batches, _ = mlp_batches()
    collect(problem, params, batches, progress=True)
    assert "fisher" in capsys.readouterr().err
    collect(problem, params, batches)  # stderr is not a terminal under pytest
    collect(problem, params, batches, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"decay": 0.9, "rtol": 0.1}, r"collect: rtol needs the exact average"),
    ({"rtol_of": "groups"}, r"collect: rtol_of='groups' needs groups="),
    ({"rtol_of": "entries"}, r"collect: rtol_of must be one of \['trace', 'groups'\], got 'entries'"),
    ({"rtol": 0}, r"collect: rtol must be a positive number or None, got 0"),
    ({"max_batches": 0}, r"collect: max_batches must be a positive int or None, got 0"),
    ({"max_samples": 2.5}, r"collect: max_samples must be a positive int or None, got 2.5"),
    ({"min_batches": 1}, r"collect: min_batches must be an int ≥ 2"),
    ({"decay": 1.0}, r"ema_init: decay must be in \(0, 1\)"),
    ({"kind": "true"}, r"collect: kind must be one of \['empirical', 'mc', 'exact'\], got 'true'"),
    ({"sample_size": 3}, r"collect: unknown options \['sample_size'\]"),
])
def test_bad_options_are_refused_before_any_batch(kwargs, message):
    problem, params, batches, _ = mlp_batches()
    source = Counting(batches)
    with pytest.raises(ffx.FisherError, match=message):
        collect(problem, params, source, **kwargs)
    assert source.drawn == 0


def test_a_failing_batch_is_named():
    problem, params, batches, _ = mlp_batches()
    bad = (batches[0][0], torch.full_like(batches[0][1], -100))  # no active position
    with pytest.raises(ffx.FisherError, match=r"collect: batch 1: diag_fisher: the batch has no active position"):
        collect(problem, params, [batches[0], bad])


def test_provenance_of_a_collected_group_estimate():
    problem, params, batches, _ = mlp_batches()
    spec = {"0.weight": "o i -> o"}
    got = collect(problem, params, batches, groups=spec, per="token", normalize="tokens")
    assert got.fisher.provenance == Provenance("group", "empirical", "token", "tokens", 1, "float32",
                                               {"0.weight": ffx.Group("o i -> o")}, {"0.weight": (4, 3)})
