"""Image synthesis to compare image metrics: the MAD competition (plenoptic port)."""

from .mad_competition import LoadWarning, MADCompetition
from .plot import mad_imshow_all, mad_loss_all
from .validate import penalize_range, validate_input, validate_metric, validate_penalty

__all__ = [
    "LoadWarning",
    "MADCompetition",
    "mad_imshow_all",
    "mad_loss_all",
    "penalize_range",
    "validate_input",
    "validate_metric",
    "validate_penalty",
]
