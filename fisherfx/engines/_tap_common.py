"""What both passes of the tap engine share: requests and results, the guarded forward, the output
vectors, the layers that hold the requested parameters and the accumulation plans.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .._errors import FisherError
from .._walk import ModelIndex
from ..likelihoods import check_classes, check_shapes
from ..problems import Prepared, Problem, forward_failure
from . import _tap_checks as checks
from . import _tap_kfac as kfac_taps
from . import _tap_layers as layers
from ._tap_estimators import Workspace, accumulate, make_plan
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


NO_LAYER = ("no supported layer holds it (Linear, Conv1d/Conv2d with groups=1, Embedding, HF Conv1D, "
            "LayerNorm, RMSNorm, LlamaRMSNorm)")
OUTSIDE = "its gradient does not all come through tapped layers (also used in other operations)"
MIXING = ("its layer's output at one position feeds the losses of several positions (per='token' and "
          "kind='exact' with sequences need each position's gradient on its own)")
NO_SAMPLES = "its layer's input cannot be read per sample (no sample axis first, or changed in place after the call)"
MIXED_FORMS = "it is shared by layers whose contributions cannot be combined (a norm weight and a matrix)"


def refusal(where: str, missing: Mapping[str, str], instead: str) -> FisherError:
    """The error of ``engine="taps"`` for the parameters the taps cannot serve, ``{name: why}``; ``instead``
    says what ``engine="auto"`` would compute them with.
    """
    reasons = "; ".join(f"{name!r}: {why}" for name, why in missing.items())
    return FisherError(f"{where}: engine='taps' cannot serve {reasons}. Use engine='auto' to compute these with "
                       f"{instead}")


class Owners(NamedTuple):
    """The supported layers holding the requested parameters (see :func:`owned`)."""

    names: set[str]  # the requested names some supported layer holds (ties included)
    holders: list[nn.Module]  # those layers, each once
    keys: list[dict[str, str]]  # per holder, ``{"weight" | "bias": name}`` of the requested names it holds
    plain: bool  # every holder runs PyTorch's own forward and every such name sits in one holder slot


def owned(index: ModelIndex, names: list[str], k: layers.Kinds) -> Owners:
    """The supported layers holding a requested name, in one pass over the model's modules."""
    own = index.params
    by_id = {id(own[n]): n for n in names}
    out: set[str] = set()
    holders, keys = [], []
    slots = 0
    plain = len(by_id) == len(names)  # no two requested names are one tensor
    for module in index.modules:
        slot = module._parameters
        if slot and layers.supported(module, k):
            held = {attr: by_id[id(t)] for attr in ("weight", "bias") if (t := slot.get(attr)) is not None
                    and id(t) in by_id}
            if held:
                out.update(held.values())
                holders.append(module)
                keys.append(held)
                slots += len(held)
                plain = plain and checks.trusted(module)
    return Owners(out, holders, keys, plain and slots == len(out))


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
        vectors = position_vectors(problem.likelihood, outputs, targets, active, kind, noise, masked=not full)
        return vectors if vectors.dtype == outputs.dtype else vectors.to(outputs.dtype)
    parts = []
    for lo in range(0, n, step):  # a language model's softmax and sampling temporaries, a few rows at a time
        z = None if noise is None else noise[:, lo:lo + step]
        parts.append(position_vectors(problem.likelihood, outputs[lo:lo + step], targets[lo:lo + step],
                                      active[lo:lo + step], kind, z, masked=not full).to(outputs.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


VECTOR_CHUNK = 1 << 21  # output entries per chunk when the output vectors are formed


def check_forward(where: str, problem: Problem, outputs: Tensor, prepared: Prepared, offset: int) -> None:
    """The outputs fit the targets and are finite (``offset``: the first sample's index in the caller's batch)."""
    check_outputs(where, problem, outputs, prepared)
    if not math.isfinite(float(outputs.detach().sum())) and not bool(torch.isfinite(outputs.detach()).all()):
        finite = torch.isfinite(outputs.detach()).reshape(outputs.shape[0], -1).all(1)
        raise FisherError(f"{where}: the model's outputs for sample {offset + int((~finite).nonzero()[0, 0])} "
                          "are not finite")


def plan(uses: list[Use], request: Request, param: Tensor, dtype: torch.dtype, active: Tensor) -> tuple:
    """The accumulation plan of one parameter: K-FAC factors (:mod:`._tap_kfac`) or the estimators of
    :mod:`._tap_estimators`.
    """
    if request.factors is not None:
        return kfac_taps.make_plan(uses, request.factors, dtype, active)
    return make_plan(uses, request, param, dtype)


def accumulate_any(uses: list[Use], plan: Any, dtype: torch.dtype, cap: int | None, ws: Workspace) -> Tensor:
    if isinstance(plan, kfac_taps.FactorPlan):
        return kfac_taps.accumulate(uses, plan, dtype, cap, ws)
    return accumulate(uses, plan, dtype, cap, ws)


__all__ = ["MIXED_FORMS", "MIXING", "NO_LAYER", "NO_SAMPLES", "OUTSIDE", "VECTOR_CHUNK", "Consumer", "Owners",
           "Request", "Result", "accumulate_any", "check_forward", "check_outputs", "guarded_forward", "output_vectors",
           "owned", "plan", "refusal"]
