"""`DP_ClipGradient`: clips each sample's upstream gradient in the backward pass."""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import require_positive
from .base import DPLayer, as_bound, sample_norms

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ClipGradient(keras.layers.Layer, DPLayer):
    """Identity forward; backward, clips each sample's gradient to `clip_value / B`.

    The train step divides the summed per-sample losses by the expected batch
    size B, so a sample's gradient w.r.t. this layer's output carries a factor
    1/B. Clipping it to `clip_value / B` keeps the bound on the same scale:
    `backpropagate_inputs` returns `min(gradient_bound, clip_value / B)`.

    Args:
        clip_value: per-sample gradient norm (in units of the loss gradient,
            before the 1/B factor) to clip to.
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
        if mode not in ("fixed", "dynamic"):
            raise ValueError(
                "`mode` of DP_ClipGradient must be 'fixed' or 'dynamic'. "
                f"Received: mode={mode!r}"
            )
        self.mode = mode
        self._batch_size = None
        self._probe: list | None = None
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
        self.clip_value.assign(require_positive("clip_value", value, "DP_ClipGradient"))

    def set_expected_batch_size(self, batch_size: int) -> None:
        self._batch_size = int(batch_size)

    def _scaled_clip(self):
        if self._batch_size is None:
            raise ValueError(
                f"DP_ClipGradient '{self.name}' does not know the expected batch "
                "size: use it inside DPSequential/DPModel, which sets it."
            )
        return as_bound(self.clip_value) / float(self._batch_size)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        limit = self._scaled_clip()

        @tf.custom_gradient
        def clip(x):
            def grad(upstream):
                norms = sample_norms(upstream)
                scale = tf.minimum(1.0, limit / tf.maximum(norms, 1e-30))
                shape = [-1] + [1] * (len(upstream.shape) - 1)
                return upstream * tf.cast(tf.reshape(scale, shape), upstream.dtype)

            return tf.identity(x), grad

        outputs = clip(inputs)
        if self._probe is not None:  # eager probing by the clipping callbacks
            self._probe.append(outputs)
        return outputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound):
        return input_bound

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return tf.minimum(gradient_bound, self._scaled_clip())

    def backpropagate_params(self, input_bound, gradient_bound):
        raise ValueError("DP_ClipGradient has no parameters to bound.")

    def get_config(self):
        return {
            **super().get_config(),
            "clip_value": self.initial_clip_value,
            "mode": self.mode,
        }
