"""Cost of fisherfx's estimators as a ratio to one forward+backward, against peer libraries.

Run from the repository root::

    python benchmarks/run.py             # full run: writes docs/benchmarks.md and docs/benchmarks.json
    python benchmarks/run.py --quick     # small sizes, few repeats, prints only (--write to write)
    python benchmarks/run.py --workloads llama10m --no-write   # one workload at full size, prints only

Time: for every (workload, estimator, method) the method's call and the reference (one
forward+backward of the mean loss, the usual training step) are timed alternately after a
warm-up call; the ratio is median(method) / median(reference) of that same run (on workloads
whose forward+backward is under 20 ms each timing is of several calls in a row, enough for the
reference's to last 20 ms; the slow LLaMAs have fewer pairs). Memory: the
extra peak resident set size of one call (after a warm-up call) above the resident size just
before it, measured in a child process per workload whose glibc hands every block of 64 KiB or
more back to the OS when freed (``MALLOC_MMAP_THRESHOLD_``), so that the peak is not hidden by
memory an earlier call left in the allocator. It counts everything the call allocates, its
result included. Agreement: the relative error ``‖a − b‖ / ‖b‖`` over all entries against
fisherfx's generic engine; MC estimates are compared with fisherfx's MC draw, next to the
difference between two fisherfx draws with different seeds (the noise floor). Targets: the
bounds of issues 3 and 11 on ``engine="auto"`` (``TARGETS``), reported under the tables.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __name__ == "__main__":  # before tqdm is imported (it reads its environment then), so not when imported by a test
    os.environ.setdefault("TQDM_DISABLE", "1")  # fisherfx's progress bar on long calls: noise in this output

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # imported rather than run: `peers` sits next to this file
    sys.path.insert(0, str(HERE))

import peers  # noqa: E402  (not `benchmarks.peers`: opacus installs a top-level `benchmarks` package)
import report  # noqa: E402

import fisherfx as ffx  # noqa: E402

ROOT = HERE.parent
DOC, DATA = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.json"
SEED = 0

# ---------------------------------------------------------------- workloads


class Workload(NamedTuple):
    model: nn.Module
    problem: ffx.Problem
    batch: Any  # as the problem reads it
    x: Tensor  # features [N, D], images [N, 3, 32, 32] or input_ids [N, T]
    y: Tensor  # classes [N] or token labels [N, T] with -100 at padding
    mask: Tensor | None  # attention_mask [N, T] of the language model
    active_tokens: int  # positions with a target, after the causal shift

    @property
    def params(self) -> dict[str, Tensor]:
        return ffx.params_of(self.model)

    @staticmethod
    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(SEED)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return build().eval()


def _classifier(model: nn.Module, x: Tensor, gen: torch.Generator) -> Workload:
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    return Workload(model, ffx.supervised(model, ffx.Categorical()), (x, y), x, y, None, x.shape[0])


def mlp(n: int, gen: torch.Generator) -> Workload:
    model = _seeded(lambda: nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                          nn.Linear(256, 10)))
    return _classifier(model, torch.randn(n, 784, generator=gen), gen)


def cnn(n: int, gen: torch.Generator) -> Workload:
    model = _seeded(lambda: nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
                                          nn.Flatten(), nn.Linear(64 * 14 * 14, 10)))
    return _classifier(model, torch.randn(n, 3, 32, 32, generator=gen), gen)


def mlp_small(n: int, gen: torch.Generator) -> Workload:
    model = _seeded(lambda: nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)))
    return _classifier(model, torch.randn(n, 128, generator=gen), gen)


def _padded_lm(model: nn.Module, vocab: int, n: int, tokens: int, gen: torch.Generator) -> Workload:
    """``n`` sequences of ``tokens``, lengths uniform in [tokens/2, tokens], right padding, -100 labels there."""
    lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=gen)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]  # right padding
    ids = torch.where(mask, torch.randint(1, vocab, (n, tokens), generator=gen), 0)
    labels = torch.where(mask, ids, peers.IGNORE)
    batch = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    active = int((labels[:, 1:] != peers.IGNORE).sum())
    return Workload(model, ffx.causal_lm(model), batch, ids, labels, mask.long(), active)


def gpt2(n: int, gen: torch.Generator, tokens: int = 128) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the tiny vocabulary makes it warn about GPT-2's special token ids

    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout, so train() == eval()
    return _padded_lm(_seeded(lambda: GPT2LMHeadModel(config)), 1000, n, tokens, gen)


# LLaMA shapes: (vocab, hidden, intermediate, layers, heads); grouped-query attention with heads/2
# key/value heads, untied embeddings (LlamaConfig's default); parameter counts from llama_params.
LLAMAS = {
    "1M": (2000, 128, 344, 2, 4),
    "4M": (4000, 256, 704, 2, 8),  # the 40M workload's quick size
    "10M": (8000, 256, 704, 8, 8),
    "40M": (16000, 512, 1376, 8, 8),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    vocab, hidden, intermediate, layers, heads = LLAMAS[size]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=256,
                       attn_implementation="eager")  # no dropout by default


def llama_params(size: str) -> int:
    """Parameters of the LLaMA of ``size``, counted from its shapes (as ``model.num_parameters()`` gives)."""
    vocab, hidden, intermediate, layers, heads = LLAMAS[size]
    attention = 2 * hidden * hidden + 2 * hidden * (hidden // 2)  # q, o; k, v with heads/2 key/value heads
    block = attention + 3 * hidden * intermediate + 2 * hidden  # gate, up, down; two RMSNorm weights
    return 2 * vocab * hidden + layers * block + hidden  # embedding, untied head; final norm


def llama(n: int, gen: torch.Generator, tokens: int = 128, size: str = "10M") -> Workload:
    from transformers import LlamaForCausalLM

    model = _seeded(lambda: LlamaForCausalLM(llama_config(size)))
    return _padded_lm(model, LLAMAS[size][0], n, tokens, gen)


class Spec(NamedTuple):
    builder: Callable[..., Workload]
    full: dict  # builder's size arguments (n: the batch, tokens: per sequence, size: the LLaMA)
    quick: dict
    name: str
    repeats: int | None = None  # timed pairs at full size (None: --repeats); for the slow workloads
    budget: float | None = None  # seconds per method beyond 3 pairs at full size (None: --budget)


WORKLOADS = {
    "mlp": Spec(mlp, dict(n=256), dict(n=32), "MLP"),
    "cnn": Spec(cnn, dict(n=64), dict(n=8), "CNN"),
    "gpt2": Spec(gpt2, dict(n=8, tokens=128), dict(n=2, tokens=32), "GPT-2 tiny"),
    # issue 11: per-call overhead (one forward+backward is ~0.1 ms: each timing repeats the call, calls_per_timing)
    "mlp_small": Spec(mlp_small, dict(n=32), dict(n=32), "MLP 128-64-10"),
    # issue 11: decoder LMs; one forward+backward at 1 thread: ~0.8 s at 10M, ~2.5 s at 40M
    "llama10m": Spec(llama, dict(n=8, tokens=128, size="10M"), dict(n=2, tokens=32, size="1M"), "LLaMA", 5, 20.0),
    "llama40m": Spec(llama, dict(n=8, tokens=128, size="40M"), dict(n=2, tokens=32, size="4M"), "LLaMA", 3, 0.0),
    # issue 11: per token, ≈ T single-sample backward passes per sample: a small LLaMA by default; at 10M
    # (opt-in) the hand-written baseline alone takes ~65 s a call here (8 s for one sample of 92 positions)
    "llama_token": Spec(llama, dict(n=4, tokens=64, size="1M"), dict(n=1, tokens=16, size="1M"), "LLaMA", 5, 10.0),
    "llama10m_token": Spec(llama, dict(n=8, tokens=128, size="10M"), dict(n=2, tokens=24, size="1M"), "LLaMA", 3, 0.0),
    # issue 11: a batch/sequence coincidence, N = T, beside T = N + 1 (a pair of keys, compared in the targets)
    "llama_nt": Spec(llama, dict(n=32, tokens=32, size="1M"), dict(n=8, tokens=8, size="1M"), "LLaMA"),
    "llama_nt1": Spec(llama, dict(n=32, tokens=33, size="1M"), dict(n=8, tokens=9, size="1M"), "LLaMA"),
}


OPT_IN = ("llama10m_token",)  # not in the default run: tens of minutes
DEFAULT_WORKLOADS = [key for key in WORKLOADS if key not in OPT_IN]


def build(key: str, quick: bool) -> Workload:
    spec = WORKLOADS[key]
    return spec.builder(gen=torch.Generator().manual_seed(SEED), **(spec.quick if quick else spec.full))


def forward_backward(w: Workload) -> Callable[[], dict]:
    """The reference: one forward+backward of the mean loss (HF's own loss for the LM)."""

    def run():
        if w.mask is None:
            loss = F.cross_entropy(w.model(w.x), w.y)
        else:
            loss = w.model(input_ids=w.x, attention_mask=w.mask, labels=w.y, use_cache=False).loss
        loss.backward()
        w.model.zero_grad(set_to_none=True)
        return {}

    return run


# ---------------------------------------------------------------- estimators and methods


class Task(NamedTuple):
    key: str
    label: str
    options: dict  # fisherfx options
    grouped: bool  # group Fisher per output channel
    workloads: tuple[str, ...]  # where the task runs


PER_SAMPLE = ("mlp", "cnn", "gpt2", "mlp_small", "llama10m", "llama40m", "llama_nt", "llama_nt1")
TASKS = [
    Task("diag_emp", "diag empirical, per sample", dict(kind="empirical", per="sample"), False, PER_SAMPLE),
    Task("diag_mc", "diag MC (1 sample), per sample", dict(kind="mc", n_samples=1, per="sample"), False, PER_SAMPLE),
    Task("diag_emp_token", "diag empirical, per token", dict(kind="empirical", per="token", normalize="tokens"),
         False, ("gpt2", "llama_token", "llama10m_token")),
    Task("group_emp", "group per output channel, per sample (empirical)", dict(kind="empirical", per="sample"), True,
         PER_SAMPLE),
]


class Target(NamedTuple):
    """A bound on ``engine="auto"`` for one task on one workload, from one issue.

    ``kind`` says what is bounded (always fisherfx auto's figure on ``workload``):

    * ``"ratio"``: its time ÷ forward+backward ≤ ``bound``;
    * ``"method"``: its ratio ÷ the ratio of method ``other`` (same workload) ≤ ``bound``;
    * ``"memory"``: its extra peak ≤ ``bound`` × the forward+backward's + ``plus_mib``;
    * ``"scaling"``: its ratio ÷ its ratio on workload ``other`` ≤ ``bound``;
    * ``"coincidence"``: |its ratio ÷ its ratio on workload ``other`` − 1| ≤ ``bound``.
    """

    issue: int
    task: str
    workload: str
    bound: float
    kind: str = "ratio"
    other: str | None = None
    plus_mib: float = 0.0


VJP = "torch.func vjp over positions"
CHUNK_MIB = 256  # fisherfx's default bound on one chunk's gradients (fisherfx.engines.generic.CHUNK_BYTES)
TARGETS = [
    *(Target(3, task, key, bound) for task, bounds in (
        ("diag_emp", {"mlp": 1.5, "cnn": 2.5, "gpt2": 4.0}),
        ("diag_mc", {"mlp": 1.8, "cnn": 3.0, "gpt2": 4.5}),
        ("diag_emp_token", {"gpt2": 1.8}),
        ("group_emp", {"mlp": 1.3, "cnn": 2.5, "gpt2": 2.5})) for key, bound in bounds.items()),
    *(Target(11, task, "llama10m", bound) for task, bound in (("diag_emp", 1.4), ("diag_mc", 1.5),
                                                              ("group_emp", 1.25))),
    *(Target(11, task, key, 1.0, "memory") for key in ("llama10m", "llama40m")
      for task in ("diag_emp", "diag_mc", "group_emp")),
    *(Target(11, task, "llama40m", 1.0, "scaling", "llama10m") for task in ("diag_emp", "diag_mc", "group_emp")),
    *(Target(11, task, "llama_nt", 0.15, "coincidence", "llama_nt1") for task in ("diag_emp", "diag_mc", "group_emp")),
    *(Target(11, task, "mlp_small", 3.0) for task in ("diag_emp", "group_emp")),
    *(t for key in ("gpt2", "llama_token", "llama10m_token")
      for t in (Target(11, "diag_emp_token", key, 1.0, "method", VJP),
                Target(11, "diag_emp_token", key, 1.0, "memory", plus_mib=CHUNK_MIB))),
]
ENGINES = ("generic", "taps", "auto")


def fisherfx_method(engine: str) -> Callable:
    def make(w: Workload, task: Task) -> Callable[[], dict]:
        options, params = dict(task.options, engine=engine), w.params
        groups = ffx.channels(params, w.model) if task.grouped else None

        def run():
            if groups is None:
                return ffx.diag_fisher(w.problem, params, w.batch, generator=w.generator(), **options).value
            return ffx.group_fisher(w.problem, params, w.batch, groups, generator=w.generator(), **options).value

        return run

    return make


def peer_method(factory: Callable) -> Callable:
    def make(w: Workload, task: Task) -> Callable[[], dict]:
        diag = factory(w, task.options["kind"], task.options["per"])
        if not task.grouped:
            return diag
        groups = ffx.channels(w.params, w.model)
        return lambda: ffx.reduce_groups(diag(), groups)

    return make


METHODS = {**{f"fisherfx {e}": fisherfx_method(e) for e in ENGINES},
           **{name: peer_method(factory) for name, factory in peers.PEERS.items()}}


def prepare(name: str, w: Workload, task: Task) -> tuple[Callable | None, str]:
    """The method's call, or None and why it cannot run (not installed, unsupported, n/a)."""
    try:
        fn = METHODS[name](w, task)
        return fn, "ok"
    except ImportError as err:
        return None, f"not installed ({err})"
    except peers.NotThisTask:
        return None, SKIP
    except peers.Unsupported as err:
        return None, f"unsupported: {err}"
    except Exception as err:  # a peer failing on a workload it claims to handle
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


SKIP = "not this task"  # a baseline for other tasks (no row)


def first_call(fn: Callable) -> tuple[dict | None, str]:
    try:
        return fn(), "ok"
    except ffx.FisherError as err:
        return None, f"n/a: {err}"
    except Exception as err:
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


# ---------------------------------------------------------------- measurements


MIN_TIMED_S = 0.02  # a timing shorter than this repeats the call (`number` times) and divides; quick: ÷ 4


def timed(fn: Callable, number: int = 1) -> float:
    """Seconds per call over ``number`` calls in a row, with the cyclic garbage collector paused
    (a full collection costs ~0.3 s here)."""
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


def calls_per_timing(reference: Callable, quick: bool = False) -> int:
    """How many calls each timing makes so that the reference's lasts at least :data:`MIN_TIMED_S`
    (1 unless the forward+backward is a few milliseconds; the small MLP's is ~0.1 ms)."""
    return max(1, round(MIN_TIMED_S / (4 if quick else 1) / min(timed(reference) for _ in range(3))))


def time_against(fn: Callable, reference: Callable, repeats: int, budget_s: float,
                 number: int = 1) -> tuple[float, float, int]:
    """Median seconds of ``fn``, median ratio to ``reference`` and the pairs timed, in alternate pairs.

    Each ratio is taken within a pair, so load from other processes that drifts between pairs
    cancels. At least 3 pairs; more up to ``repeats`` while ``fn`` has used less than ``budget_s``.
    Each timing is of ``number`` calls in a row.
    """
    ours, ratios = [], []
    gc.collect()
    while len(ours) < repeats and (len(ours) < 3 or number * sum(ours) < budget_s):
        ref = timed(reference, number)
        ours.append(timed(fn, number))
        ratios.append(ours[-1] / ref)
    return statistics.median(ours), statistics.median(ratios), len(ours)


def relative_error(a: dict, b: dict) -> float | None:
    if set(a) != set(b):
        return None
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def extra_peak_mib(fn: Callable) -> float:
    """Peak RSS of one call above the RSS before it (Linux: resets the high-water mark)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _resident_kib("VmRSS")
    result = fn()  # noqa: F841  (kept alive until the peak is read)
    return (_resident_kib("VmHWM") - before) / 1024


def memory_child(key: str, args: argparse.Namespace) -> dict[str, float]:
    """In the child process: extra peak memory of the reference and of each (task, method) that runs."""
    w = build(key, args.quick)
    reference = forward_backward(w)
    reference()
    out = {"reference": extra_peak_mib(reference)}
    for task in tasks_of(key, args):
        for name in args.methods:
            fn, _ = prepare(name, w, task)
            if fn is not None and first_call(fn)[1] == "ok":
                out[f"{task.key}/{name}"] = extra_peak_mib(fn)
    return out


def tasks_of(key: str, args: argparse.Namespace) -> list[Task]:
    return [t for t in TASKS if key in t.workloads and t.key in args.tasks]


def measure_memory(key: str, args: argparse.Namespace) -> dict[str, float]:
    if not Path("/proc/self/clear_refs").exists():
        return {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, str(HERE / "run.py"), "--memory-child", key, "--threads", str(args.threads),
           "--methods", *args.methods, "--tasks", *args.tasks] + (["--quick"] if args.quick else [])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory child for {key} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_workload(key: str, args: argparse.Namespace) -> list[dict]:
    """One row for the reference, then one per (estimator, method) in the order of the tables."""
    w = build(key, args.quick)
    reference = forward_backward(w)
    reference()
    memory = measure_memory(key, args) if args.memory else {}
    repeats, budget = rounds(key, args)
    number = calls_per_timing(reference, args.quick)
    ref_s = statistics.median(timed(reference, number) for _ in range(repeats))
    rows = [dict(workload=key, task="reference", method="torch", status="ok", ms=1e3 * ref_s,
                 extra_peak_mib=memory.get("reference"), pairs=repeats, calls_per_timing=number)]
    print(report.progress(label(key, args.quick), rows[0]), flush=True)
    for task in tasks_of(key, args):
        truth, floor = None, None
        for name in sorted(args.methods, key=lambda m: m != "fisherfx generic"):  # the truth first
            row = dict(workload=key, task=task.key, method=name)
            fn, row["status"] = prepare(name, w, task)
            if row["status"] == SKIP:
                continue
            result = None
            if fn is not None:
                result, row["status"] = first_call(fn)
            if result is not None:
                seconds, ratio, pairs = time_against(fn, reference, repeats, budget, number)
                row.update(ms=1e3 * seconds, ratio=ratio, pairs=pairs,
                           extra_peak_mib=memory.get(f"{task.key}/{name}"))
                if name == "fisherfx generic":  # the answer the others are compared with
                    truth = result
                    if task.options["kind"] == "mc":  # a second draw gives the MC noise floor
                        floor = relative_error(redraw(w, task, torch.Generator().manual_seed(SEED + 1)), truth)
                row.update(rel_error=None if truth is None else relative_error(result, truth), mc_floor=floor)
            rows.append(row)
            print(report.progress(label(key, args.quick), row), flush=True)
    return rows


def rounds(key: str, args: argparse.Namespace) -> tuple[int, float]:
    """Most timed pairs and the time budget for ``key``: ``--repeats``/``--budget`` when given, else
    the workload's own at full size (the slow LLaMAs), else 9 pairs and 20 s (quick: 3 and 2 s)."""
    spec = WORKLOADS[key]
    own = (None, None) if args.quick else (spec.repeats, spec.budget)
    repeats = args.repeats or own[0] or (3 if args.quick else 9)
    budget = next(b for b in (args.budget, own[1], 2.0 if args.quick else 20.0) if b is not None)
    return repeats, budget


def redraw(w: Workload, task: Task, generator: torch.Generator) -> dict:
    """fisherfx's generic MC estimate with another generator: the MC noise floor of the agreement."""
    return ffx.diag_fisher(w.problem, w.params, w.batch, generator=generator,
                           **dict(task.options, engine="generic")).value


# ---------------------------------------------------------------- command line


def label(key: str, quick: bool) -> str:
    spec = WORKLOADS[key]
    size = spec.quick if quick else spec.full
    name, parts = spec.name, [f"N={size['n']}"] + ([f"T={size['tokens']}"] if "tokens" in size else [])
    if "size" in size:
        name, parts = f"{name} {size['size']}", [f"{llama_params(size['size']):,} params", *parts]
    return f"{name} ({', '.join(parts)})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, no memory; prints only")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None,
                        help="write docs/benchmarks.md and .json (default: on, off with --quick)")
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS),
                        help=f"default: all but {', '.join(OPT_IN)}")
    parser.add_argument("--tasks", nargs="+", default=[t.key for t in TASKS], choices=[t.key for t in TASKS])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None,
                        help="most timed rounds (default 9; LLaMA 10M and per-token 5, 40M 3; quick 3)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds per method beyond 3 rounds (default 20; LLaMA 40M 0, per-token 10; quick 2)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure extra peak memory in a child process (default: on, off with --quick)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for message in ("Full backward hook is firing", "Using a non-full backward hook"):  # opacus, harmless here
        warnings.filterwarnings("ignore", message=message)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args)))
        return {}
    args.memory = (not args.quick) if args.memory is None else args.memory
    start = time.perf_counter()
    rows = [row for key in args.workloads for row in run_workload(key, args)]
    labels = {key: label(key, args.quick) for key in args.workloads}
    info = report.machine(args.threads, ["torch", "transformers", *peers.DISTRIBUTIONS.values()])
    pairs = {labels[key]: rounds(key, args)[0] for key in args.workloads}
    names = {t.key: t.label for t in TASKS}
    text = "\n\n".join([report.settings(info, pairs, args.quick), report.table(rows, labels, names),
                         "Did not run:", report.not_run(rows, labels),
                         'Targets of issues 3 and 11, for `engine="auto"`'
                         + (" (quick: not the issues' sizes):" if args.quick else ":"),
                         report.targets(rows, labels, names, TARGETS)])
    print(f"\n{text}\n\n(took {time.perf_counter() - start:.0f} s)")
    if (not args.quick) if args.write is None else args.write:
        report.write(DOC, DATA, dict(machine=info, quick=args.quick, repeats=pairs, rows=rows), text)
    return dict(machine=info, rows=rows, text=text)


if __name__ == "__main__":
    main()
