"""Estimators from tap factors: squares of per-unit gradients without forming them where possible.

A *unit* is what one squared gradient belongs to: a sample (``per="sample"``) or an active
position (``per="token"`` and ``kind="exact"``, once the engine has put each position in a unit
of its own). The gradient of a parameter for unit ``u`` is a sum over the uses of the parameter
(:class:`~._tap_layers.Use`) and their positions ``p``:

.. math::
    G_u = \\sum_p a_{u,p} b_{u,p}^\\top \\quad (\\text{outer, index}), \\qquad
    G_u = \\sum_p a_{u,p} \\quad (\\text{vector})

and every estimator is a sum over units of a quadratic function of ``G_u``:

============  ==============================================  ==================================
what          value                                           computed as
============  ==============================================  ==================================
diag          ``Σ_u G_u ⊙ G_u``                               ``(a²)ᵀ(b²)`` if one position per
                                                              unit, else ``G_u`` in chunks
rows          ``Σ_u Σ_i G_u[o, i]²`` per row ``o``            ``Σ_u diag(A_uᵀ K_u A_u)``,
                                                              ``K_u = B_u B_uᵀ`` (Gram), or
                                                              ``G_u`` in chunks, the cheaper one
cols          ``Σ_u Σ_o G_u[o, i]²`` per column ``i``         the same with ``A`` and ``B`` swapped
mask_rows     ``Σ_u (Σ_{o∈g} Σ_i θ_{oi} G_u[o, i])²``         ``Σ_p a_p ⊙ (θ b_p)``, no ``G_u``
mask_cols     the same with column groups                     ``Σ_p b_p ⊙ (θᵀ a_p)``
mask          ``Σ_u (Σ_{j∈g} θ_j G_{u,j})²`` (any groups)     ``G_u`` in chunks
============  ==============================================  ==================================

Row and column values are summed into groups with ``index_add`` by a group id per row/column.
"""

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import einops
import torch
from einops.parsing import ParsedExpression
from torch import Tensor
from torch.func import vmap

from ._tap_layers import Use

_ELLIPSIS = "…"  # how einops' parser writes "..." in a composition
BUDGET = 1 << 21  # elements of the largest temporary per chunk (per-unit gradients, Gram matrices)


class Plan(NamedTuple):
    """What to accumulate for one parameter (see the module docstring)."""

    what: str  # "diag" | "rows" | "cols" | "mask_rows" | "mask_cols" | "mask"
    gid: Tensor | None = None  # [o] or [i] group id of each row/column ("rows", "cols", "mask_*"); None: its own
    groups: int = 0  # number of groups
    theta: Tensor | None = None  # the parameter in its 2-D layout [o, i] (or [d]), "mask*" only
    reduce: Callable[[Tensor], Tensor] | None = None  # parameter-shaped → group values ("mask")
    shape: tuple[int, ...] = ()  # the parameter's shape ("mask")


def _chunk(units: int, per_unit: int, cap: int | None) -> int:
    step = max(1, BUDGET // max(per_unit, 1))
    return max(1, min(units, step, cap or units))


def _dense(uses: list[Use], lo: int, hi: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Outer uses concatenated along positions: ``[c, P, o]``, ``[c, P, i]``."""
    a = torch.cat([u.a[lo:hi].to(dtype) for u in uses], 1)
    b = torch.cat([u.b(lo, hi).to(dtype) for u in uses], 1)
    return a, b


class Workspace:
    """One scratch buffer that every chunk of one estimate call reuses (grown on demand).

    A view it hands out is valid until the next :meth:`take`; it lives only as long as the call.
    """

    def __init__(self) -> None:
        self.flat: Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        size = math.prod(shape)
        flat = self.flat
        if flat is None or flat.numel() < size or flat.dtype != dtype or flat.device != device:
            flat = self.flat = torch.empty(size, dtype=dtype, device=device)
        return flat[:size].view(shape)


def _explicit(uses: list[Use], lo: int, hi: int, dtype: torch.dtype, ws: Workspace | None = None) -> Tensor:
    """Per-unit gradients ``G_u`` ``[c, *size]`` of units ``lo:hi`` (in ``ws``'s buffer when given).

    The first outer use writes the result with ``bmm`` (no zero fill); the others add into it.
    """
    c = hi - lo
    shape = (c, *uses[0].size)
    device = uses[0].a.device
    total = None
    for u in sorted(uses, key=lambda u: u.form != "outer" or u.grads is not None):
        if u.form == "outer" and u.grads is None:
            a, b = u.a[lo:hi].to(dtype).transpose(1, 2), u.b(lo, hi).to(dtype)
            if total is None:
                total = torch.bmm(a, b) if ws is None else torch.bmm(a, b, out=ws.take(shape, dtype, device))
            else:
                total.baddbmm_(a, b)
            continue
        if total is None:
            total = torch.zeros(shape, dtype=dtype, device=device) if ws is None else \
                ws.take(shape, dtype, device).zero_()
        if u.form == "vector":
            total += u.a[lo:hi].to(dtype).sum(1)
        elif u.grads is not None:
            total += u.grads(lo, hi).to(dtype)
        else:
            idx, b = u.a[lo:hi], u.b(lo, hi).to(dtype)
            o = u.size[0]
            keep = idx >= 0
            unit = torch.arange(c, device=idx.device)[:, None].expand_as(idx)
            total.view(c * o, -1).index_add_(0, (unit * o + idx)[keep], b[keep])
    return total


def _add_squares(total: Tensor, g: Tensor) -> None:
    """``total += Σ_c g_c ⊙ g_c`` for scratch ``g`` ``[c, *size]`` (which may be overwritten).

    Large entries: one fused ``addcmul`` per unit (``g`` is read once); small ones: squared in
    place and summed (fewer calls).
    """
    if g[0].numel() >= 1 << 15:
        for k in range(g.shape[0]):
            total.addcmul_(g[k], g[k])
    else:
        total += g.square_().sum(0)


def _aggregate(uses: list[Use], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Index uses: the non-zero rows of all ``G_u`` as (row index ``[K]``, row ``[K, i]``)."""
    o = uses[0].size[0]
    idx = torch.cat([u.a for u in uses], 1)
    b = torch.cat([u.b(0, u.a.shape[0]).to(dtype) for u in uses], 1)
    keep = idx >= 0
    unit = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    keys, inverse = torch.unique((unit * o + idx)[keep], return_inverse=True)
    rows = torch.zeros((keys.shape[0], b.shape[-1]), dtype=dtype, device=b.device)
    return keys % o, rows.index_add_(0, inverse, b[keep])


def _rows(u: Use, lo: int, hi: int) -> Use:
    """An outer use restricted to rows ``lo:hi`` of its ``[o, i]`` layout."""
    return Use("outer", u.a[:, :, lo:hi], u.b, (hi - lo, u.size[1]))


def _one_position(uses: list[Use]) -> bool:
    return len(uses) == 1 and uses[0].form == "outer" and uses[0].a.shape[1] == 1


def _squares(uses: list[Use], what: str, dtype: torch.dtype, cap: int | None, ws: Workspace | None = None) -> Tensor:
    """``diag`` ``[o, i]``/``[d]``, ``rows`` ``[o]`` or ``cols`` ``[i]`` (before grouping)."""
    forms = {u.form for u in uses}
    units = uses[0].a.shape[0]
    if forms == {"vector"}:
        s = sum(u.a.sum(1) for u in uses)
        return (s**2).sum(0)
    if _one_position(uses):
        return one_position(uses[0].a[:, 0].to(dtype).square(), uses[0].b(0, units)[:, 0].to(dtype).square(), what)
    if forms == {"index"}:
        rows, agg = _aggregate(uses, dtype)
        o, i = uses[0].size
        sq = agg**2
        if what == "diag":
            return torch.zeros((o, i), dtype=dtype, device=sq.device).index_add_(0, rows, sq)
        if what == "rows":
            return torch.zeros(o, dtype=dtype, device=sq.device).index_add_(0, rows, sq.sum(1))
        return sq.sum(0)
    o, i = uses[0].size
    positions = sum(u.a.shape[1] for u in uses)
    if what == "diag" and o * i > BUDGET and o > 1 and all(u.form == "outer" and u.grads is None for u in uses):
        # one unit's gradient alone exceeds the scratch budget (a language model's head): rows in blocks
        rows, out = max(1, BUDGET // i), torch.empty((o, i), dtype=dtype, device=uses[0].a.device)
        for lo in range(0, o, rows):
            out[lo:lo + rows] = _squares([_rows(u, lo, min(lo + rows, o)) for u in uses], what, dtype, cap, ws)
        return out
    gram = forms == {"outer"} and what != "diag" and positions * (o + i) < o * i
    per_unit = positions * (positions + o + i) if gram else o * i + positions * (o + i)
    step = _chunk(units, per_unit, cap)
    total = torch.zeros(uses[0].size if what == "diag" else (o if what == "rows" else i),
                        dtype=dtype, device=uses[0].a.device)
    for lo in range(0, units, step):
        hi = min(lo + step, units)
        if gram:
            a, b = _dense(uses, lo, hi, dtype)
            if what == "cols":
                a, b = b, a
            k = b @ b.transpose(1, 2)  # [c, P, P]
            total += (a * (k @ a)).sum((0, 1))
        elif what == "diag":
            _add_squares(total, _explicit(uses, lo, hi, dtype, ws))
        else:
            g2 = _explicit(uses, lo, hi, dtype, ws).square_()
            total += g2.sum((0, 2) if what == "rows" else (0, 1))
    return total


def one_position(a2: Tensor, b2: Tensor | None, what: str) -> Tensor:
    """``diag`` ``[o, i]``, ``rows`` ``[o]`` or ``cols`` ``[i]`` of an outer use with one position per
    unit, from its squared factors ``a²`` ``[N, o]`` and ``b²`` ``[N, i]``; of a vector use (``b2=None``):
    ``Σ_u a_u²`` ``[o]``.
    """
    if b2 is None:
        return a2.sum(0)
    if what == "diag":
        return a2.T @ b2
    return a2.T @ b2.sum(1) if what == "rows" else b2.T @ a2.sum(1)


def grouped(values: Tensor, plan: Plan) -> Tensor:
    """Row or column values ``[o]``/``[i]`` summed into ``plan``'s groups (values as they are for ``diag``)."""
    if plan.what == "diag" or plan.gid is None:
        return values
    return torch.zeros(plan.groups, dtype=values.dtype, device=values.device).index_add_(0, plan.gid, values)


def _projected(uses: list[Use], what: str, theta: Tensor, lo: int, hi: int, dtype: torch.dtype) -> Tensor:
    """``m_u`` ``[c, o]`` (rows) or ``[c, i]`` (cols): ``Σ_{i} θ ⊙ G_u`` along the other axis."""
    total = None
    for u in uses:
        if u.form == "vector":  # rows of a [d] layout: θ ⊙ Σ_p a_p
            m = u.a[lo:hi].to(dtype).sum(1) * theta
            total = m if total is None else total + m
            continue
        b = u.b(lo, hi).to(dtype)
        if u.form == "outer":
            a = u.a[lo:hi].to(dtype)
            m = (a * (b @ theta.T)).sum(1) if what == "mask_rows" else (b * (a @ theta)).sum(1)
        else:
            idx = u.a[lo:hi]
            keep = (idx >= 0).to(dtype)
            rows = theta[idx.clamp(min=0)]  # [c, P, i]
            if what == "mask_cols":
                m = (b * rows * keep[..., None]).sum(1)
            else:
                z = (b * rows).sum(-1) * keep  # [c, P]
                m = torch.zeros((hi - lo, u.size[0]), dtype=dtype, device=z.device)
                m.scatter_add_(1, idx.clamp(min=0), z)
        total = m if total is None else total + m
    return total


def accumulate(uses: list[Use], plan: Plan, dtype: torch.dtype, cap: int | None, ws: Workspace | None = None) -> Tensor:
    """Sum over units of one parameter's estimator (see the module docstring).

    Args:
        uses: the parameter's uses, all with the same units (first axis).
        plan: what to accumulate.
        dtype: accumulation dtype.
        cap: at most this many units per chunk (``None``: by memory only).
        ws: scratch space reused across chunks and parameters (``None``: fresh tensors).

    Returns:
        ``diag``: ``[*size]`` (the 2-D layout, or ``[d]``); the others: ``[groups]``, except
        ``mask``: the group value shape of ``plan.reduce``.

    """
    what = plan.what
    if what in ("diag", "rows", "cols"):
        return grouped(_squares(uses, what, dtype, cap, ws), plan)
    units = uses[0].a.shape[0]
    theta = plan.theta.to(dtype)
    if what == "mask":
        size = uses[0].size
        step = _chunk(units, 2 * int(torch.Size(size).numel()), cap)
        total = None
        for lo in range(0, units, step):
            hi = min(lo + step, units)
            weighted = (theta.reshape(size) * _explicit(uses, lo, hi, dtype)).reshape(hi - lo, *plan.shape)
            part = (vmap(plan.reduce)(weighted) ** 2).sum(0)
            total = part if total is None else total + part
        return total
    positions = sum(u.a.shape[1] for u in uses)
    width = sum(uses[0].size)  # o + i, or d for a vector
    step = _chunk(units, (positions + 1) * width, cap)
    total = torch.zeros(plan.groups, dtype=dtype, device=theta.device)
    for lo in range(0, units, step):
        hi = min(lo + step, units)
        m = _projected(uses, what, theta, lo, hi, dtype)
        sums = m if plan.gid is None else \
            torch.zeros((hi - lo, plan.groups), dtype=dtype, device=m.device).index_add_(1, plan.gid, m)
        total += (sums**2).sum(0)
    return total


def position_units(use_list: list[Use], probes: list[tuple[bool, Tensor, Tensor]], t: int) -> list[Use]:
    """Position mode: one unit per active position (``[N·T, 1]``, or ``[N·P, 1]`` for one use)."""
    out = []
    for u, (_, kept, pos) in zip(use_list, probes, strict=True):
        n, p = u.a.shape[:2]
        b = None if u.b is None else u.b(0, n)
        if len(use_list) == 1:
            flat = u.a.reshape(n * p, 1, *u.a.shape[2:])
            b = None if b is None else b.reshape(n * p, 1, -1)
        else:
            slot = (torch.arange(n, device=pos.device)[:, None] * t + pos)[kept]
            fill = -1 if u.form == "index" else 0
            flat = torch.full((n * t, *u.a.shape[2:]), fill, dtype=u.a.dtype, device=u.a.device)
            flat[slot] = u.a[kept]
            flat = flat[:, None]
            if b is not None:
                bb = torch.zeros((n * t, b.shape[-1]), dtype=b.dtype, device=b.device)
                bb[slot] = b[kept]
                b = bb[:, None]
        out.append(Use(u.form, flat, None if b is None else (lambda lo, hi, b=b: b[lo:hi]), u.size))
    return out


def make_plan(use_list: list[Use], request: Any, param: Tensor, dtype: torch.dtype) -> tuple[Plan, Callable | None]:
    """The accumulation for one parameter, and the reduction to apply to its result (if any).

    ``request`` has ``pattern`` (an einops ``sum`` pattern over the parameter, or ``None`` for the
    diagonal), ``sizes`` (its axis lengths) and ``mask``.
    """
    shape = tuple(param.shape)
    if request.pattern is None:
        return _DIAG, None
    if not request.mask:  # a pure function of the pattern and the shapes: cached
        return _group_plan(request.pattern, tuple(sorted(request.sizes.items())), shape, tuple(use_list[0].size),
                           param.device)
    groups = group_ids(request.pattern, dict(request.sizes), shape, use_list[0].size, param.device)
    theta = param.detach().to(dtype).reshape(use_list[0].size)  # mask importance: it weighs the gradient
    if groups is None:
        return Plan("mask", theta=theta, reduce=group_reduce(request.pattern, request.sizes), shape=shape), lambda v: v
    axis, gid, count, out_shape = groups
    return Plan("mask_" + axis, gid, count, theta), lambda v: v if v.shape == out_shape else v.reshape(out_shape)


_DIAG = Plan("diag")


@functools.lru_cache(maxsize=1024)
def _group_plan(pattern: str, sizes_items: tuple, shape: tuple[int, ...], size: tuple[int, ...],
                device: torch.device) -> tuple[Plan, Callable]:
    """:func:`make_plan` of a group sum (no mask): the plan and its post-processing."""
    groups = group_ids(pattern, dict(sizes_items), shape, size, device)
    if groups is None:
        reduce = group_reduce(pattern, dict(sizes_items))
        return _DIAG, lambda d: reduce(d.reshape(shape))
    axis, gid, count, out_shape = groups
    return Plan(axis, gid, count), lambda v: v if v.shape == out_shape else v.reshape(out_shape)


def group_reduce(pattern: str, sizes: Mapping[str, int]) -> Callable[[Tensor], Tensor]:
    """The group sum of an einops pattern, as a function of a parameter-shaped tensor."""
    return lambda x: einops.reduce(x, pattern, "sum", **sizes)


def _adjoint_ids(pattern: str, sizes: Mapping[str, int], shape: tuple[int, ...], device) -> tuple[Tensor, int, tuple]:
    """Each entry's group index: the adjoint of the group sum applied to the group indices."""
    names = ParsedExpression(pattern.split("->")[0]).identifiers
    reduce = group_reduce(pattern, {k: v for k, v in sizes.items() if k in names})
    out_shape = tuple(reduce(torch.empty(shape, device="meta")).shape)
    count = math.prod(out_shape)
    exact = torch.float32 if count < 1 << 24 else torch.float64  # group indices held exactly
    with torch.enable_grad():
        zero = torch.empty(shape, dtype=exact, device=device, requires_grad=True)
        ids = torch.arange(count, dtype=exact, device=device).reshape(out_shape)
        (gid,) = torch.autograd.grad(reduce(zero), zero, ids)
    return gid, count, out_shape


def _text(axes: Any) -> str:
    return "..." if axes == _ELLIPSIS else axes[0] if len(axes) == 1 else "(" + " ".join(axes) + ")"


def group_ids(pattern: str, sizes: dict[str, int], shape: tuple[int, ...], size: tuple[int, ...],
              device) -> tuple | None:
    """:func:`_group_ids`, cached: a pure function of the pattern, the shapes and the device; the ids are
    ``None`` where each row (column) is its own group, in order (per output channel).
    """
    found = _group_ids(pattern, tuple(sorted(sizes.items())), tuple(shape), tuple(size), torch.device(device))
    if found is None:
        return None
    axis, gid, count, out_shape, own = found
    return axis, None if own else gid, count, out_shape


@functools.lru_cache(maxsize=1024)
def _group_ids(pattern: str, sizes_items: tuple, shape: tuple[int, ...], size: tuple[int, ...],
               device: torch.device) -> tuple | None:
    """``("rows" | "cols", id per row/column, number of groups, group shape)``, or ``None`` where the
    groups are not unions of whole rows or columns of the ``[o, i]`` layout (rows: the first axis).

    Read from the pattern (the kept axes all in the first axis: rows; none of them: columns), and
    the ids from the group sum of the first axis alone (or of the others), so no tensor of the
    parameter's size is formed. The ids are read-only.
    """
    sizes = dict(sizes_items)
    lhs, rhs = pattern.split("->")
    try:
        left, right = ParsedExpression(lhs), ParsedExpression(rhs)
        first, kept = left.composition[0], set(right.identifiers)
    except (einops.EinopsError, IndexError):
        first, kept = None, set()
    simple = isinstance(first, list) and all(isinstance(a, str) for a in first)
    if len(size) == 1 or not simple:
        gid, count, out_shape = _adjoint_ids(pattern, sizes, shape, device)  # vectors, and the rare rest
        grid = gid.reshape(size[0], -1)
        if not bool((grid == grid[:, :1]).all()):
            return None
        return _ids("rows", grid[:, 0], count, out_shape)
    if kept <= set(first):
        return _ids("rows", *_adjoint_ids(f"{_text(first)} -> {rhs}", sizes, shape[:1], device))
    if not kept & set(first):
        rest = " ".join(_text(axes) for axes in left.composition[1:])
        return _ids("cols", *_adjoint_ids(f"{rest} -> {rhs}", sizes, shape[1:], device))
    return None


def _ids(axis: str, gid: Tensor, count: int, out_shape: tuple) -> tuple:
    """``(axis, ids, count, group shape, whether each row/column is its own group in order)``."""
    gid = gid.reshape(-1).long()
    own = count == gid.numel() and bool((gid == torch.arange(count, device=gid.device)).all())
    return axis, gid, count, out_shape, own


__all__ = ["BUDGET", "Plan", "Workspace", "accumulate", "group_ids", "group_reduce", "grouped", "make_plan",
           "one_position", "position_units"]

