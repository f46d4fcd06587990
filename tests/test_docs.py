"""The docs name every public name, and the examples run."""

import pathlib
import runpy

import pytest

import fisherfx as ffx

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(ffx.__all__))
def test_public_name_is_documented(name):
    assert f"`{name}" in (ROOT / "docs" / "api.md").read_text(), f"{name} is missing from docs/api.md"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(path, monkeypatch):
    monkeypatch.setenv("FISHERFX_SMOKE", "1")
    runpy.run_path(str(path), run_name="__main__")


def test_demo_runs(capsys, tmp_path, monkeypatch):
    from fisherfx.cli import main

    monkeypatch.chdir(tmp_path)  # the demo saves its percolation plot in the working directory
    main(["demo", "--epochs", "1", "--top", "2"])
    out = capsys.readouterr().out
    assert "EMA" in out and "top 2 output channels" in out and "Spearman" in out
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "not plotted" in out
    else:
        assert (tmp_path / "fisherfx-percolation.png").stat().st_size > 0


def _python_blocks(path: pathlib.Path) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_examples_run():
    """The README's code blocks, in order (the second builds on the first)."""
    namespace: dict = {}
    blocks = _python_blocks(ROOT / "README.md")
    assert blocks
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)


# docs pages whose ``python`` blocks are complete scripts (spectrum.md's are fragments but one, run in
# tests/test_spectrum.py; distributed.md's run on two ranks in tests/test_distributed.py)
RUNNABLE = ("operators.md", "metrics.md", "percolation.md", "forgetting.md", "kfac.md", "files.md")
DOC_BLOCKS = [(page, i) for page in RUNNABLE for i in range(len(_python_blocks(ROOT / "docs" / page)))]


@pytest.mark.parametrize("page, index", DOC_BLOCKS, ids=[f"{p}[{i}]" for p, i in DOC_BLOCKS])
def test_docs_example_runs(page: str, index: int, tmp_path, monkeypatch):
    code = _python_blocks(ROOT / "docs" / page)[index]
    if "fisherfx import plot" in code:
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # some examples write files
    exec(compile(code, f"docs/{page}[{index}]", "exec"), {})
