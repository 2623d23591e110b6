"""Empirical checks of the analytic per-sample gradient bounds.

`gradient_norm_check` computes TRUE per-sample gradients (vectorised with a
Jacobian over the batch) of exactly the quantity the train step
differentiates (the SUM of `w_i * loss_i`), and compares their norms with
`compute_gradient_bounds`. A ratio above 1 means the privacy claim is false.
`maximize_gradient_norm` searches inputs on the input-bound sphere that push
those norms up (projected gradient ascent), to attack the bound.

`get_max_epochs(epsilon_max, model)` is deel-lipdp's epoch budget, kept here
where deel-lipdp has it (docs/migration.md); it asks the model's privacy plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dp_accounting
import numpy as np
import tensorflow as tf

from . import accounting
from ._validation import real_or_nan
from .accounting import PrivacySpec
from .accounting.epsilon import check_accountant
from .layers.base import sample_norms
from .privacy_plan import HasPrivacyPlan, PrivacyPlan, privacy_plan_of

TOLERANCE = 1e-4


@dataclass(frozen=True)
class VariableCheck:
    """One variable's result: the largest and the mean per-sample gradient
    norm seen, and its bound."""

    path: str
    max_norm: float
    bound: float
    mean_norm: float = float("nan")

    @property
    def ratio(self) -> float:
        """Tightness max_norm / bound; must stay <= 1 (+ tolerance)."""
        return self.max_norm / self.bound if self.bound > 0 else float("inf")

    @property
    def mean_ratio(self) -> float:
        """mean_norm / bound: how much of the bound (hence of the noise) a
        typical sample uses. A variable far below 1 is a candidate for a larger
        `nm_coef` under the per-layer strategy."""
        return self.mean_norm / self.bound if self.bound > 0 else float("inf")


@dataclass(frozen=True)
class SensitivityReport:
    rows: tuple[VariableCheck, ...]

    @property
    def max_ratio(self) -> float:
        return max(r.ratio for r in self.rows)

    def table(self) -> str:
        lines = [
            f"{'variable':<60} {'max |g|':>11} {'bound':>11} {'ratio':>7} "
            f"{'mean ratio':>10}"
        ]
        for r in self.rows:
            lines.append(
                f"{r.path:<60} {r.max_norm:11.4e} {r.bound:11.4e} {r.ratio:7.4f} "
                f"{r.mean_ratio:10.4f}"
            )
        return "\n".join(lines)


def per_sample_gradient_norms(model, x, y, weight=None) -> dict[str, tf.Tensor]:
    """L2 norm of each sample's gradient of `w_i * loss_i`, per variable.

    Returns:
        {variable.path: tensor of shape (batch,)}.
    """
    x = tf.convert_to_tensor(x, tf.float32)
    y = tf.convert_to_tensor(y, tf.float32)
    w = (
        tf.ones(tf.shape(x)[:1])
        if weight is None  # (batch,) as the train step takes it, also (batch, 1)
        else tf.reshape(tf.convert_to_tensor(weight, tf.float32), [-1])
    )
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        per_sample, _ = model.sample_losses(x, y, w)
    jacobians = tape.jacobian(per_sample, variables, experimental_use_pfor=True)
    norms = {}
    for v, jac in zip(variables, jacobians, strict=True):
        if jac is not None and not bool(tf.reduce_all(tf.math.is_finite(jac))):
            # a row's NaN poisoned the others' and its norm read 0 (a review:
            # one inf weight made a 2x violation pass as ratio 0)
            raise ValueError(
                f"Per-sample gradients of '{v.path}' are not finite (a non-finite "
                "input, label or weight in the batch, or an overflow): their "
                "norms cannot be checked."
            )
        norms[v.path] = tf.zeros(tf.shape(x)[:1]) if jac is None else sample_norms(jac)
    return norms


def _batches(data) -> Iterable:
    if (
        isinstance(data, tuple | list)
        and len(data) in (2, 3)
        and not isinstance(data[0], tuple | list)
    ):
        yield tuple(data)
        return
    yield from data


def gradient_norm_check(
    model,
    data,
    *,
    max_batches: int | None = None,
    raise_on_violation: bool = True,
    chunk_size: int = 256,
) -> SensitivityReport:
    """Largest true per-sample gradient norm vs the analytic bound, per variable.

    Args:
        model: a compiled DPSequential / DPModel.
        data: an `(x, y)` or `(x, y, weight)` tuple, or an iterable of them
            (e.g. the training `tf.data.Dataset`).
        max_batches: stop after this many batches.
        raise_on_violation: raise when a ratio exceeds 1 + 1e-4.
        chunk_size: per-sample gradients are computed for at most this many
            samples at a time (memory grows with its square).

    Returns:
        A `SensitivityReport` (`.rows` with the max and mean norms,
        `.max_ratio`, `.table()`).

    Raises:
        AssertionError: a per-sample gradient norm exceeds its bound (a FALSE
            privacy claim), naming the variable.
        ValueError: no sample was checked, or a per-sample gradient is not
            finite (its norm, and others', cannot be measured).
    """
    bounds = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    maxima = dict.fromkeys(bounds, 0.0)
    sums = dict.fromkeys(bounds, 0.0)
    count = 0
    for i, batch in enumerate(_batches(data)):
        if max_batches is not None and i >= max_batches:
            break
        size = int(tf.shape(batch[0])[0])
        for start in range(0, size, chunk_size):
            chunk = [part[start : start + chunk_size] for part in batch]
            norms = per_sample_gradient_norms(model, *chunk)
            for path, values in norms.items():
                if path not in bounds:
                    raise ValueError(f"Variable '{path}' has no bound.")
                values = values.numpy()
                maxima[path] = max(maxima[path], float(np.max(values, initial=0.0)))
                sums[path] += float(np.sum(values))
            count += len(values) if norms else 0
    if count == 0:
        raise ValueError(
            "gradient_norm_check checked no sample (empty data, max_batches=0, "
            "or an iterator already used up): it cannot vouch for the bounds."
        )
    report = SensitivityReport(
        tuple(
            VariableCheck(p, maxima[p], bounds[p], sums[p] / max(count, 1))
            for p in bounds
        )
    )
    if raise_on_violation:
        for row in report.rows:
            if row.ratio > 1.0 + TOLERANCE:
                raise AssertionError(
                    f"Per-sample gradient of '{row.path}' has norm {row.max_norm:.6e} "
                    f"above its bound {row.bound:.6e} (ratio {row.ratio:.6f}): the "
                    "sensitivity claim is false."
                )
    return report


def maximize_gradient_norm(model, x, y, *, steps: int = 20, step_size: float = 0.1):
    """Projected gradient ascent on the inputs to maximise the per-sample
    gradient norms (summed over variables, each divided by its bound).

    Inputs stay on the sphere of radius `dataset_metadata.input_bound` (or the
    first layer's `upper_bound`).

    Returns:
        The adversarial inputs, same shape as `x`.
    """
    radius = float(model.dp_layers[0].upper_bound)
    x = tf.Variable(_project_sphere(tf.convert_to_tensor(x, tf.float32), radius))
    y = tf.convert_to_tensor(y, tf.float32)
    bounds = model.compute_gradient_bounds()
    variables = model.trainable_variables
    for _ in range(steps):
        with tf.GradientTape() as outer:
            objective = 0.0
            for i in range(int(x.shape[0])):
                with tf.GradientTape() as inner:
                    y_pred = model(x[i : i + 1], training=True)
                    loss = tf.reduce_sum(model.per_sample_losses(y[i : i + 1], y_pred))
                grads = inner.gradient(loss, variables)
                for v, g in zip(variables, grads, strict=True):
                    if g is not None:
                        objective += tf.reduce_sum(tf.square(g)) / tf.square(
                            bounds[v.path]
                        )
        direction = outer.gradient(objective, x)
        if direction is None:
            break
        direction = direction / (tf.norm(direction) + 1e-12)
        x.assign(_project_sphere(x + step_size * radius * direction, radius))
    return x.numpy()


def _project_sphere(x: tf.Tensor, radius: float) -> tf.Tensor:
    norms = tf.maximum(sample_norms(x), 1e-12)
    return x * tf.reshape(radius / norms, [-1] + [1] * (len(x.shape) - 1))


#: Largest epoch count `get_max_epochs(..., epochs_max=None)` searches.
UNBOUNDED_EPOCHS_CEILING = 2**20


def get_max_epochs(
    epsilon_max: float,
    model: HasPrivacyPlan
    | PrivacyPlan
    | PrivacySpec
    | Callable[[int], dp_accounting.DpEvent],
    epochs_max: int | None = 1024,
    safe: bool = True,
    atol: float = 1e-2,
    *,
    accountant: str = "rdp",
    delta: float | None = None,
) -> int:
    """The largest number of epochs whose epsilon stays <= `epsilon_max`.

    deel-lipdp's signature. With a DP model (or its privacy plan) the epochs
    are those `fit` would run next: the plan's mechanism as configured (noise
    multiplier, strategy and nm_coefs, sampling rate, steps per epoch, the
    releases of attached dynamic-clipping callbacks), after what already ran.
    With a `PrivacySpec` of ONE epoch (or a function epochs -> event, with
    `delta`), it is `accounting.get_max_epochs`.

    Args:
        epsilon_max: the epsilon budget (> 0).
        model: a DP model, a `PrivacyPlan`, a `PrivacySpec` of one epoch, or a
            function epochs -> dp-accounting event (with `delta`).
        epochs_max: the most epochs searched (the answer when even that many
            stay within budget); None doubles it from 1024 until epsilon_max
            is crossed (up to `UNBOUNDED_EPOCHS_CEILING`).
        safe: must be True: the answer never exceeds epsilon_max.
            deel-lipdp's `safe=False` returned the smallest count at or ABOVE
            epsilon_max; that is refused.
        atol: accepted for deel-lipdp scripts and unused: the answer is
            checked against the accountant itself, with no tolerance.
        accountant: "rdp" (default, as `DP_Accountant`) or "pld".
        delta: the delta, only when `model` is a function epochs -> event.

    Returns:
        An int >= 0; 0 when even one epoch exceeds epsilon_max.

    Raises:
        ValueError: `safe=False`, a non-positive epsilon_max, a bad
            `epochs_max`, or no crossing below `UNBOUNDED_EPOCHS_CEILING`.
        RuntimeError: the search returned a count above the budget (never
            expected: a guard, not a fallback).

    Example:
        >>> from deel_lipdp_ext.accounting import PrivacySpec
        >>> one_epoch = PrivacySpec(sampling_rate=0.01, steps=100,
        ...                         noise_multipliers=(1.0,), delta=1e-5)
        >>> epochs = get_max_epochs(3.0, one_epoch)
        >>> 0 < epochs < 100
        True
        >>> model.fit(train, epochs=get_max_epochs(3.0, model))  # doctest: +SKIP
    """
    if safe is not True:
        raise ValueError(
            "get_max_epochs only returns epoch counts whose epsilon is <= "
            "epsilon_max (deel-lipdp's safe=False returned one at or above it). "
            f"Received: safe={safe!r}"
        )
    if not real_or_nan(epsilon_max) > 0:
        raise ValueError(
            f"`epsilon_max` must be a number > 0. Received: epsilon_max={epsilon_max!r}"
        )
    epsilon_max = float(epsilon_max)
    if epochs_max is not None and (
        isinstance(epochs_max, bool)
        or not isinstance(epochs_max, int | np.integer)
        or epochs_max < 1
    ):
        raise ValueError(
            "`epochs_max` must be None or an int >= 1. "
            f"Received: epochs_max={epochs_max!r}"
        )
    check_accountant(accountant)

    if not isinstance(model, HasPrivacyPlan | PrivacyPlan):
        # The spec / event-function form: `accounting.get_max_epochs`.
        return _grow_search(
            lambda ceiling: accounting.get_max_epochs(
                epsilon_max, model, accountant, delta=delta, max_epochs=ceiling
            ),
            epsilon_max,
            epochs_max,
        )
    plan = privacy_plan_of(model)
    plan.check_ready("get_max_epochs")
    epochs = _grow_search(
        lambda ceiling: plan.max_epochs(epsilon_max, accountant, max_epochs=ceiling),
        epsilon_max,
        epochs_max,
    )
    if epochs > 0:  # the guarantee, checked on the plan's own accountant
        planned = plan.planned_ledger(epochs, first_epoch=plan.completed_epochs())
        epsilon = plan.epsilon(accountant, planned)
        if epsilon > epsilon_max:
            raise RuntimeError(
                f"get_max_epochs found {epochs} epochs with epsilon {epsilon:.6g} > "
                f"epsilon_max={epsilon_max}: refusing it."
            )
    return int(epochs)


def _grow_search(
    search: Callable[[int], int], epsilon_max: float, epochs_max: int | None
) -> int:
    """`search(ceiling)`; with `epochs_max=None`, the ceiling doubles from 1024
    while the answer is the ceiling itself."""
    ceiling = 1024 if epochs_max is None else int(epochs_max)
    epochs = search(ceiling)
    while epochs_max is None and epochs == ceiling:
        if ceiling >= UNBOUNDED_EPOCHS_CEILING:
            raise ValueError(
                f"epsilon_max={epsilon_max} is not reached within "
                f"{UNBOUNDED_EPOCHS_CEILING} epochs; pass a finite `epochs_max`."
            )
        ceiling *= 2
        epochs = search(ceiling)
    return int(epochs)
