"""MI-FACE model inversion (Fredrikson, Jha and Ristenpart, CCS 2015) in TensorFlow.

Reference: AIJack ``aijack.attack.inversion.MI_FACE``. Gradient descent on the
input to minimise ``c(x) = 1 - p(target_label | x) + auxterm_func(x)``:
``x <- process_func(x - lam * grad c(x))``, from zeros (or ``init_x``).

Departures: AIJack's "best" image is never updated (it returns the final x);
``attack`` returns the final x as AIJack does, and ``best_image`` /
``best_cost`` hold the true arg-min over the iterations. Images are Keras
inputs (channels-last). ``device`` is accepted and ignored (TensorFlow places
the computation).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf


class MI_FACE:  # noqa: N801 (AIJack's name)
    """Model inversion of one class of a classifier.

    Args:
        target_model: a Keras model mapping ``input_shape`` to class scores.
        input_shape: shape of the image searched for, batch of 1 included
            (e.g. ``(1, 8, 8, 1)``).
        target_label: the class to invert.
        lam: step size of the gradient descent.
        num_itr: number of iterations.
        auxterm_func: ``x -> scalar`` added to the cost (a prior), default 0.
        process_func: ``x -> x`` applied after each step (e.g. clipping).
        apply_softmax: apply a softmax to the model's output first.
        log_interval: print the cost every ``log_interval`` iterations (0: never).
        log_show_img: keep AIJack's signature; images are stored in
            ``log_image``.
        show_img_func: maps the stored images for display.
    """

    def __init__(
        self,
        target_model: keras.Model,
        input_shape=(1, 1, 64, 64),
        target_label: int = 0,
        lam: float = 0.01,
        num_itr: int = 100,
        auxterm_func: Callable = lambda x: 0,
        process_func: Callable = lambda x: x,
        apply_softmax: bool = False,
        device: str = "cpu",
        log_interval: int = 1,
        log_show_img: bool = False,
        show_img_func: Callable = lambda x: x * 0.5 + 0.5,
    ):
        if not callable(target_model):
            raise TypeError("`target_model` must be a callable Keras model.")
        if input_shape[0] != 1:
            raise ValueError(
                "MI_FACE inverts one image: input_shape must start with a batch of 1. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        if not isinstance(num_itr, int) or num_itr <= 0:
            raise ValueError(f"`num_itr` must be a positive int. Received: {num_itr!r}")
        self.target_model = target_model
        self.input_shape = tuple(input_shape)
        self.target_label = int(target_label)
        self.lam = float(lam)
        self.num_itr = num_itr
        self.auxterm_func = auxterm_func
        self.process_func = process_func
        self.apply_softmax = apply_softmax
        self.device = device
        self.log_interval = log_interval
        self.log_show_img = log_show_img
        self.show_img_func = show_img_func
        self.log_image: list[np.ndarray] = []
        self.best_image: np.ndarray | None = None
        self.best_cost = float("inf")

    def cost(self, x: tf.Tensor) -> tf.Tensor:
        """``1 - p(target | x) + auxterm_func(x)`` as a scalar."""
        p = self.target_model(x, training=False)
        if self.apply_softmax:
            p = tf.nn.softmax(p, axis=1)
        c = 1.0 - p[:, self.target_label] + tf.cast(self.auxterm_func(x), p.dtype)
        return tf.reshape(c, ())

    def attack(self, init_x=None) -> tuple[np.ndarray, list[float]]:
        """Runs the inversion.

        Returns:
            ``(x, log)``: the final image (``input_shape``) and the cost before
            each update (``num_itr`` floats). The cost and its gradient run
            as a ``tf.function`` (so ``auxterm_func`` must be TensorFlow code);
            ``process_func`` runs eagerly. ``best_image`` / ``best_cost``
            hold the lowest-cost image seen.
        """
        x = (
            tf.zeros(self.input_shape)
            if init_x is None
            else tf.convert_to_tensor(init_x, tf.float32)
        )
        if tuple(x.shape) != self.input_shape:
            raise ValueError(
                f"`init_x` must have shape {self.input_shape}. "
                f"Received: {tuple(x.shape)}"
            )
        log: list[float] = []
        self.log_image = []

        @tf.function(reduce_retracing=True)
        def cost_and_gradient(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                c = self.cost(x)
            return c, tape.gradient(c, x)

        self.best_image, self.best_cost = None, float("inf")
        for i in range(self.num_itr):
            c, grad = cost_and_gradient(x)
            cost = float(c)
            log.append(cost)
            if cost < self.best_cost:
                self.best_cost, self.best_image = cost, x.numpy().copy()
            x = tf.convert_to_tensor(self.process_func(x - self.lam * grad), tf.float32)
            self.log_image.append(x.numpy().copy())
            if self.log_interval and i % self.log_interval == 0:
                print(f"epoch {i}: {cost}")
        final_cost = float(self.cost(x))
        if final_cost < self.best_cost:
            self.best_cost, self.best_image = final_cost, x.numpy().copy()
        return x.numpy(), log
