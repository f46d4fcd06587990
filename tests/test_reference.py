"""Every estimator equals its brute-force dense reference (:mod:`fisherfx.testing`) in float64.

The references never touch fisherfx's engines: per-sample gradients come from a loop of
``torch.autograd.grad`` on PyTorch's own losses, language models are run on each sequence alone
without padding, the exact Fisher is ``Jᵀ H J`` from ``jacrev`` and ``hessian``, and group index
sets are written out by hand below.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import fisherfx as ffx
from fisherfx import testing
from fisherfx.testing import assert_tree_close
from tests.cases import BY_NAME, CASES, LM_CASES, Built, Case, build, case_id

DENSE_KINDS = ("empirical", "exact")
PERS = ("sample", "token")
NORMALIZES = ("samples", "tokens", "none")
KIND_PER = [("empirical", "sample"), ("empirical", "token"), ("exact", "sample")]
ENGINES = ("generic", "auto")  # "auto": the tap engine where it serves, the generic engine for the rest
F64 = {"dtype": torch.float64}  # accumulate in float64 to compare with float64 references

MC_BATCHES, MC_DRAWS = 20, 200
"""MC estimates (calls), each the mean of ``MC_DRAWS`` draws; the spread of these batch means gives
the standard error of their overall mean (batch means: far fewer calls than one call per draw)."""
MC_Z = 5.0
"""Allowed deviation of an MC mean from the exact Fisher, in standard errors per entry (a 5σ
excursion in any of ~100 entries has probability below 1e-4 under normality; the seed is fixed)."""
MC_ATOL = 1e-12
"""For entries whose draws are all equal (standard error zero), e.g. embedding rows never used."""
MC_MAX_REL_BOUND = 0.15
"""Guard against a vacuous MC test: the tolerance, relative to the exact values, must be this tight."""


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def dense(name: str, kind: str, per: str) -> Tensor:
    """The dense reference Fisher ``[D, D]``, unnormalised (``Z = 1``)."""
    b = build(BY_NAME[name])
    if kind == "exact":  # per-sample and per-token exact Fisher coincide by definition
        return testing.exact_fisher(b.nlls, b.params, count=1)
    return testing.empirical_fisher(testing.loop_grads(b.nlls, b.params, per), b.params, count=1)


def assert_nonvacuous(expected: dict[str, Tensor]) -> None:
    zero = [k for k, v in expected.items() if not bool(v.abs().sum() > 0)]
    assert not zero, f"reference values are all zero for {zero}: the comparison would be vacuous"


# --- per-sample gradients and diagonal ------------------------------------------------------------

@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_per_sample_grads(case: Case, per: str):
    b = build(case)
    expected = testing.loop_grads(b.nlls, b.params, per)
    assert_nonvacuous(expected)
    got = ffx.per_sample_grads(b.problem, b.params, b.batch, per=per)
    assert_tree_close(got, expected, **case.tol)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("per", PERS)
@pytest.mark.parametrize("kind", DENSE_KINDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_diag_fisher(case: Case, kind: str, per: str, normalize: str, engine: str):
    b = build(case)
    z = testing.normalizer(b.nlls, normalize)
    expected = testing.unflatten(dense(case.name, kind, per).diagonal() / z, b.params)
    assert_nonvacuous(expected)
    est = ffx.diag_fisher(b.problem, b.params, b.batch, kind=kind, per=per, normalize=normalize, engine=engine,
                          **F64)
    assert int(est.count) == z
    assert_tree_close(est.value, expected, **case.tol)


# --- groups, written out by hand --------------------------------------------------------------------

def _is_conv1d(b: Built, name: str) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(b.model.get_submodule(name.rsplit(".", 1)[0]), Conv1D)


def channel_sets(b: Built) -> dict[str, Tensor]:
    """``{name: [o, k]}``: the flat entry indices of each output channel of each parameter."""
    sets = {}
    for name, p in b.params.items():
        idx = torch.arange(p.numel()).reshape(p.shape)
        if p.ndim == 2 and _is_conv1d(b, name):  # HF Conv1D stores [in, out]: a channel is a column
            sets[name] = torch.stack([idx[:, c] for c in range(p.shape[1])])
        else:  # Linear/Conv/Embedding [o, ...], bias and norm [o]: a channel is a leading slice
            sets[name] = torch.stack([idx[c].reshape(-1) for c in range(p.shape[0])])
    return sets


def head_sets(case: Case, b: Built, split_qkv: bool) -> dict[str, Tensor]:
    """``{name: [h, k]}`` (``[3, h, k]`` for fused q/k/v with ``split_qkv``): flat indices per head."""
    n_heads, n_kv, d = case.heads.num_heads, case.heads.num_kv_heads, case.heads.head_dim
    sets = {}
    for name, p in b.params.items():
        idx = torch.arange(p.numel()).reshape(p.shape)
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            # GPT-2 Conv1D [in, 3 * out] (bias [3 * out]): q, k, v blocks of `out` columns each;
            # head h of block s is columns s * out + h * d ... s * out + (h + 1) * d
            out = n_heads * d
            blocks = [[idx[..., s * out + h * d : s * out + (h + 1) * d].reshape(-1) for h in range(n_heads)]
                      for s in range(3)]
            sets[name] = (torch.stack([torch.stack(row) for row in blocks]) if split_qkv else
                          torch.stack([torch.cat([blocks[s][h] for s in range(3)]) for h in range(n_heads)]))
        elif name.endswith("attn.c_proj.weight"):  # GPT-2 Conv1D [(h d), out]: head h is rows h*d ...
            sets[name] = torch.stack([idx[h * d : (h + 1) * d].reshape(-1) for h in range(n_heads)])
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):  # Linear [(h d), in]
            count = n_heads if name.endswith("q_proj.weight") else n_kv  # grouped-query k and v
            sets[name] = torch.stack([idx[h * d : (h + 1) * d].reshape(-1) for h in range(count)])
        elif name.endswith("o_proj.weight"):  # Linear [out, (h d)]: head h is columns h*d ...
            sets[name] = torch.stack([idx[:, h * d : (h + 1) * d].reshape(-1) for h in range(n_heads)])
    return sets


def group_sums(diag: dict[str, Tensor], sets: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: diag[name].reshape(-1)[s].sum(-1) for name, s in sets.items()}


def quadratic_forms(fisher: Tensor, params: dict[str, Tensor], sets: dict[str, Tensor]) -> dict[str, Tensor]:
    """``θ_gᵀ F_gg θ_g`` per group, from the dense ``F`` and per-parameter index sets."""
    theta = testing.flatten(params)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name], start = start, start + p.numel()
    out = {}
    for name, s in sets.items():
        g = s + offsets[name]  # [G..., k] global indices
        block = fisher[g[..., :, None], g[..., None, :]]  # [G..., k, k]
        out[name] = torch.einsum("...i,...ij,...j->...", theta[g], block, theta[g])
    return out


GROUP_CASES = [pytest.param(c, s, id=f"{c.name}-{'split' if s else 'summed'}")
               for c in LM_CASES for s in ((False, True) if c.heads.fused_qkv else (False,))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("kind", "per"), KIND_PER)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_group_fisher_channels(case: Case, kind: str, per: str, engine: str):
    b = build(case)
    z = testing.normalizer(b.nlls, "samples")
    expected = group_sums(testing.unflatten(dense(case.name, kind, per).diagonal() / z, b.params), channel_sets(b))
    assert_nonvacuous(expected)
    groups = ffx.channels(b.params, b.model)
    est = ffx.group_fisher(b.problem, b.params, b.batch, groups, kind=kind, per=per, engine=engine, **F64)
    assert_tree_close(est.value, expected, **case.tol)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", DENSE_KINDS)
@pytest.mark.parametrize(("case", "split_qkv"), GROUP_CASES)
def test_group_fisher_heads(case: Case, split_qkv: bool, kind: str, engine: str):
    b = build(case)
    z = testing.normalizer(b.nlls, "tokens")
    diag = testing.unflatten(dense(case.name, kind, "token").diagonal() / z, b.params)
    expected = group_sums(diag, head_sets(case, b, split_qkv))
    assert_nonvacuous(expected)
    groups = ffx.heads(b.params, case.heads.num_heads, num_kv_heads=case.heads.num_kv_heads, model=b.model,
                       split_qkv=split_qkv)
    est = ffx.group_fisher(b.problem, b.params, b.batch, groups, kind=kind, per="token", normalize="tokens",
                           engine=engine, **F64)
    assert_tree_close(est.value, expected, **case.tol)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("kind", "per"), KIND_PER)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mask_importance_channels(case: Case, kind: str, per: str, engine: str):
    b = build(case)
    z = testing.normalizer(b.nlls, "samples")
    expected = quadratic_forms(dense(case.name, kind, per) / z, b.params, channel_sets(b))
    assert_nonvacuous(expected)
    est = ffx.mask_importance(b.problem, b.params, b.batch, ffx.channels(b.params, b.model), kind=kind, per=per,
                              engine=engine, **F64)
    assert_tree_close(est.value, expected, **case.tol)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("case", "split_qkv"), GROUP_CASES)
def test_mask_importance_heads(case: Case, split_qkv: bool, engine: str):
    b = build(case)
    z = testing.normalizer(b.nlls, "samples")
    expected = quadratic_forms(dense(case.name, "empirical", "sample") / z, b.params, head_sets(case, b, split_qkv))
    assert_nonvacuous(expected)
    groups = ffx.heads(b.params, case.heads.num_heads, num_kv_heads=case.heads.num_kv_heads, model=b.model,
                       split_qkv=split_qkv)
    est = ffx.mask_importance(b.problem, b.params, b.batch, groups, engine=engine, **F64)
    assert_tree_close(est.value, expected, **case.tol)


# --- padded language models ----------------------------------------------------------------------------

FAMILIES = sorted({c.family for c in LM_CASES})


def _padded(family: str, padding: str) -> tuple[Case, Built]:
    case = BY_NAME[f"{family}-{padding}-pad"]
    return case, build(case)


class Estimator(NamedTuple):
    name: str
    run: Callable[..., dict[str, Tensor]]  # (problem, params, batch[, generator]) -> {name: tensor}


ESTIMATORS = [
    Estimator("grads-sample", lambda pr, p, b: ffx.per_sample_grads(pr, p, b)),
    Estimator("grads-token", lambda pr, p, b: ffx.per_sample_grads(pr, p, b, per="token")),
    Estimator("diag-empirical", lambda pr, p, b: ffx.diag_fisher(pr, p, b, normalize="tokens", **F64).value),
    Estimator("diag-exact", lambda pr, p, b: ffx.diag_fisher(pr, p, b, kind="exact", **F64).value),
    Estimator("diag-mc", lambda pr, p, b: ffx.diag_fisher(pr, p, b, kind="mc", n_samples=3, per="token",
                                                          generator=torch.Generator().manual_seed(5), **F64).value),
]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_agree(family: str, estimator: Estimator):
    case, right = _padded(family, "right")
    _, left = _padded(family, "left")
    assert not torch.equal(left.batch["input_ids"], right.batch["input_ids"])
    assert_tree_close(estimator.run(left.problem, left.params, left.batch),
                      estimator.run(right.problem, right.params, right.batch), **case.tol)


def _rows_alone(batch: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    """Each row without its padding, as a batch of one with no attention mask."""
    mask = batch["attention_mask"].bool()
    return [{"input_ids": batch["input_ids"][n][mask[n]][None], "labels": batch["labels"][n][mask[n]][None]}
            for n in range(mask.shape[0])]


@pytest.mark.parametrize("kind", DENSE_KINDS)
@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_padded_diag_is_sum_over_rows_alone(case: Case, kind: str):
    b = build(case)
    rows = [ffx.diag_fisher(b.problem, b.params, row, kind=kind, normalize="none", **F64).value
            for row in _rows_alone(b.batch)]
    expected = {k: sum(r[k] for r in rows) for k in b.params}
    est = ffx.diag_fisher(b.problem, b.params, b.batch, kind=kind, normalize="none", **F64)
    assert_tree_close(est.value, expected, **case.tol)


@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_padded_token_grads_are_rows_alone(case: Case):
    b = build(case)
    got = ffx.per_sample_grads(b.problem, b.params, b.batch, per="token")  # [N, T, *P]
    for n, row in enumerate(_rows_alone(b.batch)):
        alone = ffx.per_sample_grads(b.problem, b.params, row, per="token")  # [1, L_n - 1, *P]
        width = alone[next(iter(alone))].shape[1]
        assert_tree_close({k: v[n, :width] for k, v in got.items()}, {k: v[0] for k, v in alone.items()}, **case.tol)
        assert_tree_close({k: v[n, width:] for k, v in got.items()},
                          {k: torch.zeros_like(v[n, width:]) for k, v in got.items()}, rtol=0, atol=0)


# --- Monte-Carlo Fisher ----------------------------------------------------------------------------------

MC_CASES = [BY_NAME[n] for n in ("mlp-categorical", "mlp-gaussian", "mlp-bernoulli", "embed-layernorm-tokens")]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", MC_CASES, ids=case_id)
def test_mc_approaches_exact(case: Case, engine: str):
    b = build(case)
    exact = testing.unflatten(dense(case.name, "exact", "sample").diagonal() / len(b.nlls), b.params)
    g = torch.Generator().manual_seed(1234)
    means = [ffx.diag_fisher(b.problem, b.params, b.batch, kind="mc", n_samples=MC_DRAWS, generator=g, engine=engine,
                             **F64).value for _ in range(MC_BATCHES)]
    stacked = {k: torch.stack([m[k] for m in means]) for k in b.params}  # [B, *P]
    bound = {k: MC_Z * v.std(0) / MC_BATCHES**0.5 + MC_ATOL for k, v in stacked.items()}  # of the mean over B
    rel = sum(v.sum() for v in bound.values()) / sum(v.abs().sum() for v in exact.values())
    assert rel < MC_MAX_REL_BOUND, f"MC tolerance {rel:.2f} of the exact values: the test would be vacuous"
    far = {k: float(((v.mean(0) - exact[k]).abs() / bound[k]).max()) for k, v in stacked.items()}
    assert all(v <= 1 for v in far.values()), f"MC mean beyond {MC_Z} standard errors of exact: {far}"


MC_SEEDED = [
    *(Estimator(f"diag-{e}", lambda pr, p, b, g, e=e: ffx.diag_fisher(pr, p, b, kind="mc", n_samples=2, generator=g,
                                                                      engine=e, **F64).value) for e in ENGINES),
    Estimator("grads", lambda pr, p, b, g: ffx.per_sample_grads(pr, p, b, kind="mc", generator=g)),
]


@pytest.mark.parametrize("estimator", MC_SEEDED, ids=lambda e: e.name)
@pytest.mark.parametrize("case", [*MC_CASES, BY_NAME["gpt2-right-pad"]], ids=case_id)
def test_mc_same_generator_state_same_result(case: Case, estimator: Estimator):
    b = build(case)

    def run(seed: int) -> dict[str, Tensor]:
        return estimator.run(b.problem, b.params, b.batch, torch.Generator().manual_seed(seed))

    first = run(7)
    assert_tree_close(run(7), first, rtol=0, atol=0)
    other = run(8)
    assert any(not torch.equal(other[k], first[k]) for k in first), "a different seed gave the same result"
