"""Privacy accounting: dp-accounting events and epsilon, framework-free (no Keras).

`GeneralMomentAccountant` (AIJack's API, TensorFlow math) lives in
`deel_lipdp_ext.aijack.moment_accountant`; the name is kept here and imported
lazily, so importing this package does not import TensorFlow.
"""

# First: dp-accounting's PLD library then loads only when a PLD is computed.
from . import _deferred  # noqa: F401
from .epsilon import (
    ACCOUNTANTS,
    EventAccountant,
    ReleaseSchedule,
    calibrate_noise_multiplier,
    calibrate_parameter,
    compute_epsilon,
    epsilon_curve,
    epsilon_for_spec,
    get_max_epochs,
    pure_dp_rdp,
)
from .events import (
    GRADIENT_STEPS,
    PrivacySpec,
    PureDpEvent,
    Release,
    effective_noise_multiplier,
    make_dp_event,
    merge_releases,
    steps_per_epoch,
    training_step_event,
)

__all__ = [
    "ACCOUNTANTS",
    "EventAccountant",
    "GRADIENT_STEPS",
    "GeneralMomentAccountant",
    "PrivacySpec",
    "PureDpEvent",
    "Release",
    "ReleaseSchedule",
    "calibrate_noise_multiplier",
    "calibrate_parameter",
    "compute_epsilon",
    "effective_noise_multiplier",
    "epsilon_curve",
    "epsilon_for_spec",
    "get_max_epochs",
    "make_dp_event",
    "merge_releases",
    "pure_dp_rdp",
    "steps_per_epoch",
    "training_step_event",
]


def __getattr__(name):
    if name == "GeneralMomentAccountant":
        from ..aijack.moment_accountant import GeneralMomentAccountant

        return GeneralMomentAccountant
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
