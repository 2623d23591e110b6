"""Input, metric and penalty checks of the MAD competition, and ``penalize_range``.

Reference: plenoptic ``plenoptic.tools.validate`` and ``penalize_range``,
ported to TensorFlow (channels-last images). The device checks have no
TensorFlow counterpart and are left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import tensorflow as tf

_FLOAT_DTYPES = (tf.float16, tf.float32, tf.float64, tf.complex64, tf.complex128)


def penalize_range(img, allowed_range: Sequence[float] = (0.0, 1.0)) -> tf.Tensor:
    """``sum(min(img - lo, 0)**2) + sum(max(img - hi, 0)**2)`` over all elements."""
    img = tf.convert_to_tensor(img)
    low, high = allowed_range
    below = tf.minimum(img - low, 0.0)
    above = tf.maximum(img - high, 0.0)
    return tf.reduce_sum(below**2) + tf.reduce_sum(above**2)


def validate_input(image) -> None:
    """TypeError for a non-float dtype; UserWarning if not 4-D or outside [0, 1]."""
    image = tf.convert_to_tensor(image)
    if image.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "Only float or complex dtypes are allowed. "
            f"Received: dtype={image.dtype.name}"
        )
    if image.shape.rank != 4:
        warnings.warn(
            "Input is not 4-D (batch, height, width, channels): "
            f"shape {tuple(image.shape)}",
            UserWarning,
            stacklevel=3,
        )
    if not image.dtype.is_complex and (
        float(tf.reduce_min(image)) < 0 or float(tf.reduce_max(image)) > 1
    ):
        warnings.warn(
            "Input image has values outside [0, 1].", UserWarning, stacklevel=3
        )


def validate_metric(metric: Callable, image_shape, image_dtype=tf.float32) -> None:
    """A metric takes two images, returns one number, is 0 on identical images
    (at most 5e-7) and never negative on 20 random pairs."""
    test = tf.random.uniform(image_shape, dtype=tf.float32)
    test = tf.cast(test, image_dtype)
    try:
        same = metric(test, test)
    except TypeError as error:
        raise TypeError("metric should be callable and accept two tensors") from error
    same = tf.convert_to_tensor(same)
    if same.shape.num_elements() != 1:
        raise ValueError(
            "metric should return a scalar value but output had shape "
            f"{tuple(same.shape)}"
        )
    if float(tf.reshape(same, ())) > 5e-7:
        raise ValueError(
            "metric should return <= 5e-7 on two identical images but got "
            f"{float(tf.reshape(same, ()))}"
        )
    for _ in range(20):
        a = tf.cast(tf.random.uniform(image_shape), image_dtype)
        b = tf.cast(tf.random.uniform(image_shape), image_dtype)
        value = float(tf.reshape(tf.convert_to_tensor(metric(a, b)), ()))
        if value < 0:
            raise ValueError(
                f"metric should always return non-negative numbers: {value}"
            )


def validate_penalty(penalty: Callable, image_shape, image_dtype=tf.float32) -> None:
    """A penalty maps an image to one differentiable float of the image's dtype,
    with no learnable parameters of its own."""
    if not callable(penalty):
        raise TypeError(f"penalty_function must be callable. Received: {penalty!r}")
    test = tf.ones(image_shape, image_dtype)
    columns = tf.range(image_shape[2]) % 2 == 0 if len(image_shape) == 4 else None
    if columns is not None:
        test = tf.where(tf.reshape(columns, (1, 1, -1, 1)), test, tf.zeros_like(test))
    with tf.GradientTape(watch_accessed_variables=True) as tape:
        unwatched = penalty(test)
    if tape.watched_variables():
        raise ValueError(
            "penalty_function output depends on variables other than its input: it "
            "must not have learnable parameters."
        )
    if not isinstance(unwatched, tf.Tensor | tf.Variable):
        raise ValueError(
            "penalty_function must return a tensor. "
            f"Received: {type(unwatched).__name__}"
        )
    if unwatched.shape.num_elements() != 1:
        raise ValueError(
            "penalty_function must return a single number. Received: shape "
            f"{tuple(unwatched.shape)}"
        )
    if not unwatched.dtype.is_floating:
        raise TypeError(
            f"penalty_function must return a float. Received: {unwatched.dtype.name}"
        )
    real = image_dtype.real_dtype if image_dtype.is_complex else image_dtype
    if unwatched.dtype != real:
        raise TypeError(
            f"penalty_function must return dtype {real.name}. "
            f"Received: {unwatched.dtype.name}"
        )
    with tf.GradientTape() as tape:
        tape.watch(test)
        out = penalty(test)
    if tape.gradient(out, test) is None:
        raise ValueError("penalty_function output is not differentiable in its input.")
