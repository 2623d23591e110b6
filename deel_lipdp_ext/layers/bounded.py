"""`DP_BoundedInput`: the first layer of every DP model; it fixes the input bound."""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import require_positive
from .base import DPLayer, as_bound, sample_norms

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_BoundedInput(keras.layers.Layer, DPLayer):
    """Input layer that projects each sample onto the L2 ball of `upper_bound`.

    Every DP model starts with it: the bound passes start from `upper_bound`.

    Args:
        upper_bound: maximum L2 norm of one sample (over all non-batch axes).
        enforce_clipping: if True (default), samples with a larger norm are
            scaled down onto the ball, so the bound holds for any data. If
            False, the layer trusts the data (e.g. from `data.bound_normalize`)
            and the DP model checks the norms in every train step instead
            (an error, outside XLA; under `jit_compile` it refuses False).

    Shapes: unchanged.

    Example:
        >>> layer = DP_BoundedInput(input_shape=(8, 8, 1), upper_bound=1.0)
    """

    def __init__(self, upper_bound: float, enforce_clipping: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.upper_bound = require_positive(
            "upper_bound", upper_bound, "DP_BoundedInput"
        )
        if not isinstance(enforce_clipping, bool):
            raise ValueError(
                "`enforce_clipping` of DP_BoundedInput must be a bool. "
                f"Received: enforce_clipping={enforce_clipping!r}"
            )
        self.enforce_clipping = enforce_clipping

    def call(self, inputs):
        if not self.enforce_clipping:
            return inputs
        norms = sample_norms(inputs)
        scale = tf.minimum(1.0, self.upper_bound / tf.maximum(norms, 1e-30))
        scale = tf.reshape(scale, [-1] + [1] * (len(inputs.shape) - 1))
        return inputs * tf.cast(scale, inputs.dtype)

    def check_bound(self, inputs) -> tf.Operation:
        """Raise (outside XLA) when a sample exceeds the bound (no-clipping mode)."""
        return tf.debugging.assert_less_equal(
            sample_norms(inputs),
            tf.cast(self.upper_bound * (1.0 + 1e-6), inputs.dtype),
            message=(
                f"DP_BoundedInput '{self.name}' has enforce_clipping=False but an "
                f"input sample has L2 norm above upper_bound={self.upper_bound}"
            ),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound):
        return as_bound(self.upper_bound)

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return gradient_bound

    def backpropagate_params(self, input_bound, gradient_bound):
        raise ValueError("DP_BoundedInput has no parameters to bound.")

    def get_config(self):
        return {
            **super().get_config(),
            "upper_bound": self.upper_bound,
            "enforce_clipping": self.enforce_clipping,
        }
