"""Argument checks shared by layers and losses: errors name the argument, its
owner and the value received."""

from __future__ import annotations

import math
from typing import Any


def require_positive(name: str, value: Any, owner: str) -> float:
    """`value` as a positive finite float, or a ValueError naming it."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(
            f"`{name}` of {owner} must be a positive finite number. "
            f"Received: {name}={value!r}"
        )
    return v


def require_positive_ints(
    name: str, value: Any, rank: int, owner: str
) -> tuple[int, ...]:
    """An int or `rank` positive ints, as a tuple; else a ValueError naming it."""
    t = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(t) != rank or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in t
    ):
        raise ValueError(
            f"`{name}` of {owner} must be a positive int or {rank} of them. "
            f"Received: {name}={value!r}"
        )
    return t


def require_one_of(name: str, value: Any, choices: tuple, owner: str = "") -> Any:
    """`value` if it is one of `choices`; else a ValueError naming the argument,
    its owner, the choices and the value received."""
    if value not in choices:
        where = f" of {owner}" if owner else ""
        allowed = " or ".join(repr(c) for c in choices)
        raise ValueError(
            f"`{name}`{where} must be {allowed}. Received: {name}={value!r}"
        )
    return value


def pop_harmless(kwargs: dict, owner: str, harmless: dict[str, tuple]) -> None:
    """Remove from `kwargs` the Keras/deel-lipdp arguments whose accepted values
    change nothing here (e.g. `use_bias=False` on a layer without bias);
    refuse any other value with a ValueError naming it.

    Args:
        kwargs: the layer's keyword arguments (changed in place).
        owner: the layer's class name, for the message.
        harmless: argument -> (accepted values, hint of what to do instead).
    """
    for name, (accepted, hint) in harmless.items():
        if name not in kwargs:
            continue
        value = kwargs.pop(name)
        if value not in accepted:
            raise ValueError(
                f"{owner} does not support `{name}`={value!r}: {hint} "
                f"Received: {name}={value!r}"
            )


#: `use_bias` on the bias-free Lipschitz layers: False is what they do.
NO_BIAS = (
    (False,),
    "it has no bias (a bias needs its own bound and noise); add a "
    "`DP_AddBias` layer after it instead.",
)
