"""Per-sample gradient bounds of a chain of DP layers (DESIGN §3).

Forward: from the `DP_BoundedInput` bound, each layer's `propagate_inputs`
bounds the next input. Backward: from `L / B` (the loss's Lipschitz constant
over the expected batch size: one sample's share of the batch gradient),
`backpropagate_inputs` walks back, and `backpropagate_params` bounds each
trainable variable. Bounds are keyed by `variable.path` (unique in Keras 3,
unlike `variable.name`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from .layers.base import DPLayer, as_bound, bound_pass
from .layers.bounded import DP_BoundedInput


def check_dp_chain(dp_layers: Sequence[keras.layers.Layer]) -> None:
    """Refuse a chain that cannot be bounded, naming the culprit.

    Raises:
        TypeError: a layer is not a DP layer.
        ValueError: the chain does not start with DP_BoundedInput.
    """
    if not dp_layers:
        raise ValueError("A DP model needs at least one layer. Received: no layers")
    for layer in dp_layers:
        if not isinstance(layer, DPLayer):
            raise TypeError(
                f"Layer '{layer.name}' ({type(layer).__name__}) is not a DP layer: its "
                "per-sample gradient cannot be bounded. Use the DP_ layers of "
                "deel_lipdp_ext.layers (or DP_GNP_Factory for a parameter-free "
                "1-Lipschitz layer)."
            )
    if not isinstance(dp_layers[0], DP_BoundedInput):
        raise ValueError(
            "A DP model must start with DP_BoundedInput, which fixes the input norm "
            f"bound. Received first layer: '{dp_layers[0].name}' "
            f"({type(dp_layers[0]).__name__})"
        )
    for layer in dp_layers[1:]:
        if isinstance(layer, DP_BoundedInput):
            raise ValueError(
                f"DP_BoundedInput '{layer.name}' must be the first layer only."
            )


def compute_gradient_bounds(
    dp_layers: Sequence[DPLayer], loss_lipschitz: float, batch_size: int
) -> dict[str, tf.Tensor]:
    """One bound per bounded trainable variable, keyed by `variable.path`.

    Args:
        dp_layers: the model's DP layers in call order (checked by `check_dp_chain`).
        loss_lipschitz: L, from `loss.get_L(num_classes)`.
        batch_size: the expected batch size B (the loss denominator).

    Returns:
        {variable.path: scalar float32 bound on ||one sample's gradient||}.
    """
    check_dp_chain(dp_layers)
    with bound_pass():  # each layer's certificate is computed once per pass
        input_bounds = []
        bound = None
        for layer in dp_layers:
            input_bounds.append(bound)
            bound = layer.propagate_inputs(bound)
        gradient_bound = as_bound(loss_lipschitz / float(batch_size))
        bounds: dict[str, tf.Tensor] = {}
        for layer, input_bound in zip(
            reversed(dp_layers), reversed(input_bounds), strict=True
        ):
            variable = layer.bounded_variable if layer.has_parameters() else None
            if variable is not None and variable.trainable:
                bounds[variable.path] = layer.backpropagate_params(
                    input_bound, gradient_bound
                )
            gradient_bound = layer.backpropagate_inputs(input_bound, gradient_bound)
    return bounds


def noise_coefficients(dp_layers: Sequence[DPLayer]) -> dict[str, float]:
    """`nm_coef` of each bounded variable, keyed by `variable.path`."""
    return {
        layer.bounded_variable.path: float(layer.nm_coef)
        for layer in dp_layers
        if layer.has_parameters() and layer.bounded_variable is not None
    }
