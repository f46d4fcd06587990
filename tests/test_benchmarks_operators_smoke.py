"""benchmarks/operators.py runs: the small MLP, every product and variant, the peers that are installed.
Nothing about timing is asserted; the agreement of each peer with fisherfx is."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("fisherfx_benchmark_operators", ROOT / "benchmarks" / "operators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_operator_benchmark_runs_agrees_and_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("transformers")  # run.py's workloads import it for the language models
    bench = load_benchmark()
    monkeypatch.setattr(bench, "DOC", tmp_path / "benchmarks-operators.md")
    monkeypatch.setattr(bench, "DATA", tmp_path / "benchmarks-operators.json")
    methods = ["fisherfx", "torch.func"] + (["curvlinops"] if importlib.util.find_spec("curvlinops") else [])
    quick = ["--quick", "--workloads", "mlp", "--repeats", "3", "--budget", "0", "--calls", "1", "--methods", *methods]
    out = bench.main([*quick, "--variants", "1", "8"])
    lanczos = bench.main([*quick, "--products", "ggn", "--variants", "lanczos"])  # 20 products a call: one product
    rows = {(r["product"], r["variant"], r["method"]): r for r in out["rows"] + lanczos["rows"]
            if r["product"] != "reference"}
    for product, variant in [(p, v) for p in ("ggn", "ef", "hvp") for v in ("1", "8")] + [("ggn", "lanczos")]:
        ours = rows[(product, variant, "fisherfx")]
        assert ours["status"] == "ok" and ours["ratio"] > 0, ours
        for peer in methods[1:]:
            row = rows[(product, variant, peer)]
            if variant == "lanczos" and peer == "torch.func":
                assert row["status"].startswith("not run"), row
                continue
            assert row["status"] == "ok", row
            # same quantity, same scaling (float32); Lanczos: the top Ritz value from the same start
            assert row["rel_error"] < (1e-4 if variant == "lanczos" else 1e-5), row
    assert "| MLP (N=32) | GGN · v (ggn_vp) | 1 vector | fisherfx |" in out["text"]
    assert "| MLP (N=32) | GGN · v (ggn_vp) | Lanczos, 20 steps | fisherfx (spectrum.lanczos) |" in lanczos["text"]
    assert "K=8 call ≤ 0.6 × 8 calls" in out["text"]
    assert not (tmp_path / "benchmarks-operators.md").exists() and not (tmp_path / "benchmarks-operators.json").exists()
