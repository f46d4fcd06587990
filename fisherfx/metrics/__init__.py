"""Metrics built on the estimators and operators: capacity of a spectrum, landscape around ``θ``."""

from .capacity import Capacity, capacity_report
from .landscape import Flatness, Sharpness, flatness, sharpness

__all__ = [
    # capacity
    "Capacity",
    "capacity_report",
    # landscape
    "Flatness",
    "Sharpness",
    "flatness",
    "sharpness",
]
