"""FisherCallback: a tiny Lightning run on CPU, checked against the EMA computed by hand."""

import csv
import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fisherfx as ffx

pytest.importorskip("lightning")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from fisherfx.io import read_header  # noqa: E402
from fisherfx.lightning import FisherCallback  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's advice on workers, loggers
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.2), nn.Linear(12, 3))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Recorder(pl.Callback):
    """Records what the Fisher callback sees: the batch, the parameters, the grads and the modes."""

    def __init__(self):
        self.batches, self.params, self.grads, self.steps, self.modes = [], [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.batches.append(tuple(t.clone() for t in batch))
        self.params.append({k: v.clone() for k, v in ffx.params_of(pl_module.model).items()})
        self.grads.append({k: p.grad.clone() for k, p in pl_module.model.named_parameters()})
        self.modes.append([m.training for m in pl_module.modules()])


def loader(n=STEPS * 8, batch_size=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def fit_recorded(callback, tmp_path=None, steps=STEPS, ckpt_path=None):
    """As fit, with recorders just before and just after the Fisher callback."""
    module = Classifier()
    before, after = Recorder(), Recorder()
    logger = CSVLogger(str(tmp_path), name="run", version=0) if tmp_path is not None else False
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, callbacks=[before, callback, after])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer, before, after


def by_hand(module, rec, select, task_of=lambda step: "default", decay=0.9, kind="empirical", seed=0,
            groups=True, **options):
    """The EMA states from the recorded batches and parameters, with the public functions only."""
    model = module.model.eval()
    problem = ffx.supervised(model, ffx.Categorical())
    gen = torch.Generator().manual_seed(seed)
    states = {}
    for step, batch, params in zip(rec.steps, rec.batches, rec.params):
        if not select(step):
            continue
        extra = {"generator": gen, **options} if kind == "mc" else options
        if groups:
            est = ffx.group_fisher(problem, params, batch, ffx.channels(params, model), kind=kind, **extra)
        else:
            est = ffx.diag_fisher(problem, params, batch, kind=kind, **extra)
        task = task_of(step)
        states[task] = ffx.ema_update(states.get(task) or ffx.ema_init(est, decay=decay), est)
    return states


def assert_states_equal(got, want):
    assert set(got) == set(want)
    for task in want:
        assert int(got[task].step) == int(want[task].step)
        assert got[task].decay == want[task].decay
        assert got[task].provenance == want[task].provenance
        torch.testing.assert_close(got[task].mean, want[task].mean)


@pytest.fixture(scope="module")
def channels_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    callback = FisherCallback(lambda m: ffx.supervised(m.model, ffx.Categorical()), groups="channels", decay=0.9,
                              kind="mc", n_samples=2, seed=0, log_top=3, save_path=tmp / "fisher" / "ema.safetensors",
                              metadata={"run": "test"})
    module, trainer, before, after = fit_recorded(callback, tmp)
    return tmp, callback, module, trainer, before, after


def test_ema_equals_the_ema_by_hand(channels_run):
    _, callback, module, _, before, _ = channels_run
    assert before.steps == list(range(1, STEPS + 1))
    want = by_hand(module, before, lambda step: True, kind="mc", n_samples=2)
    assert_states_equal(callback.states, want)
    assert int(callback.states["default"].step) == STEPS


def test_no_grad_written_and_modes_restored(channels_run):
    _, _, module, _, before, after = channels_run
    for g0, g1 in zip(before.grads, after.grads):
        for name in g0:
            assert torch.equal(g0[name], g1[name]), name
    assert before.modes == after.modes
    assert all(all(modes) for modes in after.modes)  # training mode throughout (dropout on)


def test_logged_metrics(channels_run):
    tmp, callback, _, trainer, _, _ = channels_run
    trace = sum(float(v.double().sum()) for v in ffx.ema_value(callback.states["default"]).values())
    assert float(trainer.callback_metrics["fisher/default/trace"]) == pytest.approx(trace, rel=1e-5)
    top = callback.top_groups("default")
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    name, index, value = top[0]
    assert float(ffx.ema_value(callback.states["default"])[name][index]) == pytest.approx(value)
    assert float(trainer.callback_metrics["fisher/default/top1"]) == pytest.approx(value, rel=1e-5)
    with open(tmp / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("fisher/default/trace", "fisher/default/batch_trace", "fisher/default/top1", "fisher/default/top3"):
        assert sum(1 for r in rows if r.get(key)) == STEPS, key
    assert float([r for r in rows if r["fisher/default/trace"]][-1]["fisher/default/trace"]) == pytest.approx(
        trace, rel=1e-5)


def test_saved_file_loads_and_matches(channels_run):
    tmp, callback, module, trainer, _, _ = channels_run
    path = tmp / "fisher" / "ema.safetensors"
    loaded = ffx.load(path, params=ffx.params_of(module.model))
    assert_states_equal(loaded, callback.states)
    meta = read_header(path).fields["metadata"]
    assert meta["run"] == "test" and meta["global_step"] == trainer.global_step == STEPS
    assert meta["epoch"] == trainer.current_epoch


def test_two_tasks_every_n_steps_keep_separate_states():
    def task(trainer, module, batch):
        return "first" if trainer.global_step <= 6 else "second"

    callback = FisherCallback(likelihood=ffx.Categorical(), attribute="model", task=task, every_n_steps=2,
                              decay=0.8)
    module, _, before, _ = fit_recorded(callback)
    want = by_hand(module, before, lambda step: step % 2 == 0, lambda step: "first" if step <= 6 else "second",
                   decay=0.8, groups=False)
    assert_states_equal(callback.states, want)
    assert int(callback.states["first"].step) == 3 and int(callback.states["second"].step) == 2


def test_checkpoint_state_round_trip(channels_run, tmp_path):
    _, callback, _, _, _, _ = channels_run
    torch.save(callback.state_dict(), tmp_path / "cb.pt")
    restored = FisherCallback(likelihood=ffx.Categorical(), attribute="model", kind="mc")
    restored.load_state_dict(torch.load(tmp_path / "cb.pt", weights_only=True))  # plain values only
    assert_states_equal(restored.states, callback.states)
    assert restored.last_step == callback.last_step
    assert torch.equal(restored.generator.get_state(), callback.generator.get_state())


@pytest.mark.parametrize("kwargs, match", [
    ({"kindd": "mc"}, "unknown options"),
    ({"kind": "fancy"}, "kind must be one of"),
    ({"normalize": "rows"}, "normalize must be one of"),
    ({"decay": 1.0}, "decay"),
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"log_top": -1}, "log_top"),
    ({"task": "a/b"}, "task"),
    ({"groups": 3}, "groups"),
    ({"n_samples": 0}, "n_samples"),
])
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ffx.FisherError, match=match):
        FisherCallback(lambda m: ffx.supervised(m.model, ffx.Categorical()), **kwargs)


def test_needs_a_problem():
    with pytest.raises(ffx.FisherError, match="give problem"):
        FisherCallback()


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "files.md").read_text()
    section = text[text.index("## Lightning"):]
    (code,) = re.findall(r"```py\n(.*?)```", section, re.S)[:1]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/files.md[Lightning]", "exec"), {})
    assert (tmp_path / "fisher.safetensors").exists()


def test_without_lightning_the_import_says_how_to_install():
    code = ("import sys\n"
            "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'): sys.modules[name] = None\n"
            "import fisherfx\n"
            "assert 'fisherfx.lightning' not in sys.modules\n"
            "try:\n"
            "    import fisherfx.lightning\n"
            "except ImportError as err:\n"
            "    assert isinstance(err, fisherfx.FisherError), type(err)\n"
            "    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install fisherfx[lightning]" in out.stdout


def test_resume_from_a_lightning_checkpoint(tmp_path):
    """fit(ckpt_path=...) restores the EMA states: the resumed run continues the first run's EMA."""
    def make():
        return FisherCallback(likelihood=ffx.Categorical(), attribute="model", groups="channels", decay=0.9)

    first = make()
    module, trainer, rec1, _ = fit_recorded(first, steps=4)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make()
    module, _, rec2, _ = fit_recorded(resumed, steps=STEPS, ckpt_path=tmp_path / "half.ckpt")
    assert rec2.steps == list(range(5, STEPS + 1))
    for field in ("steps", "batches", "params"):
        getattr(rec1, field).extend(getattr(rec2, field))
    assert_states_equal(resumed.states, by_hand(module, rec1, lambda step: True, decay=0.9))


def test_batchnorm_estimated_in_eval_mode_and_restored():
    module = Classifier()
    module.model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).train()
    stats = module.model[1].running_mean.clone()
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    est = FisherCallback(likelihood=ffx.Categorical(), attribute="model").estimate(module, batch)
    want = ffx.diag_fisher(ffx.supervised(module.model.eval(), ffx.Categorical()), ffx.params_of(module.model), batch)
    torch.testing.assert_close(est.value, want.value)
    module.model.train()
    assert torch.equal(module.model[1].running_mean, stats)
    with pytest.raises(ffx.FisherError, match="BatchNorm"):
        FisherCallback(likelihood=ffx.Categorical(), attribute="model", eval_mode=False).estimate(module, batch)
    assert all(m.training for m in module.model.modules())
