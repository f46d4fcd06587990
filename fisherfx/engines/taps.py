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
"""

import math
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._errors import FisherError
from .._tree import map_tensors, tensors
from .._walk import ModelIndex, walk
from ..likelihoods import check_classes, check_shapes
from ..problems import Prepared, Problem, forward_failure
from . import _tap_checks as checks
from . import _tap_kfac as kfac_taps
from . import _tap_layers as layers
from ._tap_estimators import Workspace, accumulate, group_reduce, grouped, make_plan, one_position, position_units
from ._tap_layers import Use
from .cotangents import Kind, position_vectors


class Request(NamedTuple):
    """What to estimate for one parameter.

    ``pattern=None``: the diagonal ``[*P]``; otherwise, with ``R`` the einops ``sum`` reduction by
    ``pattern`` and ``sizes``, the group sums ``R(diag)`` or, with ``mask=True``, the mask
    importance ``Σ_u R(θ ⊙ G_u)²``. With ``factors`` (a :class:`._tap_kfac.FactorRequest`) instead:
    the parameter's K-FAC factor sums (:class:`._tap_kfac.FactorSums`), or with a basis EKFAC's diagonal.
    """

    pattern: str | None = None
    sizes: Mapping[str, int] = {}  # never mutated (a NamedTuple default is shared); kept picklable
    mask: bool = False
    factors: kfac_taps.FactorRequest | None = None


Consumer = Callable[[int, int, dict[str, list[tuple[Use, Tensor | None]]]], None]
"""``consume(offset, draw, uses)``: the uses of one output vector (``draw``) for the samples ``offset + …``
of the batch, ``{name: [(Use, positions)]}`` with ``positions`` ``[N, P]`` the canonical position each
layer position feeds (units are active positions), or ``None`` (units are samples). The uses stay
valid after the call."""


class Result(NamedTuple):
    """Unnormalised sums for the parameters the taps serve, and why the others are not served."""

    sums: dict[str, Tensor]  # a FactorSums for a factors request
    missing: dict[str, str]
    width: int | None = None  # C, the outputs per position, when the engine ran its forward (checked)


def check_outputs(where: str, problem: Problem, outputs: Tensor, prepared: Prepared) -> None:
    """Raise :class:`FisherError` unless the canonical ``outputs`` ``[N, T, C]`` fit the targets and
    every active target is a value the likelihood can take.
    """
    check_shapes(problem.likelihood, outputs, prepared.targets, where)
    check_classes(problem.likelihood, outputs, prepared.targets, prepared.active, where)


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


class _Owners(NamedTuple):
    """The supported layers holding the requested parameters (see :func:`_owned`)."""

    names: set[str]  # the requested names some supported layer holds (ties included)
    holders: list[nn.Module]  # those layers, each once
    keys: list[dict[str, str]]  # per holder, ``{"weight" | "bias": name}`` of the requested names it holds
    plain: bool  # every holder runs PyTorch's own forward and every such name sits in one holder slot


def _owned(index: ModelIndex, names: list[str], k: layers.Kinds) -> _Owners:
    """The supported layers holding a requested name, in one pass over the model's modules."""
    own = index.params
    by_id = {id(own[n]): n for n in names}
    out: set[str] = set()
    holders, keys = [], []
    slots = 0
    plain = len(by_id) == len(names)  # no two requested names are one tensor
    for module in index.modules:
        if layers.supported(module, k):
            held = {attr: by_id[id(t)] for attr in ("weight", "bias")
                    if (t := module._parameters.get(attr)) is not None and id(t) in by_id}
            if held:
                out.update(held.values())
                holders.append(module)
                keys.append(held)
                slots += len(held)
                plain = plain and checks.trusted(module)
    return _Owners(out, holders, keys, plain and slots == len(out))


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` of two byte tensors, compared 8 bytes at a time where their length allows."""
    if a.numel() == b.numel() and a.numel() % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    return torch.equal(a, b)


def _restored(before: tuple, device: torch.device) -> bool:
    """Whether the global random state moved since ``before`` (then it is put back)."""
    cuda = device.type == "cuda"
    moved = not _same_bytes(before[0], torch.get_rng_state()) or (
        cuda and not _same_bytes(before[1], torch.cuda.get_rng_state(device)))
    if moved:
        torch.set_rng_state(before[0])
        if cuda:
            torch.cuda.set_rng_state(before[1], device)
    return moved


def guarded_forward(where: str, problem: Problem, values: Mapping[str, Tensor], inputs: Any, device: torch.device,
                    batch_inputs: Any = None) -> Tensor:
    """``problem.forward`` on ``inputs`` with the global random state kept: a forward that draws from it
    (dropout in train mode) is refused and the state restored. A forward that raises becomes
    :func:`~fisherfx.problems.forward_failure`'s error, which shows ``batch_inputs`` (default ``inputs``),
    the batch's own shapes.
    """
    before = torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        outputs = problem.forward(problem.model, values, inputs)
    except FisherError:
        raise
    except Exception as err:
        raise forward_failure(where, problem, values, inputs if batch_inputs is None else batch_inputs, err) from err
    finally:
        drew = _restored(before, device)
    if drew:
        raise FisherError(f"{where}: the model draws random numbers (dropout in train mode?); call model.eval() "
                          "before computing the Fisher")
    return outputs


def output_vectors(problem: Problem, outputs: Tensor, prepared: Prepared, kind: Kind, noise: Tensor | None) -> Tensor:
    """The estimator's output vectors ``[R, N, T, C]`` (:func:`.cotangents.position_vectors`)."""
    targets, active = prepared.targets, prepared.active
    full = bool(active.all())  # no position to mask (and no class index to sanitise)
    if not full and not targets.dtype.is_floating_point:  # class indices at inactive positions may be anything
        targets = torch.where(active.reshape(*active.shape, *[1] * (targets.ndim - 2)), targets, 0)
    n = outputs.shape[0]
    step = max(1, VECTOR_CHUNK // max(outputs.numel() // max(n, 1), 1))  # samples whose temporaries stay small
    if step >= n:
        return position_vectors(problem.likelihood, outputs, targets, active, kind, noise, masked=not full).to(
            outputs.dtype)
    parts = []
    for lo in range(0, n, step):  # a language model's softmax and sampling temporaries, a few rows at a time
        z = None if noise is None else noise[:, lo:lo + step]
        parts.append(position_vectors(problem.likelihood, outputs[lo:lo + step], targets[lo:lo + step],
                                      active[lo:lo + step], kind, z, masked=not full).to(outputs.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


VECTOR_CHUNK = 1 << 21  # output entries per chunk when the output vectors are formed


NO_LAYER = ("no supported layer holds it (Linear, Conv1d/Conv2d with groups=1, Embedding, HF Conv1D, "
            "LayerNorm, RMSNorm, LlamaRMSNorm)")
OUTSIDE = "its gradient does not all come through tapped layers (also used in other operations)"
MIXING = ("its layer's output at one position feeds the losses of several positions (per='token' and "
          "kind='exact' with sequences need each position's gradient on its own)")
NO_SAMPLES = "its layer's input cannot be read per sample (no sample axis first, or changed in place after the call)"
MIXED_FORMS = "it is shared by layers whose contributions cannot be combined (a norm weight and a matrix)"


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
        :class:`Result`: ``sums`` ``{name: [*P] or [G...]}``, not normalised and for ``mc`` not
        divided by ``S``; ``missing`` ``{name: reason}`` for the parameters left to the generic engine.
        With ``consume``, ``sums`` holds a zero scalar per parameter served (its uses went to ``consume``).

    Raises:
        FisherError: non-finite outputs, or random numbers drawn in the forward (dropout in train mode).

    """
    n, t = prepared.active.shape
    per_position = not split_positions and units_are_positions(prepared, kind, per)
    cut = None if per_position else split_point(prepared)
    index = walk(problem.model) if index is None else index
    if cut is None:
        return _estimate(problem, params, prepared, requests, kind=kind, per_position=per_position, noise=noise,
                         dtype=dtype, chunk_size=chunk_size, where=where, split_positions=split_positions,
                         index=index, consume=consume, scale=scale)
    parts = [_estimate(problem, params, _part(prepared, lo, hi), requests, kind=kind, per_position=False,
                       noise=None if noise is None else noise[:, lo:hi], dtype=dtype, chunk_size=chunk_size,
                       where=where, offset=lo, split_positions=split_positions, index=index, consume=consume,
                       scale=scale)
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


def split_point(prepared: Prepared) -> int | None:
    """Where to cut a batch whose size ``N`` equals a length of its inputs' other axes (``T``), or ``None``.

    A layer output ``[N, T, d]`` with ``N = T`` could also hold its samples on the second axis, which
    only two probe backwards could rule out; two parts whose sizes differ from every such length
    make the sample axis unambiguous from the shapes, at the cost of a second, smaller pass. The
    lengths are the targets' positions and the inputs' axes after the first, but the last of a
    floating-point input (its features: an MLP whose batch is as wide as its input is not cut); a
    position axis made inside the model is still caught by the probes.
    """
    n = prepared.active.shape[0]
    lengths = {d for x in tensors(prepared.inputs) for d in x.shape[1:-1 if x.is_floating_point() else None]}
    lengths |= set(prepared.active.shape[1:])
    if n not in lengths:
        return None
    for cut in sorted(range(1, n), key=lambda c: abs(2 * c - n)):
        if cut not in lengths and n - cut not in lengths:
            return cut
    return None


def _part(prepared: Prepared, lo: int, hi: int) -> Prepared:
    return Prepared(map_tensors(lambda x: x[lo:hi], prepared.inputs), prepared.targets[lo:hi], prepared.active[lo:hi])


def _plan(uses: list[Use], request: Request, param: Tensor, dtype: torch.dtype, active: Tensor) -> tuple:
    """The accumulation plan of one parameter: K-FAC factors (:mod:`._tap_kfac`) or the estimators of
    :mod:`._tap_estimators`.
    """
    if request.factors is not None:
        return kfac_taps.make_plan(uses, request.factors, dtype, active)
    return make_plan(uses, request, param, dtype)


def _accumulate(uses: list[Use], plan: Any, dtype: torch.dtype, cap: int | None, ws: Workspace) -> Tensor:
    if isinstance(plan, kfac_taps.FactorPlan):
        return kfac_taps.accumulate(uses, plan, dtype, cap, ws)
    return accumulate(uses, plan, dtype, cap, ws)


PLAIN_BUDGET = 1 << 22  # output-gradient entries the plain pass holds at once (all its layers' together)

# (holders, input shapes) where the plain pass did not apply, per model: it is not tried there again
# (a hint for speed only: the full pass serves those calls, with the same result)
_NOT_PLAIN: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


class _Hit(NamedTuple):
    """One call of a tapped layer in the plain pass (the fields :func:`._tap_checks.graph_covered` reads)."""

    module: nn.Module
    x: Tensor  # detached input
    y: Tensor
    keys: dict[str, str]
    node: Any  # y.grad_fn
    stop: Any  # x.grad_fn


def _aliases(p: Tensor, own: Tensor | None) -> bool:
    """Whether ``p`` holds exactly the module's own tensor ``own`` (e.g. a detached view of it)."""
    return own is not None and p.dtype == own.dtype and type(p) in _PLAIN_TYPES and p.is_set_to(own)


_PLAIN_TYPES = (Tensor, nn.Parameter)  # not tensor subclasses (DTensor, ...): their storage may say nothing


def _plain(problem: Problem, params: Mapping[str, Tensor], prepared: Prepared, requests: Mapping[str, Request],
           order: list[str], owners: _Owners, missing: dict[str, str], k: layers.Kinds, *, kind: Kind,
           noise: Tensor | None, dtype: torch.dtype, chunk_size: int | None, where: str, index: ModelIndex,
           offset: int, consume: "Consumer | None" = None, scale: float = 1.0) -> Result | None:
    """The tap engine's pass where no check of the full pass can fail, or ``None`` (then the full pass runs).

    It applies to layers whose forward is PyTorch's own (their formulas hold by construction), each
    requested parameter held by one of them, each called once with the samples first and its output
    not changed afterwards, every use of the parameters inside their layer (the graph check runs on
    every call), and output gradients small enough to hold at once: then one backward per output
    vector gives every layer's output gradient directly, with no tensor hook, probe or streaming.
    A model whose parameters are given as the module's own tensors (:func:`~fisherfx.params_of`) is
    called directly, without ``functional_call``.
    """
    model, holders = problem.model, owners.holders
    n = prepared.active.shape[0]
    memo = (tuple(map(id, holders)), tuple(tuple(x.shape) for x in tensors(prepared.inputs)))
    if not owners.plain or memo in _NOT_PLAIN.get(model, ()):
        return None
    own = index.params

    def fail() -> None:
        _NOT_PLAIN.setdefault(model, set()).add(memo)

    direct = all(_aliases(p, own.get(name)) for name, p in params.items()) and all(own[m].requires_grad
                                                                                   for m in order)
    if direct:
        leaves, values = {name: own[name] for name in order}, {}
    else:
        leaves = {name: params[name].detach().requires_grad_() for name in order}
        values = {**index.buffers, **{name: p.detach() for name, p in params.items()}, **leaves}
    hits: list[tuple] = []
    device = leaves[order[0]].device
    try:  # each layer's own forward, recording its input and output (no hook: these are PyTorch's classes)
        for m in holders:
            object.__setattr__(m, "forward", _recording(m, hits))
        with torch.enable_grad():
            outputs = guarded_forward(where, problem, values, prepared.inputs, device)
    finally:
        for m in holders:
            vars(m).pop("forward", None)
    _check_forward(where, problem, outputs, prepared, offset)
    calls, size = [], 0
    if len(hits) != len(holders) or len({id(h[0]) for h in hits if h is not None}) != len(hits):
        return fail()  # a layer called twice, or not at all
    keys = dict(zip(map(id, holders), owners.keys, strict=True))
    for module, x, y, x_version, y_version in hits:
        if (y.grad_fn is None or y._version != y_version or x._version != x_version or y.ndim < 2
                or y.shape[0] != n or n in layers.position_shape(module, tuple(y.shape), k)):
            return fail()  # changed in place after the call, broadcast, or a position axis as long as the batch
        calls.append(_Hit(module, x.detach(), y, keys[id(module)], y.grad_fn, x.grad_fn))
        size += y.numel()
    if size > PLAIN_BUDGET:
        return fail()
    if not checks.used_only_inside(outputs, calls, leaves):
        return fail()
    vectors = output_vectors(problem, outputs, prepared, kind, noise)
    draws = vectors.shape[0]
    sums: dict[str, Tensor] = {}
    scaled: set[str] = set()  # the sums that came out scaled already
    plans: dict[str, tuple] = {}
    ws = Workspace()
    for r in range(draws):
        grads = torch.autograd.grad(outputs, [c.y for c in calls], vectors[r], retain_graph=r < draws - 1,
                                    allow_unused=True)
        found: dict[str, list[tuple[Use, None]]] = {}
        for c, g in zip(calls, grads, strict=True):
            if g is None:  # every name passed the graph check: each call's output reaches the outputs
                raise RuntimeError(f"{where}: tap engine invariant broken: a covered layer's output got no gradient "
                                   "(please report)")
            parts = None if consume is not None else _linear_squares(c, g, requests, params, plans, dtype, scale)
            if parts is not None:
                for name, part in parts.items():
                    sums[name] = part if name not in sums else sums[name] + part
                    scaled.add(name)
                continue
            view = layers.out_view(c.module, g, k)
            made = {} if view is None or view.shape[0] != n else layers.uses(c.module, c.x, view, c.keys, k, dtype)
            for name in c.keys.values():
                if name not in made:
                    raise RuntimeError(f"{where}: tap engine invariant broken: the plain pass cannot read the "
                                       f"gradient of {name!r} per sample (please report)")
                if consume is not None:
                    found.setdefault(name, []).append((made[name], None))
                    continue
                if name not in plans:
                    plans[name] = _plan([made[name]], requests[name], params[name], dtype, prepared.active)
                part = _accumulate([made[name]], plans[name][0], dtype, chunk_size, ws)
                sums[name] = part if name not in sums else sums[name] + part
        if consume is not None:
            consume(offset, r, found)
    if consume is not None:
        return Result({name: outputs.new_zeros((), dtype=dtype) for name in order},
                      {name: missing[name] for name in requests if name in missing}, outputs.shape[-1])
    out = {}
    for name in order:
        post, value = plans[name][1], sums[name]
        if scale != 1.0 and name not in scaled:
            value = value.mul_(scale)
        out[name] = (value if value.shape == params[name].shape else value.reshape(params[name].shape)) \
            if post is None else post(value)
    return Result(out, {name: missing[name] for name in requests if name in missing}, outputs.shape[-1])


def _recording(module: nn.Module, hits: list) -> Any:
    """``module``'s class forward, appending ``(module, x, y, x version, y version)`` (or ``None``) to ``hits``."""
    forward = type(module).forward

    def recorded(*args: Any, **kwargs: Any) -> Any:
        y = forward(module, *args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()), None)
        hits.append((module, x, y, x._version, y._version) if isinstance(x, Tensor) and isinstance(y, Tensor)
                    else None)
        return y

    return recorded


def _linear_squares(c: _Hit, g: Tensor, requests: Mapping[str, Request], params: Mapping[str, Tensor],
                    plans: dict[str, tuple], dtype: torch.dtype, scale: float = 1.0) -> dict[str, Tensor] | None:
    """A ``Linear`` call with one position per sample (``x`` ``[N, i]``, ``g`` ``[N, o]``): the diagonals
    ``(g²)ᵀ(x²)`` and ``Σ g²`` of its weight and bias, or their row/column group sums, times ``scale``,
    with ``scale·g²`` formed once for both; ``None`` for any other call or request (mask importance,
    K-FAC factors).
    """
    if type(c.module) is not nn.Linear or g.ndim != 2 or c.x.ndim != 2:
        return None
    names = c.keys.values()
    if any(requests[name].mask or requests[name].factors is not None for name in names):
        return None
    g2, x2, out = (g if g.dtype == dtype else g.to(dtype)).square(), None, {}
    if scale != 1.0:
        g2.mul_(scale)
    for attr, name in c.keys.items():
        size = (g.shape[1],) if attr == "bias" else (g.shape[1], c.x.shape[1])
        if name not in plans:
            plans[name] = make_plan([Use("vector", g, None, size)], requests[name], params[name], dtype)
        plan = plans[name][0]
        if attr == "bias":
            values = one_position(g2, None, plan.what)
        else:
            x2 = (c.x if c.x.dtype == dtype else c.x.to(dtype)).square() if x2 is None else x2
            values = one_position(g2, x2, plan.what)
        out[name] = grouped(values, plan)
    return out


def _check_forward(where: str, problem: Problem, outputs: Tensor, prepared: Prepared, offset: int) -> None:
    """The outputs fit the targets and are finite (``offset``: the first sample's index in the caller's batch)."""
    check_outputs(where, problem, outputs, prepared)
    if not math.isfinite(float(outputs.detach().sum())) and not bool(torch.isfinite(outputs.detach()).all()):
        finite = torch.isfinite(outputs.detach()).reshape(outputs.shape[0], -1).all(1)
        raise FisherError(f"{where}: the model's outputs for sample {offset + int((~finite).nonzero()[0, 0])} "
                          "are not finite")


def _estimate(problem: Problem, params: Mapping[str, Tensor], prepared: Prepared, requests: Mapping[str, Request], *,
              kind: Kind, per_position: bool, noise: Tensor | None, dtype: torch.dtype, chunk_size: int | None,
              where: str, index: ModelIndex, offset: int = 0, split_positions: bool = False,
              consume: "Consumer | None" = None, scale: float = 1.0) -> Result:
    """:func:`estimate` on one batch (samples ``offset + …`` of the caller's, for messages); with
    ``per_position`` each active position is a unit of its own.
    """
    k = layers.kinds()
    owners = _owned(index, list(requests), k)
    owned, holders = owners.names, owners.holders
    missing = {name: NO_LAYER for name in requests if name not in owned}
    order = [name for name in requests if name in owned]
    if not order:
        return Result({}, missing)
    if not per_position and not split_positions:
        plain = _plain(problem, params, prepared, requests, order, owners, missing, k, kind=kind, noise=noise,
                       dtype=dtype, chunk_size=chunk_size, where=where, index=index, offset=offset, consume=consume,
                       scale=scale)
        if plain is not None:
            return plain
    leaves = {name: params[name].detach().requires_grad_() for name in order}
    values = {**index.buffers, **{n: p.detach() for n, p in params.items()}, **leaves}
    active = prepared.active
    n, t = active.shape
    device = leaves[order[0]].device
    with _tapped(holders, {id(x): name for name, x in leaves.items()}, k, n) as tape, torch.enable_grad():
        outputs = guarded_forward(where, problem, values, prepared.inputs, device)
        _check_forward(where, problem, outputs, prepared, offset)
        run = _Run(outputs, tape, leaves, k, n, dtype)
        todo, zero = run.covered(order, missing)  # first: it lets go of the layer outputs autograd does not keep
        vectors = output_vectors(problem, outputs, prepared, kind, noise)
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
                    plans[name] = _plan([made[name]], requests[name], params[name], dtype, active)
                part = _accumulate([made[name]], plans[name][0], dtype, cap, ws)
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
        plans.update({name: _plan([u for _, u in found[name]], requests[name], params[name], dtype, active)
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
                    part = _accumulate(use_list, plans[name][0], dtype, cap, ws)
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


__all__ = ["Consumer", "Request", "Result", "estimate", "units_are_positions"]
