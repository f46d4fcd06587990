"""Fisher files: round trips, what a plain safetensors reader sees, refusing bad files, atomic writes."""

import json
import multiprocessing
import os
import pathlib
import random
import signal
import sys
import time
from typing import NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fisherfx as ffx
from fisherfx.io import atomic_write, load, read_header, save
from fisherfx.state import Provenance
from fisherfx.testing import assert_tree_close
from tests.strategies import BITWISE, build, randint, randn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "files.md"


@pytest.fixture(scope="module")
def made():
    """A tiny attention model, its parameters and one estimate of every kind."""
    from tests.strategies import AttentionNet

    model = build(AttentionNet, seed=0)
    problem = ffx.supervised(model, ffx.Categorical())
    params = ffx.params_of(model)
    batch = (randn(1, 3, 4, 4), randint(2, 3, 3, 4))
    spec = ffx.heads(params, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    diag = ffx.diag_fisher(problem, params, batch, kind="mc", n_samples=2, generator=gen, normalize="tokens")
    return {
        "params": params,
        "diag": diag,
        "heads": ffx.group_fisher(problem, params, batch, spec, per="token", normalize="tokens"),
        "mask": ffx.mask_importance(problem, params, batch, ffx.channels(params)),
        "whole": ffx.group_fisher(problem, params, batch, ffx.whole(params), storage_dtype=torch.bfloat16),
        "ema": ffx.ema_update(ffx.ema_init(diag, 0.95), diag),
        "sums": ffx.sum_update(ffx.sum_init(diag), diag),
        "hand-made": ffx.Estimate({"w": torch.ones(2, 2, dtype=torch.float64)}, torch.tensor(7)),
        "empty shard": ffx.Estimate({"w": torch.zeros(3)}, torch.tensor(0), diag.provenance),
    }


def values_of(obj):
    return obj.value if isinstance(obj, ffx.Estimate) else obj.mean if isinstance(obj, ffx.EMAState) else obj.total


def assert_same(got, want):
    assert type(got) is type(want)
    assert_tree_close(values_of(got), values_of(want), **BITWISE)  # dtype included
    assert got.provenance == want.provenance
    for field in ("count", "step"):
        if field in want._fields:
            have, expect = getattr(got, field), getattr(want, field)
            assert have.dtype == torch.int64 and have.shape == () and int(have) == int(expect)
    if isinstance(want, ffx.EMAState):
        assert got.decay == want.decay


# --- round trips ---------------------------------------------------------------------------------------

OBJECTS = ["diag", "heads", "mask", "whole", "ema", "sums", "hand-made", "empty shard"]


@pytest.mark.parametrize("name", OBJECTS)
def test_round_trip(made, tmp_path, name):
    path = tmp_path / "f.safetensors"
    save(path, made[name])
    assert_same(load(path), made[name])


def test_round_trip_of_tasks(made, tmp_path):
    tasks = {"sin": made["ema"], "cos": made["heads"], "all of it": made["sums"]}
    save(tmp_path / "t.safetensors", tasks, metadata={"model": "tiny", "steps": [1, 2]})
    got = load(tmp_path / "t.safetensors")
    assert list(got) == list(tasks)
    for task in tasks:
        assert_same(got[task], tasks[task])
    assert read_header(tmp_path / "t.safetensors").fields["metadata"] == {"model": "tiny", "steps": [1, 2]}


def test_a_plain_safetensors_reader_sees_flat_keys(made, tmp_path):
    save(tmp_path / "d.safetensors", made["diag"])
    assert_tree_close(load_file(tmp_path / "d.safetensors"), made["diag"].value, **BITWISE)  # a state dict
    save(tmp_path / "t.safetensors", {"a": made["heads"], "b": made["whole"]})
    keys = set(load_file(tmp_path / "t.safetensors"))
    assert {"a/attn.q_proj.weight|h", "a/attn.o_proj.weight|h", "b/head.bias|"} <= keys
    with safe_open(tmp_path / "t.safetensors", framework="pt") as f:
        meta = f.metadata()
    header = json.loads(meta["fisherfx"])
    assert meta["format"] == "fisherfx" and header["format_version"] == 1
    assert header["torch_version"] == torch.__version__ and header["fisherfx_version"] == ffx.__version__
    a = header["tasks"]["a"]
    assert a["type"] == "Estimate" and a["count"] == int(made["heads"].count)
    assert a["provenance"]["kind"] == "empirical" and a["provenance"]["per"] == "token"
    assert a["provenance"]["groups"]["attn.q_proj.weight"] == {"pattern": "(h d) i -> h", "sizes": {"h": 2}}
    assert a["prefix"] == "a/" and a["params"]["attn.q_proj.weight"] == {"key": "attn.q_proj.weight|h", "shape": [2]}


def test_header_of_an_ema(made, tmp_path):
    save(tmp_path / "e.safetensors", made["ema"])
    fields = read_header(tmp_path / "e.safetensors").fields
    assert (fields["type"], fields["decay"], fields["step"]) == ("EMAState", 0.95, 1)
    assert fields["provenance"]["kind"] == "mc" and fields["provenance"]["n_samples"] == 2
    assert fields["params"]["attn.q_proj.weight"]["shape"] == [4, 4]


def test_save_replaces_the_file_and_leaves_no_temporary(made, tmp_path):
    path = tmp_path / "f.safetensors"
    save(path, made["diag"])
    save(path, made["sums"])
    assert_same(load(path), made["sums"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_a_new_file_gets_the_usual_permissions(made, tmp_path):
    mask = os.umask(0o022)
    try:
        save(tmp_path / "f.safetensors", made["diag"])
    finally:
        os.umask(mask)
    assert (tmp_path / "f.safetensors").stat().st_mode & 0o777 == 0o644


# --- loading against params --------------------------------------------------------------------------

def test_load_checks_names_and_shapes(made, tmp_path):
    params = made["params"]
    save(tmp_path / "f.safetensors", {"diag": made["diag"], "heads": made["heads"]})
    load(tmp_path / "f.safetensors", params, partial=True)  # heads() covers the projections only
    with pytest.raises(ffx.FisherError, match=r"task 'heads': in params but not in the file: .*'head.weight'"):
        load(tmp_path / "f.safetensors", params)
    other = {**{k: v for k, v in params.items() if k != "head.bias"}, "head.extra": torch.zeros(3),
             "attn.q_proj.weight": torch.zeros(6, 4)}
    with pytest.raises(ffx.FisherError) as err:
        load(tmp_path / "f.safetensors", other)
    message = str(err.value)
    assert message.startswith("load: ") and "does not fit params" in message
    for part in ("task 'diag': in the file but not in params: 'head.bias'",
                 "task 'diag': in params but not in the file: 'head.extra'",
                 "task 'diag': 'attn.q_proj.weight': the file has shape (4, 4), params (6, 4)",
                 "task 'heads': 'attn.q_proj.weight': the file's values are of a parameter of shape (4, 4), params "
                 "(6, 4)"):
        assert part in message, message


def test_load_names_params_missing_from_the_file(made, tmp_path):
    save(tmp_path / "f.safetensors", made["mask"])
    load(tmp_path / "f.safetensors", made["params"])  # channels() covers every parameter here
    bigger = {**made["params"], "extra.weight": torch.zeros(2, 2)}
    with pytest.raises(ffx.FisherError, match=r"in params but not in the file: 'extra.weight' \(pass partial=True"):
        load(tmp_path / "f.safetensors", bigger)
    load(tmp_path / "f.safetensors", bigger, partial=True)


@pytest.mark.parametrize(("shape", "message"), [
    ((5, 4), r"the file's group pattern '\(h d\) i -> h' does not fit the parameter's shape \(5, 4\)"),
    ((6, 4), r"the file has group values \(2,\), params of shape \(6, 4\) give \(3,\) under '\(h d\) i -> h'"),
])
def test_group_values_without_parameter_shapes_are_checked_by_their_pattern(tmp_path, shape, message):
    spec = {"q.weight": ffx.Group("(h d) i -> h", {"d": 2})}
    est = ffx.Estimate({"q.weight": torch.ones(2)}, torch.tensor(1), Provenance(quantity="group", groups=spec))
    save(tmp_path / "f.safetensors", est)
    load(tmp_path / "f.safetensors", {"q.weight": torch.zeros(4, 4)})
    with pytest.raises(ffx.FisherError, match=rf"load: .* does not fit params: 'q.weight': {message}"):
        load(tmp_path / "f.safetensors", {"q.weight": torch.zeros(shape)})


# --- files that are not good ---------------------------------------------------------------------------

def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ffx.FisherError, match="load: no file at"):
        load(tmp_path / "absent.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ffx.FisherError, match="is not a readable fisherfx file: the file is empty"):
        load(tmp_path / "empty.safetensors")


def test_foreign_files(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors", metadata={"format": "pt"})
    with pytest.raises(ffx.FisherError, match="a safetensors file without a fisherfx header"):
        load(tmp_path / "plain.safetensors")
    torch.save({"w": torch.ones(2)}, tmp_path / "pickle.pt")
    (tmp_path / "text.json").write_text('{"hello": "world"}' * 10)
    for name in ("pickle.pt", "text.json"):
        with pytest.raises(ffx.FisherError, match="not a safetensors file, or truncated or corrupted"):
            load(tmp_path / name)


def test_a_newer_format_asks_for_an_upgrade(tmp_path):
    import zlib

    text = json.dumps({"format": "fisherfx", "format_version": 99, "type": "Estimate", "tensors": {}})
    save_file({"w": torch.ones(2)}, tmp_path / "new.safetensors",
              metadata={"format": "fisherfx", "fisherfx": text, "fisherfx_crc32": str(zlib.crc32(text.encode()))})
    with pytest.raises(ffx.FisherError, match="format version 99, newer than this fisherfx reads \\(2\\); upgrade"):
        load(tmp_path / "new.safetensors")


@pytest.mark.parametrize("keep", [0.99, 0.9, 0.5, 0.1, 8 / 870])
def test_truncated_files(made, tmp_path, keep):
    save(tmp_path / "f.safetensors", made["diag"])
    raw = (tmp_path / "f.safetensors").read_bytes()
    (tmp_path / "f.safetensors").write_bytes(raw[:max(1, int(keep * len(raw)))])
    with pytest.raises(ffx.FisherError, match="is not a readable fisherfx file"):
        load(tmp_path / "f.safetensors")


def test_every_corrupted_byte_is_refused_or_harmless(tmp_path):
    # one flipped bit anywhere (length prefix, safetensors header, fisherfx header, tensor data): a
    # FisherError, or (if it changed nothing that is read) the same content; never other values
    want = ffx.Estimate({"w": torch.arange(6.0).reshape(2, 3), "b|x": torch.ones(2)}, torch.tensor(3),
                        Provenance("diagonal", "empirical", "sample", "samples", 1, "float32", None))
    save(tmp_path / "good.safetensors", want)
    raw = (tmp_path / "good.safetensors").read_bytes()
    refused = 0
    for i in range(0, len(raw), 2):
        for bit in (0x01, 0x80) if i % 4 == 0 else (0x10,):
            bad = bytearray(raw)
            bad[i] ^= bit
            (tmp_path / "bad.safetensors").write_bytes(bytes(bad))
            try:
                got = load(tmp_path / "bad.safetensors")
            except ffx.FisherError:
                refused += 1
                continue
            assert_same(got, want)
    assert refused > 0.9 * len(raw) * 0.75


# --- atomic writes -------------------------------------------------------------------------------------

def test_a_failed_write_leaves_the_previous_file(made, tmp_path):
    path = tmp_path / "f.safetensors"
    save(path, made["diag"])

    def fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert_same(load(path), made["diag"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]
    with pytest.raises(ffx.FisherError, match="save: metadata must be JSON-able"):
        save(path, made["sums"], metadata={"bad": object()})
    assert_same(load(path), made["diag"])


def _write_forever(path: str, versions: list) -> None:
    """The writer: alternate between the versions until killed."""
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (save needs none anyway)
    while True:
        for v in versions:
            save(path, v)


def _saved_since(path: str, inode: int, timeout: float) -> bool:
    """Whether a save replaced ``path`` (a new inode) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while os.stat(path).st_ino == inode:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    return True


def test_a_writer_killed_mid_save_leaves_a_loadable_file(tmp_path):
    # Kill a writer process (SIGKILL, no cleanup) at random moments, many times: the file on disk is
    # always one complete version. Each writer is killed at a random time within about one save after
    # its first save landed (how long a save takes varies with the disk's load, fsync above all). Go on
    # until some kill has hit a save mid-way (a temporary file was left) and both versions were seen.
    versions = [ffx.Estimate({"w": torch.full((1 << 20,), float(k))}, torch.tensor(k)) for k in (1, 2)]
    path = str(tmp_path / "f.safetensors")
    save(path, versions[1])
    context = multiprocessing.get_context("fork")  # the writer starts in milliseconds, torch already loaded
    rng = random.Random(0)
    seen, interrupted, kills = set(), 0, 0
    while kills < 6 or not (interrupted and seen == {1, 2}) and kills < 60:
        inode, start = os.stat(path).st_ino, time.perf_counter()
        writer = context.Process(target=_write_forever, args=(path, versions), daemon=True)
        writer.start()
        progressed = _saved_since(path, inode, timeout=30)
        time.sleep(rng.uniform(0, 2 * (time.perf_counter() - start)))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
        assert progressed, "a writer completed no save in 30 s"
        assert writer.exitcode == -signal.SIGKILL
        kills += 1
        got = load(path)  # never a partial file
        k = int(got.count)
        assert_tree_close(got.value, versions[k - 1].value, **BITWISE)
        seen.add(k)
        leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        interrupted += bool(leftovers)
        for p in leftovers:
            p.unlink()
    assert interrupted and seen == {1, 2}, f"{kills} kills: {interrupted} mid-save, versions seen {seen}"


# --- what cannot be stored ----------------------------------------------------------------------------

@pytest.mark.parametrize(("obj", "message"), [
    ({"w": torch.ones(2)}, r"save: cannot store task 'w' of type Tensor"),
    (torch.ones(2), r"save: cannot store an object of type Tensor; expected one of \['Estimate', 'EMAState', "
                    r"'SumState', 'KFAC', 'KFACEMAState'\] or a \{task: state\} dict"),
    ({1: ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1))}, r"save: task names must be strings without '/' .*"
                                                                r", got 1"),
    ({"a/b": ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1))}, r"task names must be strings without '/'"),
])
def test_what_cannot_be_stored(tmp_path, obj, message):
    with pytest.raises(ffx.FisherError, match=message):
        save(tmp_path / "f.safetensors", obj)
    assert not list(tmp_path.iterdir())


def test_without_safetensors_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    with pytest.raises(ffx.FisherError, match="save: fisherfx files need the safetensors package: pip install"):
        save(tmp_path / "f.safetensors", ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1)))


def test_a_provenance_of_none_is_stored_as_unknown(tmp_path):
    save(tmp_path / "f.safetensors", ffx.Estimate({"w": torch.ones(2)}, torch.tensor(1), None))
    assert load(tmp_path / "f.safetensors").provenance == Provenance()


def test_tied_values_are_stored_twice(tmp_path):
    shared = torch.ones(3)
    est = ffx.Estimate({"a": shared, "b": shared}, torch.tensor(1))
    save(tmp_path / "f.safetensors", est)
    assert_same(load(tmp_path / "f.safetensors"), est)


def test_a_codec_can_name_its_type_without_importing_it(tmp_path, monkeypatch):
    # the extension point: a type registered by "module.QualName", as K-FAC factors would be
    import fisherfx.io as io

    def encode(obj):
        return {"x|A": obj.value["x"]}, {"count": int(obj.count)}

    def decode(tensors, fields):
        return ffx.Estimate({"x": tensors["x|A"]}, torch.tensor(fields["count"]))

    codec = io.Codec("Toy", f"{ToyFactors.__module__}.{ToyFactors.__qualname__}", encode, decode,
                     lambda obj, params, partial: [])
    monkeypatch.setattr(io, "CODECS", [*io.CODECS, codec])
    save(tmp_path / "toy.safetensors", {"t": ToyFactors({"x": torch.ones(2, 2)}, torch.tensor(3))})
    assert set(load_file(tmp_path / "toy.safetensors")) == {"t/x|A"}
    assert int(load(tmp_path / "toy.safetensors")["t"].count) == 3


class ToyFactors(NamedTuple):
    value: dict
    count: torch.Tensor




# --- K-FAC factors ---------------------------------------------------------------------------------------

def kfac_module():
    import importlib

    return importlib.import_module("fisherfx._kfac")


@pytest.fixture(scope="module")
def factors():
    """K-FAC of an MLP (layers with biases) and of GPT-2 (transposed Conv1D, an Embedding's diagonal A, diagonals)."""
    from tests.cases import BY_NAME
    from tests.cases import build as build_case

    k = kfac_module()
    out = {}
    for name in ("mlp-categorical", "gpt2-right-pad"):
        b = build_case(BY_NAME[name])
        fac = k.kfac(b.problem, b.params, b.batch, normalize="tokens" if name.startswith("gpt2") else "samples")
        out[name] = (b.params, fac)
    return out


def assert_same_kfac(got, want):
    k = kfac_module()
    assert type(got) is type(want)
    if isinstance(want, k.KFACEMAState):
        for part in ("A", "G", "diagonal"):
            assert_same(getattr(got, part), getattr(want, part))
        assert (got.names, got.transposed, got.shapes, got.mode, got.kind, got.provenance) == \
               (want.names, want.transposed, want.shapes, want.mode, want.kind, want.provenance)
        return
    assert list(got.layers) == list(want.layers) and list(got.diagonal) == list(want.diagonal)
    for key, layer in want.layers.items():
        g = got.layers[key]
        assert (g.names, g.transposed, int(g.a_count), g.a_count.dtype) == \
               (layer.names, layer.transposed, int(layer.a_count), torch.int64)
        assert_tree_close({"A": g.A, "G": g.G}, {"A": layer.A, "G": layer.G}, **BITWISE)
    assert_tree_close(got.diagonal, want.diagonal, **BITWISE)
    assert int(got.count) == int(want.count) and got.count.dtype == torch.int64
    assert (got.shapes, got.mode, got.kind, got.provenance) == (want.shapes, want.mode, want.kind, want.provenance)
    assert (got.eig is None) == (want.eig is None)
    if want.eig is not None:
        for key, e in want.eig.items():
            for field, t in e._asdict().items():
                have = getattr(got.eig[key], field)
                assert (have is None) == (t is None), (key, field)
                if t is not None:
                    assert torch.equal(have, t), (key, field)


@pytest.mark.parametrize("name", ["mlp-categorical", "gpt2-right-pad"])
def test_kfac_round_trip(factors, tmp_path, name):
    k = kfac_module()
    params, fac = factors[name]
    path = tmp_path / "k.safetensors"
    save(path, fac)
    assert_same_kfac(load(path, params=params), fac)
    save(path, k.kfac_eig(fac))  # the eigendecompositions are kept
    assert_same_kfac(load(path), k.kfac_eig(fac))
    state = k.kfac_ema_update(k.kfac_ema_init(fac, 0.9), fac)
    save(path, {"ema": state, "fresh": k.kfac_ema_init(fac, 0.5), "kfac": fac})
    got = load(path, params=params)
    assert_same_kfac(got["ema"], state)
    assert_same_kfac(got["fresh"], k.kfac_ema_init(fac, 0.5))
    assert_same_kfac(got["kfac"], fac)
    assert_same_kfac(k.kfac_ema_value(got["ema"]), k.kfac_ema_value(state))


def test_an_ekfac_keeps_its_eigenvalues(factors, tmp_path):
    from tests.cases import BY_NAME
    from tests.cases import build as build_case

    k = kfac_module()
    b = build_case(BY_NAME["mlp-categorical"])
    e = k.ekfac(b.problem, b.params, b.batch)
    save(tmp_path / "e.safetensors", e)
    got = load(tmp_path / "e.safetensors")
    assert_same_kfac(got, e)
    assert got.provenance.quantity == "ekfac"
    assert float(k.kfac_trace(got)) == float(k.kfac_trace(e))


def test_a_plain_reader_sees_the_factors_under_flat_keys(factors, tmp_path):
    params, fac = factors["gpt2-right-pad"]
    save(tmp_path / "k.safetensors", fac)
    tensors = load_file(tmp_path / "k.safetensors")
    want = {f"{key}|{side}" for key in fac.layers for side in "AG"} | {f"{n}|diag" for n in fac.diagonal}
    assert set(tensors) == want
    layer = fac.layers["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.weight|A"], layer.A)
    header = read_header(tmp_path / "k.safetensors").fields
    assert header["type"] == "KFAC" and header["mode"] == "expand" and header["count"] == int(fac.count)
    assert header["provenance"]["quantity"] == "kfac" and header["provenance"]["normalize"] == "tokens"
    assert header["layers"]["transformer.h.1.attn.c_attn.weight"]["names"] == list(layer.names)
    assert header["params"]["transformer.wte.weight"] == {"shape": list(params["transformer.wte.weight"].shape)}


def test_load_checks_the_factors_against_params(factors, tmp_path):
    params, fac = factors["mlp-categorical"]
    save(tmp_path / "k.safetensors", fac)
    other = {**{k: v for k, v in params.items() if k != "2.bias"}, "0.weight": torch.zeros(6, 5),
             "0.bias": torch.zeros(6), "3.weight": torch.zeros(1)}
    with pytest.raises(ffx.FisherError) as err:
        load(tmp_path / "k.safetensors", other)
    message = str(err.value)
    for part in ("in the file but not in params: '2.bias'", "in params but not in the file: '3.weight'",
                 "'0.weight': the file has shape (6, 4), params (6, 5)",
                 "layer '0.weight': the file's factors are A 5, G 6 (a layout of 6 x 5), the parameters ['0.weight', "
                 "'0.bias'] of params give 6 x 6"):
        assert part in message, message
    load(tmp_path / "k.safetensors", {**params, "3.weight": torch.zeros(1)}, partial=True)


def test_show_prints_a_kfac_file(factors, tmp_path, capsys):
    from fisherfx._cli_fisher import show

    k = kfac_module()
    _, fac = factors["gpt2-right-pad"]
    save(tmp_path / "k.safetensors", {"f": fac, "ema": k.kfac_ema_init(fac)})
    show(str(tmp_path / "k.safetensors"), top=1)
    out = capsys.readouterr().out
    assert "[f] provenance: quantity=kfac, kind=empirical" in out and "[f] mode: expand" in out
    assert "layer transformer.wpe.weight (transformer.wpe.weight, transposed): A diagonal" in out
    assert f"[f] trace: {float(k.kfac_trace(fac)):.6g}" in out
    assert "(no update yet)" in out
