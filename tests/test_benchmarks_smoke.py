"""The benchmark script runs: one tiny workload, one estimator, two methods. Nothing about timing is asserted."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("fisherfx_benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_runs_and_writes_nothing(tmp_path, monkeypatch):
    run = load_benchmark()
    monkeypatch.setattr(run, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(run, "DATA", tmp_path / "benchmarks.json")
    out = run.main(["--quick", "--workloads", "mlp", "--tasks", "diag_emp", "--repeats", "3",
                    "--methods", "fisherfx generic", "torch.func vmap(grad)"])
    rows = {r["method"]: r for r in out["rows"] if r["task"] == "diag_emp"}
    assert rows["fisherfx generic"]["status"] == "ok", rows
    assert rows["torch.func vmap(grad)"]["rel_error"] < 1e-5, rows  # same quantity, same normalisation
    assert rows["fisherfx generic"]["ratio"] > 0
    assert "| MLP (N=32) | diag empirical, per sample | fisherfx generic |" in out["text"]
    assert not (tmp_path / "benchmarks.md").exists() and not (tmp_path / "benchmarks.json").exists()


def test_quick_llama_baselines_agree_with_fisherfx(tmp_path, monkeypatch):
    run = load_benchmark()
    monkeypatch.setattr(run, "DOC", tmp_path / "benchmarks.md")
    monkeypatch.setattr(run, "DATA", tmp_path / "benchmarks.json")
    out = run.main(["--quick", "--workloads", "llama10m", "llama_token", "--tasks", "diag_emp", "diag_emp_token",
                    "--repeats", "3", "--methods", "fisherfx generic", "torch.func vmap(grad)",
                    "torch.func vjp over positions"])
    rows = {(r["workload"], r["task"], r["method"]): r for r in out["rows"]}
    assert rows[("llama10m", "diag_emp", "fisherfx generic")]["status"] == "ok", rows
    assert rows[("llama10m", "diag_emp", "torch.func vmap(grad)")]["rel_error"] < 1e-5, rows  # causal shift, -100
    assert ("llama10m", "diag_emp", "torch.func vjp over positions") not in rows  # per-token baseline only
    assert rows[("llama_token", "diag_emp_token", "torch.func vjp over positions")]["rel_error"] < 1e-5, rows
    assert "| LLaMA 1M (875,136 params, N=2, T=32) | diag empirical, per sample | fisherfx generic |" in out["text"]
    assert "| 11 | diag empirical, per token | LLaMA 1M (875,136 params, N=1, T=16) | ≤ 1× torch.func vjp" \
           in out["text"]


def test_an_engine_that_raises_is_recorded_not_fatal(monkeypatch):
    run = load_benchmark()

    def broken(w, task):
        def call():
            raise run.ffx.FisherError("diag_fisher: engine='taps' is not available in this version")

        return call

    monkeypatch.setitem(run.METHODS, "fisherfx taps", broken)
    out = run.main(["--quick", "--workloads", "mlp", "--tasks", "diag_emp", "--methods", "fisherfx taps"])
    (row,) = [r for r in out["rows"] if r["task"] == "diag_emp"]
    assert row["status"].startswith("n/a: diag_fisher: engine='taps'"), row
    assert "| fisherfx taps | n/a |" in out["text"]


def test_targets_of_every_kind_are_judged():
    run = load_benchmark()

    def row(key, task, method, ratio, mib=None):
        return dict(workload=key, task=task, method=method, status="ok", ms=1.0, ratio=ratio, extra_peak_mib=mib)

    auto = "fisherfx auto"
    rows = [row("llama10m", "reference", "torch", None, 100.0), row("llama10m", "diag_emp", auto, 1.3, 90.0),
            row("llama40m", "reference", "torch", None, 200.0), row("llama40m", "diag_emp", auto, 1.5, 150.0),
            row("llama_nt", "diag_emp", auto, 2.0), row("llama_nt1", "diag_emp", auto, 1.9),
            row("llama_token", "reference", "torch", None, 10.0),
            row("llama_token", "diag_emp_token", auto, 30.0, 300.0),
            row("llama_token", "diag_emp_token", run.VJP, 40.0)]
    labels = {k: k for k in ("llama10m", "llama40m", "llama_nt", "llama_nt1", "llama_token")}
    text = run.report.targets(rows, labels, {t.key: t.label for t in run.TASKS}, run.TARGETS)

    def line(key, target):  # the one row of ``key`` whose target starts with ``target``
        (hit,) = [x for x in text.splitlines() if f"| {key} | {target}" in x]
        return hit

    assert "| 1.30× | met |" in line("llama10m", "≤ 1.4×")
    assert "| 90 MiB | met |" in line("llama10m", "extra peak ≤ 1× fwd+bwd's = 100 MiB")
    assert "| 150 MiB | met |" in line("llama40m", "extra peak ≤ 1× fwd+bwd's = 200 MiB")
    assert "| 1.50× vs 1.30× (+15%) | **missed** |" in line("llama40m", "ratio ≤ 1× its ratio at llama10m")
    assert "| 2.00× vs 1.90× (+5%) | met |" in line("llama_nt", "ratio within ±15% of its ratio at llama_nt1")
    assert "| 0.75× (30.00 vs 40.00 × fwd+bwd) | met |" in line("llama_token", f"≤ 1× {run.VJP}")
    assert "| 300 MiB | **missed** |" in line("llama_token", "extra peak ≤ 1× fwd+bwd's + 256 MiB = 266 MiB")
    assert "| 3 |" not in text  # issue 3's targets: none of their workloads ran
