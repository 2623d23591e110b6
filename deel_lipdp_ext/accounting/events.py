"""What ran, as a dp-accounting event (the single route to epsilon).

A training run is the noisy gradient steps (Poisson-subsampled Gaussians)
plus every auxiliary release that read the private data, such as the
dynamic-clipping updates (`Release`). `make_dp_event` composes all of them.

Reference: Google's dp-accounting (`GaussianDpEvent`, `PoissonSampledDpEvent`,
`SelfComposedDpEvent`, `ComposedDpEvent`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import attr
from dp_accounting import dp_event

from .._validation import require_one_of


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PureDpEvent(dp_event.DpEvent):
    """An `epsilon`-DP mechanism (delta = 0), e.g. the sparse vector technique.

    dp-accounting 0.6 has no such event; `compute_epsilon` accounts it with the
    randomized-response pair that dominates every epsilon-DP mechanism.
    """

    epsilon: float


#: Mechanisms a `Release` can describe.
RELEASE_MECHANISMS = ("gaussian", "pure_dp")


#: The release name of the noisy gradient steps in a ledger.
GRADIENT_STEPS = "gradient_steps"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_sampling_rate(value: float) -> float:
    """A Poisson sampling rate q in (0, 1], as a float."""
    _require(
        0 < value <= 1,
        f"`sampling_rate` must be in (0, 1]. Received: sampling_rate={value!r}",
    )
    return float(value)


def steps_per_epoch(sampling_rate: float) -> int:
    """Gradient steps in one epoch at Poisson rate q: ceil(1 / q) (= ceil(N / B)).

    The single place where steps per epoch are derived (the data module, the
    command line and the privacy plan all call it).
    """
    q = _check_sampling_rate(sampling_rate)
    return math.ceil(round(1.0 / q, 9))


@dataclass(frozen=True)
class Release:
    """`count` runs of one private mechanism outside the gradient steps.

    Args:
        name: what released it (e.g. "adaptive_quantile_clipping").
        mechanism: "gaussian": a Gaussian mechanism of noise multiplier
            `parameter` (noise std / L2 sensitivity), Poisson-subsampled at
            `sampling_rate` when that is < 1. "pure_dp": a mechanism that is
            `parameter`-DP (pure epsilon, delta = 0), e.g. the sparse vector
            technique; no amplification by subsampling is claimed for it.
        parameter: the noise multiplier, or the pure-DP epsilon.
        sampling_rate: Poisson rate of the data the mechanism read ("gaussian").
        count: how many times it ran.
        sampling: how the data it read was sampled, as run (a label for the
            report, e.g. "poisson" or "shuffle"; "" when not recorded).
    """

    name: str
    mechanism: str
    parameter: float
    sampling_rate: float = 1.0
    count: int = 1
    sampling: str = ""

    def __post_init__(self):
        require_one_of("mechanism", self.mechanism, RELEASE_MECHANISMS, "Release")
        _require(
            self.parameter > 0 and math.isfinite(self.parameter),
            f"`parameter` of release {self.name!r} must be a positive finite "
            f"number. Received: {self.parameter!r}",
        )
        rate = _check_sampling_rate(self.sampling_rate)
        _require(
            int(self.count) == self.count and self.count >= 0,
            f"`count` must be an int >= 0. Received: {self.count!r}",
        )
        object.__setattr__(self, "parameter", float(self.parameter))
        object.__setattr__(self, "sampling_rate", rate)
        object.__setattr__(self, "count", int(self.count))

    @property
    def key(self) -> tuple:
        """Releases with equal keys are the same mechanism: their counts add."""
        return (
            self.name,
            self.mechanism,
            self.parameter,
            self.sampling_rate,
            self.sampling,
        )

    def with_count(self, count: int) -> Release:
        return dataclasses.replace(self, count=count)

    def single_event(self) -> dp_event.DpEvent:
        """The event of ONE run of the mechanism."""
        if self.mechanism == "pure_dp":
            return PureDpEvent(self.parameter)
        gaussian = dp_event.GaussianDpEvent(self.parameter)
        if self.sampling_rate == 1.0:
            return gaussian
        return dp_event.PoissonSampledDpEvent(self.sampling_rate, gaussian)

    def to_dict(self) -> dict:
        return asdict(self)


def merge_releases(releases: Sequence[Release]) -> tuple[Release, ...]:
    """Add up the counts of releases of the same mechanism (order kept)."""
    merged: dict[tuple, Release] = {}
    for release in releases:
        if release.key in merged:
            release = release.with_count(merged[release.key].count + release.count)
        merged[release.key] = release
    return tuple(r for r in merged.values() if r.count > 0)


@dataclass(frozen=True)
class PrivacySpec:
    """The mechanism a DP training run applies, in plain numbers.

    Args:
        sampling_rate: q, the probability that one sample is in a batch.
        steps: number of noisy gradient steps taken.
        noise_multipliers: one per Gaussian released each step (one for the
            global strategy; one per bounded variable for the per-layer
            strategy, already multiplied by the layer's `nm_coef`).
        delta: target delta.
        sampling: "poisson" (exact) or "shuffle" (accounted as Poisson: heuristic).
        releases: the other private releases (dynamic clipping updates...).
    """

    sampling_rate: float
    steps: int
    noise_multipliers: tuple[float, ...]
    delta: float
    sampling: str = "poisson"
    releases: tuple[Release, ...] = ()

    def __post_init__(self):
        _check_sampling_rate(self.sampling_rate)
        _require(
            int(self.steps) == self.steps and self.steps >= 0,
            f"`steps` must be an int >= 0. Received: {self.steps!r}",
        )
        _require(
            0 < self.delta < 1, f"`delta` must be in (0, 1). Received: {self.delta!r}"
        )
        sigmas = tuple(float(s) for s in self.noise_multipliers)
        _require(
            bool(sigmas) and all(s > 0 and math.isfinite(s) for s in sigmas),
            "`noise_multipliers` must be positive finite numbers. "
            f"Received: {self.noise_multipliers!r}",
        )
        for release in self.releases:
            if not isinstance(release, Release):
                raise TypeError(
                    f"`releases` must hold Release objects. Received: {release!r}"
                )
        object.__setattr__(self, "noise_multipliers", sigmas)
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "releases", merge_releases(self.releases))

    @property
    def is_exact(self) -> bool:
        """Whether the Poisson analysis matches the sampling that ran."""
        return self.sampling == "poisson"

    def step_release(self) -> Release:
        """The `steps` noisy gradient steps as one ledger entry."""
        return Release(
            GRADIENT_STEPS,
            "gaussian",
            effective_noise_multiplier(self.noise_multipliers),
            self.sampling_rate,
            self.steps,
            self.sampling,
        )

    def ledger(self) -> tuple[Release, ...]:
        """Everything the spec describes as ledger entries: steps, then releases."""
        return merge_releases((self.step_release(), *self.releases))


def effective_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Gaussians on disjoint coordinates, each with its own noise multiplier,
    compose to one Gaussian with sigma_eff = (sum_l sigma_l^-2)^(-1/2)."""
    return sum(s**-2.0 for s in noise_multipliers) ** -0.5


def training_step_event(spec: PrivacySpec) -> dp_event.DpEvent:
    """The event of ONE noisy gradient step of `spec`."""
    return spec.step_release().single_event()


def make_dp_event(source: PrivacySpec | Sequence[Release]) -> dp_event.DpEvent:
    """The dp-accounting event of everything that ran: each ledger entry
    self-composed `count` times, all composed.

    Args:
        source: a `PrivacySpec`, or a ledger (a sequence of `Release`, e.g. a
            privacy plan's `ledger()`, gradient steps included).

    Raises:
        TypeError: anything else.
    """
    if isinstance(source, PrivacySpec):
        ledger = source.ledger()
    elif isinstance(source, Sequence) and all(isinstance(r, Release) for r in source):
        ledger = merge_releases(source)
    else:
        raise TypeError(
            "make_dp_event needs a PrivacySpec or a sequence of Release. "
            f"Received: {type(source).__name__}"
        )
    parts = [dp_event.SelfComposedDpEvent(r.single_event(), r.count) for r in ledger]
    if not parts:
        return dp_event.NoOpDpEvent()
    return parts[0] if len(parts) == 1 else dp_event.ComposedDpEvent(parts)
