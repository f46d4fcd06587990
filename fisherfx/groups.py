"""Groups of parameter entries as einops patterns: channels, heads, input features, custom.

A group spec is ``{param_name: Group}`` (a plain einops pattern string is accepted for a
:class:`Group` with no sizes). The group value of a parameter is the einops ``sum``-reduction of
its per-entry values, so the group axes are the tensor's own axes:
``{"h.0.attn.c_attn.weight": Tensor[h]}``.

==============================  ===============================  =====================
group                           pattern                          shape of the value
==============================  ===============================  =====================
output channel, Linear/Conv     ``"o ... -> o"``                  ``[o]``
output channel, HF ``Conv1D``   ``"i o -> o"``                    ``[o]``
input feature, Linear/Conv      ``"o i ... -> i"``                ``[i]``
head, q/k/v projection          ``"(h d) i -> h"``                ``[h]``
head, output projection         ``"o (h d) -> h"``                ``[h]``
head, fused GPT-2 ``c_attn``    ``"i (three h d) -> h"``          ``[h]``
whole tensor                    ``"... -> "``                     ``[]``
==============================  ===============================  =====================
"""

import itertools
import re
import sys
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import einops
import torch
from torch import Tensor, nn

from ._errors import FisherError


class Group(NamedTuple):
    """An einops ``sum``-reduction pattern and the axis sizes it cannot infer (e.g. ``h``)."""

    pattern: str
    sizes: Mapping[str, int] = {}  # never mutated (a NamedTuple default is shared); kept picklable

    def reduce(self, x: Tensor) -> Tensor:
        """Group sums of ``x`` (shaped like the parameter)."""
        return einops.reduce(x, self.pattern, "sum", **self.sizes)


Groups = Mapping[str, "Group | str"]


def as_group(spec: "Group | str") -> Group:
    """A :class:`Group` from a group or a bare pattern string."""
    return Group(spec) if isinstance(spec, str) else Group(spec.pattern, dict(spec.sizes))


def check_groups(groups: Groups, params: Mapping[str, Tensor], where: str = "groups") -> dict[str, Group]:
    """Validate ``groups`` against ``params``: known names, patterns that fit the shapes.

    Returns:
        ``{name: Group}`` in the order of ``groups``.

    Raises:
        FisherError: a name not in ``params``, or a pattern that does not fit its parameter.

    """
    out = {}
    for name, spec in groups.items():
        if name not in params:
            raise FisherError(f"{where}: unknown parameter {name!r}; known parameters: "
                              f"{some_names(params)}")
        group = as_group(spec)
        shape = tuple(params[name].shape)
        try:
            group.reduce(torch.empty(shape, device="meta"))
        except einops.EinopsError as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise FisherError(f"{where}: group pattern {group.pattern!r} with {group.sizes} does not fit "
                              f"parameter {name!r} of shape {shape}: {reason}") from None
        out[name] = group
    return out


def some_names(names: Iterable[str], k: int = 6) -> str:
    """The first ``k`` names quoted, and how many there are in all, for error messages."""
    names = list(names)
    return ", ".join(repr(n) for n in names[:k]) + (f", … ({len(names)} in all)" if len(names) > k else "")


def reduce_groups(values: Mapping[str, Tensor], groups: Groups) -> dict[str, Tensor]:
    """Group sums ``{name: [G...]}`` of per-entry values ``{name: [*P]}``."""
    return {name: as_group(spec).reduce(values[name]) for name, spec in groups.items()}


def expand_groups(values: Mapping[str, Tensor], groups: Groups, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Broadcast group values back to parameter shapes: each entry gets its group's value.

    This is the adjoint of the group sum, computed as its ``vjp``, so it holds for any pattern.

    Args:
        values: ``{name: [G...]}`` group values.
        groups: the spec that produced them.
        params: ``{name: [*P]}`` (only shapes, dtypes and devices are used).

    Returns:
        ``{name: [*P]}``.

    """
    missing = [k for k in values if k not in groups]
    if missing:
        raise FisherError(f"expand_groups: no group spec for {missing}; the groups cover {some_names(groups)}")
    checked = check_groups({k: groups[k] for k in values}, params, "expand_groups")
    out = {}
    for name, group in checked.items():
        zero = torch.zeros_like(params[name], dtype=values[name].dtype)
        reduced, pull = torch.func.vjp(group.reduce, zero)
        if reduced.shape != values[name].shape:
            raise FisherError(f"expand_groups: value for {name!r} has shape {tuple(values[name].shape)}, "
                              f"expected {tuple(reduced.shape)} from pattern {group.pattern!r}")
        (out[name],) = pull(values[name])
    return out


# --- ready-made specs ---------------------------------------------------------------------------

_CONV1D_NAMES = ("c_attn", "c_proj", "c_fc", "q_attn")


def _is_conv1d(name: str, modules: Mapping[str, nn.Module] | None) -> bool:
    """Whether ``name`` belongs to a HuggingFace ``Conv1D`` (weight stored ``[in, out]``)."""
    owner = name.rsplit(".", 1)[0]
    if modules is not None and owner in modules:
        conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded if used
        return conv1d is not None and isinstance(modules[owner], conv1d)
    return owner.rsplit(".", 1)[-1] in _CONV1D_NAMES


def _modules(model: nn.Module | None) -> dict[str, nn.Module] | None:
    return None if model is None else dict(model.named_modules())


def channels(params: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Group]:
    """One group per output channel of every parameter.

    Linear and Conv weights ``[o, i, ...]`` → ``[o]``; HuggingFace ``Conv1D`` weights ``[i, o]`` →
    ``[o]``; biases and norm weights ``[o]`` → ``[o]``; Embedding weights ``[V, d]`` → one group per
    vocabulary row (the output channel of a tied ``lm_head``). Scalars are left out.

    Args:
        params: ``{name: tensor}``.
        model: the module the names come from; with it, ``Conv1D`` is found by type, without it by
            GPT-2's names (``c_attn``, ``c_proj``, ``c_fc``).

    Returns:
        ``{name: Group}``.

    """
    modules = _modules(model)
    out = {}
    for name, p in params.items():
        if p.ndim == 0:
            continue
        if p.ndim == 2 and _is_conv1d(name, modules):
            out[name] = Group("i o -> o")
        else:
            out[name] = Group("o ... -> o")
    return out


def inputs(params: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Group]:
    """One group per input feature of every weight with ≥ 2 axes (``[o, i, ...]`` → ``[i]``;
    ``Conv1D`` ``[i, o]`` → ``[i]``). Biases and norm weights have no input axis and are left out.
    """
    modules = _modules(model)
    out = {}
    for name, p in params.items():
        if p.ndim < 2:
            continue
        out[name] = Group("i o -> i") if p.ndim == 2 and _is_conv1d(name, modules) else Group("o i ... -> i")
    return out


def whole(params: Mapping[str, Tensor]) -> dict[str, Group]:
    """One group per parameter tensor (a scalar value each)."""
    return {name: Group("... -> ") for name in params}


_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
          "query": "q", "key": "k", "value": "v", "qkv": "qkv", "c_attn": "qkv", "in_proj": "qkv"}


def _role(name: str) -> str | None:
    owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    if leaf in ("in_proj_weight", "in_proj_bias"):
        return "qkv"
    last = owner.rsplit(".", 1)[-1]
    if last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj is not
        return "o" if re.search(r"(^|\.)attn\.c_proj$", owner) else None
    return _ROLES.get(last)


def heads(
    params: Mapping[str, Tensor],
    num_heads: int,
    names: Mapping[str, str] | Iterable[str] | None = None,
    num_kv_heads: int | None = None,
    model: nn.Module | None = None,
    split_qkv: bool = False,
) -> dict[str, Group]:
    """One group per attention head, for the q/k/v/output projections.

    Roles: ``q``, ``k``, ``v`` (rows ``(h d)`` of the weight), ``o`` (columns ``(h d)``) and
    ``qkv`` for fused projections whose rows are ``(three h d)``: GPT-2's ``c_attn`` (a ``Conv1D``,
    ``[i, (three h d)]``), ``nn.MultiheadAttention.in_proj_weight``, a ``qkv`` Linear. A fused
    weight *does* divide into ``h`` under ``"(h d) i -> h"``, but each "head" would then mix q, k
    and v rows; the ``three`` axis keeps them apart (summed, or kept with ``split_qkv=True``).

    Args:
        params: ``{name: tensor}``.
        num_heads: query heads ``H``.
        names: ``{param_name: role}``, or names whose role is read from the module name
            (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``out_proj``, ``query``/``key``/``value``,
            ``c_attn``, ``attn.c_proj``, ``qkv``, ``in_proj_weight``); default: every parameter
            whose role can be read.
        num_kv_heads: key/value heads for grouped-query attention (default ``num_heads``).
        model: the module the names come from, to find ``Conv1D`` layouts by type.
        split_qkv: keep q/k/v of fused projections apart: values ``[3, h]`` instead of ``[h]``.

    Returns:
        ``{name: Group}`` with values ``[h]`` per parameter (``[3, h]`` for fused ones with
        ``split_qkv``). Output-projection biases have no head axis and are left out.

    Raises:
        FisherError: an explicit name with an unknown role, or no attention parameter found.

    """
    kv = num_heads if num_kv_heads is None else num_kv_heads
    modules = _modules(model)
    if names is None:
        roles = {n: r for n in params if (r := _role(n)) is not None}
    elif isinstance(names, Mapping):
        roles = dict(names)
    else:
        roles = {}
        for n in names:
            if (r := _role(n)) is None:
                raise FisherError(f"heads: cannot tell the role of {n!r}; pass names={{{n!r}: 'q'|'k'|'v'|'o'|'qkv'}}")
            roles[n] = r
    if not roles:
        raise FisherError("heads: found no attention projection among the parameters; pass names=")
    out = {}
    for name, role in roles.items():
        if name not in params:
            raise FisherError(f"heads: unknown parameter {name!r}; known parameters: {some_names(params)}")
        p = params[name]
        conv1d = p.ndim == 2 and _is_conv1d(name, modules)
        h = kv if role in ("k", "v") else num_heads
        if role in ("q", "k", "v"):
            pattern = "(h d) -> h" if p.ndim == 1 else ("i (h d) -> h" if conv1d else "(h d) i -> h")
            out[name] = Group(pattern, {"h": h})
        elif role == "o":
            if p.ndim == 1:
                continue
            out[name] = Group("(h d) o -> h" if conv1d else "o (h d) -> h", {"h": h})
        elif role == "qkv":
            if kv != num_heads:
                raise FisherError(f"heads: fused projection {name!r} with num_kv_heads={kv} != num_heads={num_heads}: "
                                  "its q, k and v parts have different sizes, which '(three h d)' cannot split; "
                                  "pass separate q/k/v projections or a custom Group")
            rows = "(three h d)"
            keep = "three h" if split_qkv else "h"
            pattern = f"{rows} -> {keep}" if p.ndim == 1 else (
                f"i {rows} -> {keep}" if conv1d else f"{rows} i -> {keep}")
            out[name] = Group(pattern, {"three": 3, "h": h})
        else:
            raise FisherError(f"heads: role {role!r} of {name!r} is not one of 'q', 'k', 'v', 'o', 'qkv'")
    return check_groups(out, params, "heads")


# --- flat export -------------------------------------------------------------------------------

def to_flat(values: Mapping[str, Tensor], sep: str = "|") -> dict[str, Tensor]:
    """``{name: [G...]}`` → ``{"<name>|<group>": scalar}``, the group index written ``"3"`` or
    ``"1,2"`` (``""`` for a whole-tensor group), for code that stores Fisher under such keys.
    """
    flat = {}
    for name, value in values.items():
        if sep in name:
            raise FisherError(f"to_flat: parameter name {name!r} contains the separator {sep!r}")
        for index in torch.cartesian_prod(*[torch.arange(s) for s in value.shape]).reshape(-1, value.ndim) \
                if value.ndim else [()]:
            index = tuple(int(i) for i in index)
            flat[f"{name}{sep}{','.join(map(str, index))}"] = value[index]
    return flat


def from_flat(flat: Mapping[str, Tensor], sep: str = "|") -> dict[str, Tensor]:
    """Inverse of :func:`to_flat`: ``{"<name>|<group>": scalar}`` → ``{name: [G...]}``.

    Raises:
        FisherError: a key without the separator, or a parameter whose group indices do not
            fill a full grid.

    """
    entries: dict[str, dict[tuple[int, ...], Tensor]] = {}
    for key, value in flat.items():
        if sep not in key:
            raise FisherError(f"from_flat: key {key!r} has no separator {sep!r} (expected '<param>{sep}<group>')")
        name, index = key.rsplit(sep, 1)
        try:
            idx = tuple(int(i) for i in index.split(",")) if index else ()
        except ValueError:
            raise FisherError(f"from_flat: group index {index!r} of key {key!r} is not integers") from None
        if idx in entries.get(name, {}):
            raise FisherError(f"from_flat: key {key!r} repeats group {idx} of parameter {name!r}")
        entries.setdefault(name, {})[idx] = torch.as_tensor(value)
    out = {}
    for name, items in entries.items():
        ndims = {len(i) for i in items}
        if len(ndims) != 1:
            raise FisherError(f"from_flat: parameter {name!r} mixes group indices with {sorted(ndims)} axes; "
                              "expected the same number of axes in every key")
        shape = tuple(max(i[d] for i in items) + 1 for d in range(ndims.pop()))
        if set(items) != set(itertools.product(*map(range, shape))):
            raise FisherError(f"from_flat: parameter {name!r} has {len(items)} group entries, "
                              f"which do not fill a grid of shape {shape} (each index 0 … size-1 once)")
        first = next(iter(items.values()))
        value = torch.empty(shape, dtype=first.dtype, device=first.device)
        for idx, v in items.items():
            value[idx] = v
        out[name] = value
    return out


__all__ = ["Group", "as_group", "channels", "check_groups", "expand_groups", "from_flat", "heads",
           "inputs", "reduce_groups", "to_flat", "whole"]
