"""The generic engine: per-sample gradient vectors with ``vmap`` over ``vjp``, in chunks.

For each sample ``n`` the model is evaluated alone (``functional_call`` inside ``vmap``), the
estimator's output vectors ``U_n`` ``[J, T, C]`` are formed from its outputs (see
:mod:`.cotangents`), and their pull-backs ``J_nᵀ u`` come from one ``vjp`` vmapped over ``J``.
A *reducer* turns the ``{name: [J, *P]}`` vectors of one sample into what is kept (squares
summed over ``J`` for a diagonal, grouped projections for mask importance, the vectors themselves
for per-sample gradients), so no per-sample tensor outlives its chunk unless asked for.
Works for any module that ``torch.func`` can transform.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .._errors import FisherError
from .._tree import map_tensors
from ..problems import Prepared, Problem
from .cotangents import Kind, position_vectors, sample_vectors

Reducer = Callable[[dict[str, Tensor]], dict[str, Tensor]]

#: Default bound on one chunk's gradient vectors ``B·J·P`` (bytes), used when ``chunk_size=None``.
CHUNK_BYTES = 2**28


def auto_chunk(params: Mapping[str, Tensor], prepared: Prepared, kind: Kind, per: str, noise: Tensor | None,
               width: int) -> int:
    """Samples per chunk so that a chunk's ``[B, J, *P]`` vectors stay under :data:`CHUNK_BYTES`.

    ``width`` is ``C``, the outputs per position (``kind="exact"`` has ``T·C`` vectors per sample).
    """
    t = prepared.active.shape[1]
    if kind == "exact":
        j = t * width
    else:
        r = 1 if noise is None else noise.shape[0]
        j = r * t if per == "token" else r
    per_sample = j * sum(p.numel() * p.element_size() for p in params.values())
    return max(1, CHUNK_BYTES // max(per_sample, 1))


def _take(tree: Any, start: int, stop: int) -> Any:
    return map_tensors(lambda x: x[start:stop], tree)


def _translate(err: RuntimeError) -> FisherError | RuntimeError:
    """Turn the torch.func failures users trigger into the fix."""
    msg = str(err)
    if "randomness" in msg:
        return FisherError("generic engine: the model draws random numbers (dropout in train mode?); "
                           "call model.eval() before computing the Fisher")
    if ".item()" in msg or "data-dependent control flow" in msg or "Data-dependent" in msg:
        return FisherError("generic engine: the model's forward has data-dependent control flow "
                           "(a Python branch on tensor values or .item()), which vmap cannot trace; "
                           f"original error: {msg.splitlines()[0]}")
    if "batch_norm" in msg.lower() or "running_mean" in msg:
        return FisherError("generic engine: BatchNorm in train mode mixes samples; call model.eval()")
    return err


def map_samples(
    problem: Problem,
    params: Mapping[str, Tensor],
    prepared: Prepared,
    reduce: Reducer,
    *,
    kind: Kind,
    per: str,
    noise: Tensor | None,
    chunk_size: int | None,
    width: int,
    stack: bool = False,
) -> dict[str, Tensor]:
    """Apply ``reduce`` to each sample's gradient vectors and sum (or stack) over samples.

    Args:
        problem: the problem.
        params: ``{name: [*P]}``, the parameters differentiated.
        prepared: the batch, from ``problem.prepare``.
        reduce: ``{name: [J, *P]} -> {name: Tensor}`` for one sample.
        kind: ``"empirical" | "mc" | "exact"``.
        per: ``"sample" | "token"``.
        noise: ``[S, N, ...]`` for ``kind="mc"``, else ``None``.
        chunk_size: samples per ``vmap`` call (``None``: as many as keep one chunk's vectors
            under :data:`CHUNK_BYTES`, see :func:`auto_chunk`).
        width: ``C``, the model's outputs per position (sizes the default chunk).
        stack: stack the per-sample results ``[N, ...]`` instead of summing them.

    Returns:
        ``{name: Tensor}``, summed over samples (or stacked).

    """
    model, likelihood = problem.model, problem.likelihood
    buffers = dict(model.named_buffers())
    params = dict(params)

    def one(inputs, targets, active, z):
        inputs = map_tensors(lambda x: x[None], inputs)

        def outputs_of(p):
            return problem.forward(model, {**buffers, **p}, inputs)[0]  # [T, C]

        out, pull = vjp(outputs_of, params)
        u = position_vectors(likelihood, out, targets, active, kind, z)  # [R, T, C]
        u = sample_vectors(u, kind, per).to(out.dtype)  # [J, T, C]
        if u.shape[0] == 1:  # one vector (empirical or one MC draw per sample): no inner vmap
            (vectors,) = pull(u[0])
            vectors = {k: v[None] for k, v in vectors.items()}  # {name: [1, *P]}
        else:
            (vectors,) = vmap(pull)(u)  # {name: [J, *P]}
        return reduce(vectors), torch.isfinite(out).all()

    n = prepared.active.shape[0]
    step = auto_chunk(params, prepared, kind, per, noise, width) if chunk_size is None else chunk_size
    in_dims = (0, 0, 0, None if noise is None else 1)
    total: dict[str, Tensor] = {}
    parts: list[dict[str, Tensor]] = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = (_take(prepared.inputs, start, stop), prepared.targets[start:stop],
                 prepared.active[start:stop], None if noise is None else noise[:, start:stop])
        try:
            # torch.func's vjp ignores an outer no_grad; it only stops autograd from recording the
            # model's own parameters that are not in `params` (memory, and results that require grad)
            with torch.no_grad():
                result, finite = vmap(one, in_dims=in_dims)(*chunk)
        except RuntimeError as err:
            raise _translate(err) from err
        if not bool(finite.all()):
            bad = start + int((~finite).nonzero()[0, 0])
            raise FisherError(f"generic engine: the model's outputs for sample {bad} are not finite")
        if stack:
            parts.append(result)
        else:
            for name, value in result.items():
                value = value.sum(0)
                total[name] = total[name] + value if name in total else value
    if stack:
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return total
