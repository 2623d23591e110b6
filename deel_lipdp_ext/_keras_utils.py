"""Small Keras helpers shared by the core and the ports."""

from __future__ import annotations

import keras


def nested_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer nested in ``layer`` (its sub-models' layers too), depth first."""
    found = []
    for sub in getattr(layer, "layers", []):
        found.append(sub)
        found.extend(nested_layers(sub))
    return found


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
