"""A PyTorch Lightning callback that keeps an EMA Fisher per task during training.

Optional: needs ``lightning`` (or the older ``pytorch_lightning``), ``pip install fisherfx[lightning]``.
Nothing else in fisherfx imports this module.

Every ``every_n_steps`` optimizer steps, at the end of the training batch, :class:`FisherCallback`
computes the group Fisher (or the diagonal) on that batch at the parameters just updated, folds it
into the EMA of the batch's task (``callback.states``, a plain ``{task: EMAState}``), logs the EMA's
trace and its top groups through ``LightningModule.log``, and at the end of training writes the
states with :func:`fisherfx.save`. The estimate is a pure function of the parameters: nothing is
written into the module's ``.grad``, and the model is put in eval mode for it (dropout off,
BatchNorm on its running statistics), each submodule's mode restored afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import FisherError
from ._options import positive_int
from .fisher import ENGINES, KINDS, NORMALIZES, OPTIONS, PERS, diag_fisher, group_fisher
from .groups import channels
from .io import provenance_from_json, provenance_to_json, save
from .problems import Problem, params_of, supervised
from .state import EMAState, ema_init, ema_update, ema_value

_INSTALL = "pip install fisherfx[lightning]"


class LightningMissing(FisherError, ImportError):
    """PyTorch Lightning is not installed: a :class:`FisherError` that ``except ImportError`` also catches."""


def _lightning():
    """The ``lightning.pytorch`` package, or ``pytorch_lightning``; :class:`LightningMissing` if neither."""
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError:
            raise LightningMissing("fisherfx.lightning: needs PyTorch Lightning, which is not installed: "
                              f"{_INSTALL}") from None
    return pl


pl = _lightning()

# options passed to the estimator as given (the callback owns generator, storage_dtype and device)
_PASSED = tuple(o for o in OPTIONS if o not in ("kind", "n_samples", "normalize", "generator", "storage_dtype",
                                                "device"))

Task = str | Callable[[Any, Any, Any], str]


def _check_task(where: str, task: Any) -> str:
    if not isinstance(task, str) or not task or "/" in task:
        raise FisherError(f"{where}: a task must be a non-empty string without '/' (it names the task in the "
                          f"logs and in the saved file), got {task!r}")
    return task


class FisherCallback(pl.Callback):
    """Keep an EMA of the Fisher per task while a Lightning module trains; log it; save it at the end.

    Args:
        problem: how to build the :class:`~fisherfx.Problem` from the LightningModule, a callable
            ``module -> Problem`` (``lambda m: ffx.supervised(m.model, ffx.Categorical())``), or a
            ``Problem`` built beforehand. Instead, ``likelihood`` (and ``attribute``) may be given.
        likelihood: with ``problem=None``: ``ffx.supervised(getattr(module, attribute), likelihood)``.
        attribute: the module's attribute holding the model (``None``: the LightningModule itself).
        groups: ``None`` for the diagonal Fisher, ``"channels"`` for :func:`~fisherfx.channels` of the
            parameters, a group spec ``{name: pattern}``, or a callable ``params -> spec``.
        task: the task's name (a string), or a callable ``(trainer, module, batch) -> name``.
        every_n_steps: estimate after every n-th optimizer step (``trainer.global_step``).
        decay: the EMA's β.
        kind, normalize, n_samples: the estimator's options (see :func:`~fisherfx.diag_fisher`).
        seed: seeds the callback's generator for ``kind="mc"`` (``None``: a random seed).
        log_top: how many of the EMA's largest groups to log (0: none).
        save_path: where :meth:`on_train_end` writes ``{task: EMAState}`` (``None``: not saved); the
            metadata holds ``epoch`` and ``global_step`` (and ``metadata``).
        metadata: JSON-able ``{key: value}`` added to the saved file's metadata.
        batch_fn: maps the training batch to the batch the problem reads (default: the batch as is).
        params: a callable ``model -> {name: tensor}`` choosing the parameters (default :func:`params_of`).
        eval_mode: put the problem's model in eval mode for the estimate (restored afterwards).
        prefix: the first part of the logged names, ``"<prefix>/<task>/trace"``.
        **options: other estimator options (``per``, ``engine``, ``dtype``, ``chunk_size``).

    Logged every estimate (through ``module.log``, so to ``trainer.logger`` and ``trainer.callback_metrics``):
    ``<prefix>/<task>/trace`` (the bias-corrected EMA's sum over all groups), ``<prefix>/<task>/batch_trace``
    (this batch's estimate) and, with ``log_top=k``, ``<prefix>/<task>/top<r>`` for ranks ``r = 1..k`` (the
    groups themselves, ``(name, index, value)``, are in :meth:`top_groups`).

    Raises:
        FisherError: an unknown option or a bad value of one (at construction), a task name that is
            not a string or holds ``"/"`` (at the step that meets it).

    """

    def __init__(self, problem: Problem | Callable[[Any], Problem] | None = None, *,
                 likelihood: Any = None, attribute: str | None = None,
                 groups: Any = None, task: Task = "default", every_n_steps: int = 1, decay: float = 0.99,
                 kind: str = "empirical", normalize: str = "samples", n_samples: int = 1, seed: int | None = None,
                 log_top: int = 0, save_path: str | os.PathLike | None = None,
                 metadata: Mapping[str, Any] | None = None, batch_fn: Callable[[Any], Any] | None = None,
                 params: Callable[[nn.Module], Mapping[str, Tensor]] | None = None, eval_mode: bool = True,
                 prefix: str = "fisher", **options: Any) -> None:
        where = "FisherCallback"
        super().__init__()
        unknown = sorted(set(options) - set(_PASSED))
        if unknown:
            raise FisherError(f"{where}: unknown options {unknown}; expected some of {list(_PASSED)} besides the "
                              "named arguments")
        if problem is None and likelihood is None:
            raise FisherError(f"{where}: give problem (a Problem, or a callable module -> Problem) or likelihood "
                              "(with attribute, the module's attribute holding the model)")
        if problem is not None and likelihood is not None:
            raise FisherError(f"{where}: give problem or likelihood, not both")
        if problem is not None and not (isinstance(problem, Problem) or callable(problem)):
            raise FisherError(f"{where}: problem must be a Problem or a callable module -> Problem, got "
                              f"{type(problem).__name__}")
        if attribute is not None and not isinstance(attribute, str):
            raise FisherError(f"{where}: attribute must be a string, got {type(attribute).__name__}")
        if not (groups is None or groups == "channels" or isinstance(groups, Mapping) or callable(groups)):
            raise FisherError(f"{where}: groups must be None (diagonal), 'channels', a {{name: pattern}} spec or a "
                              f"callable params -> spec, got {groups!r}")
        if not callable(task):
            _check_task(where, task)
        for name, value, allowed in (("kind", kind, KINDS), ("normalize", normalize, NORMALIZES),
                                     ("per", options.get("per", "sample"), PERS),
                                     ("engine", options.get("engine", "auto"), ENGINES)):
            if value not in allowed:
                raise FisherError(f"{where}: {name} must be one of {list(allowed)}, got {value!r}")
        positive_int(where, "n_samples", n_samples)
        positive_int(where, "every_n_steps", every_n_steps)
        positive_int(where, "log_top", log_top, minimum=0)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < float(decay) < 1.0:
            raise FisherError(f"{where}: decay must be a number in (0, 1), got {decay!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise FisherError(f"{where}: seed must be an integer or None, got {seed!r}")
        if not isinstance(prefix, str) or not prefix:
            raise FisherError(f"{where}: prefix must be a non-empty string, got {prefix!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise FisherError(f"{where}: metadata must be a {{key: value}} dict, got {type(metadata).__name__}")
        self.problem, self.likelihood, self.attribute = problem, likelihood, attribute
        self.groups, self.task, self.every_n_steps, self.decay = groups, task, every_n_steps, float(decay)
        self.kind, self.normalize, self.n_samples, self.options = kind, normalize, n_samples, dict(options)
        self.log_top, self.save_path, self.metadata = log_top, save_path, dict(metadata or {})
        self.batch_fn, self.params_fn, self.eval_mode, self.prefix = batch_fn, params, eval_mode, prefix
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.states: dict[str, EMAState] = {}
        self.last_step = -1  # the global step of the last estimate (an accumulation step counts once)
        self._built: tuple[int, Problem] | None = None
        self._top: dict[str, list[tuple[str, tuple[int, ...], float]]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # --- the estimate -----------------------------------------------------------------------------------

    def build_problem(self, module: Any) -> Problem:
        """The problem for ``module`` (built once per module and kept)."""
        if self._built is not None and self._built[0] == id(module):
            return self._built[1]
        where = "FisherCallback"
        if isinstance(self.problem, Problem):
            problem = self.problem
        elif self.problem is not None:
            problem = self.problem(module)
        else:
            model = module if self.attribute is None else getattr(module, self.attribute, None)
            if not isinstance(model, nn.Module):
                raise FisherError(f"{where}: the module has no model at attribute {self.attribute!r}")
            problem = supervised(model, self.likelihood)
        if not isinstance(problem, Problem):
            raise FisherError(f"{where}: problem(module) must return a Problem (ffx.supervised, ffx.causal_lm), got "
                              f"{type(problem).__name__}")
        self._built = (id(module), problem)
        return problem

    def _spec(self, problem: Problem, params: Mapping[str, Tensor]) -> Any:
        if self.groups is None or isinstance(self.groups, Mapping):
            return self.groups
        if self.groups == "channels":
            return channels(params, problem.model)
        return self.groups(params)

    def estimate(self, module: Any, batch: Any):
        """The batch's Fisher at the module's current parameters (an :class:`~fisherfx.Estimate`)."""
        problem = self.build_problem(module)
        model = problem.model
        params = dict((self.params_fn or params_of)(model))
        params = {k: v.detach() for k, v in params.items()}
        spec = self._spec(problem, params)
        data = batch if self.batch_fn is None else self.batch_fn(batch)
        options = dict(kind=self.kind, normalize=self.normalize, n_samples=self.n_samples,
                       generator=self.generator if self.kind == "mc" else None, **self.options)
        modes = {m: m.training for m in model.modules()}
        try:
            if self.eval_mode:
                model.eval()
            with torch.enable_grad():
                if spec is None:
                    est = diag_fisher(problem, params, data, **options)
                else:
                    est = group_fisher(problem, params, data, spec, **options)
        finally:
            for m, training in modes.items():
                m.training = training
        return est

    def task_of(self, trainer: Any, module: Any, batch: Any) -> str:
        """The batch's task name."""
        task = self.task(trainer, module, batch) if callable(self.task) else self.task
        return _check_task("FisherCallback", task)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == self.last_step or step % self.every_n_steps != 0:
            return
        self.last_step = step
        task = self.task_of(trainer, pl_module, batch)
        est = self.estimate(pl_module, batch)
        previous = self.states.get(task)
        state = ema_update(ema_init(est, decay=self.decay) if previous is None else previous, est)
        self.states[task] = state
        self._log(pl_module, task, state, est)

    # --- logging ------------------------------------------------------------------------------------------

    def top_groups(self, task: str, k: int | None = None) -> list[tuple[str, tuple[int, ...], float]]:
        """The ``k`` (default ``log_top``) largest groups of the task's bias-corrected EMA, as
        ``(parameter name, group index, value)``, largest first.
        """
        if task not in self.states:
            raise FisherError(f"FisherCallback.top_groups: no state for task {task!r}; tasks: {sorted(self.states)}")
        k = self.log_top if k is None else k
        value = ema_value(self.states[task])
        names = list(value)
        flat = torch.cat([value[n].reshape(-1).double().cpu() for n in names])
        sizes = [value[n].numel() for n in names]
        starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
        out = []
        for i in flat.argsort(descending=True, stable=True)[:k].tolist():
            j = max(p for p in range(len(names)) if starts[p] <= i)
            shape = value[names[j]].shape
            index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i - starts[j]), shape)) if shape else ()
            out.append((names[j], index, float(flat[i])))
        return out

    def _log(self, module: Any, task: str, state: EMAState, est: Any) -> None:
        base = f"{self.prefix}/{task}"
        metrics = {f"{base}/trace": sum(float(v.double().sum()) for v in ema_value(state).values()),
                   f"{base}/batch_trace": sum(float(v.double().sum()) for v in est.value.values())}
        if self.log_top:
            top = self.top_groups(task)
            self._top[task] = top
            metrics.update({f"{base}/top{r}": value for r, (_, _, value) in enumerate(top, start=1)})
        for name, value in metrics.items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1, logger=True)

    # --- saving and checkpoints ------------------------------------------------------------------------------

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.save_path is None or not self.states or not trainer.is_global_zero:
            return
        folder = os.path.dirname(os.path.abspath(os.fspath(self.save_path)))
        os.makedirs(folder, exist_ok=True)
        meta = {**self.metadata, "epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                "decay": self.decay, "every_n_steps": self.every_n_steps}
        save(self.save_path, dict(self.states), metadata=meta)

    def state_dict(self) -> dict[str, Any]:
        """Plain values (tensors, numbers, JSON-able dicts) for a Lightning checkpoint."""
        return {"states": {task: {"mean": dict(s.mean), "step": s.step, "decay": s.decay,
                                  "provenance": provenance_to_json(s.provenance)} for task, s in self.states.items()},
                "last_step": self.last_step, "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on ``trainer.fit(ckpt_path=...)``)."""
        self.states = {task: EMAState(dict(s["mean"]), torch.as_tensor(s["step"], dtype=torch.int64),
                                      float(s["decay"]), provenance_from_json(s["provenance"]))
                       for task, s in state_dict.get("states", {}).items()}
        self.last_step = int(state_dict.get("last_step", -1))
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])


__all__ = ["FisherCallback"]
