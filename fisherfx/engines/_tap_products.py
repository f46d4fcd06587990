"""Products with per-unit gradients from tap factors: ``∇ℓ_uᵀ v`` and ``Σ_u s_u ∇ℓ_u`` with no per-unit
gradient held for the whole batch.

The gradient of a parameter for unit ``u`` (a sample, or an active position) is a sum over its uses
(:class:`~._tap_layers.Use`) and their positions ``p`` of ``c_{u,p} = a_p b_pᵀ`` (outer, index) or
``a_p`` (vector). Both products the empirical and MC Fisher need are linear in those
contributions, so for ``K`` vectors ``V_k`` and unit weights ``s_{u,k}``

.. math::
    ∇ℓ_u^\\top v_k = \\sum_{\\text{uses}} \\sum_{p \\in u} \\langle c_{u,p}, V_k \\rangle, \\qquad
    \\sum_u s_{u,k} ∇ℓ_u = \\sum_{\\text{uses}} \\sum_{u, p \\in u} s_{u,k} \\, c_{u,p}

=======  ========================================  ============================================
form     ``⟨c_p, V_k⟩`` (all ``K`` at once)         ``Σ_p w_{p,k} c_p``
=======  ========================================  ============================================
outer    ``a_pᵀ V_k b_p``: ``b [V_1;…;V_K]ᵀ``, one  ``(w ⊙ a)ᵀ b``: one GEMM with ``K·o`` rows
         GEMM with ``K·o`` columns, then ``· a``
index    ``V_k[idx_p] · b_p`` (rows gathered)       ``index_add`` of ``w ⊗ b`` at ``idx``
vector   ``a_p · v_k``                              ``wᵀ a``
=======  ========================================  ============================================

(the ``outer`` products also in the transposed order, whichever temporary is smaller). Where the
units are samples and a matrix use has several positions (sequences, convolutions), the sums go
through the per-sample gradients ``G_n = Σ_p a_p b_pᵀ`` instead, formed a chunk of samples at a time as
the diagonal forms them: ``⟨G_n, V_k⟩`` and ``Σ_n w_{n,k} G_n`` are then one small product each for all
``K``, where the positions' products cost ``P`` times as much per vector. A layer position ``p``
belongs to unit ``(n, t)`` through the tap engine's canonical positions (per position), or to sample
``n`` (per sample). One forward and one activation-only backward per output vector give all of it: no
``jvp``, no per-vector backward.
"""

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from ._tap_estimators import BUDGET, _explicit
from ._tap_layers import Use

Units = tuple[Tensor | None, Tensor]  # (canonical positions [N, P] or None, the sample's slot [N])


def _through_samples(use: Use, k: int) -> bool:
    """Whether per-sample sums go through the per-sample gradients ``G_n = Σ_p a_p b_pᵀ`` (formed in chunks by
    :func:`._tap_estimators._explicit`, as the diagonal forms them): for a matrix use with several positions,
    ``G_n`` costs one weight gradient's products, after which each vector costs ``N·o·i`` instead of
    ``N·P·o·i``. A convolution's ``G_n`` (a weight gradient per sample) costs more than its own convolution
    and weight gradient of one vector: there only for ``K > 1`` (CNN workload, CPU: 2.2x a forward+backward for
    ``K = 8`` against 10.9x; 2.3x against 1.7x for one vector).
    """
    return use.form == "outer" and use.a.shape[1] > 1 and (use.grads is None or k > 1)


def _sample_grads(use: Use, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """``(lo, hi, G)`` with ``G`` ``[hi − lo, o·i]`` the per-sample gradients of samples ``lo:hi``."""
    units, width = use.a.shape[0], int(torch.Size(use.size).numel())
    step = max(1, min(units, BUDGET // max(width, 1)))
    for lo in range(0, units, step):
        hi = min(lo + step, units)
        yield lo, hi, _explicit([use], lo, hi, dtype).reshape(hi - lo, width)


def inner(use: Use, vectors: Tensor, dtype: torch.dtype, summed: bool = False) -> Tensor:
    """``⟨c_{n,p}, V_k⟩`` ``[N, P, K]`` for ``vectors`` ``[K, *size]`` (the use's 2-D layout); ``summed``: the
    sums over positions ``[N, 1, K]``.
    """
    k = vectors.shape[0]
    vectors = vectors.to(dtype)
    if summed and _through_samples(use, k):  # ⟨G_n, V_k⟩, all K in one product per chunk of samples
        flat = vectors.reshape(k, -1)
        return torch.cat([g @ flat.T for _, _, g in _sample_grads(use, dtype)])[:, None]
    if use.form == "vector":
        a = use.a.to(dtype)
        return (a.sum(1, keepdim=True) if summed else a) @ vectors.T
    if use.inner is not None:  # the layer's own (a convolution)
        return use.inner(vectors, summed).to(dtype)
    n, p = use.a.shape[:2]
    b = use.b(0, n).to(dtype)  # [N, P, i] (index: [N, P, d])
    if use.form == "index":
        idx = use.a
        rows = vectors[:, idx.clamp(min=0)] * (idx >= 0)[..., None].to(dtype)  # [K, N, P, d]
        return torch.einsum("knpd,npd->nk", rows, b)[:, None] if summed else torch.einsum("knpd,npd->npk", rows, b)
    a = use.a.to(dtype)  # [N, P, o]
    o, i = use.size
    if o <= i:  # b V_kᵀ: [N·P, K·o]
        other, proj = a, (b.reshape(n * p, i) @ vectors.reshape(k * o, i).T).view(n, p, k, o)
    else:  # a V_k: [N·P, K·i]
        other, proj = b, (a.reshape(n * p, o) @ vectors.transpose(0, 1).reshape(o, k * i)).view(n, p, k, i)
    return (proj * other[:, :, None, :]).sum((1, 3) if summed else 3).view(n, -1, k)


def weighted(use: Use, w: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_{n,p} w_{n,p,k} c_{n,p}`` ``[K, *size]`` for weights ``w`` ``[N, P, K]``, or ``[N, 1, K]`` for weights
    that are the same at every position of a sample.
    """
    n, _, k = w.shape
    w = w.to(dtype)
    if use.form == "vector":
        a = use.a.to(dtype)
        return torch.einsum("npk,npd->kd", w, a) if w.shape[1] > 1 else w[:, 0].T @ a.sum(1)
    if w.shape[1] == 1 and _through_samples(use, k):  # Σ_n w_{n,k} G_n, chunk by chunk
        total = None
        for lo, hi, g in _sample_grads(use, dtype):
            part = w[lo:hi, 0].T @ g
            total = part if total is None else total + part
        return total.reshape(k, *use.size)
    if use.weighted is not None:  # the layer's own (a convolution)
        return use.weighted(w).to(dtype)
    p = use.a.shape[1]
    b = use.b(0, n).to(dtype)
    w = w.expand(n, p, k)
    if use.form == "index":
        idx = use.a
        keep = idx >= 0
        rows, d = use.size
        out = torch.zeros((rows, k, d), dtype=dtype, device=b.device)
        out.index_add_(0, idx[keep], w[keep][:, :, None] * b[keep][:, None, :])
        return out.transpose(0, 1)
    a = use.a.to(dtype)
    o, i = use.size
    if o <= i:  # (w ⊙ a)ᵀ b: [K·o, i]
        wa = (w[..., None] * a[:, :, None, :]).reshape(n * p, k * o)
        return (wa.T @ b.reshape(n * p, i)).view(k, o, i)
    wb = (w[..., None] * b[:, :, None, :]).reshape(n * p, k * i)
    return (a.reshape(n * p, o).T @ wb).view(o, k, i).transpose(0, 1)


class Collected:
    """The tap engine's uses of every output vector (a :data:`~.taps.Consumer`), then the products.

    Args:
        n: samples of the batch.
        slots: ``1`` (units are samples) or ``T`` (units are positions: ``s`` is ``[..., N, T]``).
        draws: ``R``, the output vectors per unit (1, or the MC draws).
        active: ``[N, T]`` active positions (where a sample's one unit lies when the engine read
            per-sample uses and ``slots = T``: each sample then has at most one active position).
        dtype: the dtype the products are computed in.

    """

    def __init__(self, n: int, slots: int, draws: int, active: Tensor, dtype: torch.dtype):
        self.n, self.slots, self.r, self.dtype = n, slots, draws, dtype
        self.slot = active.to(torch.int8).argmax(1) if slots > 1 else torch.zeros(n, dtype=torch.long,
                                                                                    device=active.device)
        self.draws: dict[int, list[tuple[int, dict]]] = {}

    def __call__(self, offset: int, draw: int, uses: dict[str, list[tuple[Use, Tensor | None]]]) -> None:
        self.draws.setdefault(draw, []).append((offset, uses))

    def _units(self, offset: int, n: int, positions: Tensor | None) -> Tensor:
        """``[n, P]`` or ``[n, 1]`` flat index ``n · slots + t`` of each layer position's unit."""
        rows = torch.arange(offset, offset + n, device=self.slot.device)[:, None]
        t = self.slot[offset:offset + n, None] if positions is None else positions
        return rows * self.slots + t

    def inner(self, vectors: Mapping[str, Tensor], served: set[str]) -> Tensor:
        """``s`` ``[R, K, N, slots]``: each unit's ``∇ℓ_uᵀ v_k`` from the served parameters' uses,
        ``vectors`` ``{name: [K, *P]}``.
        """
        k = next(iter(vectors.values())).shape[0]
        s = torch.zeros((self.r, self.n * self.slots, k), dtype=self.dtype, device=self.slot.device)
        for r, offset, name, use, positions in self._served(served):
            part = inner(use, vectors[name].reshape(k, *use.size), self.dtype, positions is None)
            n = part.shape[0]  # part: [n, P or 1, K]
            index = self._units(offset, n, positions).expand(n, part.shape[1])
            s[r].index_add_(0, index.reshape(-1), part.reshape(-1, k))
        return s.view(self.r, self.n, self.slots, k).permute(0, 3, 1, 2)

    def weighted(self, s: Tensor, shapes: Mapping[str, torch.Size], served: set[str]) -> dict[str, Tensor]:
        """``{name: [K, *P]}``: ``Σ_r Σ_u s_{r,u,k} ∇ℓ_{r,u}`` over the served parameters, ``s`` as :meth:`inner`
        gives it.
        """
        draws, k = s.shape[:2]
        flat = s.permute(0, 2, 3, 1).reshape(draws, self.n * self.slots, k)
        out: dict[str, Tensor] = {}
        for r, offset, name, use, positions in self._served(served):
            w = flat[r][self._units(offset, use.a.shape[0], positions)]  # [n, P or 1, K]
            part = weighted(use, w, self.dtype).reshape(k, *shapes[name])
            out[name] = part if name not in out else out[name] + part
        return out

    def _served(self, served: set[str]) -> Iterator[tuple[int, int, str, Use, Tensor | None]]:
        """``(draw, offset, name, use, positions)`` of every collected use of a served parameter."""
        for r, parts in self.draws.items():
            for offset, uses in parts:
                for name, found in uses.items():
                    if name in served:
                        for use, positions in found:
                            yield r, offset, name, use, positions


__all__ = ["Collected", "inner", "weighted"]
