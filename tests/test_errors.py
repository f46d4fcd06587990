"""Bad input raises ``ffx.FisherError`` whose message names the option or parameter and what was expected."""

import re

import pytest
import torch
from torch import nn

import fisherfx as ffx
from tests.strategies import SeqModel, build, randint, randn, tiny_gpt2

N, D, C = 4, 3, 5


def mlp() -> nn.Module:
    return build(lambda: nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, C)), 0, torch.float32)


@pytest.fixture
def setup():
    model = mlp()
    x, y = randn(0, N, D, dtype=torch.float32), randint(1, C, N)
    return ffx.supervised(model, ffx.Categorical()), ffx.params_of(model), (x, y)


def test_fisher_error_is_a_value_error():
    assert issubclass(ffx.FisherError, ValueError)
    assert ffx.FisherfxError is ffx.FisherError


# --- batches ----------------------------------------------------------------------------------------

def test_batch_without_active_position(setup):
    problem, params, (x, y) = setup
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: the batch has no active position"):
        ffx.diag_fisher(problem, params, (x, torch.full_like(y, -100)))


def test_batch_without_active_position_by_mask(setup):
    problem, params, (x, y) = setup
    with pytest.raises(ffx.FisherError, match=r"(group|diag)_fisher: the batch has no active position"):
        ffx.group_fisher(problem, params, (x, y, torch.zeros(N, dtype=torch.bool)), ffx.channels(params))


class InfiniteOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)

    def forward(self, x):
        return self.lin(x) / (x[:, :1] > 0).to(x.dtype)  # inf (or nan) where the first feature is ≤ 0


def test_non_finite_outputs():
    model = InfiniteOutputs()
    x = torch.ones(N, D)
    x[2, 0] = -1.0  # sample 2 divides by zero
    problem = ffx.supervised(model, ffx.Categorical())
    with pytest.raises(ffx.FisherError, match=r"outputs for sample 2 are not finite"):
        ffx.diag_fisher(problem, ffx.params_of(model), (x, randint(0, C, N)))


class SqrtAtZero(nn.Module):
    """Finite outputs, infinite gradient: d/dw sqrt(w) at w = 0."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, C)
        self.w = nn.Parameter(torch.zeros(C))

    def forward(self, x):
        return self.lin(x) + torch.sqrt(self.w)


def test_non_finite_gradients():
    model = SqrtAtZero()
    problem = ffx.supervised(model, ffx.Categorical())
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: non-finite gradients for parameter 'w'"):
        ffx.diag_fisher(problem, ffx.params_of(model), (randn(0, N, D, dtype=torch.float32), randint(0, C, N)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_non_finite_names_the_first_bad_tensor_and_only_a_bad_one(dtype):
    from fisherfx.vectors import non_finite

    big = torch.finfo(dtype).max
    finite = {"a": torch.ones(3, dtype=dtype), "b": torch.full((4, 2), big, dtype=dtype)}  # b's sum overflows
    assert non_finite(finite) is None
    assert non_finite({}) is None
    for bad in (float("inf"), float("-inf"), float("nan")):
        c = torch.zeros(5, dtype=dtype)
        c[3] = bad
        assert non_finite({**finite, "c": c, "d": c.clone()}) == "c"


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_targets_of_the_wrong_shape(setup, engine):
    problem, params, (x, _) = setup
    with pytest.raises(ffx.FisherError, match=rf"targets of shape \({N}, 2\) do not fit model outputs of shape "
                                               rf"\({N}, 1, 5\).*expected targets \({N}, 1\)"):
        ffx.diag_fisher(problem, params, (x, randint(0, C, N, 2)), engine=engine)


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_gaussian_targets_with_the_wrong_number_of_outputs(setup, engine):
    model = mlp()
    problem = ffx.supervised(model, ffx.Gaussian())
    with pytest.raises(ffx.FisherError, match=rf"targets of shape \({N}, 1, 3\) do not fit model outputs of shape "
                                               rf"\({N}, 1, 5\)"):
        ffx.diag_fisher(problem, ffx.params_of(model), (randn(0, N, D, dtype=torch.float32), torch.zeros(N, 3)),
                        engine=engine)


def test_class_targets_outside_the_outputs(setup):
    problem, params, (x, y) = setup
    y = y.clone()
    y[1] = C  # one past the last class
    with pytest.raises(ffx.FisherError, match=r"class targets must lie in \[0, 5\).*got targets from \d+ to 5"):
        ffx.diag_fisher(problem, params, (x, y))


def test_negative_class_targets_other_than_ignore_index(setup):
    problem, params, (x, y) = setup
    y = y.clone()
    y[0] = -1
    with pytest.raises(ffx.FisherError, match=r"class targets must lie in \[0, 5\).*ignore_index=-100.*from -1"):
        ffx.diag_fisher(problem, params, (x, y))


def test_out_of_range_targets_at_masked_positions_are_fine(setup):
    problem, params, (x, y) = setup
    y = y.clone()
    y[0] = -1
    mask = torch.ones(N, dtype=torch.bool)
    mask[0] = False
    est = ffx.diag_fisher(problem, params, (x, y, mask), normalize="tokens")
    assert int(est.count) == N - 1


def test_inputs_and_targets_with_different_sample_counts(setup):
    problem, params, (x, y) = setup
    with pytest.raises(ffx.FisherError, match=r"supervised: inputs have 4 samples but targets have 3"):
        ffx.diag_fisher(problem, params, (x, y[:3]))


def test_mask_that_does_not_fit_the_targets(setup):
    problem, params, (x, y) = setup
    with pytest.raises(ffx.FisherError, match=r"supervised: mask of shape \(3,\) does not fit targets; "
                                               r"expected \(4, 1\) or \[4\]"):
        ffx.diag_fisher(problem, params, (x, y, torch.ones(3, dtype=torch.bool)))


# --- causal_lm batches ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm():
    model = build(tiny_gpt2, 0, torch.float32)
    return ffx.causal_lm(model), ffx.params_of(model)


def test_causal_lm_with_a_non_contiguous_attention_mask(lm):
    problem, params = lm
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1]])
    with pytest.raises(ffx.FisherError, match=r"causal_lm: attention_mask row 1 is not one contiguous span"):
        ffx.diag_fisher(problem, params, {"input_ids": randint(0, 11, 2, 4), "attention_mask": mask})


def test_causal_lm_with_unexpected_keys(lm):
    problem, params = lm
    ids = randint(0, 11, 2, 4)
    # keys GPT2LMHeadModel.forward takes (token_type_ids, position_ids, ...) are accepted; others are named
    expected = (re.escape("causal_lm: unexpected batch keys ['pixel_values']; expected some of ['attention_mask', ")
                + r".*'input_ids', 'labels', 'position_ids', 'token_type_ids'\] \(the keys GPT2LMHeadModel.forward "
                  r"takes\)")
    with pytest.raises(ffx.FisherError, match=expected):
        ffx.diag_fisher(problem, params, {"input_ids": ids, "pixel_values": torch.zeros(2, 3)})


def test_causal_lm_with_a_key_that_is_not_batch_data(lm):
    problem, params = lm
    ids = randint(0, 11, 2, 4)
    with pytest.raises(ffx.FisherError, match=r"causal_lm: batch key 'past_key_values' is not supported: causal_lm "
                                              r"runs every sequence from its start, without a cache"):
        ffx.diag_fisher(problem, params, {"input_ids": ids, "past_key_values": torch.zeros(2, 1)})


def test_causal_lm_without_input_ids(lm):
    problem, params = lm
    with pytest.raises(ffx.FisherError, match=r"causal_lm: expected a dict batch with 'input_ids'"):
        ffx.diag_fisher(problem, params, (randint(0, 11, 2, 4),))


def test_causal_lm_labels_of_another_shape(lm):
    problem, params = lm
    ids = randint(0, 11, 2, 4)
    with pytest.raises(ffx.FisherError, match=r"causal_lm: labels of shape \(2, 3\) does not match input_ids \(2, 4\)"):
        ffx.diag_fisher(problem, params, {"input_ids": ids, "labels": ids[:, :3]})


# --- batches the model cannot take: lists, token ids, dtypes, shapes, recurrent layers ------------

@pytest.mark.parametrize(
    ("part", "message"),
    [
        (0, r"supervised: inputs must be a tensor with the samples first, got a Python list of length 4; convert it "
            r"with torch.tensor\(\.\.\.\)"),
        (1, r"supervised: targets must be a tensor \[N, \.\.\.\], got a Python list of length 4; convert it"),
        (2, r"supervised: mask must be a tensor \[N\] or \[N, T\], got a Python list of length 4; convert it"),
    ],
    ids=["inputs", "targets", "mask"],
)
def test_python_lists_in_a_supervised_batch(setup, part, message):
    problem, params, (x, y) = setup
    batch = [x, y, torch.ones(N, dtype=torch.bool)]
    batch[part] = batch[part].tolist()
    with pytest.raises(ffx.FisherError, match=message):
        ffx.diag_fisher(problem, params, tuple(batch))


def test_python_lists_in_positional_inputs(setup):
    problem, params, (x, y) = setup
    with pytest.raises(ffx.FisherError, match=re.escape("supervised: inputs[1] must be a tensor with the samples "
                                                        "first, got a Python list of length 4; convert it with "
                                                        "torch.tensor(...); the batch's inputs: ((4, 3) float32, a "
                                                        "Python list of length 4)")):
        ffx.diag_fisher(problem, params, ((x, y.tolist()), y))


@pytest.mark.parametrize("key", ["input_ids", "attention_mask", "labels"])
def test_python_lists_in_a_causal_lm_batch(lm, key):
    problem, params = lm
    batch = {"input_ids": randint(0, 11, 2, 4), "attention_mask": torch.ones(2, 4, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    batch[key] = batch[key].tolist()
    with pytest.raises(ffx.FisherError, match=re.escape(f"causal_lm: {key} must be a tensor [N, T], got a Python list "
                                                        "of length 2; convert it with torch.tensor(...)")):
        ffx.diag_fisher(problem, params, batch)


@pytest.mark.parametrize("bad", [11, -1], ids=["vocabulary", "negative"])
def test_token_ids_outside_the_vocabulary(lm, bad):
    problem, params = lm
    ids = randint(0, 11, 2, 4)
    ids[1, 2] = bad
    low, high = min(int(ids.min()), bad), max(int(ids.max()), bad)
    expected = (f"causal_lm: input_ids must lie in [0, 11) for the model's input embedding 'transformer.wte' "
                f"(Embedding(11, 8)), padded positions included; row 1 holds {bad} (input_ids of shape (2, 4), ids "
                f"from {low} to {high})")
    with pytest.raises(ffx.FisherError, match=re.escape(expected)):
        ffx.diag_fisher(problem, params, {"input_ids": ids})
    with pytest.raises(ffx.FisherError, match=re.escape(expected)):
        ffx.nll(problem, params, {"input_ids": ids})




@pytest.mark.parametrize("engine", ["auto", "generic", "taps"])
def test_wrong_input_feature_size_names_the_module(engine):
    model = mlp()
    problem = ffx.supervised(model, ffx.Categorical())
    x, y = randn(0, 12, 5, dtype=torch.float32), randint(1, C, 12)  # the model takes D = 3 features
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: the model's forward failed in module '0' "
                                              r"\(Linear\(in_features=3, out_features=4, bias=True\)\), which got an "
                                              r"input of shape \(12, 5\) float32; RuntimeError: mat1 and mat2 shapes "
                                              r"cannot be multiplied \(12x5 and 3x4\)\. The batch's inputs: \(12, 5\) "
                                              r"float32$"):
        ffx.diag_fisher(problem, ffx.params_of(model), (x, y), engine=engine)


@pytest.mark.parametrize("engine", ["auto", "generic", "taps"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
def test_inputs_of_another_dtype_than_the_model(engine, dtype):
    model = mlp().to(dtype)
    problem = ffx.supervised(model, ffx.Categorical())
    x, y = randn(0, N, D, dtype=torch.float32), randint(1, C, N)
    with pytest.raises(ffx.FisherError, match=re.escape(
            f"diag_fisher: the model's forward failed in module '0' (Linear(in_features=3, out_features=4, "
            f"bias=True)), which got an input of shape (4, 3) float32; its parameters are {dtype} but it got "
            f"torch.float32 inputs: cast the batch's floating-point inputs with .to({dtype})")):
        ffx.diag_fisher(problem, ffx.params_of(model), (x, y), engine=engine)


class Recurrent(nn.Module):
    """A recurrent layer called with its default initial state, then a linear head."""

    def __init__(self, cls: type):
        super().__init__()
        self.rnn, self.head = cls(D, 3, batch_first=True), nn.Linear(3, C)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("engine", ["auto", "generic"])
@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_recurrent_layer_with_the_default_initial_state(cls, engine):
    model = build(lambda: Recurrent(cls), 0)  # float64: the oneDNN kernel (float32 on CPU) fails otherwise
    problem = ffx.supervised(model, ffx.Categorical())
    x, y = randn(0, 8, 5, D), randint(1, C, 8)
    with pytest.raises(ffx.FisherError, match=rf"diag_fisher: {cls.__name__} module 'rnn' creates its default "
                                              r"initial state h0 inside its forward .* which vmap, used for per-sample "
                                              r"gradients by the generic engine, cannot batch .* Pass an explicit zero "
                                              r"h0 instead"):
        ffx.diag_fisher(problem, ffx.params_of(model), (x, y), engine=engine)


# --- parameters -------------------------------------------------------------------------------------

def test_unknown_parameter_name(setup):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: unknown parameter 'nope'; the model's parameters are "
                                               r"'0.weight', '0.bias'"):
        ffx.diag_fisher(problem, {**params, "nope": torch.zeros(2)}, batch)


def test_unknown_parameter_name_in_groups(setup):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=r"group_fisher: unknown parameter 'nope'; known parameters: '0.weight'"):
        ffx.group_fisher(problem, params, batch, {"nope": "o i -> o"})


def test_parameter_with_the_wrong_shape(setup):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=r"parameter '0.weight' has shape \(3, 4\), the model expects \(4, 3\)"):
        ffx.diag_fisher(problem, {**params, "0.weight": params["0.weight"].T}, batch)


def test_empty_params(setup):
    problem, _, batch = setup
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: params must be a non-empty \{name: tensor\} dict"):
        ffx.diag_fisher(problem, {}, batch)


# --- groups -----------------------------------------------------------------------------------------

def test_group_pattern_that_does_not_fit(setup):
    problem, params, batch = setup
    groups = {"0.weight": ffx.Group("(h d) i -> h", {"h": 3})}
    expected = re.escape("group pattern '(h d) i -> h' with {'h': 3} does not fit parameter '0.weight' of shape (4, 3)")
    with pytest.raises(ffx.FisherError, match=r"group_fisher: " + expected):
        ffx.group_fisher(problem, params, batch, groups)
    with pytest.raises(ffx.FisherError, match=r"groups: " + expected):
        ffx.check_groups(groups, params)


def test_group_pattern_with_the_wrong_number_of_axes(setup):
    _, params, _ = setup
    with pytest.raises(ffx.FisherError, match=re.escape("group pattern 'o i -> o' with {} does not fit parameter "
                                                        "'0.bias' of shape (4,)")):
        ffx.check_groups({"0.bias": "o i -> o"}, params)


def test_heads_that_do_not_divide_the_projection():
    params = {"attn.q_proj.weight": torch.zeros(6, 4)}
    with pytest.raises(ffx.FisherError, match=re.escape("heads: group pattern '(h d) i -> h' with {'h': 4} does not "
                                                        "fit parameter 'attn.q_proj.weight' of shape (6, 4)")):
        ffx.heads(params, num_heads=4)


def test_heads_without_attention_parameters(setup):
    _, params, _ = setup
    with pytest.raises(ffx.FisherError, match=r"heads: found no attention projection among the parameters; pass "
                                               r"names="):
        ffx.heads(params, num_heads=2)


def test_heads_with_an_unknown_role(setup):
    _, params, _ = setup
    with pytest.raises(ffx.FisherError, match=r"heads: role 'x' of '0.weight' is not one of 'q', 'k', 'v', 'o', 'qkv'"):
        ffx.heads(params, num_heads=2, names={"0.weight": "x"})


def test_expand_groups_with_values_of_the_wrong_shape(setup):
    _, params, _ = setup
    with pytest.raises(ffx.FisherError, match=r"expand_groups: value for '0.weight' has shape \(3,\), expected \(4,\) "
                                               r"from pattern 'o \.\.\. -> o'"):
        ffx.expand_groups({"0.weight": torch.zeros(3)}, ffx.channels(params), params)


def test_expand_groups_with_values_without_a_group(setup):
    _, params, _ = setup
    with pytest.raises(ffx.FisherError, match=r"expand_groups: no group spec for \['nope'\]"):
        ffx.expand_groups({"nope": torch.zeros(3)}, ffx.channels(params), params)


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"w0": torch.tensor(1.0)}, r"key 'w0' has no separator '\|' \(expected '<param>\|<group>'\)"),
        ({"w|a": torch.tensor(1.0)}, r"group index 'a' of key 'w\|a' is not integers"),
        ({"w|0": torch.tensor(1.0), "w|2": torch.tensor(1.0)},
         r"parameter 'w' has 2 group entries, which do not fill a grid of shape \(3,\)"),
        ({"w|-1": torch.tensor(1.0), "w|1": torch.tensor(1.0)},
         r"parameter 'w' has 2 group entries, which do not fill a grid of shape \(2,\)"),
        ({"w|0": torch.tensor(1.0), "w|0,1": torch.tensor(1.0)},
         r"parameter 'w' mixes group indices with \[1, 2\] axes"),
        ({"w|1": torch.tensor(1.0), "w|01": torch.tensor(1.0)}, r"key 'w\|01' repeats group \(1,\) of parameter 'w'"),
    ],
    ids=["no-separator", "not-integer", "gap", "negative", "mixed-axes", "repeated"],
)
def test_from_flat_with_bad_keys(flat, message):
    with pytest.raises(ffx.FisherError, match=r"from_flat: " + message):
        ffx.from_flat(flat)


def test_to_flat_with_the_separator_in_a_name():
    with pytest.raises(ffx.FisherError, match=r"to_flat: parameter name 'a\|b' contains the separator '\|'"):
        ffx.to_flat({"a|b": torch.zeros(2)})


# --- options ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("kind", "fisher", "['empirical', 'mc', 'exact']"),
        ("per", "batch", "['sample', 'token']"),
        ("normalize", "mean", "['samples', 'tokens', 'none']"),
        ("engine", "fast", "['auto', 'generic', 'taps']"),
        ("dtype", torch.float16, "[torch.float32, torch.float64]"),
        ("dtype", "float64", "[torch.float32, torch.float64]"),
    ],
    ids=lambda v: str(v),
)
def test_unsupported_option(setup, option, value, allowed):
    problem, params, batch = setup
    message = f"diag_fisher: {option} must be one of {allowed}, got {value!r}"
    with pytest.raises(ffx.FisherError, match=re.escape(message)):
        ffx.diag_fisher(problem, params, batch, **{option: value})


def test_unsupported_option_in_mask_importance(setup):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=re.escape("mask_importance: kind must be one of ['empirical', 'mc', "
                                                        "'exact'], got 'fisher'")):
        ffx.mask_importance(problem, params, batch, ffx.channels(params), kind="fisher")


@pytest.mark.parametrize("n_samples", [0, -1, 1.5, True])
def test_n_samples_below_one_or_not_an_integer(setup, n_samples):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=re.escape(f"n_samples must be a positive integer, got {n_samples!r}")):
        ffx.diag_fisher(problem, params, batch, kind="mc", n_samples=n_samples)


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5])
def test_chunk_size_below_one_or_not_an_integer(setup, chunk_size):
    problem, params, batch = setup
    with pytest.raises(ffx.FisherError, match=re.escape(f"diag_fisher: chunk_size must be a positive integer or "
                                                        f"None, got {chunk_size!r}")):
        ffx.diag_fisher(problem, params, batch, chunk_size=chunk_size)


def test_dropout_in_train_mode_under_the_generic_engine():
    model = nn.Sequential(nn.Linear(D, 4), nn.Dropout(0.5), nn.Linear(4, C)).train()
    problem = ffx.supervised(model, ffx.Categorical())
    # caught by the one-sample check forward, before either engine runs, with the API's name
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: the model draws random numbers \(dropout in train "
                                               r"mode\?\); call model.eval\(\)"):
        ffx.diag_fisher(problem, ffx.params_of(model), (randn(0, N, D, dtype=torch.float32), randint(0, C, N)),
                        engine="generic")


@pytest.mark.parametrize("conv", [False, True], ids=["batchnorm1d", "batchnorm2d"])
def test_batchnorm_in_train_mode(conv):
    if conv:
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, C))
        x = randn(0, N, 2, 2, 2, dtype=torch.float32)
    else:
        model = nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4), nn.Linear(4, C))
        x = randn(0, N, D, dtype=torch.float32)
    model.train()
    running = model[1].running_mean.clone()
    problem = ffx.supervised(model, ffx.Categorical())
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: BatchNorm module '1' is in train mode.*"
                                               r"call model.eval\(\)"):
        ffx.diag_fisher(problem, ffx.params_of(model), (x, randint(0, C, N)), engine="generic")
    assert torch.equal(model[1].running_mean, running), "the estimator updated the model's running statistics"


# --- state ------------------------------------------------------------------------------------------

def estimate(**shapes) -> ffx.Estimate:
    return ffx.Estimate({k: torch.ones(s) for k, s in shapes.items()}, torch.tensor(2))


def test_ema_update_with_other_names():
    state = ffx.ema_init(estimate(w=(3, 2), b=(2,)), 0.9)
    with pytest.raises(ffx.FisherError, match=re.escape("ema_update: state and estimate have different parameters: "
                                                        "missing from the estimate ['b'], not in the state ['c']")):
        ffx.ema_update(state, estimate(w=(3, 2), c=(2,)))


def test_ema_update_with_other_shapes():
    state = ffx.ema_init(estimate(w=(3, 2)), 0.9)
    with pytest.raises(ffx.FisherError, match=re.escape("ema_update: shape mismatch for 'w': state has (3, 2), "
                                                        "estimate has (2, 3)")):
        ffx.ema_update(state, estimate(w=(2, 3)))


@pytest.mark.parametrize("decay", [0, 1, -0.5, 1.5, 0.0, 1.0])
def test_decay_outside_the_open_unit_interval(decay):
    with pytest.raises(ffx.FisherError, match=re.escape(f"ema_init: decay must be in (0, 1), got {decay!r}")):
        ffx.ema_init(estimate(w=(2,)), decay)


def test_ema_value_before_any_update():
    with pytest.raises(ffx.FisherError, match=r"ema_value: the EMA has had no update yet \(step 0\); call ema_update"):
        ffx.ema_value(ffx.ema_init(estimate(w=(2,)), 0.9))


def test_ema_init_from_something_else():
    with pytest.raises(ffx.FisherError, match=r"expected an Estimate or a \{name: tensor\} dict, got list"):
        ffx.ema_init([torch.zeros(2)], 0.9)


def test_combine_of_estimates_with_different_parameters():
    with pytest.raises(ffx.FisherError, match=re.escape("combine: first estimate and estimate have different "
                                                        "parameters: missing from the estimate ['b']")):
        ffx.combine([estimate(w=(2,), b=(3,)), estimate(w=(2,))])


def test_combine_of_estimates_with_different_shapes():
    with pytest.raises(ffx.FisherError, match=re.escape("combine: shape mismatch for 'w'")):
        ffx.combine([estimate(w=(2,)), estimate(w=(3,))])


def test_combine_of_nothing():
    with pytest.raises(ffx.FisherError, match=r"combine: expected at least one estimate, got none"):
        ffx.combine([])


def test_sum_update_with_other_names_or_not_an_estimate():
    state = ffx.sum_init(estimate(w=(2,)))
    with pytest.raises(ffx.FisherError, match=re.escape("sum_update: state and estimate have different parameters")):
        ffx.sum_update(state, estimate(v=(2,)))
    with pytest.raises(ffx.FisherError, match=r"sum_update: expected an Estimate \(value and count\), got dict"):
        ffx.sum_update(state, {"w": torch.ones(2)})


def test_sum_value_before_any_update():
    with pytest.raises(ffx.FisherError, match=r"sum_value: no estimate has been added yet \(count 0\)"):
        ffx.sum_value(ffx.sum_init(estimate(w=(2,))))


def test_float_class_targets():
    model = build(lambda: SeqModel(D, C), 0, torch.float32)
    problem = ffx.supervised(model, ffx.Categorical())
    with pytest.raises(ffx.FisherError, match=r"Categorical: expected integer class targets, got dtype torch.float32"):
        ffx.diag_fisher(problem, ffx.params_of(model), (randn(0, 2, 3, D, dtype=torch.float32), torch.zeros(2, 3)))


# --- likelihood settings, fused GQA heads, chunk_size everywhere, RNG untouched -----------------

@pytest.mark.parametrize("sigma", [0.0, -1.0, float("inf"), float("nan")])
def test_gaussian_sigma_must_be_positive_and_finite(sigma):
    with pytest.raises(ffx.FisherError, match=r"supervised: Gaussian sigma must be a finite number > 0"):
        ffx.supervised(nn.Linear(3, 2), ffx.Gaussian(sigma=sigma))


def test_likelihood_class_instead_of_instance():
    with pytest.raises(ffx.FisherError, match=r"supervised: expected a likelihood instance such as Categorical\(\)"):
        ffx.supervised(nn.Linear(3, 2), ffx.Categorical)


def test_bernoulli_targets_outside_unit_interval():
    model = nn.Linear(3, 2)
    problem = ffx.supervised(model, ffx.Bernoulli())
    batch = (torch.randn(4, 3), torch.full((4, 2), 5.0))
    with pytest.raises(ffx.FisherError, match=r"diag_fisher: Bernoulli targets must lie in \[0, 1\], got .* 5"):
        ffx.diag_fisher(problem, ffx.params_of(model), batch)


def test_fused_qkv_heads_refuse_grouped_query_attention():
    params = {"attn.qkv.weight": torch.zeros(24, 8)}
    with pytest.raises(ffx.FisherError, match=r"heads: fused projection 'attn.qkv.weight' with num_kv_heads=2 != "
                                              r"num_heads=4"):
        ffx.heads(params, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("chunk_size", [0, 1.5, True])
def test_per_sample_grads_validates_chunk_size(chunk_size):
    model = nn.Linear(3, 2)
    problem = ffx.supervised(model, ffx.Categorical())
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ffx.FisherError, match=r"per_sample_grads: chunk_size must be a positive integer or None"):
        ffx.per_sample_grads(problem, ffx.params_of(model), batch, chunk_size=chunk_size)


@pytest.mark.parametrize("engine", ["auto", "generic"])
def test_dropout_error_leaves_the_global_rng_untouched(engine):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    problem = ffx.supervised(model, ffx.Categorical())
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    before = torch.get_rng_state()
    with pytest.raises(ffx.FisherError, match=r"draws random numbers \(dropout in train mode\?\)"):
        ffx.diag_fisher(problem, ffx.params_of(model), batch, engine=engine)
    assert torch.equal(torch.get_rng_state(), before)


def test_group_fisher_names_an_unknown_option():
    model = nn.Linear(3, 2)
    problem, params = ffx.supervised(model, ffx.Categorical()), ffx.params_of(model)
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ffx.FisherError, match=r"group_fisher: unknown options \['normalise'\]; expected some of"):
        ffx.group_fisher(problem, params, batch, ffx.channels(params), normalise="tokens")
