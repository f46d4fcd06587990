"""The tap engine's checks that a parameter's estimate from taps is exact.

* :func:`graph_covered` (structure, no arithmetic): in the autograd graph of the forward, every
  use of the parameter must lie inside a tapped call of a layer holding it. A weight also used in
  a raw ``F.linear``, a parametrisation or another module's ``forward`` fails.
* :func:`formula_holds` (HuggingFace ``Conv1D`` and ``LlamaRMSNorm`` of exactly those classes): the
  call's first sample, recomputed from the formula the taps assume, must equal its output; such a
  layer is then as trusted as PyTorch's own, at the cost of one sample's forward.
* :func:`sums_match` (arithmetic, for the other layers whose forward is not PyTorch's own:
  subclasses, HuggingFace layers whose output differs from the formula): autograd's batch gradient
  must equal the sum of the taps' contributions, compared through a random projection.
* :func:`probe` (per-sample and per-position structure): the output gradient of a layer for the
  output vector ``c ⊙ z`` must be the one for ``z`` scaled by the ``c`` of a single sample or
  position.
"""

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from . import _tap_layers as layers
from ._tap_layers import Use

# layers whose forward is PyTorch's own: the formulas of _tap_layers hold by construction
TRUSTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, *layers.NORMS)


NEGLIGIBLE = 1e-12  # squared gradients below this share of a layer's largest count as zero (probe)


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the arithmetic checks for a model computing in ``dtype``.

    About the square root of the rounding error, at least ``1e-4`` (float64 models often compute
    norms in float32, and a softmax backward amplifies their rounding: seen up to ``2e-5`` on a
    tiny LLaMA) and at most ``0.02`` (half precision: a layer judged inexact falls back to the
    generic engine, the safe side). A layer that breaks a check does so by ``O(1)``.
    """
    return min(max(3 * torch.finfo(dtype).eps ** 0.5, 1e-4), 0.02)


def trusted(module: nn.Module) -> bool:
    """Whether ``module`` runs PyTorch's own forward of a supported layer (not a subclass's)."""
    return type(module) in TRUSTED and "forward" not in vars(module)


def formula_holds(module: nn.Module, x: Tensor, y: Tensor, k: layers.Kinds) -> bool:
    """Whether a HuggingFace layer's output at the first sample is the taps' formula of its input.

    Only for layers of exactly the HuggingFace class with its own ``forward`` (a subclass may compute
    anything and keeps the arithmetic check of :func:`sums_match`).
    """
    if "forward" in vars(module) or y.ndim == 0 or x.ndim == 0 or x.shape[0] != y.shape[0]:
        return False
    with torch.no_grad():
        ref = layers.recompute(module, x[:1], k)
    if ref is None or ref.shape != y[:1].shape:
        return False
    y0 = y[:1].detach()
    tol = tolerance(y0.dtype)
    return bool(torch.allclose(ref.to(y0.dtype), y0, rtol=tol, atol=tol * float(y0.abs().max())))


def _internal(node, stop) -> set:
    """Autograd nodes created by one call: reachable from its output's node, not through its input."""
    seen, stack = {node}, [node]
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is not None and child is not stop and child not in seen and not hasattr(child, "variable"):
                seen.add(child)
                stack.append(child)
    return seen


def graph_covered(outputs: Tensor, calls: list, leaves: Mapping[str, Tensor],
                  watch: frozenset = frozenset()) -> tuple[set[str], set[str], dict]:
    """Parameters whose every use in the graph of ``outputs`` is inside a tapped call holding them.

    Args:
        outputs: the forward's outputs.
        calls: the tapped calls, with ``node`` (their output's ``grad_fn``), ``stop`` (their input's)
            and ``keys``.
        leaves: ``{name: leaf tensor}`` the forward was evaluated at.
        watch: nodes whose consumers (the nodes with an edge to them) are wanted.

    Returns:
        ``(covered, unused, consumers)``: the names whose uses all lie in tapped calls, the names not
        in the graph at all (their gradient is zero), and ``{watched node: [consumer nodes]}``.

    """
    name_of = {id(t): name for name, t in leaves.items()}
    parents: dict[str, set] = {name: set() for name in leaves}
    consumers: dict = {node: [] for node in watch}
    root = outputs.grad_fn
    seen, stack = {root}, [root] if root is not None else []
    while stack:  # every node once; an edge to a leaf (AccumulateGrad) records its parent
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if consumers and child in consumers:
                consumers[child].append(node)
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in name_of:
                    parents[name_of[id(variable)]].add(node)
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    inside: dict[str, set] = {}
    for call in calls:
        nodes = _internal(call.node, call.stop)
        for name in call.keys.values():
            inside[name] = inside[name] | nodes if name in inside else nodes
    covered = {name for name, p in parents.items() if p and p <= inside.get(name, set())}
    return covered, {name for name, p in parents.items() if not p}, consumers


def used_only_inside(outputs: Tensor, calls: list, leaves: Mapping[str, Tensor]) -> bool:
    """Whether every tapped call's output reaches ``outputs`` and no parameter of ``leaves`` is used in
    their graph outside the calls.

    For calls of PyTorch's own layers, each called once and holding its parameters alone (the plain
    pass of the tap engine): such a call uses its parameters, and its nodes use nothing else, so the
    walk skips from each call's output node to its input's node and only looks at the edges outside
    the calls. :func:`graph_covered` is the general check.
    """
    ids = {id(t) for t in leaves.values()}
    skip = {c.node: c.stop for c in calls}
    reached = 0
    root = outputs.grad_fn
    seen, stack = {root}, [root] if root is not None else []
    while stack:
        node = stack.pop()
        if node in skip:  # a call's own nodes: continue below its input
            reached += 1
            below = skip[node]
            if below is not None and below not in seen:
                seen.add(below)
                stack.append(below)
            continue
        for child, _ in node.next_functions:
            if child is None or child in seen:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                if id(variable) in ids:
                    return False
            else:
                seen.add(child)
                stack.append(child)
    return reached == len(skip)


def roots(stops: list[Tensor]) -> list[Tensor]:
    """The tensors of ``stops`` from whose node no other stop's node can be reached.

    A backward asked for the gradients of these alone still computes every stop's gradient (each
    stop lies on a path to a root), and returns only the roots' (one embedding output instead of
    every layer's output gradient).
    """
    nodes = {t.grad_fn for t in stops if t.grad_fn is not None}
    hit: dict = {}  # node -> whether it is a stop's node or has one below it

    def at_or_below(start) -> bool:  # iterative post-order over the graph, memoised
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or node in hit:
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            if expanded:
                hit[node] = node in nodes or any(hit[child] for child in children)
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in children if child not in hit)
        return hit.get(start, False)

    def below(node) -> bool:
        return any(at_or_below(child) for child, _ in node.next_functions if child is not None)

    return [t for t in stops if t.grad_fn is None or not below(t.grad_fn)]


def sums_match(use_list: list[Use], grad: Tensor | None, gen: torch.Generator, dtype: torch.dtype,
               tol: float) -> bool:
    """Whether the uses' summed contributions equal autograd's batch gradient ``grad``.

    Compared through a random projection ``v`` of the columns: ``Σ_p a_p (b_p · v)`` against
    ``grad v``, entrywise within ``tol`` times the sum of the absolute terms.
    """
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


def _scalars(n: int, t: int, per_position: bool, tol: float, gen: torch.Generator) -> Tensor:
    """The probe's scalars ``c`` ``[N, T]`` (per position) or ``[N, 1]`` (per sample), float64.

    Any two that a layer could mix (the positions of one sample, or the samples) differ by a factor
    ``b`` of at least ``1 + 10·tol`` (random values in ``[1, 2)`` can fall within a low-precision
    model's tolerance of each other), and they spread over a range of ``10³`` where there are few:
    the powers ``b^k`` of a random order of them, ``b = max(1 + 10·tol, 1000^(1/(count − 1)))``.
    Exponents wrap around beyond a range of ``10⁶``.
    """
    count = t if per_position else n
    base = max(1 + 10 * tol, 1e3 ** (1 / max(count - 1, 1)))
    wrap = max(2, int(math.log(1e6) / math.log(base)) + 1)
    shape = (n, t) if per_position else (1, n)
    rank = torch.argsort(torch.rand(shape, generator=gen, dtype=torch.float64, device=gen.device), dim=1)
    c = base ** (rank % wrap).to(torch.float64)
    return c if per_position else c.reshape(n, 1)


def probe(calls: list, check: list[int], outputs: Tensor, active: Tensor, backward: Callable[[Tensor], None],
          per_position: bool, k: layers.Kinds, tol: float) -> dict[int, tuple[bool, Tensor, Tensor]]:
    """Which calls scale their output gradient by a single position's (or sample's) scalar.

    Two backwards, of a random ``z`` (zero at inactive positions) and of ``c ⊙ z`` with random
    ``c`` per sample and position (per sample only, unless ``per_position``). A call passes when,
    at each of its positions ``p`` of sample ``n``, the second gradient is ``c_{n,t}`` times the first
    for some position ``t`` of the same sample, and (``per_position``) no two positions with a
    non-zero gradient share a ``t``.

    Positions whose squared gradients are below ``NEGLIGIBLE`` times the call's largest are left
    out (their share of any estimate is below that), so rounding noise around a zero gradient does
    not fail a layer.

    Returns:
        ``{call index: (ok, kept [N, P], position [N, P])}``: ``kept`` marks the layer positions
        with a non-negligible gradient, ``position`` the canonical position ``t`` each one feeds.

    """
    n, t = active.shape
    gen = torch.Generator(device=outputs.device).manual_seed(0)
    z = torch.randn(outputs.shape, generator=gen, dtype=torch.float64, device=gen.device).to(outputs)
    z = z * active[..., None].to(z.dtype)
    c = _scalars(n, t, per_position, tol, gen)
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
        res = pp[..., None] - 2 * c[:, None] * gp[..., None] + c[:, None] ** 2 * gg[..., None]  # [N, P, t]
        pos = res.argmin(-1)
        cp = torch.gather(c, 1, pos)
        err = ((g1 - cp[..., None] * g0) ** 2).sum(-1)
        scale = pp + cp**2 * gg
        kept = scale > NEGLIGIBLE * scale.max()  # the others are rounding noise around a zero gradient
        ok = bool((err[kept] <= tol**2 * scale[kept]).all())
        slots = (torch.arange(n, device=pos.device)[:, None] * t + pos)[kept]
        ok = ok and (not per_position or slots.unique().numel() == slots.numel())
        out[i] = (ok, kept, pos)
    return out


__all__ = ["NEGLIGIBLE", "TRUSTED", "graph_covered", "formula_holds", "probe", "roots", "sums_match", "tolerance",
           "trusted", "used_only_inside"]
