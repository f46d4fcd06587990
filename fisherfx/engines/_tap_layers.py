"""Per-layer formulas of the tap engine: one call's input and output gradient → gradient factors.

For every supported layer the gradient of a parameter is a sum, over the positions ``p`` of a
call, of per-position contributions written in the parameter's 2-D layout ``[o, i]`` (rows: the
parameter's first axis, columns: the rest flattened):

=======================  ===================  ===============================  ==========
layer                    parameter            contribution at position ``p``   form
=======================  ===================  ===============================  ==========
``nn.Linear``            weight ``[o, i]``    ``g_p x_pᵀ``                     outer
HF ``Conv1D``            weight ``[i, o]``    ``x_p g_pᵀ``                     outer
``nn.Conv1d/2d``         weight ``[o, c, k…]``  ``g_p unfold(x)_pᵀ``           outer
``nn.Embedding``         weight ``[V, d]``    ``e_{idx_p} g_pᵀ``               index
``LayerNorm``/RMSNorm    weight ``[*D]``      ``g_p ⊙ x̂_p``                    vector
all of them              bias ``[o]``         ``g_p``                          vector
=======================  ===================  ===============================  ==========

``x`` is the call's input, ``g`` the gradient of the backward's scalar w.r.t. the call's output and
``x̂`` the normalised input (recomputed here). Positions are every axis of the output between the
sample axis and the feature axis (tokens, pixels of a feature map).
"""

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

# torch's own normalisation layers with a ``normalized_shape`` (``nn.RMSNorm`` from torch 2.4)
NORMS: tuple[type, ...] = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c is not None)


class Use(NamedTuple):
    """One call's contributions to one parameter (see the module docstring).

    ``outer``: ``Σ_p a_p b_pᵀ`` with ``a`` ``[N, P, o]`` and ``b(lo, hi)`` ``[hi-lo, P, i]``;
    ``index``: the same with ``a`` ``[N, P]`` row indices (one-hot rows, ``-1`` for none);
    ``vector``: ``Σ_p a_p`` with ``a`` ``[N, P, d]`` and no ``b``.
    """

    form: str
    a: Tensor
    b: Callable[[int, int], Tensor] | None
    size: tuple[int, ...]  # (o, i) for outer/index, (d,) for vector
    grads: Callable[[int, int], Tensor] | None = None  # outer: Σ_p a_p b_pᵀ of units lo:hi, [c, o, i], directly
    inner: Callable[[Tensor, bool], Tensor] | None = None  # outer: V [K, o, i] -> ⟨a_p b_pᵀ, V_k⟩ [N, P, K] directly
    weighted: Callable[[Tensor], Tensor] | None = None  # outer: w [N, P or 1, K] -> Σ_p w_{p,k} a_p b_pᵀ [K, o, i]


def loaded_class(module: str, name: str) -> type | None:
    """``module.name`` if ``module`` is already imported, else ``None``.

    A model holding a HuggingFace layer has imported its module, so looking in ``sys.modules``
    finds every class that can occur without importing transformers (seconds) for other models.
    """
    return getattr(sys.modules.get(module), name, None)


def _conv1d_class() -> type | None:
    return loaded_class("transformers.pytorch_utils", "Conv1D")


def _llama_rmsnorm_class() -> type | None:
    return loaded_class("transformers.models.llama.modeling_llama", "LlamaRMSNorm")


class Kinds(NamedTuple):
    """The optional layer classes, imported once per call (``None`` where transformers is absent)."""

    conv1d: type | None
    llama_rmsnorm: type | None


def kinds() -> Kinds:
    """Look up the optional HuggingFace classes."""
    return Kinds(_conv1d_class(), _llama_rmsnorm_class())


def supported(module: nn.Module, k: Kinds) -> bool:
    """Whether the taps know ``module``'s gradient formulas (in the configuration it has)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
    if isinstance(module, NORMS):
        return True
    return any(cls is not None and isinstance(module, cls) for cls in k)


def out_view(module: nn.Module, y: Tensor, k: Kinds) -> Tensor | None:
    """A call's output (or its gradient) as ``[N, P, D]``: samples, positions, features.

    Returns ``None`` where the output has no sample axis this engine can read.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if y.ndim != (3 if isinstance(module, nn.Conv1d) else 4):
            return None
        return y.flatten(2).transpose(1, 2)
    if isinstance(module, NORMS):
        dims = len(module.normalized_shape)
        if y.ndim < dims + 1:
            return None
        return y.reshape(y.shape[0], -1, *y.shape[y.ndim - dims:]).flatten(2)
    if isinstance(module, nn.Embedding):
        return y.reshape(y.shape[0], -1, y.shape[-1]) if y.ndim >= 2 else None
    # Linear, Conv1D, LlamaRMSNorm: features on the last axis
    return y.reshape(y.shape[0], -1, y.shape[-1]) if y.ndim >= 2 else None


def position_shape(module: nn.Module, shape: tuple[int, ...], k: Kinds) -> tuple[int, ...]:
    """The position axes of a call's output of ``shape`` (between the sample axis and the features).

    Convolutions give ``()``: their spatial axes cannot hold the samples of a batch.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return ()
    dims = len(module.normalized_shape) if isinstance(module, NORMS) else 1
    return tuple(shape[1:len(shape) - dims])


def _fixed(x: Tensor) -> Callable[[int, int], Tensor]:
    return lambda lo, hi: x[lo:hi]


def _conv_pads(module: nn.Module, dims: int) -> list[int]:
    """``F.pad`` widths (last axis first) reproducing the module's own padding."""
    pads: list[int] = []
    for j in reversed(range(dims)):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[j] * (module.kernel_size[j] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[j]
        pads += [left, right]
    return pads


def unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Patches of a Conv1d/Conv2d input: ``[n, c, *S] → [n, P, c·k…]`` in the weight's column order."""
    dims = x.ndim - 2
    x = _padded(module, x)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if dims == 1:
        x, kernel, stride, dilation = x[:, :, None], (1, *kernel), (1, *stride), (1, *dilation)
    return F.unfold(x, kernel, dilation=dilation, stride=stride).transpose(1, 2)


def conv_grads(module: nn.Module, x: Tensor, g: Tensor, lo: int, hi: int) -> Tensor:
    """Per-sample weight gradients ``[c, o, i]`` of a Conv1d/Conv2d, from torch's own convolution
    backward vmapped over samples (faster than ``g_pᵀ unfold(x)_p`` through a batched matmul).

    Args:
        module: the convolution.
        x: ``[N, c, *S]`` its input.
        g: ``[N, P, o]`` its output gradient, as :func:`out_view` gives it.
        lo, hi: the samples.

    Returns:
        ``Σ_p g_p unfold(x)_pᵀ`` of samples ``lo:hi``, ``[hi − lo, o, c·k…]``.

    """
    dims = x.ndim - 2
    x = _padded(module, x[lo:hi])
    stride, dilation = module.stride, module.dilation
    o = module.out_channels
    grad_out = _native(g[lo:hi], hi - lo, _spatial(module, x))
    weight = module.weight.detach()

    def one(xn: Tensor, gn: Tensor) -> Tensor:
        return torch.ops.aten.convolution_backward(
            gn[None], xn[None], weight.to(xn.dtype), None, list(stride), [0] * dims, list(dilation), False,
            [0] * dims, 1, [False, True, False])[1]

    return torch.func.vmap(one)(x, grad_out).reshape(hi - lo, o, -1)


def _padded(module: nn.Module, x: Tensor) -> Tensor:
    """A Conv1d/Conv2d input padded as the module pads it (the convolutions below then pad nothing)."""
    pads = _conv_pads(module, x.ndim - 2)
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)


def _spatial(module: nn.Module, xp: Tensor) -> tuple[int, ...]:
    """The output's spatial shape of a Conv1d/Conv2d on an input ``xp`` already padded (:func:`_padded`)."""
    k, stride, dilation = module.kernel_size, module.stride, module.dilation
    return tuple((xp.shape[2 + j] - dilation[j] * (k[j] - 1) - 1) // stride[j] + 1 for j in range(xp.ndim - 2))


def _native(g: Tensor, n: int, shape: tuple[int, ...]) -> Tensor:
    """An output gradient ``[N, P, o]`` (:func:`out_view`) back in the convolution's ``[N, o, *S]`` layout."""
    return g.transpose(1, 2).reshape(n, g.shape[2], *shape)


def conv_inner(module: nn.Module, x: Tensor, g: Tensor, v: Tensor, summed: bool = False) -> Tensor:
    """``⟨g_p unfold(x)_pᵀ, V_k⟩`` ``[N, P, K]`` of a Conv1d/Conv2d for ``v`` ``[K, o, c·k…]``: the convolution of
    ``x`` with the ``K·o`` filters ``[V_1;…;V_K]`` (one call), times ``g`` at each position (``summed``: summed
    over the positions, ``[N, 1, K]``).
    """
    n, p, o = g.shape
    k = v.shape[0]
    xp = _padded(module, x)
    conv = F.conv1d if xp.ndim == 3 else F.conv2d
    y = conv(xp, v.reshape(k * o, *module.weight.shape[1:]).to(xp.dtype), None, module.stride, 0, module.dilation)
    gn = _native(g, n, tuple(y.shape[2:])).to(y.dtype)
    if summed:
        return (y.view(n, k, o * p) * gn.reshape(n, 1, o * p)).sum(2)[:, None]
    return (y.view(n, k, o, p) * gn.view(n, 1, o, p)).sum(2).transpose(1, 2)


def conv_weighted(module: nn.Module, x: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """``Σ_{n,p} w_{n,p,k} g_p unfold(x)_pᵀ`` ``[K, o, c·k…]`` of a Conv1d/Conv2d for weights ``w`` ``[N, P, K]``
    (or ``[N, 1, K]``, the same at every position): one weight gradient of the convolution with ``K·o`` output
    channels and output gradient ``w_k ⊙ g``.
    """
    n, p, o = g.shape
    k = w.shape[2]
    xp = _padded(module, x)
    dims = xp.ndim - 2
    spatial = _spatial(module, xp)
    gn = _native(g, n, spatial).to(w.dtype)
    grad_out = (w.transpose(1, 2)[:, :, None, :] * gn.reshape(n, 1, o, p)).reshape(n, k * o, *spatial)
    weight = xp.new_empty((k * o, *module.weight.shape[1:]))
    xp = xp.to(w.dtype)
    grads = torch.ops.aten.convolution_backward(grad_out, xp, weight.to(w.dtype), None, list(module.stride), [0] * dims,
                                                list(module.dilation), False, [0] * dims, 1, [False, True, False])[1]
    return grads.reshape(k, o, -1)


def normalised(module: nn.Module, x: Tensor, k: Kinds) -> Tensor:
    """``x̂``: the input of a LayerNorm/RMSNorm normalised as the module's forward does it."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if not isinstance(module, nn.LayerNorm) and isinstance(module, NORMS):  # nn.RMSNorm
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    # LlamaRMSNorm: statistics in float32, result cast back to the input dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return h.to(x.dtype)


def recompute(module: nn.Module, x: Tensor, k: Kinds) -> Tensor | None:
    """A HuggingFace layer's output recomputed from the formula the taps assume (``None`` for others).

    ``Conv1D``: ``y = x W + b`` with ``W`` ``[i, o]``; ``LlamaRMSNorm``: ``y = w ⊙ x̂``.
    """
    if k.conv1d is not None and type(module) is k.conv1d:
        flat = x.reshape(-1, x.shape[-1])
        return torch.addmm(module.bias, flat, module.weight).reshape(*x.shape[:-1], module.weight.shape[1])
    if k.llama_rmsnorm is not None and type(module) is k.llama_rmsnorm:
        return module.weight * normalised(module, x, k)
    return None


def uses(module: nn.Module, x: Tensor, g: Tensor, keys: dict[str, str], k: Kinds,
         dtype: torch.dtype) -> dict[str, Use]:
    """The contributions of one call to the parameters named in ``keys``.

    Args:
        module: the layer (a :func:`supported` one).
        x: the call's input (detached), sample axis first.
        g: ``[N, P, D]`` output gradient, as :func:`out_view` gives it.
        keys: ``{"weight" | "bias": parameter name}`` for the call's parameters being estimated.
        k: the optional layer classes.
        dtype: the accumulation dtype (``vector`` forms are computed in it, the others later).

    Returns:
        ``{parameter name: Use}``; empty where the input does not have the expected layout.

    """
    n, p = g.shape[:2]
    out: dict[str, Use] = {}
    if "bias" in keys:
        out[keys["bias"]] = Use("vector", g.to(dtype), None, (g.shape[2],))
    if "weight" not in keys:
        return out
    name = keys["weight"]
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        o, i = module.out_channels, x.shape[1] * int(torch.Size(module.kernel_size).numel())
        if unfold(module, x[:1]).shape[1] != p:
            return {}
        out[name] = Use("outer", g, lambda lo, hi: unfold(module, x[lo:hi]), (o, i),
                        lambda lo, hi: conv_grads(module, x, g, lo, hi),
                        lambda v, summed: conv_inner(module, x, g, v, summed), lambda w: conv_weighted(module, x, g, w))
    elif isinstance(module, nn.Embedding):
        if x.numel() != n * p:
            return {}
        idx = x.reshape(n, p)
        if module.padding_idx is not None:
            idx = torch.where(idx == module.padding_idx, -1, idx)
        out[name] = Use("index", idx, _fixed(g), (module.num_embeddings, g.shape[2]))
    elif isinstance(module, nn.Linear):
        if x.numel() != n * p * x.shape[-1]:
            return {}
        out[name] = Use("outer", g, _fixed(x.reshape(n, p, -1)), (g.shape[2], x.shape[-1]))
    elif k.conv1d is not None and isinstance(module, k.conv1d):
        if x.numel() != n * p * x.shape[-1]:
            return {}
        out[name] = Use("outer", x.reshape(n, p, -1), _fixed(g), (x.shape[-1], g.shape[2]))
    else:  # LayerNorm / RMSNorm weight
        xhat = out_view(module, normalised(module, x, k), k)
        if xhat is None or xhat.shape != g.shape:
            return {}
        out[name] = Use("vector", g.to(dtype) * xhat.to(dtype), None, (g.shape[2],))
    return out


__all__ = ["NORMS", "Kinds", "Use", "conv_grads", "conv_inner", "conv_weighted", "kinds", "normalised", "out_view",
           "position_shape", "recompute", "supported", "unfold", "uses"]
