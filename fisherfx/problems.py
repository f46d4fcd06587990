"""Problems: how a model and a batch become canonical outputs, targets and an active mask.

A :class:`Problem` is a small value: the model, its likelihood and two pure functions,

* ``prepare(batch) -> Prepared(inputs, targets, active)`` splits a user batch into model inputs
  (a pytree whose tensor leaves all have the sample axis first), canonical targets and the active
  mask ``[N, T]``;
* ``forward(model, params_and_buffers, inputs) -> outputs`` evaluates the model with
  :func:`torch.func.functional_call` and returns canonical outputs ``[N, T, C]``.

Both engines use them: the generic engine calls ``forward`` on one sample at a time inside
``vmap``, the tap engine on the whole batch. When a forward raises, :func:`forward_failure` says
which module failed and what it expected.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import FisherError
from ._failures import describe, forward_failure
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


def original_module(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile``\\ d one (its ``_orig_mod``); any other module as is.

    fisherfx evaluates models with :func:`torch.func.functional_call`, eagerly, so a compiled
    wrapper is replaced by the module it wraps, whose parameter names carry no ``_orig_mod.`` prefix.
    """
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def params_of(model: nn.Module) -> Params:
    """Trainable parameters ``{name: tensor}`` keyed as in ``model.named_parameters()``.

    Tied parameters appear once, under their first name. The tensors are detached views of the
    module's own, so estimators never write into ``.grad``. A ``torch.compile``\\ d module gives the
    names of the module it wraps (no ``_orig_mod.`` prefix), as :func:`supervised` and
    :func:`causal_lm` evaluate that module.
    """
    model = original_module(model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def model_call(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, **kwargs) -> Any:
    """``model(inputs)`` evaluated at ``params`` with :func:`torch.func.functional_call`.

    ``inputs`` is a tensor (one positional argument), a tuple (positional arguments) or a dict
    (keyword arguments). Parameters and buffers absent from ``params`` fall back to the module's own
    (with ``params`` empty, the model is simply called).
    """
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(params), (), {**inputs, **kwargs}) if params else model(**inputs, **kwargs)
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return functional_call(model, dict(params), args, kwargs or None) if params else model(*args, **kwargs)


def _tensor(where: str, key: str, x: Any, shape: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise FisherError(f"{where}: {key} must be a tensor {shape}, got {describe(x)}; convert it with "
                          "torch.tensor(...)")
    return x


def _check_inputs(where: str, inputs: Any) -> int:
    """``N``: every leaf of ``inputs`` is a tensor with ``N`` samples on its first axis."""
    if isinstance(inputs, Tensor) and inputs.ndim > 0:  # the common case, in one step
        return inputs.shape[0]
    leaves: list[tuple[str, Any]] = []

    def walk(tree: Any, path: str) -> None:
        if isinstance(tree, Mapping):
            for key, value in tree.items():
                walk(value, f"{path}[{key!r}]")
        elif isinstance(tree, (tuple, list)) and tensors(tree):  # positional inputs (not a list of numbers)
            for i, value in enumerate(tree):
                walk(value, f"{path}[{i}]")
        else:  # a tensor, or a leaf the engines cannot slice (a list of numbers, None, a number)
            leaves.append((path, tree))

    walk(inputs, "inputs")
    batch = f"; the batch's inputs: {describe(inputs)}"
    for path, leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise FisherError(f"{where}: {path} must be a tensor with the samples first, got {describe(leaf)}; "
                              "convert it with torch.tensor(...)" + batch)
        if leaf.ndim == 0:
            raise FisherError(f"{where}: {path} is a scalar tensor; every input needs the samples on its first "
                              "axis" + batch)
    if not leaves:
        raise FisherError(f"{where}: the batch inputs hold no tensor")
    first, n = leaves[0][0], leaves[0][1].shape[0]
    for path, leaf in leaves[1:]:
        if leaf.shape[0] != n:
            raise FisherError(f"{where}: {path} has {leaf.shape[0]} samples on its first axis but {first} has {n}; "
                              "every input needs the samples on its first axis" + batch)
    return n


def supervised(model: nn.Module, likelihood: Likelihood) -> Problem:
    """A supervised problem: batches are ``(inputs, targets)`` or ``(inputs, targets, mask)``.

    Args:
        model: maps ``inputs`` to outputs ``[N, C]`` or ``[N, T, C]`` (see
            :mod:`fisherfx.likelihoods` for the shapes each likelihood takes). A
            ``torch.compile``\\ d module is replaced by the module it wraps (see :func:`original_module`).
        likelihood: ``Categorical()``, ``Gaussian(sigma)`` or ``Bernoulli()``.

    ``inputs`` is a tensor, a tuple of tensors (positional arguments) or a dict of tensors (keyword
    arguments), each with the samples on its first axis. The optional ``mask`` (``[N]`` or
    ``[N, T]``, bool) marks active positions on top of the likelihood's own rule (``ignore_index``
    for ``Categorical``).

    Returns:
        A :class:`Problem`.

    """
    check_likelihood(likelihood, "supervised")
    model = original_module(model)

    def prepare(batch: Any) -> Prepared:
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise FisherError(
                "supervised: expected a batch (inputs, targets) or (inputs, targets, mask), "
                f"got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        inputs = batch[0]
        n = _check_inputs("supervised", inputs)
        targets = _tensor("supervised", "targets", batch[1], "[N, ...]")
        if targets.ndim == 0 or targets.shape[0] != n:
            got = "a scalar" if targets.ndim == 0 else targets.shape[0]
            raise FisherError(f"supervised: inputs have {n} samples but targets have {got}")
        targets, active = likelihood.canonical_targets(targets)
        if len(batch) == 3:
            mask = _tensor("supervised", "mask", batch[2], "[N] or [N, T]").to(torch.bool)
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
        rows: more ``[N, T, ...]`` tensors moved the same way along their second axis.

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
    index = (pos[None, :] + torch.where(length > 0, first, 0)[:, None]) % t  # [N, T]
    width = max(int(length.max()), 1)
    moved = []
    for x in (mask, *rows):
        at = index.reshape(n, t, *[1] * (x.ndim - 2)).expand(n, t, *x.shape[2:])
        moved.append(torch.gather(x, 1, at)[:, :width])
    return tuple(moved)


# Keys causal_lm reads itself, and forward arguments that are not batch data.
_READ = ("input_ids", "attention_mask", "labels")
_NOT_DATA = {
    "inputs_embeds": "causal_lm feeds input_ids",
    "past_key_values": "causal_lm runs every sequence from its start, without a cache",
    "cache": "causal_lm runs every sequence from its start, without a cache",
    "cache_position": "causal_lm runs every sequence from its start, without a cache",
    "use_cache": "causal_lm runs every sequence from its start, without a cache",
    "logits_to_keep": "causal_lm needs the logits at every position",
}


def _forward_keys(model: nn.Module) -> tuple[set[str], bool]:
    """The keyword arguments ``model.forward`` names, and whether it also takes ``**kwargs``."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a signature: accept nothing beyond input_ids
        return set(), False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in signature.parameters.values() if p.kind in kinds}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def _vocabulary(model: nn.Module) -> tuple[str, nn.Module, int] | None:
    """``(name, module, num_embeddings)`` of the model's input embedding, when it says which it is."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    size = getattr(embedding, "num_embeddings", None)
    if not isinstance(embedding, nn.Module) or not isinstance(size, int):
        return None
    name = next((k for k, m in model.named_modules() if m is embedding), type(embedding).__name__)
    return name, embedding, size


def causal_lm(model: nn.Module, ignore_index: int = -100) -> Problem:
    """A HuggingFace causal language model; batches are dicts.

    The batch holds ``input_ids`` ``[N, T]``, optionally ``attention_mask`` ``[N, T]`` and
    ``labels`` ``[N, T]`` (default: ``input_ids``), and any other tensor the model's ``forward``
    takes by name (``position_ids``, ``token_type_ids``, …), with the samples first. Position ``t``
    predicts ``labels[:, t + 1]`` (the causal shift); labels equal to ``ignore_index`` and padded
    positions are inactive. The model is run on all tokens but the last, which predicts nothing and,
    the model being causal, changes no earlier output.

    Padding is handled without giving the model an attention mask, which would make its mask
    construction data-dependent under ``vmap``: each row is moved so that its tokens start at
    position 0 (left padding becomes right padding, see :func:`left_align`). A causal model's
    outputs at real tokens then never see a pad token and get positions ``0, 1, …`` exactly as the
    unpadded sequence would, so left- and right-padded batches give the same result as each
    sequence alone. Extra tensors whose first two axes are ``[N, T]`` (per token, as
    ``position_ids`` and ``token_type_ids``) move with the tokens; the others (and ``encoder_*``
    tensors, which index the encoder's sequence) are passed as they are.

    Args:
        model: the causal LM; a ``torch.compile``\\ d one is replaced by the module it wraps.
        ignore_index: the label of inactive positions.

    Returns:
        A :class:`Problem` with the ``Categorical(ignore_index)`` likelihood.

    """
    model = original_module(model)
    likelihood = Categorical(ignore_index)
    takes, any_keyword = _forward_keys(model)
    passed = takes - set(_READ) - set(_NOT_DATA)  # batch keys given to the model as keyword arguments
    known = set(_READ) | passed
    cache_off = {"use_cache": False} if "use_cache" in takes or any_keyword else {}
    vocabulary = _vocabulary(model)

    def prepare(batch: Mapping[str, Tensor]) -> Prepared:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise FisherError("causal_lm: expected a dict batch with 'input_ids' (and optionally "
                              "'attention_mask', 'labels')")
        for key in sorted(set(batch) & set(_NOT_DATA)):
            raise FisherError(f"causal_lm: batch key {key!r} is not supported: {_NOT_DATA[key]}")
        extra = set(batch) - known
        if extra:
            raise FisherError(f"causal_lm: unexpected batch keys {sorted(extra)}; expected some of {sorted(known)} "
                              f"(the keys {type(model).__name__}.forward takes)")
        for key, x in batch.items():
            _tensor("causal_lm", key, x, "[N, T]" if key in _READ else "with the samples first")
        ids = batch["input_ids"]
        if ids.ndim != 2:
            raise FisherError(f"causal_lm: expected input_ids of shape [N, T], got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise FisherError(f"causal_lm: input_ids must hold integer token ids, got dtype {ids.dtype}")
        labels = batch.get("labels", ids)
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        for key, x in (("labels", labels), ("attention_mask", mask)):
            if x.shape != ids.shape:
                raise FisherError(f"causal_lm: {key} of shape {tuple(x.shape)} does not match "
                                  f"input_ids {tuple(ids.shape)}")
        per_token, per_sample = {}, {}
        for key in sorted(set(batch) & passed):
            x = batch[key]
            if x.ndim >= 2 and x.shape[:2] == ids.shape and not key.startswith("encoder_"):
                per_token[key] = x
            elif x.ndim >= 1 and x.shape[0] == ids.shape[0]:
                per_sample[key] = x
            else:
                raise FisherError(f"causal_lm: {key} of shape {tuple(x.shape)} has neither the [N, T] = "
                                  f"{tuple(ids.shape)} of input_ids nor its {ids.shape[0]} samples first")
        labels = torch.where(mask.to(torch.bool), labels, torch.full_like(labels, ignore_index))
        mask, ids, labels, *moved = left_align(mask, ids, labels, *per_token.values())
        if vocabulary is not None and ids.numel():
            _check_vocabulary(ids, vocabulary, tuple(batch["input_ids"].shape))
        targets, active = likelihood.canonical_targets(labels[:, 1:])
        # the last token predicts nothing and, the model being causal, no earlier output sees it: the model
        # runs on the others, so its logits need no slicing (whose backward would fill a [N, T, V] buffer)
        extras = {**{k: m[:, :-1] for k, m in zip(per_token, moved, strict=True)}, **per_sample}
        ids = ids[:, :-1]
        return Prepared({"input_ids": ids, **extras} if extras else ids, targets, active)

    def forward(model: nn.Module, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        keywords = dict(inputs) if isinstance(inputs, Mapping) else {"input_ids": inputs}
        out = model_call(model, params, keywords, **cache_off)
        return out.logits if hasattr(out, "logits") else out[0]  # [N, T - 1, V]

    return Problem(model, likelihood, prepare, forward)


def _check_vocabulary(ids: Tensor, vocabulary: tuple[str, nn.Module, int], shape: tuple[int, ...]) -> None:
    """Raise unless every id the model will see (padding included) indexes its input embedding."""
    name, embedding, size = vocabulary
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        row = int(bad.any(1).nonzero()[0, 0])
        values = ids[row][bad[row]]
        raise FisherError(
            f"causal_lm: input_ids must lie in [0, {size}) for the model's input embedding {name!r} ({embedding}), "
            f"padded positions included; row {row} holds {int(values[0])} (input_ids of shape {shape}, ids from "
            f"{int(ids.min())} to {int(ids.max())})"
        )


__all__ = ["Prepared", "Problem", "causal_lm", "forward_failure", "left_align", "model_call", "original_module",
           "params_of", "supervised"]
