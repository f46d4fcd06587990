"""Parameter-space vectors: ``{name: tensor}`` dicts shaped like ``params``, optionally with a leading
axis ``K`` on every entry (``K`` vectors at once).

The operator functions (:mod:`fisherfx.operators`), the solvers and spectra (:mod:`fisherfx.spectrum`)
and the metrics take and return such dicts. A vector is flattened in the order of ``params``, each
tensor row-major (:func:`flatten`), which is the order :func:`fisherfx.linear_operator` and the dense
references of :mod:`fisherfx.testing` use.

.. math::
    \\langle u, v \\rangle = \\sum_{\\text{name}} \\sum_i u_{\\text{name}, i} \\, v_{\\text{name}, i}
"""

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from ._errors import FisherError

Vector = dict[str, Tensor]


def check_vector(where: str, v: Mapping[str, Tensor], like: Mapping[str, Tensor], option: str = "v",
                 batched: bool | None = None) -> tuple[Vector, int | None]:
    """Check that ``v`` has the names and shapes of ``like``, with or without one leading axis ``K``.

    Args:
        where: the calling function, for messages.
        v: ``{name: [*P]}`` or ``{name: [K, *P]}`` (the same ``K`` for every name).
        like: ``{name: [*P]}``, the parameters.
        option: the argument's name, for messages.
        batched: ``True`` requires the leading axis, ``False`` forbids it, ``None`` accepts either.

    Returns:
        ``(dict(v) in the order of like, K or None)``.

    Raises:
        FisherError: not a dict, other names, other shapes, mixed ``K``, or a non-finite entry.

    """
    if not isinstance(v, Mapping):
        raise FisherError(f"{where}: {option} must be a {{name: tensor}} dict shaped like params, got "
                          f"{type(v).__name__}")
    missing, extra = [k for k in like if k not in v], [k for k in v if k not in like]
    if missing or extra:
        raise FisherError(f"{where}: {option} must have the names of params; missing {missing}, unexpected {extra}")
    k: int | None = None
    first: str | None = None
    for name, p in like.items():
        x = v[name]
        if not isinstance(x, Tensor):
            raise FisherError(f"{where}: {option}[{name!r}] must be a tensor, got {type(x).__name__}")
        shape, want = tuple(x.shape), tuple(p.shape)
        if shape == want and batched is not True:
            lead = None
        elif x.ndim == p.ndim + 1 and shape[1:] == want and batched is not False:
            lead = shape[0]
        else:
            expect = {None: f"{want} or [K, *{want}]", True: f"[K, *{want}]", False: f"{want}"}[batched]
            raise FisherError(f"{where}: {option}[{name!r}] has shape {shape}; expected {expect} (the shape of "
                              f"parameter {name!r})")
        if first is None:
            k, first = lead, name
        elif lead != k:
            raise FisherError(f"{where}: {option}[{name!r}] has leading axis {lead} but {option}[{first!r}] has {k}; "
                              "every entry needs the same number K of vectors (or none)")
        if not x.dtype.is_floating_point:
            raise FisherError(f"{where}: {option}[{name!r}] has dtype {x.dtype}; expected floating point")
    out = {name: v[name] for name in like}
    bad = non_finite(out)
    if bad is not None:
        raise FisherError(f"{where}: {option}[{bad!r}] holds inf or NaN")
    return out, k


def non_finite(v: Mapping[str, Tensor]) -> str | None:
    """The first name whose tensor holds inf or NaN, or ``None``.

    One reduction per tensor: a sum is finite only when every entry is (a sum that overflows is
    rechecked entry by entry).
    """
    for name, x in v.items():
        if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):
            return name
    return None


def flatten(values: Mapping[str, Tensor], like: Mapping[str, Tensor] | None = None) -> Tensor:
    """Concatenate ``{name: [*L, *P]}`` into ``[*L, D]``, ``D = Σ numel(P)``, in the order of ``like``.

    Args:
        values: tensors shaped like the parameters, with the same leading axes ``L`` each.
        like: ``{name: [*P]}`` giving the order and the parameter shapes (default: ``values``
            itself, with no leading axes).

    Returns:
        ``[*L, D]``.

    """
    like = values if like is None else like
    parts = []
    for name, p in like.items():
        v = values[name]
        lead = v.shape[: v.ndim - p.ndim]
        parts.append(v.reshape(*lead, p.numel()))
    return torch.cat(parts, dim=-1)


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Vector:
    """Inverse of :func:`flatten`: ``[*L, D]`` → ``{name: [*L, *P]}`` with the shapes of ``like``.

    Raises:
        FisherError: ``D`` differs from the total size of ``like``.

    """
    total = sum(p.numel() for p in like.values())
    if vector.shape[-1] != total:
        raise FisherError(f"unflatten: vector of length {vector.shape[-1]} does not fit parameters of total size "
                          f"{total}")
    out, start = {}, 0
    for name, p in like.items():
        out[name] = vector[..., start : start + p.numel()].reshape((*vector.shape[:-1], *p.shape))
        start += p.numel()
    return out


def dimension(like: Mapping[str, Tensor]) -> int:
    """``D``, the number of entries of a vector shaped like ``like``."""
    return sum(p.numel() for p in like.values())


def dot(u: Mapping[str, Tensor], v: Mapping[str, Tensor], like: Mapping[str, Tensor] | None = None) -> Tensor:
    """``⟨u, v⟩``: a scalar, or ``[*L]`` per leading index when ``like`` gives the parameter shapes.

    Args:
        u, v: vectors with the same names; their leading axes broadcast.
        like: ``{name: [*P]}``; without it every axis is summed.

    """
    if not u:
        raise FisherError("dot: empty vectors")
    total = None
    for name, a in u.items():
        prod = a * v[name]
        nd = prod.ndim if like is None else like[name].ndim
        part = prod.sum(dim=tuple(range(prod.ndim - nd, prod.ndim))) if nd else prod
        total = part if total is None else total + part
    return total


def add(u: Mapping[str, Tensor], v: Mapping[str, Tensor], alpha: float | Tensor = 1.0) -> Vector:
    """``u + α v`` entry by entry (``α`` a number or a tensor broadcasting against the entries)."""
    return {name: a + alpha * v[name] for name, a in u.items()}


def scale(v: Mapping[str, Tensor], alpha: float | Tensor) -> Vector:
    """``α v`` entry by entry."""
    return {name: alpha * a for name, a in v.items()}


def zeros_like(like: Mapping[str, Tensor], k: int | None = None, dtype: torch.dtype | None = None) -> Vector:
    """Zero vectors shaped like ``like`` (with a leading axis ``k`` when given)."""
    lead = () if k is None else (k,)
    return {name: torch.zeros(*lead, *p.shape, dtype=dtype or p.dtype, device=p.device) for name, p in like.items()}


def random_like(like: Mapping[str, Tensor], k: int | None = None, generator: torch.Generator | None = None,
                distribution: Literal["rademacher", "gaussian"] = "rademacher",
                dtype: torch.dtype | None = None) -> Vector:
    """Random vectors shaped like ``like``: Rademacher (±1 with equal probability) or standard Gaussian.

    The entries are drawn as one flat ``[*K, D]`` tensor in the order of ``like`` on the generator's
    device (CPU by default) and moved to each parameter's device, so a seed gives the same probes
    whatever the devices.
    """
    if distribution not in ("rademacher", "gaussian"):
        raise FisherError(f"random_like: distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    lead = () if k is None else (k,)
    first = next(iter(like.values()))
    dtype = dtype or first.dtype
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (*lead, dimension(like))
    if distribution == "gaussian":
        flat = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    else:
        flat = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype).mul_(2).sub_(1)
    return {name: t.to(p.device) for (name, p), t in zip(like.items(), unflatten(flat, like).values(), strict=True)}


__all__ = ["Vector", "add", "check_vector", "dimension", "dot", "flatten", "non_finite", "random_like", "scale",
           "unflatten", "zeros_like"]
