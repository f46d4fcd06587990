"""Plots of Fisher values: importance heatmaps, EMA evolution, percolation curves, eigenvalue spectra.

Each function takes values (tensors, dicts, records) and returns a :class:`matplotlib.figure.Figure`;
saving it is the caller's (``fig.savefig("fisher.png")``). Figures are built without ``pyplot``, so no
global figure state is created or left behind, and any backend (Agg included) renders them.

matplotlib is an optional dependency, imported inside each function: ``pip install matplotlib``.
"""

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._errors import FisherError
from .state import EMAState, Estimate, ema_value

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_COLOURS = {"top": "tab:red", "random": "tab:gray", "bottom": "tab:blue"}


def _figure(where: str, figsize: tuple[float, float], ncols: int = 1) -> tuple["Figure", Any]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise FisherError(f"{where}: plotting needs matplotlib, which is not installed; pip install matplotlib") \
            from None
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _values(where: str, option: str, x: Any) -> dict[str, Tensor]:
    if isinstance(x, EMAState):
        x = ema_value(x)
    if isinstance(x, Estimate):
        x = x.value
    if not isinstance(x, Mapping) or not x or not all(isinstance(v, Tensor) for v in x.values()):
        raise FisherError(f"{where}: {option} must be a non-empty {{name: tensor}} dict, an Estimate or an EMAState, "
                          f"got {type(x).__name__}")
    return {k: v.detach().to("cpu", torch.float64) for k, v in x.items()}


def importance_heatmap(values: Mapping[str, Tensor] | Tensor, labels: Sequence[str] | None = None,
                       log: bool = False, title: str | None = None, xlabel: str = "group",
                       figsize: tuple[float, float] = (6.4, 4.8)) -> "Figure":
    """Heatmap of per-group importances: one row per layer (or parameter), one column per group.

    Args:
        values: ``{row: [G]}`` (e.g. :func:`~fisherfx.head_totals` ``{layer: [H]}``, a group estimate's
            ``value`` per channel; rows of different lengths are padded with blank cells, a 0-d value is
            one cell), or a 2-D tensor ``[L, G]``.
        labels: row labels for a tensor (default ``0 … L−1``); dict keys otherwise.
        log: logarithmic colour scale (positive entries only; others blank).
        title, xlabel: texts.
        figsize: inches, ``(width, height)``.

    Returns:
        The figure: one image with a colour bar.

    Raises:
        FisherError: matplotlib missing; ``values`` of another kind, a row with more than one axis,
            ``labels`` of the wrong length, non-finite entries.

    """
    where = "importance_heatmap"
    if isinstance(values, Tensor):
        if values.ndim != 2:
            raise FisherError(f"{where}: a tensor of values must be 2-D [layers, groups], got shape "
                              f"{tuple(values.shape)}")
        rows = list(values.detach().to("cpu", torch.float64))
        names = [str(i) for i in range(len(rows))] if labels is None else [str(n) for n in labels]
        if len(names) != len(rows):
            raise FisherError(f"{where}: labels has {len(names)} entries for {len(rows)} rows")
    else:
        if labels is not None:
            raise FisherError(f"{where}: labels are for a tensor of values; a dict's keys label its rows")
        found = _values(where, "values", values)
        bad = next((k for k, v in found.items() if v.ndim > 1), None)
        if bad is not None:
            raise FisherError(f"{where}: values[{bad!r}] has shape {tuple(found[bad].shape)}; each row must be 1-D "
                              "(sum a split q/k/v axis first, e.g. with head_totals)")
        names, rows = list(found), [v.reshape(-1) for v in found.values()]
    if not all(bool(torch.isfinite(r).all()) for r in rows):
        raise FisherError(f"{where}: values hold inf or NaN")
    width = max(r.numel() for r in rows)
    grid = torch.full((len(rows), width), math.nan, dtype=torch.float64)
    for i, r in enumerate(rows):
        grid[i, : r.numel()] = r
    fig, ax = _figure(where, figsize)
    norm = None
    if log:
        from matplotlib.colors import LogNorm

        grid = torch.where(grid > 0, grid, math.nan)
        positive = grid[torch.isfinite(grid)]
        if positive.numel():
            norm = LogNorm(float(positive.min()), float(positive.max()))
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    if width <= 40:
        ax.set_xticks(range(width))
    ax.set_xlabel(xlabel)
    fig.colorbar(image, ax=ax, label="importance")
    if title:
        ax.set_title(title)
    return fig


def ema_evolution(history: Sequence[Mapping[str, Tensor] | EMAState | Estimate],
                  raw: Sequence[Mapping[str, Tensor] | Estimate] | None = None, top: int | None = None,
                  steps: Sequence[float] | None = None, log: bool = True, title: str | None = None,
                  figsize: tuple[float, float] = (6.4, 4.8)) -> "Figure":
    """The EMA of a Fisher over steps: one line per parameter (its total), or per top group.

    Args:
        history: one value per step: ``{name: tensor}`` (e.g. :func:`~fisherfx.ema_value`), an
            :class:`~fisherfx.EMAState` (read bias-corrected) or an :class:`~fisherfx.Estimate`; the
            same names and shapes at every step.
        raw: the per-batch estimates the EMA folded in, one per step, drawn as faint markers.
        top: draw the ``top`` groups (entries) with the largest final value, labelled ``name[index]``,
            instead of each parameter's total.
        steps: the x values (default ``1 … len(history)``).
        log: logarithmic y axis.
        title: text.
        figsize: inches.

    Returns:
        The figure.

    Raises:
        FisherError: matplotlib missing, an empty history, steps whose names or shapes change, ``raw`` or
            ``steps`` of another length, ``top < 1``.

    """
    where = "ema_evolution"
    if isinstance(history, (Mapping, EMAState, Estimate)) or not isinstance(history, Sequence) or not history:
        raise FisherError(f"{where}: history must be a non-empty list of values, one per step")
    frames = [_values(where, f"history[{i}]", h) for i, h in enumerate(history)]
    first = frames[0]
    for i, f in enumerate(frames):
        if list(f) != list(first) or any(f[k].shape != first[k].shape for k in first):
            raise FisherError(f"{where}: history[{i}] has other names or shapes than history[0]")
    xs = list(range(1, len(frames) + 1)) if steps is None else [float(s) for s in steps]
    if len(xs) != len(frames):
        raise FisherError(f"{where}: steps has {len(xs)} entries for {len(frames)} steps")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise FisherError(f"{where}: top must be a positive integer or None, got {top!r}")

    def series(frame_list: list[dict[str, Tensor]]) -> dict[str, list[float]]:
        if top is None:
            return {k: [float(f[k].sum()) for f in frame_list] for k in first}
        final = [(float(v), k, i) for k in first for i, v in enumerate(frames[-1][k].reshape(-1).tolist())]
        picked = sorted(final, key=lambda t: -t[0])[:top]
        return {f"{k}[{i}]": [float(f[k].reshape(-1)[i]) for f in frame_list] for _, k, i in picked}

    fig, ax = _figure(where, figsize)
    lines = series(frames)
    for label, ys in lines.items():
        (line,) = ax.plot(xs, ys, label=label, linewidth=1.5)
        if raw is not None:
            if len(raw) != len(frames):
                raise FisherError(f"{where}: raw has {len(raw)} entries for {len(frames)} steps")
            batches = series([_values(where, f"raw[{i}]", r) for i, r in enumerate(raw)])
            ax.plot(xs, batches[label], "o", markersize=2.5, alpha=0.35, color=line.get_color())
    if log and all(y > 0 for ys in lines.values() for y in ys):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("EMA of the Fisher" + (" (total per parameter)" if top is None else ""))
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title)
    return fig


def percolation_curves(records: Sequence[Any], y: str = "kl_mean", title: str | None = None,
                       figsize: tuple[float, float] = (11.0, 4.5)) -> "Figure":
    """Percolation curves from :func:`~fisherfx.metrics.percolation_sweep` records.

    Left: measured damage against predicted risk, by selection, log–log, with the line ``damage = risk``
    (where the KL should fall for small ``ε`` and the exact Fisher). Right: damage against the
    concentration ``C``, one line per selection and ``ε``, with the standard deviation over the repeats.

    Args:
        records: :class:`~fisherfx.metrics.SweepRecord` values.
        y: ``"kl_mean"`` or ``"loss_increase_mean"``.
        title: text.
        figsize: inches.

    Returns:
        The figure, two panels.

    Raises:
        FisherError: matplotlib missing, no records, an unknown ``y``.

    """
    where = "percolation_curves"
    if y not in ("kl_mean", "loss_increase_mean"):
        raise FisherError(f"{where}: y must be 'kl_mean' or 'loss_increase_mean', got {y!r}")
    fields = ("concentration", "epsilon", "select", "risk", y, y.replace("_mean", "_std"))
    if not records or not all(all(hasattr(r, f) for f in fields) for r in records):
        raise FisherError(f"{where}: records must be a non-empty list of SweepRecord values")
    std = y.replace("_mean", "_std")
    fig, (left, right) = _figure(where, figsize, ncols=2)
    positive = [v for r in records for v in (r.risk, getattr(r, y)) if v > 0]
    log = bool(positive)  # log axes; points at or below zero (e.g. a bottom selection's risk 0) are left out

    def bars(rs: list) -> list[list[float]]:  # std bars, the lower one kept above zero on a log axis
        up = [getattr(r, std) for r in rs]
        down = [min(e, 0.999 * getattr(r, y)) if log else e for e, r in zip(up, rs)]
        return [down, up]

    omitted = 0
    for s in dict.fromkeys(r.select for r in records):
        mine = [r for r in records if r.select == s]
        shown = [r for r in mine if r.risk > 0 and getattr(r, y) > 0] if log else mine
        omitted += len(mine) - len(shown)
        left.errorbar([r.risk for r in shown], [getattr(r, y) for r in shown], yerr=bars(shown), fmt="o",
                      markersize=4, capsize=2, color=_COLOURS.get(s), label=s)
        for eps in dict.fromkeys(r.epsilon for r in mine):
            line = sorted((r for r in mine if r.epsilon == eps and (getattr(r, y) > 0 or not log)),
                          key=lambda r: r.concentration)
            right.errorbar([r.concentration for r in line], [getattr(r, y) for r in line], yerr=bars(line),
                           marker="o", markersize=3, capsize=2, color=_COLOURS.get(s), alpha=0.9,
                           label=f"{s}, ε={eps:g}")
    if log:
        lo, hi = min(positive), max(positive)
        left.plot([lo, hi], [lo, hi], "k--", linewidth=0.8, label="damage = risk")
        for ax in (left, right):
            ax.set_yscale("log")
        left.set_xscale("log")
        if omitted:
            left.text(0.02, 0.98, f"{omitted} settings with risk or damage ≤ 0 not shown", transform=left.transAxes,
                      ha="left", va="top", fontsize=7)
    name = "KL(p_θ ‖ p_θ+δ)" if y == "kl_mean" else "loss increase"
    left.set_xlabel("predicted risk ½ δᵀFδ")
    left.set_ylabel(f"measured {name}")
    left.legend(fontsize=7, loc="lower right")
    from matplotlib.ticker import NullFormatter

    cs = sorted({r.concentration for r in records})
    right.set_xscale("log")
    right.set_xticks(cs, [f"{c:g}" for c in cs])
    right.xaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel("concentration C (fraction of groups)")
    right.set_ylabel(f"measured {name}")
    right.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def eigenvalue_spectrum(spectrum: Any, sigma: float | None = None, log: bool = True, title: str | None = None,
                        figsize: tuple[float, float] = (6.4, 4.8)) -> "Figure":
    """An eigenvalue spectrum: eigenvalues in decreasing order, or a smoothed spectral density.

    Args:
        spectrum: a 1-D tensor of eigenvalues; an :class:`~fisherfx.spectrum.Eigen` (its ``values``,
            e.g. from :func:`~fisherfx.lanczos`); a diagonal (:class:`~fisherfx.Estimate` or
            ``{name: tensor}``, its entries); or a :class:`~fisherfx.spectrum.SpectralDensity`, drawn as
            its Gaussian-smoothed density (``sigma``, default 1/100 of the node range).
        sigma: the smoothing width of a density, ``> 0``.
        log: logarithmic y axis (positive eigenvalues only; the count of the others is noted).
        title: text.
        figsize: inches.

    Returns:
        The figure.

    Raises:
        FisherError: matplotlib missing, a spectrum of another kind, no eigenvalue, non-finite values, a
            ``sigma`` that is not positive.

    """
    from .spectrum import Eigen, SpectralDensity, density

    where = "eigenvalue_spectrum"
    if isinstance(spectrum, SpectralDensity):
        nodes = spectrum.nodes.detach().to("cpu", torch.float64)
        lo, hi = float(nodes.min()), float(nodes.max())
        width = sigma if sigma is not None else max(hi - lo, 1e-12) / 100
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
            raise FisherError(f"{where}: sigma must be a finite number > 0, got {sigma!r}")
        grid = torch.linspace(lo - 3 * width, hi + 3 * width, 512, dtype=torch.float64)
        values = density(spectrum, grid, width).detach().to("cpu", torch.float64)
        fig, ax = _figure(where, figsize)
        ax.plot(grid.numpy(), values.numpy())
        if log and bool((values > 0).any()):
            ax.set_yscale("log")
            ax.set_ylim(bottom=float(values[values > 0].max()) * 1e-8)
        ax.set_xlabel("eigenvalue λ")
        ax.set_ylabel("density")
        if title:
            ax.set_title(title)
        return fig
    if isinstance(spectrum, Eigen):
        eig = spectrum.values
    elif isinstance(spectrum, (Estimate, Mapping)):
        eig = torch.cat([v.reshape(-1) for v in _values(where, "spectrum", spectrum).values()])
    elif isinstance(spectrum, Tensor) and spectrum.ndim == 1:
        eig = spectrum
    else:
        raise FisherError(f"{where}: spectrum must be a 1-D tensor of eigenvalues, an Eigen, a diagonal or a "
                          f"SpectralDensity, got {type(spectrum).__name__}")
    eig = eig.detach().to("cpu", torch.float64).sort(descending=True).values
    if eig.numel() == 0 or not bool(torch.isfinite(eig).all()):
        raise FisherError(f"{where}: spectrum must hold at least one finite eigenvalue")
    fig, ax = _figure(where, figsize)
    index = torch.arange(1, eig.numel() + 1)
    shown = eig > 0 if log else torch.ones_like(eig, dtype=torch.bool)
    ax.plot(index[shown].numpy(), eig[shown].numpy(), marker="." if eig.numel() <= 200 else None)
    if log and bool(shown.any()):
        ax.set_yscale("log")
        if not bool(shown.all()):
            ax.text(0.98, 0.98, f"{int((~shown).sum())} eigenvalues ≤ 0 not shown", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
    ax.set_xlabel("index i (decreasing)")
    ax.set_ylabel("eigenvalue λ_i")
    if title:
        ax.set_title(title)
    return fig


__all__ = ["ema_evolution", "eigenvalue_spectrum", "importance_heatmap", "percolation_curves"]
