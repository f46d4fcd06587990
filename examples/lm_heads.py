"""Head and channel importances of a tiny LLaMA trained on a toy grammar, and what perturbing them does.

A small probabilistic grammar (shipped below) generates sentences such as "the small dog sees a
cat ." or "a bird that runs sleeps ."; a 2-layer LLaMA with grouped-query attention (4 query heads,
2 key/value heads) built from a config (nothing is downloaded) learns them briefly. Batches are
right-padded with an attention mask, so padding takes part as in real use.

Then: a token-normalised EMA of the per-head and per-channel group Fisher (MC), a heatmap of the
head importances (layers × heads) saved to ``lm_heads.png``, the top head of each layer ablated
(its output-projection columns zeroed) with the measured loss increase next to the risk predicted
by the group Fisher and by the exact Fisher, and a percolation sweep over the heads: top- against
random- and bottom-ranked at the same ``ε``.

Run ``python examples/lm_heads.py`` (``--quick``, or ``FISHERFX_SMOKE=1``, for a few steps and no file).
"""

# %%
import functools
import io
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fisherfx as ffx
from fisherfx.metrics import percolation_sweep, perturbation_damage, risk_correlation, risk_score
from fisherfx.plot import importance_heatmap

quick = bool(os.environ.get("FISHERFX_SMOKE")) or "--quick" in sys.argv
steps, ema_batches = (3, 2) if quick else (300, 10)

# %% the grammar: rules with weights; lowercase words are tokens
GRAMMAR = {
    "S": [(["NP", "VP", "."], 1.0)],
    "NP": [(["DET", "N"], 0.5), (["DET", "ADJ", "N"], 0.3), (["DET", "N", "that", "VI"], 0.2)],
    "VP": [(["VI"], 0.4), (["VT", "NP"], 0.6)],
    "DET": [(["the"], 0.6), (["a"], 0.4)],
    "ADJ": [(["small"], 0.5), (["big"], 0.3), (["red"], 0.2)],
    "N": [(["dog"], 0.3), (["cat"], 0.3), (["bird"], 0.2), (["fish"], 0.2)],
    "VI": [(["runs"], 0.4), (["sleeps"], 0.4), (["sings"], 0.2)],
    "VT": [(["sees"], 0.5), (["chases"], 0.3), (["likes"], 0.2)],
}
WORDS = sorted({w for rules in GRAMMAR.values() for rhs, _ in rules for w in rhs if w not in GRAMMAR})
VOCAB = ["<pad>", "<s>", *WORDS]
ID = {w: i for i, w in enumerate(VOCAB)}
WIDTH = 16  # tokens per row, padding included


def sentence(symbol: str, gen: torch.Generator) -> list[str]:
    if symbol not in GRAMMAR:
        return [symbol]
    rules = GRAMMAR[symbol]
    pick = int(torch.multinomial(torch.tensor([w for _, w in rules]), 1, generator=gen))
    return [w for s in rules[pick][0] for w in sentence(s, gen)]


def batch(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` sentences, ``<s>`` first, right-padded; labels -100 at the padding."""
    ids = torch.zeros(n, WIDTH, dtype=torch.long)
    mask = torch.zeros(n, WIDTH, dtype=torch.long)
    for i in range(n):
        tokens = [ID["<s>"], *(ID[w] for w in sentence("S", gen))][:WIDTH]
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


gen = torch.Generator().manual_seed(0)
print("a sentence of the grammar:", " ".join(sentence("S", gen)))

# %% a tiny LLaMA with grouped-query attention, trained briefly on the grammar (loss: ffx.nll per token)
config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=WIDTH,
                     pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")
torch.manual_seed(0)
model = LlamaForCausalLM(config)
problem = ffx.causal_lm(model)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
for _ in range(steps):
    opt.zero_grad()
    loss = ffx.nll(problem, dict(model.named_parameters()), batch(32, gen), normalize="tokens")
    loss.backward()
    opt.step()
model.eval()
held_out = batch(64, torch.Generator().manual_seed(1))
params = ffx.params_of(model)
print(f"after {steps} steps: held-out loss {float(ffx.nll(problem, params, held_out, 'tokens')):.3f} nats per token")

# %% token-normalised EMA of the group Fisher: per head (q, k, v, o projections) and per MLP channel
spec = {**ffx.heads(params, model=model),
        **ffx.channels({k: v for k, v in params.items() if ".mlp." in k}, model)}
ema = None
for _ in range(ema_batches):
    est = ffx.group_fisher(problem, params, batch(32, gen), spec, kind="mc", generator=gen, normalize="tokens")
    ema = ffx.ema_update(ema or ffx.ema_init(est, decay=0.8), est)
importance = ffx.ema_value(ema)
head_spec = {k: g for k, g in spec.items() if ".self_attn." in k}
per_head = ffx.head_totals({k: importance[k] for k in head_spec}, head_spec)  # {layer: [H]}
for layer, values in per_head.items():
    print(f"{layer}  head Fisher {[round(float(v), 4) for v in values]}")
figure = importance_heatmap({k.replace("model.layers.", "layer ").replace(".self_attn.", ""): v
                             for k, v in per_head.items()}, title="head Fisher (EMA, per token)", xlabel="head")
if quick:
    figure.savefig(io.BytesIO(), format="png")  # rendered, not written
else:
    figure.savefig("lm_heads.png", dpi=120)
    print("heatmap saved to lm_heads.png")

# %% ablate the top head of each layer: zero its output-projection columns
exact = functools.partial(ffx.ggn_vp, problem, params, held_out, normalize="tokens")
d = config.hidden_size // config.num_attention_heads
print(f"\n{'ablated':<34}  {'risk (group F)':>14}  {'risk (exact F)':>14}  {'measured KL':>11}  {'loss increase':>13}")
for layer, values in per_head.items():
    h = int(values.argmax())
    name = f"{layer}o_proj.weight"
    delta = {k: torch.zeros_like(p) for k, p in params.items()}
    delta[name][:, h * d : (h + 1) * d] = -params[name][:, h * d : (h + 1) * d]
    new = {k: params[k] + delta[k] for k in params}
    damage = perturbation_damage(problem, params, new, held_out, normalize="tokens")
    group_risk = risk_score({name: importance[name]}, delta, head_spec)
    print(f"{name + f' head {h}':<34}  {float(group_risk):>14.4f}  {float(risk_score(exact, delta)):>14.4f}  "
          f"{float(damage.kl):>11.4f}  {float(damage.loss_increase):>13.4f}")

# %% percolation over the heads: top vs random vs bottom groups at the same ε
head_importance = {k: importance[k] for k in head_spec}
epsilon = 2.0  # the norm of every perturbation, about that of one layer's attention projections together
print("norms of the attention parameters:", sorted(round(float(params[k].norm()), 2) for k in head_spec))
concentrations = [0.25] if quick else [0.1, 0.25, 0.5]
records = percolation_sweep(problem, params, held_out, head_importance, head_spec, concentrations, [epsilon],
                            repeats=1 if quick else 5, curvature=exact, generator=gen, progress=not quick,
                            normalize="tokens", score="mean")
print(f"\n{'C':>5}  {'groups':>6}  {'select':<6}  {'risk (exact)':>12}  {'KL':>8}  {'loss increase':>13}")
for r in records:
    print(f"{r.concentration:>5}  {r.chosen:>6}  {r.select:<6}  {r.risk:>12.5f}  {r.kl_mean:>8.5f}  "
          f"{r.loss_increase_mean:>13.5f}")
print(f"rank correlation of risk and KL: {risk_correlation(records):.3f}")
