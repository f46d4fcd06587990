"""Command line: ``fisherfx demo``.

The demo trains a small MLP (64-64-32-10) on scikit-learn's digits for 50 epochs of Adam (set
``--epochs``), then walks over the training set in batches, computing the token-normalised
empirical and Monte-Carlo group Fisher per output channel, and keeps a bias-corrected EMA of
each. It prints the EMA batch by batch and the top channels of every layer.
"""

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from . import fisher, groups, problems, state
from .likelihoods import Categorical


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


def demo(epochs: int = 50, batch_size: int = 128, top: int = 5, decay: float = 0.9, seed: int = 0) -> None:
    """Train, then track the EMA of the per-channel empirical and MC Fisher, and print tables."""
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.epochs, args.batch_size, args.top, args.decay, args.seed)
