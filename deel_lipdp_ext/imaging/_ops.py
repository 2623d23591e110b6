"""Small image operations shared by the metrics, the cloak attackers and MAD.

All images are batched and channels-last: ``(batch, height, width, channels)``.
Filters act on each channel separately.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

PAD_MODES = ("constant", "reflect", "replicate", "circular")


def pad_2d(
    images: tf.Tensor, top: int, bottom: int, left: int, right: int, mode: str
) -> tf.Tensor:
    """Pads the height and width axes of ``(B, H, W, C)`` images.

    ``mode``: ``"constant"`` (zeros), ``"reflect"`` (mirror without the edge),
    ``"replicate"`` (repeat the edge) or ``"circular"`` (wrap around).
    """
    if mode not in PAD_MODES:
        raise ValueError(f"`mode` must be one of {PAD_MODES}. Received: mode={mode!r}")
    if mode in ("constant", "reflect"):
        paddings = [[0, 0], [top, bottom], [left, right], [0, 0]]
        return tf.pad(
            images, paddings, mode="CONSTANT" if mode == "constant" else "REFLECT"
        )
    for axis, (before, after) in ((1, (top, bottom)), (2, (left, right))):
        size = images.shape[axis]
        if mode == "replicate":
            head, tail = [0] * before, [size - 1] * after
        else:
            head = [(i - before) % size for i in range(before)]
            tail = [i % size for i in range(after)]
        index = tf.constant(head + list(range(size)) + tail, dtype=tf.int32)
        images = tf.gather(images, index, axis=axis)
    return images


def filter_2d(images: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Valid (unpadded) correlation of every channel with one ``(kh, kw)`` kernel."""
    channels = images.shape[-1]
    kernel = tf.cast(kernel, images.dtype)[:, :, None, None]
    kernel = tf.tile(kernel, [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "VALID")


def gaussian_window(size: int, sigma: float, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Normalised circular Gaussian ``(size, size)``, centred on ``(size + 1) / 2``."""
    coords = np.arange(1, size + 1, dtype=np.float64) - (size + 1) / 2
    profile = np.exp(-(coords**2) / (2.0 * sigma**2))
    window = np.outer(profile, profile)
    return tf.constant(window / window.sum(), dtype=dtype)


def gaussian_blur(images: tf.Tensor, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur with reflect padding; the output keeps the input size.

    The kernel has ``2 * ceil(3 sigma) + 1`` taps; its radius is capped at
    ``min(H, W) - 1`` so that reflect padding exists on small images.
    """
    height, width = images.shape[1], images.shape[2]
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    coords = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-(coords**2) / (2.0 * sigma**2))
    taps = tf.constant(taps / taps.sum(), dtype=images.dtype)
    padded = pad_2d(images, radius, radius, radius, radius, "reflect")
    rows = filter_2d(padded, taps[:, None])
    return filter_2d(rows, taps[None, :])


def downsample_2x(images: tf.Tensor) -> tf.Tensor:
    """Replicate-pads odd height/width by one at the end, then 2x2 average pooling."""
    height, width = images.shape[1], images.shape[2]
    images = pad_2d(images, 0, height % 2, 0, width % 2, "replicate")
    return tf.nn.avg_pool2d(images, 2, 2, "VALID")


def safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    """``sqrt(max(x, 0))`` whose gradient is 0 (not inf) where ``x <= 0``."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), 0.0)


def safe_pow(x: tf.Tensor, exponent: float) -> tf.Tensor:
    """``max(x, 0) ** exponent`` whose gradient is 0 (not NaN) where ``x <= 0``."""
    positive = x > 0
    return tf.where(
        positive, tf.pow(tf.where(positive, x, tf.ones_like(x)), exponent), 0.0
    )
