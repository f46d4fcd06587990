"""Why a model's forward raised: the module that failed, what it got and what it expected.

This is the error path only. :func:`forward_failure` re-runs the forward under ``torch.no_grad()``
with hooks on every module that track the innermost module entered and not finished, so that a
raw ``RuntimeError`` from deep inside the model becomes a :class:`FisherError` naming that module,
its inputs as the batch gave them and the batch's own shapes. Nothing outlives the call: the hooks
are removed in ``finally``, the global random state is kept, buffers are cloned.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from ._errors import FisherError
from ._tree import map_tensors, tensors

if TYPE_CHECKING:  # problems imports this module
    from .problems import Problem


def describe(x: Any) -> str:
    """A short description of a batch value: shapes and dtypes of tensors, the value range of integer ones."""
    if isinstance(x, Tensor):
        text = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if not (x.dtype.is_floating_point or x.dtype.is_complex) and x.numel():
            text += f" in [{int(x.min())}, {int(x.max())}]"
        return text
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        if x and not tensors(x):  # plain Python data, not a container of tensors
            return f"a Python {type(x).__name__} of length {len(x)}"
        inner = ", ".join(describe(v) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner}{',' if len(x) == 1 else ''})"
    return type(x).__name__ if x is None or isinstance(x, (int, float, bool)) else f"a {type(x).__name__}"


class _Failed(NamedTuple):
    """The innermost module whose forward raised, with what it was called with."""

    name: str  # "" for the model itself
    module: nn.Module
    args: tuple
    kwargs: dict
    error: BaseException


@contextmanager
def _innermost(model: nn.Module) -> Iterator[list]:
    """Hooks on every module of ``model``: the yielded list holds the modules entered and not finished."""
    stack: list = []

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack.append((module, args, kwargs))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        while stack and stack.pop()[0] is not module:  # a child that raised and was caught inside the model
            pass

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(leave))
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def _rerun(problem: "Problem", values: dict[str, Tensor], inputs: Any, per_sample: bool) -> _Failed | None:
    """Run the forward again (on the batch, or vmapped over its samples); the innermost failing module."""
    model = problem.model
    names = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    devices = sorted({t.device.index or 0 for t in [*tensors(inputs), *values.values()] if t.is_cuda})
    with _innermost(model) as stack, torch.no_grad(), torch.random.fork_rng(devices=devices):
        try:
            if per_sample:  # as the generic engine runs it: vjp of one sample's forward, vmapped
                diff = {k: v for k, v in values.items() if v.dtype.is_floating_point}

                def one(x: Any) -> Tensor:
                    def outputs(p: dict[str, Tensor]) -> Tensor:
                        return problem.forward(model, {**values, **p}, map_tensors(lambda t: t[None], x))

                    return vjp(outputs, diff)[0]

                vmap(one)(inputs)
            else:
                problem.forward(model, values, inputs)
        except Exception as err:  # any failure is what we look for
            if not stack or isinstance(err, FisherError):
                return None
            module, args, kwargs = stack[-1]
            return _Failed(names.get(id(module), "?"), module, args, kwargs, err)
    return None


def _label(module: nn.Module) -> str:
    extra = module.extra_repr().replace("\n", ", ")
    return f"{type(module).__name__}({extra})" if extra else type(module).__name__


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _got(args: tuple, kwargs: dict) -> str:
    given = [a for a in args if tensors(a)] + [v for v in kwargs.values() if tensors(v)]
    if len(given) == 1 and isinstance(given[0], Tensor):
        return f"an input of shape {describe(given[0])}"
    parts = [describe(a) for a in args if tensors(a)] + [f"{k}={describe(v)}" for k, v in kwargs.items() if tensors(v)]
    return "inputs " + ", ".join(parts) if parts else "no tensor input"


def _dtype_hint(module: nn.Module, args: tuple, kwargs: dict) -> str:
    """What to cast, when a module's floating inputs and its parameters differ in dtype."""
    own = {p.dtype for p in module.parameters() if p.dtype.is_floating_point}
    got = {t.dtype for t in tensors((args, kwargs)) if t.dtype.is_floating_point}
    if len(own) != 1 or not got or got <= own:
        return ""
    (dtype,) = own
    return (f"; its parameters are {dtype} but it got {', '.join(sorted(map(str, got - own)))} inputs: cast the "
            f"batch's floating-point inputs with .to({dtype}) (fisherfx does not cast inputs)")


def _recurrent(model: nn.Module) -> list[tuple[str, nn.RNNBase]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.RNNBase)]


def _initial_state_message(where: str, name: str, module: nn.RNNBase, err: BaseException) -> FisherError:
    layers = module.num_layers * (2 if module.bidirectional else 1)
    size = getattr(module, "proj_size", 0) or module.hidden_size
    c0 = f" (and c0 [{layers}, N, {module.hidden_size}] likewise)" if isinstance(module, nn.LSTM) else ""
    return FisherError(
        f"{where}: {type(module).__name__} module {name!r} creates its default initial state h0 inside its forward "
        f"(torch.zeros with one sample's batch size), which vmap, used for per-sample gradients by the generic "
        f"engine, cannot batch ({_first_line(err)}). Pass an explicit zero h0 instead: build it in the model's "
        f"forward from the input, h0 = x.new_zeros({layers}, N, {size}) with N the samples in x{c0}, or pass it as "
        f"a model input with the samples first, [N, {layers}, {size}], and use h0.transpose(0, 1) (fisherfx slices "
        "every input on its first axis)"
    )


def forward_failure(where: str, problem: "Problem", params: Mapping[str, Tensor], inputs: Any,
                    err: BaseException) -> BaseException:
    """The :class:`FisherError` that explains why ``problem.forward`` raised ``err``, or ``err`` itself.

    Raise the result ``from err`` at a call site of the forward::

        try:
            outputs = problem.forward(problem.model, values, inputs)
        except Exception as err:
            raise forward_failure(where, problem, values, prepared.inputs, err) from err

    The forward is run again on ``inputs`` under ``torch.no_grad()`` (the global random state kept,
    buffers cloned, hooks removed in ``finally``), with hooks that track the innermost module
    entered and not finished. Cost does not matter: this is the error path.

    Args:
        where: the public function, the start of the message (``"diag_fisher"``).
        problem: the problem whose forward failed.
        params: the values the forward was given (parameters, buffers optional); absent ones fall
            back to the module's own.
        inputs: the batch's model inputs, ``Prepared.inputs`` (leaves ``[N, ...]``). Pass the whole
            batch's rather than the slice that failed, so the message shows the user's shapes.
        err: what the forward raised.

    Returns:
        A new :class:`FisherError` (not raised) naming the module whose forward failed (its name,
        class and settings, e.g. ``module '0' (Linear(in_features=8, out_features=16, bias=True))
        got an input of shape (12, 5) float32``), the dtype to cast to when its inputs and
        parameters differ in dtype, torch's own message and the batch's input shapes; for
        ``nn.RNN``/``nn.LSTM``/``nn.GRU`` under ``vmap`` (default ``h0`` created inside their forward,
        or torch's oneDNN kernel on CPU), the recurrent module, the cause and the fix. ``err`` itself,
        unchanged, when it cannot explain it better: a ``FisherError`` already, an out-of-memory error,
        anything that is not an ``Exception``, and failures that the forward does not reproduce
        outside ``vmap`` (random numbers, data-dependent control flow: the engines' own messages cover
        these).

    """
    if not isinstance(err, Exception) or isinstance(err, (FisherError, MemoryError, torch.cuda.OutOfMemoryError)):
        return err
    model = problem.model
    buffers = dict(model.named_buffers())
    values = {**buffers, **params}
    values = {k: v.clone() if k in buffers else v for k, v in values.items()}  # a failed forward must not update them
    recurrent = _recurrent(model)
    if recurrent and "'workspace'" in str(err):
        names = ", ".join(f"{type(m).__name__} module {k!r}" for k, m in recurrent)
        return FisherError(
            f"{where}: {names} runs torch's oneDNN (mkldnn) recurrent kernel on CPU, whose backward vmap cannot "
            f"batch ({_first_line(err)}); compute the Fisher inside `with torch.backends.mkldnn.flags(enabled=False):`"
        )
    failed = _rerun(problem, values, inputs, per_sample=False)
    if failed is None:
        if recurrent:
            n = min(2, *(t.shape[0] for t in tensors(inputs))) if tensors(inputs) else 0
            failed = _rerun(problem, values, map_tensors(lambda t: t[:n], inputs), per_sample=True) if n else None
            broadcast = "match the broadcast shape"
            if (failed is not None and isinstance(failed.module, nn.RNNBase)
                    and (broadcast in str(failed.error) or broadcast in str(err))):
                return _initial_state_message(where, failed.name, failed.module, err if broadcast in str(err)
                                              else failed.error)
        return err
    who = f"module {failed.name!r} ({_label(failed.module)})" if failed.name else f"the model ({_label(failed.module)})"
    return FisherError(
        f"{where}: the model's forward failed in {who}, which got {_got(failed.args, failed.kwargs)}"
        f"{_dtype_hint(failed.module, failed.args, failed.kwargs)}; {_first_line(failed.error)}. "
        f"The batch's inputs: {describe(inputs)}"
    )


__all__ = ["describe", "forward_failure"]
