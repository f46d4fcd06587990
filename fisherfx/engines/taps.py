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

* **coverage**: every use of the parameter in the forward's autograd graph must lie inside a
  tapped call of a layer holding it, so a weight also used outside its layer (a raw ``F.linear``,
  a parametrisation) is detected; for layers whose forward is not PyTorch's own (subclasses,
  HuggingFace layers) autograd's batch gradient must also equal the sum of the taps'
  contributions (:mod:`._tap_checks`);
* **positions**: ``per="token"`` and ``kind="exact"`` with ``T > 1`` need each active position's
  gradient on its own. Through taps that is exact only for a layer whose output at one position
  feeds the loss of one position only (position-wise layers after the last attention, or models
  without attention); two extra backwards, of a random ``z`` and of ``c ⊙ z`` with random
  per-position scalars ``c``, test it: the layer's output gradient must scale by the ``c`` of a
  single position, a distinct one for each of its positions;
* **samples**: where a layer's position axes could also be read as samples (a length equal to
  ``N``), the same probe with per-sample scalars checks that the first axis is the sample axis.

Models made of PyTorch's own layers, each called once, first try the *plain pass*
(:mod:`._tap_plain`), which needs none of these hooks and probes; this module holds the *full pass*
above and the entry point, :func:`estimate`. What both share is in :mod:`._tap_common`.
"""

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._tree import map_tensors, tensors
from .._walk import ModelIndex, walk
from ..problems import Prepared, Problem
from . import _tap_checks as checks
from . import _tap_common as common
from . import _tap_kfac as kfac_taps
from . import _tap_layers as layers
from . import _tap_plain
from ._tap_common import (  # the shared pieces, under the names other modules use
    MIXED_FORMS,
    MIXING,
    NO_LAYER,
    NO_SAMPLES,
    OUTSIDE,
    VECTOR_CHUNK,
    Consumer,
    Request,
    Result,
    check_outputs,
    guarded_forward,
    output_vectors,
    refusal,
)
from ._tap_estimators import Workspace, group_reduce, position_units
from ._tap_layers import Use
from .cotangents import Kind


class _Call:
    """One call of a tapped module: input, output, their autograd nodes and the output gradient.

    A *broadcast* call has an output with a sample axis of length 1 that the model broadcasts over
    the batch (GPT-2's position embeddings): its per-sample gradient ``g`` is the gradient of the
    one operation consuming the output (an addition, checked by :func:`_broadcast_ok`), and its
    own output's gradient ``total`` is that summed over the samples.
    """

    def __init__(self, module: nn.Module, x: Tensor, y: Tensor, keys: dict[str, str], n: int):
        self.module, self.x, self.keys = module, x.detach(), keys
        # the output is held only where nothing tapped lies below it (a first layer): the others need not
        # outlive the forward (their hooks stay on the nodes), and :meth:`_Run.covered` reaches them from x
        self.y: Tensor | None = y if x.grad_fn is None else None
        self.y_weak = weakref.ref(y)
        self.x_graph = x if x.grad_fn is not None else None  # the input, where the backward may stop instead
        self.y_shape = tuple(y.shape)
        self.changed = False  # its output was changed in place after the call (set once the forward is over)
        self.node, self.stop = y.grad_fn, x.grad_fn  # the call's nodes lie between these two
        self.version = y._version  # an in-place change of the output afterwards changes it
        self.x_version = x._version  # an in-place change of the input would change what was kept
        self.broadcast = y.ndim > 0 and y.shape[0] == 1 and n > 1
        if self.broadcast:
            self.x = self.x.expand(n, *self.x.shape[1:]) if self.x.ndim > 0 and self.x.shape[0] == 1 else self.x
        self.g: Tensor | None = None
        self.total: Tensor | None = None
        self.trusted = False  # the layer's formulas hold by construction or were checked on the call
        self.sink: Any = None  # consumes the output gradient during the backward instead of keeping it
        self.fired = False  # the sink ran in the last backward

    def grab(self, grad: Tensor) -> None:
        if self.broadcast:
            self.total = grad
        elif self.sink is not None:
            self.fired = True
            self.sink(self, grad)
        else:
            self.g = grad

    def grab_consumer(self, grads: tuple) -> None:
        self.g = grads[0] if len(grads) == 1 else None


class _Tape(NamedTuple):
    calls: list[_Call]
    handles: list[Any]


@contextmanager
def _tapped(modules: list[nn.Module], key_of: Mapping[int, str], k: layers.Kinds, n: int) -> Iterator[_Tape]:
    """Record the calls of supported modules whose weight or bias is one of ``key_of``'s tensors.

    The forward hooks run before any other forward hook (they see the layer's own output), and
    they, the tensor hooks they add and any hook added to ``handles`` live only inside the
    ``with`` block; recording stops at its end (a forward re-run in a backward, e.g. gradient
    checkpointing, is not recorded).
    """
    tape = _Tape([], [])
    calls, handles = tape
    recording = [True]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not recording[0] or not isinstance(output, Tensor) or output.grad_fn is None:
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        keys = {attr: key_of[id(t)] for attr in ("weight", "bias")
                if isinstance(t := getattr(module, attr, None), Tensor) and id(t) in key_of}
        if isinstance(x, Tensor) and keys:
            call = _Call(module, x, output, keys, n)
            call.trusted = checks.trusted(module) or checks.formula_holds(module, x, output, k)
            handles.append(output.register_hook(call.grab))
            calls.append(call)

    try:
        for module in modules:
            handles.append(module.register_forward_hook(hook, with_kwargs=True, prepend=True))
        yield tape
    finally:
        recording[0] = False
        for handle in handles:
            handle.remove()


def _broadcast_ok(call: _Call, n: int, tol: float) -> bool:
    """Whether a broadcast call's per-sample gradient sums to its output's gradient."""
    g, total = call.g, call.total
    if g is None or total is None or g.shape != (n, *total.shape[1:]):
        return False
    summed = g.sum(0, keepdim=True)
    return bool(((summed - total).abs() <= tol * g.abs().sum(0, keepdim=True) + 1e-30).all())


def _flag(missing: dict[str, str], keys: Mapping[str, str], why: str) -> None:
    for name in keys.values():
        missing.setdefault(name, why)


class _Run:
    """One forward's graph and tapped calls: the backwards through it and the uses they give."""

    def __init__(self, outputs: Tensor, tape: _Tape, leaves: dict[str, Tensor], k: layers.Kinds, n: int,
                 dtype: torch.dtype):
        self.outputs, self.tape, self.leaves, self.k, self.n, self.dtype = outputs, tape, leaves, k, n, dtype
        self.calls = tape.calls
        self.stops: list[Tensor] = []
        self.final = False  # the backward running is the last one

    def covered(self, order: list[str], missing: dict[str, str]) -> tuple[list[str], set[str]]:
        """Graph check; keep the calls of covered parameters and decide where backwards stop.

        Returns:
            The covered names (in order) and the names the forward does not use (zero gradient).

        """
        watch = frozenset(c.node for c in self.calls if c.broadcast)
        covered, zero, consumers = checks.graph_covered(self.outputs, self.calls, self.leaves, watch)
        missing.update({name: OUTSIDE for name in order if name not in covered and name not in zero})
        todo = [name for name in order if name in covered]
        self.calls = [c for c in self.calls if set(c.keys.values()) & set(todo)]
        for c in self.calls:
            if c.broadcast and len(consumers[c.node]) == 1:
                self.tape.handles.append(consumers[c.node][0].register_prehook(c.grab_consumer))
        # backwards stop at the tapped outputs (no weight gradients), except at outputs changed in place;
        # only the outputs that reach no other stop are asked for, so autograd returns (and keeps) few
        anchors = []
        for c in self.calls:
            y = c.y if c.y is not None else c.y_weak()  # an output nobody holds cannot have changed
            c.changed = y is not None and y._version != c.version
            if not c.changed:  # the backward must reach the call's output: ask for it, or for its input
                anchors.append(y if y is not None else c.x_graph)
        stops = checks.roots([a for a in anchors if a is not None])
        kept = {id(t) for t in stops}
        for c in self.calls:  # only the roots are held from here on
            if id(c.y) not in kept:
                c.y = None
            if id(c.x_graph) not in kept:
                c.x_graph = None
        stops += list({id(self.leaves[m]): self.leaves[m] for c in self.calls if c.changed
                       for m in c.keys.values()}.values())
        self.stops = stops
        return todo, zero

    def untrusted(self, todo: list[str]) -> list[str]:
        """The names held by a call whose formulas neither hold by construction nor were checked."""
        return [name for name in todo if any(name in c.keys.values() and not c.trusted
                                             for c in self.calls)]

    def backward(self, v: Tensor, extra: tuple = (), stream: bool = False, last: bool = False) -> tuple:
        """Backward of ``Σ v ⊙ outputs``: fills each call's ``g`` (or feeds its sink, with ``stream``);
        returns the gradients of ``extra``. The ``last`` backward frees the graph as it goes.
        """
        self.final = last
        sinks = {}
        for call in self.calls:
            call.g = call.total = None
            call.fired = False
            if not stream and call.sink is not None:  # probes read g; a sink would count them as draws
                sinks[id(call)], call.sink = call.sink, None
        try:
            if not self.stops and not extra:
                return ()
            grads = torch.autograd.grad(self.outputs, [*self.stops, *extra], grad_outputs=v, retain_graph=not last,
                                        allow_unused=True)
        finally:
            for call in self.calls:
                call.sink = sinks.get(id(call), call.sink)
        return grads[len(self.stops):]

    def read(self, call: _Call, grad: Tensor) -> dict[str, Use] | None:
        """One call's contributions for its output gradient ``grad``: ``None`` where the gradient has
        no sample axis this engine can read, ``{}`` where its input cannot be read per sample.
        """
        view = layers.out_view(call.module, grad, self.k)
        if view is None:
            return None
        if view.shape[0] != self.n or call.x._version != call.x_version:
            return {}
        return layers.uses(call.module, call.x, view, call.keys, self.k, self.dtype)

    def uses(self, missing: dict[str, str]) -> dict[str, list[tuple[int, Use]]]:
        """``{name: [(call index, Use)]}`` of the last backward; unreadable calls flag their names."""
        found: dict[str, list[tuple[int, Use]]] = {}
        for i, call in enumerate(self.calls):
            made = None if call.g is None else self.read(call, call.g)
            if made is None:
                continue
            for name in call.keys.values():
                if name in made:
                    found.setdefault(name, []).append((i, made[name]))
                else:
                    missing.setdefault(name, NO_SAMPLES)
        return found

    def stream(self, todo: list[str], check: set[int], sink: Any) -> set[str]:
        """Give ``sink`` the calls whose gradients can be consumed during the backward: trusted, not
        broadcast, not probed, output unchanged, each name held by that call alone. Returns their names.
        """
        count: dict[str, int] = {}
        for c in self.calls:
            for name in c.keys.values():
                count[name] = count.get(name, 0) + 1
        names: set[str] = set()
        for i, c in enumerate(self.calls):
            held = list(c.keys.values())
            if (c.trusted and not c.broadcast and i not in check and not c.changed
                    and all(count[m] == 1 and m in todo for m in held)):
                c.sink = sink
                names.update(held)
        return names

    def first_draw(self, todo: list[str], v: Tensor, missing: dict[str, str], tol: float, last: bool) -> dict:
        """The first backward, with the arithmetic checks (broadcast calls, non-PyTorch layers)."""
        untrusted = self.untrusted(todo)
        grads = dict(zip(untrusted, self.backward(v, tuple(self.leaves[m] for m in untrusted), stream=True,
                                                  last=last), strict=True))
        for c in self.calls:
            if c.sink is not None and not c.fired:
                _flag(missing, c.keys, OUTSIDE)
        for c in self.calls:
            if c.broadcast and not _broadcast_ok(c, self.n, tol):
                c.g = None
                _flag(missing, c.keys, NO_SAMPLES)
        found = self.uses(missing)
        gen = torch.Generator(device=v.device).manual_seed(0)
        streamed = {m for c in self.calls if c.sink is not None for m in c.keys.values()}
        for name in todo:
            use_list = [u for _, u in found.get(name, [])]
            if name in streamed:
                continue
            if not use_list:
                missing.setdefault(name, OUTSIDE)
            elif len({(u.form == "vector", u.size) for u in use_list}) > 1:
                missing.setdefault(name, MIXED_FORMS)
            elif name in grads and not checks.sums_match(use_list, grads[name], gen, self.dtype, tol):
                missing.setdefault(name, OUTSIDE)
        return found


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
    split_positions: bool = False,
    index: ModelIndex | None = None,
    consume: "Consumer | None" = None,
    scale: float = 1.0,
) -> Result:
    """Sums over units of the requested estimators, for the parameters the taps can serve.

    Units are samples, or active positions for ``per="token"`` and ``kind="exact"`` when ``T > 1``
    (and some sample has more than one active position).

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
        split_positions: each output vector becomes one vector per active position
            (:class:`._tap_kfac.PositionSplit`) and units are samples: K-FAC's ``kind="exact"``.
        index: the model's :func:`~fisherfx._walk.walk`, when the caller has one.
        scale: every sum comes out multiplied by it, e.g. the normaliser ``1/Z`` (a ``Linear`` with one
            position per sample scales its ``g²`` once for weight and bias). Estimators only: not with
            ``consume`` or K-FAC factors.
        consume: instead of the requested estimators, hand every output vector's uses to this
            :data:`Consumer` (the curvature products of :mod:`._tap_products`); ``requests`` then only
            name the parameters.

    Returns:
        :class:`Result`: ``sums`` ``{name: [*P] or [G...]}``, times ``scale`` (otherwise not normalised,
        and for ``mc`` not divided by ``S``); ``missing`` ``{name: reason}`` for the parameters left to
        the generic engine.
        With ``consume``, ``sums`` holds a zero scalar per parameter served (its uses went to ``consume``).

    Raises:
        FisherError: non-finite outputs, or random numbers drawn in the forward (dropout in train mode).

    """
    n, t = prepared.active.shape
    per_position = not split_positions and units_are_positions(prepared, kind, per)
    index = walk(problem.model) if index is None else index
    extra = 0 if per_position or consume is not None else padding(prepared)
    batch_inputs = prepared.inputs  # what a failed forward's message shows: the caller's batch
    if extra:  # one pass over the batch and inactive copies of its first sample, whose size no axis shares
        prepared, noise = _padded(prepared, noise, extra)
    cut = None if per_position or consume is None else split_point(prepared)
    if cut is None:
        return _estimate(problem, params, prepared, requests, kind=kind, per_position=per_position, noise=noise,
                         dtype=dtype, chunk_size=chunk_size, where=where, split_positions=split_positions,
                         index=index, consume=consume, scale=scale, batch_inputs=batch_inputs)
    parts = [_estimate(problem, params, _part(prepared, lo, hi), requests, kind=kind, per_position=False,
                       noise=None if noise is None else noise[:, lo:hi], dtype=dtype, chunk_size=chunk_size,
                       where=where, offset=lo, split_positions=split_positions, index=index, consume=consume,
                       scale=scale, batch_inputs=batch_inputs)
             for lo, hi in ((0, cut), (cut, n))]
    missing = {**parts[1].missing, **parts[0].missing}
    sums = {name: kfac_taps.add(parts[0].sums[name], parts[1].sums[name], requests[name].factors) for name in requests
            if name in parts[0].sums and name in parts[1].sums}
    return Result(sums, {name: missing[name] for name in requests if name not in sums}, parts[0].width)


def units_are_positions(prepared: Prepared, kind: str, per: str) -> bool:
    """Whether the units of :func:`estimate` are active positions (``per="token"`` or ``kind="exact"`` with some
    sample holding several), which the engine checks with two extra backwards per call.
    """
    active = prepared.active
    return active.shape[1] > 1 and (per == "token" or kind == "exact") and int(active.sum(1).max()) > 1


def _lengths(prepared: Prepared) -> set[int]:
    """The lengths a layer's position axes may have: the targets' positions and the inputs' axes after
    the first, but the last of a floating-point input (its features: an MLP whose batch is as wide as
    its input is not ambiguous). A position axis made inside the model is still caught by the probes.
    """
    lengths = {d for x in tensors(prepared.inputs) for d in x.shape[1:-1 if x.is_floating_point() else None]}
    return lengths | set(prepared.active.shape[1:])


def padding(prepared: Prepared) -> int:
    """How many inactive copies of the first sample make the batch size differ from every length of
    :func:`_lengths` (0 where it does already).

    A layer output ``[N, T, d]`` with ``N = T`` could also hold its samples on the second axis, which
    only two probe backwards could rule out. A batch of ``N + k`` samples, the ``k`` added ones with
    no active position (their output vectors are zero: they add nothing to any sum and draw no MC
    label), makes the sample axis unambiguous from the shapes for ``k/N`` more work in one pass.
    """
    n, lengths = prepared.active.shape[0], _lengths(prepared)
    extra = 0
    while n + extra in lengths:
        extra += 1
    return extra


def _padded(prepared: Prepared, noise: Tensor | None, extra: int) -> tuple[Prepared, Tensor | None]:
    """``prepared`` with ``extra`` inactive copies of its first sample at the end (see :func:`padding`)."""
    def grow(x: Tensor) -> Tensor:
        return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])

    active = torch.cat([prepared.active, prepared.active.new_zeros((extra, *prepared.active.shape[1:]))])
    if noise is not None:
        noise = torch.cat([noise, noise.new_zeros((noise.shape[0], extra, *noise.shape[2:]))], 1)
    return Prepared(map_tensors(grow, prepared.inputs), grow(prepared.targets), active), noise


def split_point(prepared: Prepared) -> int | None:
    """Where to cut a batch whose size ``N`` equals a length of :func:`_lengths`, or ``None``: two parts
    whose sizes differ from every such length (a product's consumer, which reads its uses per sample of
    the batch, gets those instead of :func:`padding`).
    """
    n = prepared.active.shape[0]
    lengths = _lengths(prepared)
    if n not in lengths:
        return None
    for cut in sorted(range(1, n), key=lambda c: abs(2 * c - n)):
        if cut not in lengths and n - cut not in lengths:
            return cut
    return None


def _part(prepared: Prepared, lo: int, hi: int) -> Prepared:
    return Prepared(map_tensors(lambda x: x[lo:hi], prepared.inputs), prepared.targets[lo:hi], prepared.active[lo:hi])


def _estimate(problem: Problem, params: Mapping[str, Tensor], prepared: Prepared, requests: Mapping[str, Request], *,
              kind: Kind, per_position: bool, noise: Tensor | None, dtype: torch.dtype, chunk_size: int | None,
              where: str, index: ModelIndex, offset: int = 0, split_positions: bool = False,
              consume: "Consumer | None" = None, scale: float = 1.0, batch_inputs: Any = None) -> Result:
    """:func:`estimate` on one batch (samples ``offset + …`` of the caller's, for messages); with
    ``per_position`` each active position is a unit of its own. ``batch_inputs``: the caller's whole
    batch, which a failed forward's message shows (default ``prepared.inputs``).
    """
    k = layers.kinds()
    owners = common.owned(index, list(requests), k)
    owned, holders = owners.names, owners.holders
    missing = {name: NO_LAYER for name in requests if name not in owned}
    order = [name for name in requests if name in owned]
    if not order:
        return Result({}, missing)
    if not per_position and not split_positions:
        plain = _tap_plain.plain(problem, params, prepared, requests, order, owners, missing, k, kind=kind,
                                 noise=noise, dtype=dtype, chunk_size=chunk_size, where=where, index=index,
                                 offset=offset, consume=consume, scale=scale, batch_inputs=batch_inputs)
        if plain is not None:
            return plain
    leaves = {name: params[name].detach().requires_grad_() for name in order}
    values = {**index.buffers, **{n: p.detach() for n, p in params.items()}, **leaves}
    active = prepared.active
    n, t = active.shape
    device = leaves[order[0]].device
    with _tapped(holders, {id(x): name for name, x in leaves.items()}, k, n) as tape, torch.enable_grad():
        outputs = common.guarded_forward(where, problem, values, prepared.inputs, device, batch_inputs)
        common.check_forward(where, problem, outputs, prepared, offset)
        run = _Run(outputs, tape, leaves, k, n, dtype)
        todo, zero = run.covered(order, missing)  # first: it lets go of the layer outputs autograd does not keep
        vectors = common.output_vectors(problem, outputs, prepared, kind, noise)
        if split_positions:
            vectors = kfac_taps.PositionSplit(vectors, active)
        draws = vectors.shape[0]
        tol = checks.tolerance(outputs.dtype)
        check = {i for i, c in enumerate(run.calls)
                 if per_position or n in layers.position_shape(c.module, c.y_shape, k)}
        cap = chunk_size * t if chunk_size is not None and per_position else chunk_size
        sums: dict[str, Tensor] = {}
        plans: dict[str, tuple] = {}
        ws = Workspace()

        def sink(call: _Call, grad: Tensor) -> None:
            """Accumulate one call's contribution as its gradient arrives (then it is freed)."""
            made = run.read(call, grad) or {}
            for name in call.keys.values():
                if name not in made:
                    missing.setdefault(name, NO_SAMPLES)
                    continue
                if name not in plans:
                    plans[name] = common.plan([made[name]], requests[name], params[name], dtype, active)
                part = common.accumulate_any([made[name]], plans[name][0], dtype, cap, ws)
                sums[name] = part if name not in sums else sums[name] + part
            if run.final:  # the call's tensors are not needed again: autograd may free them as it goes
                call.x = call.y = call.x_graph = None

        streamed = set() if per_position or consume is not None else run.stream(todo, check, sink)
        found = run.first_draw(todo, vectors[0], missing, tol, last=draws == 1 and not check)
        todo = [name for name in todo if name not in missing]
        check = sorted(i for i in check if set(run.calls[i].keys.values()) & set(todo))
        probes = checks.probe(run.calls, check, outputs, active, run.backward, per_position, k, tol) if check else {}
        for name in todo:
            if any(i in check and not probes.get(i, (False,))[0] for i, _ in found.get(name, [])):
                missing.setdefault(name, MIXING if per_position else NO_SAMPLES)
        todo = [name for name in todo if name not in missing]
        plans.update({name: common.plan([u for _, u in found[name]], requests[name], params[name], dtype, active)
                      for name in todo if name not in streamed and consume is None})
        calls_of = {name: [i for i, _ in found.get(name, [])] for name in todo}
        for r in range(draws):
            if r > 0:
                run.backward(vectors[r], stream=True, last=r == draws - 1)
                found = run.uses({})
                for name in todo:  # the same calls serve every draw, or a term would be dropped
                    fired = all(c.fired for c in run.calls if c.sink is not None and name in c.keys.values())
                    if [i for i, _ in found.get(name, [])] != calls_of[name] or not fired:
                        raise RuntimeError(f"{where}: tap engine invariant broken: draw {r} reached other calls "
                                           f"of {name!r} than draw 0 (please report)")
            if consume is not None:
                consume(offset, r, {name: [(u, probes[i][2] if per_position else None) for i, u in found.get(name, [])]
                                    for name in todo})
                found = {}
                continue
            for name in todo:
                if name in streamed:
                    continue
                use_list = [u for _, u in found.get(name, [])]
                if per_position:
                    use_list = position_units(use_list, [probes[i] for i, _ in found.get(name, [])], t)
                if use_list:
                    part = common.accumulate_any(use_list, plans[name][0], dtype, cap, ws)
                    sums[name] = part if name not in sums else sums[name] + part
            found = {}
    if consume is not None:
        sums = {name: outputs.new_zeros((), dtype=dtype) for name in (*todo, *zero)}
        return Result(sums, {name: missing[name] for name in requests if name in missing and name not in sums},
                      outputs.shape[-1])
    out = {}
    for name in todo:
        if name not in sums:  # no unit reached it (all its gradients were zero)
            sums[name] = torch.zeros((), dtype=dtype, device=device)
        post = plans[name][1]
        out[name] = sums[name].reshape(params[name].shape) if post is None else post(sums[name])
    if scale != 1.0:
        out = {name: value.mul_(scale) for name, value in out.items()}
    for name in zero:
        z, request = torch.zeros_like(params[name], dtype=dtype), requests[name]
        out[name] = z if request.pattern is None else group_reduce(request.pattern, request.sizes)(z)
    return Result(out, {name: missing[name] for name in requests if name in missing and name not in out},
                  outputs.shape[-1])


__all__ = ["MIXED_FORMS", "MIXING", "NO_LAYER", "NO_SAMPLES", "OUTSIDE", "VECTOR_CHUNK", "Consumer", "Request",
           "Result", "check_outputs", "estimate", "guarded_forward", "output_vectors", "padding", "refusal",
           "split_point", "units_are_positions"]
