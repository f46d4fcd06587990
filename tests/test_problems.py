"""Problems and the loss built on them: ``nll`` against hand-written losses, causal_lm's extra batch
keys, ``forward_failure``'s diagnoses, compiled modules and batch validation.
"""

import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

import fisherfx as ffx
from fisherfx.problems import forward_failure
from tests import cases
from tests.cases import CASES, IGNORE, LM_CASES, case_id
from tests.strategies import SAME_MATH_F64, assert_values_close, build, tiny_gpt2, tiny_llama

F64 = torch.float64
NORMALIZES = ["samples", "tokens", "none"]
SUPERVISED = [c for c in CASES if c.name in ("mlp-categorical", "mlp-gaussian", "mlp-bernoulli",
                                             "embed-layernorm-tokens", "dict-input", "tied-weights")]


# --- hand-written losses ------------------------------------------------------------------------

def hand_lm_loss(model: nn.Module, params: dict[str, Tensor], batch: dict[str, Tensor], normalize: str,
                 **per_token: Tensor) -> Tensor:
    """``F.cross_entropy(reduction="sum")`` on each unpadded sequence, run alone, then ``/ Z``."""
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    labels = batch.get("labels", batch["input_ids"])
    total, tokens = 0.0, 0
    for n in range(mask.shape[0]):
        keep = mask[n]
        extra = {k: v[n][keep][None] for k, v in per_token.items()}
        logits = functional_call(model, params, (), {"input_ids": batch["input_ids"][n][keep][None], **extra}).logits
        target = labels[n][keep][1:]
        total = total + F.cross_entropy(logits[0, :-1], target, reduction="sum", ignore_index=IGNORE)
        tokens += int((target != IGNORE).sum())
    return total / {"samples": mask.shape[0], "tokens": tokens, "none": 1}[normalize]


def hand_supervised_loss(model: nn.Module, likelihood, params: dict[str, Tensor], batch, normalize: str) -> Tensor:
    inputs, targets = batch
    out = functional_call(model, params, (), dict(inputs)) if isinstance(inputs, dict) else \
        functional_call(model, params, (inputs,))
    if isinstance(likelihood, ffx.Categorical):
        logits = out.reshape(-1, out.shape[-1])
        total = F.cross_entropy(logits, targets.reshape(-1), reduction="sum", ignore_index=IGNORE)
        tokens = int((targets != IGNORE).sum())
    elif isinstance(likelihood, ffx.Gaussian):
        total = F.mse_loss(out, targets, reduction="sum") / (2 * likelihood.sigma**2)
        tokens = out.shape[0]  # outputs [N, C]: one position per sample
    else:
        total = F.binary_cross_entropy_with_logits(out, targets, reduction="sum")
        tokens = out.shape[0]
    return total / {"samples": out.shape[0], "tokens": tokens, "none": 1}[normalize]


# --- nll ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_nll_equals_cross_entropy_on_each_unpadded_sequence(case, normalize):
    b = cases.build(case)
    got = ffx.nll(b.problem, b.params, b.batch, normalize=normalize)
    want = hand_lm_loss(b.model, b.params, b.batch, normalize)
    assert got.dtype == F64
    torch.testing.assert_close(got, want, **case.tol)


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_nll_gradient_equals_autograd_of_the_hand_loss(case, normalize):
    b = cases.build(case)
    got = torch.func.grad(lambda p: ffx.nll(b.problem, p, b.batch, normalize=normalize))(b.params)
    leaves = {k: v.detach().requires_grad_() for k, v in b.params.items()}
    want = dict(zip(leaves, torch.autograd.grad(hand_lm_loss(b.model, leaves, b.batch, normalize),
                                                list(leaves.values()))))
    assert_values_close(got, want, **case.tol)
    assert any(bool(v.abs().max() > 0) for v in got.values()), "all gradients are zero"


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("case", SUPERVISED, ids=case_id)
def test_nll_of_supervised_problems_equals_torch_losses(case, normalize):
    b = cases.build(case)
    likelihood = b.problem.likelihood
    got = ffx.nll(b.problem, b.params, b.batch, normalize=normalize)
    torch.testing.assert_close(got, hand_supervised_loss(b.model, likelihood, b.params, b.batch, normalize),
                               **case.tol)
    grads = torch.func.grad(lambda p: ffx.nll(b.problem, p, b.batch, normalize=normalize))(b.params)
    leaves = {k: v.detach().requires_grad_() for k, v in b.params.items()}
    hand = hand_supervised_loss(b.model, likelihood, leaves, b.batch, normalize)
    assert_values_close(grads, dict(zip(leaves, torch.autograd.grad(hand, list(leaves.values())))), **case.tol)


def test_nll_token_normalisation_ignores_padded_rows():
    b = cases.build(cases.BY_NAME["gpt2-right-pad"])
    padded = {k: torch.cat([v, torch.zeros_like(v[:2])]) for k, v in b.batch.items()}  # two empty rows
    torch.testing.assert_close(ffx.nll(b.problem, b.params, padded, normalize="tokens"),
                               ffx.nll(b.problem, b.params, b.batch, normalize="tokens"), **SAME_MATH_F64)
    torch.testing.assert_close(ffx.nll(b.problem, b.params, padded, normalize="samples") * 5,
                               ffx.nll(b.problem, b.params, b.batch, normalize="samples") * 3, **SAME_MATH_F64)


def test_nll_backward_trains_the_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    problem = ffx.supervised(model, ffx.Categorical())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=F64), torch.randint(0, 2, (6,), generator=g)
    ffx.nll(problem, {}, (x, y)).backward()  # {}: the module's own parameters, which autograd reaches
    want = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for (name, p), w in zip(model.named_parameters(), want):
        torch.testing.assert_close(p.grad, w, **SAME_MATH_F64, msg=name)


def test_nll_at_other_params_than_the_modules():
    b = cases.build(cases.BY_NAME["mlp-categorical"])
    moved = {k: v + 0.5 for k, v in b.params.items()}
    part = {"0.weight": moved["0.weight"]}  # a subset: the others are the module's own
    got = ffx.nll(b.problem, part, b.batch)
    torch.testing.assert_close(got, hand_supervised_loss(b.model, b.problem.likelihood, part, b.batch, "samples"))
    assert not torch.equal(got, ffx.nll(b.problem, {}, b.batch))


def test_nll_in_train_mode_draws_dropout():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    problem = ffx.supervised(model, ffx.Categorical())
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    torch.manual_seed(0)
    first = ffx.nll(problem, {}, (x, y))
    torch.manual_seed(0)
    assert torch.equal(first, ffx.nll(problem, {}, (x, y)))  # the global RNG drives dropout, as in training
    assert not torch.equal(first, ffx.nll(problem, {}, (x, y)))


def test_nll_ignores_anything_at_masked_positions():
    b = cases.build(cases.BY_NAME["mlp-categorical"])
    x, y = b.batch
    y = y.clone()
    y[0] = -1  # not a class, but masked out
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[0] = False
    got = ffx.nll(b.problem, b.params, (x, y, mask), normalize="none")
    want = F.cross_entropy(b.model(x[1:]), y[1:], reduction="sum")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, params, batch: ffx.nll(p, params, batch, normalize="mean"),
         r"nll: normalize must be one of \['samples', 'tokens', 'none'\], got 'mean'"),
        (lambda p, params, batch: ffx.nll(p, {"nope": torch.zeros(2)}, batch),
         r"nll: unknown parameter 'nope'; the model's parameters are '0.weight', '0.bias'"),
        (lambda p, params, batch: ffx.nll(p, {"0.weight": params["0.weight"].T}, batch),
         r"nll: parameter '0.weight' has shape \(4, 6\), the model expects \(6, 4\)"),
        (lambda p, params, batch: ffx.nll(p, [params["0.weight"]], batch),
         r"nll: params must be a \{name: tensor\} dict, got list"),
        (lambda p, params, batch: ffx.nll(p, params, (batch[0], torch.full_like(batch[1], IGNORE))),
         r"nll: the batch has no active position"),
        (lambda p, params, batch: ffx.nll(p, params, (batch[0], batch[1] + 10)),
         r"nll: class targets must lie in \[0, 3\)"),
        (lambda p, params, batch: ffx.nll(p, params, (batch[0][:, :3], batch[1])),
         r"nll: the model's forward failed in module '0' \(Linear\(in_features=4, out_features=6, bias=True\)\), "
         r"which got an input of shape \(5, 3\) float64"),
    ],
    ids=["normalize", "unknown-name", "shape", "not-a-dict", "no-active", "class-range", "forward"],
)
def test_nll_errors(call, message):
    b = cases.build(cases.BY_NAME["mlp-categorical"])
    with pytest.raises(ffx.FisherError, match=message):
        call(b.problem, b.params, b.batch)


# --- causal_lm: position_ids, token_type_ids and other forward keys ----------------------------

def hf_position_ids(mask: Tensor) -> Tensor:
    """As HF's generate builds them for a left-padded batch: running count of real tokens, pads 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("case", LM_CASES, ids=case_id)
def test_position_ids_of_hf_padding_change_nothing(case):
    b = cases.build(case)
    with_positions = {**b.batch, "position_ids": hf_position_ids(b.batch["attention_mask"])}
    plain = ffx.diag_fisher(b.problem, b.params, b.batch, dtype=F64)
    given = ffx.diag_fisher(b.problem, b.params, with_positions, dtype=F64)
    assert_values_close(given.value, plain.value, **case.tol)
    torch.testing.assert_close(ffx.nll(b.problem, b.params, with_positions), ffx.nll(b.problem, b.params, b.batch),
                               **case.tol)
    flipped = {**with_positions, "position_ids": with_positions["position_ids"].flip(-1)}  # the model reads them
    assert not torch.allclose(ffx.nll(b.problem, b.params, flipped), ffx.nll(b.problem, b.params, b.batch))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_token_type_ids_move_with_the_tokens(padding):
    b = cases.build(cases.BY_NAME[f"gpt2-{padding}-pad"])
    mask = b.batch["attention_mask"]
    types = (torch.arange(mask.shape[1]).expand_as(mask) + torch.arange(mask.shape[0])[:, None]) % 3
    batch = {**b.batch, "token_type_ids": types}
    for normalize in NORMALIZES:
        torch.testing.assert_close(ffx.nll(b.problem, b.params, batch, normalize=normalize),
                                   hand_lm_loss(b.model, b.params, b.batch, normalize, token_type_ids=types),
                                   **cases.FLOAT64_TOL)
    assert not torch.allclose(ffx.nll(b.problem, b.params, batch), ffx.nll(b.problem, b.params, b.batch))
    prepared = b.problem.prepare(batch)
    assert isinstance(prepared.inputs, dict) and set(prepared.inputs) == {"input_ids", "token_type_ids"}
    assert all(v.shape == prepared.inputs["input_ids"].shape for v in prepared.inputs.values())


def test_causal_lm_without_extra_keys_keeps_tensor_inputs():
    b = cases.build(cases.BY_NAME["gpt2-left-pad"])
    assert isinstance(b.problem.prepare(b.batch).inputs, Tensor)


@pytest.mark.parametrize("factory", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_causal_lm_names_the_keys_the_model_takes(factory):
    model = build(factory, 0)
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ffx.FisherError, match=r"causal_lm: unexpected batch keys \['pixel_values'\]; expected some "
                                              r"of \['attention_mask', .*'position_ids'.*\] \(the keys "
                                              r"(GPT2LMHeadModel|LlamaForCausalLM).forward takes\)"):
        ffx.causal_lm(model).prepare({"input_ids": ids, "pixel_values": torch.zeros(2, 3)})
    with pytest.raises(ffx.FisherError, match=r"causal_lm: batch key 'inputs_embeds' is not supported: causal_lm "
                                              r"feeds input_ids"):
        ffx.causal_lm(model).prepare({"input_ids": ids, "inputs_embeds": torch.zeros(2, 4, 8)})


def test_causal_lm_extra_key_of_another_shape():
    model = build(tiny_gpt2, 0)
    ids = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ffx.FisherError, match=r"causal_lm: position_ids of shape \(3, 4\) has neither the \[N, T\] = "
                                              r"\(2, 4\) of input_ids nor its 2 samples first"):
        ffx.causal_lm(model).prepare({"input_ids": ids, "position_ids": torch.zeros(3, 4, dtype=torch.long)})


def test_left_align_moves_per_token_features_too():
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    ids = torch.tensor([[9, 1, 2], [3, 4, 9]])
    features = torch.arange(12.0).reshape(2, 3, 2)
    moved_mask, moved_ids, moved_features = ffx.left_align(mask, ids, features)
    assert torch.equal(moved_mask, torch.tensor([[True, True], [True, True]]))
    assert torch.equal(moved_ids, torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(moved_features, torch.tensor([[[2.0, 3.0], [4.0, 5.0]], [[6.0, 7.0], [8.0, 9.0]]]))


# --- forward_failure ------------------------------------------------------------------------------

def vmapped_error(problem: ffx.Problem, params: dict[str, Tensor], inputs: Tensor) -> RuntimeError:
    """What the generic engine's call raises: vmap over samples of the vjp of one sample's forward."""
    def one(x):
        return vjp(lambda p: problem.forward(problem.model, p, x[None]), params)[0]

    try:
        vmap(one)(inputs)
    except RuntimeError as err:
        return err
    pytest.fail("the vmapped forward did not raise")


def raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except Exception as err:  # the raw error forward_failure explains
        return err
    pytest.fail("the call did not raise")


def test_forward_failure_names_the_module_and_the_batch_shapes():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    problem, x = ffx.supervised(model, ffx.Categorical()), torch.randn(12, 5)
    err = raised(model, x[:1])  # the one-sample shape that torch reports
    got = forward_failure("diag_fisher", problem, ffx.params_of(model), x, err)
    assert isinstance(got, ffx.FisherError)
    message = str(got)
    assert message.startswith("diag_fisher: the model's forward failed in module '0' (Linear(in_features=8, "
                              "out_features=16, bias=True)), which got an input of shape (12, 5) float32; ")
    assert "mat1 and mat2 shapes cannot be multiplied (12x5 and 8x16)" in message
    assert message.endswith("The batch's inputs: (12, 5) float32")


def test_forward_failure_for_dict_inputs_names_the_nested_module():
    model = build(lambda: cases.TwoInputs(), 0)
    problem = ffx.supervised(model, ffx.Categorical())
    inputs = {"x": torch.randn(4, 3, dtype=F64), "z": torch.randn(4, 5, dtype=F64)}
    got = forward_failure("group_fisher", problem, {}, inputs, raised(model, inputs["x"], inputs["z"]))
    assert str(got).startswith("group_fisher: the model's forward failed in module 'b' (Linear(in_features=2, "
                               "out_features=4, bias=True)), which got an input of shape (4, 5) float64")
    assert str(got).endswith("The batch's inputs: {'x': (4, 3) float64, 'z': (4, 5) float64}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64], ids=["bf16", "f64"])
def test_forward_failure_says_which_dtype_to_cast_to(dtype):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    problem, x = ffx.supervised(model, ffx.Categorical()), torch.randn(12, 5)
    got = str(forward_failure("diag_fisher", problem, ffx.params_of(model), x, raised(model, x)))
    assert f"module '0' (Linear(in_features=5, out_features=4, bias=True)), which got an input of shape (12, 5) " \
           f"float32; its parameters are {dtype} but it got torch.float32 inputs: cast the batch's floating-point " \
           f"inputs with .to({dtype})" in got


def test_forward_failure_of_an_embedding_shows_the_ids():
    model = build(lambda: cases.Tagger(vocab=11), 0)
    problem = ffx.supervised(model, ffx.Categorical())
    ids = torch.tensor([[1, 2, 15], [0, 3, 4]])
    got = str(forward_failure("diag_fisher", problem, {}, ids, raised(model, ids)))
    assert "module 'embed' (Embedding(11, 6)), which got an input of shape (2, 3) int64 in [0, 15]; IndexError" in got


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_forward_failure_explains_the_default_initial_state_of_recurrent_layers(cls):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(cls(4, 3, num_layers=2, batch_first=True))
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.encoder(x)[0][:, -1])

    model = build(Recurrent, 0)
    problem, x = ffx.supervised(model, ffx.Categorical()), torch.randn(8, 5, 4, dtype=F64)
    params = ffx.params_of(model)
    err = vmapped_error(problem, params, x)
    assert "match the broadcast shape" in str(err)
    got = str(forward_failure("diag_fisher", problem, params, x, err))
    assert got.startswith(f"diag_fisher: {cls.__name__} module 'encoder.0' creates its default initial state h0 "
                          "inside its forward")
    assert re.search(r"which vmap, used for per-sample gradients by the generic engine, cannot batch \(RuntimeError: "
                     r"output with shape \[1, \d+\] doesn't match the broadcast shape \[8, 1, \d+\]\)", got)
    assert "h0 = x.new_zeros(2, N, 3)" in got and "[N, 2, 3]" in got


def test_the_fix_for_recurrent_layers_works():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x, h0=None):
            out, _ = self.rnn(x, x.new_zeros(1, x.shape[0], 3) if h0 is None else h0.transpose(0, 1))
            return self.head(out[:, -1])

    model = build(Recurrent, 0)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    x, y = torch.randn(6, 5, 4, dtype=F64), torch.randint(0, 2, (6,))
    built_inside = ffx.diag_fisher(problem, params, (x, y), engine="generic", dtype=F64)
    given = ffx.diag_fisher(problem, params, ((x, torch.zeros(6, 1, 3, dtype=F64)), y), engine="generic", dtype=F64)
    assert_values_close(given.value, built_inside.value, **SAME_MATH_F64)


def test_forward_failure_leaves_no_hook_rng_draw_or_buffer_update():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    problem, x = ffx.supervised(model, ffx.Categorical()), torch.randn(6, 5)
    err = raised(model, x)
    running, rng = model[1].running_mean.clone(), torch.get_rng_state()
    got = forward_failure("nll", problem, {}, x, err)
    assert "module '3' (Linear(in_features=3, out_features=2, bias=True))" in str(got)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[1].running_mean, running)
    pickle.dumps(model)  # a hook (a local function) left on a module would make this fail


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize(
    "err",
    [ffx.FisherError("diag_fisher: already explained"), RuntimeError("only under vmap"), KeyboardInterrupt(),
     torch.cuda.OutOfMemoryError("out of memory")],
    ids=["fisher-error", "not-reproduced", "keyboard-interrupt", "out-of-memory"],
)
def test_forward_failure_returns_what_it_cannot_explain_unchanged(err):
    model = Boom()
    problem = ffx.supervised(model, ffx.Categorical())
    assert forward_failure("diag_fisher", problem, {}, torch.randn(4, 3), err) is err


def test_forward_failure_in_the_models_own_forward():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError(f"Picky wants 3 features, got {x.shape[1]}")
            return self.lin(x)

    model = Picky()
    problem, x = ffx.supervised(model, ffx.Categorical()), torch.randn(4, 2)
    got = str(forward_failure("diag_fisher", problem, {}, x, raised(model, x)))
    assert got.startswith("diag_fisher: the model's forward failed in the model (Picky), which got an input of shape "
                          "(4, 2) float32; ValueError: Picky wants 3 features, got 2")


# --- torch.compile ------------------------------------------------------------------------------

def test_compiled_supervised_model_uses_the_original_module_and_names():
    model = build(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), 0)
    compiled = torch.compile(model)  # constructing the wrapper compiles nothing
    assert set(dict(compiled.named_parameters())) == {"_orig_mod." + k for k in ffx.params_of(model)}
    assert list(ffx.params_of(compiled)) == list(ffx.params_of(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    problem = ffx.supervised(compiled, ffx.Categorical())
    assert problem.model is model
    batch = (torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 1, 0, 1]))
    got = ffx.diag_fisher(problem, ffx.params_of(compiled), batch, dtype=F64)
    want = ffx.diag_fisher(ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), batch, dtype=F64)
    assert_values_close(got.value, want.value, **SAME_MATH_F64)


def test_compiled_causal_lm_uses_the_original_module():
    b = cases.build(cases.BY_NAME["gpt2-left-pad"])
    problem = ffx.causal_lm(torch.compile(b.model))
    assert problem.model is b.model
    torch.testing.assert_close(ffx.nll(problem, b.params, b.batch), ffx.nll(b.problem, b.params, b.batch), rtol=0,
                               atol=0)


# --- batch validation -------------------------------------------------------------------------------

def test_supervised_inputs_with_another_sample_count():
    problem = ffx.supervised(cases.TwoInputs(), ffx.Categorical())
    inputs = {"x": torch.randn(4, 3), "z": torch.randn(3, 2)}
    with pytest.raises(ffx.FisherError, match=r"supervised: inputs\['z'\] has 3 samples on its first axis but "
                                              r"inputs\['x'\] has 4.*the batch's inputs: \{'x': \(4, 3\) float32, "
                                              r"'z': \(3, 2\) float32\}"):
        problem.prepare((inputs, torch.zeros(4, dtype=torch.long)))


def test_supervised_inputs_with_a_non_tensor_leaf():
    problem = ffx.supervised(cases.TwoInputs(), ffx.Categorical())
    with pytest.raises(ffx.FisherError, match=r"supervised: inputs\['z'\] must be a tensor with the samples first, "
                                              r"got NoneType"):
        problem.prepare(({"x": torch.randn(4, 3), "z": None}, torch.zeros(4, dtype=torch.long)))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_forward_failure_explains_the_onednn_lstm_backward_under_vmap():
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(4, 3, batch_first=True), nn.Linear(3, 2)

        def forward(self, x):
            h0 = x.new_zeros(1, x.shape[0], 3)
            return self.head(self.lstm(x, (h0, h0))[0][:, -1])

    model = build(Recurrent, 0, torch.float32)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    x, y = torch.randn(6, 5, 4), torch.randint(0, 2, (6,))

    def one(sample):
        out, pull = vjp(lambda p: problem.forward(model, p, sample[None]), params)
        return pull(torch.ones_like(out))

    with torch.no_grad():  # as the generic engine runs it
        err = raised(vmap(one), x)
    if "'workspace'" not in str(err):
        pytest.skip(f"this torch build fails otherwise or not at all: {err}")
    got = str(forward_failure("diag_fisher", problem, params, x, err))
    assert got.startswith("diag_fisher: LSTM module 'lstm' runs torch's oneDNN (mkldnn) recurrent kernel on CPU")
    assert got.endswith("compute the Fisher inside `with torch.backends.mkldnn.flags(enabled=False):`")
    with torch.backends.mkldnn.flags(enabled=False):  # the fix the message gives
        est = ffx.diag_fisher(problem, params, (x, y), engine="generic")
    assert all(bool(torch.isfinite(v).all()) for v in est.value.values())
