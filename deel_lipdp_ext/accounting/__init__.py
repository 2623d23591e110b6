"""Privacy accounting: dp-accounting events and epsilon, framework-free (no Keras).

`GeneralMomentAccountant` (AIJack's API, TensorFlow math) lives in
`moment_accountant` and is imported lazily, so importing this package does
not import TensorFlow.
"""

from .epsilon import (
    ACCOUNTANTS,
    ReleaseSchedule,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_curve,
    epsilon_for_spec,
    get_max_epochs,
    pure_dp_rdp,
)
from .events import (
    PrivacySpec,
    PureDpEvent,
    Release,
    effective_noise_multiplier,
    make_dp_event,
    merge_releases,
    training_step_event,
)

__all__ = [
    "ACCOUNTANTS",
    "GeneralMomentAccountant",
    "PrivacySpec",
    "PureDpEvent",
    "Release",
    "ReleaseSchedule",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "effective_noise_multiplier",
    "epsilon_curve",
    "epsilon_for_spec",
    "get_max_epochs",
    "make_dp_event",
    "merge_releases",
    "pure_dp_rdp",
    "training_step_event",
]


def __getattr__(name):
    if name == "GeneralMomentAccountant":
        from .moment_accountant import GeneralMomentAccountant

        return GeneralMomentAccountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
