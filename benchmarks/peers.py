"""The benchmark's tasks done by peer libraries and by a hand-written ``torch.func`` baseline.

Each peer is a factory ``peer(workload, kind, per) -> fn``; ``fn()`` returns the diagonal
``{name: [*P]}`` under fisherfx's conventions, so that results compare entry by entry:

* per sample: ``(1/N) Σ_n g_n ⊙ g_n`` with ``g_n = ∇ℓ_n`` the gradient of the *unreduced* NLL
  of sample ``n`` (summed over its active tokens); fisherfx ``normalize="samples"``;
* per token: ``(1/Z) Σ_{n,t} g_{n,t} ⊙ g_{n,t}``, ``Z`` active tokens; ``normalize="tokens"``;
* MC: the same with one label per active position drawn from the model.

Every peer is run with a sum-reduced loss and divided by ``N`` once, which is how each documents
its scaling (a mean-reduced loss would give ``1/N²`` for squared per-sample gradients).
A factory raises :class:`Unsupported` for a task it cannot do, :class:`NotThisTask` when it is a
baseline written for other tasks (no row), and ``ImportError`` when the peer is not installed.
Besides the libraries there are two hand-written ``torch.func`` baselines: ``vmap(grad)`` of the
per-sample NLL (``jacrev`` of the per-position NLLs per token) and, for per-token only,
:func:`vjp_positions` (one ``vjp`` per sample, its pull-back vmapped over per-position
cotangents). Peers get a deep copy of the model, since several modify it in place.
"""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

IGNORE = -100


class Unsupported(Exception):
    """The peer cannot do this task on this workload."""


class NotThisTask(Exception):
    """A baseline written for other tasks only: not a peer's limitation, so not reported."""


# ---------------------------------------------------------------- shared helpers


def logits_of(model: nn.Module, x: Tensor, mask: Tensor | None = None, params=None) -> Tensor:
    """Model outputs: ``[N, C]`` for a classifier, ``[N, T, V]`` for a causal LM (``mask`` given)."""
    if mask is None:
        return model(x) if params is None else functional_call(model, params, (x,))
    kwargs = {"input_ids": x, "use_cache": False}
    if params is None:
        return model(attention_mask=mask, **kwargs).logits
    # right padding and causal attention: real tokens never see a pad, so no mask is needed
    return functional_call(model, params, (), kwargs).logits


def position_nll(logits: Tensor, y: Tensor) -> Tensor:
    """NLL per position ``[N, T']`` (0 where the label is ignored); causal shift for ``[N, T, V]``."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, y, reduction="none")[:, None]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], reduction="none", ignore_index=IGNORE)


def sample_nll(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample NLL ``ℓ_n`` ``[N]``: the sum over the sample's active positions."""
    return position_nll(logits, y).sum(1)


def sampled_labels(logits: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
    """Labels drawn from the model at every active position of ``y`` (ignored ones stay ignored)."""
    probs = torch.softmax(logits.detach().float(), -1)
    if logits.ndim == 2:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    draw = torch.multinomial(probs[:, :-1].flatten(0, 1), 1, generator=generator).view(y.shape[0], -1)
    out = y.clone()
    out[:, 1:] = torch.where(y[:, 1:] == IGNORE, IGNORE, draw)
    return out


def labels_for(kind: str, logits: Tensor, y: Tensor, generator: torch.Generator) -> Tensor:
    return y if kind == "empirical" else sampled_labels(logits, y, generator)


def _classifier_only(w, peer: str, why: str) -> None:
    if w.mask is not None:
        raise Unsupported(f"{peer}: {why}")


def _sequences_only(w, peer: str) -> None:
    if w.mask is None:
        raise Unsupported(f"{peer}: for sequence models (a classifier has one position per sample)")


def _per_sample_only(per: str, peer: str) -> None:
    if per != "sample":
        raise Unsupported(f"{peer}: per-sample gradients only, no per-token estimator")


# ---------------------------------------------------------------- peers


def vmap_grad(w, kind: str, per: str):
    """Hand-written ``vmap(grad)`` per-sample gradients (``jacrev`` of per-position NLLs per token)."""
    model, n = w.model, w.x.shape[0]
    params = {k: p.detach() for k, p in model.named_parameters()}

    def nll_one(p, x1, y1):  # one sample: [...] -> scalar
        return sample_nll(logits_of(model, x1[None], w.mask, p), y1[None])[0]

    def positions_one(p, x1, y1):  # one sample: [T] -> [T-1]
        return position_nll(logits_of(model, x1[None], w.mask, p), y1[None])[0]

    per_sample = vmap(grad(nll_one), in_dims=(None, 0, 0))

    def run():
        if per == "token":
            total = {k: torch.zeros_like(p) for k, p in params.items()}
            for i in range(n):  # [T-1, *P] per sample; all samples at once would not fit
                for k, j in jacrev(positions_one)(params, w.x[i], w.y[i]).items():
                    total[k] += (j**2).sum(0)
            return {k: v / w.active_tokens for k, v in total.items()}
        with torch.no_grad():
            y = w.y if kind == "empirical" else sampled_labels(logits_of(model, w.x, w.mask), w.y, w.generator())
        return {k: g.square_().sum(0) / n for k, g in per_sample(params, w.x, y).items()}  # in place: [N, *P]

    return run


def position_chunk(n_params: int, budget_bytes: int = 256 * 2**20, most: int = 32) -> int:
    """Positions per vectorised pull-back: ``chunk·P`` float32 gradients within ``budget_bytes``."""
    return max(1, min(most, budget_bytes // (4 * n_params)))


def vjp_positions(w, kind: str, per: str, chunk: int | None = None):
    """Hand-written per-token baseline: per sample, one ``vjp`` of the logits, pulled back per position.

    For each sample ``n``: ``f, pull = vjp(θ ↦ logits_n(θ))`` (one forward), then ``vmap(pull)``
    over one-hot per-position cotangents: the cotangent for position ``t`` is
    ``∂ℓ_{n,t}/∂f_t = softmax(f_t) − e_{y_{n,t+1}}`` placed at ``t`` and zero elsewhere, so each
    pull-back is ``∇ℓ_{n,t}``; these are squared and summed. Positions go ``chunk`` at a time
    (default :func:`position_chunk`: at most 256 MiB of float32 gradients, at most 32), so memory
    is one sample's activations and graph plus ``chunk`` parameter-sized gradients and ``chunk``
    ``[T, V]`` cotangents, whatever ``T``.
    """
    if per != "token":
        raise NotThisTask("torch.func vjp over positions: the per-token baseline only")
    _sequences_only(w, "torch.func vjp over positions")
    model = w.model
    params = {k: p.detach() for k, p in model.named_parameters()}
    chunk = chunk or position_chunk(sum(p.numel() for p in params.values()))

    def run():
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        generator = w.generator()  # one stream of MC draws for the whole batch
        for i in range(w.x.shape[0]):
            x1 = w.x[i:i + 1]
            logits, pull = vjp(lambda p, x1=x1: logits_of(model, x1, w.mask, p), params)  # [1, T, V]
            with torch.no_grad():
                y = labels_for(kind, logits, w.y[i:i + 1], generator)[0, 1:]  # position t predicts y[t + 1]
                at = (y != IGNORE).nonzero()[:, 0]  # active positions
                f, y = logits[0, at], y[at]
                cot = torch.softmax(f.float(), -1).to(logits.dtype)  # [A, V]: ∂ℓ_t/∂f_t
                cot[torch.arange(len(y)), y] -= 1
            for start in range(0, len(at), chunk):
                c = slice(start, start + chunk)
                one_hot = logits.new_zeros(len(cot[c]), *logits.shape)  # [c, 1, T, V]
                one_hot[torch.arange(len(cot[c])), 0, at[c]] = cot[c]
                (grads,) = vmap(pull)(one_hot)
                for k, g in grads.items():
                    total[k] += g.square_().sum(0)  # in place: [c, *P]
        return {k: v / w.active_tokens for k, v in total.items()}

    return run


def backpack(w, kind: str, per: str):
    """BackPACK: ``SumGradSquared`` (empirical) and ``DiagGGNMC`` (MC) on a sum-reduced loss, ÷ N."""
    from backpack import backpack as use_extensions
    from backpack import extend
    from backpack.extensions import DiagGGNMC, SumGradSquared

    _classifier_only(w, "BackPACK", "needs a Sequential of supported layers; GPT-2 is not one")
    _per_sample_only(per, "BackPACK")
    model = extend(copy.deepcopy(w.model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    ext, attr = (SumGradSquared(), "sum_grad_squared") if kind == "empirical" else (DiagGGNMC(1), "diag_ggn_mc")
    params, n = dict(model.named_parameters()), w.x.shape[0]

    def run():
        loss = loss_fn(model(w.x), w.y)
        with use_extensions(ext):
            loss.backward()
        out = {k: getattr(p, attr) / n for k, p in params.items()}
        for p in params.values():
            p.grad = None
            delattr(p, attr)
        return out

    return run


def curvlinops(w, kind: str, per: str, num_matvecs: int = 10):
    """curvlinops: Hutchinson diagonal of ``EFLinearOperator`` / ``FisherMCLinearOperator`` (sum) ÷ N.

    curvlinops has no exact diagonal; its diagonal estimators are stochastic (Hutchinson, XDiag)
    from matrix-vector products, so this is a different, cheaper-per-accuracy task: its error is
    the estimator's variance, not a disagreement in conventions.
    """
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, hutchinson_diag

    _classifier_only(w, "curvlinops", "not run on the language model (stochastic diagonal only)")
    _per_sample_only(per, "curvlinops")
    model = copy.deepcopy(w.model)
    params, n = dict(model.named_parameters()), w.x.shape[0]
    args = (model, nn.CrossEntropyLoss(reduction="sum"), list(params.values()), [(w.x, w.y)])
    op = (EFLinearOperator(*args, check_deterministic=False) if kind == "empirical"
          else FisherMCLinearOperator(*args, check_deterministic=False, seed=0))

    def run():
        flat = hutchinson_diag(op, num_matvecs) / n
        return dict(zip(params, (t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params.values()]),
                                                                 params.values()))))

    return run


def nngeometry(w, kind: str, per: str):
    """nngeometry: ``PMatDiag`` of per-sample log-likelihoods (empirical) or ``FIM_MonteCarlo``.

    Its diagonal is ``(1/N) Σ_n (∂f_n/∂θ)²`` for the function ``f`` it is given: the per-sample
    log-likelihood with the dataset's labels for the empirical Fisher, ``variant="classif_logits"``
    with ``trials=1`` for MC.
    """
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM_MonteCarlo
    from nngeometry.object import PMatDiag, PVector

    _classifier_only(w, "nngeometry", "LayerCollection has no HuggingFace Conv1D or Embedding layer")
    _per_sample_only(per, "nngeometry")
    model = copy.deepcopy(w.model)
    layers = LayerCollection.from_model(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(w.x, w.y), batch_size=w.x.shape[0])

    def log_likelihood(x, y):  # [N, 1]
        return -F.cross_entropy(model(x), y, reduction="none")[:, None]

    def run():
        if kind == "empirical":
            backend = TorchHooksJacobianBackend(model=model, function=log_likelihood, layer_collection=layers)
            diag = PMatDiag(generator=backend, examples=loader)
        else:
            diag = FIM_MonteCarlo(model, loader, PMatDiag, variant="classif_logits", trials=1)
        out = {}
        for layer, (weight, bias) in PVector(layers, vector_repr=diag.data).to_dict().items():
            out[f"{layer}.weight"], out[f"{layer}.bias"] = weight, bias
        return out

    return run


def asdl(w, kind: str, per: str):
    """ASDL (``asdfghjkl``): ``FisherConfig(fisher_type=emp | mc, SHAPE_DIAG)``, sum loss, ``data_size=N``."""
    import asdl as lib

    _classifier_only(w, "ASDL", "HuggingFace Conv1D layers are not supported")
    _per_sample_only(per, "ASDL")
    model = copy.deepcopy(w.model)
    config = lib.FisherConfig(fisher_type=lib.FISHER_EMP if kind == "empirical" else lib.FISHER_MC,
                              fisher_shapes=[lib.SHAPE_DIAG], loss_type=lib.LOSS_CROSS_ENTROPY,
                              data_size=w.x.shape[0], n_mc_samples=1)
    maker = lib.get_fisher_maker(model, config)

    def run():
        logits = maker.setup_model_call(model, w.x)
        maker.setup_loss_call(F.cross_entropy, logits, w.y, reduction="sum")
        maker.forward_and_backward()
        out = {}
        for name, module in model.named_modules():
            diag = getattr(getattr(module, "fisher", None), "diag", None)
            for part in ("weight", "bias") if diag is not None else ():
                if getattr(diag, part, None) is not None:
                    out[f"{name}.{part}"] = getattr(diag, part)
        maker.zero_fisher()
        model.zero_grad(set_to_none=True)
        return out

    return run


def opacus(w, kind: str, per: str):
    """opacus: ``GradSampleModule(loss_reduction="sum")`` per-sample gradients, squared, ÷ N."""
    from opacus import GradSampleModule

    _per_sample_only(per, "opacus")
    # opacus records activations in train mode only; the benchmark's models have no dropout
    model = copy.deepcopy(w.model).train()
    params, n = dict(model.named_parameters()), w.x.shape[0]
    wrapped = GradSampleModule(model, loss_reduction="sum", strict=False)

    def logits():
        if w.mask is None:
            return wrapped(w.x)
        # per-row position ids: GPT-2's own are one [1, T] row, which opacus would read as one sample
        positions = torch.arange(w.x.shape[1]).expand_as(w.x)
        return wrapped(input_ids=w.x, attention_mask=w.mask, position_ids=positions, use_cache=False).logits

    def run():
        out = logits()
        sample_nll(out, labels_for(kind, out, w.y, w.generator())).sum().backward()
        diag = {k: p.grad_sample.square_().sum(0) / n for k, p in params.items()}  # in place: [N, *P]
        for p in params.values():
            p.grad, p.grad_sample = None, None
        return diag

    return run


PEERS = {
    "torch.func vmap(grad)": vmap_grad,
    "torch.func vjp over positions": vjp_positions,
    "BackPACK": backpack,
    "curvlinops (Hutchinson, 10 mv)": curvlinops,
    "nngeometry": nngeometry,
    "ASDL": asdl,
    "opacus": opacus,
}

DISTRIBUTIONS = {"BackPACK": "backpack-for-pytorch", "curvlinops": "curvlinops-for-pytorch",
                 "nngeometry": "nngeometry", "ASDL": "asdfghjkl", "opacus": "opacus"}
