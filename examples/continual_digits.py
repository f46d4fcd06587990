"""Continual learning on digits: EWC from an EMA of the Fisher, and the damage the Fisher predicts.

Task A is digits 0–4, task B digits 5–9, learned one after the other by one MLP with a shared
10-way head. While it learns A, a bias-corrected EMA of the diagonal Monte-Carlo Fisher of task A is
kept, per sample (``normalize="samples"``: squared per-sample gradients averaged over the batch,
the Fisher EWC's penalty needs). Then B is learned twice from the same start: plainly, and with the
EWC penalty ``(λ/2) Σ F_A (θ − θ_A)²`` added to B's loss. The example prints task A's accuracy
before and after, and for each run the damage to task A that the Fisher predicts from the parameter
change alone, ``½ Σ F_A δ²`` with ``δ = θ_after − θ_A``, next to the loss increase measured on task A.
The prediction is second order: close to the measured KL for small changes along the way, far
below the loss increase once B has moved ``θ`` far (a confident model's Fisher is small, while its
log-loss grows linearly in the logits once the wrong classes win), which is why EWC's ``λ`` is tuned
above the Laplace value. Along the way, the diagonal Fisher can also miss most of the second-order
term when the change is coherent across entries (a whole row of the head moving one way); the exact
Fisher product (:func:`fisherfx.ggn_vp` in :func:`~fisherfx.metrics.risk_score`) keeps it.

Run ``python examples/continual_digits.py`` (``--quick``, or ``FISHERFX_SMOKE=1``, for a few steps).
"""

# %%
import functools
import os
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import fisherfx as ffx
from fisherfx.metrics import ewc_penalty, fisher_overlap, fisher_weighted_damage, perturbation_damage, risk_score

quick = bool(os.environ.get("FISHERFX_SMOKE")) or "--quick" in sys.argv
epochs = 1 if quick else 15
strength = 2000.0  # λ; λ ≈ N_A (here ~720) is the Laplace approximation proper, larger keeps A harder

data = load_digits()
x = torch.tensor(data.data, dtype=torch.float32) / 16.0
y = torch.tensor(data.target)
order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
x, y = x[order], y[order]
split = int(0.8 * len(y))
tasks = {}
for name, classes in (("A", y < 5), ("B", y >= 5)):
    train, test = classes.clone(), classes.clone()
    train[split:], test[:split] = False, False
    tasks[name] = {"train": (x[train], y[train]), "test": (x[test], y[test])}


def accuracy(model: nn.Module, batch) -> float:
    with torch.no_grad():
        return (model(batch[0]).argmax(-1) == batch[1]).float().mean().item()


def batches(batch, gen: torch.Generator, size: int = 64):
    for idx in torch.randperm(len(batch[1]), generator=gen).split(size):
        yield batch[0][idx], batch[1][idx]


# %% learn task A, keeping an EMA of its per-sample MC Fisher over the last epoch
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
problem = ffx.supervised(model, ffx.Categorical())
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
gen = torch.Generator().manual_seed(1)
ema = None
for epoch in range(epochs):
    for xb, yb in batches(tasks["A"]["train"], gen):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        if epoch == epochs - 1:
            est = ffx.diag_fisher(problem, ffx.params_of(model), (xb, yb), kind="mc", generator=gen)
            ema = ffx.ema_update(ema or ffx.ema_init(est, decay=0.9), est)
fisher_a = ffx.ema_value(ema)
theta_a = {k: v.clone() for k, v in ffx.params_of(model).items()}
print(f"after task A: accuracy on A {accuracy(model, tasks['A']['test']):.3f}")
fisher_b_start = ffx.diag_fisher(problem, theta_a, tasks["B"]["train"], kind="mc", generator=gen)
print(f"overlap of the Fishers of A and B at θ_A: {float(fisher_overlap(fisher_a, fisher_b_start).total):.3f}")

# %% learn task B, with and without EWC, from the same start
finals = {}
print(f"\n{'run':<10}  {'acc A':>6}  {'acc B':>6}  {'predicted ΔL_A':>14}  {'measured ΔL_A':>13}  "
      f"{'normalised':>10}")
for name, lam in (("plain", 0.0), (f"EWC λ={strength:g}", strength)):
    model.load_state_dict(dict(theta_a))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(epochs):
        for xb, yb in batches(tasks["B"]["train"], gen):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            if lam:
                loss = loss + ewc_penalty(dict(model.named_parameters()), theta_a, fisher_a, lam)
            loss.backward()
            opt.step()
    theta = ffx.params_of(model)
    delta = {k: theta[k] - theta_a[k] for k in theta}
    finals[name] = delta
    predicted = fisher_weighted_damage(fisher_a, delta)
    measured = perturbation_damage(problem, theta_a, theta, tasks["A"]["test"])
    print(f"{name:<10}  {accuracy(model, tasks['A']['test']):>6.3f}  {accuracy(model, tasks['B']['test']):>6.3f}  "
          f"{float(predicted.total):>14.4f}  {float(measured.loss_increase):>13.4f}  "
          f"{float(predicted.normalized):>10.2f}")
print("predicted ΔL_A = ½ Σ F_A δ² (second order at θ_A); measured on A's held-out digits; 'normalised' is the "
      "prediction over that of a change of the same norm that ignores F_A")

# %% along the straight line from θ_A to the plain run's end: where the second-order prediction holds
# the diagonal EMA Fisher drops the off-diagonal terms; the exact Fisher on A's digits (ggn_vp) keeps them
exact = functools.partial(ffx.ggn_vp, problem, theta_a, tasks["A"]["test"])
print(f"\n{'t':>5}  {'diagonal':>9}  {'exact':>9}  {'measured KL':>11}  {'measured ΔL_A':>13}   "
      "(θ = θ_A + t δ_plain; ½ δᵀFδ with F diagonal or exact)")
for t in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
    delta = {k: t * v for k, v in finals["plain"].items()}
    measured = perturbation_damage(problem, theta_a, {k: theta_a[k] + delta[k] for k in delta}, tasks["A"]["test"])
    diagonal, full = fisher_weighted_damage(fisher_a, delta).total, risk_score(exact, delta)
    print(f"{t:>5g}  {float(diagonal):>9.2e}  {float(full):>9.2e}  {float(measured.kl):>11.2e}  "
          f"{float(measured.loss_increase):>13.2e}")
