"""Callbacks: `DP_Accountant` (epsilon after every epoch, in the Keras logs, with a
budget stop) and the dynamic-clipping callbacks (from `dynamic_clipping`)."""

from __future__ import annotations

import copy
import importlib
import logging
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

#: The logger of `DP_Accountant(log_fn="logging")` (and "all").
LOGGER = logging.getLogger("deel_lipdp_ext")

#: deel-lipdp's named log functions, accepted by `DP_Accountant(log_fn=...)`.
LOG_FN_NAMES = ("logging", "all", "wandb")

LogFn = Callable[[int, dict], None]


def _log_to_logging(epoch: int, record: dict) -> None:
    LOGGER.info(
        "DP_Accountant: epoch %d: epsilon=%.6g, delta=%.3g",
        epoch + 1,
        record["epsilon"],
        record["delta"],
    )


def _log_to_logging_and_print(epoch: int, record: dict) -> None:
    _log_to_logging(epoch, record)
    print(
        f"DP_Accountant: epoch {epoch + 1}: epsilon={record['epsilon']:.6g}, "
        f"delta={record['delta']:.3g}"
    )


def _wandb_log_fn() -> LogFn:
    # Imported only when asked for: no logging service is a dependency.
    try:
        wandb = importlib.import_module("wandb")
    except ImportError as error:
        raise ValueError(
            "`log_fn='wandb'` of DP_Accountant needs the `wandb` package, which "
            "is not installed (pip install wandb), or pass log_fn='logging', "
            "'all' or a callable. Received: log_fn='wandb'"
        ) from error

    def log(epoch: int, record: dict) -> None:
        # deel-lipdp's record: the epoch (from 1) beside epsilon and delta.
        wandb.log({**record, "epoch": epoch + 1})

    return log


def resolve_log_fn(log_fn: str | LogFn | None) -> LogFn | None:
    """The function `DP_Accountant` calls after each epoch as
    `fn(epoch, {"epsilon": ..., "delta": ...})` (`epoch` counted from 0).

    Args:
        log_fn: None (no extra logging); a callable `fn(epoch, record)`;
            or one of deel-lipdp's names: "logging" (the `logging` module, at
            INFO, logger "deel_lipdp_ext"), "all" (logging and `print`) or
            "wandb" (`wandb.log`, with the epoch counted from 1).

    Raises:
        ValueError: an unknown name, or "wandb" without the `wandb` package.
    """
    if log_fn is None or callable(log_fn):
        return log_fn
    if log_fn == "logging":
        return _log_to_logging
    if log_fn == "all":
        return _log_to_logging_and_print
    if log_fn == "wandb":
        return _wandb_log_fn()
    raise ValueError(
        "`log_fn` of DP_Accountant must be None, a callable fn(epoch, record), "
        f"or one of {', '.join(repr(n) for n in LOG_FN_NAMES)}. "
        f"Received: log_fn={log_fn!r}"
    )


class DP_Accountant(keras.callbacks.Callback):
    """Writes `epsilon` and `delta` into the epoch logs; stops within a budget.

    The logs reach the progress bar, `History`, `CSVLogger` and `TensorBoard`.
    Epsilon is that of the model's privacy plan: every mechanism in its ledger
    as it ran (the gradient steps with their noise multipliers and sampling,
    dynamic-clipping releases). With `epsilon_budget`, training stops at the
    end of the last epoch whose epsilon is within budget: after each epoch it
    checks whether ONE MORE epoch (its steps and the releases planned for it)
    would exceed the budget, so the reported epsilon never does. A
    configuration changed during training (`set_noise_multiplier` from a
    callback, a release schedule) is checked again before the next step: if
    one more epoch at the new configuration would exceed the budget, `fit`
    raises before that step runs. The budget bounds this accountant's
    epsilon; with several accountants, the logs' `epsilon` is the last one's.
    During a DP model's fit the accountant reports on that model only: it
    refuses to be bound to another (fit's callback list given to another
    model's evaluate, predict, fit or custom loop); give those their own.

    Args:
        accountant: "rdp" or "pld".
        epsilon_budget: optional budget on epsilon.
        log_fn: optional `log_fn(epoch, {"epsilon": ..., "delta": ...})`
            (`epoch` from 0), e.g. a logging service's function; or, as in
            deel-lipdp, "logging" (`logging` at INFO, logger
            "deel_lipdp_ext"), "all" (logging and `print`) or "wandb"
            (`wandb.log`; needs the `wandb` package).

    Raises:
        ValueError: an unknown accountant or `log_fn` name, `log_fn="wandb"`
            without `wandb`, or a non-positive `epsilon_budget`; during `fit`,
            a budget one epoch would exceed (at the start, or after a change
            of configuration).

    Example:
        >>> accountant = DP_Accountant(log_fn="logging")

    Attributes:
        history: list of dicts (epoch, steps, epsilon, delta, sampling, exact)
            per epoch; `sampling` lists the samplings the steps ran on, and
            `exact` says whether all were secret Poisson batches.
    """

    def __init__(
        self,
        accountant: str = "rdp",
        epsilon_budget: float | None = None,
        log_fn: str | LogFn | None = None,
    ):
        super().__init__()
        if accountant in LOG_FN_NAMES:
            # deel-lipdp's first argument is log_fn: DP_Accountant("logging").
            raise ValueError(
                "The first argument of DP_Accountant is the accountant ('rdp' or "
                f"'pld'); pass log_fn={accountant!r} by keyword. "
                f"Received: accountant={accountant!r}"
            )
        check_accountant(accountant)
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise ValueError(
                f"`epsilon_budget` must be > 0. Received: {epsilon_budget!r}"
            )
        self.accountant = accountant
        self.epsilon_budget = epsilon_budget
        self.log_fn = resolve_log_fn(log_fn)
        self.history: list[dict] = []
        self._epoch = 0  # the model epoch running
        self._unbind()

    def _unbind(self) -> None:
        """No model, no running training, nothing checked."""
        self._model = None
        # what the budget was last checked with: (planned releases, the last
        # step they cover)
        self._checked = None
        # the DP model this accountant reports on while it trains, and its
        # running trainings (fits and custom loops): an evaluate, predict,
        # fit or custom loop of another model given the same callbacks
        # rebound `self.model` (Keras's set_model), and the accountant then
        # logged 0 and checked the budget against that model (reviews)
        self._fitting = None
        self._pins = 0
        self._pins_before_fit: list[int] = []  # at each running fit's start

    def __copy__(self):
        return self._copy(copy.copy)

    def __deepcopy__(self, memo):
        return self._copy(lambda value: copy.deepcopy(value, memo))

    def _copy(self, copy_value) -> DP_Accountant:
        """A copy with the settings and the history, bound to no model and
        pinned to no fit (a copy made during a fit stayed pinned to its model
        for good, and a deep copy reported on a clone of it: a review)."""
        clone = object.__new__(type(self))
        bound = ("_model", "_fitting", "_pins", "_pins_before_fit", "_checked")
        for key, value in vars(self).items():
            if key not in bound:
                setattr(clone, key, copy_value(value))
        clone.history = [dict(record) for record in self.history]
        clone._unbind()
        return clone

    @property
    def _trained(self) -> keras.Model:
        """The model this accountant reports on: the one whose fit runs."""
        return self.model if self._fitting is None else self._fitting

    def set_model(self, model):
        """As Keras's; refused for another model while a DP model's fit this
        accountant reports on runs.

        Raises:
            ValueError: another model, during such a fit (its evaluate,
                predict, fit or custom loop given this accountant).
        """
        if self._fitting is not None and model is not self._fitting:
            raise ValueError(
                "This DP_Accountant reports on the fit of model "
                f"'{self._fitting.name}' (or its custom loop), which runs: give "
                f"the callbacks of '{getattr(model, 'name', model)}' an "
                "accountant of their own (and not fit's callback list)."
            )
        super().set_model(model)

    def _planned(self, next_epoch: int, schedules=None) -> tuple[int, tuple]:
        """(steps, releases) planned from epoch `next_epoch` on: whole
        epochs, as many as one call of the train function may need (it can
        run more steps than an epoch: `steps_per_call`)."""
        plan = privacy_plan_of(self._trained)
        per_epoch = plan.dataset_metadata.nb_steps_per_epoch
        epochs = -(-self._trained.steps_per_call() // per_epoch)
        planned = plan.planned_ledger(
            epochs, first_epoch=next_epoch, schedules=schedules
        )
        return epochs * per_epoch, planned

    def _plan_after(self, next_epoch: int, pending: tuple = ()) -> float:
        """Epsilon if the planned epochs (`_planned`) from `next_epoch` run
        too, at the configuration now, kept as the one checked
        (`_check_before`); with `pending`, the epoch's release about to be
        recorded, that release and the epochs' steps."""
        plan = privacy_plan_of(self._trained)
        if pending:  # the release replaces what the schedules plan
            _, planned = self._planned(next_epoch, schedules=())
            return plan.epsilon(self.accountant, (*pending, *planned))
        horizon, planned = self._planned(next_epoch)
        epsilon = plan.epsilon(self.accountant, planned)
        # Kept only when within the budget: a failed check kept as checked
        # let the next steps through (a review: a callback that reset
        # stop_training ran 8 epochs to 7.35 for a budget of 5.06; a refused
        # train_on_batch, retried, ran to 11.9). Steps are counted by
        # steps_taken, which a restore never rolls back (the step counter
        # does: a checkpoint restored before each of 6 steps let them all
        # through, 11.5 for 9.68, a review). It is the count of the ledger
        # the epsilon is computed from: a cheaper count of this process's
        # steps alone missed a restored foreign ledger, and jumped at a
        # resumed run's first step (a refusal mid-epoch).
        within = self.epsilon_budget is None or epsilon <= self.epsilon_budget
        self._checked = (planned, plan.steps_taken() + horizon) if within else None
        return epsilon

    def _pin(self, model: keras.Model) -> None:
        if self._fitting is not None and self._fitting is not model:
            raise ValueError(
                "This DP_Accountant already reports on the fit of model "
                f"'{self._fitting.name}' (or its custom loop), which runs: give "
                "another model's fit an accountant of its own."
            )
        self._fitting, self._pins = model, self._pins + 1

    def _unpin(self) -> None:
        self._pins = max(self._pins - 1, 0)
        if self._pins == 0 and self._fitting is not None:
            checks = privacy_plan_of(self._fitting).step_checks
            if self._check_before in checks:
                checks.remove(self._check_before)
            self._fitting = None

    def pin_to_fit(self, model: keras.Model) -> None:
        """Report on `model` until `release_fit`: called by a DP model's fit
        for its whole run, before any callback (a callback that evaluated
        another model with fit's callbacks rebound them all to it first).

        Raises:
            ValueError: another model's fit or custom loop that this
                accountant reports on still runs (a custom loop must call
                `on_train_end`, e.g. in a `finally`).
        """
        self._pin(model)
        self._pins_before_fit.append(self._pins - 1)

    def release_fit(self, model: keras.Model) -> None:
        """The end of `model`'s fit, raised or not (its `on_train_end` may not
        have run), called by that fit: the pins are those before it."""
        if self._fitting is model and self._pins_before_fit:
            self._pins = self._pins_before_fit.pop() + 1
            self._unpin()

    def on_train_begin(self, logs=None):
        privacy_plan_of(self.model)  # a non-DP model: refused, not pinned
        # a custom loop is pinned until its on_train_end (unpinned, another
        # model's evaluate moved it: 32 steps ran to epsilon 3.90 for a budget
        # of 2.08, a review); in a fit, one more pin of the same model
        self._pin(self.model)
        plan = privacy_plan_of(self._trained)
        self._epoch = plan.completed_epochs()
        if plan.dataset_metadata.sampling != "poisson":
            print(
                f"DP_Accountant: sampling={plan.dataset_metadata.sampling!r}; epsilon "
                "uses the Poisson subsampling analysis, the usual heuristic for "
                "shuffled batches."
            )
        if self.epsilon_budget is not None:
            first = self._plan_after(next_epoch=self._epoch)
            if first > self.epsilon_budget:
                raise ValueError(
                    f"One epoch already exceeds epsilon_budget={self.epsilon_budget} "
                    f"(epsilon would be {first:.4g})."
                )
            if self._check_before not in plan.step_checks:
                plan.step_checks.append(self._check_before)

    def on_train_end(self, logs=None):
        self._unpin()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = privacy_plan_of(self._trained).model_epoch(epoch)

    def _check_before(self, pending: tuple = ()) -> None:
        """Run by the plan before each execution of steps (from the model's
        train function, after every callback) and before each release it
        records (`pending`). Reviews found the budget passed by: a sigma
        lowered from 4 to 0.6 in on_epoch_begin (epsilon 11.7 for a budget
        of 3); a change by a callback after this one in the same hook (287);
        a clipping release with a changed parameter (1472); steps added by a
        callback's train_on_batch (8.96). So one more whole epoch is checked
        again (counting this epoch's steps already run twice: never under)
        unless the configuration is the one last checked and the steps of the
        next execution still fit in the epoch checked; a release is always
        checked with it."""
        plan = privacy_plan_of(self._trained)
        if not pending and self._checked is not None:
            planned, last_step = self._checked
            if (
                self._planned(self._epoch)[1] == planned
                and plan.steps_taken() + self._trained.steps_per_call() <= last_step
            ):
                return
        epsilon = self._plan_after(self._epoch, pending)
        if epsilon > self.epsilon_budget:
            sigma = plan.dp_parameters.noise_multiplier
            what = (
                f"the release {pending[0].name!r}"
                if pending
                else "the next steps (noise multiplier now "
                f"{sigma:.4g}; more steps than an epoch, or a changed "
                "configuration)"
            )
            raise ValueError(
                f"DP_Accountant: {what} and one more epoch would exceed "
                f"epsilon_budget={self.epsilon_budget} (epsilon {epsilon:.4g}). "
                f"Stopped before them; epsilon so far: "
                f"{plan.epsilon(self.accountant):.4g}."
            )

    def on_epoch_end(self, epoch, logs=None):
        plan = privacy_plan_of(self._trained)
        epsilon = plan.epsilon(self.accountant)
        record = {"epsilon": epsilon, "delta": plan.delta}
        if logs is not None:
            logs.update(record)
        self.history.append(
            {
                "epoch": epoch,
                "steps": plan.steps_taken(),
                **record,
                "sampling": plan.samplings(),
                "exact": plan.is_exact(),
            }
        )
        if self.log_fn is not None:
            self.log_fn(epoch, dict(record))
        if (
            self.epsilon_budget is not None
            and self._plan_after(next_epoch=plan.model_epoch(epoch + 1))
            > self.epsilon_budget
        ):
            print(
                f"DP_Accountant: epsilon={epsilon:.4g}; another epoch would exceed "
                f"epsilon_budget={self.epsilon_budget}: stopping."
            )
            self._trained.stop_training = True
