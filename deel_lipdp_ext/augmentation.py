"""Augmentation multiplicity for clipless DP training.

Each sample's loss is the MEAN of its loss over K random augmentations of it
(De, Berrada, Hayes, Smith, Balle, "Unlocking High-Accuracy Differentially
Private Image Classification through Scale", 2022). Every augmented copy goes
through the model's `DP_BoundedInput`, so each copy's gradient obeys the
per-sample bound, and so does their mean: the sensitivity, the noise and the
epsilon are unchanged, while the gradient of each sample is averaged over K
views of it.

The augmentation runs per sample inside the train step: Keras preprocessing
layers that transform each sample independently and keep its shape, alone or
in a `keras.Sequential` (`PER_SAMPLE_LAYERS`, matched by exact type: a
subclass or a Lambda could combine samples, and no check on the outputs can
prove it does not). Layers that mix samples (MixUp, CutMix) or have weights
are refused.

With K > 1 copies, a `DP_ClipGradient` clips each copy's row to
`clip_value / K` (`set_copies_per_sample`): the K rows of one sample then sum
to at most `clip_value`, the bound it reports.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ._keras_utils import all_sublayers

#: Preprocessing layers that combine samples of a batch: one sample would
#: then influence another's loss, beyond its own bound.
_MIXING = tuple(
    getattr(keras.layers, name)
    for name in ("MixUp", "CutMix", "RandAugment", "AugMix")
    if hasattr(keras.layers, name)
)


#: Layers known to transform each sample on its own (deterministically or with
#: a random draw that does not depend on the data), and the one container
#: allowed around them.
PER_SAMPLE_LAYERS = tuple(
    getattr(keras.layers, name)
    for name in (
        "RandomTranslation",
        "RandomFlip",
        "RandomRotation",
        "RandomZoom",
        "RandomCrop",
        "RandomContrast",
        "RandomBrightness",
        "Rescaling",
        "Resizing",
        "CenterCrop",
        "InputLayer",
    )
    if hasattr(keras.layers, name)
) + (keras.Sequential,)


def check_augmentation(augmentation, multiplicity: int, input_shape) -> None:
    """Refuse an augmentation that could break the per-sample bound.

    Raises:
        TypeError: `augmentation` is not a Keras layer.
        ValueError: a layer that mixes samples or has weights, a layer that
            is not in `PER_SAMPLE_LAYERS` (exact type), a multiplicity below
            1, or an output shape different from the input's.
    """
    if (
        isinstance(multiplicity, bool)
        or not isinstance(multiplicity, int)
        or multiplicity < 1
    ):
        raise ValueError(
            "`augmentation_multiplicity` must be an int >= 1. "
            f"Received: augmentation_multiplicity={multiplicity!r}"
        )
    if augmentation is None:
        return
    if not isinstance(augmentation, keras.layers.Layer):
        raise TypeError(
            "`augmentation` must be a Keras layer (e.g. a keras.Sequential of "
            f"preprocessing layers). Received: {type(augmentation).__name__}"
        )
    probe = tf.zeros((2, *input_shape))
    output = augmentation(probe, training=True)
    if augmentation.weights:
        raise ValueError(
            "Augmentation layers must have no weights. Received: "
            f"{[w.path for w in augmentation.weights]}"
        )
    for layer in (augmentation, *all_sublayers(augmentation)):
        if isinstance(layer, _MIXING):
            raise ValueError(
                f"Augmentation layer '{layer.name}' ({type(layer).__name__}) "
                "mixes samples: one sample would change another's loss. "
                "Use per-sample augmentations."
            )
        if type(layer) not in PER_SAMPLE_LAYERS:
            raise ValueError(
                f"Augmentation layer '{layer.name}' ({type(layer).__name__}) is "
                "not a layer known to transform each sample on its own: it "
                "could combine samples, so one sample would change another's "
                "loss beyond its bound. Allowed (exact types): "
                f"{sorted(t.__name__ for t in PER_SAMPLE_LAYERS)}."
            )
    if tuple(output.shape[1:]) != tuple(input_shape):
        raise ValueError(
            "The augmentation must keep the sample shape "
            f"{tuple(input_shape)}. Received output shape: {tuple(output.shape[1:])}"
        )


def repeat_and_augment(x, augmentation, multiplicity: int):
    """(batch * K, ...): each sample K times in a row, each copy augmented."""
    copies = tf.repeat(x, multiplicity, axis=0) if multiplicity > 1 else x
    if augmentation is None:
        return copies
    return augmentation(copies, training=True)


def mean_over_copies(per_copy: tf.Tensor, multiplicity: int) -> tf.Tensor:
    """(batch,) means of the K consecutive copies' losses."""
    if multiplicity == 1:
        return per_copy
    return tf.reduce_mean(tf.reshape(per_copy, (-1, multiplicity)), axis=1)
