"""AIJack's ``DPSGDManager`` for TensorFlow: lots, micro-batches and a DP optimizer.

Reference: AIJack ``aijack.defense.dp.manager`` (``DPSGDManager``,
``privatize``, its Poisson lot sampler and its optimizer wrapper), ported to
Keras 3 optimizers so that AIJack's training loop can be written with a
``tf.GradientTape``::

    dp_optimizer_cls, lot_loader, batch_loader = manager.privatize(sigma)
    optimizer = dp_optimizer_cls(learning_rate=0.05, momentum=0.9)
    for x_lot, y_lot in lot_loader(optimizer):
        for x_batch, y_batch in batch_loader((x_lot, y_lot)):
            optimizer.zero_grad()
            with tf.GradientTape() as tape:
                loss = loss_fn(y_batch, model(x_batch))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.step(grads, model.trainable_variables)

Semantics kept: ``step`` clips the micro-batch gradient (global norm over all
variables) to ``l2_norm_clip`` and accumulates it, without updating;
``step_for_lot`` applies ``(acc + C sigma N(0, I)) * batch_size / lot_size``
with the base optimizer and records one step in the accountant; the lot loader
draws ``iterations`` Poisson lots (each example with probability
``lot_size / N``; empty lots skipped), calls ``step_for_lot`` before fetching
each lot but the first and once more when the loop ends normally (a ``break``
drops the last lot), and ``zero_grad_for_lot`` after each fetch; batches are
sequential with the last short one dropped. Clipping is per example only with
``batch_size == 1``.

Departures: PyTorch optimizers hold gradients, Keras ones do not, so ``step``
takes ``(gradients, variables)`` and ``zero_grad`` has nothing to clear;
the lots are drawn from a seeded NumPy generator (``seed``); DPLIS smoothing
(``smoothing=True``) is not ported and raises NotImplementedError.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf


class DPSGDManager:
    """Builds the DP optimizer class and the lot / batch loaders.

    Args:
        accountant: an object with ``add_step_info(noise_params, q, steps)``
            (e.g. ``accounting.GeneralMomentAccountant``).
        optimizer_cls: a Keras optimizer class (e.g. ``keras.optimizers.SGD``).
        l2_norm_clip: C, the clipping norm of each micro-batch gradient (>= 0).
        dataset: ``(x, y)`` arrays with the same first dimension N.
        lot_size: expected lot size L (the Poisson rate is ``L / N``).
        batch_size: micro-batch size (1 for per-example clipping).
        iterations: lots drawn per pass of the lot loader.
        smoothing, smoothing_radius: DPLIS smoothing (not ported).
        seed: seed of the lot sampler and of the noise.
    """

    def __init__(
        self,
        accountant,
        optimizer_cls: type,
        l2_norm_clip: float,
        dataset: Sequence[np.ndarray],
        lot_size: int,
        batch_size: int,
        iterations: int,
        smoothing: bool = False,
        smoothing_radius: float = 10.0,
        seed: int | None = None,
    ):
        if smoothing:
            raise NotImplementedError("DPLIS smoothing (smoothing=True) is not ported.")
        if not (
            isinstance(optimizer_cls, type)
            and issubclass(optimizer_cls, keras.optimizers.Optimizer)
        ):
            raise TypeError(
                "`optimizer_cls` must be a Keras optimizer class. "
                f"Received: {optimizer_cls!r}"
            )
        if not hasattr(accountant, "add_step_info"):
            raise TypeError(
                "`accountant` must have add_step_info (e.g. GeneralMomentAccountant). "
                f"Received: {type(accountant).__name__}"
            )
        x, y = (np.asarray(a) for a in dataset)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(
                "`dataset` must be (x, y) with the same, non-zero length. "
                f"Received: {len(x)} and {len(y)}"
            )
        for name, value in (
            ("lot_size", lot_size),
            ("batch_size", batch_size),
            ("iterations", iterations),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"`{name}` must be a positive int. Received: {value!r}"
                )
        if lot_size > len(x):
            raise ValueError(
                f"`lot_size` must not exceed the dataset size {len(x)}. "
                f"Received: lot_size={lot_size}"
            )
        self.accountant = accountant
        self.optimizer_cls = optimizer_cls
        self.l2_norm_clip = l2_norm_clip
        self.x, self.y = x, y
        self.lot_size = lot_size
        self.batch_size = batch_size
        self.iterations = iterations
        self.smoothing = smoothing
        self.smoothing_radius = smoothing_radius
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    @property
    def sampling_rate(self) -> float:
        return self.lot_size / len(self.x)

    def privatize(self, noise_multiplier: float):
        """``(dp_optimizer_cls, lot_loader, batch_loader)`` for noise ``sigma``."""
        manager = self
        base = self.optimizer_cls

        class DPOptimizer(base):
            """``optimizer_cls`` that accumulates clipped micro-batch gradients and
            applies their noisy mean once per lot."""

            def __init__(self, *args, **kwargs):
                if noise_multiplier < 0:
                    raise ValueError(
                        f"Invalid noise_multiplier: {noise_multiplier} (must be >= 0)"
                    )
                if manager.l2_norm_clip < 0:
                    raise ValueError(
                        f"Invalid l2_norm_clip: {manager.l2_norm_clip} (must be >= 0)"
                    )
                super().__init__(*args, **kwargs)
                self.noise_multiplier = float(noise_multiplier)
                self.l2_norm_clip = float(manager.l2_norm_clip)
                self._accumulators: list[tf.Variable] | None = None
                self._dp_variables: list | None = None
                self._noise = tf.random.Generator.from_seed(
                    manager.seed
                    if manager.seed is not None
                    else int(manager._rng.integers(2**31))
                )

            def zero_grad(self) -> None:
                """Nothing to clear: Keras optimizers do not hold gradients."""

            def step(self, gradients, variables) -> None:
                """Clip the micro-batch gradient to C (global norm) and accumulate."""
                gradients = [tf.convert_to_tensor(g) for g in gradients]
                if self._accumulators is None:
                    self._dp_variables = list(variables)
                    self._accumulators = [
                        tf.Variable(tf.zeros_like(g), trainable=False)
                        for g in gradients
                    ]
                norm = tf.linalg.global_norm(gradients)
                scale = tf.minimum(self.l2_norm_clip / (norm + 1e-6), 1.0)
                for acc, g in zip(self._accumulators, gradients, strict=True):
                    acc.assign_add(scale * g)

            def zero_grad_for_lot(self) -> None:
                if self._accumulators is not None:
                    for acc in self._accumulators:
                        acc.assign(tf.zeros_like(acc))

            def step_for_lot(self) -> None:
                """Noisy mean of the lot's clipped gradients, then the base step."""
                if self._accumulators is None:
                    return
                std = self.l2_norm_clip * self.noise_multiplier
                factor = manager.batch_size / manager.lot_size
                noisy = [
                    (acc + std * self._noise.normal(acc.shape, dtype=acc.dtype))
                    * factor
                    for acc in self._accumulators
                ]
                self.apply(noisy, self._dp_variables)
                manager.accountant.add_step_info(
                    {"sigma": self.noise_multiplier}, manager.sampling_rate, 1
                )

        DPOptimizer.__name__ = f"DP{base.__name__}"
        DPOptimizer.__qualname__ = DPOptimizer.__name__
        return DPOptimizer, self.lot_loader, self.batch_loader

    def _lots(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        q = self.sampling_rate
        for _ in range(self.iterations):
            idx = np.flatnonzero(self._rng.random(len(self.x)) < q)
            if len(idx):
                yield self.x[idx], self.y[idx]

    def lot_loader(self, dp_optimizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Poisson lots; applies each finished lot through ``dp_optimizer``."""
        first = True
        for lot in self._lots():
            if not first:
                dp_optimizer.step_for_lot()
            first = False
            dp_optimizer.zero_grad_for_lot()
            yield lot
        if not first:
            dp_optimizer.step_for_lot()

    def batch_loader(self, lot) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Sequential micro-batches of ``batch_size`` (a short last one dropped)."""
        x, y = lot
        for start in range(
            0, math.floor(len(x) / self.batch_size) * self.batch_size, self.batch_size
        ):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]
