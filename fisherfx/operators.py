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
form; one backward through the same forward gives ``Jᵀ u`` (:mod:`fisherfx._products`). The empirical
and MC products go through the tap engine where it serves (:mod:`fisherfx._gradient_products`): one
forward and one backward give every ``∇ℓ_nᵀ v`` and ``Σ_n s_n ∇ℓ_n`` from the layers' inputs and output
gradients, with no ``jvp`` and no backward per vector. ``K`` vectors at once (a leading axis on
every ``v[name]``) share the forward: the tangents are batched with :func:`torch.func.vmap` over
the one primal, and pulled back one by one through its graph. :func:`hvp` of one vector is reverse over reverse
(the backward of the gradient, built with ``create_graph``, along ``v``: measured faster on CPU than
``jvp`` of ``grad``); of ``K`` vectors forward over reverse, the tangents batched over one primal.

Attention: ``torch``'s fused SDPA kernels have no forward-mode derivative on some devices, so the
products run under the math SDPA backend (:func:`torch.nn.attention.sdpa_kernel`).
"""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from ._errors import FisherError
from ._gradient_products import gradient_product
from ._hessian_products import hessian_product
from ._options import choice
from ._products import accumulate, batches_of, check, forward_of, grad_leaves, like_params, per_vector, push
from .engines import taps
from .fisher import ENGINES, Engine, Normalize, Per
from .losses import summed_nll
from .problems import Prepared, Problem
from .vectors import Vector


def _ggn_cotangent(problem: Problem, out: Tensor, jv: Tensor, prepared: Prepared) -> Tensor:
    """``u = H J v`` per active position (zero elsewhere), ``H`` in closed form."""
    f, jv = out.detach(), jv.detach()  # a cotangent needs no graph of its own
    if f.dtype in (torch.float16, torch.bfloat16):
        f, jv = f.float(), jv.float()
    return problem.likelihood.hessian_vp(f, jv) * prepared.active[..., None].to(f.dtype)


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
    where = "ggn_vp"
    params, v, k = check(where, problem, params, v, normalize)
    tangents = like_params(v, params)

    def product(prepared: Prepared, noise: Tensor | None) -> Vector:
        def one(t: Vector, k: int | None) -> Vector:  # (1/Σ_b Z_b) Σ_b Σ_n J_nᵀ H_n J_n v
            out, jv, pull = push(where, problem, params, prepared, t, k)
            return pull(_ggn_cotangent(problem, out, jv, prepared))

        return per_vector(problem, tangents, k, one)

    return accumulate(where, problem, params, batch, normalize, product, "exact", 1, None)


#: The same function as :func:`ggn_vp`: the exact Fisher equals the GGN for these likelihoods.
fisher_vp = ggn_vp


def empirical_fisher_vp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                        normalize: Normalize = "samples", per: Per = "sample", engine: Engine = "auto") -> Vector:
    """Empirical Fisher times ``v``, with no per-sample gradient formed.

    .. math::
        F v = \\frac{1}{Z} \\sum_n \\nabla ℓ_n \\, (\\nabla ℓ_n^\\top v)
        \\qquad (\\text{per="token"}: \\sum_{n,t} \\nabla ℓ_{n,t} (\\nabla ℓ_{n,t}^\\top v))

    Two routes give the scalars ``s_n = ∇ℓ_nᵀ v`` and the weighted sum ``Σ_n s_n ∇ℓ_n``. Through the
    tap engine (:mod:`fisherfx.engines.taps`): one forward and one backward of the output vectors
    ``∂ℓ/∂f`` give every supported layer's inputs ``x`` and output gradients ``g``, and then
    ``s_n = Σ_{calls, p} g_{n,p}ᵀ V x_{n,p}`` and ``Σ_n s_n ∇ℓ_n = (s ⊙ g)ᵀ x`` per layer, one GEMM each
    for all ``K`` vectors at once (no ``jvp``, no backward per vector). By ``jvp``/``vjp``: ``s_n`` from
    one forward with tangents, ``Σ_t (∂ℓ_{n,t}/∂f_{n,t})ᵀ (J v)_{n,t}``, the weighted sum from one backward
    per vector. In a mix, ``s_n`` adds both routes' parts before each pulls it back.

    Args:
        problem, params, batch, v, normalize: as :func:`ggn_vp`.
        per: ``"sample"`` (``∇ℓ_n``) or ``"token"`` (each active position its own sample).
        engine: ``"auto"`` (the taps for the parameters they serve, ``jvp``/``vjp`` for the rest; but
            ``jvp``/``vjp`` for everything when the units are positions, ``per="token"`` with samples holding
            several: the taps' per-position check costs two more backwards and on attention models serves
            only the layers after the last attention), ``"taps"`` (the taps for every parameter, for
            ``per="token"`` too; raises for those they cannot serve) or ``"generic"`` (``jvp``/``vjp``).

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`ggn_vp`, and ``engine="taps"`` with a parameter the taps cannot serve.

    """
    return gradient_product("empirical_fisher_vp", problem, params, batch, v, normalize, "empirical", per, engine)


def mc_fisher_vp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
                 n_samples: int = 1, generator: torch.Generator | None = None, normalize: Normalize = "samples",
                 per: Per = "sample", engine: Engine = "auto") -> Vector:
    """Monte-Carlo ("true") Fisher times ``v``: the empirical product with labels drawn from the model.

    .. math::
        F v = \\frac{1}{Z S} \\sum_n \\sum_{s=1}^{S} \\nabla ℓ_n(ỹ^s) \\, (\\nabla ℓ_n(ỹ^s)^\\top v),
        \\qquad ỹ^s \\sim p(\\cdot \\mid x_n, θ)

    The draws are those of ``diag_fisher(kind="mc")`` for the same generator state (drawn for the active
    positions only, batch after batch), so unit-vector products reproduce its diagonal.

    Args:
        problem, params, batch, v, normalize, per, engine: as :func:`empirical_fisher_vp` (the taps run one
            backward per draw).
        n_samples: draws ``S`` per active position.
        generator: seeds the draws; the same state gives the same product.

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`empirical_fisher_vp`, and ``n_samples`` not a positive integer.

    """
    where = "mc_fisher_vp"
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise FisherError(f"{where}: n_samples must be a positive integer, got {n_samples!r}")
    return gradient_product(where, problem, params, batch, v, normalize, "mc", per, engine, n_samples, generator)


def hvp(problem: Problem, params: Mapping[str, Tensor], batch: Any, v: Mapping[str, Tensor],
        normalize: Normalize = "samples", engine: Engine = "auto") -> Vector:
    """Hessian of the normalised NLL :func:`~fisherfx.nll` times ``v``.

    .. math::
        H v = \\nabla^2_θ \\Big( \\frac{1}{Z} \\sum_n ℓ_n(θ) \\Big) v
            = G v + \\frac{1}{Z} \\sum_n \\sum_{t, c} \\frac{\\partial ℓ_n}{\\partial f_{n,t,c}}
              \\nabla^2_θ f_{n,t,c} \\, v

    Not positive semi-definite in general (the second term); it equals :func:`ggn_vp` for a model
    linear in ``params``.

    Two routes. Reverse over reverse: the backward of the gradient (built with ``create_graph``) along
    ``v``; for ``K`` vectors forward over reverse, the tangents batched over one primal forward and backward
    (one vector at a time for models with convolutions). Through the taps
    (:mod:`fisherfx._hessian_products`): ``H v`` is the gradient of ``s = ⟨∇_θ L, v⟩``, with ``s`` formed
    from the layers' output gradients ``∂L/∂y`` and the layers evaluated at ``v`` (each is linear in its
    parameters), so the first backward forms no weight gradient, and ``K`` vectors share the forward and
    that first backward, each with its own second backward.

    Args:
        problem, params, batch, v, normalize: as :func:`ggn_vp`.
        engine: ``"auto"`` (one vector reverse over reverse, ``K`` vectors through the taps: the choices
            measured faster, see ``docs/benchmarks-operators.md``), ``"taps"`` (through the taps for any
            ``K``; raises for parameters no recorded layer call accounts for, which ``"auto"`` takes
            through their own gradient) or ``"generic"`` (reverse over reverse, forward over reverse for
            ``K`` vectors).

    Returns:
        ``{name: [*P]}`` (or ``[K, *P]``).

    Raises:
        FisherError: as :func:`ggn_vp`, and ``engine="taps"`` with a parameter the taps cannot serve.

    """
    where = "hvp"
    choice(where, "engine", engine, ENGINES)
    params, v, k = check(where, problem, params, v, normalize)
    tangents = like_params(v, params)

    def tapped(prepared: Prepared) -> Vector:
        vs = [tangents] if k is None else [{name: t[i] for name, t in tangents.items()} for i in range(k)]
        products, missing = hessian_product(where, problem, params, prepared, vs, strict=engine == "taps")
        if engine == "taps" and missing:
            raise taps.refusal(where, missing, "autograd's gradients")
        if k is None:
            return products[0]
        return {name: torch.stack([p[name] for p in products]) for name in params}

    def product(prepared: Prepared, noise: Tensor | None) -> Vector:
        if engine == "taps" or (engine == "auto" and k is not None):
            return tapped(prepared)
        forward = forward_of(where, problem, prepared)

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
            leaves = grad_leaves(params)  # one vector: reverse over reverse, measured faster on CPU than jvp of grad
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

        return per_vector(problem, tangents, k, one)

    return accumulate(where, problem, params, batch, normalize, product, "exact", 1, None)


__all__ = ["batches_of", "empirical_fisher_vp", "fisher_vp", "ggn_vp", "hvp", "mc_fisher_vp"]
