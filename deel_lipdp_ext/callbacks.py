"""Callbacks: `DP_Accountant` (epsilon after every epoch, in the Keras logs, with a
budget stop) and the dynamic-clipping callbacks (from `dynamic_clipping`)."""

from __future__ import annotations

from collections.abc import Callable

import keras

from .accounting import epsilon_for_spec
from .accounting.epsilon import check_accountant
from .dynamic_clipping import (
    AdaptiveQuantileClipping,
    LaplaceAdaptiveLossGradientClipping,
)

__all__ = [
    "DP_Accountant",
    "AdaptiveQuantileClipping",
    "LaplaceAdaptiveLossGradientClipping",
]


class DP_Accountant(keras.callbacks.Callback):
    """Writes `epsilon` and `delta` into the epoch logs; stops within a budget.

    The logs reach the progress bar, `History`, `CSVLogger` and `TensorBoard`.
    Epsilon covers everything the model's `privacy_spec` holds: the gradient
    steps and every release in its ledger (dynamic-clipping updates).
    With `epsilon_budget`, training stops at the end of the last epoch whose
    epsilon is within budget: after each epoch it checks whether ONE MORE
    epoch would exceed the budget, so the reported epsilon never does.

    Args:
        accountant: "rdp" or "pld".
        epsilon_budget: optional budget on epsilon.
        log_fn: optional `log_fn(epoch, {"epsilon": ..., "delta": ...})`, e.g.
            a logging service's function; none is required.

    Attributes:
        history: list of dicts (epoch, steps, epsilon, delta) per epoch.
    """

    def __init__(
        self,
        accountant: str = "rdp",
        epsilon_budget: float | None = None,
        log_fn: Callable[[int, dict], None] | None = None,
    ):
        super().__init__()
        check_accountant(accountant)
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise ValueError(
                f"`epsilon_budget` must be > 0. Received: {epsilon_budget!r}"
            )
        self.accountant = accountant
        self.epsilon_budget = epsilon_budget
        self.log_fn = log_fn
        self.history: list[dict] = []

    def _check_model(self):
        if not hasattr(self.model, "privacy_spec"):
            raise TypeError(
                "DP_Accountant needs a DP model (DPSequential/DPModel). "
                f"Received: {type(self.model).__name__}"
            )

    def on_train_begin(self, logs=None):
        self._check_model()
        meta = self.model.dataset_metadata
        if meta.sampling != "poisson":
            print(
                f"DP_Accountant: sampling={meta.sampling!r}; epsilon uses the Poisson "
                "subsampling analysis, the usual heuristic for shuffled batches."
            )
        if self.epsilon_budget is not None:
            first = self._epsilon_after(next_epoch=0)
            if first > self.epsilon_budget:
                raise ValueError(
                    f"One epoch already exceeds epsilon_budget={self.epsilon_budget} "
                    f"(epsilon would be {first:.4g})."
                )

    def _epsilon_after(self, next_epoch: int) -> float:
        """Epsilon if epoch `next_epoch` runs too: its steps and the releases
        the model's release schedules plan for it."""
        model = self.model
        steps = int(model.dp_steps.numpy()) + model.dataset_metadata.nb_steps_per_epoch
        releases = list(model.privacy_ledger)
        for schedule in model.release_schedules:
            planned = schedule.scheduled_release(next_epoch)
            if planned is not None:
                releases.append(planned)
        spec = model.privacy_spec(steps, tuple(releases))
        return epsilon_for_spec(spec, self.accountant)

    def on_epoch_end(self, epoch, logs=None):
        spec = self.model.privacy_spec()
        epsilon = epsilon_for_spec(spec, self.accountant)
        record = {"epsilon": epsilon, "delta": spec.delta}
        if logs is not None:
            logs.update(record)
        self.history.append({"epoch": epoch, "steps": spec.steps, **record})
        if self.log_fn is not None:
            self.log_fn(epoch, dict(record))
        if (
            self.epsilon_budget is not None
            and self._epsilon_after(next_epoch=epoch + 1) > self.epsilon_budget
        ):
            print(
                f"DP_Accountant: epsilon={epsilon:.4g}; another epoch would exceed "
                f"epsilon_budget={self.epsilon_budget}: stopping."
            )
            self.model.stop_training = True
