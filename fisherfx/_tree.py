"""The two pytree helpers fisherfx needs, over tensors in (nested) tuples, lists and dicts."""

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor


def map_tensors(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """``tree`` with ``fn`` applied to every tensor leaf; other leaves unchanged."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def tensors(tree: Any) -> list[Tensor]:
    """The tensor leaves of ``tree``, in order."""
    found: list[Tensor] = []
    map_tensors(found.append, tree)
    return found
