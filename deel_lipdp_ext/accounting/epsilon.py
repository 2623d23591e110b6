"""Epsilon from an event, and the one search routine (`calibrate_parameter`,
dp-accounting's `calibrate_dp_mechanism`) behind noise calibration and epoch
budgets.

Reference: dp-accounting's `RdpAccountant` (Mironov 2017; Mironov, Talwar,
Zhang 2019) and `PLDAccountant` (privacy loss distributions, Meiser & Mohammadi
2018; Koskela et al. 2020).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
from dp_accounting import dp_event, privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from .._validation import require_one_of, require_positive_ints
from .events import (
    PrivacySpec,
    PureDpEvent,
    Release,
    make_dp_event,
    merge_releases,
)

ACCOUNTANTS = ("rdp", "pld")

#: RDP orders: dp-accounting's defaults, so epsilons equal `RdpAccountant`'s.
RDP_ORDERS = np.asarray(rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
#: PLD discretization: dp-accounting's `PLDAccountant` default.
PLD_DISCRETIZATION = 1e-4


def check_accountant(accountant: str) -> None:
    require_one_of("accountant", accountant, ACCOUNTANTS)


def flatten_event(
    event: dp_event.DpEvent, count: int = 1
) -> list[tuple[dp_event.DpEvent, int]]:
    """The leaves of a composition tree with how many times each runs."""
    if isinstance(event, dp_event.NoOpDpEvent):
        return []
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return flatten_event(event.event, count * event.count)
    if isinstance(event, dp_event.ComposedDpEvent):
        return [leaf for e in event.events for leaf in flatten_event(e, count)]
    return [(event, count)] if count > 0 else []


def pure_dp_rdp(epsilon: float, orders: np.ndarray) -> np.ndarray:
    """Renyi DP of ANY epsilon-DP mechanism, tight: the Renyi divergence of
    binary randomized response with ratio e^epsilon (Kairouz, Oh, Viswanath
    2015: every epsilon-DP pair of output distributions is a post-processing
    of that pair, and Renyi divergences shrink under post-processing):

        r(a) = log((e^(a eps) + e^((1 - a) eps)) / (1 + e^eps)) / (a - 1)

    It is <= min(eps, a eps^2 / 2).
    """
    orders = np.asarray(orders, dtype=np.float64)
    log_num = np.logaddexp(orders * epsilon, (1.0 - orders) * epsilon)
    return (log_num - np.logaddexp(0.0, epsilon)) / (orders - 1.0)


def rdp_of_event(
    event: dp_event.DpEvent, orders: np.ndarray = RDP_ORDERS
) -> np.ndarray:
    """Renyi DP of `event` at `orders`: dp-accounting's RDP accountant for
    what it supports, plus `pure_dp_rdp` for pure-DP releases.

    Raises:
        ValueError: an event neither handles.
    """
    rdp = np.zeros_like(orders, dtype=np.float64)
    standard = []
    for leaf, count in flatten_event(event):
        if isinstance(leaf, PureDpEvent):
            rdp += count * pure_dp_rdp(leaf.epsilon, orders)
        else:
            standard.append(dp_event.SelfComposedDpEvent(leaf, count))
    if standard:
        acc = rdp_privacy_accountant.RdpAccountant(list(orders))
        composed = dp_event.ComposedDpEvent(standard)
        if not acc.supports(composed):
            raise ValueError(f"The 'rdp' accountant does not support the event {event}")
        with _quiet_absl():
            acc.compose(composed)
        # dp-accounting has no public getter for the RDP curve; `_rdp` is read
        # here only (pinned dp-accounting version, checked by the tests).
        rdp += acc._rdp  # noqa: SLF001
    return rdp


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence dp-accounting's warning that a fractional RDP order did not
    converge and is excluded: dropping an order only loosens the bound (the
    minimum is over fewer orders), and the warning floods every epoch log."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders=RDP_ORDERS) -> float:
    """The (epsilon, delta) conversion of dp-accounting's RDP accountant."""
    return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])


def _pld_library():
    """dp-accounting's `privacy_loss_distribution` module (loaded on first use)."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution


def _pld_of_leaf(leaf: dp_event.DpEvent, count: int):
    """The PLD of `count` runs of `leaf`, built as `PLDAccountant` builds it."""
    from dp_accounting.pld import common

    pld_lib = _pld_library()
    kw = {"value_discretization_interval": PLD_DISCRETIZATION}
    if isinstance(leaf, PureDpEvent):
        # dp-accounting's pessimistic PLD of an (eps, 0)-DP mechanism: the
        # randomized-response pair, which dominates every eps-DP mechanism.
        params = common.DifferentialPrivacyParameters(leaf.epsilon, 0)
        return pld_lib.from_privacy_parameters(params, **kw).self_compose(count)
    if isinstance(leaf, dp_event.GaussianDpEvent):
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=leaf.noise_multiplier / math.sqrt(count), **kw
        )
    if isinstance(leaf, dp_event.LaplaceDpEvent):
        return pld_lib.from_laplace_mechanism(
            parameter=leaf.noise_multiplier, **kw
        ).self_compose(count)
    if isinstance(leaf, dp_event.PoissonSampledDpEvent):
        inner = leaf.event
        if isinstance(inner, dp_event.GaussianDpEvent):
            return pld_lib.from_gaussian_mechanism(
                standard_deviation=inner.noise_multiplier,
                sampling_prob=leaf.sampling_probability,
                **kw,
            ).self_compose(count)
        if isinstance(inner, dp_event.LaplaceDpEvent):
            return pld_lib.from_laplace_mechanism(
                parameter=inner.noise_multiplier,
                sampling_prob=leaf.sampling_probability,
                **kw,
            ).self_compose(count)
    raise ValueError(f"The 'pld' accountant does not support the event {leaf}")


def pld_of_event(event: dp_event.DpEvent):
    """The privacy loss distribution of `event` (dp-accounting's PLD library)."""
    pld = _pld_library().identity(value_discretization_interval=PLD_DISCRETIZATION)
    for leaf, count in flatten_event(event):
        pld = pld.compose(_pld_of_leaf(leaf, count))
    return pld


def compute_epsilon(
    event: dp_event.DpEvent, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of `event` at `delta` with dp-accounting's RDP or PLD machinery.

    Supports the events the library produces: (Poisson-subsampled) Gaussian
    and Laplace mechanisms, pure-DP `PureDpEvent` releases, and
    their compositions. For events without pure-DP releases the result equals
    `RdpAccountant` / `PLDAccountant` exactly.
    """
    check_accountant(accountant)
    if accountant == "rdp":
        return epsilon_from_rdp(rdp_of_event(event), delta)
    return float(pld_of_event(event).get_epsilon_for_delta(delta))


def epsilon_for_spec(spec: PrivacySpec, accountant: str = "rdp") -> float:
    """Epsilon of a training run described by `spec`."""
    return compute_epsilon(make_dp_event(spec), spec.delta, accountant)


class ReleaseSchedule(Protocol):
    """Anything that plans private releases per epoch (the dynamic-clipping
    callbacks): the release at the start of epoch `epoch` (0-based), or None."""

    def scheduled_release(self, epoch: int) -> Release | None: ...


def _curve_components(
    per_epoch: Sequence[Release], epochs: int, schedules: Sequence[ReleaseSchedule]
) -> list[tuple[dp_event.DpEvent, np.ndarray]]:
    """(event of one run, cumulative run count after each epoch) per mechanism."""
    after = np.arange(1, epochs + 1, dtype=np.int64)
    components = [
        (release.single_event(), release.count * after)
        for release in merge_releases(per_epoch)
    ]
    for schedule in schedules:
        planned = [schedule.scheduled_release(k) for k in range(epochs)]
        by_key: dict[tuple, tuple[Release, np.ndarray]] = {}
        for k, release in enumerate(planned):
            if release is None:
                continue
            first, runs = by_key.get(release.key, (release, np.zeros(epochs, np.int64)))
            runs[k] += release.count
            by_key[release.key] = (first, runs)
        for release, runs in by_key.values():
            components.append((release.single_event(), np.cumsum(runs)))
    return components


def epsilon_curve(
    source: PrivacySpec | Sequence[Release],
    epochs: int,
    accountant: str = "rdp",
    *,
    schedules: Sequence[ReleaseSchedule] = (),
    delta: float | None = None,
) -> np.ndarray:
    """Epsilon after each of `epochs` epochs of a fresh run, all at once.

    Args:
        source: a `PrivacySpec` of ONE epoch (`steps` per epoch; each release's
            `count` is per epoch), or the ledger of one epoch (a sequence of
            `Release`, with `delta`); a privacy plan's `epsilon_curve` passes
            its own.
        epochs: number of epochs.
        accountant: "rdp" (RDP is additive in the run counts: each mechanism's
            RDP curve is computed once, then one conversion per epoch) or
            "pld" (one PLD per epoch: ~0.1-0.5 s each).
        schedules: release schedules (see `ReleaseSchedule`).
        delta: the delta, when `source` is a ledger.

    Returns:
        float64 array of shape (epochs,): epsilon after epochs 1..epochs.

    Raises:
        TypeError: `source` is neither (or a ledger comes without `delta`).
    """
    check_accountant(accountant)
    epochs = require_positive_ints("epochs", epochs, 1, "epsilon_curve")[0]
    if isinstance(source, PrivacySpec):
        per_epoch, delta = source.ledger(), source.delta
    elif (
        isinstance(source, Sequence)
        and all(isinstance(r, Release) for r in source)
        and delta is not None
    ):
        per_epoch = tuple(source)
    else:
        raise TypeError(
            "epsilon_curve needs a PrivacySpec of one epoch, or the ledger of one "
            f"epoch and `delta`. Received: {type(source).__name__}, delta={delta!r}"
        )
    components = _curve_components(per_epoch, epochs, schedules)
    curve = np.zeros(epochs, dtype=np.float64)
    if accountant == "rdp":
        units = [rdp_of_event(event) for event, _ in components]
        for k in range(epochs):
            rdp = sum(
                (
                    runs[k] * unit
                    for unit, (_, runs) in zip(units, components, strict=True)
                ),
                np.zeros_like(RDP_ORDERS),
            )
            curve[k] = epsilon_from_rdp(rdp, delta)
        return curve
    for k in range(epochs):
        # Self-composing each mechanism from scratch is faster than composing
        # the growing PLD with one more epoch, and equals `compute_epsilon`.
        pld = _pld_library().identity(value_discretization_interval=PLD_DISCRETIZATION)
        for event, runs in components:
            if runs[k] > 0:
                pld = pld.compose(_pld_of_leaf(event, int(runs[k])))
        curve[k] = pld.get_epsilon_for_delta(delta)
    return curve


class EventAccountant(privacy_accountant.PrivacyAccountant):
    """dp-accounting's accountant interface over `compute_epsilon`: the RDP or
    PLD machinery of dp-accounting, plus pure-DP releases (`PureDpEvent`).

    It lets dp-accounting's `calibrate_dp_mechanism` search any parameter of
    the mechanisms this library runs.

    Args:
        accountant: "rdp" or "pld".
    """

    def __init__(self, accountant: str = "rdp"):
        check_accountant(accountant)
        super().__init__(privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE)
        self.accountant = accountant
        self._events: list[dp_event.DpEvent] = []

    def _maybe_compose(self, event, count, do_compose):
        mechanisms = (dp_event.GaussianDpEvent, dp_event.LaplaceDpEvent)
        for leaf, _ in flatten_event(event):
            supported = isinstance(leaf, (PureDpEvent, *mechanisms))
            if isinstance(leaf, dp_event.PoissonSampledDpEvent):
                supported = isinstance(leaf.event, mechanisms)
            if not supported:
                return self.CompositionErrorDetails(
                    leaf, f"the {self.accountant!r} accountant does not support it"
                )
        if do_compose and count > 0:
            self._events.append(dp_event.SelfComposedDpEvent(event, count))
        return None

    def get_epsilon(self, target_delta: float) -> float:
        return compute_epsilon(
            dp_event.ComposedDpEvent(self._events), target_delta, self.accountant
        )


def calibrate_parameter(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    *,
    lower: float,
    upper: float,
    tolerance: float,
    discrete: bool = False,
) -> float:
    """The one search routine: the parameter in [lower, upper] at which the
    epsilon of `make_event(parameter)` crosses `target_epsilon`, on the side
    where epsilon <= target (dp-accounting's `calibrate_dp_mechanism`: Brent's
    method, then a check that the returned value is within budget).

    Epsilon must be monotone in the parameter (decreasing for a noise
    multiplier, increasing for a number of epochs), with
    epsilon(lower) - target and epsilon(upper) - target of opposite signs.

    Returns:
        A parameter whose epsilon is <= target_epsilon, within `tolerance` of
        the crossing (an integer when `discrete`).
    """
    # scipy.optimize: imported when a calibration runs, not with the package
    from dp_accounting import mechanism_calibration

    return mechanism_calibration.calibrate_dp_mechanism(
        lambda: EventAccountant(accountant),
        make_event,
        target_epsilon,
        delta,
        mechanism_calibration.ExplicitBracketInterval(lower, upper),
        discrete=discrete,
        tol=tolerance,
    )


def calibrate_noise_multiplier(
    target_epsilon: float | Callable[[float], dp_event.DpEvent],
    delta: float,
    sampling_rate: float | None = None,
    steps: int | None = None,
    accountant: str = "rdp",
    *,
    make_event: Callable[[float], dp_event.DpEvent] | None = None,
    tolerance: float = 1e-3,
    max_noise_multiplier: float = 1e4,
) -> float:
    """Smallest noise multiplier (within `tolerance`) whose epsilon is <= target.

    By default the mechanism is `steps` Poisson-subsampled Gaussian steps at
    `sampling_rate`; `make_event(sigma)` gives any other (a privacy plan passes
    its own: per-layer multipliers, planned releases).

    Guarantee: the returned sigma gives epsilon <= target_epsilon, and
    sigma - tolerance gives epsilon > target_epsilon (epsilon is decreasing
    in sigma).

    Raises:
        ValueError: bad arguments, or no sigma <= max_noise_multiplier reaches
            the target.
    """
    if not target_epsilon > 0:
        raise ValueError(f"`target_epsilon` must be > 0. Received: {target_epsilon!r}")
    if not tolerance > 0:
        raise ValueError(f"`tolerance` must be > 0. Received: {tolerance!r}")
    if make_event is None:
        if sampling_rate is None or steps is None:
            raise ValueError(
                "calibrate_noise_multiplier needs `sampling_rate` and `steps`, or "
                f"`make_event`. Received: sampling_rate={sampling_rate!r}, "
                f"steps={steps!r}"
            )

        def make_event(sigma: float) -> dp_event.DpEvent:
            return make_dp_event(PrivacySpec(sampling_rate, steps, (sigma,), delta))

    def eps(sigma: float) -> float:
        return compute_epsilon(make_event(sigma), delta, accountant)

    # Bracket [lo, hi] with eps(lo) > target >= eps(hi), starting from sigma = 1
    # and moving outward, so only sigmas near the answer are evaluated (PLD is
    # very slow for tiny sigmas); the search inside is `calibrate_parameter`.
    lo, hi = 1.0, 1.0
    if eps(hi) > target_epsilon:
        while eps(hi) > target_epsilon:
            lo, hi = hi, hi * 2.0
            if hi > max_noise_multiplier:
                raise ValueError(
                    f"No noise multiplier <= {max_noise_multiplier} reaches epsilon "
                    f"{target_epsilon} (delta={delta})."
                )
    else:
        while eps(lo) <= target_epsilon:
            hi, lo = lo, lo / 2.0
            if hi <= tolerance:
                return hi
    return calibrate_parameter(
        make_event,
        target_epsilon,
        delta,
        accountant,
        lower=lo,
        upper=hi,
        tolerance=tolerance,
    )


def get_max_epochs(
    epsilon_budget: float,
    spec_per_epoch: PrivacySpec | Callable[[int], dp_event.DpEvent],
    accountant: str = "rdp",
    *,
    delta: float | None = None,
    max_epochs: int = 10_000,
) -> int:
    """Largest number of epochs whose epsilon stays <= `epsilon_budget`.

    Args:
        epsilon_budget: the budget.
        spec_per_epoch: the run's spec for ONE epoch (`steps` and each
            release's `count` per epoch), or a function epochs -> event of a
            run of that many epochs (with `delta`).
        accountant: "rdp" or "pld".
        delta: the delta, when `spec_per_epoch` is a function.
        max_epochs: search ceiling.

    Returns:
        An int >= 0 (0 when even one epoch exceeds the budget).
    """
    if isinstance(spec_per_epoch, PrivacySpec):
        spec, delta = spec_per_epoch, spec_per_epoch.delta

        def make_event(epochs: int) -> dp_event.DpEvent:
            return make_dp_event(
                [r.with_count(epochs * r.count) for r in spec.ledger()]
            )

    elif callable(spec_per_epoch) and delta is not None:
        make_event = spec_per_epoch
    else:
        raise TypeError(
            "get_max_epochs needs a PrivacySpec of one epoch, or a function "
            "epochs -> event and `delta`. "
            f"Received: {type(spec_per_epoch).__name__}, delta={delta!r}"
        )

    def eps(epochs: int) -> float:
        return compute_epsilon(make_event(int(epochs)), delta, accountant)

    if eps(1) > epsilon_budget:
        return 0
    if eps(max_epochs) <= epsilon_budget:
        return max_epochs
    epochs = int(
        calibrate_parameter(
            make_event,
            epsilon_budget,
            delta,
            accountant,
            lower=1,
            upper=max_epochs,
            tolerance=1,
            discrete=True,
        )
    )
    while epochs < max_epochs and eps(epochs + 1) <= epsilon_budget:
        epochs += 1  # the search stops within one epoch of the crossing
    return epochs
