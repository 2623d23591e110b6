"""Gradient-norm-preserving (GNP) layers: parameter-free, 1-Lipschitz and
||f(x)|| <= ||x||.

`DP_GNP_Factory(layer_cls)` turns a Keras layer class with those properties
into a DP layer that leaves the bounds unchanged. The caller certifies the
properties; the layers defined here have them by construction, and their
constructors refuse arguments that would break them.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import require_positive
from .base import DPLayer, GNPLayer, as_bound

_PACKAGE = "deel_lipdp_ext"


def DP_GNP_Factory(layer_cls: type, name: str | None = None) -> type:
    """Wrap a parameter-free Keras layer class that is 1-Lipschitz and maps 0 to 0.

    Such a layer keeps ||f(x)|| <= ||x|| and ||J^T g|| <= ||g||, so both bound
    passes go through it unchanged. Building a layer with trainable weights
    raises.

    Args:
        layer_cls: a `keras.layers.Layer` subclass with those properties.
        name: class name to register under (default "DP_" + layer_cls name).

    Returns:
        A registered, serialisable subclass of `layer_cls`.
    """
    cls_name = name or f"DP_{layer_cls.__name__}"

    def build(self, input_shape):
        layer_cls.build(self, input_shape)
        if self.trainable_weights:
            raise ValueError(
                f"{cls_name} '{self.name}' wraps a layer with trainable weights "
                f"({[v.path for v in self.trainable_weights]}); a GNP layer must "
                "be parameter-free."
            )

    cls = type(
        cls_name,
        (layer_cls, GNPLayer),
        {
            "build": build,
            "__doc__": (
                f"`{layer_cls.__name__}` as a DP layer (GNP: bounds pass through "
                "unchanged)."
            ),
        },
    )
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package=_PACKAGE)(cls)


DP_Flatten = DP_GNP_Factory(keras.layers.Flatten)
DP_Reshape = DP_GNP_Factory(keras.layers.Reshape)
DP_Permute = DP_GNP_Factory(keras.layers.Permute)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_InputLayer(keras.layers.InputLayer, GNPLayer):
    """`keras.layers.InputLayer` usable as the first entry of a DP model."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ReLU(keras.layers.ReLU, GNPLayer):
    """ReLU (or leaky ReLU with `0 <= negative_slope <= 1`), 1-Lipschitz.

    `threshold` must be 0 (a positive threshold makes ReLU discontinuous) and
    `max_value` may be set (clipping is 1-Lipschitz and keeps 0 at 0).
    """

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs):
        if threshold != 0.0:
            raise ValueError(
                "DP_ReLU needs threshold=0 to be Lipschitz. "
                f"Received: threshold={threshold!r}"
            )
        if not 0.0 <= float(negative_slope) <= 1.0:
            raise ValueError(
                "DP_ReLU needs 0 <= negative_slope <= 1 to be 1-Lipschitz. "
                f"Received: negative_slope={negative_slope!r}"
            )
        super().__init__(max_value=max_value, negative_slope=negative_slope, **kwargs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MaxPool2D(keras.layers.MaxPooling2D, GNPLayer):
    """Max pooling with non-overlapping windows (`strides == pool_size`, enforced).

    Each input lies in one window, and max is 1-Lipschitz per window, so the
    layer is GNP.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", **kwargs):
        pool = (
            (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        )
        stride = (
            pool
            if strides is None
            else ((strides, strides) if isinstance(strides, int) else tuple(strides))
        )
        if stride != pool:
            raise ValueError(
                "DP_MaxPool2D needs strides == pool_size (non-overlapping windows). "
                f"Received: pool_size={pool_size!r}, strides={strides!r}"
            )
        super().__init__(pool_size=pool, strides=pool, padding=padding, **kwargs)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_GroupSort(keras.layers.Layer, GNPLayer):
    """Sorts the last axis in groups of `n` (GroupSort activation).

    A permutation of its input within each group: norm preserving and
    1-Lipschitz. `n=2` ("MaxMin") uses min/max instead of a sort.

    Args:
        n: group size; must divide the size of the last axis.

    Reference: Anil, Lucas, Grosse, "Sorting out Lipschitz function
    approximation", ICML 2019.
    """

    def __init__(self, n: int = 2, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(
                f"`n` of DP_GroupSort must be an int >= 1. Received: n={n!r}"
            )
        self.n = n

    def build(self, input_shape):
        if input_shape[-1] is None or input_shape[-1] % self.n:
            raise ValueError(
                f"DP_GroupSort '{self.name}': group size n={self.n} must divide the "
                f"last axis. Received input shape: {input_shape}"
            )

    def call(self, inputs):
        if self.n == 1:
            return inputs
        shape = tf.shape(inputs)
        grouped = tf.reshape(inputs, tf.concat([shape[:-1], [-1, self.n]], 0))
        if self.n == 2:
            a, b = grouped[..., 0:1], grouped[..., 1:2]
            out = tf.concat([tf.minimum(a, b), tf.maximum(a, b)], axis=-1)
        else:
            out = tf.sort(grouped, axis=-1)
        return tf.reshape(out, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "n": self.n}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_LayerCentering(keras.layers.Layer, GNPLayer):
    """Subtracts the mean over the spatial axes, per channel.

    For (batch, H, W, C) the mean is over H and W; for (batch, F) over F.
    Centering is an orthogonal projection: norm non-increasing, 1-Lipschitz.
    """

    def call(self, inputs):
        axes = list(range(1, len(inputs.shape) - 1)) or [1]
        return inputs - tf.reduce_mean(inputs, axis=axes, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_Lambda(keras.layers.Lambda, DPLayer):
    """A user function with a Lipschitz constant the USER certifies.

    Bounds: `||f(x)|| <= lipschitz * ||x||` (so f must map 0 to 0) and
    `||J^T g|| <= lipschitz * ||g||`. The function must not have parameters.
    Saving a lambda needs `safe_mode=False` on load (Keras rule).

    Args:
        function: the function, applied per sample (no mixing across the batch).
        lipschitz: its L2 Lipschitz constant.
    """

    def __init__(self, function, lipschitz: float = 1.0, **kwargs):
        super().__init__(function, **kwargs)
        self.lipschitz = require_positive("lipschitz", lipschitz, "DP_Lambda")

    def propagate_inputs(self, input_bound):
        return as_bound(self.lipschitz) * input_bound

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return as_bound(self.lipschitz) * gradient_bound

    def get_config(self):
        return {**super().get_config(), "lipschitz": self.lipschitz}
