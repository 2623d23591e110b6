"""Argument checks of the suppress-privacy port, with MindArmour's exception types:
a wrong type raises TypeError, a wrong value ValueError; each names the argument."""

from __future__ import annotations

from typing import Any


def check_type(name: str, value: Any, types: tuple[type, ...]) -> Any:
    """``value`` if it is one of ``types`` (a bool is never an int or float here)."""
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(
            f"`{name}` must be of type {expected}. "
            f"Received: {name}={value!r} ({type(value).__name__})"
        )
    return value


def check_positive_int(name: str, value: Any) -> int:
    """A positive int: a bool is a ValueError, another type a TypeError."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` should not be bool. Received: {name}={value!r}")
    check_type(name, value, (int,))
    if value <= 0:
        raise ValueError(f"`{name}` must be positive. Received: {name}={value!r}")
    return value


def check_value(name: str, value: Any, ok: bool, requirement: str) -> Any:
    if not ok:
        raise ValueError(f"`{name}` must be {requirement}. Received: {name}={value!r}")
    return value
