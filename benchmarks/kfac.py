"""Cost of K-FAC factors and of a K-FAC optimiser step, as ratios to one forward+backward / one SGD step.

Run from the repository root (the peers live in ``.venv-bench``)::

    python benchmarks/kfac.py            # full run: writes docs/benchmarks-kfac.md and .json
    python benchmarks/kfac.py --quick    # small sizes, few repeats, prints only (--write to write)

Factors: MC K-FAC factors with one label draw per position (``kfac_approx="expand"``, weight and bias
together) on the MLP, CNN and GPT-2 workloads of ``benchmarks/run.py``, by fisherfx and by
curvlinops' ``KFACLinearOperator.compute_kronecker_factors``, BackPACK's ``KFAC`` extension and
ASDL's ``SHAPE_KRON`` Fisher maker, each timed against the same forward+backward of the mean loss in
alternate pairs (``run.time_against``). Optimiser: one step of ``kfac_optimizer`` at its defaults (factors
every step, the damped inverse every 10 steps, the gradient from ``torch.func.grad`` of the mean loss
included), and with ``curvature_every=10``, against one ``torch.optim.SGD`` step (forward, backward,
update), both averaged over 10 consecutive steps, so the inverse is amortised; then each part of a
default step on its own, in the steady state of a run (the factors' EMA after 10 updates: dense where
the rows of the updates stopped paying, as from the second update on for the MLP's first layer).
Targets (issue 8): factors ≤ 2× on the MLP, ≤ 3× on the CNN and GPT-2, faster than the peers; the
optimiser step ≤ 2.5× an SGD step.
"""

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import report  # noqa: E402
import run  # noqa: E402

from fisherfx._kfac import (  # noqa: E402
    kfac,
    kfac_eig,
    kfac_ema_init,
    kfac_ema_update,
    kfac_ema_value,
    kfac_inverse,
    kfac_solve,
    kfac_vp,
)
from fisherfx.natural import apply_updates, kfac_optimizer  # noqa: E402

ROOT = HERE.parent
DOC, DATA = ROOT / "docs" / "benchmarks-kfac.md", ROOT / "docs" / "benchmarks-kfac.json"
WORKLOADS = ("mlp", "cnn", "gpt2")
TARGETS = {"mlp": 2.0, "cnn": 3.0, "gpt2": 3.0}
STEP_TARGET = 2.5
STEPS = 10  # optimiser steps per timing: one eigendecomposition among them


class NotSupported(Exception):
    """The peer cannot run on this workload (its reason is the message)."""


def _classifier_only(w: run.Workload, peer: str) -> None:
    if w.mask is not None:
        raise NotSupported(f"{peer} has no HuggingFace Conv1D, Embedding or LayerNorm K-FAC (GPT-2)")


def fisherfx_factors(w: run.Workload) -> Callable[[], object]:
    normalize = "samples" if w.mask is None else "tokens"

    def call():
        return kfac(w.problem, w.params, w.batch, kind="mc", generator=torch.Generator().manual_seed(0),
                    normalize=normalize)

    return call


def curvlinops_factors(w: run.Workload) -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    _classifier_only(w, "curvlinops")
    model = copy.deepcopy(w.model)
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), [(w.x, w.y)], fisher_type="mc",
                            mc_samples=1, kfac_approx="expand", separate_weight_and_bias=False,
                            check_deterministic=False, num_data=w.x.shape[0])

    def call():
        op.compute_kronecker_factors()
        out = dict(op._input_covariances), dict(op._gradient_covariances)
        op._input_covariances.clear()
        op._gradient_covariances.clear()
        return out

    return call


def backpack_factors(w: run.Workload) -> Callable[[], object]:
    from backpack import backpack, extend
    from backpack.extensions import KFAC

    _classifier_only(w, "BackPACK")
    model = extend(copy.deepcopy(w.model))
    loss_fn = extend(nn.CrossEntropyLoss())
    params = list(model.parameters())

    def call():
        loss = loss_fn(model(w.x), w.y)
        with backpack(KFAC(mc_samples=1)):
            loss.backward()
        out = [p.kfac for p in params]
        for p in params:
            p.grad = None
            del p.kfac
        return out

    return call


def asdl_factors(w: run.Workload) -> Callable[[], object]:
    import asdl

    _classifier_only(w, "ASDL")
    model = copy.deepcopy(w.model)
    config = asdl.FisherConfig(fisher_type=asdl.FISHER_MC, fisher_shapes=[asdl.SHAPE_KRON],
                               loss_type=asdl.LOSS_CROSS_ENTROPY, data_size=w.x.shape[0], n_mc_samples=1)
    maker = asdl.get_fisher_maker(model, config)

    def call():
        logits = maker.setup_model_call(model, w.x)
        maker.setup_loss_call(F.cross_entropy, logits, w.y)
        maker.forward_and_backward()
        out = [getattr(getattr(m, "fisher", None), "kron", None) for m in model.modules()]
        maker.zero_fisher()
        model.zero_grad(set_to_none=True)
        return out

    return call


METHODS = {"fisherfx": fisherfx_factors, "curvlinops": curvlinops_factors, "BackPACK": backpack_factors,
           "ASDL": asdl_factors}


def prepare(name: str, w: run.Workload) -> tuple[Callable | None, str]:
    try:
        fn = METHODS[name](w)
    except NotSupported as why:
        return None, f"n/a: {why}"
    except ImportError as err:
        return None, f"not installed: {err}"
    result, status = run.first_call(fn)
    return (fn if result is not None else None), status


# ---------------------------------------------------------------- optimiser step


def _loss(w: run.Workload, params: dict, x, y):
    return F.cross_entropy(functional_call(w.model, params, (x,)), y)


def sgd_steps(w: run.Workload) -> Callable[[], None]:
    model = copy.deepcopy(w.model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def call():
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(w.x), w.y).backward()
            opt.step()

    return call


def kfac_steps(w: run.Workload, **options) -> Callable[[], None]:
    opt = kfac_optimizer(w.problem, lr=1e-3, **options)
    loss = grad(lambda p, x, y: _loss(w, p, x, y))

    def call():
        params = w.params
        state = opt.init(params)  # every timing starts at step 0, so it holds one eigendecomposition
        for _ in range(STEPS):
            updates, state = opt.update(loss(params, w.x, w.y), state, params, (w.x, w.y))
            params = apply_updates(params, updates)

    return call


# ---------------------------------------------------------------- the run


def measure(key: str, args: argparse.Namespace) -> list[dict]:
    w = run.build(key, args.quick)
    reference = run.forward_backward(w)
    reference()
    number = run.calls_per_timing(reference, args.quick)
    label = run.label(key, args.quick)
    rows = []
    for name in METHODS:
        fn, status = prepare(name, w)
        row = dict(workload=key, task="kfac_mc", method=name, status=status, extra_peak_mib=None)
        if fn is not None:
            seconds, ratio, pairs = run.time_against(fn, reference, args.repeats, args.budget, number)
            row.update(ms=1e3 * seconds, ratio=ratio, pairs=pairs)
        rows.append(row)
        print(report.progress(label, row), flush=True)
    if key in args.optimiser:
        sgd, ours = sgd_steps(w), kfac_steps(w)
        ours()
        seconds, ratio, pairs = run.time_against(ours, sgd, args.repeats, args.budget)
        row = dict(workload=key, task="optimiser_step", method="fisherfx", status="ok", ms=1e3 * seconds / STEPS,
                   ratio=ratio, pairs=pairs, extra_peak_mib=None)
        rows.append(row)
        print(report.progress(label, row), flush=True)
        lazy = kfac_steps(w, curvature_every=STEPS)  # factors and inverse once per 10 steps
        lazy()
        seconds, ratio, pairs = run.time_against(lazy, sgd, args.repeats, args.budget)
        row = dict(workload=key, task="optimiser_step", method="fisherfx, curvature_every=10", status="ok",
                   ms=1e3 * seconds / STEPS, ratio=ratio, pairs=pairs, extra_peak_mib=None)
        rows.append(row)
        print(report.progress(label, row), flush=True)
        for part, fn, per in step_parts(w):  # where a step's time goes, each part against one SGD step
            seconds, ratio, pairs = run.time_against(fn, sgd, args.repeats, args.budget)
            row = dict(workload=key, task="optimiser_part", method=part, status="ok", ms=1e3 * seconds / per,
                       ratio=ratio * STEPS / per, pairs=pairs, extra_peak_mib=None)
            rows.append(row)
            print(report.progress(label, row), flush=True)
    return rows


def step_parts(w: run.Workload) -> list[tuple[str, Callable, int]]:
    """``(part, fn, steps per call)`` of one K-FAC step at the defaults: the gradient, the factors, their EMA update,
    the damped inverse (one per ``inverse_every = 10`` steps) and the solve with it, on the EMA of 10 updates (the
    steady state: a first update from zero, or a second that still concatenates rows, costs less)."""
    fac = kfac(w.problem, w.params, w.batch, kind="mc", generator=torch.Generator().manual_seed(0))
    state = kfac_ema_init(fac, 0.95)
    for k in range(STEPS):
        state = kfac_ema_update(state, kfac(w.problem, w.params, w.batch, kind="mc",
                                            generator=torch.Generator().manual_seed(k)))
    inverse = kfac_inverse(kfac_ema_value(state), 1e-2)
    eig = kfac_eig(kfac_ema_value(state))
    g = grad(lambda p, x, y: _loss(w, p, x, y))(w.params, w.x, w.y)
    gradient = grad(lambda p, x, y: _loss(w, p, x, y))
    return [("gradient (torch.func.grad)", lambda: gradient(w.params, w.x, w.y), 1),
            ("factors (kfac, MC)", lambda: kfac(w.problem, w.params, w.batch, kind="mc",
                                                 generator=torch.Generator().manual_seed(0)), 1),
            ("EMA update", lambda: kfac_ema_update(state, fac), 1),
            ("damped inverse, kfac_inverse (÷ 10)", lambda: kfac_inverse(kfac_ema_value(state), 1e-2), STEPS),
            ("solve, kfac_vp of the inverse", lambda: kfac_vp(inverse, g), 1),
            ("solve, kfac_solve (tikhonov; not in the default step)", lambda: kfac_solve(eig, g, 1e-2), 1)]


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(rows: list[dict], labels: dict[str, str]) -> str:
    lines = ["| workload | method | ms | × fwd+bwd | status |", "|---|---|---:|---:|---|"]
    for r in rows:
        if r["task"] != "kfac_mc":
            continue
        lines.append(f"| {labels[r['workload']]} | {r['method']} | {_fmt(r.get('ms'), '.1f')} | "
                     f"{_fmt(r.get('ratio'), '.2f')} | {r['status'] if r['status'] != 'ok' else ''} |")
    steps = [r for r in rows if r["task"] in ("optimiser_step", "optimiser_part")]
    if steps:
        lines += ["", "| workload | K-FAC optimiser step (amortised over 10) and its parts | ms | × SGD step |",
                  "|---|---|---:|---:|"]
        lines += [f"| {labels[r['workload']]} | {_step_name(r)} | {r['ms']:.1f} | {r['ratio']:.2f} |" for r in steps]
    return "\n".join(lines)


def _step_name(r: dict) -> str:
    if r["task"] != "optimiser_step":
        return r["method"]
    return "**whole step** (defaults)" if r["method"] == "fisherfx" else f"**whole step**, {r['method'].split(', ')[1]}"


def targets(rows: list[dict], labels: dict[str, str]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    by = {(r["workload"], r["method"], r["task"]): r for r in rows}
    for key, bound in TARGETS.items():
        ours = by.get((key, "fisherfx", "kfac_mc"))
        if ours is None or ours.get("ratio") is None:
            continue
        peers = [r for (k, m, t), r in by.items() if k == key and t == "kfac_mc" and m != "fisherfx"
                 and r.get("ratio") is not None]
        faster = all(ours["ratio"] < p["ratio"] for p in peers)
        lines.append(f"| factors ≤ {bound:g}× fwd+bwd, {labels[key]} | {ours['ratio']:.2f}× | "
                     f"{'yes' if ours['ratio'] <= bound else 'no'} |")
        if peers:
            best = min(peers, key=lambda p: p["ratio"])
            lines.append(f"| faster than every peer, {labels[key]} | fastest peer {best['method']} "
                         f"{best['ratio']:.2f}× | {'yes' if faster else 'no'} |")
    for r in rows:
        if r["task"] == "optimiser_step" and r["method"] == "fisherfx":
            lines.append(f"| optimiser step ≤ {STEP_TARGET:g}× SGD step, {labels[r['workload']]} | "
                         f"{r['ratio']:.2f}× | {'yes' if r['ratio'] <= STEP_TARGET else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats; prints only")
    parser.add_argument("--write", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--optimiser", nargs="*", default=["mlp"], choices=list(WORKLOADS),
                        help="workloads on which to time the optimiser step (the CNN's 12,545-input head: its average "
                             "keeps its rows for ~98 steps of 64, then is a dense 12,545 × 12,545 factor to invert "
                             "every 10 steps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget", type=float, default=None)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.budget = args.budget if args.budget is not None else (2.0 if args.quick else 20.0)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows = [row for key in args.workloads for row in measure(key, args)]
    labels = {key: run.label(key, args.quick) for key in args.workloads}
    info = report.machine(args.threads, ["torch", "transformers", "curvlinops-for-pytorch", "backpack-for-pytorch",
                                         "asdfghjkl"])
    text = "\n\n".join([report.settings(info, {labels[k]: args.repeats for k in args.workloads}, args.quick),
                         table(rows, labels), "Targets of issue 8" + (" (quick sizes):" if args.quick else ":"),
                         targets(rows, labels)])
    print(f"\n{text}\n\n(took {time.perf_counter() - start:.0f} s)")
    if (not args.quick) if args.write is None else args.write:
        if not DOC.exists():
            DOC.write_text(f"# K-FAC benchmarks\n\n{__doc__.split(chr(10) * 2, 2)[2].strip()}\n\n{report.BEGIN}\n"
                           f"{report.END}\n")
        report.write(DOC, DATA, dict(machine=info, quick=args.quick, rows=rows), text)
    return dict(rows=rows, text=text, median=statistics.median([r["ratio"] for r in rows if r.get("ratio")] or [0]))


if __name__ == "__main__":
    main()
