"""Dense, brute-force references for Fisher estimators, for fisherfx's tests and for users' own.

Everything here is slow and meant to be obviously correct, on tiny models in float64:

* per-sample (and per-token) gradients come from a Python loop of :func:`torch.autograd.grad`
  over samples, on PyTorch's own losses (``cross_entropy``, ``mse_loss``,
  ``binary_cross_entropy_with_logits``), one model call per sample;
* a HuggingFace causal LM is run on each sequence alone, its padding stripped, with no attention
  mask;
* the empirical Fisher is the dense ``(1/Z) Σ g gᵀ`` of those gradients, and the exact Fisher the
  dense ``(1/Z) Σ_n J_nᵀ H_n J_n`` with ``J_n`` from :func:`torch.func.jacrev` on the flattened
  parameters and ``H_n`` from :func:`torch.func.hessian` of the loss w.r.t. the outputs.

No fisherfx engine or likelihood method is used, so a test that compares an estimator with these
references checks it against an independent computation. Nothing in the library imports this module.

Example:
    >>> import torch, fisherfx as ffx
    >>> from fisherfx import testing
    >>> model = torch.nn.Linear(3, 2).double()
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    >>> params = ffx.params_of(model)
    >>> nlls = testing.supervised_nlls(model, ffx.Categorical(), x, y)
    >>> dense = testing.empirical_fisher(testing.loop_grads(nlls, params), params, count=4)
    >>> est = ffx.diag_fisher(ffx.supervised(model, ffx.Categorical()), params, (x, y), dtype=torch.float64)
    >>> testing.assert_tree_close(est.value, testing.unflatten(dense.diagonal(), params))

"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev

from .likelihoods import Bernoulli, Categorical, Gaussian
from .testing_strategies import (
    BITWISE,
    SAME_MATH_F32,
    SAME_MATH_F64,
    VOCAB,
    AttentionNet,
    SeqModel,
    SeqSpec,
    TinyAttention,
    build,
    generator,
    lm_batches,
    masks,
    models,
    padded_lengths,
    randint,
    randn,
    seq_batch,
    seq_specs,
    spans,
    splits,
    tiny_gpt2,
    tiny_llama,
)  # the property tests' strategies, seeded tensors and tiny models (hypothesis imported on use)
from .vectors import flatten, unflatten  # the flat order of every dense matrix here

Params = dict[str, Tensor]


class SampleNLL(NamedTuple):
    """One sample's negative log-likelihood, split at the model outputs.

    .. math::
        \\ell_n(θ) = \\sum_t \\mathrm{nll}(\\mathrm{outputs}(θ))_t

    Attributes:
        outputs: ``θ ↦`` this sample's model outputs (any shape), ``θ`` a ``{name: tensor}`` dict.
        nll: outputs ``↦`` the per-position negative log-likelihood ``[T_n]`` (zero where inactive).
        active: ``[T_n]`` bool, the positions that carry a target.

    """

    outputs: Callable[[Params], Tensor]
    nll: Callable[[Tensor], Tensor]
    active: Tensor


# --- per-sample losses ----------------------------------------------------------------------------

def _row(tree: Any, n: int) -> Any:
    """Sample ``n`` of a tensor / tuple / list / dict of tensors, keeping a sample axis of 1."""
    if isinstance(tree, Tensor):
        return tree[n : n + 1]
    if isinstance(tree, Mapping):
        return {k: _row(v, n) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_row(v, n) for v in tree)
    return tree


def _call(model: nn.Module, params: Params, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, params, (), dict(inputs))
    return functional_call(model, params, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))


def _position_nll(likelihood: Any, target: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(outputs ``[1, ...]`` ↦ per-position NLL ``[T]``, active ``[T]``) for one sample's target."""
    if isinstance(likelihood, Categorical):
        y = target.reshape(-1)  # [T]

        def nll(out: Tensor) -> Tensor:
            return F.cross_entropy(out.reshape(y.shape[0], -1), y, reduction="none",
                                   ignore_index=likelihood.ignore_index)

        return nll, y != likelihood.ignore_index
    positions = target.shape[1] if target.ndim == 3 else 1  # [1], [1, C] -> T = 1; [1, T, C] -> T
    if isinstance(likelihood, Gaussian):
        def nll(out: Tensor) -> Tensor:
            sq = F.mse_loss(out, target.to(out.dtype), reduction="none")
            return sq.reshape(positions, -1).sum(-1) / (2 * likelihood.sigma**2)
    elif isinstance(likelihood, Bernoulli):
        def nll(out: Tensor) -> Tensor:
            bce = F.binary_cross_entropy_with_logits(out, target.to(out.dtype), reduction="none")
            return bce.reshape(positions, -1).sum(-1)
    else:
        raise TypeError(f"supervised_nlls: expected Categorical, Gaussian or Bernoulli, got {likelihood!r}")
    return nll, torch.ones(positions, dtype=torch.bool)


def supervised_nlls(model: nn.Module, likelihood: Any, inputs: Any, targets: Tensor) -> list[SampleNLL]:
    """Per-sample losses of a supervised batch, computed one sample at a time.

    .. math::
        \\ell_n(θ) = -\\sum_t \\log p(y_{n,t} \\mid f(x_n; θ)_t)

    with PyTorch's ``cross_entropy(ignore_index=…)`` (Categorical), ``mse_loss / (2σ²)``
    (Gaussian) or ``binary_cross_entropy_with_logits`` (Bernoulli), each summed per position over
    the output axis.

    Args:
        model: called as ``model(x)``, ``model(*x)`` (tuple) or ``model(**x)`` (dict) on one sample
            with a sample axis of 1.
        likelihood: a ``fisherfx`` ``Categorical``, ``Gaussian`` or ``Bernoulli`` (only its type and
            ``ignore_index`` / ``sigma`` are read).
        inputs: a tensor, tuple or dict of tensors with the sample axis first.
        targets: ``[N]``, ``[N, T]`` (class indices) or ``[N, C]``, ``[N, T, C]`` (values).

    Returns:
        One :class:`SampleNLL` per sample.

    """
    out = []
    for n in range(targets.shape[0]):
        nll, active = _position_nll(likelihood, targets[n : n + 1])
        x = _row(inputs, n)
        out.append(SampleNLL(lambda p, x=x: _call(model, p, x), nll, active))
    return out


def causal_lm_nlls(model: nn.Module, batch: Mapping[str, Tensor], ignore_index: int = -100) -> list[SampleNLL]:
    """Per-sequence losses of a HuggingFace causal LM, each sequence run alone without its padding.

    .. math::
        \\ell_n(θ) = \\sum_{t=0}^{L_n-2} \\mathrm{CE}(\\mathrm{logits}_t, \\mathrm{labels}_{t+1})

    over the ``L_n`` tokens of row ``n`` where ``attention_mask`` is one, the model called on
    ``input_ids[None]`` of that row alone (no attention mask, positions ``0 … L_n-1``), labels equal
    to ``ignore_index`` skipped.

    Args:
        model: a causal LM returning ``.logits`` ``[1, L, V]``.
        batch: ``input_ids`` ``[N, T]``, optional ``attention_mask`` and ``labels`` ``[N, T]``.
        ignore_index: the label that marks an inactive position.

    Returns:
        One :class:`SampleNLL` per row, with ``T_n = L_n - 1`` positions.

    """
    ids = batch["input_ids"]
    labels = batch.get("labels", ids)
    mask = batch.get("attention_mask", torch.ones_like(ids)).to(torch.bool)
    out = []
    for n in range(ids.shape[0]):
        row_ids, row_labels = ids[n][mask[n]], labels[n][mask[n]]
        target = row_labels[1:]

        def outputs(p: Params, row_ids: Tensor = row_ids) -> Tensor:
            return functional_call(model, p, (), {"input_ids": row_ids[None], "use_cache": False}).logits[0]

        def nll(logits: Tensor, target: Tensor = target) -> Tensor:
            return F.cross_entropy(logits[:-1], target, reduction="none", ignore_index=ignore_index)

        out.append(SampleNLL(outputs, nll, target != ignore_index))
    return out


def normalizer(nlls: Sequence[SampleNLL], normalize: str) -> int:
    """The normaliser ``Z``: ``N`` (``"samples"``), active positions (``"tokens"``) or 1 (``"none"``)."""
    return {"samples": len(nlls), "tokens": sum(int(s.active.sum()) for s in nlls), "none": 1}[normalize]


# --- gradients ------------------------------------------------------------------------------------

def _leaves(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _grad(loss: Tensor, leaves: Params) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(leaves.values()), retain_graph=True, allow_unused=True,
                                    materialize_grads=True))


def loop_grads(nlls: Sequence[SampleNLL], params: Mapping[str, Tensor], per: str = "sample") -> Params:
    """Per-sample (or per-token) gradients by a Python loop of :func:`torch.autograd.grad`.

    .. math::
        g_n = \\nabla_θ \\ell_n(θ), \\qquad g_{n,t} = \\nabla_θ \\ell_{n,t}(θ)

    Args:
        nlls: per-sample losses, e.g. from :func:`supervised_nlls` or :func:`causal_lm_nlls`.
        params: ``{name: [*P]}``, the parameters differentiated (others keep the model's values).
        per: ``"sample"`` (one gradient of ``ℓ_n`` per sample) or ``"token"`` (one gradient per active
            position).

    Returns:
        ``{name: [N, *P]}``, or ``{name: [N, T, *P]}`` with ``T = max_n T_n``, zero at inactive and
        absent positions.

    """
    if per not in ("sample", "token"):
        raise ValueError(f"loop_grads: per must be 'sample' or 'token', got {per!r}")
    leaves = _leaves(params)
    width = max(s.active.shape[0] for s in nlls)
    rows = []
    for s in nlls:
        losses = s.nll(s.outputs(leaves))  # [T_n]
        if per == "sample":
            rows.append(_grad(losses.sum(), leaves))
            continue
        zeros = [torch.zeros_like(p) for p in leaves.values()]
        per_t = [_grad(losses[t], leaves) if s.active[t] else zeros for t in range(losses.shape[0])]
        per_t += [zeros] * (width - losses.shape[0])
        rows.append([torch.stack(g) for g in zip(*per_t)])  # [T, *P] per leaf
    return {k: torch.stack([r[i] for r in rows]).detach() for i, k in enumerate(leaves)}


# --- dense Fisher matrices --------------------------------------------------------------------------

def empirical_fisher(grads: Mapping[str, Tensor], params: Mapping[str, Tensor], count: float) -> Tensor:
    """Dense empirical Fisher of per-sample (or per-token) gradients.

    .. math::
        F = \\frac{1}{Z} \\sum_j g_j g_j^\\top

    Args:
        grads: ``{name: [*L, *P]}`` from :func:`loop_grads` (any leading axes ``L``; every vector
            counts once, zero vectors add nothing).
        params: ``{name: [*P]}``, for the order and shapes (see :func:`flatten`).
        count: the normaliser ``Z``.

    Returns:
        ``[D, D]``.

    """
    g = flatten(grads, params)
    g = g.reshape(-1, g.shape[-1])
    return g.T @ g / count


def exact_fisher(nlls: Sequence[SampleNLL], params: Mapping[str, Tensor], count: float) -> Tensor:
    """Dense exact Fisher (the generalised Gauss–Newton) from Jacobians and output Hessians.

    .. math::
        F = \\frac{1}{Z} \\sum_n J_n^\\top H_n J_n, \\qquad
        J_n = \\frac{\\partial f_n}{\\partial θ}, \\quad
        H_n = \\frac{\\partial^2 \\ell_n}{\\partial f_n^2}

    with ``f_n`` the flattened outputs of sample ``n``. For softmax, Gaussian and Bernoulli
    likelihoods ``H_n`` does not depend on the labels, so this is the expectation over ``y`` of the
    per-sample (and equally of the per-token) outer products.

    Args:
        nlls: per-sample losses, e.g. from :func:`supervised_nlls` or :func:`causal_lm_nlls`.
        params: ``{name: [*P]}``, the parameters (others keep the model's values).
        count: the normaliser ``Z``.

    Returns:
        ``[D, D]``.

    """
    def block(s: SampleNLL, theta: Tensor) -> Tensor:
        def outputs(flat: Tensor) -> Tensor:
            return s.outputs(unflatten(flat, params)).reshape(-1)

        with torch.no_grad():
            shape = s.outputs(dict(params)).shape
        jac = jacrev(outputs)(theta)  # [O, D]
        hess = hessian(lambda o: s.nll(o.reshape(shape)).sum())(outputs(theta).detach())  # [O, O]
        return jac.T @ hess @ jac

    return _sample_sum(nlls, params, count, block)


def _sample_sum(nlls: Sequence[SampleNLL], params: Mapping[str, Tensor], count: float,
                block: Callable[[SampleNLL, Tensor], Tensor]) -> Tensor:
    """``(1/Z) Σ_n block(s_n, θ)`` over samples, ``θ`` the flattened parameters, each block ``[D, D]``."""
    theta = flatten({k: v.detach() for k, v in params.items()})
    total = theta.new_zeros(theta.shape[0], theta.shape[0])
    for s in nlls:
        total += block(s, theta)
    return total / count


def hessian_matrix(nlls: Sequence[SampleNLL], params: Mapping[str, Tensor], count: float) -> Tensor:
    """Dense Hessian of the normalised loss, one sample at a time.

    .. math::
        H = \\frac{1}{Z} \\sum_n \\nabla^2_θ \\ell_n(θ)

    by reverse-over-reverse differentiation (``jacrev`` of ``grad``) of each sample's summed loss on
    the flattened parameters. (Not :func:`torch.func.hessian`: its forward-over-reverse ``jacfwd`` of
    ``jacrev`` gives wrong entries through ``nn.Embedding`` in torch 2.13, off by up to 0.24 against
    finite differences on the Embedding + LayerNorm test case.)

    Args:
        nlls: per-sample losses, e.g. from :func:`supervised_nlls` or :func:`causal_lm_nlls`.
        params: ``{name: [*P]}``, the parameters (others keep the model's values).
        count: the normaliser ``Z``.

    Returns:
        ``[D, D]``.

    """
    def block(s: SampleNLL, theta: Tensor) -> Tensor:
        return jacrev(grad(lambda flat: s.nll(s.outputs(unflatten(flat, params))).sum()))(theta)

    return _sample_sum(nlls, params, count, block)


# --- assertions ---------------------------------------------------------------------------------------

def assert_tree_close(actual: Mapping[str, Tensor], expected: Mapping[str, Tensor], **tol: Any) -> None:
    """:func:`torch.testing.assert_close` per key, reporting every failing key at once.

    Args:
        actual: ``{name: tensor}``.
        expected: ``{name: tensor}`` with the same keys.
        **tol: passed to :func:`torch.testing.assert_close` (``rtol``, ``atol``, ``check_dtype``, …).

    Raises:
        AssertionError: different keys, or any entry not close; the message names each failing key.

    """
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(f"assert_tree_close: keys differ: missing {missing}, unexpected {extra}")
    failures = []
    for name in expected:
        try:
            torch.testing.assert_close(actual[name], expected[name], **tol)
        except AssertionError as err:
            failures.append(f"[{name!r}] {err}")
    if failures:
        raise AssertionError(f"assert_tree_close: {len(failures)} of {len(expected)} entries differ\n"
                             + "\n".join(failures))


def __getattr__(name: str) -> Any:
    if name == "seeds":  # a Hypothesis strategy, created on first access (hypothesis stays optional)
        from . import testing_strategies

        return testing_strategies.seeds
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SampleNLL", "assert_tree_close", "causal_lm_nlls", "empirical_fisher", "exact_fisher", "flatten",
           "hessian_matrix", "loop_grads", "normalizer", "supervised_nlls", "unflatten",
           # Hypothesis strategies and what they build on (fisherfx.testing_strategies)
           "BITWISE", "SAME_MATH_F32", "SAME_MATH_F64", "VOCAB", "AttentionNet", "SeqModel", "SeqSpec",
           "TinyAttention", "build", "generator", "lm_batches", "masks", "models", "padded_lengths", "randint",
           "randn", "seq_batch", "seq_specs", "spans", "splits", "tiny_gpt2", "tiny_llama"]
