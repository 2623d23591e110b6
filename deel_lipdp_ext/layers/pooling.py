"""L2-norm poolings: each output is the L2 norm of one non-overlapping window.

With disjoint windows the output norm equals the input norm and the map is
1-Lipschitz (| ||a|| - ||b|| | <= ||a - b|| per window), so they are GNP.
The window norm has gradient x/||x||, set to 0 at x = 0 (no NaN) and where
the sum of squares is too small to be trusted (`_window_norms`). The
"Scaled" in the names follows deel-lip (avg-pool of squares scaled by the
window area); here the sum is computed exactly, zero padding included.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from .._validation import require_one_of, require_positive_ints
from .base import GNPLayer

_PACKAGE = "deel_lipdp_ext"


#: Below `area * 2^-102`, a window's sum of squares may have lost a large
#: part of itself to squares flushed to zero (each below 2^-126); above it,
#: at most 2^-24 of it.
_TRUSTED_SUM = 2.0**-102


def _window_norms(sums: tf.Tensor, area) -> tf.Tensor:
    """sqrt of each window's sum of squares, with gradient x / ||x|| (0 at
    0). TensorFlow's CPU kernels flush subnormal squares to zero: a window
    of entries near 1e-19 and one slightly larger got the norm of that one
    entry, and x / sqrt(sum) a norm up to sqrt(area) (a review: a bias
    before a global pooling got 11x its bound). Where the sum is below
    `area * _TRUSTED_SUM` the gradient is stopped (0: a contraction) and
    the value, at most the true norm, is kept. Sums in float64 (large
    windows: `_for_sums`) do not flush float32 squares."""
    positive = sums > 0
    norms = tf.where(positive, tf.sqrt(tf.where(positive, sums, 1.0)), 0.0)
    if sums.dtype == tf.float64:  # squares of float32 values never flush there
        return norms
    trusted = sums >= area * _TRUSTED_SUM
    return tf.where(trusted, norms, tf.stop_gradient(norms))


#: Windows of more entries sum their squares in float64: a float32 sum of n
#: squares can round up to (n - 1) 2^-24 low, and x / sqrt(sum) then
#: exceeds norm 1 (a review: 1.00003 for 32x32 windows, 1.03 for 1024x1024);
#: up to 64 entries that is below the noise's `ROUNDING_MARGIN`.
_FLOAT32_SUM_AREA = 64


def _for_sums(inputs: tf.Tensor, area: int | None) -> tf.Tensor:
    """`inputs` in the dtype their windows of `area` entries (None: unknown)
    are summed in."""
    if area is not None and area <= _FLOAT32_SUM_AREA:
        return inputs
    return tf.cast(inputs, tf.float64)


class _L2NormPooling(keras.layers.Layer, GNPLayer):
    rank = 2

    def __init__(self, pool_size=2, strides=None, padding: str = "valid", **kwargs):
        super().__init__(**kwargs)
        layer = type(self).__name__
        self.pool_size = require_positive_ints("pool_size", pool_size, self.rank, layer)
        if strides is not None and require_positive_ints(
            "strides", strides, self.rank, layer
        ) != (self.pool_size):
            raise ValueError(
                f"{layer} needs strides == pool_size (non-overlapping windows). "
                f"Received: pool_size={pool_size!r}, strides={strides!r}"
            )
        self.padding = require_one_of("padding", padding, ("valid", "same"), layer)

    def _pad(self, x):
        if self.padding == "valid":
            return x
        pads = [[0, 0]]
        for axis, p in enumerate(self.pool_size, start=1):
            size = tf.shape(x)[axis]
            pads.append([0, (-size) % p])
        pads.append([0, 0])
        return tf.pad(x, pads)

    def call(self, inputs):
        area = math.prod(self.pool_size)
        values = _for_sums(inputs, area)
        squares = self._pad(tf.square(values))
        sums = tf.nn.avg_pool(
            squares, self.pool_size, self.pool_size, padding="VALID"
        ) * float(area)
        return tf.cast(_window_norms(sums, area), inputs.dtype)

    def compute_output_shape(self, input_shape):
        out = [input_shape[0]]
        for dim, p in zip(input_shape[1:-1], self.pool_size, strict=True):
            if dim is None:
                out.append(None)
            else:
                out.append(-(-dim // p) if self.padding == "same" else dim // p)
        return (*out, input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "padding": self.padding,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ScaledL2NormPooling2D(_L2NormPooling):
    """L2 norm of each non-overlapping (ph, pw) window, per channel.

    Args:
        pool_size: int or (ph, pw); strides, if given, must equal it.
        padding: "valid" (drop the remainder) or "same" (zero-pad to a multiple).

    Shapes: (batch, H, W, C) -> (batch, H/ph, W/pw, C).
    """

    rank = 2


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ScaledL2NormPooling1D(_L2NormPooling):
    """L2 norm of each non-overlapping window of a sequence, per channel.

    Shapes: (batch, T, C) -> (batch, T/p, C).
    """

    rank = 1


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ScaledGlobalL2NormPooling2D(keras.layers.Layer, GNPLayer):
    """L2 norm over all spatial positions, per channel: (batch, H, W, C) -> (batch, C).

    Norm preserving and 1-Lipschitz.
    """

    def call(self, inputs):
        size = None if None in inputs.shape[1:3] else math.prod(inputs.shape[1:3])
        values = _for_sums(inputs, size)
        area = tf.cast(tf.reduce_prod(tf.shape(inputs)[1:3]), values.dtype)
        sums = tf.reduce_sum(tf.square(values), axis=[1, 2])
        return tf.cast(_window_norms(sums, area), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])
