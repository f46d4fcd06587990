"""fisherfx: the Fisher information of PyTorch models, the ``torch.func`` way."""

from ._errors import FisherError, FisherfxError
from .fisher import diag_fisher, group_fisher, mask_importance, per_sample_grads
from .groups import (
                     Group,
                     channels,
                     check_groups,
                     expand_groups,
                     from_flat,
                     head_totals,
                     heads,
                     inputs,
                     reduce_groups,
                     to_flat,
                     whole,
)
from .likelihoods import Bernoulli, Categorical, Gaussian
from .problems import Problem, causal_lm, params_of, supervised
from .state import (
                     EMAState,
                     Estimate,
                     SumState,
                     cast,
                     combine,
                     ema_init,
                     ema_update,
                     ema_value,
                     sum_init,
                     sum_update,
                     sum_value,
)

__version__ = "0.1.0"

__all__ = [
    # problems and likelihoods
    "Bernoulli",
    "Categorical",
    "Gaussian",
    "Problem",
    "causal_lm",
    "params_of",
    "supervised",
    # estimators
    "diag_fisher",
    "group_fisher",
    "mask_importance",
    "per_sample_grads",
    # groups
    "Group",
    "channels",
    "check_groups",
    "expand_groups",
    "from_flat",
    "head_totals",
    "heads",
    "inputs",
    "reduce_groups",
    "to_flat",
    "whole",
    # state
    "EMAState",
    "Estimate",
    "SumState",
    "cast",
    "combine",
    "ema_init",
    "ema_update",
    "ema_value",
    "sum_init",
    "sum_update",
    "sum_value",
    # errors
    "FisherError",
    "FisherfxError",
]
