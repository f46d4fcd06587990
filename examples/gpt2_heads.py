"""Per-head Fisher of a tiny GPT-2 on a padded batch.

A GPT-2 built from a small config (no weights are downloaded) scores a left-padded batch with
``-100`` labels. ``causal_lm`` handles the causal shift and the padding, and ``heads`` splits
GPT-2's fused ``c_attn`` projection into query/key/value rows per head. The token-normalised
empirical Fisher of each head (q, k, v rows and output-projection columns, combined by
``head_totals``) is printed per layer, with the top heads of the model: what a head-percolation
experiment ranks.
"""

# %%
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fisherfx as ffx

config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32, bos_token_id=0,
                    eos_token_id=0, attn_implementation="eager")
torch.manual_seed(0)
model = GPT2LMHeadModel(config).eval()

# %% a left-padded batch: row 1 has 4 pad tokens, row 2 ignores its first two labels
ids = torch.randint(1, 64, (3, 12))
mask = torch.ones_like(ids)
mask[1, :4] = 0
labels = ids.clone()
labels[2, :3] = -100
batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

# %% per-head group Fisher
params = ffx.params_of(model)
spec = ffx.heads(params, num_heads=config.n_head, model=model)
est = ffx.group_fisher(ffx.causal_lm(model), params, batch, spec, normalize="tokens")
print(f"{int(est.count)} active tokens")
totals = ffx.head_totals(est.value, spec)  # {layer: [H]}
for layer, per_head in totals.items():
    print(f"{layer}: head Fisher {[round(float(v), 5) for v in per_head]}")
ranked = sorted(((float(v), layer, h) for layer, t in totals.items() for h, v in enumerate(t)), reverse=True)
print("top heads:", [f"{layer} head {h}" for _, layer, h in ranked[:3]])
