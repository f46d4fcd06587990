"""Cost of fisherfx's estimators as a ratio to one forward+backward, against peer libraries.

Run from the repository root::

    python benchmarks/run.py             # full run: writes docs/benchmarks.md and docs/benchmarks.json
    python benchmarks/run.py --quick     # small sizes, few repeats, prints only (--write to write)

Time: for every (workload, estimator, method) the method's call and the reference (one
forward+backward of the mean loss, the usual training step) are timed alternately after a
warm-up call; the ratio is median(method) / median(reference) of that same run. Memory: the
extra peak resident set size of one call (after a warm-up call) above the resident size just
before it, measured in a child process per workload whose glibc hands every block of 64 KiB or
more back to the OS when freed (``MALLOC_MMAP_THRESHOLD_``), so that the peak is not hidden by
memory an earlier call left in the allocator. It counts everything the call allocates, its
result included. Agreement: the relative error ``‖a − b‖ / ‖b‖`` over all entries against
fisherfx's generic engine; MC estimates are compared with fisherfx's MC draw, next to the
difference between two fisherfx draws with different seeds (the noise floor).
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
    x: Tensor  # features [N, 784], images [N, 3, 32, 32] or input_ids [N, T]
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


def gpt2(n: int, gen: torch.Generator, tokens: int = 128) -> Workload:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the tiny vocabulary makes it warn about GPT-2's special token ids

    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout, so train() == eval()
    model = _seeded(lambda: GPT2LMHeadModel(config))
    lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=gen)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]  # right padding
    ids = torch.where(mask, torch.randint(1, 1000, (n, tokens), generator=gen), 0)
    labels = torch.where(mask, ids, peers.IGNORE)
    batch = {"input_ids": ids, "attention_mask": mask.long(), "labels": labels}
    active = int((labels[:, 1:] != peers.IGNORE).sum())
    return Workload(model, ffx.causal_lm(model), batch, ids, labels, mask.long(), active)


# key: (builder, full size, quick size); the size is the batch (and the tokens per sequence)
NAMES = {"mlp": "MLP", "cnn": "CNN", "gpt2": "GPT-2 tiny"}
WORKLOADS = {
    "mlp": (mlp, dict(n=256), dict(n=32)),
    "cnn": (cnn, dict(n=64), dict(n=8)),
    "gpt2": (gpt2, dict(n=8, tokens=128), dict(n=2, tokens=32)),
}


def build(key: str, quick: bool) -> Workload:
    builder, full, small = WORKLOADS[key]
    return builder(gen=torch.Generator().manual_seed(SEED), **(small if quick else full))


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
    targets: dict  # workload -> target ratio from issue 3; also which workloads run the task


TASKS = [
    Task("diag_emp", "diag empirical, per sample", dict(kind="empirical", per="sample"), False,
         {"mlp": 1.5, "cnn": 2.5, "gpt2": 4.0}),
    Task("diag_mc", "diag MC (1 sample), per sample", dict(kind="mc", n_samples=1, per="sample"), False,
         {"mlp": 1.8, "cnn": 3.0, "gpt2": 4.5}),
    Task("diag_emp_token", "diag empirical, per token", dict(kind="empirical", per="token", normalize="tokens"),
         False, {"gpt2": 1.8}),
    Task("group_emp", "group per output channel, per sample (empirical)", dict(kind="empirical", per="sample"), True,
         {"mlp": 1.3, "cnn": 2.5, "gpt2": 2.5}),
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
    except peers.Unsupported as err:
        return None, f"unsupported: {err}"
    except Exception as err:  # a peer failing on a workload it claims to handle
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def first_call(fn: Callable) -> tuple[dict | None, str]:
    try:
        return fn(), "ok"
    except ffx.FisherError as err:
        return None, f"n/a: {err}"
    except Exception as err:
        return None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


# ---------------------------------------------------------------- measurements


def timed(fn: Callable) -> float:
    """Seconds of one call, with the cyclic garbage collector paused (a full collection costs ~0.3 s here)."""
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def time_against(fn: Callable, reference: Callable, repeats: int, budget_s: float) -> tuple[float, float]:
    """Median seconds of ``fn`` and median ratio to ``reference``, timed in alternate pairs.

    Each ratio is taken within a pair, so load from other processes that drifts between pairs
    cancels. At least 3 pairs; more up to ``repeats`` while ``fn`` has used less than ``budget_s``.
    """
    ours, ratios = [], []
    gc.collect()
    while len(ours) < repeats and (len(ours) < 3 or sum(ours) < budget_s):
        ref = timed(reference)
        ours.append(timed(fn))
        ratios.append(ours[-1] / ref)
    return statistics.median(ours), statistics.median(ratios)


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
    return [t for t in TASKS if key in t.targets and t.key in args.tasks]


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
    ref_s = statistics.median(timed(reference) for _ in range(args.repeats))
    rows = [dict(workload=key, task="reference", method="torch", status="ok", ms=1e3 * ref_s,
                 extra_peak_mib=memory.get("reference"))]
    print(report.progress(label(key, args.quick), rows[0]), flush=True)
    for task in tasks_of(key, args):
        truth, floor = None, None
        for name in args.methods:
            row = dict(workload=key, task=task.key, method=name)
            fn, row["status"] = prepare(name, w, task)
            result = None
            if fn is not None:
                result, row["status"] = first_call(fn)
            if result is not None:
                seconds, ratio = time_against(fn, reference, args.repeats, args.budget)
                row.update(ms=1e3 * seconds, ratio=ratio,
                           extra_peak_mib=memory.get(f"{task.key}/{name}"))
                if name == "fisherfx generic":  # the answer the others are compared with
                    truth = result
                    if task.options["kind"] == "mc":  # a second draw gives the MC noise floor
                        floor = relative_error(redraw(w, task, torch.Generator().manual_seed(SEED + 1)), truth)
                row.update(rel_error=None if truth is None else relative_error(result, truth), mc_floor=floor)
            rows.append(row)
            print(report.progress(label(key, args.quick), row), flush=True)
    return rows


def redraw(w: Workload, task: Task, generator: torch.Generator) -> dict:
    """fisherfx's generic MC estimate with another generator: the MC noise floor of the agreement."""
    return ffx.diag_fisher(w.problem, w.params, w.batch, generator=generator,
                           **dict(task.options, engine="generic")).value


# ---------------------------------------------------------------- command line


def label(key: str, quick: bool) -> str:
    size = WORKLOADS[key][2 if quick else 1]
    return f"{NAMES[key]} (N={size['n']}" + (f", T={size['tokens']})" if "tokens" in size else ")")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, no memory; prints only")
    parser.add_argument("--write", action="store_true", help="write docs/ also with --quick")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--tasks", nargs="+", default=[t.key for t in TASKS], choices=[t.key for t in TASKS])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, quick 3)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per method beyond 3 rounds")
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
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.budget = args.budget if args.budget is not None else (2.0 if args.quick else 20.0)
    args.memory = (not args.quick) if args.memory is None else args.memory
    start = time.perf_counter()
    rows = [row for key in args.workloads for row in run_workload(key, args)]
    labels = {key: label(key, args.quick) for key in args.workloads}
    info = report.machine(args.threads, ["torch", "transformers", *peers.DISTRIBUTIONS.values()])
    text = "\n\n".join([report.settings(info, args.repeats, args.quick),
                         report.table(rows, labels, {t.key: t.label for t in TASKS}),
                         "Did not run:", report.not_run(rows, labels),
                         'Targets of issue 3, for `engine="auto"`' + (" (quick: not the issue's sizes):" if args.quick
                                                                       else ":"), report.targets(rows, labels, TASKS)])
    print(f"\n{text}\n\n(took {time.perf_counter() - start:.0f} s)")
    if args.write or not args.quick:
        report.write(DOC, DATA, dict(machine=info, quick=args.quick, repeats=args.repeats, rows=rows), text)
    return dict(machine=info, rows=rows, text=text)


if __name__ == "__main__":
    main()
