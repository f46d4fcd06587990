"""The tap engine: layer inputs and output gradients from one batched forward and few backwards.

Every estimator of fisherfx squares pull-backs ``J_nᵀ u`` of output vectors ``u`` (see
:mod:`.cotangents`). One batched forward gives the canonical outputs ``[N, T, C]``; for each of the
``R`` vectors ``u_r`` ``[N, T, C]`` one backward of ``Σ u_r ⊙ f`` (reusing the forward's graph)
gives, at each call of a supported layer, the output gradient ``g``, and with the call's input
``x`` the per-position contributions to its parameters' gradients (:mod:`._tap_layers`). Since the
outputs of sample ``n`` depend on sample ``n`` only, the part of ``g`` at sample ``n`` is exactly
what sample ``n``'s gradient needs, and the estimators are formed from ``x`` and ``g`` with
einsum and Gram matrices (:mod:`._tap_estimators`).

The taps (forward hooks on the supported modules, tensor hooks on their outputs) are registered
and removed inside one call. A parameter is served only when the taps account for all of its
gradient; otherwise the generic engine must serve it (``engine="auto"`` does that):

* **coverage**: in the first backward autograd also gives each parameter's batch gradient, and it
  must equal the sum of the taps' contributions (checked with a random projection), so a weight
  also used outside its layer (a raw ``F.linear``, a parametrisation) is detected;
* **positions**: ``per="token"`` and ``kind="exact"`` with ``T > 1`` need each active position's
  gradient on its own. Through taps that is exact only for a layer whose output at one position
  feeds the loss of one position only (position-wise layers after the last attention, or models
  without attention); two extra backwards, of a random ``z`` and of ``c ⊙ z`` with random
  per-position scalars ``c``, test it: the layer's output gradient must scale by the ``c`` of a
  single position, a distinct one for each of its positions;
* **samples**: where a layer's position axes could also be read as samples (a length equal to
  ``N``), the same probe with per-sample scalars checks that the first axis is the sample axis.
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from .._errors import FisherError
from ..problems import Prepared, Problem
from . import _tap_layers as layers
from ._tap_estimators import Plan, accumulate
from ._tap_layers import Use
from .cotangents import Kind, position_vectors


class Request(NamedTuple):
    """What to estimate for one parameter.

    ``reduce=None``: the diagonal ``[*P]``; otherwise the group sums ``reduce(diag)`` or, with
    ``mask=True``, the mask importance ``Σ_u (reduce(θ ⊙ G_u))²``.
    """

    reduce: Callable[[Tensor], Tensor] | None = None
    mask: bool = False


class Result(NamedTuple):
    """Unnormalised sums for the parameters the taps serve, and why the others are not served."""

    sums: dict[str, Tensor]
    missing: dict[str, str]


class _Call:
    """One call of a tapped module: its input, output and (after a backward) output gradient."""

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor, keys: dict[str, str]):
        self.module, self.x, self.y, self.keys = module, x, y, keys
        self.g: Tensor | None = None

    def grab(self, grad: Tensor) -> None:
        self.g = grad


@contextmanager
def _tapped(model: nn.Module, key_of: Mapping[int, str], k: layers.Kinds) -> Iterator[list[_Call]]:
    """Record the calls of supported modules whose weight or bias is one of ``key_of``'s tensors.

    Forward hooks and the tensor hooks they add live only inside the ``with`` block; recording
    stops at its end (a re-run forward, e.g. gradient checkpointing, is not recorded).
    """
    calls: list[_Call] = []
    handles: list[Any] = []
    recording = [True]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not recording[0] or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        keys = {attr: key_of[id(t)] for attr in ("weight", "bias")
                if isinstance(t := getattr(module, attr, None), Tensor) and id(t) in key_of}
        if isinstance(x, Tensor) and keys:
            call = _Call(module, x.detach(), output, keys)
            handles.append(output.register_hook(call.grab))
            calls.append(call)

    try:
        for module in model.modules():
            if layers.supported(module, k):
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield calls
    finally:
        recording[0] = False
        for handle in handles:
            handle.remove()


def _owned(model: nn.Module, names: list[str], k: layers.Kinds) -> set[str]:
    """The names whose tensor is the weight or bias of a supported module (ties included)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    by_id = {id(own[n]): n for n in names}
    out = set()
    for module in model.modules():
        if layers.supported(module, k):
            for attr in ("weight", "bias"):
                t = module._parameters.get(attr)
                if t is not None and id(t) in by_id:
                    out.add(by_id[id(t)])
    return out


def _tolerance(dtype: torch.dtype) -> float:
    return min(3 * torch.finfo(dtype).eps ** 0.5, 0.02)


def _flag(missing: dict[str, str], keys: Mapping[str, str], why: str) -> None:
    for name in keys.values():
        missing.setdefault(name, why)


def _scalars(gen: torch.Generator, shape: tuple[int, ...], like: Tensor) -> Tensor:
    return (1 + torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device)).to(like.device)


def _probe(calls: list[_Call], check: list[int], outputs: Tensor, active: Tensor, backward, per_position: bool,
           k: layers.Kinds, tol: float) -> dict[int, tuple[bool, Tensor, Tensor]]:
    """Which calls scale their output gradient by a single position's (or sample's) scalar.

    Returns ``{call index: (ok, kept [N, P], position [N, P])}``: ``kept`` marks the layer
    positions with a non-zero gradient, ``position`` the canonical position each one feeds.
    """
    n, t = active.shape
    gen = torch.Generator(device=outputs.device).manual_seed(0)
    z = torch.randn(outputs.shape, generator=gen, dtype=torch.float64, device=gen.device).to(outputs)
    z = z * active[..., None].to(z.dtype)
    c = _scalars(gen, (n, t if per_position else 1), outputs)
    backward(z)
    before = {i: layers.out_view(calls[i].module, calls[i].g, k) for i in check if calls[i].g is not None}
    backward(z * c.expand(n, t)[..., None].to(z.dtype))
    out = {}
    for i in check:
        g0, g1 = before.get(i), calls[i].g
        if g0 is None or g1 is None:
            continue
        g0, g1 = g0.to(torch.float64), layers.out_view(calls[i].module, g1, k).to(torch.float64)
        gg, gp, pp = (g0 * g0).sum(-1), (g1 * g0).sum(-1), (g1 * g1).sum(-1)  # [N, P]
        res = pp[..., None] - 2 * c[:, None] * gp[..., None] + c[:, None] ** 2 * gg[..., None]  # [N, P, Tc]
        pos = res.argmin(-1)
        cp = torch.gather(c, 1, pos)
        err = ((g1 - cp[..., None] * g0) ** 2).sum(-1)
        scale = pp + cp**2 * gg
        ok = bool((err <= tol**2 * (scale + 1e-6 * scale.max())).all())
        kept = gg > 0
        slots = (torch.arange(n, device=pos.device)[:, None] * t + pos)[kept]
        ok = ok and (not per_position or slots.unique().numel() == slots.numel())
        out[i] = (ok, kept, pos)
    return out


def _covered(use_list: list[Use], grad: Tensor | None, gen: torch.Generator, dtype: torch.dtype, tol: float) -> bool:
    """Whether the uses' summed contributions equal autograd's batch gradient (random projection)."""
    size = use_list[0].size
    if grad is None:
        grad = torch.zeros(size, dtype=dtype, device=use_list[0].a.device)
    grad = grad.to(dtype).reshape(size[0], -1)
    if use_list[0].form == "vector":
        got = sum(u.a.sum((0, 1)) for u in use_list)
        scale = sum(u.a.abs().sum((0, 1)) for u in use_list)
        want, want_scale = grad[:, 0], grad[:, 0].abs()
    else:
        v = torch.randn(size[1], generator=gen, dtype=torch.float64, device=gen.device).to(grad)
        got = torch.zeros(size[0], dtype=dtype, device=grad.device)
        scale = torch.zeros_like(got)
        for u in use_list:
            bv = u.b(0, u.a.shape[0]).to(dtype) @ v  # [N, P]
            if u.form == "outer":
                a = u.a.to(dtype)
                got += torch.einsum("npo,np->o", a, bv)
                scale += torch.einsum("npo,np->o", a.abs(), bv.abs())
            else:
                keep = u.a >= 0
                got.index_add_(0, u.a[keep], bv[keep])
                scale.index_add_(0, u.a[keep], bv[keep].abs())
        want, want_scale = grad @ v, grad.abs() @ v.abs()
    return bool(((got - want).abs() <= tol * (scale + want_scale) + 1e-30).all())


def _units(use_list: list[Use], probes: list[tuple[bool, Tensor, Tensor]], t: int) -> list[Use]:
    """Position mode: one unit per active position (``[N·T, 1]``, or ``[N·P, 1]`` for one use)."""
    out = []
    for u, (_, kept, pos) in zip(use_list, probes, strict=True):
        n, p = u.a.shape[:2]
        b = None if u.b is None else u.b(0, n)
        if len(use_list) == 1:
            flat = u.a.reshape(n * p, 1, *u.a.shape[2:])
            b = None if b is None else b.reshape(n * p, 1, -1)
        else:
            slot = (torch.arange(n, device=pos.device)[:, None] * t + pos)[kept]
            fill = -1 if u.form == "index" else 0
            flat = torch.full((n * t, *u.a.shape[2:]), fill, dtype=u.a.dtype, device=u.a.device)
            flat[slot] = u.a[kept]
            flat = flat[:, None]
            if b is not None:
                bb = torch.zeros((n * t, b.shape[-1]), dtype=b.dtype, device=b.device)
                bb[slot] = b[kept]
                b = bb[:, None]
        out.append(Use(u.form, flat, None if b is None else (lambda lo, hi, b=b: b[lo:hi]), u.size))
    return out


def _plan(use_list: list[Use], request: Request, param: Tensor, dtype: torch.dtype) -> tuple[Plan, Callable | None]:
    """The accumulation for one parameter, and the reduction to apply to its result (if any)."""
    shape = tuple(param.shape)
    vector = use_list[0].form == "vector"
    theta = param.detach().to(dtype).reshape(use_list[0].size)
    if request.reduce is None:
        return Plan("diag"), None
    groups = None if vector else _group_ids(request.reduce, shape, use_list[0].size, param.device)
    if request.mask:
        if groups is None:
            return Plan("mask", theta=theta, reduce=request.reduce, shape=shape), lambda v: v
        axis, gid, count, out_shape = groups
        plan = Plan("mask_" + axis, gid, count, theta)
    else:
        if groups is None:
            return Plan("diag"), lambda d: request.reduce(d.reshape(shape))
        axis, gid, count, out_shape = groups
        plan = Plan(axis, gid, count)
    return plan, lambda v: v.reshape(out_shape)


def _group_ids(reduce: Callable, shape: tuple[int, ...], size: tuple[int, ...], device) -> tuple | None:
    """``("rows" | "cols", id per row/column, number of groups, group shape)``, or ``None`` where the
    groups are not unions of whole rows or columns of the ``[o, i]`` layout.
    """
    zero = torch.zeros(shape, dtype=torch.float64, device=device)
    out, pull = vjp(reduce, zero)
    count = out.numel()
    (gid,) = pull(torch.arange(count, dtype=torch.float64, device=device).reshape(out.shape))
    gid = gid.round().long().reshape(-1)
    probe = torch.arange(1, gid.numel() + 1, dtype=torch.float64, device=device).reshape(shape) % 7
    summed = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, gid, probe.reshape(-1))
    if not torch.equal(reduce(probe).reshape(-1), summed):
        return None
    grid = gid.reshape(size[0], -1)
    if bool((grid == grid[:, :1]).all()):
        return "rows", grid[:, 0], count, out.shape
    if bool((grid == grid[:1]).all()):
        return "cols", grid[0], count, out.shape
    return None


@contextmanager
def _rng_guard(where: str, device: torch.device) -> Iterator[None]:
    """Restore the global random state after the forward; raise if the forward drew from it."""
    cuda = device.type == "cuda"
    before = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    try:
        yield
    finally:
        after = torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
        torch.set_rng_state(before[0])
        if cuda:
            torch.cuda.set_rng_state(before[1], device)
    if not torch.equal(before[0], after[0]) or (cuda and not torch.equal(before[1], after[1])):
        raise FisherError(f"{where}: the model draws random numbers (dropout in train mode?); call model.eval() "
                          "before computing the Fisher")


NO_LAYER = ("no supported layer holds it (Linear, Conv1d/Conv2d with groups=1, Embedding, HF Conv1D, "
            "LayerNorm, RMSNorm)")
OUTSIDE = "its gradient does not all come through tapped layers (also used in other operations)"
MIXING = ("its layer's output at one position feeds the losses of several positions (per='token' and "
          "kind='exact' with sequences need each position's gradient on its own)")
NO_SAMPLES = "its layer's input does not have the sample axis first"
MIXED_FORMS = "it is shared by layers whose contributions cannot be combined (a norm weight and a matrix)"


def estimate(
    problem: Problem,
    params: Mapping[str, Tensor],
    prepared: Prepared,
    requests: Mapping[str, Request],
    *,
    kind: Kind,
    per: str,
    noise: Tensor | None,
    dtype: torch.dtype,
    chunk_size: int | None = None,
    where: str = "taps",
) -> Result:
    """Sums over units of the requested estimators, for the parameters the taps can serve.

    Args:
        problem: the problem.
        params: ``{name: [*P]}``, values of the parameters (the model's own are used for the rest).
        prepared: the batch, from ``problem.prepare``.
        requests: ``{name: Request}`` for the parameters to estimate (a subset of ``params``).
        kind: ``"empirical" | "mc" | "exact"``.
        per: ``"sample" | "token"``.
        noise: ``[S, N, ...]`` for ``kind="mc"`` (the generic engine's), else ``None``.
        dtype: accumulation dtype.
        chunk_size: at most this many samples per chunk where per-sample tensors are formed.
        where: the public function, for error messages.

    Returns:
        :class:`Result`: ``sums`` ``{name: [*P] or [G...]}``, not normalised and for ``mc`` not
        divided by ``S``; ``missing`` ``{name: reason}`` for the parameters left to the generic engine.

    Raises:
        FisherError: non-finite outputs, or random numbers drawn in the forward (dropout in train mode).

    """
    model = problem.model
    k = layers.kinds()
    names = list(requests)
    owned = _owned(model, names, k)
    missing = {name: NO_LAYER for name in names if name not in owned}
    if not owned:
        return Result({}, missing)
    order = [name for name in names if name in owned]
    leaves = {name: params[name].detach().requires_grad_() for name in order}
    values = {**dict(model.named_buffers()), **{n: p.detach() for n, p in params.items()}, **leaves}
    active = prepared.active
    n, t = active.shape
    device = next(iter(leaves.values())).device
    with _tapped(model, {id(x): name for name, x in leaves.items()}, k) as calls, torch.enable_grad():
        with _rng_guard(where, device):
            outputs = problem.forward(model, values, prepared.inputs)
        finite = torch.isfinite(outputs.detach()).reshape(n, -1).all(1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise FisherError(f"{where}: the model's outputs for sample {bad} are not finite")
        targets = prepared.targets
        if not targets.dtype.is_floating_point:  # class indices at inactive positions may be anything
            targets = torch.where(active.reshape(*active.shape, *[1] * (targets.ndim - 2)), targets, 0)
        vectors = position_vectors(problem.likelihood, outputs, targets, active, kind, noise)
        vectors = vectors.to(outputs.dtype)
        per_position = t > 1 and (per == "token" or kind == "exact") and int(active.sum(1).max()) > 1
        inputs = [leaves[name] for name in order]

        def backward(v: Tensor) -> tuple:
            for call in calls:
                call.g = None
            return torch.autograd.grad(outputs, inputs, grad_outputs=v, retain_graph=True, allow_unused=True)

        def uses_of_draw() -> dict[str, list[tuple[int, Use]]]:
            found: dict[str, list[tuple[int, Use]]] = {}
            for i, call in enumerate(calls):
                if call.g is None:
                    continue
                view = layers.out_view(call.module, call.g, k)
                made = {} if view is None or view.shape[0] != n else layers.uses(
                    call.module, call.x, view, call.keys, k, dtype)
                for name in call.keys.values():
                    if name in made:
                        found.setdefault(name, []).append((i, made[name]))
                    else:
                        missing.setdefault(name, NO_SAMPLES)
            return found

        grads = dict(zip(order, backward(vectors[0]), strict=True))
        first = uses_of_draw()
        tol = _tolerance(outputs.dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        zero = set()
        for name in order:
            found = first.get(name, [])
            if not found:
                if grads[name] is None:
                    zero.add(name)
                else:
                    missing.setdefault(name, OUTSIDE)
            elif len({(u.form == "vector", u.size) for _, u in found}) > 1:
                missing.setdefault(name, MIXED_FORMS)
            elif not _covered([u for _, u in found], grads[name], gen, dtype, tol):
                missing.setdefault(name, OUTSIDE)
        served = [name for name in order if name not in missing and name not in zero]
        check = sorted({i for name in served for i, _ in first[name]
                        if per_position or n in layers.position_shape(calls[i].module, calls[i].y, k)})
        probes = _probe(calls, check, outputs, active, backward, per_position, k, tol) if check else {}
        for name in served:
            for i, _ in first[name]:
                if i in check and not probes.get(i, (False,))[0]:
                    missing.setdefault(name, MIXING if per_position else NO_SAMPLES)
        served = [name for name in served if name not in missing]
        plans = {name: _plan([u for _, u in first[name]], requests[name], params[name], dtype) for name in served}
        cap = chunk_size if chunk_size is None or not per_position else chunk_size * t
        sums: dict[str, Tensor] = {}
        for r in range(vectors.shape[0]):
            found = first if r == 0 else (backward(vectors[r]), uses_of_draw())[1]
            for name in served:
                use_list = [u for _, u in found[name]]
                if per_position:
                    use_list = _units(use_list, [probes[i] for i, _ in found[name]], t)
                value = accumulate(use_list, plans[name][0], dtype, cap)
                sums[name] = value if name not in sums else sums[name] + value
            first = {}
    out = {}
    for name in served:
        post = plans[name][1]
        out[name] = sums[name].reshape(params[name].shape) if post is None else post(sums[name])
    for name in zero:
        z = torch.zeros_like(params[name], dtype=dtype)
        request = requests[name]
        out[name] = z if request.reduce is None else request.reduce(z)
    return Result(out, {name: why for name, why in missing.items() if name in requests})


__all__ = ["Request", "Result", "estimate"]
