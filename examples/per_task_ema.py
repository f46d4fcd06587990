"""Track a bias-corrected EMA of the per-channel Fisher for two tasks while training.

Two regression tasks share one MLP. After every training step the token-normalised MC group Fisher
per output channel is computed on the batch of the current task and folded into that task's EMA,
a plain ``dict[task, EMAState]``. At the end the channels that matter most to each task are
compared.
"""

# %%
import os

import torch
from torch import nn

import fisherfx as ffx

steps = 6 if os.environ.get("FISHERFX_SMOKE") else 200
gen = torch.Generator().manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
tasks = {"sin": torch.sin, "cos": torch.cos}
opt = torch.optim.SGD(model.parameters(), lr=0.05)

# %% training loop with one EMA per task
problem = ffx.supervised(model, ffx.Gaussian(sigma=0.1))
spec = ffx.channels(ffx.params_of(model))
states: dict[str, ffx.EMAState] = {}
for step in range(steps):
    task = list(tasks)[step % 2]
    x = torch.randn(32, 8, generator=gen)
    y = tasks[task](x.sum(1, keepdim=True))
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    est = ffx.group_fisher(problem, ffx.params_of(model), (x, y), spec, kind="mc", generator=gen,
                           normalize="tokens")
    states[task] = ffx.ema_update(states.get(task) or ffx.ema_init(est, decay=0.9), est)

# %% compare the tasks' most important hidden channels
importance = {task: ffx.ema_value(s)["0.weight"] + ffx.ema_value(s)["0.bias"] for task, s in states.items()}
for task, value in importance.items():
    print(f"{task}: top hidden channels {value.argsort(descending=True)[:5].tolist()}")
top = {task: set(v.argsort(descending=True)[:8].tolist()) for task, v in importance.items()}
print(f"overlap of the top-8 channels: {len(top['sin'] & top['cos'])} of 8")
