"""What ran, as a dp-accounting event (the single route to epsilon).

Reference: Google's dp-accounting (`GaussianDpEvent`, `PoissonSampledDpEvent`,
`SelfComposedDpEvent`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import dp_accounting


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
    """

    sampling_rate: float
    steps: int
    noise_multipliers: tuple[float, ...]
    delta: float
    sampling: str = "poisson"

    def __post_init__(self):
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(
                f"`sampling_rate` must be in (0, 1]. Received: {self.sampling_rate!r}"
            )
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"`steps` must be an int >= 0. Received: {self.steps!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"`delta` must be in (0, 1). Received: {self.delta!r}")
        sigmas = tuple(float(s) for s in self.noise_multipliers)
        if not sigmas or not all(s > 0 and math.isfinite(s) for s in sigmas):
            raise ValueError(
                "`noise_multipliers` must be positive finite numbers. "
                f"Received: {self.noise_multipliers!r}"
            )
        object.__setattr__(self, "noise_multipliers", sigmas)
        object.__setattr__(self, "steps", int(self.steps))

    @property
    def is_exact(self) -> bool:
        """Whether the Poisson analysis matches the sampling that ran."""
        return self.sampling == "poisson"


def effective_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Gaussians on disjoint coordinates, each with its own noise multiplier,
    compose to one Gaussian with sigma_eff = (sum_l sigma_l^-2)^(-1/2)."""
    return sum(s**-2.0 for s in noise_multipliers) ** -0.5


def make_dp_event(spec: PrivacySpec) -> dp_accounting.DpEvent:
    """The dp-accounting event for `spec.steps` Poisson-subsampled Gaussian steps."""
    if spec.steps == 0:
        return dp_accounting.NoOpDpEvent()
    gaussian = dp_accounting.GaussianDpEvent(
        effective_noise_multiplier(spec.noise_multipliers)
    )
    step = (
        gaussian
        if spec.sampling_rate == 1.0
        else dp_accounting.PoissonSampledDpEvent(spec.sampling_rate, gaussian)
    )
    return dp_accounting.SelfComposedDpEvent(step, spec.steps)
