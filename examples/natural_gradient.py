"""SGD, Adam and K-FAC on scikit-learn's digits: the same model, data and number of steps.

An MLP (64-64-10) and a small CNN are trained on the 1,437 training images of ``load_digits`` with
mini-batches of 128. SGD and Adam are ``torch.optim`` with their usual learning rates; K-FAC is
``ffx.kfac_optimizer`` with its defaults (MC factors every step, eigendecomposition every 10 steps,
KL clipping), as a pure ``init``/``update`` pair on a parameter dict. Each run prints the full
training loss against steps and wall time, and the test accuracy at the end; with matplotlib the
curves are saved to ``docs/kfac-natural-gradient.png``. ``--quick`` (or ``FISHERFX_SMOKE=1``): a few steps, no
figure written.
"""

# %%
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad

import fisherfx as ffx
from fisherfx.natural import apply_updates, kfac_optimizer

SMOKE = bool(os.environ.get("FISHERFX_SMOKE")) or "--quick" in sys.argv  # a few steps, no figure written
STEPS = 4 if SMOKE else 300
BATCH = 128
torch.set_num_threads(1)


def digits() -> tuple[torch.Tensor, ...]:
    """Digits scaled to [0, 1], 80 % for training; a random stand-in of the same shapes in smoke runs."""
    gen = torch.Generator().manual_seed(0)
    if SMOKE:
        x, y = torch.rand(300, 64, generator=gen), torch.randint(0, 10, (300,), generator=gen)
    else:
        from sklearn.datasets import load_digits

        data = load_digits()
        x, y = torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)
    order = torch.randperm(x.shape[0], generator=gen)
    cut = int(0.8 * x.shape[0])
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        return self.head(torch.relu(self.conv2(h)).flatten(1))


MODELS = {"MLP": lambda: nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)), "CNN": CNN}


# %% one training run
def train(model_name: str, method: str, steps: int = STEPS, **options) -> dict:
    x, y, x_test, y_test = digits()
    torch.manual_seed(0)
    model = MODELS[model_name]().eval()
    params = ffx.params_of(model)

    def loss(p: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, p, (xb,)), yb)

    if method == "K-FAC":
        opt = kfac_optimizer(ffx.supervised(model, ffx.Categorical()), **options)
        state = opt.init(params)
    else:
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        torch_opt = (torch.optim.SGD(leaves.values(), lr=options.get("lr", 0.1)) if method == "SGD" else
                     torch.optim.Adam(leaves.values(), lr=options.get("lr", 1e-3)))
    gen = torch.Generator().manual_seed(1)
    curve, clock, start = [], [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        xb, yb = x[idx], y[idx]
        if method == "K-FAC":
            g = grad(loss)(params, xb, yb)
            updates, state = opt.update(g, state, params, (xb, yb))
            params = apply_updates(params, updates)
        else:
            torch_opt.zero_grad()
            loss(leaves, xb, yb).backward()
            torch_opt.step()
            params = {k: v.detach() for k, v in leaves.items()}
        elapsed = time.perf_counter() - start
        if step % 10 == 9 or step == steps - 1:
            with torch.no_grad():
                curve.append((step + 1, float(loss(params, x, y))))
            clock.append(elapsed)
    with torch.no_grad():
        accuracy = float((functional_call(model, params, (x_test,)).argmax(1) == y_test).float().mean())
    return {"curve": curve, "time": clock, "accuracy": accuracy}


# %% SGD vs Adam vs K-FAC
if __name__ == "__main__":
    results = {}
    for model_name in MODELS:
        for method in ("SGD", "Adam", "K-FAC"):
            r = results[model_name, method] = train(model_name, method)
            print(f"{model_name:>4} {method:>5}: final training loss {r['curve'][-1][1]:.3g} after {STEPS} steps "
                  f"in {r['time'][-1]:.1f} s, test accuracy {r['accuracy']:.3f}")
        target = results[model_name, "SGD"]["curve"][-1][1]
        for method in ("Adam", "K-FAC"):
            r = results[model_name, method]
            reached = next(((s, t) for (s, v), t in zip(r["curve"], r["time"], strict=True) if v <= target), None)
            print(f"{model_name:>4} {method:>5} reaches SGD's final loss {target:.3g} "
                  + ("never" if reached is None else f"at step {reached[0]}, after {reached[1]:.2f} s"))
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None and not SMOKE:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for row, model_name in enumerate(MODELS):
            for method in ("SGD", "Adam", "K-FAC"):
                r = results[model_name, method]
                steps_, losses = zip(*r["curve"], strict=True)
                axes[row, 0].semilogy(steps_, losses, label=method)
                axes[row, 1].semilogy(r["time"], losses, label=method)
            axes[row, 0].set(xlabel="step", ylabel=f"{model_name} training loss")
            axes[row, 1].set(xlabel="wall time (s)")
            axes[row, 0].legend()
        fig.tight_layout()
        fig.savefig(Path(__file__).resolve().parents[1] / "docs" / "kfac-natural-gradient.png", dpi=100)
