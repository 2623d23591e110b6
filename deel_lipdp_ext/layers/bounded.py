"""`DP_BoundedInput`: the first layer of every DP model; it fixes the input bound."""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import require_positive
from .base import BOUND_MARGIN, DPLayer, as_bound, float64_square_sum

_PACKAGE = "deel_lipdp_ext"
#: Largest `upper_bound`: float32 squares overflow above ~1.8e19, and the
#: layers after the input may grow activations (a residual "add" doubles
#: them), so inputs are kept 1e7 below that.
MAX_INPUT_BOUND = 1e12
#: Relative slack above `upper_bound` that the no-clipping check admits (the
#: data loaders' rescaling rounds to about 1e-7).
_TRUSTED_SLACK = 1e-6


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
        >>> layer = DP_BoundedInput(upper_bound=1.0)
        >>> float(keras.ops.norm(layer(keras.ops.ones((1, 16)))))
        0.99999...
    """

    def __init__(self, upper_bound: float, enforce_clipping: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.upper_bound = _checked_upper_bound(upper_bound, enforce_clipping)
        self.enforce_clipping = enforce_clipping

    def call(self, inputs):
        # checked at every trace too: the attributes are public
        _checked_upper_bound(self.upper_bound, self.enforce_clipping)
        if not self.enforce_clipping:
            return inputs
        peak, unit, unit_norm = _peak_unit_norms(inputs)
        # aim just inside the ball (float rounding of the projection)
        bound = tf.cast(self.upper_bound * BOUND_MARGIN, peak.dtype)
        # ||x|| / bound = (peak / bound) * ||x / peak||: no overflow to a wrong side
        inside = (peak / bound) * unit_norm <= 1.0
        on_sphere = tf.cast(unit * _per_sample(bound / unit_norm, unit), inputs.dtype)
        return tf.where(_per_sample(inside, inputs), inputs, on_sphere)

    def inputs_within_bound(self, inputs) -> tf.Tensor:
        """Boolean scalar: every sample's L2 norm is <= upper_bound (+1e-6
        relative: `_TRUSTED_SLACK`), computed without overflow."""
        peak, _, unit_norm = _peak_unit_norms(inputs)
        return tf.reduce_all(
            (peak / tf.cast(self.upper_bound, peak.dtype)) * unit_norm
            <= tf.cast(1.0 + _TRUSTED_SLACK, peak.dtype)
        )

    def check_bound(self, inputs) -> tf.Operation:
        """Raise (outside XLA) when a sample exceeds the bound (no-clipping mode)."""
        return tf.debugging.Assert(
            self.inputs_within_bound(inputs),
            [
                f"DP_BoundedInput '{self.name}' has enforce_clipping=False but an "
                f"input sample has L2 norm above upper_bound={self.upper_bound}"
            ],
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def propagate_inputs(self, input_bound):
        _checked_upper_bound(self.upper_bound, self.enforce_clipping)
        if self.enforce_clipping:
            return as_bound(self.upper_bound)
        # trusted data passes up to the check's slack, and the check's norm
        # rounds: both above upper_bound (a review found 1.000001x)
        return as_bound(self.upper_bound * (1.0 + _TRUSTED_SLACK) / BOUND_MARGIN)

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return gradient_bound

    def get_config(self):
        return {
            **super().get_config(),
            "upper_bound": self.upper_bound,
            "enforce_clipping": self.enforce_clipping,
        }


def _per_sample(values: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Per-sample `values` (batch,), shaped to broadcast against `like`."""
    return tf.reshape(values, [-1] + [1] * (len(like.shape) - 1))


def _peak_unit_norms(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Each sample as `peak * unit`, with `peak` its max |value|, so that
    `||x|| = peak * ||unit||` with `1 <= ||unit|| <= sqrt(size)`: neither
    overflows or underflows for any finite sample, unlike the sum of squares.

    Computed in float32 (float64 for float64 inputs). An all-zero sample has
    `peak = 0` and `unit` all ones, so nothing divides by 0.

    Returns:
        `peak` (batch,), `unit` (shaped like `x`) and `||unit||` (batch,).
    """
    dtype = tf.float64 if x.dtype == tf.float64 else tf.float32
    x = tf.cast(x, dtype)
    batch = tf.shape(x)[0]
    peak = tf.reduce_max(tf.abs(tf.reshape(x, (batch, -1))), axis=1)
    nonzero = peak > 0
    safe_peak = tf.where(nonzero, peak, tf.ones_like(peak))
    unit = tf.where(
        _per_sample(nonzero, x), x / _per_sample(safe_peak, x), tf.ones_like(x)
    )
    # float64 sum: in float32, 1e6 squares rounded 5e-5 low (XLA)
    unit_norm = tf.sqrt(float64_square_sum(tf.reshape(unit, (batch, -1)), axis=1))
    return peak, unit, unit_norm


def _checked_upper_bound(upper_bound, enforce_clipping) -> float:
    """`upper_bound` as a float once both arguments of DP_BoundedInput are
    valid.

    Raises:
        ValueError: a bound that is not positive and finite, or above
            MAX_INPUT_BOUND; an `enforce_clipping` that is not a bool.
    """
    bound = require_positive("upper_bound", upper_bound, "DP_BoundedInput")
    if bound > MAX_INPUT_BOUND:
        raise ValueError(
            f"`upper_bound` of DP_BoundedInput must be <= {MAX_INPUT_BOUND:g}: "
            "the squares of larger activations overflow float32 (an L2 "
            "pooling then outputs inf for one sample and the update shows "
            f"it). Rescale the data. Received: upper_bound={upper_bound!r}"
        )
    if not isinstance(enforce_clipping, bool):
        raise ValueError(
            "`enforce_clipping` of DP_BoundedInput must be a bool. "
            f"Received: enforce_clipping={enforce_clipping!r}"
        )
    return bound
