"""Residual blocks for DP chains: split -> wrapped layers on one branch -> merge.

Residual values travel as a pair (main, skip) and so do their bounds:
the forward pass bounds each branch, and the backward pass adds the two
branch gradients where the split happened (||g1 + g2|| <= g1 + g2).
"""

from __future__ import annotations

import keras

from .._validation import require_one_of
from .base import DPLayer

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_SplitResidual(keras.layers.Layer, DPLayer):
    """x -> (x, x): opens a residual block."""

    def call(self, inputs):
        return (inputs, inputs)

    def compute_output_shape(self, input_shape):
        return (input_shape, input_shape)

    def propagate_inputs(self, input_bound):
        return (input_bound, input_bound)

    def backpropagate_inputs(self, input_bound, gradient_bound):
        return gradient_bound[0] + gradient_bound[1]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_WrappedResidual(keras.layers.Layer, DPLayer):
    """(main, skip) -> (layer(main), skip): applies a DP layer on the main branch.

    Args:
        layer: the DP layer to apply.
    """

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(layer, DPLayer):
            raise TypeError(
                "DP_WrappedResidual wraps DP layers only. "
                f"Received: layer={type(layer).__name__} '{getattr(layer, 'name', '')}'"
            )
        self.layer = layer

    @property
    def nm_coef(self) -> float:
        """The wrapped layer's noise share: its variable is the one noised (a
        copy set on the wrapper was silently ignored)."""
        return self.layer.nm_coef

    @nm_coef.setter
    def nm_coef(self, value: float) -> None:
        self.layer.nm_coef = value

    def build(self, input_shape):
        if not self.layer.built:  # a deserialised inner layer arrives built
            self.layer.build(input_shape[0])

    def call(self, inputs, training=None):
        main, skip = inputs
        return (self.layer(main, training=training), skip)

    def compute_output_shape(self, input_shape):
        return (self.layer.compute_output_shape(input_shape[0]), input_shape[1])

    def propagate_inputs(self, input_bound):
        return (self.layer.propagate_inputs(input_bound[0]), input_bound[1])

    def backpropagate_inputs(self, input_bound, gradient_bound):
        main = self.layer.backpropagate_inputs(input_bound[0], gradient_bound[0])
        return (main, gradient_bound[1])

    def backpropagate_params(self, input_bound, gradient_bound):
        return self.layer.backpropagate_params(input_bound[0], gradient_bound[0])

    def has_parameters(self) -> bool:
        return self.layer.has_parameters()

    @property
    def bounded_variable(self):
        return self.layer.bounded_variable

    def project(self) -> None:
        self.layer.project()

    def sublayers(self) -> list:
        return [self.layer]

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.saving.deserialize_keras_object(config["layer"])
        return cls(**config)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MergeResidual(keras.layers.Layer, DPLayer):
    """(main, skip) -> main + skip ("add") or (main + skip) / 2 ("1-lip-add").

    "add" has Lipschitz constant 2 in the pair; "1-lip-add" is 1-Lipschitz.

    Args:
        merge_policy: "add" or "1-lip-add".
    """

    def __init__(self, merge_policy: str = "1-lip-add", **kwargs):
        super().__init__(**kwargs)
        self.merge_policy = require_one_of(
            "merge_policy", merge_policy, ("add", "1-lip-add"), "DP_MergeResidual"
        )
        self._factor = 1.0 if merge_policy == "add" else 0.5

    def call(self, inputs):
        main, skip = inputs
        return (main + skip) * self._factor

    def compute_output_shape(self, input_shape):
        if tuple(input_shape[0]) != tuple(input_shape[1]):
            raise ValueError(
                f"DP_MergeResidual '{self.name}': branches must have the same shape. "
                f"Received: {input_shape[0]} and {input_shape[1]}"
            )
        return input_shape[0]

    def propagate_inputs(self, input_bound):
        return (input_bound[0] + input_bound[1]) * self._factor

    def backpropagate_inputs(self, input_bound, gradient_bound):
        g = gradient_bound * self._factor
        return (g, g)

    def get_config(self):
        return {**super().get_config(), "merge_policy": self.merge_policy}


def make_residuals(merge_policy: str, wrapped_layers: list) -> list:
    """The layers of one residual block: split, each layer wrapped, merge.

    Args:
        merge_policy: "add" or "1-lip-add" (see `DP_MergeResidual`).
        wrapped_layers: DP layers applied in order on the main branch; the
            skip branch is the identity.

    Returns:
        A list of layers to splice into a DPSequential.
    """
    return [
        DP_SplitResidual(),
        *[DP_WrappedResidual(layer) for layer in wrapped_layers],
        DP_MergeResidual(merge_policy),
    ]
