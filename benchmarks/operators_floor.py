"""What a call of ``K`` vectors can save at best: the shared and the per-vector parts of ``ggn_vp`` and
``hvp``, timed on this machine (one thread, CPU time, medians).

Run from the repository root::

    python benchmarks/operators_floor.py                 # MLP, CNN, GPT-2 (about 3 minutes)
    python benchmarks/operators_floor.py --workloads cnn

A call of ``K`` vectors can share only what does not depend on the vector:

* ``ggn_vp`` (``jvp``/``vjp``): the primal forward. Each vector needs its tangent pass (``J v``; timed
  alone and ``K = 8`` batched with ``vmap``, as the call runs them) and its pull-back ``Jᵀ u``.
* ``hvp`` through the taps: the forward and the first backward (to the layers' outputs). Each vector
  needs ``s_k = ⟨∇L, v_k⟩`` and the second backward.

The best fraction of ``8`` single calls is then ``(shared + 8 · per vector) / (8 · one call)``; the
convolution rows also time folding the ``K`` vectors into one convolution (``K·o`` output channels, or
``K`` folded into the batch) against ``K`` convolutions.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import run  # noqa: E402

import fisherfx as ffx  # noqa: E402
from fisherfx import _hessian_products as hessian  # noqa: E402
from fisherfx import _products as products  # noqa: E402
from fisherfx import vectors  # noqa: E402
from fisherfx.fisher import prepare_batch  # noqa: E402
from fisherfx.losses import summed_nll  # noqa: E402

K = 8


def timed(fn, repeats: int = 7) -> float:
    """Median CPU milliseconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1e3 * sorted(times)[repeats // 2]


def floor(key: str) -> None:
    w = run.build(key, False)
    params = w.params
    normalize = "tokens" if w.mask is not None else "samples"
    prepared = prepare_batch("floor", w.problem, params, w.batch, "exact", 1, None, normalize).prepared
    forward = products.forward_of("floor", w.problem, prepared)
    gen = torch.Generator().manual_seed(1)
    vk = vectors.random_like(params, k=K, generator=gen, distribution="gaussian")
    v1 = {name: t[0] for name, t in vk.items()}
    leaves = products.grad_leaves(params)
    reference = run.forward_backward(w)
    with products.math_sdpa(), torch.enable_grad():
        out = forward(leaves)
        u = torch.randn_like(out)
        single = timed(lambda: ffx.ggn_vp(w.problem, params, w.batch, v1, normalize=normalize))
        batched = timed(lambda: ffx.ggn_vp(w.problem, params, w.batch, vk, normalize=normalize), 5)
        primal = timed(lambda: forward(leaves))
        tangent = timed(lambda: jvp(forward, (leaves,), (v1,))) - primal
        tangents = timed(lambda: vmap(lambda t: jvp(forward, (leaves,), (t,)), out_dims=(None, 0))(vk), 5) - primal
        pull = timed(lambda: torch.autograd.grad(out, list(leaves.values()), u, retain_graph=True, allow_unused=True))
        ref = timed(reference)
        best = (primal + tangents + K * pull) / (K * single)
        print(f"{run.label(key, False)}: forward+backward {ref:.1f} ms")
        print(f"  ggn_vp: one vector {single:.1f} ms, K={K} {batched:.1f} ms "
              f"({batched / (K * single):.2f} of {K} calls); shared primal forward {primal:.1f}; "
              f"per vector: tangent {tangent:.1f} alone, {tangents / K:.1f} in a"
              f" batch of {K}, pull-back {pull:.1f} -> best {best:.2f} of {K} calls"
              f" ({(primal + K * (tangent + pull)) / (K * single):.2f} with the tangents timed alone)")

        def shared():
            with hessian._recorded(w.problem.model, leaves) as calls:
                o = forward(leaves)
            grads = torch.autograd.grad(summed_nll(w.problem, o, prepared), [c.y for c in calls], create_graph=True,
                                        allow_unused=True)
            return calls, grads

        calls, grads = shared()
        served = {name for c in calls for name in c.keys.values()}

        def second():
            s = sum((g * hessian._tangent(c, v1, served)).sum() for c, g in zip(calls, grads, strict=True)
                    if g is not None)
            torch.autograd.grad(s, list(leaves.values()), retain_graph=True, allow_unused=True)

        first, per = timed(shared), timed(second)
        hv1 = timed(lambda: ffx.hvp(w.problem, params, w.batch, v1, normalize=normalize))
        hv8 = timed(lambda: ffx.hvp(w.problem, params, w.batch, vk, normalize=normalize), 5)
        print(f"  hvp: one vector {hv1:.1f} ms, K={K} {hv8:.1f} ms ({hv8 / (K * hv1):.2f} of {K} calls); taps: shared"
              f" forward + first backward {first:.1f}, per vector s_k + second backward {per:.1f}"
              f" -> best {(first + K * per) / (K * hv1):.2f} of {K} calls")
    if key == "cnn":
        convolutions()


def convolutions() -> None:
    """The CNN's convolutions: ``K`` tangents folded into one convolution against ``K`` convolutions."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    h = torch.randn(64, 32, 30, 30, generator=gen)
    hk = torch.randn(K * 64, 32, 30, 30, generator=gen)
    v1, v2 = torch.randn(K * 32, 3, 3, 3, generator=gen), torch.randn(K * 64, 32, 3, 3, generator=gen)
    w2 = v2[:64].clone()
    rows = [
        ("conv1(x, V_k): K·o channels", lambda: F.conv2d(x, v1),
         lambda: [F.conv2d(x, v1[i * 32:(i + 1) * 32]) for i in range(K)]),
        ("conv2(h, V_k): K·o channels", lambda: F.conv2d(h, v2, stride=2),
         lambda: [F.conv2d(h, v2[i * 64:(i + 1) * 64], stride=2) for i in range(K)]),
        ("conv2(ḣ_k, W): K in the batch", lambda: F.conv2d(hk, w2, stride=2),
         lambda: [F.conv2d(hk[i * 64:(i + 1) * 64], w2, stride=2) for i in range(K)]),
    ]
    for label, folded, separate in rows:
        print(f"  {label}: folded {timed(folded):.1f} ms, {K} convolutions {timed(separate):.1f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "gpt2"], choices=["mlp", "cnn", "gpt2"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for key in args.workloads:
        floor(key)


if __name__ == "__main__":
    main()
