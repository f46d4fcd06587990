"""K-FAC and EKFAC: Kronecker-factored curvature per layer, with masks, Embeddings and tied weights.

For a weight ``W ∈ R^{o×i}`` (its bias as an extra input of ones) K-FAC approximates the layer's
block of the Fisher ``F = (1/Z) Σ_n E[∇ℓ_n ∇ℓ_nᵀ]`` (see :mod:`fisherfx.fisher`) by

.. math::
    F_W \\approx G \\otimes A, \\qquad
    A = \\frac{1}{M} \\sum_{(n,p)} \\tilde x_{n,p} \\tilde x_{n,p}^\\top, \\qquad
    G = \\frac{1}{Z} \\sum_{n} \\sum_{p} g_{n,p} g_{n,p}^\\top

(``mode="expand"``; ``mode="reduce"`` uses the per-sample mean of ``x̃`` over positions in ``A``, over
``M`` samples, and the per-sample sum of ``g`` in ``G``; Eschenhagen et al. 2023), with ``vec``
row-major, so that the product with a weight-shaped ``V`` is ``G V A``. ``g`` is the output
gradient of the estimator's output vectors (``kind``): the dataset's labels (empirical), ``S``
labels drawn from the model (mc, ``G`` averaged over the draws) or the columns of the output
Hessian's square root, one position at a time (exact: the expectation over labels, no
cross-position terms). Inactive positions (padding, ``ignore_index``) count in neither factor.
The factors come from the tap engine's ``x`` and ``g`` (:mod:`fisherfx.engines._tap_kfac`); the
scaling equals curvlinops' ``KFACLinearOperator`` for the same mean-reduced loss.

Where the rows ``A`` averages over are fewer than its inputs, ``A`` is kept as those rows
(:class:`~fisherfx._factor.LowRank`, ``A = (1/M) Uᵀ U``) and every operation uses them exactly, without
the ``i × i`` matrix (``a_form``; :mod:`fisherfx._factor` for the rule).

Layers: ``Linear``, ``Conv1d``/``Conv2d`` (KFC: unfolded patches, positions = output pixels), HF
``Conv1D`` (weight ``[i, o]``: ``F ≈ A ⊗ G``, product ``A V G``), ``Embedding`` (``A`` diagonal: token
frequencies, always expand). A parameter no layer covers (norm weights and biases, weights shared
by layers of different kinds such as GPT-2's tied ``wte``/``lm_head``, anything the taps cannot serve)
keeps its exact diagonal (:func:`~fisherfx.diag_fisher` of the same kind, same batch), so every
operation covers every parameter. See ``docs/kfac.md`` for the choices and their reasons.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from . import _factor, fisher
from ._errors import FisherError
from ._factor import A_FORMS, LowRank
from ._options import finite_number
from .engines import _tap_kfac as kfac_taps
from .engines import _tap_layers as tap_layers
from .engines import taps
from .problems import Problem
from .state import (
    NO_PROVENANCE,
    EMAState,
    Estimate,
    Provenance,
    combine,
    ema_init,
    ema_update,
    ema_value,
    merge_provenance,
    provenance,
)
from .vectors import Vector, check_vector, non_finite, unflatten

Mode = Literal["expand", "reduce"]
DampingKind = Literal["tikhonov", "pi"]
AForm = Literal["auto", "dense", "lowrank"]
KIND_NAMES = ("empirical", "mc", "exact")
NORMALIZES = ("samples", "tokens")
DAMPINGS = ("tikhonov", "pi")


class Factors(NamedTuple):
    """One layer's Kronecker factors (normalised).

    ``F ≈ G ⊗ A`` on the layer's 2-D layout ``[o, i]`` (weight rows, then a last column for the bias),
    or ``A ⊗ G`` on ``[i, o]`` when ``transposed`` (HF ``Conv1D``, whose bias is a last row; ``Embedding``
    ``[V, d]`` with ``A`` the diagonal ``[V]``). A bias alone (its weight tied elsewhere, or not asked
    for) is the layout ``[o, 1]`` with ``A = [[1]]``. ``A`` is a :class:`~fisherfx._factor.LowRank` (its rows)
    where they are fewer than its inputs (``kfac``'s ``a_form``).
    """

    names: tuple[str, ...]  # the parameters covered: (weight,), (weight, bias) or (bias,)
    A: Tensor | LowRank  # [i, i] inputs' second moment (ones entry last), LowRank (U [r, i]), or [V] (Embedding)
    G: Tensor  # [o, o] output gradients' second moment, divided by Z (and the MC draws)
    transposed: bool
    a_count: Tensor  # shape=(), int64: rows A averages over (positions for expand, samples for reduce)


class Eigenbasis(NamedTuple):
    """Eigendecompositions of one layer's factors (ascending), and EKFAC's eigenvalues if re-estimated.

    A low-rank ``A`` has a thin basis: ``a_vectors`` ``[i, k]`` with ``k < i`` orthonormal columns, and the
    eigenvalue ``a_rest`` on their complement (0 for the rows of a layer, none formed).
    """

    a_values: Tensor  # [k] (k = i unless thin)
    a_vectors: Tensor | None  # [i, k]; None: A is diagonal (its eigenbasis the identity)
    g_values: Tensor  # [o]
    g_vectors: Tensor  # [o, o]
    scale: Tensor | None = None  # EKFAC: [rows, cols] eigenvalues in the layout (k on A's side); None: products
    a_rest: Tensor | None = None  # shape=(): A's eigenvalue on the complement of a thin a_vectors; None: complete
    scale_rest: Tensor | None = None  # EKFAC, thin: [o] the eigenvalues on that complement (their mean over it)


class KFAC(NamedTuple):
    """K-FAC of a set of parameters: Kronecker factors per layer, diagonals for the rest."""

    layers: dict[str, Factors]  # keyed by the layer's first parameter name
    diagonal: dict[str, Tensor]  # {name: [*P]} for the parameters no layer covers
    count: Tensor  # shape=(), int64: the normaliser Z of G and of the diagonals
    shapes: dict[str, torch.Size]  # every parameter covered, in the order of params
    mode: str
    kind: str
    eig: dict[str, Eigenbasis] | None = None  # from kfac_eig / ekfac, keyed as layers
    # what the factors measure: quantity "kfac" (or "ekfac"), kind, per="sample", normalize, n_samples, dtype;
    # "unknown" for a KFAC built by hand. The mode is the field above (not repeated here).
    provenance: Provenance = NO_PROVENANCE


# --- which layers ---------------------------------------------------------------------------------

def _family(module: nn.Module, k: tap_layers.Kinds) -> str | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return "outer"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if k.conv1d is not None and isinstance(module, k.conv1d):
        return "transposed"
    return None  # norms: diagonal


TIED_KINDS = ("it is shared by layers of different kinds (e.g. an Embedding and a Linear head): no one Kronecker "
              "structure")


def _requests(model: nn.Module, names: list[str], mode: str,
              a_form: str = "auto") -> tuple[dict[str, taps.Request], dict[str, str], dict[str, str]]:
    """The tap request per name, ``{bias: weight}`` for the biases that join their weight's layer, and
    ``{name: why}`` for the parameters of K-FAC layers that get a diagonal by design.
    """
    k = tap_layers.kinds()
    own = dict(model.named_parameters(remove_duplicate=False))
    by_id = {id(own[n]): n for n in names}
    held: dict[str, list[tuple[nn.Module, str]]] = {n: [] for n in names}
    for module in model.modules():
        if tap_layers.supported(module, k):
            for attr in ("weight", "bias"):
                t = module._parameters.get(attr)
                if t is not None and id(t) in by_id:
                    held[by_id[id(t)]].append((module, attr))
    requests = {n: taps.Request() for n in names}
    joins: dict[str, str] = {}
    by_choice: dict[str, str] = {}
    for name, uses in held.items():
        families = {(_family(m, k), attr) for m, attr in uses}
        if len(families) != 1:
            if any(f is not None for f, _ in families):
                by_choice[name] = TIED_KINDS
            continue
        family, attr = families.pop()
        if family is None or (attr == "bias") != (own[name].ndim == 1):
            continue
        if attr == "weight":
            module = uses[0][0]
            bias = module._parameters.get("bias")
            bias_name = by_id.get(id(bias)) if bias is not None else None
            ones = (family != "embedding" and len(uses) == 1 and bias_name is not None
                    and held[bias_name] == [(module, "bias")])
            if ones:
                joins[bias_name] = name
            requests[name] = taps.Request(factors=kfac_taps.FactorRequest(
                "expand" if family == "embedding" else mode, ones, family != "outer", a_form=a_form))
    for name, uses in held.items():
        if name not in joins and uses and all(attr == "bias" and _family(m, k) in ("outer", "transposed")
                                              for m, attr in uses):
            requests[name] = taps.Request(factors=kfac_taps.FactorRequest(mode, True, a_form=a_form))
    for bias in joins:  # its column of ones is in its weight's A: the taps only find out whether they serve it
        requests[bias] = taps.Request(factors=kfac_taps.FactorRequest(mode, joined=True))
    return requests, joins, by_choice


def _squares(dtype: torch.dtype):
    return lambda vectors: {name: v.to(dtype).square().sum(0) for name, v in vectors.items()}


def _check_options(where: str, kind: str, mode: str, n_samples: int, normalize: str, dtype: torch.dtype,
                   engine: str, a_form: str = "auto") -> None:
    fisher.check_options(where, kind, n_samples, "sample", normalize, "auto", dtype)
    for option, value, allowed in (("mode", mode, kfac_taps.MODES), ("normalize", normalize, NORMALIZES),
                                   ("engine", engine, ("auto", "taps")), ("a_form", a_form, A_FORMS)):
        if value not in allowed:
            raise FisherError(f"{where}: {option} must be one of {list(allowed)}, got {value!r}")


def kfac(problem: Problem, params: Mapping[str, Tensor], batch: Any, kind: str = "empirical", mode: Mode = "expand",
         n_samples: int = 1, generator: torch.Generator | None = None, normalize: str = "samples",
         dtype: torch.dtype = torch.float32, engine: str = "auto", chunk_size: int | None = None,
         a_form: AForm = "auto") -> KFAC:
    """K-FAC factors of ``params`` on one batch (see the module docstring for the definitions).

    Args:
        problem: from :func:`~fisherfx.supervised` or :func:`~fisherfx.causal_lm`.
        params: ``{name: [*P]}``, the parameters (the model is evaluated at them).
        batch: one batch as ``problem`` reads it.
        kind: ``"empirical"``, ``"mc"`` (``n_samples`` draws per active position) or ``"exact"``.
        mode: ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023) for weight-sharing axes (tokens,
            pixels, the calls of a module called several times).
        n_samples: MC draws ``S``.
        generator: seeds the MC draws; the same state gives the same factors.
        normalize: ``Z`` = ``"samples"`` (N) or ``"tokens"`` (active positions) for ``G`` and the diagonals.
        dtype: accumulation dtype (float32 or float64).
        engine: ``"auto"`` (parameters without factors get their diagonal) or ``"taps"`` (raise for them).
        chunk_size: as :func:`~fisherfx.diag_fisher` (the generic engine's diagonals).
        a_form: how each ``A`` is held: ``"auto"`` (its rows, a :class:`~fisherfx._factor.LowRank`, where they
            are at most half its inputs and the inputs are 256 or more; else dense), ``"dense"`` (always the
            ``i × i`` matrix) or ``"lowrank"`` (always its rows). Every operation gives the same result to
            rounding either way; an Embedding's ``A`` is diagonal in every form.

    Returns:
        :class:`KFAC`.

    Raises:
        FisherError: bad options or parameters, a batch with no active position, targets that do not
            fit the outputs, non-finite factors, or (``engine="taps"``) parameters without factors.

    """
    where = "kfac"
    _check_options(where, kind, mode, n_samples, normalize, dtype, engine, a_form)
    params = fisher.check_params(where, problem, params)
    b = fisher.prepare_batch(where, problem, params, batch, kind, n_samples, generator, normalize)
    requests, joins, by_choice = _requests(problem.model, list(params), mode, a_form)
    result = taps.estimate(problem, params, b.prepared, requests, kind=kind, per="sample", noise=b.noise, dtype=dtype,
                           chunk_size=chunk_size, where=where, split_positions=kind == "exact")
    sums = dict(result.sums)
    joined = {bias: weight for bias, weight in joins.items()  # a bias joins when both it and its weight are served
              if bias in sums and isinstance(sums.get(weight), kfac_taps.FactorSums)}
    if engine == "taps":
        strict = {**by_choice, **result.missing}
        strict.update({bias: f"its weight {weight!r} has no factors" for bias, weight in joins.items()
                       if bias not in joined and bias not in strict})
        if strict:
            raise FisherError(f"{where}: engine='taps' has no Kronecker factors (or tap-engine diagonal) for "
                              + "; ".join(f"{n!r}: {why}" for n, why in strict.items())
                              + ". Use engine='auto' to give these their diagonal")
    for bias in joins.keys() - joined.keys():  # served, but its weight is not: its diagonal, from the generic engine
        sums.pop(bias, None)
    rest = [n for n in params if n not in sums]
    if rest:
        sums.update(fisher._engines(where, problem, params, b, lambda n: taps.Request(), _squares(dtype), kind=kind,
                                    per="sample", engine="generic", dtype=dtype, chunk_size=chunk_size, names=rest))
    draws = n_samples if kind == "mc" else 1
    z = float(b.count) * draws
    layers_: dict[str, Factors] = {}
    diagonal: dict[str, Tensor] = {}
    bias_of = {weight: bias for bias, weight in joins.items()}
    for name in params:
        s = sums[name]
        if name in joined:
            continue  # inside its weight's layer
        if not isinstance(s, kfac_taps.FactorSums):
            diagonal[name] = s / z
            continue
        a, rows, names = s.A, s.a_count, (name,)
        if name in bias_of:
            if bias_of[name] in joined:
                names = (name, bias_of[name])
            else:  # the bias could not be served: the weight alone (drop the ones entry)
                a = LowRank(a.U[:, :-1].contiguous(), a.weights, a.shift) if isinstance(a, LowRank) else a[:-1, :-1]
        # the engine's A is a mean already; its G a fresh sum, normalised in place
        layers_[name] = Factors(names, a, s.G.div_(z), requests[name].factors.transposed, rows)
    fac = KFAC(layers_, diagonal, b.count, {n: params[n].shape for n in params}, mode, kind,
               provenance=provenance("kfac", kind=kind, per="sample", normalize=normalize, n_samples=n_samples,
                                     dtype=dtype))
    _check_finite(where, fac)
    return fac


def _check_finite(where: str, fac: KFAC) -> None:
    """Raise for a non-finite factor or diagonal. A second moment's diagonal holds every non-finite entry's
    row (``|M_ij| ≤ (M_ii M_jj)^{1/2}``), so the diagonals are checked (not a pass over a large ``A``); a
    low-rank ``A`` by its rows.
    """
    probes = {}
    for key, layer in fac.layers.items():
        a = layer.A
        probes[key] = (a.U, layer.G.diagonal()) if isinstance(a, LowRank) else (_factor.diagonal(a), layer.G.diagonal())
    bad = non_finite({f"{key}\0{side}": t for key, pair in probes.items() for side, t in enumerate(pair)})
    if bad is not None:
        raise FisherError(f"{where}: non-finite Kronecker factors for layer {bad.split(chr(0))[0]!r} (inf or NaN in "
                          "the model)")
    bad = non_finite(fac.diagonal)
    if bad is not None:
        raise FisherError(f"{where}: non-finite diagonal for parameter {bad!r} (inf or NaN in the model)")


# --- layouts ---------------------------------------------------------------------------------------

def _join(layer: Factors, v: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> Tensor:
    """``{name: [*L, *P]}`` → the layer's 2-D layout ``[*L, rows, cols]``."""
    parts = []
    for name in layer.names:
        x, shape = v[name], shapes[name]
        lead = x.shape[: x.ndim - len(shape)]
        if len(shape) == 1:  # a bias: the ones column (row, transposed)
            parts.append(x[..., None, :] if layer.transposed else x[..., :, None])
        else:
            parts.append(x.reshape(*lead, shape[0], -1))
    return torch.cat(parts, -2 if layer.transposed else -1) if len(parts) > 1 else parts[0]


def _split(layer: Factors, m: Tensor, shapes: Mapping[str, torch.Size]) -> Vector:
    """Inverse of :func:`_join`."""
    lead = m.shape[:-2]
    if len(layer.names) == 1:
        return {layer.names[0]: m.reshape(*lead, *shapes[layer.names[0]])}
    weight, bias = layer.names
    if layer.transposed:
        return {weight: m[..., :-1, :].reshape(*lead, *shapes[weight]), bias: m[..., -1, :]}
    return {weight: m[..., :, :-1].reshape(*lead, *shapes[weight]), bias: m[..., :, -1]}


def _canon(layer: Factors, m: Tensor) -> Tensor:
    """The layout ``[..., rows, cols]`` turned so that ``G`` acts on the rows and ``A`` on the columns (a transposed
    layout's transpose, a view); its own inverse.
    """
    return m.mT if layer.transposed else m


def _eig_of(layer: Factors) -> Eigenbasis:
    """Eigendecompositions in the factors' own dtype (float32 factors: a float32 ``eigh``, several times faster
    than float64 on large ``A``; the damping of every solve dominates its rounding). A low-rank ``A`` gets its
    thin basis (:func:`~fisherfx._factor.eig`).
    """
    a = _factor.eig(layer.A)
    g_values, g_vectors = torch.linalg.eigh(layer.G)
    return Eigenbasis(a.values, a.vectors, g_values, g_vectors, a_rest=a.rest)


def _bases(layer: Factors, e: Eigenbasis) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """``(Q_left, Q_right, λ_left, λ_right)`` in the layout's orientation (``None``: identity)."""
    if layer.transposed:
        return e.a_vectors, e.g_vectors, e.a_values, e.g_values
    return e.g_vectors, e.a_vectors, e.g_values, e.a_values


def _block_values(layer: Factors, e: Eigenbasis) -> tuple[Tensor, Tensor | None]:
    """The block's eigenvalues, turned (:func:`_canon`): ``[o, k]`` on ``Q_G ⊗ Q_A`` (EKFAC's, or products of the
    factors'), and ``[o]`` on ``Q_G ⊗`` the complement of a thin ``Q_A`` (``None``: the basis is complete).
    """
    if e.scale is not None:
        return _canon(layer, e.scale), e.scale_rest
    rest = None if e.a_rest is None else e.g_values * e.a_rest
    return e.g_values[:, None] * e.a_values[None, :], rest


def _spectral(e: Eigenbasis, m: Tensor, thin: Tensor, rest: Tensor | None) -> Tensor:
    """``Q_G [thin ⊙ (Q_Gᵀ M Q_A)] Q_Aᵀ`` plus, for a thin ``Q_A``, ``Q_G [rest ⊙ (Q_Gᵀ M (I − Q_A Q_Aᵀ))]``, on a
    turned layout ``M`` ``[..., o, i]``: a function of the block applied through its eigenbasis.
    """
    t = e.g_vectors.T @ m
    q = e.a_vectors
    if q is None:
        out = thin * t
    else:
        c = t @ q
        if rest is None:
            out = (thin * c) @ q.T
        else:
            r = rest[:, None]
            out = r * t + (thin * c - r * c) @ q.T
    return e.g_vectors @ out


def _eigs(fac: KFAC) -> dict[str, Eigenbasis]:
    return fac.eig if fac.eig is not None else {key: _eig_of(layer) for key, layer in fac.layers.items()}


# --- operations ------------------------------------------------------------------------------------

def _check_fac(where: str, fac: Any) -> KFAC:
    if not isinstance(fac, KFAC):
        raise FisherError(f"{where}: expected a KFAC (from ffx.kfac), got {type(fac).__name__}")
    return fac


def _vector(where: str, fac: KFAC, v: Mapping[str, Tensor]) -> Vector:
    like = {name: torch.empty(shape, device="meta") for name, shape in fac.shapes.items()}
    try:
        out, _ = check_vector(where, v, like)
    except FisherError as err:
        raise FisherError(f"{err} (the parameters the KFAC covers)") from None
    return out


def kfac_vp(fac: KFAC, v: Mapping[str, Tensor]) -> Vector:
    """``F̂ v``: the K-FAC (or EKFAC) approximation times ``v``.

    Per layer ``G V A`` (``A V G`` transposed; a low-rank ``A = c I + Uᵀ diag(w) U`` as ``c G V + ((G V Uᵀ) ⊙ w) U``),
    with an eigenbasis that carries EKFAC's eigenvalues ``Q (s ⊙ Qᵀ V)``; ``d ⊙ v`` for the diagonal parameters.

    Args:
        fac: from :func:`kfac` (or :func:`ekfac`).
        v: ``{name: [*P]}`` or ``{name: [K, *P]}`` (``K`` products), for every parameter ``fac`` covers.

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: ``v`` with other names or shapes than the factors'.

    """
    where = "kfac_vp"
    fac = _check_fac(where, fac)
    v = _vector(where, fac, v)
    out: Vector = {}
    for key, layer in fac.layers.items():
        m = _canon(layer, _join(layer, v, fac.shapes).to(layer.G.dtype))
        e = None if fac.eig is None else fac.eig[key]
        if e is not None and e.scale is not None:
            m = _spectral(e, m, *_block_values(layer, e))
        else:
            m = _factor.right(layer.G @ m, layer.A)
        out.update(_split(layer, _canon(layer, m), fac.shapes))
    for name, d in fac.diagonal.items():
        out[name] = d * v[name].to(d.dtype)
    return {name: out[name].to(v[name].dtype) for name in fac.shapes}


def _pi(layer: Factors) -> float:
    """Martens & Grosse (2015, §6.3): ``π = sqrt((tr A / dim A) / (tr G / dim G))``."""
    tr_a = _factor.trace(layer.A) / _factor.size(layer.A)
    tr_g = float(layer.G.diagonal().sum()) / layer.G.shape[0]
    return math.sqrt(tr_a / tr_g) if tr_a > 0 and tr_g > 0 else 1.0


def kfac_solve(fac: KFAC, v: Mapping[str, Tensor], damping: float, damping_kind: DampingKind = "tikhonov") -> Vector:
    """``(F̂ + λI)⁻¹ v`` through the factors' eigendecompositions (those of :func:`kfac_eig` if cached).

    ``damping_kind="tikhonov"``: exactly ``(G ⊗ A + λI)⁻¹`` (EKFAC: ``Q (s + λ)⁻¹ Qᵀ``);
    ``"pi"``: ``(G + λ^{1/2}/π I)⁻¹ ⊗ (A + π λ^{1/2} I)⁻¹`` with ``π`` of :func:`_pi` (Martens & Grosse 2015),
    Kronecker factors only. Diagonal parameters: ``v / (d + λ)``. A low-rank ``A`` enters through its thin
    eigenbasis, its complement (eigenvalue 0) implicitly.

    Raises:
        FisherError: ``v`` not shaped like the factors' parameters, ``damping ≤ 0``, an unknown
            ``damping_kind``, or ``"pi"`` on EKFAC eigenvalues.

    """
    where = "kfac_solve"
    fac = _check_fac(where, fac)
    lam = finite_number(where, "damping", damping, strict=True)
    if damping_kind not in DAMPINGS:
        raise FisherError(f"{where}: damping_kind must be one of {list(DAMPINGS)}, got {damping_kind!r}")
    v = _vector(where, fac, v)
    eigs = _eigs(fac)
    out: Vector = {}
    for key, layer in fac.layers.items():
        e = eigs[key]
        m = _canon(layer, _join(layer, v, fac.shapes).to(layer.G.dtype))
        if damping_kind == "pi":
            if e.scale is not None:
                raise FisherError(f"{where}: damping_kind='pi' damps Kronecker factors; layer {key!r} has EKFAC "
                                  "eigenvalues: use damping_kind='tikhonov'")
            pi, root = _pi(layer), math.sqrt(lam)
            g = e.g_values + root / pi
            thin = 1.0 / (g[:, None] * (e.a_values + pi * root)[None, :])
            rest = None if e.a_rest is None else 1.0 / (g * (e.a_rest + pi * root))
        else:
            values, rest = _block_values(layer, e)
            thin, rest = 1.0 / (values + lam), None if rest is None else 1.0 / (rest + lam)
        out.update(_split(layer, _canon(layer, _spectral(e, m, thin, rest)), fac.shapes))
    for name, d in fac.diagonal.items():
        out[name] = v[name].to(d.dtype) / (d + lam)
    return {name: out[name].to(v[name].dtype) for name in fac.shapes}


def kfac_inverse(fac: KFAC, damping: float) -> KFAC:
    """The π-damped inverse ``(F̂ + λI)⁻¹ ≈ (G + λ^{1/2}/π I)⁻¹ ⊗ (A + π λ^{1/2} I)⁻¹`` as a :class:`KFAC` itself.

    Its :func:`kfac_vp` is :func:`kfac_solve` with ``damping_kind="pi"`` at half the cost (two products per
    layer instead of four): the form to keep when one inverse serves many solves (the optimiser). The
    diagonal parameters get ``1 / (d + λ)``. Uses ``fac.eig`` when present (plain K-FAC factors only); without
    it, each dense factor is inverted by a Cholesky factorisation (no eigendecomposition), and a low-rank ``A``
    gives a low-rank inverse ``t I + Q diag(1/(λ + s) − t) Qᵀ`` from its thin basis (``t = 1/s``).

    Raises:
        FisherError: ``damping ≤ 0``, or a ``fac`` with EKFAC eigenvalues (not a Kronecker product).

    """
    where = "kfac_inverse"
    fac = _check_fac(where, fac)
    lam = finite_number(where, "damping", damping, strict=True)
    root = math.sqrt(lam)
    layers_ = {}
    for key, layer in fac.layers.items():
        e = None if fac.eig is None else fac.eig[key]
        if e is not None and e.scale is not None:
            raise FisherError(f"{where}: layer {key!r} has EKFAC eigenvalues, which are not a Kronecker product; "
                              "use kfac_solve")
        pi = _pi(layer)
        a_eig = None if e is None else _factor.Eig(e.a_values, e.a_vectors, e.a_rest)
        g_eig = None if e is None else _factor.Eig(e.g_values, e.g_vectors)
        layers_[key] = layer._replace(A=_factor.damped_inverse(layer.A, pi * root, a_eig),
                                      G=_factor.damped_inverse(layer.G, root / pi, g_eig))
    diagonal = {name: 1.0 / (d + lam) for name, d in fac.diagonal.items()}
    return fac._replace(layers=layers_, diagonal=diagonal, eig=None)


def kfac_eig(fac: KFAC) -> KFAC:
    """``fac`` with the eigendecompositions of its factors in ``eig`` (a new value; ``fac`` unchanged).

    :func:`kfac_solve`, :func:`kfac_logdet` and :func:`kfac_eigenvalues` then reuse them. A low-rank ``A`` gets
    a thin basis ``[i, k]`` and the eigenvalue of its complement (:class:`Eigenbasis`).
    """
    fac = _check_fac("kfac_eig", fac)
    return fac._replace(eig={key: _eig_of(layer) for key, layer in fac.layers.items()})


def kfac_dense(fac: KFAC) -> Tensor:
    """The dense ``[D, D]`` matrix of ``fac`` in the flat order of its parameters (small models, tests)."""
    fac = _check_fac("kfac_dense", fac)
    dtype = next(iter(fac.layers.values())).G.dtype if fac.layers else next(iter(fac.diagonal.values())).dtype
    like = {name: torch.empty(shape, dtype=dtype) for name, shape in fac.shapes.items()}
    dim = sum(p.numel() for p in like.values())
    columns = kfac_vp(fac, unflatten(torch.eye(dim, dtype=dtype), like))
    return torch.cat([columns[name].reshape(dim, -1) for name in like], 1).T.contiguous()


def kfac_diag(fac: KFAC) -> Vector:
    """The diagonal of ``fac``: ``diag(G) diag(A)ᵀ`` per layer (EKFAC: ``(Q∘Q) s (Q∘Q)ᵀ``), ``d`` elsewhere."""
    fac = _check_fac("kfac_diag", fac)
    out: Vector = {}
    for key, layer in fac.layers.items():
        e = None if fac.eig is None else fac.eig[key]
        if e is not None and e.scale is not None:
            values, rest = _block_values(layer, e)
            q = e.a_vectors
            if q is not None:
                squares = q * q
                inner = values @ squares.T
                values = inner if rest is None else inner + rest[:, None] * (1.0 - squares.sum(1))[None, :]
            m = (e.g_vectors * e.g_vectors) @ values
        else:
            m = layer.G.diagonal()[:, None] * _factor.diagonal(layer.A)[None, :]
        out.update(_split(layer, _canon(layer, m), fac.shapes))
    out.update(fac.diagonal)
    return {name: out[name] for name in fac.shapes}


def kfac_trace(fac: KFAC) -> Tensor:
    """``tr F̂ = Σ_layers tr(G) tr(A) + Σ d`` (EKFAC: the sum of its eigenvalues)."""
    return sum(d.sum() for d in kfac_diag(fac).values())


def kfac_logdet(fac: KFAC, damping: float = 0.0) -> Tensor:
    """``log det(F̂ + λI)``: the sum of ``log(λ_i + λ)`` over all eigenvalues (``-inf`` for a singular ``F̂``
    without damping); eigenvalues below zero by rounding count as zero.
    """
    where = "kfac_logdet"
    fac = _check_fac(where, fac)
    lam = 0.0 if damping == 0 else finite_number(where, "damping", damping, strict=True)
    values = _all_eigenvalues(fac)
    return torch.log(values.to(torch.float64).clamp(min=0) + lam).sum()


def _all_eigenvalues(fac: KFAC) -> Tensor:
    eigs = _eigs(fac)
    parts = []
    for key, layer in fac.layers.items():
        values, rest = _block_values(layer, eigs[key])
        parts.append(values.reshape(-1))
        if rest is not None:  # each once per dimension of the complement
            parts.append(rest.repeat_interleave(_factor.size(layer.A) - values.shape[1]))
    parts += [d.reshape(-1) for d in fac.diagonal.values()]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.cat([p.to(dtype) for p in parts])


def kfac_eigenvalues(fac: KFAC, k: int | None = None) -> Tensor:
    """The ``k`` largest eigenvalues of ``fac`` (all when ``None``), descending: products of the layers' factor
    eigenvalues (or EKFAC's), and the diagonal entries.
    """
    fac = _check_fac("kfac_eigenvalues", fac)
    values = _all_eigenvalues(fac)
    if k is None:
        return values.sort(descending=True).values
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= values.numel():
        raise FisherError(f"kfac_eigenvalues: k must be an integer in [1, {values.numel()}] or None, got {k!r}")
    return values.topk(k).values


# --- EKFAC -----------------------------------------------------------------------------------------

def ekfac(problem: Problem, params: Mapping[str, Tensor], batch: Any, factors: KFAC | None = None,
          kind: str = "empirical", mode: Mode = "expand", n_samples: int = 1, generator: torch.Generator | None = None,
          normalize: str = "samples", dtype: torch.dtype = torch.float32, chunk_size: int | None = None,
          a_form: AForm = "auto") -> KFAC:
    """EKFAC (George et al. 2018): the K-FAC eigenbasis with the eigenvalues re-estimated on ``batch``.

    .. math::
        s = \\frac{1}{Z} \\sum_u (Q_G^\\top \\nabla_W ℓ_u Q_A)^{\\odot 2}

    per layer (its 2-D layout, the bias joined), over the gradient vectors ``u`` of ``kind`` (per-sample
    gradients for the empirical Fisher): the exact diagonal of the Fisher in that eigenbasis. The
    diagonal parameters keep their diagonal.

    A low-rank ``A`` has a thin basis ``Q_A`` ``[i, k]``: ``s`` is re-estimated on it, and the complement of
    ``Q_A`` gets one eigenvalue per row of ``Q_G``, the mean of the diagonal over the complement
    (``scale_rest``; any basis of it gives that mean, its trace being basis-free). Where every gradient lies in
    the span of ``A``'s rows (``mode="expand"`` on factors of this batch, every position with a gradient
    counted) the complement's share is zero and this is the dense basis' EKFAC exactly; otherwise (``reduce``
    over several positions, positions masked from ``A`` that still carry a gradient, factors of another batch)
    the dense basis' EKFAC depends on an arbitrary basis of ``A``'s null space, which the mean replaces.

    Args:
        problem, params, batch: as :func:`kfac`.
        factors: the K-FAC whose eigenbasis to use (default: :func:`kfac` of this batch with the same options).
        kind, mode, n_samples, generator, normalize, dtype, chunk_size, a_form: as :func:`kfac`.

    Returns:
        :class:`KFAC` with ``eig`` holding each layer's basis and ``scale``.

    """
    where = "ekfac"
    _check_options(where, kind, mode, n_samples, normalize, dtype, "auto", a_form)
    if factors is None:
        factors = kfac(problem, params, batch, kind, mode, n_samples, generator, normalize, dtype,
                       chunk_size=chunk_size, a_form=a_form)
    fac = kfac_eig(_check_fac(where, factors))
    params = fisher.check_params(where, problem, params)
    if set(fac.shapes) - set(params):
        raise FisherError(f"{where}: the factors cover parameters missing from params: "
                          f"{sorted(set(fac.shapes) - set(params))}")
    b = fisher.prepare_batch(where, problem, params, batch, kind, n_samples, generator, normalize)
    requests = {}
    for key, layer in fac.layers.items():
        e = fac.eig[key]
        ones = len(layer.names) == 2 or len(fac.shapes[key]) == 1
        requests[key] = taps.Request(factors=kfac_taps.FactorRequest(
            fac.mode, ones, layer.transposed, (e.a_vectors, e.g_vectors)))
    result = taps.estimate(problem, params, b.prepared, requests, kind=kind, per="sample", noise=b.noise, dtype=dtype,
                           chunk_size=chunk_size, where=where, split_positions=kind == "exact")
    z = float(b.count) * (n_samples if kind == "mc" else 1)
    eig = dict(fac.eig)
    for key, layer in fac.layers.items():
        s = result.sums.get(key)
        if s is None:  # the taps cannot serve it on this batch: the products of factor eigenvalues
            continue
        e = eig[key]
        o, k = e.g_values.shape[0], e.a_values.shape[0]
        rest = _factor.size(layer.A) - k if e.a_rest is not None else 0  # a thin basis: the complement's columns
        width = k + (_factor.size(layer.A) if rest else 0)
        if s.numel() == o * width:
            s = _canon(layer, (s.reshape(-1) / z).reshape((width, o) if layer.transposed else (o, width)))
        else:  # a zero sum (no unit reached it)
            s = torch.zeros((o, width), dtype=layer.G.dtype, device=layer.G.device)
        eig[key] = e._replace(scale=_canon(layer, s[:, :k]).contiguous(),
                              scale_rest=s[:, k:].sum(1) / rest if rest else None)
    made = provenance("ekfac", kind=kind, per="sample", normalize=normalize, n_samples=n_samples, dtype=dtype)
    return fac._replace(eig=eig, provenance=made)


# --- EMA and combine -------------------------------------------------------------------------------

class KFACEMAState(NamedTuple):
    """Exponential moving averages of K-FAC factors (``A`` and ``G`` of each layer, the diagonals), each an
    :class:`~fisherfx.EMAState` of the core; the layers' structure to rebuild a :class:`KFAC`.

    An average of low-rank ``A`` stays low-rank (its rows: those of every update, weighted) while the rank rule
    of :mod:`fisherfx._factor` pays (``2 r ≤ i``), and is dense from the update that passes it on.
    """

    A: EMAState  # {layer: A}, each A dense, diagonal or LowRank
    G: EMAState  # {layer: G}
    diagonal: EMAState  # {name: d}
    names: dict[str, tuple[str, ...]]
    transposed: dict[str, bool]
    shapes: dict[str, torch.Size]
    mode: str
    kind: str
    provenance: Provenance = NO_PROVENANCE  # of the factors averaged (as KFAC.provenance)


def _factors_provenance(fac: KFAC) -> Provenance:
    """The provenance of ``fac``'s Kronecker factors: EKFAC's factors are K-FAC factors (its re-estimated
    eigenvalues are dropped when factors are averaged), so ``"ekfac"`` counts as ``"kfac"``.
    """
    made = fac.provenance or NO_PROVENANCE
    return made._replace(quantity="kfac") if made.quantity == "ekfac" else made


def _check_provenance(where: str, have: Provenance, fac: KFAC, what: tuple[str, str]) -> Provenance:
    """:func:`~fisherfx.state.merge_provenance` of the factors: a FisherError naming kind or normalize."""
    return merge_provenance(where, have, _factors_provenance(fac), what)


def _structure(layers_: Mapping[str, tuple], shapes: Mapping[str, torch.Size], diagonal: Any, mode: str,
               kind: str) -> tuple:
    """What two K-FACs must share to be averaged: ``layers_`` ``{key: (names, transposed, A shape, G shape)}``."""
    return (dict(layers_), {n: tuple(s) for n, s in shapes.items()}, sorted(diagonal), mode, kind)


def _structure_of(fac: KFAC) -> tuple:
    return _structure({k: (f.names, f.transposed, _factor.shape(f.A), tuple(f.G.shape)) for k, f in fac.layers.items()},
                      fac.shapes, fac.diagonal, fac.mode, fac.kind)


def _check_same(where: str, have: tuple, fac: KFAC, what: str = "the state's") -> None:
    got = _structure_of(fac)
    if got == have:
        return
    if got[1] != have[1]:
        why = (f"other parameters or shapes (another model?): {what} {sorted(have[1])}, the factors' "
               f"{sorted(got[1])}")
    elif got[3:] != have[3:]:
        field, a, b = next((f, x, y) for f, x, y in zip(("mode", "kind"), have[3:], got[3:], strict=True) if x != y)
        why = f"another mode or kind: {what} {field}={a!r}, the factors' {field}={b!r}"
    else:
        key = next((k for k in sorted({*have[0], *got[0]}) if have[0].get(k) != got[0].get(k)), None)
        why = (f"another layer structure at {key!r}: {what} {have[0].get(key)}, the factors' {got[0].get(key)}"
               if key is not None else f"other diagonal parameters: {what} {have[2]}, the factors' {got[2]}")
    raise FisherError(f"{where}: the factors do not match {what}: {why}")


def _state_structure(state: "KFACEMAState") -> tuple:
    return _structure({k: (names, state.transposed[k], _factor.shape(state.A.mean[k]), tuple(state.G.mean[k].shape))
                       for k, names in state.names.items()}, state.shapes, state.diagonal.mean, state.mode, state.kind)


def kfac_ema_init(fac: KFAC, decay: float = 0.95) -> KFACEMAState:
    """Zero averages with the structure of ``fac`` (names, shapes, mode, kind), step 0, as
    :func:`~fisherfx.ema_init`.
    """
    fac = _check_fac("kfac_ema_init", fac)
    g = ema_init({k: layer.G for k, layer in fac.layers.items()}, decay)
    a = EMAState({k: _factor.zeros_like(layer.A) for k, layer in fac.layers.items()}, g.step.clone(), g.decay)
    return KFACEMAState(a, g,
                        ema_init(dict(fac.diagonal), decay),
                        {k: layer.names for k, layer in fac.layers.items()},
                        {k: layer.transposed for k, layer in fac.layers.items()}, dict(fac.shapes), fac.mode, fac.kind,
                        _factors_provenance(fac))


def kfac_ema_update(state: KFACEMAState, fac: KFAC) -> KFACEMAState:
    """``m_k = β m_{k−1} + (1 − β) F_k`` for every factor and diagonal; a new state.

    Raises:
        FisherError: factors of another model, layer structure, mode, kind or normalisation (the provenance's
            check, :func:`~fisherfx.combine`'s).

    """
    where = "kfac_ema_update"
    fac = _check_fac(where, fac)
    if not isinstance(state, KFACEMAState):
        raise FisherError(f"{where}: expected a KFACEMAState (from kfac_ema_init), got {type(state).__name__}")
    made = _check_provenance(where, state.provenance, fac, ("the state", "the factors"))
    _check_same(where, _state_structure(state), fac)
    beta = state.A.decay
    a = {k: _factor.weighted_sum([(m, beta), (fac.layers[k].A, 1.0 - beta)]) for k, m in state.A.mean.items()}
    return state._replace(A=EMAState(a, state.A.step + 1, beta, state.A.provenance),
                          G=ema_update(state.G, {k: layer.G for k, layer in fac.layers.items()}),
                          diagonal=ema_update(state.diagonal, dict(fac.diagonal)), provenance=made)


def kfac_ema_value(state: KFACEMAState, bias_corrected: bool = True) -> KFAC:
    """The averaged factors as a :class:`KFAC` (bias-corrected ``m_k / (1 − β^k)`` by default), with counts 1
    (an average of normalised factors; :func:`kfac_combine` weighs such values equally).

    Raises:
        FisherError: no update yet.

    """
    if not isinstance(state, KFACEMAState):
        raise FisherError(f"kfac_ema_value: expected a KFACEMAState, got {type(state).__name__}")
    g = ema_value(state.G, bias_corrected)  # raises before any update
    correction = 1.0 - float(state.A.decay) ** int(state.A.step) if bias_corrected else 1.0
    a = {k: _factor.divided(m, correction) for k, m in state.A.mean.items()}
    diagonal = ema_value(state.diagonal, bias_corrected) if state.diagonal.mean else {}
    one = torch.ones((), dtype=torch.int64)
    layers_ = {k: Factors(names, a[k], g[k], state.transposed[k], one) for k, names in state.names.items()}
    return KFAC(layers_, diagonal, one, dict(state.shapes), state.mode, state.kind, provenance=state.provenance)


def kfac_combine(facs: Sequence[KFAC]) -> KFAC:
    """Exact combination over batches: ``A`` weighted by its rows (``a_count``), ``G`` and the diagonals by
    their counts ``Z`` (:func:`~fisherfx.combine`'s arithmetic), so that it equals the K-FAC of the
    concatenated batches; eigendecompositions are dropped.

    The provenance is the parts' merged provenance (an EKFAC's counts as K-FAC's: its eigenvalues are dropped).

    Raises:
        FisherError: no factors, factors of different structure (another model, mode or kind), or of different
            provenance (another kind or normalize: the check of :func:`~fisherfx.combine`, naming the field).

    """
    where = "kfac_combine"
    if not isinstance(facs, Sequence) or not facs:
        raise FisherError(f"{where}: expected a non-empty list of KFAC values")
    facs = [_check_fac(where, f) for f in facs]
    first = facs[0]
    made = _factors_provenance(first)
    for i, f in enumerate(facs[1:], start=1):
        before = "factors 0" if i == 1 else f"factors 0 to {i - 1}"
        made = _check_provenance(where, made, f, (before, f"factors {i}"))
        _check_same(where, _structure_of(first), f, "the first factors'")
    layers_ = {}
    for key, layer in first.layers.items():
        parts = [f.layers[key] for f in facs]
        rows = sum(p.a_count for p in parts)
        if not int(rows):
            a = layer.A
        elif any(isinstance(p.A, LowRank) for p in parts):  # rows concatenated while the rank rule pays
            a = _factor.weighted_sum([(p.A, float(p.a_count) / float(rows)) for p in parts])
        else:
            a = combine([Estimate({key: p.A}, p.a_count) for p in parts]).value[key]
        g = combine([Estimate({key: p.G}, f.count) for p, f in zip(parts, facs, strict=True)]).value[key]
        layers_[key] = layer._replace(A=a, G=g, a_count=rows)
    diagonal = combine([Estimate(dict(f.diagonal), f.count) for f in facs]).value if first.diagonal else {}
    return KFAC(layers_, diagonal, sum(f.count for f in facs), dict(first.shapes), first.mode, first.kind,
                provenance=made)


__all__ = ["KFAC", "Eigenbasis", "Factors", "KFACEMAState", "ekfac", "kfac", "kfac_combine", "kfac_dense",
           "kfac_diag", "kfac_eig", "kfac_eigenvalues", "kfac_ema_init", "kfac_ema_update", "kfac_ema_value",
           "kfac_inverse", "kfac_logdet", "kfac_solve", "kfac_trace", "kfac_vp"]
