"""`DP_AddBias`: a bias whose whole-vector L2 norm is kept below `norm_max`."""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import require_positive
from .base import DPLayer, stable_norm

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_AddBias(keras.layers.Layer, DPLayer):
    """Adds a bias (last axis) projected onto the L2 ball of `norm_max` after each step.

    Bounds: one sample's bias gradient is the upstream gradient summed over
    the non-channel axes, so its norm is at most `sqrt(P) * ||g||` where P is
    the number of positions sharing the bias (1 after a dense layer, H*W
    after a convolution). Forward, `||x + b|| <= ||x|| + sqrt(P) * ||b||`, with
    `||b||` read from the current weights (certified, not assumed).

    Args:
        norm_max: maximum L2 norm of the whole bias vector.
        nm_coef: share of noise under the per-layer strategy.

    Shapes: unchanged; the bias has shape (channels,).

    Example:
        >>> layer = DP_AddBias(norm_max=1.0)
    """

    def __init__(self, norm_max: float, nm_coef: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.norm_max = require_positive("norm_max", norm_max, "DP_AddBias")
        self.nm_coef = require_positive("nm_coef", nm_coef, "DP_AddBias")

    @property
    def positions(self) -> int:
        """P, the positions sharing the bias: set by `build` from the input
        shape, never by hand (a P set to 1 after build left the bias-gradient
        bound 8 times too small, a review)."""
        return self._positions

    def build(self, input_shape):
        positions = 1
        for dim in input_shape[1:-1]:
            if dim is None:
                raise ValueError(
                    f"DP_AddBias '{self.name}' needs static non-channel dimensions "
                    f"to bound its gradient. Received input shape: {input_shape}"
                )
            positions *= int(dim)
        self._positions = positions
        self.bias = self.add_weight(
            name="bias", shape=(input_shape[-1],), initializer="zeros"
        )

    def call(self, inputs):
        return inputs + self.bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def _sqrt_positions(self) -> float:
        return float(self.positions) ** 0.5

    def propagate_inputs(self, input_bound):
        # stable_norm: a plain norm flushed a bias of entries ~1e-19 to 0, and
        # the next kernel's bound ignored it (7e5 times too small, a review)
        norm = tf.reshape(stable_norm(tf.convert_to_tensor(self.bias), axis=0), [])
        return input_bound + self._sqrt_positions() * norm

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return gradient_bound

    def backpropagate_params(self, input_bound, gradient_bound):
        return self._sqrt_positions() * gradient_bound

    def has_parameters(self) -> bool:
        return True

    @property
    def bounded_variable(self):
        return self.bias

    def project(self) -> None:
        norm = tf.reshape(stable_norm(tf.convert_to_tensor(self.bias), axis=0), [])
        self.bias.assign(
            self.bias * tf.minimum(1.0, self.norm_max / tf.maximum(norm, 1e-30))
        )

    def get_config(self):
        return {
            **super().get_config(),
            "norm_max": self.norm_max,
            "nm_coef": self.nm_coef,
        }
