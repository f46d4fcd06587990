"""Estimates over ranks: the all-reduce of sums and counts over ``torch.distributed``.

An estimate is ``value = S / Z`` with its sum ``S = Z · value`` and count ``Z``. Summing ``S`` and ``Z``
over ranks and dividing gives every rank ``Σ_r S_r / Σ_r Z_r``: the single-process estimate on the
concatenation of all ranks' data (for ``normalize="samples"`` or ``"tokens"``; with ``"none"`` the
count-weighted mean of the ranks', as :func:`~fisherfx.combine`). A :class:`~fisherfx.SumState` is
already sums and counts. A rank without data contributes a zero-count estimate (the result of
``collect`` over an empty shard, or any estimate of count 0): it adds nothing, and the result is
still exact. If no rank has data, every rank raises.

K-FAC factors (a ``KFAC`` from :func:`~fisherfx.kfac`) are reduced the same way: the sums ``A·a_count``
and ``a_count`` per layer, ``G·Z``, ``d·Z`` (the diagonals) and ``Z``, so that every rank gets
:func:`~fisherfx.kfac_combine` of all ranks' factors, the K-FAC of the concatenated data (eigendecompositions
are dropped, an EKFAC's eigenvalues with them). A rank without data passes factors of the same structure
with zero counts (``count`` and every layer's ``a_count`` 0): they add nothing. Besides names and shapes,
the ranks' layers, parameter shapes, mode and kind must agree.

A low-rank ``A`` (its rows, :class:`~fisherfx._factor.LowRank`; ranks may hold different numbers of rows) is
gathered rather than summed when every rank holds it low-rank and the rows of the ranks with data pay by the
rank rule of :mod:`fisherfx._factor` (``2 Σ r ≤ i``): each rank sends its ``r × i`` rows (padded to the
largest ``r``), and every rank gets the rows of all, weighted by ``a_count`` as :func:`~fisherfx.kfac_combine`
weighs them. Otherwise each rank densifies its ``A`` and the ``i × i`` sums are reduced as above.

An :class:`~fisherfx.EMAState` is refused: an EMA has no counts, and the mean of the ranks' EMAs is
the EMA of the ranks' mean estimates only when every rank has the same count at every step. Reduce
the estimate, then update: ``state = ema_update(state, all_reduce(estimate))``, the same on every rank.

Before any sum, the ranks exchange what they hold (type, names, shapes, dtypes, provenance) with
``all_gather_object``, so that ranks holding different things all raise the same
:class:`~fisherfx.FisherError` instead of hanging or summing garbage. With NCCL, set each rank's CUDA
device (``torch.cuda.set_device``) first, as ``all_gather_object`` requires; the values may be on the
CPU (they are moved to the GPU for the reduction and back).
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import _factor
from ._errors import FisherError
from ._factor import LowRank
from .state import NO_PROVENANCE, EMAState, Estimate, Provenance, SumState, merge_provenance

BUCKET_BYTES = 64 << 20  # tensors are reduced in flat buffers of about this size (fewer, larger messages)


class _Held(NamedTuple):
    """What one rank holds, exchanged before reducing."""

    type: str
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype)
    provenance: Provenance
    structure: Any = None  # K-FAC: layers' parameter names and orientation, parameter shapes, mode, kind
    rows: Any = None  # K-FAC: {layer: (rows of a low-rank A or None, a_count)}, which may differ between ranks


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise FisherError("all_reduce: torch.distributed is not initialised; call "
                          "torch.distributed.init_process_group first (torchrun sets up its environment)")
    return dist


def _device(dist: Any, group: Any, like: Tensor) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device


def _sum_buckets(dist: Any, group: Any, tensors: list[Tensor], device: torch.device) -> list[Tensor]:
    """``Σ_ranks`` of each tensor, in flat buffers of one dtype and about :data:`BUCKET_BYTES`."""
    out: list[Tensor | None] = [None] * len(tensors)
    order = sorted(range(len(tensors)), key=lambda i: str(tensors[i].dtype))  # the same order on every rank
    bucket: list[int] = []

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([tensors[i].reshape(-1).to(device) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket])):
            out[i] = part.reshape(tensors[i].shape)
        bucket.clear()

    size = 0
    for i in order:
        t = tensors[i]
        if bucket and (t.dtype != tensors[bucket[0]].dtype or size + t.numel() * t.element_size() > BUCKET_BYTES):
            flush()
            size = 0
        bucket.append(i)
        size += t.numel() * t.element_size()
    flush()
    return out  # type: ignore[return-value]


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _agree(dist: Any, group: Any, held: _Held) -> tuple[Provenance, list[_Held]]:
    """Every rank's ``_Held``; a FisherError on every rank if they differ, else the merged provenance (and what
    every rank holds).
    """
    world = dist.get_world_size(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, held, group=group)
    first = everyone[0]
    for rank, other in enumerate(everyone[1:], start=1):
        if other.type != first.type:
            raise FisherError(f"all_reduce: ranks hold different types: rank 0 a {first.type}, rank {rank} a "
                              f"{other.type}")
        if other.tensors != first.tensors:
            a, b = dict((n, (s, d)) for n, s, d in first.tensors), dict((n, (s, d)) for n, s, d in other.tensors)
            diff = sorted(set(a) ^ set(b))
            detail = (f"names only on one of them: {diff}" if diff else
                      "; ".join(f"{n!r}: shape {a[n][0]} {a[n][1]} on rank 0, {b[n][0]} {b[n][1]} on rank {rank}"
                                for n in a if a[n] != b[n]))
            raise FisherError(f"all_reduce: rank 0 and rank {rank} hold different parameters: {detail}")
    prov = first.provenance
    for rank, other in enumerate(everyone[1:], start=1):
        before = "rank 0" if rank == 1 else f"ranks 0 to {rank - 1}"
        prov = merge_provenance("all_reduce", prov, other.provenance, (before, f"rank {rank}"))
    for rank, other in enumerate(everyone[1:], start=1):  # K-FAC: after the provenance, as kfac_combine checks
        if other.structure != first.structure:
            a, b = first.structure, other.structure
            field = next(f for f in a if a[f] != b[f])
            raise FisherError(f"all_reduce: rank 0 and rank {rank} hold factors of different {field}: "
                              f"{a[field]!r} on rank 0, {b[field]!r} on rank {rank}")
    return prov, everyone


KFAC_TYPE = "fisherfx._kfac.KFAC"  # named, not imported: this module imports no engine


def _is_kfac(obj: Any) -> bool:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}" == KFAC_TYPE


def _gather_rows(dist: Any, group: Any, a: LowRank, weight: float, rows: list[int], device: torch.device,
                 everyone: list[int]) -> tuple[Tensor, Tensor]:
    """Every rank's rows ``U`` and weights ``w · a_count`` (padded to the largest ``r`` for ``all_gather``), of
    the ranks in ``everyone`` (those with data), concatenated in rank order (no rows, and no message, if none).
    """
    if not everyone or max(rows) == 0:  # the same on every rank
        return a.U[:0].clone(), a.weights[:0].clone()
    top = max(rows)
    u = torch.zeros((top, a.U.shape[1]), dtype=a.U.dtype, device=device)
    w = torch.zeros((top,), dtype=a.weights.dtype, device=device)
    u[: a.U.shape[0]], w[: a.U.shape[0]] = a.U.to(device), a.weights.to(device) * weight
    us, ws = [torch.empty_like(u) for _ in rows], [torch.empty_like(w) for _ in rows]
    dist.all_gather(us, u, group=group)
    dist.all_gather(ws, w, group=group)
    return (torch.cat([us[j][: rows[j]] for j in everyone]).to(a.U.device),
            torch.cat([ws[j][: rows[j]] for j in everyone]).to(a.U.device))


def _all_reduce_kfac(dist: Any, group: Any, fac: Any) -> Any:
    """:func:`~fisherfx.kfac_combine` of every rank's factors: ``Σ A·a_count / Σ a_count`` per layer (a low-rank
    ``A``'s rows gathered where they pay), ``Σ G·Z / Σ Z`` and ``Σ d·Z / Σ Z``, with ``Z`` the count.
    """
    layers, diagonal = fac.layers, fac.diagonal
    keys = list(layers)
    made = fac.provenance or NO_PROVENANCE
    made = made._replace(quantity="kfac") if made.quantity == "ekfac" else made  # the eigenvalues are dropped
    meta = [(f"{k}|A", _factor.shape(layers[k].A), str(_factor.dtype(layers[k].A))) for k in keys]
    meta += [(f"{k}|G", tuple(layers[k].G.shape), str(layers[k].G.dtype)) for k in keys]
    meta += [(f"{n}|diag", tuple(d.shape), str(d.dtype)) for n, d in diagonal.items()]
    structure = {"layers": {k: (tuple(layers[k].names), bool(layers[k].transposed)) for k in keys},
                 "parameters": {n: tuple(s) for n, s in fac.shapes.items()}, "mode": fac.mode, "kind": fac.kind}
    mine = {k: (layers[k].A.U.shape[0] if isinstance(layers[k].A, LowRank) else None, int(layers[k].a_count))
            for k in keys}
    prov, everyone = _agree(dist, group, _Held("KFAC", tuple(meta), made, structure, mine))
    count = fac.count.to(torch.int64).reshape(())
    rows = [layers[k].a_count.to(torch.int64).reshape(()) for k in keys]

    def gathers(k: str) -> bool:  # every rank low-rank, and the rows of the ranks with data pay
        held = [h.rows[k] for h in everyone]
        return (all(r is not None for r, _ in held)
                and _factor.pays(sum(r for r, c in held if c), _factor.size(layers[k].A)))

    gathered = {k for k in keys if gathers(k)}

    def weighted(t: Tensor, z: Tensor) -> Tensor:  # the sum, accumulated as kfac_combine's combine
        return t.to(_acc(t)) * z.to(device=t.device, dtype=_acc(t))

    sums = []
    for k, r in zip(keys, rows, strict=True):
        a = layers[k].A
        if k in gathered:  # its shift (0 for factors of data) is summed, its rows gathered below
            a = torch.tensor(a.shift, dtype=a.U.dtype, device=a.U.device)
        sums += [weighted(_factor.dense(a) if isinstance(a, LowRank) else a, r), weighted(layers[k].G, count)]
    sums += [weighted(d, count) for d in diagonal.values()]
    device = _device(dist, group, sums[0] if sums else count)
    counts = torch.stack([*rows, count]).to(device)
    *summed, totals = _sum_buckets(dist, group, [*sums, counts], device)
    total = totals[-1].to(fac.count.device)
    if int(total) == 0:
        raise FisherError("all_reduce: every rank's factors have count 0; no rank had data")

    def back(s: Tensor, z: Tensor, like: Tensor) -> Tensor:
        s = s / z.to(s) if int(z) else s  # no rows anywhere: zeros (nothing was averaged)
        return s.to(device=like.device, dtype=like.dtype)

    out_layers = {}
    for i, k in enumerate(keys):
        layer = layers[k]
        if k in gathered:
            held = [h.rows[k] for h in everyone]
            with_data = [j for j, (_, c) in enumerate(held) if c]
            u, w = _gather_rows(dist, group, layer.A, float(layer.a_count), [r for r, _ in held], device, with_data)
            z = float(totals[i]) or 1.0
            a = LowRank(u, w / z, float(summed[2 * i]) / z)
        else:
            like = layer.A.U if isinstance(layer.A, LowRank) else layer.A
            a = back(summed[2 * i], totals[i], like)
        out_layers[k] = layer._replace(A=a, G=back(summed[2 * i + 1], totals[-1], layer.G),
                                       a_count=totals[i].to(layer.a_count.device).reshape(()))
    rest = summed[2 * len(keys):]
    out_diagonal = {n: back(s, totals[-1], d) for (n, d), s in zip(diagonal.items(), rest, strict=True)}
    return fac._replace(layers=out_layers, diagonal=out_diagonal, count=total.reshape(()), eig=None,
                        provenance=prov)


def all_reduce(estimate_or_state: "Estimate | SumState", group: Any = None) -> "Estimate | SumState":
    """The estimate (or running sums) of all ranks' data together, on every rank.

    A collective: every rank of ``group`` calls it with an object of the same type, names and shapes
    (a rank without data passes a zero-count estimate, see the module docstring).

    Args:
        estimate_or_state: an :class:`~fisherfx.Estimate`, a :class:`~fisherfx.SumState` or K-FAC factors
            (``KFAC``; the result is :func:`~fisherfx.kfac_combine` of all ranks').
        group: a ``torch.distributed`` process group; default: the whole world.

    Returns:
        The same type: for an estimate ``Σ_r Z_r v_r / Σ_r Z_r`` with count ``Σ_r Z_r``, stored in the
        input's dtype and devices; for running sums the summed totals and counts. The provenance is the
        ranks' merged provenance.

    Raises:
        FisherError: an :class:`~fisherfx.EMAState` or another type, torch.distributed not initialised,
            ranks holding different types, names, shapes or dtypes, provenances that do not mix (another
            kind, per, normalize or group spec on some rank), or a total count of 0. Raised on every rank.

    """
    obj = estimate_or_state
    if isinstance(obj, EMAState):
        raise FisherError("all_reduce: an EMAState cannot be reduced exactly (an EMA keeps no counts); reduce the "
                          "estimate before the update, on every rank: state = ema_update(state, all_reduce(est))")
    if _is_kfac(obj):
        return _all_reduce_kfac(_dist(), group, obj)
    if not isinstance(obj, (Estimate, SumState)):
        what = "a dict (reduce each value in turn, in the same order on every rank)" if isinstance(obj, Mapping) \
            else type(obj).__name__
        raise FisherError(f"all_reduce: expected an Estimate, a SumState or a KFAC, got {what}")
    dist = _dist()
    values = obj.value if isinstance(obj, Estimate) else obj.total
    names = list(values)
    held = _Held(type(obj).__name__, tuple((n, tuple(values[n].shape), str(values[n].dtype)) for n in names),
                 obj.provenance or NO_PROVENANCE)
    prov, _ = _agree(dist, group, held)
    count = obj.count.to(torch.int64)
    if isinstance(obj, Estimate):  # S = Z · value, accumulated as diag_fisher accumulates
        sums = [values[n].to(_acc(values[n])) * count.to(_acc(values[n])).to(values[n].device) for n in names]
    else:
        sums = [values[n] for n in names]
    device = _device(dist, group, sums[0] if sums else count)
    *summed, total = _sum_buckets(dist, group, [*sums, count.reshape(1).to(device)], device)
    total = total.reshape(()).to(obj.count.device)
    if isinstance(obj, SumState):
        return SumState({n: s.to(values[n].device) for n, s in zip(names, summed)}, total, prov)
    if int(total) == 0:
        raise FisherError("all_reduce: every rank's estimate has count 0; no rank had data")
    value = {n: (s / total.to(s)).to(device=values[n].device, dtype=values[n].dtype) for n, s in zip(names, summed)}
    return Estimate(value, total, prov)


__all__ = ["all_reduce"]
