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
