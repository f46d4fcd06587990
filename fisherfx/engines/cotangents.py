"""Output-space vectors whose pull-backs through the model are each estimator's gradient vectors.

Every Fisher estimator of fisherfx is a sum of outer products ``v vᵀ`` of parameter-space vectors
``v = J_nᵀ u`` (``J_n`` the Jacobian of sample ``n``'s outputs ``[T, C]`` w.r.t. the parameters).
Only the output-space vectors ``u`` differ between estimators:

=============  =========================================================================
kind           ``u`` at position ``t`` (zero at inactive positions)
=============  =========================================================================
empirical      ``∂ℓ(f_t, y_t)/∂f_t`` with the dataset's labels (one vector, ``R = 1``)
mc             ``∂ℓ(f_t, ỹ_t^s)/∂f_t`` with ``ỹ^s ~ p(·|f)``, one per draw (``R = S``)
exact          the columns ``S_{t,:,k}`` of ``S Sᵀ = ∂²ℓ/∂f_t²`` (``R = K``)
=============  =========================================================================

``per="sample"`` sums a vector over the positions of a sample; ``per="token"`` keeps each
position on its own. For ``exact`` the two coincide (the cross terms between positions vanish in
expectation), so it is always position by position.
"""

from typing import Literal

import torch
from torch import Tensor

from ..likelihoods import Likelihood

Kind = Literal["empirical", "mc", "exact"]


def position_vectors(
    likelihood: Likelihood,
    outputs: Tensor,
    targets: Tensor,
    active: Tensor,
    kind: Kind,
    noise: Tensor | None = None,
    masked: bool = True,
) -> Tensor:
    """Per-position output vectors ``[R, ..., T, C]`` (see the module docstring).

    Args:
        likelihood: the likelihood of the outputs.
        outputs: ``[..., T, C]`` canonical outputs (any leading axes, e.g. ``N`` or none).
        targets: canonical targets matching ``outputs``.
        active: ``[..., T]`` bool.
        kind: ``"empirical"``, ``"mc"`` or ``"exact"``.
        noise: ``[S, ...]`` random numbers from ``likelihood.noise`` (``kind="mc"`` only).
        masked: zero the inactive positions; ``False`` where the caller knows every position is active.

    Returns:
        ``[R, ..., T, C]``, zero at inactive positions. For ``mc`` the ``S`` draws are *not* yet
        divided by ``S``.

    """
    outputs = outputs.detach()
    if outputs.dtype in (torch.float16, torch.bfloat16):  # softmax and sampling in float32
        outputs = outputs.float()
    if kind == "exact":
        sqrt = likelihood.hessian_sqrt(outputs)  # [..., T, C, K]
        if masked:
            sqrt = sqrt * active[..., None, None].to(outputs.dtype)
        return torch.movedim(sqrt, -1, 0)
    labels = targets if kind == "empirical" else likelihood.sample(outputs, noise)
    u = likelihood.nll_grad(outputs, labels)  # a fresh tensor: masked in place
    if masked:
        u.mul_(active[..., None].to(outputs.dtype))
    return u[None] if kind == "empirical" else u


def count_vectors(r: int, t: int, width: int, kind: Kind, per: str) -> int:
    """``J``, the vectors of one sample: ``R`` (``per="sample"``), ``R·T`` (``per="token"``) or ``T·C``
    (``kind="exact"``, ``K = C`` columns per position), with ``R`` the draws (1 unless MC).
    """
    if kind == "exact":
        return t * width
    return r if per == "sample" else r * t


def unit_vectors(vectors: Tensor, kind: Kind, per: str, lo: int, hi: int, positions: Tensor | None = None) -> Tensor:
    """Vectors ``lo:hi`` of one sample's ``[J, T, C]`` whose pull-backs are squared, from ``[R, T, C]``.

    ``per="sample"`` (and not exact): ``J = R``, each vector spans all positions.
    Otherwise ``J = R·L`` over ``L`` positions (all ``T``, or the given ``positions`` ``[L]``: the
    others' vectors are zero): vector ``j = r·L + l`` is ``vectors[r, p_l]`` at position ``p_l`` and zero
    elsewhere. Only the requested chunk is formed.
    """
    if per == "sample" and kind != "exact":
        return vectors[lo:hi]
    r, t, c = vectors.shape
    if positions is not None:
        vectors = vectors[:, positions]
    length = vectors.shape[1]
    j = torch.arange(lo, hi, device=vectors.device)
    picked = vectors.reshape(r * length, c)[lo:hi]  # [j, C]: vectors[j // L, j % L]
    if positions is None:  # inside vmap over samples: no in-place writes into a fresh tensor
        onehot = torch.eye(t, dtype=vectors.dtype, device=vectors.device)[j % length]  # [j, T]
        return onehot[:, :, None] * picked[:, None, :]
    out = vectors.new_zeros((hi - lo, t, c))
    out[torch.arange(hi - lo, device=vectors.device), positions[j % length]] = picked
    return out

