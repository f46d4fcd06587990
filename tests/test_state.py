"""EMA, running sums, combine and cast against hand-written loops."""

import pytest
import torch

import fisherfx as ffx
from fisherfx.testing import assert_tree_close
from tests.strategies import BITWISE, SAME_MATH_F64, randn

F64 = torch.float64
DECAYS = (0.1, 0.5, 0.9, 0.999)


def estimate(seed: int, count: int = 4, dtype: torch.dtype = F64) -> ffx.Estimate:
    return ffx.Estimate({"w": randn(seed, 3, 2, dtype=dtype).abs(), "b": randn(seed + 1, 2, dtype=dtype).abs()},
                        torch.tensor(count))


def stream(steps: int, dtype: torch.dtype = F64) -> list[ffx.Estimate]:
    return [estimate(10 * k, count=k + 1, dtype=dtype) for k in range(steps)]


# --- EMA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", DECAYS)
def test_ema_follows_the_recursion(decay):
    ests = stream(7)
    state = ffx.ema_init(ests[0], decay)
    m = {k: torch.zeros_like(v) for k, v in ests[0].value.items()}  # m_0 = 0
    for k, est in enumerate(ests, start=1):
        state = ffx.ema_update(state, est)
        m = {n: decay * m[n] + (1 - decay) * est.value[n] for n in m}
        assert_tree_close(state.mean, m, **SAME_MATH_F64)
        assert_tree_close(ffx.ema_value(state, bias_corrected=False), m, **SAME_MATH_F64)
        assert_tree_close(ffx.ema_value(state), {n: v / (1 - decay**k) for n, v in m.items()}, **SAME_MATH_F64)


def test_ema_bias_correction_after_one_step_is_the_estimate():
    est = estimate(3)
    state = ffx.ema_update(ffx.ema_init(est, 0.9), est)
    assert_tree_close(ffx.ema_value(state), est.value, **SAME_MATH_F64)
    assert_tree_close(ffx.ema_value(state, bias_corrected=False), {k: 0.1 * v for k, v in est.value.items()},
                        **SAME_MATH_F64)


def test_ema_of_a_sequence_weights_recent_estimates_more():
    # two steps, β = 0.5: m_2 = 0.25 F_1 + 0.5 F_2, corrected by 1 − 0.25 = 0.75
    f1, f2 = estimate(1), estimate(2)
    state = ffx.ema_init(f1, 0.5)
    for f in (f1, f2):
        state = ffx.ema_update(state, f)
    expected = {k: (0.25 * f1.value[k] + 0.5 * f2.value[k]) / 0.75 for k in f1.value}
    assert_tree_close(ffx.ema_value(state), expected, **SAME_MATH_F64)


def test_ema_step_counting():
    est = estimate(0)
    state = ffx.ema_init(est, 0.9)
    assert isinstance(state, ffx.EMAState)
    assert state.step.dtype == torch.int64 and state.step.shape == () and int(state.step) == 0
    assert state.decay == 0.9
    states = [state]
    for _ in range(5):
        states.append(ffx.ema_update(states[-1], est))
    assert [int(s.step) for s in states] == [0, 1, 2, 3, 4, 5]  # earlier states keep their own count
    assert all(s.step.dtype == torch.int64 for s in states)


def test_ema_init_takes_names_and_shapes_only():
    params = {"w": torch.full((3, 2), 7.0), "b": torch.full((2,), 7.0)}
    for like in (params, ffx.Estimate(params, torch.tensor(3))):
        state = ffx.ema_init(like, 0.8)
        assert_tree_close(state.mean, {k: torch.zeros_like(v) for k, v in params.items()}, **BITWISE)


@pytest.mark.parametrize(("est_dtype", "mean_dtype"),
                         [(torch.float32, torch.float32), (F64, F64), (torch.bfloat16, torch.float32),
                          (torch.float16, torch.float32)])
def test_ema_accumulates_in_float32_or_float64(est_dtype, mean_dtype):
    est = estimate(0, dtype=est_dtype)
    state = ffx.ema_update(ffx.ema_init(est, 0.9), est)
    assert all(m.dtype == mean_dtype for m in state.mean.values())
    assert all(v.dtype == mean_dtype for v in ffx.ema_value(state).values())
    assert_tree_close(ffx.ema_value(state), {k: v.to(mean_dtype) for k, v in est.value.items()},
                        rtol=1e-6, atol=0)


def test_ema_with_decay_close_to_one_stays_accurate_in_float32():
    # the bias correction 1 − β^k is tiny here; computed in float64 it loses nothing
    est = estimate(0, dtype=torch.float32)
    state = ffx.ema_init(est, 0.9999)
    for _ in range(3):
        state = ffx.ema_update(state, est)
    assert_tree_close(ffx.ema_value(state), est.value, rtol=1e-4, atol=0)


# --- running sums and combine -----------------------------------------------------------------------

def test_running_sums_follow_the_formula():
    ests = stream(4)
    state = ffx.sum_init(ests[0])
    assert int(state.count) == 0 and state.count.dtype == torch.int64
    for est in ests:
        state = ffx.sum_update(state, est)
    counts = sum(int(e.count) for e in ests)
    expected = {k: sum(int(e.count) * e.value[k] for e in ests) for k in ests[0].value}
    assert_tree_close(state.total, expected, **SAME_MATH_F64)
    result = ffx.sum_value(state)
    assert isinstance(result, ffx.Estimate) and int(result.count) == counts
    assert_tree_close(result.value, {k: v / counts for k, v in expected.items()}, **SAME_MATH_F64)


def test_combine_is_count_weighted():
    a, b, c = estimate(0, count=2), estimate(1, count=5), estimate(2, count=1)
    got = ffx.combine([a, b, c])
    assert int(got.count) == 8
    expected = {k: (2 * a.value[k] + 5 * b.value[k] + c.value[k]) / 8 for k in a.value}
    assert_tree_close(got.value, expected, **SAME_MATH_F64)


def test_combine_of_one_estimate_is_that_estimate():
    est = estimate(4, count=3, dtype=torch.float32)
    got = ffx.combine([est])
    assert int(got.count) == 3
    assert_tree_close(got.value, est.value, rtol=1e-7, atol=0)


def test_combine_keeps_a_low_precision_storage_dtype():
    parts = [ffx.cast(estimate(s, count=s + 1), torch.bfloat16) for s in range(3)]
    got = ffx.combine(parts)
    assert all(v.dtype == torch.bfloat16 for v in got.value.values())


def test_state_updates_do_not_mutate_inputs():
    a, b = estimate(0), estimate(1)
    before = {k: v.clone() for k, v in a.value.items()}
    sums = ffx.sum_update(ffx.sum_init(a), a)
    sums_before = {k: v.clone() for k, v in sums.total.items()}
    ffx.sum_update(sums, b)
    ffx.combine([a, b])
    ffx.cast(a, torch.bfloat16)
    assert_tree_close(a.value, before, **BITWISE)
    assert_tree_close(sums.total, sums_before, **BITWISE)
    assert int(sums.count) == int(a.count)


# --- cast -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_changes_storage_and_keeps_the_count(dtype):
    est = estimate(0, count=7)
    stored = ffx.cast(est, dtype, device="cpu")
    assert int(stored.count) == 7 and stored.count.dtype == torch.int64
    assert all(v.dtype == dtype and v.device == torch.device("cpu") for v in stored.value.values())
    assert_tree_close(stored.value, {k: v.to(dtype) for k, v in est.value.items()}, **BITWISE)
    assert all(v.dtype == F64 for v in est.value.values())  # the input is untouched


def test_cast_without_arguments_changes_nothing():
    est = estimate(0)
    same = ffx.cast(est)
    assert_tree_close(same.value, est.value, **BITWISE)
    assert int(same.count) == int(est.count)
