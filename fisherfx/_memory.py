"""How much memory a Fisher representation of a model takes, from parameter shapes alone.

:func:`memory_estimate` counts the entries each representation stores and their bytes per dtype, from
the model's parameter shapes. A HuggingFace config is turned into a model on the ``meta`` device
(shapes, no weights), so a 70B config costs nothing to measure. The counts are exact for what fisherfx
stores:

- ``"full"``: the dense ``D × D`` Fisher, ``D`` the number of (distinct) parameters.
- ``"diagonal"``: ``D`` (:func:`~fisherfx.diag_fisher`).
- ``"channels"`` / ``"heads"``: the group values of :func:`~fisherfx.channels` /
  :func:`~fisherfx.heads` (``model=`` given, so Conv1D layouts and GQA are read from the model), i.e.
  ``Σ numel`` of :func:`~fisherfx.group_fisher`'s ``value``.
- ``"kfac"``: what :func:`~fisherfx.kfac` returns: for every layer with factors ``A`` (``i²``, or ``i``
  for an Embedding's diagonal ``A``; ``i`` counts the bias's column of ones) plus ``G`` (``o²``), and the
  diagonal (``numel``) of every parameter no layer covers (norms, tied weights of different kinds,
  modules the taps do not know). The layers are chosen by the same rule as ``kfac`` itself.
  Scalars (counts) are not counted. ``A`` is counted dense: an upper bound where ``kfac`` keeps it as its
  ``r ≤ i/2`` rows (``r (i + 1)`` entries; ``r`` depends on the batch, which this count does not see).

The module is named ``_memory`` so that the function does not shadow it in ``fisherfx``.
"""

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import groups as groups_
from ._errors import FisherError

REPRESENTATIONS = ("full", "diagonal", "channels", "heads", "kfac")
DTYPES = {"float32": 4, "bfloat16": 2, "float64": 8}


class MemoryEstimate(NamedTuple):
    """What :func:`memory_estimate` returns: the stored entries and their size in bytes per dtype."""

    representation: str
    entries: int  # numbers stored
    parameters: int  # D, the model's distinct parameters counted
    float32: int  # bytes
    bfloat16: int
    float64: int

    def bytes(self, dtype: "str | torch.dtype") -> int:
        """Bytes in ``dtype`` (``"float32"``, ``torch.bfloat16``, ...)."""
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise FisherError(f"memory_estimate: no size for dtype {dtype!r}; expected one of {list(DTYPES)}")
        return getattr(self, name)


def _model_of(where: str, model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if not hasattr(model_or_config, "to_dict") or not hasattr(model_or_config, "model_type"):
        raise FisherError(f"{where}: expected an nn.Module or a HuggingFace config, got "
                          f"{type(model_or_config).__name__}")
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the environment
        raise FisherError(f"{where}: a config needs transformers installed (pip install transformers)") from None
    with torch.device("meta"):
        try:
            return transformers.AutoModelForCausalLM.from_config(model_or_config)
        except ValueError:  # not a causal LM config: the base model
            return transformers.AutoModel.from_config(model_or_config)


def _kfac_entries(model: nn.Module, params: Mapping[str, Tensor]) -> int:
    from ._kfac import _requests

    requests, joins, _ = _requests(model, list(params), "expand")
    bias_of = {weight: bias for bias, weight in joins.items()}
    total = 0
    for name, p in params.items():
        if name in joins:
            continue  # its column of ones is in its weight's A
        f = requests[name].factors
        if f is None:
            total += p.numel()  # a diagonal
        elif p.ndim == 1:  # a bias alone: A = [[1]], G = [o, o]
            total += 1 + p.shape[0] ** 2
        elif isinstance(model.get_submodule(name.rpartition(".")[0]), nn.Embedding):
            total += p.shape[0] + p.shape[1] ** 2  # [V, d]: A diagonal [V], G [d, d]
        else:
            if f.transposed:  # HF Conv1D [i, o]
                i, o = p.shape[0], p.shape[1]
            else:  # Linear [o, i], Conv [o, c, *k]: A over c·Πk
                o, i = p.shape[0], math.prod(p.shape[1:])
            total += (i + (name in bias_of)) ** 2 + o ** 2
    return total


def memory_estimate(model_or_config: Any, representation: str) -> MemoryEstimate:
    """The entries and bytes of a Fisher representation of a model, from parameter shapes (no weights).

    Args:
        model_or_config: an ``nn.Module`` (its trainable parameters; a model on the ``meta`` device is
            enough) or a HuggingFace config (built with ``AutoModelForCausalLM.from_config`` on the
            ``meta`` device, ``AutoModel`` for configs that are not causal LMs; needs transformers).
        representation: ``"full"``, ``"diagonal"``, ``"channels"``, ``"heads"`` or ``"kfac"`` (module
            docstring).

    Returns:
        :class:`MemoryEstimate` ``(representation, entries, parameters, float32, bfloat16, float64)``,
        the three last in bytes.

    Raises:
        FisherError: an unknown representation or input; what :func:`~fisherfx.heads` raises for a model
            whose heads cannot be worked out.

    """
    where = "memory_estimate"
    if representation not in REPRESENTATIONS:
        raise FisherError(f"{where}: representation must be one of {list(REPRESENTATIONS)}, got {representation!r}")
    model = _model_of(where, model_or_config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    d = sum(p.numel() for p in params.values())
    if representation == "full":
        entries = d * d
    elif representation == "diagonal":
        entries = d
    elif representation in ("channels", "heads"):
        spec = groups_.channels(params, model) if representation == "channels" else groups_.heads(params, model=model)
        shapes = groups_.reduce_groups({n: p.to("meta") for n, p in params.items() if n in spec}, spec)
        entries = sum(v.numel() for v in shapes.values())
    else:
        entries = _kfac_entries(model, params)
    return MemoryEstimate(representation, entries, d, *(entries * size for size in DTYPES.values()))
