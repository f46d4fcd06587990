"""Checks of scalar options at the API boundary, shared by every public function.

Each raises :class:`~fisherfx.FisherError` naming the function (``where``), the option and what was
expected; each returns the checked value.
"""

import math
from typing import Any

import torch
from torch import Tensor

from ._errors import FisherError


def choice(where: str, option: str, value: Any, allowed: tuple) -> None:
    """``value`` is one of ``allowed``."""
    if value not in allowed:
        raise FisherError(f"{where}: {option} must be one of {list(allowed)}, got {value!r}")


def positive_int(where: str, option: str, value: object, minimum: int = 1) -> int:
    """An ``int`` (not a ``bool``) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise FisherError(f"{where}: {option} must be an integer >= {minimum}, got {value!r}")
    return value


def finite_number(where: str, option: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number ``≥ minimum`` (``> minimum`` with ``strict``); a one-element tensor is read."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise FisherError(f"{where}: {option} must be a finite number {relation} {minimum}, got {value!r}")
    return float(value)


def check_generator(where: str, generator: object) -> None:
    """``None`` or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise FisherError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")


__all__ = ["check_generator", "choice", "finite_number", "positive_int"]
