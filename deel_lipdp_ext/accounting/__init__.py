"""Privacy accounting: dp-accounting events and epsilon, framework-free (no Keras)."""

from .epsilon import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_for_spec,
    get_max_epochs,
)
from .events import PrivacySpec, effective_noise_multiplier, make_dp_event

__all__ = [
    "ACCOUNTANTS",
    "PrivacySpec",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "effective_noise_multiplier",
    "epsilon_for_spec",
    "get_max_epochs",
    "make_dp_event",
]
