"""Per-sample gradient bounds of a chain of DP layers (docs/design.md, "The
bound contract").

Forward: from the `DP_BoundedInput` bound, each layer's `propagate_inputs`
bounds the next input. Backward: from L (the loss's Lipschitz constant: the
bound on one sample's loss gradient w.r.t. the logits), `backpropagate_inputs`
walks back, and `backpropagate_params` bounds each trainable variable. The
train step differentiates the SUM of the per-sample losses, so these are the
bounds of one sample's contribution to that sum: the sensitivity of the
summed gradient to adding or removing the sample. Bounds are keyed by
`variable.path` (unique in a checked chain).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf

from ._validation import unproven_change
from .layers.base import DPLayer, GNPLayer, as_bound, bound_pass
from .layers.bounded import DP_BoundedInput
from .layers.residual import DP_MergeResidual, DP_SplitResidual, DP_WrappedResidual


def walk_layers(layers: Sequence, depth: int = 0) -> Iterator[tuple[object, int]]:
    """Every layer of the chain and, depth first, the DP layers it wraps."""
    for layer in layers:
        yield layer, depth
        if isinstance(layer, DPLayer):
            yield from walk_layers(layer.sublayers(), depth + 1)


def check_dp_chain(dp_layers: Sequence[keras.layers.Layer]) -> None:
    """Refuse a chain that cannot be bounded, naming every culprit at once.

    Raises:
        TypeError: a layer (or a wrapped layer) is not a DP layer.
        ValueError: the chain is empty or does not start with DP_BoundedInput;
            a DP_BoundedInput anywhere else (inside wrappers too: only the
            first one's input norm is checked); a class derived from a DP
            layer of the package that changes its code unproven
            (`unproven_change`); a layer used twice, or a variable shared by
            two layers (each use would add a gradient the
            one bound does not cover); two variables with one path.
    """
    if not dp_layers:
        raise ValueError("A DP model needs at least one layer. Received: no layers")
    not_dp = [
        f"'{layer.name}' ({type(layer).__name__})"
        for layer, _ in walk_layers(dp_layers)
        if not isinstance(layer, DPLayer)
    ]
    if not_dp:
        raise TypeError(
            f"Layer(s) {', '.join(not_dp)} are not DP layers: their per-sample "
            "gradients cannot be bounded. Use the DP_ layers of "
            "deel_lipdp_ext.layers (or DP_GNP_Factory for a parameter-free "
            "1-Lipschitz layer)."
        )
    problems = []
    if not isinstance(dp_layers[0], DP_BoundedInput):
        problems.append(
            "a DP model must start with DP_BoundedInput, which fixes the input norm "
            f"bound; received first layer '{dp_layers[0].name}' "
            f"({type(dp_layers[0]).__name__})"
        )
    problems += residual_pair_problems(dp_layers)
    seen_layers: dict[int, str] = {}
    owner_of: dict[int, str] = {}
    paths: dict[str, str] = {}
    for position, (layer, depth) in enumerate(walk_layers(dp_layers)):
        problem = unproven_change(layer, (DPLayer, GNPLayer))
        if problem is not None:
            problems.append(f"layer '{layer.name}' ({type(layer).__name__}) {problem}")
        if isinstance(layer, DP_BoundedInput) and (position > 0 or depth > 0):
            problems.append(
                f"DP_BoundedInput '{layer.name}' must be the first layer only "
                "(its input-norm bound is checked only there)"
            )
        if id(layer) in seen_layers:
            problems.append(
                f"layer '{layer.name}' is used twice: the bound of one use does "
                "not cover the gradient of both"
            )
            continue
        seen_layers[id(layer)] = layer.name
        for variable in layer.trainable_variables if depth == 0 else ():
            if id(variable) in owner_of and owner_of[id(variable)] != layer.name:
                problems.append(
                    f"variable '{variable.path}' is shared by layers "
                    f"'{owner_of[id(variable)]}' and '{layer.name}'"
                )
            owner_of[id(variable)] = layer.name
            if paths.get(variable.path, layer.name) != layer.name:
                problems.append(
                    f"two variables have the path '{variable.path}' (layers "
                    f"'{paths[variable.path]}' and '{layer.name}'): rename a layer"
                )
            paths[variable.path] = layer.name
    if problems:
        raise ValueError("Invalid DP chain: " + "; ".join(dict.fromkeys(problems)))


#: Largest accepted bound on an activation's norm: float32 squares overflow
#: above ~1.8e19 (an L2 pooling window then sums to inf for one sample, and
#: the update shows that sample: a review, behind a DP_Lambda of gain 1e8).
MAX_ACTIVATION_BOUND = 1e18


def residual_pair_problems(dp_layers: Sequence[keras.layers.Layer]) -> list[str]:
    """Between a DP_SplitResidual and its DP_MergeResidual the chain carries a
    (main, skip) pair, which only DP_WrappedResidual takes (other layers
    failed on the tuple with errors that did not say why)."""
    problems, split = [], None
    for layer in dp_layers:
        if isinstance(layer, DP_SplitResidual):
            if split is not None:
                problems.append(
                    f"DP_SplitResidual '{layer.name}' inside the residual block of "
                    f"'{split.name}' (merge that block first)"
                )
            split = layer
        elif isinstance(layer, DP_MergeResidual):
            if split is None:
                problems.append(
                    f"DP_MergeResidual '{layer.name}' has no DP_SplitResidual before it"
                )
            split = None
        elif split is not None and not isinstance(layer, DP_WrappedResidual):
            problems.append(
                f"layer '{layer.name}' ({type(layer).__name__}) is applied to the "
                f"(main, skip) pair of the residual block of '{split.name}': wrap it "
                "in DP_WrappedResidual (layers.make_residuals does)"
            )
    if split is not None:
        problems.append(f"DP_SplitResidual '{split.name}' is never merged")
    return problems


def compute_gradient_bounds(
    dp_layers: Sequence[DPLayer], loss_lipschitz: float
) -> dict[str, tf.Tensor]:
    """`gradient_bounds_and_peak` without the peak."""
    return gradient_bounds_and_peak(dp_layers, loss_lipschitz)[0]


def gradient_bounds_and_peak(
    dp_layers: Sequence[DPLayer], loss_lipschitz: float
) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """One bound per bounded trainable variable, keyed by `variable.path`.

    Args:
        dp_layers: the model's DP layers in call order, checked by
            `check_dp_chain` (the DP models check once per traced step).
        loss_lipschitz: L, from `loss.get_L(num_classes)`.

    Returns:
        {variable.path: scalar float32 bound on the norm of one sample's
        gradient of its own loss}, and the largest bound on the norm of any
        layer's input or output (compared with `MAX_ACTIVATION_BOUND`).
    """
    with bound_pass():  # each layer's certificate is computed once per pass
        input_bounds = []
        bound, peak = None, as_bound(0.0)
        for layer in dp_layers:
            input_bounds.append(bound)
            bound = layer.propagate_inputs(bound)
            for part in tf.nest.flatten(bound):
                peak = tf.maximum(peak, tf.cast(part, tf.float32))
        gradient_bound = as_bound(loss_lipschitz)
        bounds: dict[str, tf.Tensor] = {}
        for layer, input_bound in zip(
            reversed(dp_layers), reversed(input_bounds), strict=True
        ):
            variable = layer.bounded_variable if layer.has_parameters() else None
            if variable is not None and variable.trainable:
                bounds[variable.path] = _checked_bound(
                    layer.backpropagate_params(input_bound, gradient_bound), layer
                )
            gradient_bound = layer.backpropagate_inputs(input_bound, gradient_bound)
    return bounds, peak


def _checked_bound(bound, layer) -> tf.Tensor:
    """A layer's parameter bound as a scalar float32 tensor; a ValueError
    naming the layer for another shape or a negative or non-finite number (a
    review: a (2,) bound failed inside tf.stack without a name)."""
    value = tf.convert_to_tensor(bound, tf.float32)
    static = tf.get_static_value(value)
    if value.shape.rank != 0 or (
        static is not None and not (math.isfinite(static) and static >= 0)
    ):
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) returned a parameter "
            "bound that is not a finite number >= 0 of shape (): "
            f"{value.shape} {static if static is not None else ''}"
        )
    return value


def noise_coefficients(dp_layers: Sequence[DPLayer]) -> dict[str, float]:
    """`nm_coef` of each bounded variable, keyed by `variable.path`."""
    return {
        layer.bounded_variable.path: float(layer.nm_coef)
        for layer in dp_layers
        if layer.has_parameters() and layer.bounded_variable is not None
    }
