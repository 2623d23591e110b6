"""Epsilon from an event, noise calibration and epoch budgets (bisection).

Reference: dp-accounting's `RdpAccountant` (Mironov 2017; Mironov, Talwar,
Zhang 2019) and `PLDAccountant` (privacy loss distributions, Meiser & Mohammadi
2018; Koskela et al. 2020).
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from .events import PrivacySpec, make_dp_event

ACCOUNTANTS = ("rdp", "pld")


def _make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant()
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant()
    raise ValueError(
        f"`accountant` must be 'rdp' or 'pld'. Received: accountant={accountant!r}"
    )


def compute_epsilon(
    event: dp_accounting.DpEvent, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of `event` at `delta` with the named dp-accounting accountant."""
    acc = _make_accountant(accountant)
    if not acc.supports(event):
        raise ValueError(
            f"The {accountant!r} accountant does not support the event {event}"
        )
    return float(acc.compose(event).get_epsilon(delta))


def epsilon_for_spec(spec: PrivacySpec, accountant: str = "rdp") -> float:
    """Epsilon of a training run described by `spec`."""
    return compute_epsilon(make_dp_event(spec), spec.delta, accountant)


def _epsilon(
    sigma: float, delta: float, q: float, steps: int, accountant: str
) -> float:
    spec = PrivacySpec(q, steps, (sigma,), delta)
    return epsilon_for_spec(spec, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    accountant: str = "rdp",
    *,
    tolerance: float = 1e-3,
    max_noise_multiplier: float = 1e4,
) -> float:
    """Smallest noise multiplier (within `tolerance`) whose epsilon is <= target.

    Guarantee: the returned sigma gives epsilon <= target_epsilon, and
    sigma - tolerance gives epsilon > target_epsilon (bisection on a
    quantity monotone in sigma).

    Raises:
        ValueError: bad arguments, or no sigma <= max_noise_multiplier reaches
            the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"`target_epsilon` must be > 0. Received: {target_epsilon!r}")
    if not tolerance > 0:
        raise ValueError(f"`tolerance` must be > 0. Received: {tolerance!r}")

    def eps(sigma: float) -> float:
        return _epsilon(sigma, delta, sampling_rate, steps, accountant)

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), starting from sigma = 1
    # and moving outward, so only sigmas near the answer are evaluated (PLD is
    # very slow for tiny sigmas).
    hi = 1.0
    if eps(hi) > target_epsilon:
        lo = hi
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2.0
            if hi > max_noise_multiplier:
                raise ValueError(
                    f"No noise multiplier <= {max_noise_multiplier} reaches epsilon "
                    f"{target_epsilon} (delta={delta}, q={sampling_rate}, "
                    f"steps={steps})."
                )
    else:
        lo = hi / 2.0
        while eps(lo) <= target_epsilon:
            hi, lo = lo, lo / 2.0
            if hi <= tolerance:
                return hi
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if _epsilon(mid, delta, sampling_rate, steps, accountant) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def get_max_epochs(
    epsilon_budget: float,
    spec_per_epoch: PrivacySpec,
    accountant: str = "rdp",
    *,
    max_epochs: int = 10_000,
) -> int:
    """Largest number of epochs whose epsilon stays <= `epsilon_budget`.

    Args:
        epsilon_budget: the budget.
        spec_per_epoch: the run's spec with `steps` = steps in ONE epoch.
        accountant: "rdp" or "pld".
        max_epochs: search ceiling.

    Returns:
        An int >= 0 (0 when even one epoch exceeds the budget).
    """

    def eps(epochs: int) -> float:
        spec = dataclasses.replace(spec_per_epoch, steps=epochs * spec_per_epoch.steps)
        return epsilon_for_spec(spec, accountant)

    if eps(1) > epsilon_budget:
        return 0
    lo, hi = 1, 2
    while hi <= max_epochs and eps(hi) <= epsilon_budget:
        lo, hi = hi, hi * 2
    hi = min(hi, max_epochs + 1)
    while hi - lo > 1:  # eps(lo) <= budget < eps(hi), or hi is past the ceiling
        mid = (lo + hi) // 2
        if eps(mid) <= epsilon_budget:
            lo = mid
        else:
            hi = mid
    return lo if math.isfinite(lo) else max_epochs
