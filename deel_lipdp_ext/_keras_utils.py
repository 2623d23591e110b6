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
