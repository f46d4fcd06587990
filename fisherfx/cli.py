"""Command line: ``fisherfx demo``, ``fisherfx fisher`` and ``fisherfx show``.

``fisher`` and ``show`` (HuggingFace causal LMs, Fisher files) are in :mod:`fisherfx._cli_fisher`.

The demo trains a small MLP (64-64-32-10) on scikit-learn's digits for 50 epochs of Adam (set
``--epochs``), then walks over the training set in batches, computing the token-normalised
empirical and Monte-Carlo group Fisher per output channel, and keeps a bias-corrected EMA of
each. It prints the EMA batch by batch and the top channels of every layer.

Then a percolation sweep: perturbations of one norm ``ε`` on the top-, randomly- and bottom-ranked
output channels (weight rows, ranked by the EMA of the MC Fisher per entry), measured on the held-out
digits, printed as a table with the rank correlation between the predicted risk and the measured
damage, and plotted to ``fisherfx-percolation.png`` (``--plot PATH`` elsewhere, ``--no-plot`` not at
all; skipped with a note when matplotlib is not installed).
"""

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from . import _cli_fisher, fisher, groups, problems, state
from .likelihoods import Categorical
from .metrics import percolation


def _digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the environment
        sys.exit("fisherfx demo needs scikit-learn: pip install 'fisherfx[demo]'")
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    """Adam on minibatches of 64 for ``epochs`` epochs; returns the seconds it took."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return time.perf_counter() - start


def _layer_channels(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, the Fisher of each output channel: its weight row plus its bias entry."""
    layers: dict[str, torch.Tensor] = {}
    for name, v in values.items():
        layer = name.rsplit(".", 1)[0]
        layers[layer] = layers[layer] + v if layer in layers else v.clone()
    return layers


def demo(epochs: int = 50, batch_size: int = 128, top: int = 5, decay: float = 0.9, seed: int = 0,
         epsilon: float = 2.0, repeats: int = 5, plot: str | None = None) -> None:
    """Train, then track the EMA of the per-channel empirical and MC Fisher, print tables, and run a
    percolation sweep (``epsilon``, ``repeats`` draws per setting; a plot saved to ``plot``).
    """
    x, y = _digits(seed)
    n_train = int(0.8 * len(y))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    seconds = _train(model, x[:n_train], y[:n_train], epochs, seed)
    model.eval()
    with torch.no_grad():
        acc = (model(x[n_train:]).argmax(-1) == y[n_train:]).float().mean().item()
    print(f"trained an MLP 64-64-32-10 on digits for {epochs} epochs ({seconds:.1f} s): test accuracy {acc:.3f}\n")

    problem = problems.supervised(model, Categorical())
    params = problems.params_of(model)
    spec = groups.channels(params, model)
    gen = torch.Generator().manual_seed(seed)
    kinds = {"empirical": {}, "mc": {"n_samples": 1, "generator": gen}}
    ema: dict[str, state.EMAState] = {}  # one EMA per kind, as a plain dict[key, state]
    rows = []
    for step, idx in enumerate(torch.arange(n_train).split(batch_size), start=1):
        batch = (x[idx], y[idx])
        for kind, opts in kinds.items():
            est = fisher.group_fisher(problem, params, batch, spec, kind=kind, normalize="tokens", **opts)
            if kind not in ema:
                ema[kind] = state.ema_init(est, decay)  # names and shapes of the group values
            ema[kind] = state.ema_update(ema[kind], est)
            rows.append((step, kind, int(est.count), _total(est.value), _total(state.ema_value(ema[kind]))))

    print(f"EMA (decay {decay}, bias-corrected) of the token-normalised Fisher trace, batch by batch")
    print(f"{'batch':>5}  {'kind':<9}  {'tokens':>6}  {'batch trace':>11}  {'EMA trace':>10}")
    for step, kind, count, batch_trace, ema_trace in rows:
        print(f"{step:>5}  {kind:<9}  {count:>6}  {batch_trace:>11.4f}  {ema_trace:>10.4f}")

    emp = _layer_channels(state.ema_value(ema["empirical"]))
    mc = _layer_channels(state.ema_value(ema["mc"]))
    print(f"\ntop {top} output channels per layer by EMA of the MC Fisher (weight row + bias)")
    print(f"{'layer':<6}  {'channel':>7}  {'MC Fisher':>10}  {'empirical':>10}  {'share of layer':>14}")
    for layer, values in mc.items():
        order = values.argsort(descending=True)[:top]
        for c in order.tolist():
            share = (values[c] / values.sum()).item()
            print(f"{layer:<6}  {c:>7}  {values[c].item():>10.5f}  {emp[layer][c].item():>10.5f}  {share:>14.1%}")

    weights = {k: g for k, g in spec.items() if k.endswith("weight")}
    importance = {k: v for k, v in state.ema_value(ema["mc"]).items() if k in weights}
    _percolation(problem, params, (x[n_train:], y[n_train:]), importance, weights, epsilon, repeats, seed, plot)


CONCENTRATIONS = (0.02, 0.05, 0.1, 0.25, 0.5)


def _percolation(problem, params, batch, importance, spec, epsilon: float, repeats: int, seed: int,
                 plot: str | None) -> None:
    """Top vs random vs bottom channels at one ε: a table, the risk–damage rank correlation, a plot."""
    records = percolation.percolation_sweep(problem, params, batch, importance, spec, CONCENTRATIONS, [epsilon],
                                            repeats=repeats, generator=torch.Generator().manual_seed(seed),
                                            progress=False, score="mean")
    print(f"\npercolation: perturbations of norm ε={epsilon:g} on the top / random / bottom output channels (weight "
          f"rows ranked by the EMA of the MC Fisher per entry), {repeats} draws each, on {len(batch[1])} held-out "
          "digits")
    print(f"{'C':>5}  {'channels':>8}  {'select':<6}  {'risk ½δᵀFδ':>10}  {'KL mean ± std':>17}  "
          f"{'loss increase mean ± std':>24}")
    for r in records:
        print(f"{r.concentration:>5.2f}  {r.chosen:>8}  {r.select:<6}  {r.risk:>10.5f}  {r.kl_mean:>8.5f} ± "
              f"{r.kl_std:<6.5f}  {r.loss_increase_mean:>13.5f} ± {r.loss_increase_std:<8.5f}")
    rho_kl = percolation.risk_correlation(records, "kl_mean")
    rho_loss = percolation.risk_correlation(records, "loss_increase_mean")
    print(f"Spearman rank correlation of the risk with the measured KL: {rho_kl:.3f}, with the loss increase: "
          f"{rho_loss:.3f}")
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("percolation curves not plotted: matplotlib is not installed (pip install 'fisherfx[plot]')")
            return
        from .plot import percolation_curves

        percolation_curves(records, title=f"digits MLP, ε={epsilon:g}").savefig(plot, dpi=120)
        print(f"percolation curves saved to {plot}")


def _total(values: dict[str, torch.Tensor]) -> float:
    return float(sum(v.sum() for v in values.values()))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``fisherfx`` console script."""
    parser = argparse.ArgumentParser(prog="fisherfx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small MLP on digits and print its per-channel Fisher")
    d.add_argument("--epochs", type=int, default=50, help="training epochs (default 50)")
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--top", type=int, default=5, help="channels shown per layer")
    d.add_argument("--decay", type=float, default=0.9, help="EMA decay in (0, 1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--epsilon", type=float, default=2.0, help="norm of the percolation perturbations (default 2)")
    d.add_argument("--repeats", type=int, default=5, help="perturbations drawn per setting (default 5)")
    d.add_argument("--plot", metavar="PATH", default="fisherfx-percolation.png",
                   help="where to save the percolation curves (default fisherfx-percolation.png; needs matplotlib)")
    d.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not plot")
    _cli_fisher.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.epochs, args.batch_size, args.top, args.decay, args.seed, args.epsilon, args.repeats, args.plot)
    else:
        _cli_fisher.run(args)
