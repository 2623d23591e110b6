"""A Keras callback that puts a cloak loss's components into ``logs``."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np


class LossComponentsLogger(keras.callbacks.Callback):
    """Averages a cloak loss's components over each epoch's training batches.

    Reads ``get_components()`` (from a cloak loss factory) after every training
    batch and writes the epoch means into ``logs`` under ``prefix + name``, so
    ``History``, ``CSVLogger`` and the progress bar show them.

    Args:
        get_components: the second function returned by a cloak loss factory.
        prefix: prepended to each component's name in ``logs``.
    """

    def __init__(
        self, get_components: Callable[[], dict[str, float]], prefix: str = ""
    ):
        super().__init__()
        self.get_components = get_components
        self.prefix = prefix
        self._sums: dict[str, float] = {}
        self._batches = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._sums, self._batches = {}, 0

    def on_train_batch_end(self, batch, logs=None):
        for name, value in self.get_components().items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._batches += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or not self._batches:
            return
        for name, total in self._sums.items():
            logs[self.prefix + name] = float(np.float32(total / self._batches))
