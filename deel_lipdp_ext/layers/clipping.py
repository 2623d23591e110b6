"""`DP_ClipGradient`: clips each sample's upstream gradient in the backward pass."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from .._validation import require_one_of, require_positive
from .base import DPLayer, as_bound, sample_norms

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ClipGradient(keras.layers.Layer, DPLayer):
    """Identity forward; backward, clips each sample's gradient to `clip_value`.

    The DP train step differentiates the SUM of the per-sample losses, so the
    gradient reaching this layer for sample i is sample i's own (in units of
    the loss gradient); clipping it to norm `clip_value` makes
    `backpropagate_inputs` return `min(gradient_bound, clip_value)`.

    Args:
        clip_value: per-sample gradient norm to clip to (> 0).
        mode: "fixed", or "dynamic" to let a clipping callback change the
            value during training (its privacy cost is accounted by that
            callback).

    Shapes: unchanged.

    Example:
        >>> layer = DP_ClipGradient(clip_value=1.0)
    """

    def __init__(self, clip_value: float, mode: str = "fixed", **kwargs):
        super().__init__(**kwargs)
        self.initial_clip_value = require_positive(
            "clip_value", clip_value, "DP_ClipGradient"
        )
        self.mode = require_one_of(
            "mode", mode, ("fixed", "dynamic"), "DP_ClipGradient"
        )
        self._recorded: list | None = None
        self._copies = 1
        self.clip_value = self.add_weight(
            name="clip_value",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_clip_value),
            trainable=False,
        )

    def set_clip_value(self, value: float) -> None:
        """Set the clipping value (mode "dynamic" only: a clipping callback
        sets it, and accounts the private release that chose it)."""
        if self.mode != "dynamic":
            raise ValueError(
                f"DP_ClipGradient '{self.name}' has mode='fixed': only a "
                "mode='dynamic' layer may have its clip value changed."
            )
        value = require_positive("clip_value", value, "DP_ClipGradient")
        stored = np.float32(value)
        if not (np.isfinite(stored) and stored >= np.finfo(np.float32).tiny):
            raise ValueError(
                f"`clip_value` of DP_ClipGradient '{self.name}' is stored in "
                "float32, where it would be "
                f"{float(stored)!r}: use a value in [{np.finfo(np.float32).tiny}, "
                f"{np.finfo(np.float32).max}]. Received: clip_value={value!r}"
            )
        self.clip_value.assign(value)

    def set_copies_per_sample(self, copies: int) -> None:
        """With augmentation multiplicity K (set by the DP model), a sample's
        loss is the mean over K copies, each one row here: each row is clipped
        to `clip_value / K`, so the K rows of one sample sum to at most
        `clip_value`, the bound `backpropagate_inputs` reports. (Clipping each
        row to `clip_value` would let one sample reach K times it.)

        Raises:
            ValueError: K > 1 on a mode="dynamic" layer: its clipping
                callbacks count rows, and a sample would be K of them.
        """
        copies = self._checked_copies(copies)
        if copies > 1 and self.mode == "dynamic":
            raise ValueError(
                f"DP_ClipGradient '{self.name}' has mode='dynamic': it cannot be "
                "used with augmentation multiplicity > 1 (a sample would count "
                f"{copies} times in the private quantile that sets the clip)."
            )
        self._copies = copies

    def _checked_copies(self, copies) -> int:
        """K as an int >= 1, or a ValueError naming the layer."""
        if (
            isinstance(copies, bool)
            or not isinstance(copies, numbers.Integral)
            or copies < 1
        ):
            raise ValueError(
                f"DP_ClipGradient '{self.name}': copies per sample must be an "
                f"int >= 1 (set by set_copies_per_sample). Received: {copies!r}"
            )
        return int(copies)

    @property
    def copies_per_sample(self) -> int:
        """K: each row is clipped to `clip_value / K` (`set_copies_per_sample`;
        read-only otherwise: a value below 1 set on the layer loosened the
        clip its bound reports, 9.9x, a review)."""
        return self._copies

    @contextlib.contextmanager
    def recording_outputs(self) -> Iterator[list]:
        """Within the context (eager), every output of a training call is
        appended to the yielded list, so a caller can take the per-sample
        gradients this layer clips (the dynamic-clipping callbacks do)."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def call(self, inputs, training=None):
        if not training:
            return inputs
        # checked at each trace: a subclass may set `_copies` past the setter
        limit = as_bound(self.clip_value) / self._checked_copies(self._copies)

        @tf.custom_gradient
        def clip(x):
            def grad(upstream):
                norms = sample_norms(upstream)
                scale = tf.minimum(1.0, limit / tf.maximum(norms, 1e-30))
                shape = [-1] + [1] * (len(upstream.shape) - 1)
                return upstream * tf.cast(tf.reshape(scale, shape), upstream.dtype)

            return tf.identity(x), grad

        outputs = clip(inputs)
        if self._recorded is not None:
            self._recorded.append(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound):
        return input_bound

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return tf.minimum(gradient_bound, as_bound(self.clip_value))

    def get_config(self):
        return {
            **super().get_config(),
            "clip_value": self.initial_clip_value,
            "mode": self.mode,
        }
