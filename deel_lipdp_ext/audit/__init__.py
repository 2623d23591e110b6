"""Empirical privacy audits: an epsilon LOWER bound measured from training
runs, reported next to the epsilon the accounting proves.

`statistics` is framework-free (NumPy, SciPy); `canaries` runs the one-run
canary audit on a Keras DP model with the library's own data pipeline.
"""

from . import statistics
from .statistics import (  # noqa: F401 (the names of __all__)
    auc,
    clopper_pearson,
    count_correct,
    guesses_from_scores,
    membership_epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    roc_curve,
    tpr_at_fpr,
)

__all__ = list(statistics.__all__)
