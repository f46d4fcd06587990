"""Kronecker factors from tap factors: K-FAC's ``A`` and ``G`` from the same ``x``, ``g`` and masks
as the diagonal.

One call of a layer gives, per position ``p`` of sample ``n``, its input ``x_{n,p}`` (patches for a
convolution, a one-hot row for an Embedding) and the output gradient ``g_{n,p}`` of the backward's
output vector (:mod:`._tap_layers`). With ``x̃ = [x, 1]`` when the layer's bias joins its weight and
``m_{n,p} ∈ {0, 1}`` the mask of counted positions, the sums returned for one parameter are

=======  ======================================  ===========================================
mode     ``A`` (once, from the inputs), a mean   ``G`` (per output vector ``r``), a sum
=======  ======================================  ===========================================
expand   ``Σ_{n,p} m x̃ x̃ᵀ / Σ m``                ``Σ_{n,p} m g gᵀ``
reduce   ``Σ_n x̄_n x̄_nᵀ / M``, ``x̄_n`` the mean  ``Σ_n ĝ_n ĝ_nᵀ``, ``ĝ_n = Σ_p m g``
         of ``x̃`` over the counted positions,
         ``M`` the samples with one
=======  ======================================  ===========================================

summed over every call of the parameter (a module called twice, a weight tied between modules of
one kind: the calls are more positions of the weight-sharing axis). An Embedding's ``A`` is the
diagonal of token counts (its positions are separate look-ups: expand in either mode). The mask:
for a layer with as many positions as the targets (``P = T > 1``) position ``p`` counts when target
``p`` is active; otherwise all positions of a sample with an active target count.

``A`` is kept as its rows (:class:`~fisherfx._factor.LowRank`, ``A = (1/rows) Uᵀ U`` with ``U`` the
counted ``x̃`` or ``x̄``) where the request's ``a_form`` asks for it (:func:`~fisherfx._factor.chooses_low_rank`:
by default where the rows are at most half the inputs, for layers of 256 inputs or more): no
``i × i`` product is formed.

With ``basis = (Q_A, Q_G)`` (EKFAC) the sum is instead the diagonal of the per-unit gradients in
that eigenbasis, ``Σ_u (Q_Gᵀ G_u Q_A)²`` with ``G_u = Σ_p g x̃ᵀ`` (no mask: the gradient itself),
through the diagonal estimator of :mod:`._tap_estimators` on rotated inputs and gradients. A thin
``Q_A`` ``[i, k]`` (``k < i``, a low-rank ``A``) gets its complement too: the inputs become
``[x̃ Q_A, x̃ (I − Q_A Q_Aᵀ)]``, and the last ``i`` columns of the sums hold the complement's share of each
gradient (zero where every gradient lies in the span of ``A``'s rows).
"""

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _factor
from .._factor import LowRank
from ._tap_estimators import BUDGET, Plan, Workspace
from ._tap_estimators import accumulate as accumulate_diag
from ._tap_layers import Use

MODES = ("expand", "reduce")


class FactorRequest(NamedTuple):
    """K-FAC factors of one weight (or of a bias alone), for :class:`~.taps.Request`'s ``factors``.

    ``ones``: the inputs get a last entry of ones (the layer's bias joins its weight, or a bias alone);
    ``transposed``: the rows of the parameter's 2-D layout are the input side (HF ``Conv1D`` ``[i, o]``,
    ``Embedding`` ``[V, d]``); ``basis``: ``(Q_A or None, Q_G)`` for EKFAC's diagonal in that basis
    (``None``: ``A`` is diagonal, its basis the identity; ``Q_A`` ``[i, k]`` with ``k < i``: thin);
    ``a_form``: ``"auto"``, ``"dense"`` or ``"lowrank"`` (:func:`~fisherfx._factor.chooses_low_rank`);
    ``joined``: a bias whose column of ones is in its weight's ``A``: nothing is accumulated (the sum is a
    zero scalar), the request only finds out whether the taps serve the parameter.
    """

    mode: str = "expand"
    ones: bool = False
    transposed: bool = False
    basis: tuple[Tensor | None, Tensor] | None = None
    a_form: str = "auto"
    joined: bool = False


class FactorSums(NamedTuple):
    """The factors of one parameter (see the module docstring): ``A`` as a mean over its rows, ``G`` a sum."""

    A: "Tensor | LowRank"  # [i, i] (i counts the ones entry), its rows, or [V] token frequencies for an
    # Embedding: the mean over a_count
    a_count: Tensor  # shape=(), int64: the rows A averages over
    G: Tensor  # [o, o], summed over units and output vectors (not normalised)


class FactorPlan(NamedTuple):
    """What :func:`accumulate` adds per output vector, with ``A`` already summed."""

    request: FactorRequest
    mask: Callable[[int], Tensor]  # P -> [N, P] float mask of counted positions
    A: Tensor | None
    a_count: Tensor | None


def add(a: "Tensor | FactorSums", b: "Tensor | FactorSums", request: FactorRequest | None = None
        ) -> "Tensor | FactorSums":
    """The sum of two partial results of one parameter (tensors, or factor sums; two low-rank ``A`` stay low-rank
    where the request's ``a_form`` would keep the whole batch's rows).
    """
    if isinstance(a, FactorSums) and isinstance(b, FactorSums):
        rows = a.a_count + b.a_count
        weights = (float(a.a_count) / max(float(rows), 1.0), float(b.a_count) / max(float(rows), 1.0))
        low = None
        if isinstance(a.A, LowRank) and isinstance(b.A, LowRank):
            low = _factor.chooses_low_rank(request.a_form if request is not None else "auto",
                                           a.A.U.shape[0] + b.A.U.shape[0], a.A.U.shape[1])
        return FactorSums(_factor.weighted_sum([(a.A, weights[0]), (b.A, weights[1])], low), rows, a.G + b.G)
    if isinstance(a, FactorSums) or isinstance(b, FactorSums):  # a part whose parameter was unused: zeros
        return a if isinstance(a, FactorSums) else b
    return a + b


def _masker(active: Tensor) -> Callable[[int], Tensor]:
    n, t = active.shape
    per_sample = active.any(1)

    def mask(p: int) -> Tensor:
        if p == t and t > 1:
            return active.float()
        return per_sample[:, None].expand(n, p).float()

    return mask


def _sides(u: Use, transposed: bool, lo: int, hi: int) -> tuple[Tensor | None, Tensor]:
    """``(x [c, P, i] or None, g [c, P, o])`` of units ``lo:hi``; ``x`` is the index ``[c, P]`` for index uses."""
    if u.form == "vector":
        return None, u.a[lo:hi]
    if u.form == "index":
        return u.a[lo:hi], u.b(lo, hi)
    if transposed:
        return u.a[lo:hi], u.b(lo, hi)
    return u.b(lo, hi), u.a[lo:hi]


def _with_ones(x: Tensor | None, g: Tensor, ones: bool, dtype: torch.dtype) -> Tensor:
    """``x̃ = [x, 1]`` (or ``x``) in ``dtype``; a vector use (no ``x``) gives ``[c, P, 1]`` ones."""
    shape = (*g.shape[:2], 0)
    x = g.new_zeros(shape, dtype=dtype) if x is None else x.to(dtype)
    if ones:
        x = torch.cat([x, x.new_ones((*x.shape[:2], 1))], -1)
    return x


def _bordered(xx: Tensor, s: Tensor, count: float) -> Tensor:
    """``Σ x̃ x̃ᵀ`` for ``x̃ = [x, 1]`` from ``Σ x xᵀ``, ``Σ x`` and the number of rows (no copy of ``x``)."""
    out = xx.new_empty((xx.shape[0] + 1, xx.shape[0] + 1))
    out[:-1, :-1], out[:-1, -1], out[-1, :-1], out[-1, -1] = xx, s, s, count
    return out


def _step(units: int, per_unit: int) -> int:
    return max(1, min(units, BUDGET // max(per_unit, 1)))


def _input_moments(uses: list[Use], request: FactorRequest, mask: Callable[[int], Tensor],
                   dtype: torch.dtype) -> "tuple[Tensor | LowRank, Tensor]":
    """``(A, rows)``: the mean of ``x̃ x̃ᵀ`` (expand) or ``x̄ x̄ᵀ`` (reduce) over the ``rows`` counted, over all
    uses of the parameter (see the module docstring), or those rows (low-rank). The ``1/rows`` is applied
    inside the matrix products (no extra pass over a large ``A``).
    """
    units = uses[0].a.shape[0]
    masks = [mask(u.a.shape[1]) for u in uses]
    if uses[0].form == "index":  # Embedding: token frequencies among the counted positions (padding_idx: -1)
        counts = torch.zeros(uses[0].size[0], dtype=dtype, device=uses[0].a.device)
        rows = sum(int(m.sum()) for m in masks)
        for u, m in zip(uses, masks, strict=True):
            keep = (u.a >= 0) & (m > 0)
            counts.index_add_(0, u.a[keep], m[keep].to(dtype))
        return counts.div_(max(rows, 1)), torch.tensor(rows, dtype=torch.int64)
    width = 0 if uses[0].form == "vector" else uses[0].size[0 if request.transposed else 1]
    if request.mode == "reduce":
        return _reduced_moments(uses, request, masks, dtype, width + request.ones)
    rows = sum(int(m.sum()) for m in masks)
    if _factor.chooses_low_rank(request.a_form, rows, width + request.ones):
        return _input_rows(uses, request, masks, dtype, rows), torch.tensor(rows, dtype=torch.int64)
    alpha = 1.0 / max(rows, 1)
    # fewer rows than inputs: the column [x, 1] costs less than a bordered copy of A
    column = request.ones and sum(u.a.shape[0] * u.a.shape[1] for u in uses) < width
    xx = xs = None
    for m, full, lo, hi, p, x, g in _chunks(uses, masks, request, units):
        x = g.new_zeros((hi - lo, p, 0), dtype=dtype) if x is None else x.to(dtype)
        if not full:
            x = x * m[lo:hi, :, None].to(dtype)
        flat = x.reshape((hi - lo) * p, x.shape[-1])
        if column:
            flat = torch.cat([flat, m[lo:hi].reshape(-1, 1).to(dtype)], 1)
        if xx is None:
            xx = torch.addmm(flat.new_zeros(()), flat.T, flat, beta=0, alpha=alpha)
        else:
            xx.addmm_(flat.T, flat, alpha=alpha)
        if request.ones and not column:
            total = flat.sum(0) * alpha
            xs = total if xs is None else xs + total
    a = _bordered(xx, xs, float(rows > 0)) if request.ones and not column else xx
    return a, torch.tensor(rows, dtype=torch.int64)


def _chunks(uses: list[Use], masks: list[Tensor], request: FactorRequest,
            units: int) -> Iterator[tuple[Tensor, bool, int, int, int, Tensor | None, Tensor]]:
    """``(mask, every position counted, lo, hi, positions, x, g)`` of each use in chunks of units ``lo:hi``
    (``x``, ``g`` as :func:`_sides` gives them).
    """
    for u, m in zip(uses, masks, strict=True):
        p = u.a.shape[1]
        full = bool(m.all())
        step = _step(units, p * (sum(u.size) + 1))
        for lo in range(0, units, step):
            hi = min(lo + step, units)
            yield (m, full, lo, hi, p, *_sides(u, request.transposed, lo, hi))


def _input_rows(uses: list[Use], request: FactorRequest, masks: list[Tensor], dtype: torch.dtype,
                rows: int) -> LowRank:
    """Expand, low-rank: ``A = (1/rows) Uᵀ U`` with ``U`` the counted rows ``x̃`` of every use (a fresh tensor)."""
    parts = []
    for m, full, lo, hi, p, x, g in _chunks(uses, masks, request, uses[0].a.shape[0]):
        fresh = request.ones or not full or x is None or x.dtype != dtype  # else a view of the layer's input
        flat = _with_ones(x, g, request.ones, dtype).reshape((hi - lo) * p, -1)
        parts.append((flat if full else flat[m[lo:hi].reshape(-1) > 0], fresh))
    if len(parts) == 1 and parts[0][1]:
        return _factor.from_rows(parts[0][0], rows)  # no second copy
    return _factor.from_rows(torch.cat([part for part, _ in parts]), rows)


def _reduced_moments(uses: list[Use], request: FactorRequest, masks: list[Tensor],
                     dtype: torch.dtype, inputs: int) -> "tuple[Tensor | LowRank, Tensor]":
    """Reduce: ``(1/M) Σ_n x̄_n x̄_nᵀ`` over the ``M`` samples with a counted position (their rows ``x̄`` where
    the request's ``a_form`` chooses the low-rank form).
    """
    units = uses[0].a.shape[0]
    per_sample, weight = None, None  # Σ_p m x̃ per sample over all uses, and its counted positions
    for u, m in zip(uses, masks, strict=True):
        p = u.a.shape[1]
        step = _step(units, p * (sum(u.size) + 1))
        sums = []
        for lo in range(0, units, step):
            hi = min(lo + step, units)
            x, g = _sides(u, request.transposed, lo, hi)
            x = _with_ones(x, g, request.ones, dtype)
            sums.append((x * m[lo:hi, :, None].to(dtype)).sum(1))
        part = torch.cat(sums)
        per_sample = part if per_sample is None else per_sample + part
        weight = m.sum(1) if weight is None else weight + m.sum(1)
    keep = weight > 0
    xbar = per_sample[keep] / weight[keep, None].to(dtype)
    rows = int(keep.sum())
    if _factor.chooses_low_rank(request.a_form, rows, inputs):
        return _factor.from_rows(xbar, rows), torch.tensor(rows, dtype=torch.int64)
    a = torch.addmm(xbar.new_zeros(()), xbar.T, xbar, beta=0, alpha=1.0 / max(rows, 1))
    return a, torch.tensor(rows, dtype=torch.int64)


def make_plan(uses: list[Use], request: FactorRequest, dtype: torch.dtype,
              active: Tensor) -> tuple[FactorPlan, Callable]:
    """The factor accumulation of one parameter and its post-processing; sums ``A`` now (from the inputs).

    Args:
        uses: the parameter's uses in the first backward (every call of it).
        request: what to accumulate.
        dtype: accumulation dtype.
        active: ``[N, T]`` the batch's active positions.

    Returns:
        ``(plan, post)``: ``post`` turns the summed result of :func:`accumulate` into :class:`FactorSums`
        (or, with a basis, leaves the ``[rows, cols]`` diagonal sums as they are).

    """
    mask = _masker(active)
    if request.basis is not None or request.joined:
        return FactorPlan(request, mask, None, None), lambda d: d
    forms = {u.form for u in uses}
    if len(forms) > 1:
        raise RuntimeError(f"tap engine invariant broken: K-FAC factors of uses of forms {sorted(forms)} (please "
                           "report)")
    a, rows = _input_moments(uses, request, mask, dtype)

    def post(g: Tensor) -> FactorSums:
        if g.ndim == 0:  # no output vector reached the parameter: G = 0
            o = uses[0].size[1] if request.transposed or uses[0].form == "index" else uses[0].size[0]
            g = torch.zeros((o, o), dtype=dtype, device=uses[0].a.device)
        return FactorSums(a, rows, g)

    return FactorPlan(request, mask, a, rows), post


def _rotated(u: Use, request: FactorRequest, dtype: torch.dtype) -> Use:
    """``u`` with inputs ``x̃ Q_A`` and gradients ``g Q_G``: its per-unit gradient becomes ``Q_Gᵀ G_u Q_A``
    (transposed layouts: ``Q_Aᵀ G_u Q_G``).
    """
    qa, qg = request.basis
    qa = None if qa is None else qa.to(dtype)
    qg = qg.to(dtype)
    if u.form == "index":  # A diagonal: its eigenbasis is the identity
        return Use("index", u.a, lambda lo, hi: u.b(lo, hi).to(dtype) @ qg, u.size)
    n = u.a.shape[0]
    thin = qa.shape[1] < qa.shape[0]  # a low-rank A's thin basis: its complement's share as well

    def x_of(lo: int, hi: int) -> Tensor:
        x, g = _sides(u, request.transposed, lo, hi)
        x = _with_ones(x, g, request.ones, dtype)
        rotated = x @ qa
        return torch.cat([rotated, x - rotated @ qa.T], -1) if thin else rotated

    g = _sides(u, request.transposed, 0, n)[1].to(dtype) @ qg
    i = qa.shape[1] + (qa.shape[0] if thin else 0)
    if request.transposed:
        x = x_of(0, n)
        return Use("outer", x, lambda lo, hi: g[lo:hi], (i, g.shape[-1]))
    return Use("outer", g, x_of, (g.shape[-1], i))


def accumulate(uses: list[Use], plan: FactorPlan, dtype: torch.dtype, cap: int | None, ws: Workspace | None) -> Tensor:
    """One output vector's part: ``Σ g gᵀ`` (expand) or ``Σ_n ĝ ĝᵀ`` (reduce) ``[o, o]``; with a basis, the
    diagonal sums ``Σ_u (Q_Gᵀ G_u Q_A)²`` in the parameter's (joint) 2-D layout.
    """
    request = plan.request
    if request.joined:
        return torch.zeros((), dtype=dtype, device=uses[0].a.device)
    if request.basis is not None:
        return accumulate_diag([_rotated(u, request, dtype) for u in uses], Plan("diag"), dtype, cap, ws)
    units = uses[0].a.shape[0]
    reduce = request.mode == "reduce" and uses[0].form != "index"
    total, summed = None, None
    for u in uses:
        g = _sides(u, request.transposed, 0, units)[1].to(dtype)
        m = plan.mask(g.shape[1])
        if not bool(m.all()):
            g = g * m[..., None].to(dtype)
        if reduce:
            summed = g.sum(1) if summed is None else summed + g.sum(1)
            continue
        flat = g.reshape(-1, g.shape[-1])
        part = flat.T @ flat
        total = part if total is None else total + part
    return summed.T @ summed if reduce else total


class PositionSplit:
    """Output vectors ``[R, N, T, C]`` split into one vector per (active) position: ``R·T`` vectors
    ``[N, T, C]``, vector ``(r, t)`` equal to vector ``r`` at position ``t`` and zero elsewhere, formed
    one at a time (``.shape[0]`` and indexing are all the engine reads).

    For ``kind="exact"`` this makes K-FAC's ``G`` (and any square of pull-backs) the expectation over
    labels drawn independently per position, with no cross-position terms, for layers that mix positions too.
    """

    def __init__(self, vectors: Tensor, active: Tensor):
        self.vectors = vectors
        self.slots = [(r, t) for t in range(active.shape[1]) if bool(active[:, t].any())
                      for r in range(vectors.shape[0])]
        self.shape = (len(self.slots),)

    def __getitem__(self, j: int) -> Tensor:
        r, t = self.slots[j]
        out = torch.zeros_like(self.vectors[r])
        out[:, t] = self.vectors[r, :, t]
        return out


__all__ = ["MODES", "FactorPlan", "FactorRequest", "FactorSums", "PositionSplit", "accumulate", "add", "make_plan"]
