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

import functools
import itertools
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, NamedTuple

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
    if type(spec) is Group and type(spec.sizes) is dict:
        return spec
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
        reason = _misfit(group.pattern, tuple(sorted(group.sizes.items())), shape)
        if reason is not None:
            raise FisherError(f"{where}: group pattern {group.pattern!r} with {group.sizes} does not fit "
                              f"parameter {name!r} of shape {shape}: {reason}")
        out[name] = group
    return out


@functools.lru_cache(maxsize=4096)
def _misfit(pattern: str, sizes: tuple[tuple[str, int], ...], shape: tuple[int, ...]) -> str | None:
    """Why ``pattern`` does not reduce a tensor of ``shape`` (``None`` if it does); a pure function
    of its arguments, cached: estimators check the same specs at every call.
    """
    try:
        einops.reduce(torch.empty(shape, device="meta"), pattern, "sum", **dict(sizes))
    except einops.EinopsError as err:
        return str(err).strip().splitlines()[-1].strip()
    return None


def some_names(names: Iterable[str], k: int = 6) -> str:
    """The first ``k`` names quoted, and how many there are in all, for error messages."""
    names = list(names)
    return ", ".join(repr(n) for n in names[:k]) + (f", … ({len(names)} in all)" if len(names) > k else "")


def reduce_groups(values: Mapping[str, Tensor], groups: Groups) -> dict[str, Tensor]:
    """Group sums ``{name: [G...]}`` of per-entry values ``{name: [*P]}``.

    Only names with both a value and a group are reduced, in the order of ``groups``: a spec made once
    for the whole model (``heads(params_of(model))``) applies to values of part of it, as in
    :func:`expand_groups`, and values without a group are left out.

    Raises:
        FisherError: a pattern that does not fit its value's shape.

    """
    out = {}
    for name, spec in groups.items():
        if name not in values:
            continue
        group = as_group(spec)
        try:
            out[name] = group.reduce(values[name])
        except einops.EinopsError as err:
            reason = str(err).strip().splitlines()[-1].strip()
            raise FisherError(f"reduce_groups: group pattern {group.pattern!r} with {dict(group.sizes)} does not fit "
                              f"the value for {name!r} of shape {tuple(values[name].shape)}: {reason}") from None
    return out


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
# nn.MultiheadAttention holds its input projections as parameters of its own
_MHA_LEAVES = {"in_proj_weight": "qkv", "in_proj_bias": "qkv", "q_proj_weight": "q", "k_proj_weight": "k",
               "v_proj_weight": "v"}


def _role(name: str) -> str | None:
    owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
    if leaf in _MHA_LEAVES:
        return _MHA_LEAVES[leaf]
    last = owner.rsplit(".", 1)[-1]
    if last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj is not
        return "o" if re.search(r"(^|\.)attn\.c_proj$", owner) else None
    return _ROLES.get(last)


def _layer_of(name: str) -> str:
    """The attention layer of a projection parameter: the prefix of the module holding the projection
    (``model.layers.0.self_attn.q_proj.weight`` → ``"model.layers.0.self_attn."``, ``attn.in_proj_weight``
    → ``"attn."``, ``""`` at the top level).
    """
    parts = name.split(".")
    prefix = ".".join(parts[:-1] if parts[-1] in _MHA_LEAVES else parts[:-2])
    return prefix + "." if prefix else ""


def _where(layer: str) -> str:
    return repr(layer) if layer else "(top level)"


class _Proj(NamedTuple):
    """One projection parameter of an attention layer, as :func:`heads` sees it."""

    name: str
    role: str  # q, k, v, o, qkv
    shape: tuple[int, ...]
    conv1d: bool  # HF Conv1D layout [in, out]
    size: int | None  # length of its (h d) axis; None: no head axis (output bias, scalar)
    axis: str  # "rows" or "columns"

    @classmethod
    def of(cls, name: str, role: str, p: Tensor, conv1d: bool) -> "_Proj":
        shape = tuple(p.shape)
        if p.ndim == 0 or (role == "o" and p.ndim == 1):
            return cls(name, role, shape, conv1d, None, "")
        in_rows = conv1d if role == "o" else not conv1d  # Conv1D weights are [in, out], Linear ones [out, in]
        axis = (shape[0], "rows") if in_rows or p.ndim == 1 else (shape[1], "columns")
        return cls(name, role, shape, conv1d, *axis)

    def pattern(self, split_qkv: bool) -> str:
        if self.role == "o":
            return "(h d) o -> h" if self.conv1d else "o (h d) -> h"
        rows, keep = ("(three h d)", "three h" if split_qkv else "h") if self.role == "qkv" else ("(h d)", "h")
        if len(self.shape) == 1:
            return f"{rows} -> {keep}"
        return f"i {rows} -> {keep}" if self.conv1d else f"{rows} i -> {keep}"


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


_Claims = list[tuple[int, str]]  # (value, where it comes from), e.g. (2, "model.config.num_key_value_heads=2")


def _declared(model: nn.Module | None, modules: Mapping[str, nn.Module] | None, layer: str) -> dict[str, _Claims]:
    """What a model states about one layer's heads: its attention module's ``num_heads``,
    ``num_key_value_heads`` and ``head_dim`` (as ``nn.MultiheadAttention`` and GPT-2's attention carry
    them), else ``model.config``'s ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim``.
    """
    out: dict[str, _Claims] = {"h": [], "kv": [], "d": []}
    if model is None:
        return out
    owner = layer[:-1]
    module = modules.get(owner) if owner else model
    for key, attr in (("h", "num_heads"), ("kv", "num_key_value_heads"), ("d", "head_dim")):
        if module is not None and _is_count(v := getattr(module, attr, None)):
            out[key].append((v, f"{owner or 'model'}.{attr}={v}"))
    config = getattr(model, "config", None)
    for key, attr in (("h", "num_attention_heads"), ("kv", "num_key_value_heads"), ("d", "head_dim")):
        if not out[key] and _is_count(v := getattr(config, attr, None)):
            out[key].append((v, f"model.config.{attr}={v}"))
    return out


def _agree(what: str, layer: str, claims: _Claims) -> int | None:
    """The one value all claims give (None without a claim); a FisherError listing them where they differ."""
    if len({v for v, _ in claims}) > 1:
        raise FisherError(f"heads: the {what} of layer {_where(layer)} do not agree: "
                          + "; ".join(src for _, src in claims))
    return claims[0][0] if claims else None


def _layer_heads(layer: str, projs: list[_Proj], declared: dict[str, _Claims], num_heads: int | None,
                 num_kv_heads: int | None) -> tuple[int, int]:
    """Query and key/value heads ``(H, KV)`` of one attention layer, every source checked against the others.

    ``H`` comes from ``num_heads`` and the model; the head size ``d`` from the ``(h d)`` axis of the q, output
    and fused projections over ``H`` (and the model's ``head_dim``); ``KV`` from the k/v projections' ``(h d)``
    axis over ``d``, ``num_kv_heads`` and the model.
    """
    h_claims = ([(num_heads, f"num_heads={num_heads}")] if num_heads is not None else []) + declared["h"]
    h = _agree("query heads", layer, h_claims)
    if h is None:
        raise FisherError(f"heads: num_heads is needed for {projs[0].name!r}: no model was given whose attention "
                          "module or config states num_heads / num_attention_heads")
    d_claims = list(declared["d"])
    for p in projs:
        if p.role in ("k", "v") or p.size is None:
            continue
        three = 3 if p.role == "qkv" else 1
        if p.size % (three * h):
            sizes = {"three": 3, "h": h} if three == 3 else {"h": h}
            raise FisherError(f"heads: group pattern {p.pattern(False)!r} with {sizes} does not fit parameter "
                              f"{p.name!r} of shape {p.shape}: its {p.size} {p.axis} are not a multiple of "
                              f"{'3 × ' if three == 3 else ''}{h_claims[0][1]} (each query head has d of them)")
        d = p.size // (three * h)
        d_claims.append((d, f"{p.name!r}: {p.size} {p.axis} / {'3 × ' if three == 3 else ''}{h} heads = head size {d}"))
    d = _agree("head sizes", layer, d_claims)
    kv_claims = ([(num_kv_heads, f"num_kv_heads={num_kv_heads}")] if num_kv_heads is not None else []) \
        + declared["kv"]
    kv_projs = [p for p in projs if p.role in ("k", "v") and p.size is not None]
    for p in kv_projs if d is not None else []:
        if p.size % d:
            raise FisherError(f"heads: {p.name!r} of shape {p.shape} has {p.size} {p.axis}, not a multiple of the "
                              f"head size {d} ({d_claims[0][1]})")
        kv_claims.append((p.size // d, f"{p.name!r}: {p.size} {p.axis} / head size {d} = {p.size // d} "
                                       "key/value heads"))
    kv = _agree("key/value heads", layer, kv_claims)
    if kv is None:
        if kv_projs:
            raise FisherError(f"heads: cannot tell the key/value heads of {some_names(p.name for p in kv_projs)}: "
                              f"layer {_where(layer)} has no q, output or fused projection to give the head size "
                              "and no model states it; pass num_kv_heads= or model=")
        kv = h
    if h % kv:
        raise FisherError(f"heads: {kv} key/value heads ({kv_claims[0][1]}) do not divide the {h} query heads "
                          f"({h_claims[0][1]}) of layer {_where(layer)}: grouped-query attention shares each "
                          "key/value head among H / KV query heads")
    for p in projs:
        if p.role == "qkv" and kv != h:
            src = "" if kv_claims[0][1].startswith("num_kv_heads=") else f" ({kv_claims[0][1]})"
            raise FisherError(f"heads: fused projection {p.name!r} with num_kv_heads={kv} != num_heads={h}{src}: "
                              "its q, k and v parts have different sizes, which "
                              "'(three h d)' cannot split; pass separate q/k/v projections or a custom Group")
    return h, kv


def heads(
    params: Mapping[str, Tensor],
    num_heads: int | None = None,
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

    Heads are worked out per attention layer (the module holding the projections, e.g.
    ``model.layers.0.self_attn.``): ``H`` query heads from ``num_heads`` or the model; the head size
    ``d`` = (q rows, output columns) / ``H``; the key/value heads ``KV`` = k/v rows / ``d``, so
    grouped-query attention (``KV < H``, LLaMA's ``num_key_value_heads``) is found from the shapes
    alone and each k/v group holds one real key/value head. With ``model``, the attention module's
    ``num_heads`` / ``num_key_value_heads`` / ``head_dim`` (``nn.MultiheadAttention``, GPT-2) or else
    ``model.config``'s ``num_attention_heads`` / ``num_key_value_heads`` / ``head_dim`` are read too.
    Every source is checked against the others and the shapes.

    Args:
        params: ``{name: tensor}``.
        num_heads: query heads ``H``; optional when ``model`` states them.
        names: ``{param_name: role}``, or names whose role is read from the module name
            (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``out_proj``, ``query``/``key``/``value``,
            ``c_attn``, ``attn.c_proj``, ``qkv``, ``in_proj_weight``, ``q_proj_weight``, …); default:
            every parameter whose role can be read. Only these projections are used to infer heads.
        num_kv_heads: key/value heads ``KV`` (grouped-query attention), checked against the shapes
            and the model; needed only for a layer given k/v projections alone, without ``model``.
        model: the module the names come from: ``Conv1D`` layouts by type, head counts as above.
        split_qkv: keep q/k/v of fused projections apart: values ``[3, h]`` instead of ``[h]``.

    Returns:
        ``{name: Group}`` with values ``[H]`` for q and output projections, ``[KV]`` for k/v ones and
        ``[H]`` (``[3, H]`` with ``split_qkv``) for fused ones. Output-projection biases have no head
        axis and are left out. :func:`head_totals` combines them into one value per query head.

    Raises:
        FisherError: an explicit name with an unknown role; no attention parameter found; ``num_heads``
            missing without a model that states it; ``num_heads``, ``num_kv_heads``, the model and the
            shapes contradicting one another (the message lists each source and what it gives); a
            fused projection under grouped-query attention.

    Example:
        >>> import torch, fisherfx as ffx
        >>> params = {"attn.q_proj.weight": torch.zeros(8, 8), "attn.k_proj.weight": torch.zeros(4, 8)}
        >>> ffx.heads(params, num_heads=4)["attn.k_proj.weight"]  # head size 2: 2 key/value heads
        Group(pattern='(h d) i -> h', sizes={'h': 2})

    """
    for arg, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if value is not None and not _is_count(value):
            raise FisherError(f"heads: {arg} must be a positive int, got {value!r}")
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
    layers: dict[str, list[_Proj]] = {}
    for name, role in roles.items():
        if name not in params:
            raise FisherError(f"heads: unknown parameter {name!r}; known parameters: {some_names(params)}")
        if role not in ("q", "k", "v", "o", "qkv"):
            raise FisherError(f"heads: role {role!r} of {name!r} is not one of 'q', 'k', 'v', 'o', 'qkv'")
        conv1d = params[name].ndim == 2 and _is_conv1d(name, modules)
        layers.setdefault(_layer_of(name), []).append(_Proj.of(name, role, params[name], conv1d))
    out = {}
    for layer, projs in layers.items():
        h, kv = _layer_heads(layer, projs, _declared(model, modules, layer), num_heads, num_kv_heads)
        for p in projs:
            if p.role == "o" and p.size is None:
                continue
            sizes = {"three": 3, "h": h} if p.role == "qkv" else {"h": kv if p.role in ("k", "v") else h}
            out[p.name] = Group(p.pattern(split_qkv), sizes)
    return check_groups({n: out[n] for n in roles if n in out}, params, "heads")


def head_totals(
    values: Mapping[str, Tensor],
    groups: Groups,
    num_heads: int | None = None,
    shared: Literal["split", "full"] = "split",
    layer_of: Callable[[str], str] | None = None,
) -> dict[str, Tensor]:
    """One value per query head and attention layer, from per-projection head values.

    :func:`heads` gives values per projection: ``[H]`` for q and output projections, ``[KV]`` for the
    k/v projections of grouped-query attention, ``[H]`` or ``[3, H]`` for fused ones (``c_attn``,
    ``in_proj_weight``). They cannot simply be added. Here each layer's values (biases with a head axis
    included; the ``three`` axis summed) ``v_p ∈ R^{h_p}`` are combined; each ``h_p`` divides the layer's
    ``H`` and ``g_p = H / h_p`` query heads read head ``j`` of ``p`` (``g_p = 1`` for q, output and fused
    projections, ``H / KV`` for GQA k/v). Query head ``i`` reads key/value head ``⌊i / g⌋``, as
    HuggingFace's ``repeat_kv`` does, and gets

    ``T_i = Σ_p w_p · v_p[⌊i / g_p⌋]``, with ``w_p = 1 / g_p`` (``shared="split"``) or ``w_p = 1`` (``"full"``).

    ``"split"`` divides a shared key/value head evenly among its query heads, so that the totals sum to
    the layer's total, ``Σ_i T_i = Σ_p Σ_j v_p[j]`` (the group Fisher of all its head parameters).
    ``"full"`` gives each query head the whole value of the key/value head it reads (what it sees; the
    totals then count each k/v value ``g`` times). Without GQA both are the plain sum over projections.

    Args:
        values: ``{name: [h] or [3, h]}`` group values from a :func:`heads` spec, e.g.
            ``group_fisher(problem, params, batch, spec).value`` or ``mask_importance(...).value``.
        groups: the spec that produced them (names in it without a value are ignored).
        num_heads: query heads ``H``, checked in every layer; default: the largest head count among a
            layer's values (a layer given only k/v values then needs it).
        shared: ``"split"`` or ``"full"``, how a key/value head's value is shared, as above.
        layer_of: ``name -> layer``; default: the module holding the projection, with a trailing dot
            (``"model.layers.0.self_attn."``, ``"transformer.h.0.attn."``, ``"attn."`` for
            ``nn.MultiheadAttention``). Pass one to merge projections held by sibling modules (BERT's
            ``attention.self`` and ``attention.output``).

    Returns:
        ``{layer: [H]}`` in the order layers first appear in ``values``, in the values' promoted dtype;
        ``torch.stack(list(totals.values()))`` gives ``[L, H]`` where layers have equal ``H``.

    Raises:
        FisherError: a value without a group, or whose group has no head axis (``-> h``,
            ``-> three h``); a value whose shape does not match its group; head counts that do not
            divide the layer's ``H``; a q, output or fused value with other than ``H`` heads; a layer
            of k/v values only without ``num_heads``; an unknown ``shared``.

    Example:
        >>> import torch, fisherfx as ffx
        >>> spec = {"a.q_proj.weight": ffx.Group("(h d) i -> h", {"h": 4}),
        ...         "a.k_proj.weight": ffx.Group("(h d) i -> h", {"h": 2})}
        >>> ffx.head_totals({"a.q_proj.weight": torch.ones(4), "a.k_proj.weight": torch.tensor([2.0, 4.0])}, spec)
        {'a.': tensor([2., 2., 3., 3.])}

    """
    where = "head_totals"
    if shared not in ("split", "full"):
        raise FisherError(f"{where}: shared must be 'split' or 'full', got {shared!r}")
    if num_heads is not None and not _is_count(num_heads):
        raise FisherError(f"{where}: num_heads must be a positive int, got {num_heads!r}")
    missing = [k for k in values if k not in groups]
    if missing:
        raise FisherError(f"{where}: no group spec for {some_names(missing)}; the groups cover {some_names(groups)}")
    layer_of = layer_of or _layer_of
    layers: dict[str, list[tuple[str, Tensor]]] = {}
    for name, value in values.items():
        group = as_group(groups[name])
        axes = tuple(group.pattern.split("->")[-1].split())
        if axes not in (("h",), ("three", "h")):
            raise FisherError(f"{where}: the group of {name!r} ({group.pattern!r}) has no head axis; expected a "
                              "spec from heads(), reducing to '-> h' or '-> three h'")
        want = tuple(group.sizes.get(a) for a in axes)
        if value.ndim != len(axes) or any(w is not None and s != w for s, w in zip(value.shape, want)):
            expected = "(" + ", ".join(str(a if w is None else w) for w, a in zip(want, axes)) + ",)"[len(axes) > 1:]
            raise FisherError(f"{where}: value for {name!r} has shape {tuple(value.shape)}, expected {expected} "
                              f"from pattern {group.pattern!r} with {dict(group.sizes)}")
        layers.setdefault(layer_of(name), []).append((name, value.sum(0) if len(axes) == 2 else value))
    totals = {}
    for layer, items in layers.items():
        if num_heads is None and all(_role(n) in ("k", "v") for n, _ in items):
            raise FisherError(f"{where}: layer {_where(layer)} has key/value values only "
                              f"({some_names(n for n, _ in items)}), which do not tell its query heads; "
                              "pass num_heads=")
        h = num_heads or max(v.shape[0] for _, v in items)
        total = None
        for name, v in items:
            if v.shape[0] != h and (_role(name) in ("q", "o", "qkv") or h % v.shape[0]):
                raise FisherError(f"{where}: {name!r} has {v.shape[0]} heads, but layer {_where(layer)} has {h} "
                                  f"query heads ({'num_heads' if num_heads else 'its largest head count'}); "
                                  "q, output and fused projections have H heads and key/value ones a divisor of H")
            g = h // v.shape[0]
            share = v.repeat_interleave(g) / (g if shared == "split" else 1)
            total = share if total is None else total + share
        totals[layer] = total
    return totals


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


__all__ = ["Group", "as_group", "channels", "check_groups", "expand_groups", "from_flat", "head_totals", "heads",
           "inputs", "reduce_groups", "to_flat", "whole"]
