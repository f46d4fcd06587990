"""The generic engine: per-sample gradient vectors with ``vmap`` over ``vjp``, in chunks.

For each sample ``n`` the model is evaluated alone (``functional_call`` inside ``vmap``), the
estimator's output vectors ``U_n`` ``[J, T, C]`` are formed from its outputs (see
:mod:`.cotangents`), and their pull-backs ``J_nᵀ u`` come from ``vjp`` vmapped over a chunk of
``J``. A *reducer* turns a chunk of ``{name: [j, *P]}`` vectors of one sample into what is kept
(squares summed over ``j`` for a diagonal, grouped projections for mask importance, the vectors
themselves for per-sample gradients); reducers are additive over chunks of vectors, so no
per-sample tensor outlives its chunk unless asked for.

Memory is bounded by vectors, not samples: a vectorised call holds at most ``chunk_size`` (by
default as many as fit in :data:`CHUNK_BYTES`) gradient vectors: whole samples when a sample has
few vectors (``per="sample"``), chunks of one sample's positions otherwise (``per="token"``:
``T`` vectors per sample, ``kind="exact"``: ``T·C``). Works for any module that ``torch.func``
can transform.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp, vmap

from .._errors import FisherError
from .._tree import map_tensors
from ..problems import Prepared, Problem, forward_failure
from .cotangents import Kind, count_vectors, position_vectors, unit_vectors

Reducer = Callable[[dict[str, Tensor]], dict[str, Tensor]]

#: Default bound on the gradient vectors ``[b, j, *P]`` of one vectorised call (bytes).
CHUNK_BYTES = 2**26

#: A sample whose vectors take at least this many bytes is run alone, without ``vmap`` over samples
#: (nesting the vmap over its vectors inside one over samples is then slower than a loop).
ALONE_BYTES = 2**23

#: Seconds after which a long call shows a progress bar (tqdm, on stderr; ``TQDM_DISABLE=1`` turns it off).
PROGRESS_DELAY = 2.0

_NO_RULE = "There is a performance drop because we have not yet implemented the batching rule for "


def plan_chunks(params: Mapping[str, Tensor], j: int, chunk_size: int | None) -> tuple[int, int]:
    """``(samples per vectorised call, vectors per inner call)`` holding at most ``chunk_size``
    vectors (``None``: as many as fit in :data:`CHUNK_BYTES`), at least one.
    """
    per_vector = sum(p.numel() * p.element_size() for p in params.values())
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // max(per_vector, 1))
    if j > chunk_size:
        return 1, chunk_size
    if j > 1 and j * per_vector >= ALONE_BYTES:
        return 1, j
    return max(1, chunk_size // j), j


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


@contextlib.contextmanager
def batching_rule_note(where: str) -> Iterator[None]:
    """Replace torch's per-call "no batching rule" warnings by one fisherfx warning that says the fix.

    Other warnings pass through unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ops = []
    for w in caught:
        text = str(w.message)
        if text.startswith(_NO_RULE):
            ops.append(text[len(_NO_RULE):].split(".")[0].strip())
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if ops:
        warnings.warn(f"{where}: torch.func has no batching rule for {', '.join(sorted(set(ops)))}, so the generic "
                      "engine's vmap runs it sample by sample (slow, results are right). For HuggingFace attention, "
                      "build the model with attn_implementation='eager'; layers the tap engine serves avoid vmap "
                      "(engine='auto').", UserWarning, stacklevel=4)


def _progress(where: str, n: int, units: int) -> Any:
    """A tqdm bar over samples that appears only after :data:`PROGRESS_DELAY` seconds (``None``
    where tqdm is absent).
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=n, desc=f"{where} ({units} vjps/sample)", unit="sample", delay=PROGRESS_DELAY, leave=False)


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
    where: str = "generic engine",
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """Apply ``reduce`` to each sample's gradient vectors and sum (or stack) over samples.

    Args:
        problem: the problem.
        params: ``{name: [*P]}``, the parameters differentiated.
        prepared: the batch, from ``problem.prepare``.
        reduce: ``{name: [j, *P]} -> {name: Tensor}`` for a chunk of one sample's vectors, additive
            over chunks (or ``dict`` with ``stack=True``: the vectors themselves).
        kind: ``"empirical" | "mc" | "exact"``.
        per: ``"sample" | "token"``.
        noise: ``[S, N, ...]`` for ``kind="mc"``, else ``None``.
        chunk_size: gradient vectors per vectorised call (``None``: as many as fit in
            :data:`CHUNK_BYTES`, see :func:`plan_chunks`).
        width: ``C``, the model's outputs per position.
        stack: stack the per-sample results ``[N, J, ...]`` instead of summing them.
        where: the public function, for messages.
        scale: the sums come out multiplied by it.

    Returns:
        ``{name: Tensor}``, summed over samples (or stacked).

    """
    model, likelihood = problem.model, problem.likelihood
    buffers = dict(model.named_buffers())
    params = dict(params)
    j_total = count_vectors(1 if noise is None else noise.shape[0], prepared.active.shape[1], width, kind, per)
    step, inner = plan_chunks(params, j_total, chunk_size)

    by_position = (per == "token" or kind == "exact") and not stack  # stacked results keep every position

    def one(inputs, targets, active, z, positions=None):
        """One sample (inputs with their sample axis of 1): ``({name: reduced}, finite)``; a sample run
        alone gives its active ``positions``, and only theirs are pulled back (the others are zero).
        """

        def outputs_of(p):
            return problem.forward(model, {**buffers, **p}, inputs)[0]  # [T, C]

        out, pull = vjp(outputs_of, params)
        u = position_vectors(likelihood, out, targets, active, kind, z).to(out.dtype)  # [R, T, C]
        kept: dict[str, Tensor] | None = None
        parts = []
        j_here = j_total if positions is None else u.shape[0] * positions.numel()
        for lo in range(0, max(j_here, 1), inner):
            hi = min(lo + inner, j_here)
            uj = unit_vectors(u, kind, per, lo, hi, positions) if hi > lo else u[:1] * 0  # [j, T, C]
            if uj.shape[0] == 1:  # one vector (empirical or one MC draw per sample): no inner vmap
                (vectors,) = pull(uj[0])
                vectors = {k: v[None] for k, v in vectors.items()}  # {name: [1, *P]}
            else:
                (vectors,) = vmap(pull)(uj)  # {name: [j, *P]}
            part = reduce(vectors)
            del vectors, uj  # before the next chunk's vectors exist
            if stack:
                parts.append(part)
            else:
                kept = part if kept is None else {k: kept[k] + v for k, v in part.items()}
        if stack:
            kept = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if len(parts) > 1 else parts[0]
        return kept, torch.isfinite(out).all()

    n = prepared.active.shape[0]
    in_dims = (0, 0, 0, None if noise is None else 1)
    total: dict[str, Tensor] = {}
    pieces: list[dict[str, Tensor]] = []
    bar = _progress(where, n, j_total) if n > step or inner < j_total else None
    try:
        with batching_rule_note(where):
            for start in range(0, n, step):
                stop = min(start + step, n)
                chunk = (_take(prepared.inputs, start, stop), prepared.targets[start:stop],
                         prepared.active[start:stop], None if noise is None else noise[:, start:stop])
                try:
                    # torch.func's vjp ignores an outer no_grad; it only stops autograd from recording the
                    # model's own parameters that are not in `params` (memory, results that require grad)
                    with torch.no_grad():
                        if stop - start == 1:  # one sample per call (many vectors each): no vmap over samples
                            act = chunk[2][0]
                            result, finite = one(chunk[0], chunk[1][0], act, None if noise is None else chunk[3][:, 0],
                                                 act.nonzero()[:, 0] if by_position else None)
                            result, finite = {k: v[None] for k, v in result.items()}, finite[None]
                        else:
                            result, finite = vmap(one, in_dims=in_dims)(map_tensors(lambda x: x[:, None], chunk[0]),
                                                                        *chunk[1:])
                except FisherError:
                    raise
                except Exception as err:
                    translated = _translate(err) if isinstance(err, RuntimeError) else err
                    if translated is err:
                        translated = forward_failure(where, problem, params, prepared.inputs, err)
                    raise translated from err
                if not bool(finite.all()):
                    bad = start + int((~finite).nonzero()[0, 0])
                    raise FisherError(f"{where}: the model's outputs for sample {bad} are not finite")
                if stack:
                    pieces.append(result)
                else:
                    for name, value in result.items():
                        value = value.sum(0)
                        total[name] = total[name] + value if name in total else value
                if bar is not None:
                    bar.update(stop - start)
    finally:
        if bar is not None:
            bar.close()
    if stack:
        return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    return total if scale == 1.0 else {name: value.mul_(scale) for name, value in total.items()}
