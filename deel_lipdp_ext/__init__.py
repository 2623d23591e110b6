"""deel-lipdp-ext: clipless differentially private training of Lipschitz networks
on Keras 3 / TensorFlow.

Example:
    >>> from deel_lipdp_ext import layers, losses, DPSequential, DPParameters
"""

from . import accounting, callbacks, data, layers, losses
from .bounds import compute_gradient_bounds
from .data import DatasetMetadata
from .model import DP_Model, DP_Sequential, DPModel, DPParameters, DPSequential

__version__ = "0.1.0"

__all__ = [
    "accounting",
    "callbacks",
    "data",
    "layers",
    "losses",
    "compute_gradient_bounds",
    "DatasetMetadata",
    "DPModel",
    "DPParameters",
    "DPSequential",
    "DP_Model",
    "DP_Sequential",
    "__version__",
]


def __getattr__(name):
    # Modules that moved, still reachable at their old paths (imported lazily).
    if name == "metrics":
        from .imaging import metrics

        return metrics
    if name == "dpsgd_manager":
        from .aijack import dpsgd_manager

        return dpsgd_manager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
