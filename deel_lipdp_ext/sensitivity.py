"""Empirical checks of the analytic per-sample gradient bounds.

`gradient_norm_check` computes TRUE per-sample gradients (vectorised with a
Jacobian over the batch) of exactly the quantity the train step
differentiates (the SUM of `w_i * loss_i`), and compares their norms with
`compute_gradient_bounds`. A ratio above 1 means the privacy claim is false.
`maximize_gradient_norm` searches inputs on the input-bound sphere that push
those norms up (projected gradient ascent), to attack the bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from .layers.base import sample_norms

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
        if weight is None
        else tf.convert_to_tensor(weight, tf.float32)
    )
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        per_sample, _ = model.sample_losses(x, y, w)
    jacobians = tape.jacobian(per_sample, variables, experimental_use_pfor=True)
    norms = {}
    for v, jac in zip(variables, jacobians, strict=True):
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
    model, data, *, max_batches: int | None = None, raise_on_violation: bool = True
) -> SensitivityReport:
    """Largest true per-sample gradient norm vs the analytic bound, per variable.

    Args:
        model: a compiled DPSequential / DPModel.
        data: an `(x, y)` or `(x, y, weight)` tuple, or an iterable of them
            (e.g. the training `tf.data.Dataset`).
        max_batches: stop after this many batches.
        raise_on_violation: raise when a ratio exceeds 1 + 1e-4.

    Returns:
        A `SensitivityReport` (`.rows` with the max and mean norms,
        `.max_ratio`, `.table()`).

    Raises:
        AssertionError: a per-sample gradient norm exceeds its bound (a FALSE
            privacy claim), naming the variable.
    """
    bounds = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    maxima = dict.fromkeys(bounds, 0.0)
    sums = dict.fromkeys(bounds, 0.0)
    count = 0
    for i, batch in enumerate(_batches(data)):
        if max_batches is not None and i >= max_batches:
            break
        norms = per_sample_gradient_norms(model, *batch)
        for path, values in norms.items():
            if path not in bounds:
                raise ValueError(f"Variable '{path}' has no bound.")
            values = values.numpy()
            maxima[path] = max(maxima[path], float(np.max(values, initial=0.0)))
            sums[path] += float(np.sum(values))
        count += len(values) if norms else 0
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
