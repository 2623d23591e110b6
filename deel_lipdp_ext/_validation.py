"""Argument checks shared by layers and losses: errors name the argument, its
owner and the value received."""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any


def real_or_nan(value: Any) -> float:
    """A real number (Python or NumPy, not a bool) as a Python float, to be
    checked as stored; NaN for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


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


#: Packages whose classes' code the bounds are proven with as it is (this
#: package's, and the Keras and TensorFlow code it calls).
_OWN_PACKAGES = ("deel_lipdp_ext", "keras", "tensorflow")
#: What a class derived from one of the package's DP layers or losses may
#: define without restating its bounds: construction and configuration.
_CONSTRUCTION = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__init__",
        "get_config",
        "from_config",
        "bounds_proven",
    }
)


def unproven_change(obj: Any, contracts: tuple) -> str | None:
    """Why the bounds `obj` reports may not hold for the code it runs, or
    None.

    The package proves the bounds of its DP layers and losses for their own
    code. In a class derived from one of them (not only from the `contracts`
    a user implements: `DPLayer`, `GNPLayer`, `DPLoss`), a class of the
    caller's (a subclass or a mixin, wherever in the bases) that defines
    anything but construction and configuration (a call, a build, a helper
    the call uses, a bound method) changes that code (reviews: a call
    scaled by 3, kernel gradients 2.67x their bound; a padding helper
    returning 9x its input, 2.06x; a GNP layer's call, 3x); so does a method
    replaced on the instance (a functools.wraps wrapper, 2.95x). Unless the
    class that changes it, or one below, sets ``bounds_proven = True``: its
    author then states that the bounds of the changed class are proven.
    """
    cls = type(obj)
    replaced = sorted(
        name
        for name, value in vars(obj).items()
        if callable(value)
        and callable(getattr(cls, name, None))
        and not _keras_wrapper(value, cls, name)
    )
    if replaced:
        return (
            f"has {', '.join(replaced)} replaced on the instance, while its "
            "bounds were proven for its class's"
        )
    mro = cls.__mro__
    concrete = next(
        (
            i
            for i, c in enumerate(mro)
            if c not in contracts and _package_class(c, ("deel_lipdp_ext",))
        ),
        None,
    )
    if concrete is None:
        return None
    # every class of the caller's, before or after the package's class in
    # the resolution order (a review: a mixin listed after it still came
    # before keras.layers.Layer and DPLoss, and overrode __call__: 9x)
    for i, c in enumerate(mro):
        changed = sorted(set(vars(c)) - _CONSTRUCTION)
        if not changed or _package_class(c, (*_OWN_PACKAGES, "builtins")):
            continue
        if any(vars(k).get("bounds_proven") is True for k in mro[: i + 1]):
            continue
        return (
            f"derives from the package's {mro[concrete].__qualname__} with "
            f"{c.__qualname__}, which defines "
            f"{', '.join(changed[:4])}: the package proved that class's bounds "
            "for its own code. Once you have proven the bounds (inherited or "
            "your own) for the changed class, set `bounds_proven = True` on it"
        )
    return None


def _package_class(cls: type, packages: tuple[str, ...]) -> bool:
    """Whether `cls` is the class of that name in its module, a module of
    one of `packages` (a class naming a module it is not in is not)."""
    if cls.__module__.split(".")[0] not in packages:
        return False
    module = sys.modules.get(cls.__module__)
    return getattr(module, cls.__name__, None) is cls


def _keras_wrapper(value: Any, cls: type, name: str) -> bool:
    """Whether an instance attribute `name` is Keras's own wrapper of the
    class's method (Keras wraps `build` and `quantize` on each layer)."""
    keras = sys.modules.get("keras")  # not imported here: the accounting
    code = getattr(value, "__code__", None)  # commands run without TensorFlow
    inner = getattr(value, "__wrapped__", None)
    return (
        keras is not None
        and code is not None
        and code.co_filename.startswith(os.path.dirname(keras.__file__) + os.sep)
        and getattr(inner, "__func__", None) is getattr(cls, name, None)
    )
