"""Curvature as operators: exact products with the Fisher (= GGN), the empirical and MC Fisher and
the Hessian, with no Jacobian, per-sample gradient or matrix in memory.

With the per-sample negative log-likelihood ``ℓ_n`` of :mod:`fisherfx.fisher`, outputs ``f_n``, their
Jacobian ``J_n = ∂f_n/∂θ`` and the output Hessian ``H_n = ∂²ℓ_n/∂f_n²``:

.. math::
    G v = \\frac{1}{Z} \\sum_n J_n^\\top H_n J_n v, \\qquad
    F_{\\mathrm{emp}} v = \\frac{1}{Z} \\sum_n \\nabla ℓ_n (\\nabla ℓ_n^\\top v), \\qquad
    H v = \\nabla^2_θ \\Big(\\frac{1}{Z} \\sum_n ℓ_n\\Big) v

and the MC Fisher as the empirical one with labels drawn from the model (``S`` draws per active
position, averaged). ``Z`` is that of the estimators (``N``, active positions or 1), so the diagonal
of each operator is :func:`~fisherfx.diag_fisher`'s value of the same kind (``exact``,
``empirical``, ``mc``) and :func:`hvp` is the Hessian of :func:`~fisherfx.nll`.

How: one forward with tangents (:func:`torch.func.jvp`) gives the outputs ``f`` and ``J v`` for the
whole batch; the output-space cotangent ``u`` (``H J v``, or ``∇_f ℓ · (∇ℓᵀ v)``) is formed in closed
form; one backward through the same forward gives ``Jᵀ u``. ``K`` vectors at once (a leading axis on
every ``v[name]``) share the forward: the tangents are batched with :func:`torch.func.vmap` over
the one primal, and pulled back one by one through its graph. :func:`hvp` of one vector is reverse over reverse
(the backward of the gradient, built with ``create_graph``, along ``v``: measured faster on CPU than
``jvp`` of ``grad``); of ``K`` vectors forward over reverse, the tangents batched over one primal.

Attention: ``torch``'s fused SDPA kernels have no forward-mode derivative on some devices, so the
products run under the math SDPA backend (:func:`torch.nn.attention.sdpa_kernel`).
"""

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from ._errors import FisherError
from ._options import choice
from .engines import taps
from .fisher import NORMALIZES, PERS, Normalize, Per, check_params, prepare_batch
from .losses import summed_nll
from .problems import Prepared, Problem
from .vectors import Vector, check_vector, non_finite


def _math_sdpa() -> contextlib.AbstractContextManager:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without the context manager
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _one_batch(batch: Any) -> bool:
    """A single batch: a dict (``causal_lm``) or ``(inputs, targets[, mask])`` with tensor targets."""
    if isinstance(batch, Mapping):
        return True
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and isinstance(batch[1], Tensor):
        return True
    return isinstance(batch, Tensor) or not isinstance(batch, Iterable)  # not a collection: prepare says what


def batches_of(batch: Any) -> Iterator[Any]:
    """The batches of ``batch``: itself when it is one batch, else its items (a list, a DataLoader)."""
    if _one_batch(batch):
        yield batch
    else:
        yield from batch


def _leaves(params: Mapping[str, Tensor]) -> Vector:
    return {name: p.detach().requires_grad_(True) for name, p in params.items()}


def _tangents(v: Mapping[str, Tensor], params: Mapping[str, Tensor]) -> Vector:
    return {name: v[name].to(dtype=p.dtype, device=p.device) for name, p in params.items()}


def _forward(where: str, problem: Problem, prepared: Prepared) -> Any:
    device = prepared.active.device

    def forward(values: Mapping[str, Tensor]) -> Tensor:
        return taps.guarded_forward(where, problem, values, prepared.inputs, device)

    return forward


def _push(where: str, problem: Problem, params: Vector, prepared: Prepared, v: Vector,
          k: int | None) -> tuple[Tensor, Tensor, Any]:
    """``(f, J v, pull)``: the outputs ``f`` ``[N, T, C]``, the tangents ``J v`` ``[(K,) N, T, C]`` and
    ``pull(u) = Jᵀ u`` for cotangents ``u`` shaped like ``J v``.

    One forward with tangents whose primal keeps its autograd graph (``K`` tangents batched over the
    one primal with ``vmap``); ``pull`` is one backward through that graph per vector. (A backward
    vmapped with ``is_grads_batched`` over that graph was measured slower than ``K`` backwards, and a
    vmapped ``torch.func.vjp`` costs a second primal forward for a few percent.)
    """
    forward = _forward(where, problem, prepared)
    leaves = _leaves(params)
    with torch.enable_grad():
        if k is None:
            out, jv = jvp(forward, (leaves,), (v,))
        else:
            out, jv = vmap(lambda t: jvp(forward, (leaves,), (t,)), out_dims=(None, 0))(v)
    taps.check_outputs(where, problem, out.detach(), prepared)

    def backward(u: Tensor, keep: bool) -> list[Tensor]:
        grads = torch.autograd.grad(out, list(leaves.values()), u.to(out.dtype), allow_unused=True, retain_graph=keep)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves.values(), grads, strict=True)]

    def pull(u: Tensor) -> Vector:
        if k is None:
            return dict(zip(leaves, backward(u, False), strict=True))
        parts = [backward(u[i], i < k - 1) for i in range(k)]
        return {name: torch.stack([part[j] for part in parts]) for j, name in enumerate(leaves)}

    return out, jv, pull


def _ggn_cotangent(problem: Problem, out: Tensor, jv: Tensor, prepared: Prepared, **_: Any) -> Tensor:
    """``u = H J v`` per active position (zero elsewhere), ``H`` in closed form."""
    f = out.detach()
    if f.dtype in (torch.float16, torch.bfloat16):
        f, jv = f.float(), jv.float()
    return problem.likelihood.hessian_vp(f, jv) * prepared.active[..., None].to(f.dtype)


def _gradient_cotangent(problem: Problem, out: Tensor, jv: Tensor, prepared: Prepared, *, kind: str, per: str,
                        noise: Tensor | None) -> Tensor:
    """``u = Σ_r a_r (a_rᵀ J v) / R`` with ``a_r = ∂ℓ/∂f`` per sample (or position) and draw ``r``."""
    a = taps.output_vectors(problem, out.detach(), prepared, kind, noise)  # [R, N, T, C], zero where inactive
    jv = jv.to(a.dtype)
    lead = jv.ndim - 3  # 0, or 1 for K vectors
    a_ = a.reshape(a.shape[0], *[1] * lead, *a.shape[1:])  # [R, (1,) N, T, C]
    along = (a_ * jv).sum(-1)  # [R, (K,) N, T]: a_{n,t}ᵀ (J v)_{n,t}
    if per == "sample":
        along = along.sum(-1, keepdim=True)  # ∇ℓ_nᵀ v
    return (a_ * along[..., None]).sum(0) / a.shape[0]


def _convolutional(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


def _vectors(problem: Problem, tangents: Vector, k: int | None, one: Any) -> Vector:
    """``one(tangents, k)``, or for a model with convolutions ``K`` calls ``one(t_i, None)`` stacked:
    vmap's rule for a convolution with batched weights is slower on CPU than ``K`` products (measured
    1.5-2.3x the cost of ``K`` calls on the CNN workload), unlike that of a linear layer.
    """
    if k is None or not _convolutional(problem.model):
        return one(tangents, k)
    parts = [one({name: t[i] for name, t in tangents.items()}, None) for i in range(k)]
    return {name: torch.stack([p[name] for p in parts]) for name in parts[0]}


def _fisher_product(where: str, problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                    normalize: str, cotangent: Any, kind: str = "exact", per: str = "sample", n_samples: int = 1,
                    generator: torch.Generator | None = None) -> Vector:
    """``(1/Σ_b Z_b) Σ_b Σ_n J_nᵀ u_n`` with ``u = cotangent(f, J v)`` per batch: the shared Fisher product."""
    params, v, k = _check(where, problem, params, v, normalize)
    choice(where, "per", per, PERS)
    tangents = _tangents(v, params)

    def product(prepared: Prepared, noise: Tensor | None) -> Vector:
        def one(t: Vector, k: int | None) -> Vector:
            out, jv, pull = _push(where, problem, params, prepared, t, k)
            return pull(cotangent(problem, out, jv, prepared, kind=kind, per=per, noise=noise))

        return _vectors(problem, tangents, k, one)

    return _accumulate(where, problem, params, batch, normalize, product, kind, n_samples, generator)


def _check(where: str, problem: Problem, params: Mapping[str, Tensor], v: Mapping[str, Tensor],
           normalize: str) -> tuple[Vector, Vector, int | None]:
    choice(where, "normalize", normalize, NORMALIZES)
    params = check_params(where, problem, params)
    v, k = check_vector(where, v, params)
    return params, v, k


def _accumulate(where: str, problem: Problem, params: Vector, batch: Any, normalize: str, product: Any, kind: str,
                n_samples: int, generator: torch.Generator | None) -> Vector:
    """Run ``product(prepared, noise)`` (an unnormalised sum) on every batch and divide by ``Σ_b Z_b``
    (``normalize="none"``: by 1, the sum over the whole list, whatever its split into batches).
    """
    total: Vector | None = None
    count = 0
    for b in batches_of(batch):
        prepared = prepare_batch(where, problem, params, b, kind, n_samples, generator, normalize)
        with _math_sdpa():
            part = product(prepared.prepared, prepared.noise)
        if total is None:
            total = part
        else:
            for name in total:
                total[name] += part[name]
        count = 1 if normalize == "none" else count + int(prepared.count)
    if total is None:
        raise FisherError(f"{where}: batch is an empty collection of batches; expected one batch or a non-empty "
                          "list (or iterable) of batches")
    bad = non_finite(total)
    if bad is not None:
        raise FisherError(f"{where}: the product is non-finite for parameter {bad!r} (inf or NaN in the model's "
                          "outputs or their derivatives)")
    return {name: x.div_(count) for name, x in total.items()} if count != 1 else total


def ggn_vp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
           normalize: Normalize = "samples") -> Vector:
    """Exact Fisher (= generalised Gauss–Newton) times ``v``.

    .. math::
        G v = \\frac{1}{Z} \\sum_n J_n^\\top H_n J_n v, \\qquad H_n = \\frac{\\partial^2 ℓ_n}{\\partial f_n^2}

    summed over active positions; for the likelihoods of fisherfx ``H_n`` does not depend on the labels,
    so this is the Fisher ``E_y[∇ℓ ∇ℓᵀ]`` of ``diag_fisher(kind="exact")``.

    Args:
        problem: from :func:`~fisherfx.supervised` or :func:`~fisherfx.causal_lm`.
        params: ``{name: [*P]}``, the parameters the operator acts on (any subset of the model's; the
            others are held at the model's values).
        batch: one batch as ``problem`` reads it, or a list / iterable of batches: then the exact
            count-weighted average ``Σ_b Z_b G_b v / Σ_b Z_b``, the product on the concatenated data (with
            ``normalize="none"`` the plain sum over the batches); a one-shot iterator is consumed.
        v: ``{name: [*P]}`` shaped like ``params``, or ``{name: [K, *P]}``: ``K`` products in one call,
            sharing the forward.
        normalize: ``Z`` = ``"samples"`` (N rows), ``"tokens"`` (active positions) or ``"none"`` (1).

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``) in the parameters' dtype.

    Raises:
        FisherError: ``v`` with other names or shapes than ``params`` or non-finite, bad options or
            parameters, a batch with no active position, targets that do not fit the outputs, an empty
            list of batches, a non-finite product.

    """
    return _fisher_product("ggn_vp", problem, params, batch, v, normalize, _ggn_cotangent)


#: The same function as :func:`ggn_vp`: the exact Fisher equals the GGN for these likelihoods.
fisher_vp = ggn_vp


def empirical_fisher_vp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                        normalize: Normalize = "samples", per: Per = "sample") -> Vector:
    """Empirical Fisher times ``v``, with no per-sample gradient formed.

    .. math::
        F v = \\frac{1}{Z} \\sum_n \\nabla ℓ_n \\, (\\nabla ℓ_n^\\top v)
        \\qquad (\\text{per="token"}: \\sum_{n,t} \\nabla ℓ_{n,t} (\\nabla ℓ_{n,t}^\\top v))

    ``∇ℓ_nᵀ v = Σ_t (∂ℓ_{n,t}/∂f_{n,t})ᵀ (J v)_{n,t}`` comes from the one ``jvp``; the weighted sum of
    gradients from the one backward.

    Args:
        problem, params, batch, v, normalize: as :func:`ggn_vp`.
        per: ``"sample"`` (``∇ℓ_n``) or ``"token"`` (each active position its own sample).

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`ggn_vp`.

    """
    return _fisher_product("empirical_fisher_vp", problem, params, batch, v, normalize, _gradient_cotangent,
                           kind="empirical", per=per)


def mc_fisher_vp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                 n_samples: int = 1, generator: torch.Generator | None = None, normalize: Normalize = "samples",
                 per: Per = "sample") -> Vector:
    """Monte-Carlo ("true") Fisher times ``v``: the empirical product with labels drawn from the model.

    .. math::
        F v = \\frac{1}{Z S} \\sum_n \\sum_{s=1}^{S} \\nabla ℓ_n(ỹ^s) \\, (\\nabla ℓ_n(ỹ^s)^\\top v),
        \\qquad ỹ^s \\sim p(\\cdot \\mid x_n, θ)

    The draws are those of ``diag_fisher(kind="mc")`` for the same generator state (drawn for the active
    positions only, batch after batch), so unit-vector products reproduce its diagonal.

    Args:
        problem, params, batch, v, normalize, per: as :func:`empirical_fisher_vp`.
        n_samples: draws ``S`` per active position.
        generator: seeds the draws; the same state gives the same product.

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`ggn_vp`, and ``n_samples`` not a positive integer.

    """
    where = "mc_fisher_vp"
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise FisherError(f"{where}: n_samples must be a positive integer, got {n_samples!r}")
    return _fisher_product(where, problem, params, batch, v, normalize, _gradient_cotangent, kind="mc", per=per,
                           n_samples=n_samples, generator=generator)


def hvp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
        normalize: Normalize = "samples") -> Vector:
    """Hessian of the normalised NLL :func:`~fisherfx.nll` times ``v`` (reverse over reverse).

    .. math::
        H v = \\nabla^2_θ \\Big( \\frac{1}{Z} \\sum_n ℓ_n(θ) \\Big) v
            = G v + \\frac{1}{Z} \\sum_n \\sum_{t, c} \\frac{\\partial ℓ_n}{\\partial f_{n,t,c}}
              \\nabla^2_θ f_{n,t,c} \\, v

    Not positive semi-definite in general (the second term); it equals :func:`ggn_vp` for a model
    linear in ``params``.

    Args:
        problem, params, batch, v, normalize: as :func:`ggn_vp`.

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`ggn_vp`.

    """
    where = "hvp"
    params, v, k = _check(where, problem, params, v, normalize)
    tangents = _tangents(v, params)

    def product(prepared: Prepared, noise: Tensor | None) -> Vector:
        forward = _forward(where, problem, prepared)

        def loss(values: Mapping[str, Tensor]) -> Tensor:
            out = forward(values)
            taps.check_outputs(where, problem, out, prepared)  # shapes and targets only; before the loss reads them
            return summed_nll(problem, out, prepared)

        def one(t: Vector, k: int | None) -> Vector:
            if k is not None:  # forward over reverse, the K tangents batched over one primal forward and backward
                primals = {name: p.detach() for name, p in params.items()}
                return vmap(lambda u: jvp(grad(loss), (primals,), (u,))[1])(t)
            return second_order(t)

        def second_order(t: Vector) -> Vector:
            leaves = _leaves(params)  # one vector: reverse over reverse, measured faster on CPU than jvp of grad
            with torch.enable_grad():
                gradient = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True,
                                               allow_unused=True)
            hv = {name: torch.zeros_like(p) for name, p in leaves.items()}
            # the gradient's own gradient along v; entries whose gradient is constant in θ have a zero block
            live = [(name, g) for name, g in zip(leaves, gradient, strict=True) if g is not None and g.requires_grad]
            if live:
                second = torch.autograd.grad([g for _, g in live], list(leaves.values()),
                                             [t[name] for name, _ in live], allow_unused=True)
                hv.update({name: h for name, h in zip(leaves, second, strict=True) if h is not None})
            return hv

        return _vectors(problem, tangents, k, one)

    return _accumulate(where, problem, params, batch, normalize, product, "exact", 1, None)


__all__ = ["batches_of", "empirical_fisher_vp", "fisher_vp", "ggn_vp", "hvp", "mc_fisher_vp"]
