"""Fisher files: safetensors for the tensors, a JSON header for what they are; atomic writes.

A file holds one :class:`~fisherfx.Estimate`, :class:`~fisherfx.EMAState` or :class:`~fisherfx.SumState`,
or a ``{task: state}`` dict of them. Any safetensors reader sees the tensors under flat keys:

* ``"<param>"`` for per-entry values (a diagonal: a file that reads like a state dict),
* ``"<param>|<group axes>"`` for group values, e.g. ``"h.0.attn.c_attn.weight|h"`` (heads) or
  ``"fc.weight|o"`` (output channels); axes joined by ``","`` (``"three,h"``), ``""`` for a whole tensor,
* prefixed with ``"<task>/"`` in a dict file.

The safetensors metadata holds ``"format": "fisherfx"``, the header as JSON under ``"fisherfx"`` and
its CRC-32 under ``"fisherfx_crc32"``. The header: ``format_version``, ``type``, ``fisherfx_version``,
``torch_version``, the user's ``metadata``, and per state its ``provenance``, ``count`` (or ``decay`` and
``step``), ``params`` (``{name: {"key", "shape"}}``: names and value shapes; in a dict file each task's
keys follow its ``prefix``, ``"<task>/"``) and ``tensors`` (``{file key: {"shape", "dtype", "crc32"}}``),
so that a truncated or corrupted file is refused, never read. A codec sees its own keys, without the prefix.

Writes are atomic: the file is written under a temporary name in the same folder, flushed to disk
(``fsync``), renamed over the target (``os.replace``) and the folder synced. A writer killed at any
moment leaves the previous file as it was (and at worst a ``.<name>.<random>.tmp`` file beside it).

**Extension point.** Each storable type is a :class:`Codec` in :data:`CODECS`: its ``name`` (the
header's ``type``), the Python ``type``, ``encode(obj) -> (tensors by key, JSON-able fields)``,
``decode(tensors, fields) -> obj`` and ``differences(obj, params, partial) -> [messages]`` for
``load(params=...)``. K-FAC factors (``KFAC``, ``KFACEMAState``) are stored by codecs of their own under
``"<layer>|A"``, ``"<layer>|G"`` and ``"<name>|diag"`` (eigendecompositions, when present, under
``"<layer>|eig.<field>"``); a low-rank ``A`` (:class:`~fisherfx._factor.LowRank`) under ``"<layer>|A.U"`` and
``"<layer>|A.weights"``, its shift in the header. A file holding one has format version 2 (older fisherfx
refuse it by its version, not by a missing key); every other file is still written as version 1, and files of
either version load. A new type adds its codec to :data:`CODECS`. This module imports no
engine, so a type defined beside one (``fisherfx._kfac.KFAC``) is named by its ``"module.QualName"`` string
and its ``decode`` imports the module when called. Its keys should follow the ones above
(``"<layer>|A"``, ``"<layer>|G"``, say).
"""

import contextlib
import importlib
import json
import math
import os
import secrets
import sys
import zlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _factor
from ._errors import FisherError
from ._factor import LowRank
from .groups import Group, as_group, check_groups, some_names
from .state import NO_PROVENANCE, UNKNOWN, EMAState, Estimate, Provenance, SumState

FORMAT = "fisherfx"
FORMAT_VERSION = 2  # the newest this module reads and writes; a file is written with the oldest it needs
LOW_RANK_VERSION = 2  # low-rank K-FAC factors (and thin eigenbases) first appear in version 2
NEEDS = "needs format_version"  # a codec's field: the version its object needs (taken out of the header)
State = Estimate | EMAState | SumState


class Codec(NamedTuple):
    """How one type is stored: see the module docstring."""

    name: str
    type: "type | str"  # the class, or its "module.QualName" (matched by name: nothing is imported for it)
    encode: Callable[[Any], tuple[dict[str, Tensor], dict[str, Any]]]
    decode: Callable[[dict[str, Tensor], dict[str, Any]], Any]
    differences: Callable[[Any, Mapping[str, Tensor], bool], list[str]]


# --- provenance as JSON ---------------------------------------------------------------------------

def provenance_to_json(p: Provenance) -> dict[str, Any]:
    """``Provenance`` as a JSON-able dict (groups as ``{name: {"pattern", "sizes"}}``)."""
    out = p._asdict()
    if isinstance(p.shapes, Mapping):
        out["shapes"] = {k: list(v) for k, v in p.shapes.items()}
    if isinstance(p.groups, Mapping):
        out["groups"] = {k: {"pattern": g.pattern, "sizes": dict(g.sizes)} for k, g in
                         ((k, as_group(g)) for k, g in p.groups.items())}
    return out


def provenance_from_json(d: Mapping[str, Any]) -> Provenance:
    """Inverse of :func:`provenance_to_json`; unknown fields are ignored, missing ones are ``"unknown"``."""
    fields = {k: d[k] for k in Provenance._fields if k in d}
    groups, shapes = fields.get("groups", UNKNOWN), fields.get("shapes", UNKNOWN)
    if isinstance(groups, Mapping):
        fields["groups"] = {k: Group(g["pattern"], dict(g.get("sizes", {}))) for k, g in groups.items()}
    if isinstance(shapes, Mapping):
        fields["shapes"] = {k: tuple(v) for k, v in shapes.items()}
    return Provenance(**fields)


# --- the three states --------------------------------------------------------------------------------

def _suffix(provenance: Provenance, name: str) -> str:
    groups = provenance.groups
    if not isinstance(groups, Mapping) or name not in groups:
        return ""
    return "|" + ",".join(as_group(groups[name]).pattern.split("->")[-1].split())


def _values_codec(name: str, type_: type, field: str, scalars: Callable[[Any], dict[str, Any]],
                  build: Callable[[dict[str, Tensor], dict[str, Any], Provenance], Any]) -> Codec:
    """The codec of a state with one ``{param: tensor}`` field and a few scalars."""

    def encode(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        values, made = getattr(obj, field), obj.provenance or NO_PROVENANCE
        keys = {k: k + _suffix(made, k) for k in values}
        fields = {"provenance": provenance_to_json(made), **scalars(obj),
                  "params": {k: {"key": keys[k], "shape": list(v.shape)} for k, v in values.items()}}
        return {keys[k]: v for k, v in values.items()}, fields

    def decode(tensors: dict[str, Tensor], fields: dict[str, Any]) -> Any:
        values = {k: tensors[p["key"]] for k, p in fields["params"].items()}
        return build(values, fields, provenance_from_json(fields["provenance"]))

    def differences(obj: Any, params: Mapping[str, Tensor], partial: bool) -> list[str]:
        return _differences(getattr(obj, field), obj.provenance or NO_PROVENANCE, params, partial)

    return Codec(name, type_, encode, decode, differences)


def _count(fields: dict[str, Any]) -> Tensor:
    return torch.tensor(int(fields["count"]), dtype=torch.int64)


CODECS: list[Codec] = [
    _values_codec("Estimate", Estimate, "value", lambda e: {"count": int(e.count)},
                  lambda v, f, p: Estimate(v, _count(f), p)),
    _values_codec("EMAState", EMAState, "mean", lambda s: {"decay": float(s.decay), "step": int(s.step)},
                  lambda v, f, p: EMAState(v, torch.tensor(int(f["step"]), dtype=torch.int64), float(f["decay"]), p)),
    _values_codec("SumState", SumState, "total", lambda s: {"count": int(s.count)},
                  lambda v, f, p: SumState(v, _count(f), p)),
]


# --- K-FAC factors ----------------------------------------------------------------------------------------

KFAC_TYPE = "fisherfx._kfac.KFAC"
KFAC_EMA_TYPE = "fisherfx._kfac.KFACEMAState"
EIG_FIELDS = ("a_values", "a_vectors", "g_values", "g_vectors", "scale", "a_rest", "scale_rest")


def _kfac_module() -> Any:
    return importlib.import_module("fisherfx._kfac")  # imported when a K-FAC file is read, not with io


def _structure_fields(names: Mapping[str, tuple[str, ...]], transposed: Mapping[str, bool],
                      shapes: Mapping[str, Any], diagonal: Any, mode: str, kind: str,
                      provenance: Provenance) -> dict[str, Any]:
    return {"provenance": provenance_to_json(provenance or NO_PROVENANCE), "mode": mode, "kind": kind,
            "params": {n: {"shape": list(s)} for n, s in shapes.items()},
            "layers": {k: {"names": list(names[k]), "transposed": bool(transposed[k]), "A": f"{k}|A", "G": f"{k}|G"}
                       for k in names},
            "diagonal": {n: f"{n}|diag" for n in diagonal}}


def _put_a(tensors: dict[str, Tensor], fields: dict[str, Any], key: str, a: Any) -> None:
    """Store layer ``key``'s ``A``: one tensor under ``"<key>|A"``, or a low-rank one's ``U`` and ``weights``."""
    if isinstance(a, LowRank):
        spec = {"U": f"{key}|A.U", "weights": f"{key}|A.weights", "shift": float(a.shift)}
        tensors[spec["U"]], tensors[spec["weights"]] = a.U, a.weights
        fields["layers"][key]["A"] = spec
        fields[NEEDS] = LOW_RANK_VERSION
    else:
        tensors[fields["layers"][key]["A"]] = a


def _get_a(tensors: dict[str, Tensor], spec: Any) -> Any:
    """Inverse of :func:`_put_a`: a key (every file before version 2) or a low-rank spec."""
    if isinstance(spec, str):
        return tensors[spec]
    return LowRank(tensors[spec["U"]], tensors[spec["weights"]], float(spec["shift"]))


def _kfac_encode(fac: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    layers = fac.layers
    fields = _structure_fields({k: f.names for k, f in layers.items()}, {k: f.transposed for k, f in layers.items()},
                               fac.shapes, fac.diagonal, fac.mode, fac.kind, fac.provenance)
    fields["count"] = int(fac.count)
    tensors: dict[str, Tensor] = {}
    for k, f in layers.items():
        fields["layers"][k]["a_count"] = int(f.a_count)
        _put_a(tensors, fields, k, f.A)
        tensors[f"{k}|G"] = f.G
    tensors.update({f"{n}|diag": d for n, d in fac.diagonal.items()})
    if fac.eig is not None:  # the eigendecompositions too (EKFAC's eigenvalues are meaningful only in its basis)
        fields["eig"] = {}
        for k, e in fac.eig.items():
            fields["eig"][k] = {}
            for field in EIG_FIELDS:
                t = getattr(e, field)
                if t is not None:
                    fields["eig"][k][field] = key = f"{k}|eig.{field}"
                    tensors[key] = t
    return tensors, fields


def _kfac_decode(tensors: dict[str, Tensor], fields: dict[str, Any]) -> Any:
    k_ = _kfac_module()
    layers = {k: k_.Factors(tuple(f["names"]), _get_a(tensors, f["A"]), tensors[f["G"]], bool(f["transposed"]),
                            torch.tensor(int(f["a_count"]), dtype=torch.int64)) for k, f in fields["layers"].items()}
    eig = None
    if fields.get("eig") is not None:
        eig = {k: k_.Eigenbasis(**{field: tensors[e[field]] if field in e else None for field in EIG_FIELDS})
               for k, e in fields["eig"].items()}
    return k_.KFAC(layers, {n: tensors[key] for n, key in fields["diagonal"].items()}, _count(fields),
                   {n: torch.Size(p["shape"]) for n, p in fields["params"].items()}, str(fields["mode"]),
                   str(fields["kind"]), eig, provenance_from_json(fields["provenance"]))


def _layout(names: tuple[str, ...], transposed: bool, shapes: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(rows, cols)`` of a layer's 2-D layout (the bias a last column, or row when transposed)."""
    if any(n not in shapes for n in names):
        return None
    weight = [tuple(shapes[n]) for n in names if len(shapes[n]) != 1]
    bias = [tuple(shapes[n]) for n in names if len(shapes[n]) == 1]
    if weight:
        rows, cols = weight[0][0], math.prod(weight[0][1:])
    else:  # a bias alone: one column (one row, transposed)
        rows, cols = (1, bias[0][0]) if transposed else (bias[0][0], 1)
        return rows, cols
    return (rows + len(bias), cols) if transposed else (rows, cols + len(bias))


def _kfac_differences(names: Mapping[str, tuple[str, ...]], transposed: Mapping[str, bool],
                      sizes: Mapping[str, tuple[int, int]], shapes: Mapping[str, Any],
                      params: Mapping[str, Tensor], partial: bool) -> list[str]:
    """Names and shapes against ``params``, then each layer's factor sizes against its parameters' shapes."""
    like = {n: torch.empty(tuple(s), device="meta") for n, s in shapes.items()}
    out = _differences(like, NO_PROVENANCE, params, partial)
    for key, layer_names in names.items():
        want = _layout(tuple(layer_names), transposed[key], {n: tuple(params[n].shape) for n in params})
        a, g = sizes[key]
        got = (a, g) if transposed[key] else (g, a)  # (rows side, columns side)
        if want is not None and tuple(want) != got:
            out.append(f"layer {key!r}: the file's factors are A {a}, G {g} (a layout of {got[0]} x {got[1]}), the "
                       f"parameters {list(layer_names)} of params give {want[0]} x {want[1]}")
    return out


def _kfac_params_differences(fac: Any, params: Mapping[str, Tensor], partial: bool) -> list[str]:
    layers = fac.layers
    return _kfac_differences({k: f.names for k, f in layers.items()}, {k: f.transposed for k, f in layers.items()},
                             {k: (_factor.size(f.A), f.G.shape[0]) for k, f in layers.items()}, fac.shapes, params,
                             partial)


def _ema_encode(state: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    fields = _structure_fields(state.names, state.transposed, state.shapes, state.diagonal.mean, state.mode,
                               state.kind, state.provenance)
    fields["ema"] = {part: {"step": int(ema.step), "decay": float(ema.decay),
                            "provenance": provenance_to_json(ema.provenance or NO_PROVENANCE)}
                     for part, ema in (("A", state.A), ("G", state.G), ("diagonal", state.diagonal))}
    tensors = {f"{k}|G": state.G.mean[k] for k in state.names}
    for k in state.names:
        _put_a(tensors, fields, k, state.A.mean[k])
    tensors.update({f"{n}|diag": d for n, d in state.diagonal.mean.items()})
    return tensors, fields


def _ema_decode(tensors: dict[str, Tensor], fields: dict[str, Any]) -> Any:
    layers, ema = fields["layers"], fields["ema"]

    def part(name: str, means: dict[str, Tensor]) -> EMAState:
        e = ema[name]
        return EMAState(means, torch.tensor(int(e["step"]), dtype=torch.int64), float(e["decay"]),
                        provenance_from_json(e["provenance"]))

    return _kfac_module().KFACEMAState(
        part("A", {k: _get_a(tensors, f["A"]) for k, f in layers.items()}),
        part("G", {k: tensors[f["G"]] for k, f in layers.items()}),
        part("diagonal", {n: tensors[key] for n, key in fields["diagonal"].items()}),
        {k: tuple(f["names"]) for k, f in layers.items()}, {k: bool(f["transposed"]) for k, f in layers.items()},
        {n: torch.Size(p["shape"]) for n, p in fields["params"].items()}, str(fields["mode"]), str(fields["kind"]),
        provenance_from_json(fields["provenance"]))


def _ema_params_differences(state: Any, params: Mapping[str, Tensor], partial: bool) -> list[str]:
    sizes = {k: (_factor.size(state.A.mean[k]), state.G.mean[k].shape[0]) for k in state.names}
    return _kfac_differences(state.names, state.transposed, sizes, state.shapes, params, partial)


CODECS += [
    Codec("KFAC", KFAC_TYPE, _kfac_encode, _kfac_decode, _kfac_params_differences),
    Codec("KFACEMAState", KFAC_EMA_TYPE, _ema_encode, _ema_decode, _ema_params_differences),
]


def _codec_of(obj: Any) -> Codec | None:
    kind = type(obj)
    return next((c for c in CODECS if kind is c.type or c.type == f"{kind.__module__}.{kind.__qualname__}"), None)


def _codec_named(name: Any) -> Codec:
    codec = next((c for c in CODECS if c.name == name), None)
    if codec is None:
        raise FisherError(f"load: the file holds a {name!r}, which this fisherfx cannot read (it reads "
                          f"{[c.name for c in CODECS]})")
    return codec


def _differences(values: Mapping[str, Tensor], provenance: Provenance, params: Mapping[str, Tensor],
                 partial: bool) -> list[str]:
    """What does not fit between stored values and ``params``: names on one side only, shapes."""
    out = []
    extra = [k for k in values if k not in params]
    if extra:
        out.append(f"in the file but not in params: {some_names(extra)}")
    missing = [k for k in params if k not in values]
    if missing and not partial:
        out.append(f"in params but not in the file: {some_names(missing)} (pass partial=True for a file of "
                   "part of the parameters)")
    groups = provenance.groups if isinstance(provenance.groups, Mapping) else {}
    shapes = provenance.shapes if isinstance(provenance.shapes, Mapping) else {}
    for name, value in values.items():
        if name not in params:
            continue
        shape, got = tuple(params[name].shape), tuple(value.shape)
        if name in shapes and tuple(shapes[name]) != shape:
            out.append(f"{name!r}: the file's values are of a parameter of shape {tuple(shapes[name])}, params "
                       f"{shape}")
        elif name in groups:
            try:
                group = check_groups({name: groups[name]}, {name: params[name]}, "load")[name]
            except FisherError:
                out.append(f"{name!r}: the file's group pattern {as_group(groups[name]).pattern!r} does not fit the "
                           f"parameter's shape {shape}")
                continue
            want = tuple(group.reduce(torch.empty(shape, device="meta")).shape)
            if want != got:
                out.append(f"{name!r}: the file has group values {got}, params of shape {shape} give {want} "
                           f"under {group.pattern!r}")
        elif shape != got:
            out.append(f"{name!r}: the file has shape {got}, params {shape}")
    return out


# --- bytes ---------------------------------------------------------------------------------------------

def _safetensors(where: str):
    """The ``safetensors`` package (imported on first use: ``import fisherfx`` does not need it)."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise FisherError(f"{where}: fisherfx files need the safetensors package: pip install safetensors") from None
    return safetensors


def _crc(t: Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _versions() -> dict[str, str]:
    package = sys.modules.get("fisherfx")
    return {"fisherfx_version": str(getattr(package, "__version__", UNKNOWN)), "torch_version": torch.__version__}


def _for_disk(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, no two sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` then rename over ``path``: all of the new file or none of it.

    The temporary file lies in ``path``'s folder (a rename within one filesystem is atomic), is synced
    to disk before the rename, and the folder is synced after it so that the rename itself persists.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask, as for any new file
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have replaced the file with a private one
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every platform can sync a folder
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


# --- save ----------------------------------------------------------------------------------------------

def _entry(where: str, obj: Any, what: str) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """``(tensors, fields, the format version the object needs)``."""
    codec = _codec_of(obj)
    if codec is None:
        raise FisherError(f"{where}: cannot store {what} of type {type(obj).__name__}; expected one of "
                          f"{[c.name for c in CODECS]} or a {{task: state}} dict of them")
    tensors, fields = codec.encode(obj)
    needs = int(fields.pop(NEEDS, 1))
    return tensors, {"type": codec.name, **fields}, needs


def save(path: str | os.PathLike, obj: "State | Mapping[str, State]", metadata: Mapping[str, Any] | None = None
         ) -> None:
    """Write ``obj`` to ``path`` (a safetensors file, by convention ``*.safetensors``), atomically.

    Args:
        path: the file; replaced atomically if it exists (its folder must exist).
        obj: an :class:`~fisherfx.Estimate`, :class:`~fisherfx.EMAState`, :class:`~fisherfx.SumState`, or a
            ``{task: state}`` dict of them (task names are strings).
        metadata: JSON-able ``{key: value}`` of your own (model name, data, commit), stored in the header.

    Raises:
        FisherError: a type it cannot store, a task name that is not a string or holds ``"/"``, metadata
            that is not JSON-able, or two tensors under one key.

    """
    where = "save"
    if metadata is not None and not isinstance(metadata, Mapping):
        raise FisherError(f"{where}: metadata must be a {{key: value}} dict, got {type(metadata).__name__}")
    header: dict[str, Any] = {"format": FORMAT, "format_version": 1, **_versions(), "metadata": dict(metadata or {})}
    if isinstance(obj, Mapping) and _codec_of(obj) is None:
        tensors: dict[str, Tensor] = {}
        header["type"], header["tasks"] = "tasks", {}
        for task, state in obj.items():
            if not isinstance(task, str) or "/" in task:
                raise FisherError(f"{where}: task names must be strings without '/' (the separator of task and key "
                                  f"in the file), got {task!r}")
            entry_tensors, fields, needs = _entry(where, state, f"task {task!r}")
            header["format_version"] = max(header["format_version"], needs)
            keys = {key: f"{task}/{key}" for key in entry_tensors}
            for key, full in keys.items():
                if full in tensors:
                    raise FisherError(f"{where}: two tensors would be stored under the key {full!r}; rename task "
                                      f"{task!r}")
                tensors[full] = entry_tensors[key]
            header["tasks"][task] = {"prefix": f"{task}/", **fields}
    else:
        tensors, fields, needs = _entry(where, obj, "an object")
        header.update(fields)
        header["format_version"] = needs
    tensors = _for_disk(tensors)
    header["tensors"] = {k: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype), "crc32": _crc(t)}
                         for k, t in tensors.items()}
    try:
        text = json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise FisherError(f"{where}: metadata must be JSON-able (str, numbers, lists, dicts): {err}") from None
    meta = {"format": FORMAT, "fisherfx": text, "fisherfx_crc32": str(zlib.crc32(text.encode()))}
    save_file = _safetensors(where).torch.save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


# --- load ----------------------------------------------------------------------------------------------

class Header(NamedTuple):
    """A file's header: what :func:`read_header` returns."""

    fields: dict[str, Any]  # the JSON header (format_version, type, provenance, metadata, ...)
    keys: list[str]  # the tensor keys in the file


def _refuse(path: str, why: str) -> FisherError:
    return FisherError(f"load: {path!r} is not a readable fisherfx file: {why}")


def read_header(path: str | os.PathLike) -> Header:
    """The header of a fisherfx file, checked, without reading its tensors.

    Raises:
        FisherError: a missing, empty, truncated, corrupted or foreign file.

    """
    safetensors = _safetensors("load")
    SafetensorError, safe_open = safetensors.SafetensorError, safetensors.safe_open  # noqa: N806
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FisherError(f"load: no file at {path!r}")
    if os.path.getsize(path) == 0:
        raise _refuse(path, "the file is empty")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _refuse(path, f"not a safetensors file, or truncated or corrupted ({err})") from None
    if meta.get("format") != FORMAT or "fisherfx" not in meta:
        raise _refuse(path, "a safetensors file without a fisherfx header (written by another tool)")
    text = meta["fisherfx"]
    if meta.get("fisherfx_crc32") != str(zlib.crc32(text.encode())):
        raise _refuse(path, "the header's checksum does not match (corrupted)")
    try:
        fields = json.loads(text)
    except ValueError as err:
        raise _refuse(path, f"the header is not JSON ({err})") from None
    version = fields.get("format_version") if isinstance(fields, dict) else None
    if not isinstance(version, int) or version < 1:
        raise _refuse(path, f"no valid format_version in the header ({version!r})")
    if version > FORMAT_VERSION:
        raise FisherError(f"load: {path!r} has format version {version}, newer than this fisherfx reads "
                          f"({FORMAT_VERSION}); upgrade fisherfx")
    return Header(fields, keys)


def _read_tensors(path: str, header: Header, device: Any) -> dict[str, Tensor]:
    safetensors = _safetensors("load")
    SafetensorError, safe_open = safetensors.SafetensorError, safetensors.safe_open  # noqa: N806
    expected = header.fields.get("tensors", {})
    if sorted(expected) != sorted(header.keys):
        raise _refuse(path, "its tensors are not the ones its header lists")
    out = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key, spec in expected.items():
                t = f.get_tensor(key)
                if list(t.shape) != spec["shape"] or _dtype_name(t.dtype) != spec["dtype"]:
                    raise _refuse(path, f"tensor {key!r} is {_dtype_name(t.dtype)} {list(t.shape)}, the header says "
                                        f"{spec['dtype']} {spec['shape']}")
                if _crc(t) != spec["crc32"]:
                    raise _refuse(path, f"tensor {key!r} does not match its checksum (corrupted)")
                out[key] = t.to(device)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise _refuse(path, f"reading its tensors failed ({err})") from None
    return out


def load(path: str | os.PathLike, params: Mapping[str, Tensor] | None = None, *, partial: bool = False,
         device: torch.device | str = "cpu") -> "State | dict[str, State]":
    """Read what :func:`save` wrote: the state, or the ``{task: state}`` dict, with its provenance.

    Args:
        path: a file written by :func:`save`.
        params: ``{name: tensor}`` of the model the file is meant for; the file's names and shapes are
            checked against them (for group values: the group pattern applied to the parameter's shape).
        partial: with ``params``, accept a file that covers only some of them.
        device: where the tensors are put.

    Returns:
        An :class:`~fisherfx.Estimate`, :class:`~fisherfx.EMAState`, :class:`~fisherfx.SumState`, or a
        ``{task: state}`` dict; the user's metadata is in :func:`read_header`.

    Raises:
        FisherError: a missing, empty, truncated, corrupted or foreign file, a newer format, or, with
            ``params``, names or shapes that differ (all differences listed).

    """
    path = os.fspath(path)
    header = read_header(path)
    tensors = _read_tensors(path, header, device)
    fields = header.fields
    try:
        if fields.get("type") == "tasks":
            decoded = {}
            for task, e in fields["tasks"].items():
                prefix = e["prefix"]  # the codec sees its own keys
                own = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
                decoded[task] = _codec_named(e["type"]).decode(own, e)
        else:
            decoded = {"": _codec_named(fields.get("type")).decode(tensors, fields)}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise _refuse(path, f"its header does not describe its contents ({type(err).__name__}: {err})") from None
    if params is not None:
        problems = []
        for task, obj in decoded.items():
            found = _codec_of(obj).differences(obj, params, partial)
            problems += [f"task {task!r}: {d}" if task else d for d in found]
        if problems:
            raise FisherError(f"load: {path!r} does not fit params: " + "; ".join(problems))
    return decoded[""] if fields.get("type") != "tasks" else decoded


__all__ = ["CODECS", "Codec", "Header", "atomic_write", "load", "read_header", "save"]
