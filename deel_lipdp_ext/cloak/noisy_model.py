"""``NoisyModel``: a base model behind a noise layer, ``base_model(noise_layer(x))``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from .._keras_utils import pop_keras_objects
from .noise_layers import NoiseLayer

_PACKAGE = "deel_lipdp_ext"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NoisyModel(keras.Model):
    """A Keras model running a base model on its noise layer's transform of the input.

    Train the noise layer with ``compile``/``fit`` and a cloak loss from
    ``deel_lipdp_ext.cloak``; freeze the base model (``base_model.trainable =
    False``) to train the transform alone.

    Args:
        base_model: any Keras model or layer taking the transformed input.
        noise_layer: a ``NoiseLayer`` (e.g. ``CloakNoiseLayer``).

    Inside ``distillation_context()``, a call on a batch ``x`` of size B runs
    the super-batch ``concat([x, x])`` of size 2B: the noise layer transforms
    only the second half, the base model runs once, and the output has 2B
    rows: clean (teacher) outputs first, noisy (student) outputs second.

    Departure from Stained Glass: the output is the base model's output tensor
    itself (no wrapper object with ``.base_model_output``), so that Keras
    losses, metrics and ``fit`` work unchanged.

    Example:
        >>> from deel_lipdp_ext.cloak import CloakNoiseLayer
        >>> classifier = keras.Sequential(
        ...     [keras.Input((64,)), keras.layers.Dense(10)])
        >>> noisy = NoisyModel(classifier, CloakNoiseLayer(scale=(1e-3, 1.0)))
        >>> noisy.compile("adam", loss=keras.losses.CategoricalCrossentropy())
    """

    def __init__(
        self, base_model: keras.layers.Layer, noise_layer: NoiseLayer, **kwargs
    ):
        super().__init__(**kwargs)
        if not isinstance(noise_layer, NoiseLayer):
            raise TypeError(
                "`noise_layer` of NoisyModel must be a NoiseLayer. "
                f"Received: {type(noise_layer).__name__}"
            )
        if not isinstance(base_model, keras.layers.Layer):
            raise TypeError(
                "`base_model` of NoisyModel must be a Keras model or layer. "
                f"Received: {type(base_model).__name__}"
            )
        self.base_model = base_model
        self.noise_layer = noise_layer
        self._distilling = False

    @property
    def distilling(self) -> bool:
        """Whether calls run the clean/noisy super-batch."""
        return self._distilling

    @contextlib.contextmanager
    def distillation_context(self) -> Iterator[NoisyModel]:
        """Within the context, calls run the clean/noisy super-batch (see class doc)."""
        previous = self._distilling
        self._set_distilling(True)
        try:
            yield self
        finally:
            self._set_distilling(previous)

    def _set_distilling(self, value: bool) -> None:
        self._distilling = value
        # The traced train/test/predict functions bake the mode in: retrace.
        self.train_function = None
        self.test_function = None
        self.predict_function = None

    def build(self, input_shape):
        if not self.noise_layer.built:
            self.noise_layer.build(input_shape)
        if not self.base_model.built:
            self.base_model.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        if not self._distilling:
            return self.base_model(self.noise_layer(inputs), training=training)
        batch = tf.shape(inputs)[0]
        super_batch = tf.concat([inputs, inputs], axis=0)
        noisy_rows = tf.range(2 * batch) >= batch
        noise_mask = tf.reshape(noisy_rows, [-1] + [1] * (inputs.shape.rank - 1))
        transformed = self.noise_layer(super_batch, noise_mask=noise_mask)
        self.noise_layer.last_capture.super_batched = True
        return self.base_model(transformed, training=training)

    def compute_output_shape(self, input_shape):
        return self.base_model.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_model": keras.saving.serialize_keras_object(self.base_model),
                "noise_layer": keras.saving.serialize_keras_object(self.noise_layer),
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config, (base_model, noise_layer) = pop_keras_objects(
            config, ("base_model", "noise_layer"), custom_objects
        )
        return cls(base_model, noise_layer, **config)
