"""Fisher estimators: diagonal, group sums, mask importance, per-sample gradients.

Definitions (see ``docs/definitions.md``): with per-sample negative log-likelihood
``ℓ_n = −Σ_{t ∈ active(n)} log p(y_{n,t} | x_n, θ)``,

.. math::
    F = \\frac{1}{Z} \\sum_n \\nabla ℓ_n \\nabla ℓ_n^\\top

with the dataset's labels (``kind="empirical"``), labels drawn from the model and averaged over
``S`` draws (``kind="mc"``), or the expectation over labels in closed form ``Σ_n J_nᵀ H_n J_n``
(``kind="exact"``). ``per="token"`` uses each active position's ``∇ℓ_{n,t}`` as its own sample.
``Z`` is ``N`` (``normalize="samples"``), the number of active positions (``"tokens"``) or 1.
"""

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vmap

from ._errors import FisherError
from ._options import choice
from ._walk import ModelIndex, walk
from .engines import generic, taps
from .groups import Groups, check_groups, reduce_groups, some_names
from .problems import Prepared, Problem
from .state import Estimate, Provenance, cast, provenance
from .vectors import non_finite

Kind = Literal["empirical", "mc", "exact"]
Per = Literal["sample", "token"]
Normalize = Literal["samples", "tokens", "none"]
Engine = Literal["auto", "generic", "taps"]

KINDS = ("empirical", "mc", "exact")
PERS = ("sample", "token")
NORMALIZES = ("samples", "tokens", "none")
ENGINES = ("auto", "generic", "taps")
DTYPES = (torch.float32, torch.float64)


def check_options(where: str, kind: str, n_samples: int, per: str, normalize: str, engine: str,
                  dtype: torch.dtype, chunk_size: int | None = None) -> None:
    """Validate the shared estimator options at the API boundary."""
    choice(where, "kind", kind, KINDS)
    choice(where, "per", per, PERS)
    choice(where, "normalize", normalize, NORMALIZES)
    choice(where, "engine", engine, ENGINES)
    choice(where, "dtype", dtype, DTYPES)
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise FisherError(f"{where}: n_samples must be a positive integer, got {n_samples!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1):
        raise FisherError(f"{where}: chunk_size must be a positive integer or None, got {chunk_size!r}")


def check_params(where: str, problem: Problem, params: Mapping[str, Tensor], *, allow_empty: bool = False,
                 buffers: bool = False, index: ModelIndex | None = None) -> dict[str, Tensor]:
    """Known names, matching shapes, floating dtypes; returns ``dict(params)``.

    ``allow_empty``: ``{}`` is accepted (every value then comes from the module); ``buffers``: the
    model's buffers may be given too (a non-floating buffer keeps its dtype). ``index``: the model's
    :func:`~fisherfx._walk.walk`, when the caller has one.
    """
    if not isinstance(params, Mapping):
        raise FisherError(f"{where}: params must be a {'' if allow_empty else 'non-empty '}{{name: tensor}} dict, "
                          f"got {type(params).__name__}")
    if not params and not allow_empty:
        raise FisherError(f"{where}: params must be a non-empty {{name: tensor}} dict")
    model = problem.model
    index = walk(model) if index is None else index
    named = index.params
    own = {**named, **index.buffers} if buffers else named
    for name, p in params.items():
        if name not in own:
            raise FisherError(f"{where}: unknown parameter {name!r}; the model's parameters are "
                              f"{some_names(dict(model.named_parameters()))}")
        if not isinstance(p, Tensor):
            raise FisherError(f"{where}: parameter {name!r} must be a tensor, got {type(p).__name__}")
        if p.shape != own[name].shape:
            raise FisherError(f"{where}: parameter {name!r} has shape {tuple(p.shape)}, the model expects "
                              f"{tuple(own[name].shape)}")
        if own[name].dtype.is_floating_point and not p.dtype.is_floating_point:
            raise FisherError(f"{where}: parameter {name!r} has dtype {p.dtype}; expected floating point")
    return dict(params)


class Batch(NamedTuple):
    """A prepared batch with its MC noise and normaliser."""

    prepared: Prepared
    noise: Tensor | None  # [S, N, T(, C)] for kind="mc", zero at inactive positions
    count: Tensor  # shape=(), int64


def draw_noise(problem: Problem, prepared: Prepared, n_samples: int, generator: torch.Generator | None,
               n_active: int) -> Tensor:
    """The MC noise ``[S, N, T(, C)]``: drawn for the ``n_active`` active positions only, in row-major order.

    A sample's draws therefore depend on the generator and on the active positions before it, not
    on padding: padded positions and fully padded rows consume no random numbers, so the same data
    padded differently (or with padded rows anywhere) gets the same draws. Both engines use it.
    """
    active, targets = prepared.active, prepared.targets
    event = tuple(targets.shape[2:])  # Gaussian/Bernoulli: one number per output; Categorical: none
    # the likelihood draws for an outputs shape: Categorical drops its class axis, the others keep it
    flat = problem.likelihood.noise(torch.Size((n_active, *(event or (1,)))), n_samples, generator)
    flat = flat.to(active.device)
    if n_active == active.numel():  # every position active: the draws in row-major order already
        return flat.reshape(n_samples, *active.shape, *flat.shape[2:])
    full = torch.zeros((n_samples, *active.shape, *flat.shape[2:]), dtype=flat.dtype, device=active.device)
    full[:, active] = flat
    return full


def prepare_batch(where: str, problem: Problem, params: Mapping[str, Tensor], batch: Any, kind: str,
                  n_samples: int, generator: torch.Generator | None, normalize: str,
                  index: ModelIndex | None = None) -> Batch:
    """Split the batch, check it, draw the MC noise and count the normaliser.

    No forward runs here: the engines check the outputs against the targets on their own forward
    (:func:`check_outputs`). ``index``: the model's :func:`~fisherfx._walk.walk`, when the caller has one.
    """
    name = (walk(problem.model) if index is None else index).training_batchnorm
    if name is not None:
        raise FisherError(f"{where}: BatchNorm module {name!r} is in train mode, where it mixes samples and "
                          "updates its running statistics; call model.eval() before computing the Fisher")
    prepared = problem.prepare(batch)
    active = prepared.active
    n_active = int(active.sum())
    if n_active == 0:
        raise FisherError(f"{where}: the batch has no active position (all targets ignored or padded); "
                          "nothing to estimate")
    noise = draw_noise(problem, prepared, n_samples, generator, n_active) if kind == "mc" else None
    return Batch(prepared, noise, torch.scalar_tensor(normalizer(active, normalize, n_active), dtype=torch.int64))


def normalizer(active: Tensor, normalize: str, n_active: int | None = None) -> int:
    """``Z`` of one batch with active mask ``[N, T]``: ``N`` (``"samples"``), the active positions
    (``"tokens"``, ``n_active`` when already counted) or 1 (``"none"``).
    """
    if normalize == "samples":
        return active.shape[0]
    if normalize == "tokens":
        return int(active.sum()) if n_active is None else n_active
    return 1


def output_width(where: str, problem: Problem, params: Mapping[str, Tensor], prepared: Prepared) -> int:
    """``C`` from one sample's forward, with the outputs checked against the targets.

    Only for calls that the tap engine's batched forward did not check (engine="generic", or a
    model with no tapped layer); one sample costs ``1/N`` of a forward.
    """
    first = generic._take(prepared.inputs, 0, 1)
    device = prepared.active.device
    values = {**dict(problem.model.named_buffers()), **params}
    with torch.no_grad():
        out = taps.guarded_forward(where, problem, values, first, device, batch_inputs=prepared.inputs)
    n = prepared.active.shape[0]
    taps.check_outputs(where, problem, out.expand(n, *out.shape[1:]), prepared)  # messages with the batch's shapes
    return out.shape[-1]


def _finish(where: str, value: dict[str, Tensor], count: Tensor, storage_dtype, device,
            made: Provenance) -> Estimate:
    """The estimate from the engines' values (normalised by them), checked finite."""
    bad = non_finite(value)
    if bad is not None:
        raise FisherError(f"{where}: non-finite gradients for parameter {bad!r} (inf or NaN in the loss or the "
                          "model)")
    return _store(Estimate(value, count, made), storage_dtype, device)


def _store(est: Estimate, storage_dtype: torch.dtype | None, device) -> Estimate:
    return est if storage_dtype is None and device is None else cast(est, storage_dtype, device)


def _squares(dtype: torch.dtype):
    def reduce(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: (u := v.to(dtype)).mul_(u).sum(0) for k, v in vectors.items()}  # the vectors are not used again

    return reduce


def _fixing(problem: Problem, params: Mapping[str, Tensor], rest: Mapping[str, Tensor]) -> Problem:
    """``problem`` whose forward also uses the values in ``params`` that are not in ``rest``."""
    fixed = {k: v.detach() for k, v in params.items() if k not in rest}
    if not fixed:
        return problem

    def forward(model: nn.Module, values: Mapping[str, Tensor], inputs: Any) -> Tensor:
        return problem.forward(model, {**fixed, **values}, inputs)

    return problem._replace(forward=forward)


def _engines(where: str, problem: Problem, params: dict[str, Tensor], b: Batch, request: Any, reduce: Any, *,
             kind: str, per: str, engine: str, dtype: torch.dtype, chunk_size: int | None,
             names: list[str] | None = None, index: ModelIndex | None = None,
             scale: float = 1.0) -> dict[str, Tensor]:
    """Sums times ``scale``: the tap engine where it serves (``auto``, ``taps``), the generic for the rest.

    The model is evaluated at ``params``; the sums are for ``names`` (default: all of ``params``).
    ``request(name)`` is the tap engine's :class:`~fisherfx.engines.taps.Request`, ``reduce`` the
    generic engine's reducer of the same quantity. Both engines apply ``scale`` where they make their
    sums (a ``Linear``'s ``g²`` in the plain pass), so a normaliser costs no extra pass over the results.
    """
    names = list(params) if names is None else names
    sums: dict[str, Tensor] = {}
    width = None
    if engine != "generic":
        result = taps.estimate(problem, params, b.prepared, {k: request(k) for k in names}, kind=kind, per=per,
                               noise=b.noise, dtype=dtype, chunk_size=chunk_size, where=where, index=index,
                               scale=scale)
        if engine == "taps" and result.missing:
            raise taps.refusal(where, result.missing, "the generic engine")
        sums, width = result.sums, result.width
    rest = {k: params[k] for k in names if k not in sums}
    if width is None:  # the tap engine ran no forward: check the outputs on one sample
        width = output_width(where, problem, params, b.prepared)
    if rest:
        sums.update(generic.map_samples(_fixing(problem, params, rest), rest, b.prepared, reduce, kind=kind,
                                        per=per, noise=b.noise, chunk_size=chunk_size, width=width, where=where,
                                        scale=scale))
    return {k: sums[k] for k in names}


OPTIONS = ("kind", "n_samples", "generator", "per", "normalize", "engine", "dtype", "chunk_size", "storage_dtype",
           "device")


def _estimate(where: str, problem: Problem, params: Mapping[str, Tensor], batch: Any, names: list[str] | None,
              request: Any, make_reduce: Any, *, quantity: str = "diagonal", groups: Mapping[str, Any] | None = None,
              kind: Kind = "empirical", n_samples: int = 1,
              generator: torch.Generator | None = None, per: Per = "sample", normalize: Normalize = "samples",
              engine: Engine = "auto", dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
              storage_dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Estimate:
    """What every estimator does: validate, prepare the batch, run the engines, normalise, store.

    The model is evaluated at all of ``params``; ``names`` (default: all) are estimated, with
    ``request(name)`` for the tap engine and ``make_reduce(dtype, params)`` the generic engine's
    per-sample reducer of the same quantity; ``quantity`` and ``groups`` go into the provenance.
    """
    check_options(where, kind, n_samples, per, normalize, engine, dtype, chunk_size)
    index = walk(problem.model)
    params = check_params(where, problem, params, index=index)
    b = prepare_batch(where, problem, params, batch, kind, n_samples, generator, normalize, index=index)
    scale = (1.0 / n_samples if kind == "mc" else 1.0) / float(b.count)
    sums = _engines(where, problem, params, b, request, make_reduce(dtype, params), kind=kind, per=per,
                    engine=engine, dtype=dtype, chunk_size=chunk_size, names=names, index=index, scale=scale)
    made = provenance(quantity, kind=kind, per=per, normalize=normalize, n_samples=n_samples, dtype=dtype,
                      groups=groups, params=params)
    return _finish(where, sums, b.count, storage_dtype, device, made)


def diag_fisher(
    problem: Problem,
    params: Mapping[str, Tensor],
    batch: Any,
    kind: Kind = "empirical",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    per: Per = "sample",
    normalize: Normalize = "samples",
    engine: Engine = "auto",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    storage_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """Diagonal of the Fisher.

    .. math::
        \\operatorname{diag} F = \\frac{1}{Z} \\sum_n \\sum_j v_{n,j} \\odot v_{n,j}

    with ``v_{n,j}`` the gradient vectors of the chosen ``kind`` and ``per`` (``∇ℓ_n`` for the
    empirical per-sample Fisher, ``∇ℓ_n(ỹ^s)/√S`` for MC, ``J_{n,t}ᵀ S_{t,:,k}`` for exact).

    Args:
        problem: from :func:`supervised` or :func:`causal_lm`.
        params: ``{name: [*P]}``, the parameters to estimate (any subset of the model's).
        batch: a batch as ``problem`` reads it.
        kind: ``"empirical"`` (dataset labels), ``"mc"`` (labels drawn from the model) or
            ``"exact"`` (closed-form expectation; small models).
        n_samples: MC draws ``S`` per active position (``kind="mc"``).
        generator: seeds the MC draws; the same state gives the same result.
        per: ``"sample"`` (``∇ℓ_n``) or ``"token"`` (``∇ℓ_{n,t}``).
        normalize: ``Z`` = ``"samples"`` (N rows), ``"tokens"`` (active positions) or ``"none"`` (1).
        engine: ``"generic"`` (``vmap`` over per-sample ``vjp``, any model), ``"taps"`` (layer
            inputs and output gradients from batched passes, see :mod:`fisherfx.engines.taps`; raises
            for parameters it cannot serve) or ``"auto"`` (taps where they serve, generic for the rest).
        dtype: accumulation dtype, float32 or float64, whatever the model's dtype.
        chunk_size: gradient vectors per vectorised call of the generic engine, to bound memory
            (``None``: as many as fit in 64 MiB): whole samples when a sample has fewer (one per
            sample for the empirical per-sample Fisher, ``S`` for MC), else chunks of one sample's
            active positions (``per="token"``: one per position, ``kind="exact"``: ``C`` per
            position). In the tap engine it caps the samples per chunk of per-sample temporaries.
        storage_dtype: dtype of the returned values (e.g. ``torch.bfloat16``), default ``dtype``.
        device: device of the returned values (e.g. ``"cpu"`` to offload).

    Returns:
        :class:`Estimate` with ``value`` ``{name: [*P]}`` normalised by ``count`` = ``Z``.

    Raises:
        FisherError: bad options, unknown parameters, a batch with no active position, targets
            that do not fit the outputs, non-finite outputs or gradients.

    """
    return _estimate("diag_fisher", problem, params, batch, None, lambda k: taps.Request(),
                     lambda dtype, params: _squares(dtype), kind=kind, n_samples=n_samples, generator=generator,
                     per=per, normalize=normalize, engine=engine, dtype=dtype, chunk_size=chunk_size,
                     storage_dtype=storage_dtype, device=device)


def group_fisher(
    problem: Problem,
    params: Mapping[str, Tensor],
    batch: Any,
    groups: Groups,
    **options: Any,
) -> Estimate:
    """Group Fisher: the trace of each group's diagonal block.

    .. math::
        F_g = \\sum_{i \\in g} F_{ii}

    Args:
        problem, params, batch: as :func:`diag_fisher`.
        groups: ``{name: Group | pattern}`` (from :func:`channels`, :func:`heads`, … or custom);
            only these parameters are estimated.
        **options: the options of :func:`diag_fisher`.

    Returns:
        :class:`Estimate` with ``value`` ``{name: [G...]}`` (the group axes of each pattern).

    Raises:
        FisherError: as :func:`diag_fisher`, and a group pattern that does not fit its parameter.

    """
    where = "group_fisher"
    checked = check_groups(groups, params, where)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise FisherError(f"{where}: unknown options {unknown}; expected some of {list(OPTIONS)}")

    def grouped_squares(dtype: torch.dtype, params: dict[str, Tensor]):
        squares = _squares(dtype)
        return lambda vectors: reduce_groups(squares(vectors), {k: checked[k] for k in vectors})

    return _estimate(where, problem, params, batch, list(checked),
                     lambda k: taps.Request(checked[k].pattern, checked[k].sizes), grouped_squares,
                     quantity="group", groups=checked, **options)


def mask_importance(
    problem: Problem,
    params: Mapping[str, Tensor],
    batch: Any,
    groups: Groups,
    kind: Kind = "empirical",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    per: Per = "sample",
    normalize: Normalize = "samples",
    engine: Engine = "auto",
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
    storage_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Estimate:
    """Mask importance of each group (Liu et al. 2021): ``θ_gᵀ F θ_g``.

    .. math::
        I_g = \\frac{1}{Z} \\sum_n \\sum_j \\Big( \\sum_{i \\in g} θ_i \\, v_{n,j,i} \\Big)^2

    i.e. the Fisher of a multiplicative mask on the group, at mask 1; for the empirical Fisher it is
    twice the predicted loss increase of zeroing the group (second-order, at a minimum).

    Args:
        problem, params, batch, groups: as :func:`group_fisher`.
        kind, n_samples, generator, per, normalize, engine, dtype, chunk_size, storage_dtype, device: as
            :func:`diag_fisher`.

    Returns:
        :class:`Estimate` with ``value`` ``{name: [G...]}``.

    Raises:
        FisherError: as :func:`group_fisher`.

    """
    where = "mask_importance"
    checked = check_groups(groups, params, where)

    def masked_squares(dtype: torch.dtype, params: dict[str, Tensor]):
        def reduce(vectors: dict[str, Tensor]) -> dict[str, Tensor]:
            out = {}
            for name, v in vectors.items():
                projected = vmap(checked[name].reduce)(params[name].to(dtype) * v.to(dtype))  # [J, G...]
                out[name] = (projected**2).sum(0)
            return out

        return reduce

    return _estimate(where, problem, params, batch, list(checked),
                     lambda k: taps.Request(checked[k].pattern, checked[k].sizes, mask=True), masked_squares,
                     quantity="mask_importance", groups=checked, kind=kind, n_samples=n_samples, generator=generator,
                     per=per, normalize=normalize, engine=engine, dtype=dtype, chunk_size=chunk_size,
                     storage_dtype=storage_dtype, device=device)


def per_sample_grads(
    problem: Problem,
    params: Mapping[str, Tensor],
    batch: Any,
    per: Per = "sample",
    kind: Literal["empirical", "mc"] = "empirical",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Per-sample gradients of the unreduced negative log-likelihood.

    .. math::
        g_n = \\nabla_θ ℓ_n(θ) \\quad (\\text{or } \\nabla_θ ℓ_{n,t} \\text{ with } per="token")

    Args:
        problem, params, batch: as :func:`diag_fisher`.
        per: ``"sample"`` → ``{name: [N, *P]}``; ``"token"`` → ``{name: [N, T, *P]}`` (zero at
            inactive positions).
        kind: ``"empirical"`` (dataset labels) or ``"mc"`` (one label drawn from the model).
        generator: seeds the draw for ``kind="mc"``.
        chunk_size: gradient vectors per vectorised call (as :func:`diag_fisher`).

    Returns:
        ``{name: [N, *P]}`` or ``{name: [N, T, *P]}`` in the parameters' dtype.

    Raises:
        FisherError: as :func:`diag_fisher`.

    """
    where = "per_sample_grads"
    choice(where, "kind", kind, ("empirical", "mc"))
    check_options(where, kind, 1, per, "samples", "generic", torch.float32, chunk_size)
    params = check_params(where, problem, params)
    b = prepare_batch(where, problem, params, batch, kind, 1, generator, "samples")
    width = output_width(where, problem, params, b.prepared)
    grads = generic.map_samples(problem, params, b.prepared, dict, kind=kind, per=per, noise=b.noise, width=width,
                                chunk_size=chunk_size, stack=True, where=where)
    if per == "sample":
        return {k: v[:, 0] for k, v in grads.items()}
    return grads


__all__ = ["diag_fisher", "group_fisher", "mask_importance", "per_sample_grads"]
