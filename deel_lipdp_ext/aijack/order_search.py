"""Order searches of AIJack's moment accountant, in plain Python.

Reference: AIJack's ``search.cpp`` (``ternary``, ``ternary_int``, ``greedy``,
``greedy_frac``), restated in ``docs/ports.md``. ``ternary_int`` and
``greedy`` fix upstream errors (each function says which).

Each search minimises `f` over Renyi orders. Any order gives a valid bound,
so a search only decides how tight the reported number is, never whether it
is a bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

SEARCHES = ("ternary", "ternary_int", "greedy", "greedy_frac")


def ternary(
    f: Callable[[float], float],
    left: float,
    right: float,
    precision: float,
    max_iterations: int,
) -> float:
    """Continuous ternary search; `left > right` is allowed (the AIJack
    tutorial passes order_min=72, order_max=1). A NaN comparison is False,
    so it moves `left`, as upstream."""
    for _ in range(max_iterations):
        if abs(right - left) < precision:
            return (left + right) / 2
        a = left + (right - left) / 3
        b = right - (right - left) / 3
        if f(a) < f(b):
            right = b
        else:
            left = a
    return (left + right) / 2


def ternary_int(
    f: Callable[[float], float], lo: int, hi: int, max_iterations: int
) -> int:
    """Integer bisection on the sign of f(mid + 1) - f(mid).

    Fixed from upstream, whose branches are swapped (it moves away from the
    minimum and ends at an edge of the range): here the minimiser stays in
    (lo, hi] and the search returns lo + 1.
    """
    lo, hi = int(lo), int(hi)
    for _ in range(max_iterations):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        if f(mid) > f(mid + 1):
            lo = mid
        else:
            hi = mid
    return lo + 1


def greedy(
    f: Callable[[float], float],
    left: float,
    right: float,
    orders: Sequence[float],
) -> float:
    """The first order of `orders` with the strictly smallest f (NaN skipped);
    `left` when none is finite. Empty `orders` scan the integers left..right
    (upstream scanned 0..right-left, a bug)."""
    if not len(orders):
        orders = range(math.ceil(min(left, right)), math.floor(max(left, right)) + 1)
    best, best_value = left, math.inf
    for order in orders:
        value = f(order)
        if value < best_value:
            best, best_value = order, value
    return best
