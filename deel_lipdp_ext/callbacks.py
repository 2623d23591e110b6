"""Callbacks: `DP_Accountant` (epsilon after every epoch, in the Keras logs, with a
budget stop) and the dynamic-clipping callbacks (from `dynamic_clipping`)."""

from __future__ import annotations

from collections.abc import Callable

import keras

from .accounting.epsilon import check_accountant
from .dynamic_clipping import (
    AdaptiveQuantileClipping,
    LaplaceAdaptiveLossGradientClipping,
)
from .privacy_plan import privacy_plan_of

__all__ = [
    "DP_Accountant",
    "AdaptiveQuantileClipping",
    "LaplaceAdaptiveLossGradientClipping",
]


class DP_Accountant(keras.callbacks.Callback):
    """Writes `epsilon` and `delta` into the epoch logs; stops within a budget.

    The logs reach the progress bar, `History`, `CSVLogger` and `TensorBoard`.
    Epsilon is that of the model's privacy plan: every mechanism in its ledger
    as it ran (the gradient steps with their noise multipliers and sampling,
    dynamic-clipping releases). With `epsilon_budget`, training stops at the
    end of the last epoch whose epsilon is within budget: after each epoch it
    checks whether ONE MORE epoch (its steps and the releases planned for it)
    would exceed the budget, so the reported epsilon never does.

    Args:
        accountant: "rdp" or "pld".
        epsilon_budget: optional budget on epsilon.
        log_fn: optional `log_fn(epoch, {"epsilon": ..., "delta": ...})`, e.g.
            a logging service's function; none is required.

    Attributes:
        history: list of dicts (epoch, steps, epsilon, delta, sampling, exact)
            per epoch; `sampling` lists the samplings the steps ran on, and
            `exact` says whether all were secret Poisson batches.
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

    def _plan_after(self, next_epoch: int) -> float:
        """Epsilon if epoch `next_epoch` runs too."""
        plan = privacy_plan_of(self.model)
        return plan.epsilon(
            self.accountant, plan.planned_ledger(1, first_epoch=next_epoch)
        )

    def on_train_begin(self, logs=None):
        plan = privacy_plan_of(self.model)
        if plan.dataset_metadata.sampling != "poisson":
            print(
                f"DP_Accountant: sampling={plan.dataset_metadata.sampling!r}; epsilon "
                "uses the Poisson subsampling analysis, the usual heuristic for "
                "shuffled batches."
            )
        if self.epsilon_budget is not None:
            first = self._plan_after(next_epoch=plan.completed_epochs())
            if first > self.epsilon_budget:
                raise ValueError(
                    f"One epoch already exceeds epsilon_budget={self.epsilon_budget} "
                    f"(epsilon would be {first:.4g})."
                )

    def on_epoch_end(self, epoch, logs=None):
        plan = privacy_plan_of(self.model)
        epsilon = plan.epsilon(self.accountant)
        record = {"epsilon": epsilon, "delta": plan.delta}
        if logs is not None:
            logs.update(record)
        self.history.append(
            {
                "epoch": epoch,
                "steps": int(plan.steps.numpy()),
                **record,
                "sampling": plan.samplings(),
                "exact": plan.is_exact(),
            }
        )
        if self.log_fn is not None:
            self.log_fn(epoch, dict(record))
        if (
            self.epsilon_budget is not None
            and self._plan_after(next_epoch=epoch + 1) > self.epsilon_budget
        ):
            print(
                f"DP_Accountant: epsilon={epsilon:.4g}; another epoch would exceed "
                f"epsilon_budget={self.epsilon_budget}: stopping."
            )
            self.model.stop_training = True
