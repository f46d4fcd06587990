"""One Kronecker factor in each of its forms, and what K-FAC's operations need of it.

K-FAC's input factor ``A`` (``i × i``, symmetric) is held in one of three forms:

* a dense ``[i, i]`` tensor;
* a ``[i]`` tensor, its diagonal (an Embedding's token frequencies);
* a :class:`LowRank` ``A = c I + Uᵀ diag(w) U`` with ``U`` ``[r, i]``: the ``r`` input rows a layer's ``A``
  averages over (``w = 1/r``, ``c = 0``) where they are fewer than its inputs, and the damped inverse of
  such a factor (``c > 0``, ``w < 0``), which has the same form.

.. math::
    A = c I + U^\\top \\operatorname{diag}(w)\\, U, \\qquad M A = c M + ((M U^\\top) \\odot w) U

**The rank rule.** A low-rank factor stays low-rank while ``2 r ≤ i``: then every operation on it costs
less than on the dense ``i × i`` matrix (a product ``M A`` ``2 o i r`` against ``o i²`` multiply-adds,
the eigenbasis ``3 i r²`` against ``≈ 4 i³``, the memory ``r i`` against ``i²``). Sums of low-rank
factors (:func:`weighted_sum`: :func:`~fisherfx.kfac_combine`, the factors' EMA, ``all_reduce``)
concatenate their rows and become dense once the rows stop paying.

Every function here is arithmetic on values: no engine, no state.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

A_FORMS = ("auto", "dense", "lowrank")
AUTO_MIN_INPUTS = 256  # below, a dense A is at most 256 KiB (float32) and costs microseconds: kept dense


class LowRank(NamedTuple):
    """``A = shift · I + Uᵀ diag(weights) U``, a symmetric ``i × i`` factor held by its ``r`` rows."""

    U: Tensor  # [r, i]
    weights: Tensor  # [r], U's dtype
    shift: float = 0.0


Factor = Tensor | LowRank  # [i, i] dense, [i] diagonal, or LowRank


def pays(rows: int, inputs: int) -> bool:
    """The rank rule: ``r`` rows of ``i`` inputs stay low-rank while ``2 r ≤ i``."""
    return 2 * rows <= inputs


def chooses_low_rank(a_form: str, rows: int, inputs: int) -> bool:
    """Whether a factor of ``rows`` rows over ``inputs`` inputs is kept low-rank under ``a_form``.

    ``"auto"``: where the rank rule pays and ``inputs ≥ AUTO_MIN_INPUTS``; ``"lowrank"``: always;
    ``"dense"``: never.
    """
    if a_form == "lowrank":
        return True
    return a_form == "auto" and inputs >= AUTO_MIN_INPUTS and pays(rows, inputs)


def from_rows(rows: Tensor, count: int) -> LowRank:
    """``A = (1/count) Σ_j x_j x_jᵀ`` over the rows ``x_j`` of ``rows`` ``[r, i]`` (a fresh tensor, kept as is)."""
    return LowRank(rows, rows.new_full((rows.shape[0],), 1.0 / max(count, 1)), 0.0)


def size(f: Factor) -> int:
    """``i``."""
    return f.U.shape[1] if isinstance(f, LowRank) else f.shape[0]


def shape(f: Factor) -> tuple[int, ...]:
    """``(i, i)`` for a matrix in either form, ``(i,)`` for a diagonal."""
    return (f.U.shape[1],) * 2 if isinstance(f, LowRank) else tuple(f.shape)


def dtype(f: Factor) -> torch.dtype:
    return f.U.dtype if isinstance(f, LowRank) else f.dtype


def tensors(f: Factor) -> list[Tensor]:
    """The tensors that hold ``f`` (for finiteness checks)."""
    return [f.U, f.weights] if isinstance(f, LowRank) else [f]


def dense(f: Factor) -> Tensor:
    """The ``[i, i]`` matrix (a diagonal becomes a diagonal matrix)."""
    if not isinstance(f, LowRank):
        return torch.diag(f) if f.ndim == 1 else f
    out = (f.U.T * f.weights) @ f.U
    if f.shift:
        out.diagonal().add_(f.shift)
    return out


def diagonal(f: Factor) -> Tensor:
    """``diag A`` ``[i]``: ``c + Σ_j w_j U_j²`` for a low-rank factor."""
    if isinstance(f, LowRank):
        return (f.U.square() * f.weights[:, None]).sum(0) + f.shift
    return f if f.ndim == 1 else f.diagonal()


def trace(f: Factor) -> float:
    return float(diagonal(f).sum())


def right(m: Tensor, f: Factor) -> Tensor:
    """``M A`` for ``M`` ``[..., o, i]``."""
    if isinstance(f, LowRank):
        out = ((m @ f.U.T) * f.weights) @ f.U
        return out.add_(m, alpha=f.shift) if f.shift else out
    return m * f if f.ndim == 1 else m @ f


def scaled(f: Factor, c: float) -> Factor:
    """``c A``."""
    if isinstance(f, LowRank):
        return LowRank(f.U, f.weights * c, f.shift * c)
    return f * c


def divided(f: Factor, c: float) -> Factor:
    """``A / c`` (a new value, also for ``c = 1``)."""
    if isinstance(f, LowRank):
        return LowRank(f.U.clone(), f.weights / c, f.shift / c)
    return f / c


def zeros_like(f: Factor) -> Factor:
    """``0`` in ``f``'s form (a low-rank factor: no rows), float32 unless ``f`` is float64."""
    kind = torch.float64 if dtype(f) == torch.float64 else torch.float32
    if isinstance(f, LowRank):
        return LowRank(f.U.new_zeros((0, f.U.shape[1]), dtype=kind), f.U.new_zeros((0,), dtype=kind), 0.0)
    return torch.zeros(f.shape, dtype=kind, device=f.device)


def weighted_sum(parts: Sequence[tuple[Factor, float]], low_rank: bool | None = None) -> Factor:
    """``Σ c_j A_j`` (the parts' forms agree on diagonal or matrix): low-rank parts concatenate their rows
    (parts with ``c = 0`` left out) while the rank rule pays (``low_rank=None``), or whatever their rows
    (``True``); otherwise, with ``low_rank=False`` and with any dense part, dense.
    """
    first = parts[0][0]
    like = dtype(first)
    if not isinstance(first, LowRank) and first.ndim == 1:  # diagonals
        out = None
        for f, c in parts:
            out = c * f.to(like) if out is None else out + c * f.to(like)
        return out
    low = [(f, c) for f, c in parts if isinstance(f, LowRank)]
    full = [(f, c) for f, c in parts if not isinstance(f, LowRank)]
    i = size(first)
    kept = [(f, c) for f, c in low if c != 0 and f.U.shape[0]]
    rows = sum(f.U.shape[0] for f, _ in kept)
    shift = sum(c * f.shift for f, c in low)
    if not full and (pays(rows, i) if low_rank is None else low_rank):
        if not kept:
            return LowRank(first.U[:0].to(like), first.weights[:0].to(like), shift)
        return LowRank(torch.cat([f.U.to(like) for f, _ in kept]),
                       torch.cat([f.weights.to(like) * c for f, c in kept]), shift)
    out = None
    if kept:  # Σ c Uᵀ diag(w) U as one product, added to the dense parts' sum (β m in an EMA: in the same product)
        u = kept[0][0].U.to(like) if len(kept) == 1 else torch.cat([f.U.to(like) for f, _ in kept])
        w = torch.cat([f.weights.to(like) * c for f, c in kept])
        uniform = bool((w == w[0]).all())  # the rows of one batch: a scalar instead of a scaled copy of U
        left, alpha = (u.T, float(w[0])) if uniform else (u.T * w, 1.0)
        (base, beta), *others = full or [(u.new_zeros(()), 0.0)]
        out = torch.addmm(base.to(like), left, u, beta=beta, alpha=alpha)
        for f, c in others:
            out.add_(f.to(like), alpha=c)
    for f, c in ([] if kept else full):
        out = c * f.to(like) if out is None else out + c * f.to(like)
    if out is None:
        out = torch.zeros((i, i), dtype=like, device=first.U.device)
    if shift:
        out.diagonal().add_(shift)
    return out


class Eig(NamedTuple):
    """``A = Q diag(values) Qᵀ + rest (I − Q Qᵀ)``: ascending ``values`` ``[k]`` on the orthonormal columns
    of ``vectors`` ``[i, k]`` (``None``: ``A`` diagonal, ``Q = I``); ``rest`` the eigenvalue of the complement
    when ``k < i`` (``None``: the basis is complete).
    """

    values: Tensor
    vectors: Tensor | None
    rest: Tensor | None = None


def eig(f: Factor) -> Eig:
    """The eigendecomposition of ``f`` in its own dtype: a dense ``eigh``; for a low-rank factor the thin
    basis of its rows (``Uᵀ = Q R``, then the ``k × k`` ``eigh`` of ``R diag(w) Rᵀ``, ``k = min(r, i)``; both in
    float64, then stored in ``f``'s dtype) and its shift on the complement.
    """
    if not isinstance(f, LowRank):
        if f.ndim == 1:
            return Eig(f, None)
        values, vectors = torch.linalg.eigh(f)
        return Eig(values, vectors)
    r, i = f.U.shape
    rest = f.U.new_full((), f.shift)
    if r == 0:
        return Eig(f.U.new_zeros((0,)), f.U.new_zeros((i, 0)), rest)
    # in float64: rows repeated over EMA updates (or dead units) make U very rank-deficient, where a float32
    # Householder QR slows down ~10× (denormal numbers) and a float32 eigh can fail to converge
    q, t = torch.linalg.qr(f.U.T.to(torch.float64))  # [i, k], [k, r]
    s = (t * f.weights.to(torch.float64)) @ t.T
    values, w = torch.linalg.eigh((s + s.T) / 2)
    kind = f.U.dtype
    return Eig((values + f.shift).to(kind), (q @ w).to(kind), rest if q.shape[1] < i else None)


def damped_inverse(f: Factor, shift: float, e: Eig | None = None) -> Factor:
    """``(A + shift I)⁻¹`` in ``A``'s form (``shift > 0``): from ``e`` (:func:`eig`) when given, else a
    Cholesky factorisation for a dense ``A`` (an ``eigh`` if that fails) and the thin eigenbasis for a
    low-rank one, whose inverse is low-rank again: ``Q diag(1/(λ + s) − t) Qᵀ + t I``, ``t = 1/(c + s)``.
    """
    if not isinstance(f, LowRank) and f.ndim == 1:
        return 1.0 / (f + shift)
    if e is None and not isinstance(f, LowRank):
        chol, info = torch.linalg.cholesky_ex(f + shift * torch.eye(f.shape[0], dtype=f.dtype, device=f.device))
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
    e = eig(f) if e is None else e
    inverse = 1.0 / (e.values + shift)
    q = e.vectors
    if e.rest is None:
        return (q * inverse) @ q.T
    t = 1.0 / (float(e.rest) + shift)
    if pays(q.shape[1], q.shape[0]):
        return LowRank(q.T.contiguous(), inverse - t, t)
    out = (q * (inverse - t)) @ q.T
    out.diagonal().add_(t)
    return out


__all__ = ["A_FORMS", "AUTO_MIN_INPUTS", "Eig", "Factor", "LowRank", "chooses_low_rank", "damped_inverse", "dense",
           "diagonal", "divided", "dtype", "eig", "from_rows", "pays", "right", "scaled", "shape", "size", "tensors",
           "trace", "weighted_sum", "zeros_like"]
