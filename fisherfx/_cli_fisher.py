"""Command line for HuggingFace causal LMs: ``fisherfx fisher`` (measure and save) and ``fisherfx show``.

``fisherfx fisher MODEL_DIR DATA --out FILE`` loads a local model directory (nothing is downloaded) and a
local data file, computes the token-normalised Fisher (diagonal, or per channel / per head) with
:func:`~fisherfx.collect`, and saves it with :func:`~fisherfx.save`, with the model, data and options in
the file's metadata. ``fisherfx show FILE`` prints a file's header and its largest values.

transformers is imported only here, inside the commands: it is not a dependency of fisherfx.
"""

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from . import _collect, groups, io, problems, state
from ._errors import FisherError

CONFIG_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
               "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "tie_word_embeddings")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_parsers(sub: Any) -> None:
    """Register ``fisher`` and ``show`` on the ``fisherfx`` parser's subparsers."""
    f = sub.add_parser("fisher", help="measure the Fisher of a local HuggingFace causal LM and save it",
                       description="Token-normalised Fisher of a local HuggingFace causal LM on a local data file "
                                   "(JSONL with input_ids per line, or text tokenised with the model directory's "
                                   "tokenizer), saved as a fisherfx safetensors file.")
    f.add_argument("model_dir", metavar="MODEL_DIR", help="a local directory written by save_pretrained")
    f.add_argument("data", metavar="DATA", help="JSONL ({\"input_ids\": [...]} per line) or plain text")
    f.add_argument("--groups", choices=("channels", "heads", "none"), default="channels",
                   help="one value per output channel, per attention head, or per parameter entry (none)")
    f.add_argument("--kind", choices=("mc", "empirical"), default="mc",
                   help="mc: labels drawn from the model (the true Fisher); empirical: the data's own tokens")
    f.add_argument("--out", required=True, metavar="FILE", help="the output file (*.safetensors)")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    f.add_argument("--max-tokens", type=int, default=512,
                   help="tokens per sequence: JSONL rows are truncated, text is cut into blocks of this length")
    f.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the model's dtype (the Fisher is accumulated in float32 either way)")
    f.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    f.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    f.add_argument("--seed", type=int, default=0, help="seeds the MC label draws")
    f.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar on stderr (default: when stderr is a terminal)")
    s = sub.add_parser("show", help="print a fisherfx file's metadata and its top groups per layer")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--top", type=int, default=5, help="groups (or parameters) shown per layer (default 5)")


def run(args: argparse.Namespace) -> None:
    """Run ``fisher`` or ``show``; a :class:`FisherError` exits with its message (status 1)."""
    try:
        if args.command == "fisher":
            fisher_command(args)
        else:
            show(args.file, args.top)
    except FisherError as err:
        sys.exit(f"fisherfx {args.command}: {err}")


# --- fisher ------------------------------------------------------------------------------------------------

def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise FisherError("needs transformers, which fisherfx does not install: pip install transformers") from None
    return transformers


def _tokenizer(transformers: Any, model_dir: str) -> Any:
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise FisherError(f"{model_dir!r} has no tokenizer to read the text file with ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); save one there with "
                          "tokenizer.save_pretrained, or pass JSONL with input_ids") from None


def _jsonl_rows(path: str) -> list[list[int]] | None:
    """The ``input_ids`` of a JSONL file, or None if the file is not JSONL of objects."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                if rows:
                    raise FisherError(f"{path}:{number}: not JSON (the lines before were)") from None
                return None
            if not isinstance(obj, dict):
                return None if not rows else _bad_row(path, number, "not a JSON object")
            ids = obj.get("input_ids")
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                _bad_row(path, number, "no 'input_ids' list of ints")
            rows.append(ids)
    return rows


def _bad_row(path: str, number: int, why: str) -> Any:
    raise FisherError(f"{path}:{number}: {why}")


def sequences(data: str, model_dir: str, max_tokens: int, transformers: Any) -> tuple[list[list[int]], str]:
    """Token sequences of at most ``max_tokens`` from ``data``, and the format read (``"jsonl"`` / ``"text"``).

    JSONL rows are truncated to ``max_tokens``; text is tokenised whole and cut into consecutive blocks.
    Sequences under 2 tokens (nothing to predict) are dropped.
    """
    if not os.path.isfile(data):
        raise FisherError(f"no data file at {data!r}")
    rows = _jsonl_rows(data)
    if rows is not None:
        seqs, fmt = [r[:max_tokens] for r in rows], "jsonl"
    else:
        tokenizer = _tokenizer(transformers, model_dir)
        with open(data, encoding="utf-8") as f:
            ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
        seqs, fmt = [ids[i:i + max_tokens] for i in range(0, len(ids), max_tokens)], "text"
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise FisherError(f"{data!r} holds no sequence of 2 or more tokens (read as {fmt})")
    return seqs, fmt


def batches(seqs: list[list[int]], batch_size: int, pad_id: int, device: Any) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask"}`` of ``batch_size`` sequences."""
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.int64)
        mask = torch.zeros((len(chunk), width), dtype=torch.int64)
        for row, s in enumerate(chunk):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.int64)
            mask[row, :len(s)] = 1
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _config_summary(config: Any) -> tuple[dict[str, Any], str]:
    d = config.to_dict()
    text = json.dumps(d, sort_keys=True, default=str)
    return {k: d[k] for k in CONFIG_KEYS if k in d}, hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fisher_command(args: argparse.Namespace) -> None:
    """``fisherfx fisher``: see :func:`add_parsers` for the options."""
    for name in ("batch_size", "max_tokens", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise FisherError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_tokens < 2:
        raise FisherError(f"--max-tokens must be at least 2 (one token predicts the next), got {args.max_tokens}")
    transformers = _transformers()
    if not os.path.isdir(args.model_dir):
        raise FisherError(f"no model directory at {args.model_dir!r}")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, local_files_only=True,
                                                                  dtype=DTYPES[args.dtype])
    except (OSError, ValueError) as err:
        raise FisherError(f"cannot load a causal LM from {args.model_dir!r}: {err}") from None
    try:
        device = torch.device(args.device)
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as err:
        raise FisherError(f"cannot use device {args.device!r}: {err}") from None
    seqs, fmt = sequences(args.data, args.model_dir, args.max_tokens, transformers)
    pad_id = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    params = problems.params_of(model)
    spec = {"channels": lambda: groups.channels(params, model),
            "heads": lambda: groups.heads(params, model=model), "none": lambda: None}[args.groups]()
    options: dict[str, Any] = {"kind": args.kind, "normalize": "tokens"}
    if args.kind == "mc":
        options["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    result = _collect.collect(problems.causal_lm(model), params, batches(seqs, args.batch_size, pad_id, device),
                              groups=spec, max_batches=args.max_batches, progress=args.progress, **options)
    est = result.fisher
    summary, config_hash = _config_summary(model.config)
    metadata = {
        "tool": "fisherfx fisher",
        "model": os.path.basename(os.path.normpath(args.model_dir)),
        "model_path": os.path.abspath(args.model_dir),
        "config_sha256": config_hash,
        "config": summary,
        "data": os.path.basename(args.data),
        "data_path": os.path.abspath(args.data),
        "data_sha256": _file_sha256(args.data),
        "data_format": fmt,
        "options": {"groups": args.groups, "kind": args.kind, "normalize": "tokens", "batch_size": args.batch_size,
                    "max_tokens": args.max_tokens, "dtype": args.dtype, "device": args.device,
                    "max_batches": args.max_batches, "seed": args.seed if args.kind == "mc" else None},
        "batches": result.batches,
        "sequences": result.samples,
        "tokens": int(est.count),
        "relative_error": result.error,
    }
    io.save(args.out, est, metadata=metadata)
    trace = float(sum(v.double().sum() for v in est.value.values()))
    print(f"saved {args.out}: {args.kind} Fisher ({'per ' + args.groups if spec else 'diagonal'}) over "
          f"{result.batches} batches, {result.samples} sequences, {int(est.count)} tokens; trace {trace:.6g}"
          + ("" if result.error is None else f", relative standard error {result.error:.3g}"))


# --- show --------------------------------------------------------------------------------------------------

def _values(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, state.EMAState):
        return state.ema_value(obj) if int(obj.step) > 0 else obj.mean
    if isinstance(obj, state.SumState):
        return state.sum_value(obj)
    return obj.value


def _fmt(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def show(path: str, top: int = 5) -> None:
    """``fisherfx show``: the header (type, provenance, count, parameters, versions, metadata) and the top
    groups per layer (group estimates) or the top parameters by total (diagonals).
    """
    header = io.read_header(path).fields
    loaded = io.load(path)
    entries = {"": (header, loaded)} if header.get("type") != "tasks" else \
        {task: (fields, loaded[task]) for task, fields in header["tasks"].items()}
    print(f"file: {path}")
    print(f"type: {header.get('type')}  (format version {header.get('format_version')})")
    print("versions: " + ", ".join(f"{k} {header.get(k + '_version', 'unknown')}" for k in ("fisherfx", "torch")))
    for key, value in (header.get("metadata") or {}).items():
        print(f"metadata.{key}: {_fmt(value)}")
    for task, (fields, obj) in entries.items():
        prefix = f"[{task}] " if task else ""
        _show_one(prefix, fields, obj, top)


def _show_one(prefix: str, fields: dict[str, Any], obj: Any, top: int) -> None:
    prov = fields.get("provenance", {})
    print(f"{prefix}provenance: " + ", ".join(f"{k}={prov[k]}" for k in ("quantity", "kind", "per", "normalize",
                                                                          "n_samples", "dtype") if k in prov))
    for key in ("count", "decay", "step"):
        if key in fields:
            print(f"{prefix}{key}: {fields[key]}")
    if fields.get("type") in ("KFAC", "KFACEMAState"):
        _show_kfac(prefix, fields, obj, top)
        return
    values = _values(obj)
    shapes = prov.get("shapes") if isinstance(prov.get("shapes"), dict) else {}
    params = sum(_numel(shapes.get(n, v.shape)) for n, v in values.items())
    print(f"{prefix}parameters: {len(values)} tensors, {params:,} entries; values stored: "
          f"{sum(v.numel() for v in values.values()):,}")
    totals = {n: float(v.double().sum()) for n, v in values.items()}
    trace = sum(totals.values())
    print(f"{prefix}trace: {trace:.6g}")
    if isinstance(prov.get("groups"), dict):
        print(f"{prefix}top {top} groups per layer (value, share of the layer):")
        for name, v in values.items():
            flat = v.double().flatten()
            order = flat.argsort(descending=True)[:top].tolist()
            index = [tuple(int(i) for i in torch.unravel_index(torch.tensor(j), v.shape)) for j in order]
            cells = ", ".join(f"{_index(i)}: {flat[j].item():.4g} ({flat[j].item() / totals[name]:.1%})"
                              if totals[name] else f"{_index(i)}: {flat[j].item():.4g}"
                              for i, j in zip(index, order, strict=True))
            print(f"  {name} [{prov['groups'][name]['pattern']}]: {cells}")
    else:
        print(f"{prefix}top {top} parameters by total (total, share of the trace, mean per entry):")
        for name in sorted(totals, key=totals.get, reverse=True)[:top]:
            share = f"{totals[name] / trace:.1%}" if trace else "-"
            print(f"  {name} {list(values[name].shape)}: {totals[name]:.4g} ({share}), "
                  f"{totals[name] / max(values[name].numel(), 1):.4g}")


def _show_kfac(prefix: str, fields: dict[str, Any], obj: Any, top: int) -> None:
    """K-FAC factors (or their EMA): mode, each layer's factor sizes and ``tr G · tr A``, the diagonals, the trace."""
    from . import _factor, _kfac

    if isinstance(obj, _kfac.KFACEMAState):
        ema = fields.get("ema", {}).get("A") or fields.get("ema", {}).get("diagonal") or {}
        print(f"{prefix}decay: {ema.get('decay')}")
        print(f"{prefix}step: {ema.get('step')}")
        if int(obj.A.step) == 0 and int(obj.diagonal.step) == 0:
            print(f"{prefix}layers: {len(obj.names)}, diagonal parameters: {len(obj.diagonal.mean)} (no update yet)")
            return
        obj = _kfac.kfac_ema_value(obj)
    print(f"{prefix}mode: {obj.mode}")
    traces = {}
    for key, layer in obj.layers.items():
        traces[key] = _factor.trace(layer.A) * float(layer.G.double().diagonal().sum())
        form = ("diagonal " if len(_factor.shape(layer.A)) == 1 else
                f"low-rank ({layer.A.U.shape[0]} rows) " if isinstance(layer.A, _factor.LowRank) else "")
        sizes = f"A {form}{_factor.size(layer.A)}, G {layer.G.shape[0]}"
        print(f"  layer {key} ({', '.join(layer.names)}{', transposed' if layer.transposed else ''}): {sizes}, "
              f"a_count {int(layer.a_count)}, tr G tr A {traces[key]:.4g}")
    totals = {name: float(d.double().sum()) for name, d in obj.diagonal.items()}
    for name in sorted(totals, key=totals.get, reverse=True)[:top]:
        print(f"  diagonal {name} {list(obj.diagonal[name].shape)}: {totals[name]:.4g}")
    if len(totals) > top:
        print(f"  ... and {len(totals) - top} more diagonal parameters")
    print(f"{prefix}parameters: {len(obj.shapes)} tensors, {sum(_numel(s) for s in obj.shapes.values()):,} entries; "
          f"{len(obj.layers)} layers with Kronecker factors, {len(obj.diagonal)} diagonals")
    print(f"{prefix}trace: {float(_kfac.kfac_trace(obj)):.6g}")  # EKFAC: the sum of its eigenvalues


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _index(i: tuple[int, ...]) -> str:
    return str(i[0]) if len(i) == 1 else str(i)
