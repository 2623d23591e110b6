"""Small Keras helpers shared by the core and the ports."""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf


def nested_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer nested in ``layer`` (its sub-models' layers too), depth first."""
    found = []
    for sub in getattr(layer, "layers", []):
        found.append(sub)
        found.extend(nested_layers(sub))
    return found


def all_sublayers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer tracked anywhere inside `layer` (custom layers' attributes
    and wrappers such as TimeDistributed included), through Keras's own walk
    (`Layer._flatten_layers`, private API of Keras 3)."""
    return layer._flatten_layers(include_self=False, recursive=True)  # noqa: SLF001


def pop_keras_objects(
    config: dict, keys: tuple[str, ...], custom_objects=None
) -> tuple[dict, list]:
    """Split a wrapper's saved config: (the config without `keys`, the Keras
    objects (models, layers) saved under them, deserialised, in order)."""
    config = dict(config)
    objects = [
        keras.saving.deserialize_keras_object(
            config.pop(key), custom_objects=custom_objects
        )
        for key in keys
    ]
    return config, objects


def tensor_float_32_possible() -> bool:
    """Whether float32 matmuls and convolutions may run in TensorFloat-32
    here (10 mantissa bits; TensorFlow enables it by default on Ampere and
    later GPUs)."""
    return bool(
        tf.config.experimental.tensor_float_32_execution_enabled()
        and tf.config.list_logical_devices("GPU")
    )


def turn_off_tensor_float_32(owner: str) -> None:
    """Turn TensorFloat-32 off for the process where it could round float32
    matmuls and convolutions (with a warning): the gradient bounds and the
    clipping margins hold for float32 rounding, not for 10-bit mantissas
    (an emulation gave clipped contributions of 1.0005 C)."""
    if not tensor_float_32_possible():
        return
    tf.config.experimental.enable_tensor_float_32_execution(False)
    warnings.warn(
        f"{owner}: TensorFloat-32 execution turned off for this process "
        "(tf.config.experimental.enable_tensor_float_32_execution(False)): its "
        "rounding of float32 matmuls and convolutions is not covered by the "
        "gradient bounds.",
        stacklevel=3,
    )
