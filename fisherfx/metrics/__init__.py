"""Metrics built on the estimators and operators: capacity of a spectrum, landscape around ``θ``."""

from .capacity import Capacity, capacity_report
from .damage import Damage, perturbation_damage, position_kl
from .forgetting import Overlap, WeightedDamage, ewc_penalty, fisher_merge, fisher_overlap, fisher_weighted_damage
from .landscape import Flatness, Sharpness, flatness, sharpness
from .percolation import (
    Selection,
    SweepRecord,
    concentrated_perturbation,
    percolation_sweep,
    risk_correlation,
    risk_score,
    to_csv,
)

__all__ = [
    # capacity
    "Capacity",
    "capacity_report",
    # forgetting and merging
    "Overlap",
    "WeightedDamage",
    "ewc_penalty",
    "fisher_merge",
    "fisher_overlap",
    "fisher_weighted_damage",
    # landscape
    "Flatness",
    "Sharpness",
    "flatness",
    "sharpness",
    # percolation
    "Damage",
    "Selection",
    "SweepRecord",
    "concentrated_perturbation",
    "percolation_sweep",
    "perturbation_damage",
    "position_kl",
    "risk_correlation",
    "risk_score",
    "to_csv",
]
