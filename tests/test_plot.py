"""Plots render to PNG (Agg) at the size asked for, with something drawn; bad input raises FisherError."""

import io
import struct
import sys

import pytest
import torch

import fisherfx as ffx
from fisherfx import plot
from fisherfx._errors import FisherError
from fisherfx.metrics import SweepRecord
from fisherfx.spectrum import Eigen, SpectralDensity

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

DPI = 50


def render(fig: Figure) -> tuple[bytes, torch.Tensor]:
    """PNG bytes by the Agg canvas, and the decoded image ``[H, W, 4]``."""
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # the Agg backend renders it
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    return data, torch.from_numpy(imread(io.BytesIO(data), format="png").copy())


def assert_png(fig: Figure, size: tuple[float, float]) -> None:
    data, image = render(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == (round(size[0] * DPI), round(size[1] * DPI))
    assert image.shape[:2] == (height, width)
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.01, "the image is blank"
    assert float((rgb < 0.9).float().mean()) > 0.001, "almost nothing is drawn"


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_importance_heatmap_of_layers_by_groups():
    values = {f"layer {i}": torch.rand(8 - i, generator=g(i)) for i in range(3)}  # rows of unequal length
    assert_png(plot.importance_heatmap(values, title="heads"), (6.4, 4.8))
    assert_png(plot.importance_heatmap(torch.rand(4, 6, generator=g()), labels=list("abcd"), log=True,
                                       figsize=(5, 3)), (5, 3))


def test_importance_heatmap_of_a_group_estimate():
    est = ffx.Estimate({"0.weight": torch.rand(16, generator=g()), "2.weight": torch.rand(4, generator=g(1))},
                       torch.tensor(10))
    assert_png(plot.importance_heatmap(est, figsize=(4, 2)), (4, 2))


def test_ema_evolution():
    est = ffx.Estimate({"a": torch.rand(5, generator=g()), "b": torch.rand(3, generator=g(1))}, torch.tensor(4))
    state = ffx.ema_init(est, decay=0.8)
    history, raw = [], []
    for step in range(12):
        batch = ffx.Estimate({k: v * (1 + 0.3 * torch.rand(v.shape, generator=g(step))) for k, v in est.value.items()},
                             est.count)
        state = ffx.ema_update(state, batch)
        history.append(state)
        raw.append(batch)
    assert_png(plot.ema_evolution(history, raw=raw), (6.4, 4.8))
    assert_png(plot.ema_evolution([ffx.ema_value(s) for s in history], top=3, log=False, figsize=(4, 3)), (4, 3))


def records() -> list[SweepRecord]:
    out = []
    for c in (0.05, 0.2, 0.5):
        for s, f in (("top", 3.0), ("random", 1.0), ("bottom", 0.2)):
            risk = f * 1e-3 / c
            out.append(SweepRecord(c, 0.1, s, risk, 1.1 * risk, 0.1 * risk, 0.9 * risk, 0.05 * risk, 0.0, 3, 2))
    return out


@pytest.mark.parametrize("y", ["kl_mean", "loss_increase_mean"])
def test_percolation_curves(y):
    assert_png(plot.percolation_curves(records(), y=y, title="digits"), (11.0, 4.5))


def test_eigenvalue_spectrum():
    values = torch.logspace(0, -6, 40, dtype=torch.float64)
    assert_png(plot.eigenvalue_spectrum(values), (6.4, 4.8))
    assert_png(plot.eigenvalue_spectrum(Eigen(values[:5], {"w": torch.zeros(5, 3)}), figsize=(3, 3)), (3, 3))
    assert_png(plot.eigenvalue_spectrum({"w": torch.rand(3, 4, generator=g()) - 0.2}), (6.4, 4.8))
    nodes = torch.rand(2, 6, generator=g(2), dtype=torch.float64)
    density = SpectralDensity(nodes, torch.full((2, 6), 1 / 6, dtype=torch.float64))
    assert_png(plot.eigenvalue_spectrum(density, sigma=0.05), (6.4, 4.8))


def test_no_pyplot_state_is_left():
    before = set(sys.modules.get("matplotlib.pyplot").get_fignums()) if "matplotlib.pyplot" in sys.modules else None
    plot.importance_heatmap({"a": torch.ones(3)})
    after = set(sys.modules.get("matplotlib.pyplot").get_fignums()) if "matplotlib.pyplot" in sys.modules else None
    assert before == after


def test_missing_matplotlib_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(FisherError, match="importance_heatmap: plotting needs matplotlib"):
        plot.importance_heatmap({"a": torch.ones(3)})


@pytest.mark.parametrize(("call", "match"), [
    (lambda: plot.importance_heatmap(torch.ones(3)), "importance_heatmap: a tensor of values must be 2-D"),
    (lambda: plot.importance_heatmap(torch.ones(2, 3), labels=["a"]), "labels has 1 entries for 2 rows"),
    (lambda: plot.importance_heatmap({"a": torch.ones(2, 3)}), r"values\['a'\] has shape \(2, 3\)"),
    (lambda: plot.importance_heatmap({"a": torch.tensor([1.0, float("nan")])}), "values hold inf or NaN"),
    (lambda: plot.importance_heatmap([1, 2]), "values must be a non-empty"),
    (lambda: plot.ema_evolution([]), "ema_evolution: history must be a non-empty list"),
    (lambda: plot.ema_evolution([{"a": torch.ones(2)}, {"b": torch.ones(2)}]), r"history\[1\] has other names"),
    (lambda: plot.ema_evolution([{"a": torch.ones(2)}], steps=[1, 2]), "steps has 2 entries for 1 steps"),
    (lambda: plot.ema_evolution([{"a": torch.ones(2)}], top=0), "top must be a positive integer"),
    (lambda: plot.percolation_curves([]), "percolation_curves: records must be a non-empty list"),
    (lambda: plot.percolation_curves(records(), y="risk"), "y must be 'kl_mean' or 'loss_increase_mean'"),
    (lambda: plot.eigenvalue_spectrum("x"), "eigenvalue_spectrum: spectrum must be a 1-D tensor"),
    (lambda: plot.eigenvalue_spectrum(torch.tensor([])), "at least one finite eigenvalue"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input(call, match):
    with pytest.raises(FisherError, match=match):
        call()
