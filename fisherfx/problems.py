"""Problems: how a model and a batch become canonical outputs, targets and an active mask.

A :class:`Problem` is a small value: the model, its likelihood and two pure functions,

* ``prepare(batch) -> Prepared(inputs, targets, active)`` splits a user batch into model inputs
  (a pytree whose leaves have the sample axis first), canonical targets and the active mask
  ``[N, T]``;
* ``forward(model, params_and_buffers, inputs) -> outputs`` evaluates the model with
  :func:`torch.func.functional_call` and returns canonical outputs ``[N, T, C]``.

Both engines use them: the generic engine calls ``forward`` on one sample at a time inside
``vmap``, the tap engine on the whole batch.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import FisherError
from ._tree import tensors
from .likelihoods import Categorical, Likelihood, check_likelihood

Params = dict[str, Tensor]


class Prepared(NamedTuple):
    """A batch split for the engines."""

    inputs: Any  # pytree of tensors, leaves [N, ...]
    targets: Tensor  # [N, T] (class indices) or [N, T, C]
    active: Tensor  # [N, T] bool


class Problem(NamedTuple):
    """A model, its likelihood and how batches are read. Build one with :func:`supervised` or
    :func:`causal_lm`.
    """

    model: nn.Module
    likelihood: Likelihood
    prepare: Callable[[Any], Prepared]
    forward: Callable[[nn.Module, Mapping[str, Tensor], Any], Tensor]


def params_of(model: nn.Module) -> Params:
    """Trainable parameters ``{name: tensor}`` keyed as in ``model.named_parameters()``.

    Tied parameters appear once, under their first name. The tensors are detached views of the
    module's own, so estimators never write into ``.grad``.
    """
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def model_call(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, **kwargs) -> Any:
    """``model(inputs)`` evaluated at ``params`` with :func:`torch.func.functional_call`.

    ``inputs`` is a tensor (one positional argument), a tuple (positional arguments) or a dict
    (keyword arguments). Parameters and buffers absent from ``params`` fall back to the module's own.
    """
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), (), {**inputs, **kwargs})
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return functional_call(model, dict(params), args, kwargs or None)


def _batch_size(inputs: Any) -> int:
    leaves = tensors(inputs)
    if not leaves:
        raise FisherError("supervised: the batch inputs hold no tensor")
    return leaves[0].shape[0]


def supervised(model: nn.Module, likelihood: Likelihood) -> Problem:
    """A supervised problem: batches are ``(inputs, targets)`` or ``(inputs, targets, mask)``.

    Args:
        model: maps ``inputs`` to outputs ``[N, C]`` or ``[N, T, C]`` (see
            :mod:`fisherfx.likelihoods` for the shapes each likelihood takes).
        likelihood: ``Categorical()``, ``Gaussian(sigma)`` or ``Bernoulli()``.

    The optional ``mask`` (``[N]`` or ``[N, T]``, bool) marks active positions on top of the
    likelihood's own rule (``ignore_index`` for ``Categorical``).

    Returns:
        A :class:`Problem`.

    """
    check_likelihood(likelihood, "supervised")

    def prepare(batch: Any) -> Prepared:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise FisherError(
                "supervised: expected a batch (inputs, targets) or (inputs, targets, mask), "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs, targets = batch[0], batch[1]
        n = _batch_size(inputs)
        if targets.shape[0] != n:
            raise FisherError(f"supervised: inputs have {n} samples but targets have {targets.shape[0]}")
        targets, active = likelihood.canonical_targets(targets)
        if len(batch) == 3:
            mask = batch[2].to(torch.bool)
            if mask.ndim == 1 and mask.shape[0] == n:  # one flag per sample covers all its positions
                mask = mask[:, None].expand(active.shape)
            if mask.shape != active.shape:
                raise FisherError(
                    f"supervised: mask of shape {tuple(batch[2].shape)} does not fit targets; "
                    f"expected {tuple(active.shape)} or [{n}]"
                )
            active = active & mask
        return Prepared(inputs, targets, active)

    def forward(model: nn.Module, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        return likelihood.canonical_outputs(model_call(model, params, inputs))

    return Problem(model, likelihood, prepare, forward)


def left_align(mask: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """Move each row's active span to the start: left padding becomes right padding.

    Args:
        mask: ``[N, T]`` attention mask whose ones form one contiguous span per row.
        rows: more ``[N, T]`` tensors moved the same way.

    Returns:
        ``(mask, *rows)`` moved, cut to the longest span.

    """
    mask = mask.to(torch.bool)
    n, t = mask.shape
    pos = torch.arange(t, device=mask.device)
    length = mask.sum(1)
    first = torch.where(mask, pos, t).min(1).values
    last = torch.where(mask, pos, -1).max(1).values
    holes = (length > 0) & (last - first + 1 != length)
    if holes.any():
        bad = holes.nonzero()[0, 0].item()
        raise FisherError(
            f"causal_lm: attention_mask row {bad} is not one contiguous span of ones (left or right "
            "padding); packed or holed masks are not supported"
        )
    index = (pos[None, :] + torch.where(length > 0, first, 0)[:, None]) % t
    width = max(int(length.max()), 1)
    moved = [torch.gather(x, 1, index)[:, :width] for x in (mask, *rows)]
    return tuple(moved)


def causal_lm(model: nn.Module, ignore_index: int = -100) -> Problem:
    """A HuggingFace causal language model; batches are dicts.

    The batch holds ``input_ids`` ``[N, T]``, optionally ``attention_mask`` ``[N, T]`` and
    ``labels`` ``[N, T]`` (default: ``input_ids``). Position ``t`` predicts ``labels[:, t + 1]``
    (the causal shift); labels equal to ``ignore_index`` and padded positions are inactive.

    Padding is handled without giving the model an attention mask, which would make its mask
    construction data-dependent under ``vmap``: each row is moved so that its tokens start at
    position 0 (left padding becomes right padding, see :func:`left_align`). A causal model's
    outputs at real tokens then never see a pad token and get positions ``0, 1, …`` exactly as the
    unpadded sequence would, so left- and right-padded batches give the same result as each
    sequence alone.

    Returns:
        A :class:`Problem` with the ``Categorical(ignore_index)`` likelihood.

    """
    likelihood = Categorical(ignore_index)
    known = {"input_ids", "attention_mask", "labels"}

    def prepare(batch: Mapping[str, Tensor]) -> Prepared:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise FisherError("causal_lm: expected a dict batch with 'input_ids' (and optionally "
                              "'attention_mask', 'labels')")
        extra = set(batch) - known
        if extra:
            raise FisherError(f"causal_lm: unexpected batch keys {sorted(extra)}; expected some of "
                              f"{sorted(known)}")
        ids = batch["input_ids"]
        if ids.ndim != 2:
            raise FisherError(f"causal_lm: expected input_ids of shape [N, T], got {tuple(ids.shape)}")
        labels = batch.get("labels", ids)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        for key, x in (("labels", labels), ("attention_mask", mask)):
            if x.shape != ids.shape:
                raise FisherError(f"causal_lm: {key} of shape {tuple(x.shape)} does not match "
                                  f"input_ids {tuple(ids.shape)}")
        labels = torch.where(mask.to(torch.bool), labels, torch.full_like(labels, ignore_index))
        mask, ids, labels = left_align(mask, ids, labels)
        targets, active = likelihood.canonical_targets(labels[:, 1:])
        return Prepared(ids, targets, active)

    def forward(model: nn.Module, params: Mapping[str, Tensor], ids: Tensor) -> Tensor:
        out = model_call(model, params, {"input_ids": ids}, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, :-1]

    return Problem(model, likelihood, prepare, forward)


__all__ = ["Prepared", "Problem", "causal_lm", "left_align", "model_call", "params_of", "supervised"]
