"""fisherfx: the Fisher information of PyTorch models, the ``torch.func`` way."""

from ._collect import Collected, collect
from ._errors import FisherError, FisherfxError
from ._explain import Explanation, Served, explain
from .distributed import all_reduce
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
from .io import load, save
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from .losses import nll
from .metrics import (
                     Capacity,
                     Damage,
                     Flatness,
                     Overlap,
                     Selection,
                     Sharpness,
                     SweepRecord,
                     WeightedDamage,
                     capacity_report,
                     concentrated_perturbation,
                     ewc_penalty,
                     fisher_merge,
                     fisher_overlap,
                     fisher_weighted_damage,
                     flatness,
                     percolation_sweep,
                     perturbation_damage,
                     risk_correlation,
                     risk_score,
                     sharpness,
                     to_csv,
)
from .operators import empirical_fisher_vp, fisher_vp, ggn_vp, hvp, mc_fisher_vp
from .problems import Prepared, Problem, causal_lm, left_align, model_call, params_of, supervised
from .spectrum import (
                     CGResult,
                     Eigen,
                     SpectralDensity,
                     TraceEstimate,
                     cg_solve,
                     hutchinson_trace,
                     lanczos,
                     linear_operator,
                     power_iteration,
                     slq_trace,
                     spectral_density,
)
from .state import (
                     EMAState,
                     Estimate,
                     Provenance,
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
    "Likelihood",
    "Prepared",
    "Problem",
    "causal_lm",
    "left_align",
    "model_call",
    "params_of",
    "supervised",
    # losses
    "nll",
    # estimators
    "diag_fisher",
    "group_fisher",
    "mask_importance",
    "per_sample_grads",
    # curvature operators
    "empirical_fisher_vp",
    "fisher_vp",
    "ggn_vp",
    "hvp",
    "mc_fisher_vp",
    # solves and spectra
    "CGResult",
    "Eigen",
    "SpectralDensity",
    "TraceEstimate",
    "cg_solve",
    "hutchinson_trace",
    "lanczos",
    "linear_operator",
    "power_iteration",
    "slq_trace",
    "spectral_density",
    # capacity and landscape
    "Capacity",
    "Flatness",
    "Sharpness",
    "capacity_report",
    "flatness",
    "sharpness",
    # percolation: perturbations, their risk and damage
    "Damage",
    "Selection",
    "SweepRecord",
    "concentrated_perturbation",
    "percolation_sweep",
    "perturbation_damage",
    "risk_correlation",
    "risk_score",
    "to_csv",
    # forgetting and merging
    "Overlap",
    "WeightedDamage",
    "ewc_penalty",
    "fisher_merge",
    "fisher_overlap",
    "fisher_weighted_damage",
    # which engine serves what
    "Explanation",
    "Served",
    "explain",
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
    "Provenance",
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
    # collecting, files, many processes
    "Collected",
    "all_reduce",
    "collect",
    "load",
    "save",
    # errors
    "FisherError",
    "FisherfxError",
]
