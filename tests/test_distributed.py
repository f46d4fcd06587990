"""all_reduce over two gloo processes on loopback: every rank gets the single-process result.

One run of two worker processes goes through every scenario below (process start and the gloo
rendezvous cost more than the scenarios); each scenario is then reported as its own test. Shards
are uneven (rank 0 has more batches than rank 1) and one scenario gives rank 1 no data at all.
"""

import datetime
import functools
import json
import multiprocessing
import os
import pathlib
import re
import socket
import traceback

import pytest
import torch
from torch import nn

import fisherfx as ffx
from fisherfx import _factor
from fisherfx._collect import collect
from fisherfx._factor import LowRank
from fisherfx._kfac import kfac_combine, kfac_dense
from fisherfx.distributed import all_reduce
from fisherfx.testing import assert_tree_close
from tests.strategies import SAME_MATH_F64, build, randint, randn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
WORLD = 2
F64 = torch.float64
SIZES = (3, 5, 2)  # rank 0 gets batches 0 and 1, rank 1 batch 2
SHARDS = {0: [0, 1], 1: [2]}


def setting():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), seed=0)
    batches = [(randn(10 + i, n, 3), randint(20 + i, 3, n)) for i, n in enumerate(SIZES)]
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batches, whole


def expect_error(fn, message: str) -> None:
    try:
        fn()
    except ffx.FisherError as err:
        assert message in str(err), str(err)
        return
    raise AssertionError(f"no FisherError (expected one saying {message!r})")


# --- the scenarios, run on every rank ---------------------------------------------------------------------

SCENARIOS = {}


class Skipped(Exception):
    """A scenario that cannot run here (reported as a skipped test)."""


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
def uneven_shards_give_the_estimate_of_all_the_data(rank):
    problem, params, batches, whole = setting()
    mine = collect(problem, params, [batches[i] for i in SHARDS[rank]], dtype=F64).fisher
    got = all_reduce(mine)
    want = ffx.diag_fisher(problem, params, whole, dtype=F64)
    assert_tree_close(got.value, want.value, **SAME_MATH_F64)
    assert int(got.count) == sum(SIZES) and got.provenance == want.provenance


@scenario
def group_estimates_in_tokens(rank):
    problem, params, batches, whole = setting()
    spec = ffx.channels(params)
    mine = collect(problem, params, [batches[i] for i in SHARDS[rank]], groups=spec, normalize="tokens",
                   dtype=F64).fisher
    want = ffx.group_fisher(problem, params, whole, spec, normalize="tokens", dtype=F64)
    got = all_reduce(mine)
    assert_tree_close(got.value, want.value, **SAME_MATH_F64)
    assert got.provenance == want.provenance


@scenario
def small_buckets_give_the_same_result(rank):
    import fisherfx.distributed as distributed

    problem, params, batches, whole = setting()
    mine = collect(problem, params, [batches[i] for i in SHARDS[rank]], dtype=F64).fisher
    saved = distributed.BUCKET_BYTES
    distributed.BUCKET_BYTES = 40  # a few entries per buffer: many buffers, tensors never split
    try:
        got = all_reduce(mine)
    finally:
        distributed.BUCKET_BYTES = saved
    assert_tree_close(got.value, ffx.diag_fisher(problem, params, whole, dtype=F64).value, **SAME_MATH_F64)


@scenario
def running_sums_add_up(rank):
    problem, params, batches, whole = setting()
    state = None
    for i in SHARDS[rank]:
        est = ffx.diag_fisher(problem, params, batches[i], dtype=F64)
        state = ffx.sum_update(state or ffx.sum_init(est), est)
    got = all_reduce(state)
    assert isinstance(got, ffx.SumState) and int(got.count) == sum(SIZES)
    assert_tree_close(ffx.sum_value(got).value, ffx.diag_fisher(problem, params, whole, dtype=F64).value,
                      **SAME_MATH_F64)


@scenario
def low_precision_storage_is_kept(rank):
    problem, params, batches, whole = setting()
    mine = ffx.combine([ffx.diag_fisher(problem, params, batches[i]) for i in SHARDS[rank]])
    got = all_reduce(ffx.cast(mine, torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in got.value.values())
    want = ffx.diag_fisher(problem, params, whole)
    assert_tree_close(got.value, {k: v.to(torch.bfloat16) for k, v in want.value.items()}, rtol=2e-2, atol=1e-6)


@scenario
def a_rank_with_an_empty_shard_contributes_nothing(rank):
    problem, params, batches, _ = setting()
    mine = collect(problem, params, batches[:2] if rank == 0 else [], dtype=F64).fisher
    got = all_reduce(mine)
    want = ffx.diag_fisher(problem, params, (torch.cat([batches[0][0], batches[1][0]]),
                                             torch.cat([batches[0][1], batches[1][1]])), dtype=F64)
    assert_tree_close(got.value, want.value, **SAME_MATH_F64)
    assert int(got.count) == SIZES[0] + SIZES[1]


@scenario
def no_rank_with_data_is_an_error_everywhere(rank):
    problem, params, _, _ = setting()
    empty = collect(problem, params, []).fisher
    expect_error(lambda: all_reduce(empty), "all_reduce: every rank's estimate has count 0; no rank had data")


@scenario
def different_kinds_are_refused_on_every_rank(rank):
    problem, params, batches, _ = setting()
    kind = "empirical" if rank == 0 else "mc"
    est = ffx.diag_fisher(problem, params, batches[rank], kind=kind, generator=torch.Generator().manual_seed(0))
    expect_error(lambda: all_reduce(est), "all_reduce: cannot mix estimates of different kind: rank 0: "
                                          "kind='empirical'; rank 1: kind='mc'")


@scenario
def different_parameters_are_refused_on_every_rank(rank):
    problem, params, batches, _ = setting()
    names = list(params) if rank == 0 else list(params)[:2]
    est = ffx.diag_fisher(problem, {k: params[k] for k in names}, batches[rank])
    expect_error(lambda: all_reduce(est), "all_reduce: rank 0 and rank 1 hold different parameters: names only "
                                          "on one of them: ['2.bias', '2.weight']")


@scenario
def an_ema_is_refused(rank):
    problem, params, batches, _ = setting()
    est = ffx.diag_fisher(problem, params, batches[rank])
    expect_error(lambda: all_reduce(ffx.ema_update(ffx.ema_init(est, 0.9), est)),
                 "reduce the estimate before the update")
    state = ffx.ema_update(ffx.ema_init(est, 0.9), all_reduce(est))  # the documented way: same state everywhere
    everyone = [None] * WORLD
    torch.distributed.all_gather_object(everyone, state.mean)
    assert_tree_close(everyone[0], everyone[1], rtol=0, atol=0)


@scenario
def fsdp2_full_state_dict_to_a_plain_copy(rank):
    # the recipe of docs/distributed.md: gather the full state dict of a fully_shard-ed model into a plain
    # instance built on the meta device, then collect and reduce as for any replicated model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def make_model():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)

    problem, params, batches, whole = setting()
    sharded = make_model()
    sharded.load_state_dict(problem.model.state_dict())
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(sharded[0], mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert type(sharded[0].weight).__name__ == "DTensor" and sharded[0].weight.to_local().shape[0] == 2
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        plain = make_model()
    plain.load_state_dict(full, assign=True)
    plain_problem = ffx.supervised(plain.eval(), ffx.Categorical())
    got = all_reduce(collect(plain_problem, ffx.params_of(plain), [batches[i] for i in SHARDS[rank]],
                             dtype=F64).fisher)
    assert_tree_close(got.value, ffx.diag_fisher(problem, params, whole, dtype=F64).value, **SAME_MATH_F64)


# --- K-FAC factors ---------------------------------------------------------------------------------------

def kfac_of(problem, params, batches, **options):
    return kfac_combine([ffx.kfac(problem, params, b, dtype=F64, **options) for b in batches])


def assert_same_factors(got, want):
    assert list(got.layers) == list(want.layers) and list(got.diagonal) == list(want.diagonal)
    for key, layer in want.layers.items():
        g = got.layers[key]
        assert_tree_close({"A": g.A, "G": g.G}, {"A": layer.A, "G": layer.G}, **SAME_MATH_F64)
        assert int(g.a_count) == int(layer.a_count) and g.names == layer.names
    assert_tree_close(got.diagonal, want.diagonal, **SAME_MATH_F64)
    assert int(got.count) == int(want.count) and got.provenance == want.provenance
    assert (got.mode, got.kind, got.shapes, got.eig) == (want.mode, want.kind, want.shapes, None)


def token_setting():
    """A per-position tagger on ``[N, T, 3]`` with padded targets (``-100``) and a LayerNorm (a diagonal)."""
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3)), seed=1)
    batches = []
    for i, n in enumerate(SIZES):
        y = randint(40 + i, 3, n, 4)
        y[torch.arange(n), torch.arange(n) % 4] = -100  # one padded position per row, not always the same
        batches.append((randn(30 + i, n, 4, 3), y))
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batches, whole


@scenario
def kfac_factors_of_uneven_shards_are_those_of_all_the_data(rank):
    problem, params, batches, whole = setting()
    got = all_reduce(kfac_of(problem, params, [batches[i] for i in SHARDS[rank]]))
    assert_same_factors(got, ffx.kfac(problem, params, whole, dtype=F64))


@scenario
def kfac_factors_of_padded_tokens(rank):
    problem, params, batches, whole = token_setting()
    for mode in ("expand", "reduce"):
        options = dict(mode=mode, normalize="tokens")
        got = all_reduce(kfac_of(problem, params, [batches[i] for i in SHARDS[rank]], **options))
        want = ffx.kfac(problem, params, whole, dtype=F64, **options)
        assert "2.weight" in want.diagonal
        assert_same_factors(got, want)


@scenario
def kfac_a_rank_with_zero_counts_contributes_nothing(rank):
    problem, params, batches, _ = setting()
    mine = kfac_of(problem, params, batches[:2])
    if rank == 1:  # no data: factors of the same structure with zero counts
        zero = torch.zeros((), dtype=torch.int64)
        mine = mine._replace(count=zero, layers={k: f._replace(a_count=zero) for k, f in mine.layers.items()})
    assert_same_factors(all_reduce(mine), kfac_of(problem, params, batches[:2]))


@scenario
def kfac_other_modes_or_kinds_are_refused_on_every_rank(rank):
    problem, params, batches, _ = setting()
    fac = ffx.kfac(problem, params, batches[rank], mode="expand" if rank == 0 else "reduce")
    expect_error(lambda: all_reduce(fac), "all_reduce: rank 0 and rank 1 hold factors of different mode: 'expand' "
                                          "on rank 0, 'reduce' on rank 1")
    fac = ffx.kfac(problem, params, batches[rank], kind="empirical" if rank == 0 else "mc",
                   generator=torch.Generator().manual_seed(0))
    expect_error(lambda: all_reduce(fac), "all_reduce: cannot mix estimates of different kind: rank 0: "
                                          "kind='empirical'; rank 1: kind='mc'")


def wide_setting():
    """A first layer of 30 inputs (+ bias: i = 31): the 10 rows of all shards pay (20 ≤ 31), kept low-rank."""
    model = build(lambda: nn.Sequential(nn.Linear(30, 4), nn.Tanh(), nn.Linear(4, 3)), seed=2)
    batches = [(randn(50 + i, n, 30), randint(60 + i, 3, n)) for i, n in enumerate(SIZES)]
    whole = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batches, whole


def assert_same_operator(got, want):
    """The same factors up to their form: each A as a matrix, G, counts, and the whole operator."""
    for key, layer in want.layers.items():
        g = got.layers[key]
        assert_tree_close({"A": _factor.dense(g.A), "G": g.G}, {"A": _factor.dense(layer.A), "G": layer.G},
                          **SAME_MATH_F64)
        assert int(g.a_count) == int(layer.a_count) and g.names == layer.names
    assert_tree_close({"F": kfac_dense(got)}, {"F": kfac_dense(want)}, **SAME_MATH_F64)
    assert int(got.count) == int(want.count) and got.provenance == want.provenance and got.eig is None


@scenario
def kfac_lowrank_rows_of_uneven_shards_are_gathered(rank):
    """Ranks hold 8 and 2 rows of the first layer: every rank gets all 10, in rank order, as kfac_combine."""
    problem, params, batches, whole = wide_setting()
    shards = {r: kfac_of(problem, params, [batches[i] for i in SHARDS[r]], a_form="lowrank") for r in SHARDS}
    got = all_reduce(shards[rank])
    a = got.layers["0.weight"].A
    assert isinstance(a, LowRank) and a.U.shape == (10, 31)
    want = kfac_combine([shards[0], shards[1]])
    assert torch.equal(a.U, want.layers["0.weight"].A.U)
    assert_same_operator(got, want)
    assert_same_operator(got, ffx.kfac(problem, params, whole, dtype=F64))


@scenario
def kfac_lowrank_rows_that_stop_paying_are_summed_dense(rank):
    """4 inputs, 10 rows: every rank densifies its A and the sums are reduced."""
    problem, params, batches, whole = setting()
    got = all_reduce(kfac_of(problem, params, [batches[i] for i in SHARDS[rank]], a_form="lowrank"))
    assert all(isinstance(layer.A, torch.Tensor) for layer in got.layers.values())
    assert_same_operator(got, ffx.kfac(problem, params, whole, dtype=F64))


@scenario
def kfac_mixed_forms_are_summed_dense(rank):
    problem, params, batches, whole = wide_setting()
    got = all_reduce(kfac_of(problem, params, [batches[i] for i in SHARDS[rank]],
                             a_form="dense" if rank == 0 else "lowrank"))
    assert isinstance(got.layers["0.weight"].A, torch.Tensor)
    assert_same_operator(got, ffx.kfac(problem, params, whole, dtype=F64))


@scenario
def kfac_lowrank_rank_without_data_sends_no_rows(rank):
    problem, params, batches, _ = wide_setting()
    mine = kfac_of(problem, params, batches[:2], a_form="lowrank")
    if rank == 1:  # no data: factors of the same structure with zero counts
        zero = torch.zeros((), dtype=torch.int64)
        mine = mine._replace(count=zero, layers={k: f._replace(a_count=zero) for k, f in mine.layers.items()})
    got = all_reduce(mine)
    assert got.layers["0.weight"].A.U.shape == (8, 31)  # rank 0's rows only
    assert_same_operator(got, kfac_of(problem, params, batches[:2]))


def _doc_scripts() -> list[str]:
    """The complete scripts of docs/distributed.md (``python`` fences; ``py`` ones are fragments)."""
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S) if DOCS.exists() else []


def _run_doc_script(index: int, rank: int) -> None:
    code = _doc_scripts()[index]
    missing = sorted({name for name in re.findall(r"ffx\.(\w+)", code) if not hasattr(ffx, name)})
    if missing:
        raise Skipped(f"docs/distributed.md script {index} calls {missing}, not in fisherfx yet")
    dist = torch.distributed
    saved = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = dist.destroy_process_group = lambda *args, **kwargs: None  # the run's group serves
    cwd = os.getcwd()
    os.chdir(os.environ["FISHERFX_TEST_FOLDER"])
    try:
        exec(compile(code, f"docs/distributed.md[{index}]", "exec"), {})
    finally:
        os.chdir(cwd)
        dist.init_process_group, dist.destroy_process_group = saved


for _index in range(len(_doc_scripts())):
    SCENARIOS[f"docs_script_{_index}"] = functools.partial(_run_doc_script, _index)


# --- the run ---------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      FISHERFX_TEST_FOLDER=os.path.dirname(out))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=30))
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                fn(rank)
                results[name] = "ok"
            except Skipped as why:
                results[name] = f"skip: {why}"
            except Exception:
                results[name] = traceback.format_exc()
            torch.distributed.barrier()
    finally:
        with open(out, "w") as f:
            json.dump(results, f)
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranks")
    # not fork: a forked worker of a parent whose OpenMP pool is running (any earlier test with a large tensor
    # op) can hang in its first parallel region. A fork server is a fresh process that imports this module
    # once (torch included) and forks both workers from there.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    port = _free_port()
    workers = [context.Process(target=_worker, args=(rank, port, str(folder / f"{rank}.json")), daemon=True)
               for rank in range(WORLD)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        if w.is_alive():
            w.kill()
    missing = [rank for rank in range(WORLD) if not (folder / f"{rank}.json").exists()]
    assert not missing, f"ranks {missing} reported nothing (exit codes {[w.exitcode for w in workers]})"
    return {rank: json.loads((folder / f"{rank}.json").read_text()) for rank in range(WORLD)}


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("rank", range(WORLD))
def test_scenario(outcomes, name, rank):
    result = outcomes[rank].get(name, "did not run")
    if result.startswith("skip: "):
        pytest.skip(result.removeprefix("skip: "))
    assert result == "ok", f"rank {rank}:\n{result}"


# --- without a process group ------------------------------------------------------------------------------

def test_all_reduce_needs_an_initialised_process_group():
    est = ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1))
    with pytest.raises(ffx.FisherError, match="all_reduce: torch.distributed is not initialised"):
        all_reduce(est)


@pytest.mark.parametrize(("obj", "message"), [
    ({"a": ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1))}, "got a dict"),
    (torch.ones(2), "expected an Estimate, a SumState or a KFAC, got Tensor"),
])
def test_all_reduce_takes_estimates_and_sums_only(obj, message):
    with pytest.raises(ffx.FisherError, match=message):
        all_reduce(obj)
