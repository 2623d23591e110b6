"""Differentiable image-similarity metrics: SSIM, MS-SSIM, MSE, squared Pearson.

Images are batched and channels-last, ``(batch, height, width, channels)``,
with values nominally in ``[0, 1]`` (the SSIM constants assume a dynamic range
of 1). SSIM and MS-SSIM are computed per channel; ``ssim``, ``ms_ssim`` and
``mse`` return one value per ``(batch, channel)``.

Reference: the SSIM / MS-SSIM definitions of plenoptic's ``po.metric``
(Wang et al. 2004; Wang, Simoncelli and Bovik 2003), ported channels-last: a
normalised Gaussian window of std 1.5 and size ``min(11, H, W)`` applied as a
valid convolution (so 8x8 and 32x32 images work), ``C1 = 0.01**2``,
``C2 = 0.03**2``; MS-SSIM multiplies ``relu(mean(cs)) ** p_s`` over the first
scales and ``relu(mean(l * cs)) ** p_last`` at the last one, downsampling by
replicate-padding odd sides and 2x2 average pooling. Departure: plenoptic warns
when values leave ``[0, 1]`` or when ``C > 1``; these functions run inside
training graphs on transformed images, so they do not inspect values.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from ._ops import (
    downsample_2x,
    filter_2d,
    gaussian_window,
    pad_2d,
    safe_pow,
    safe_sqrt,
)

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
WINDOW_STD = 1.5
MAX_WINDOW = 11
MS_SSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

__all__ = ["MS_SSIM_POWER_FACTORS", "ms_ssim", "mse", "pearson_squared", "ssim"]


def _check_pair(a, b) -> tuple[tf.Tensor, tf.Tensor]:
    a = tf.convert_to_tensor(a)
    b = tf.convert_to_tensor(b)
    if a.shape.rank != 4 or b.shape.rank != 4:
        raise ValueError(
            "Images must be 4-D (batch, height, width, channels). "
            f"Received: shapes {a.shape} and {b.shape}"
        )
    if a.dtype != b.dtype:
        raise ValueError(
            "Both images must have the same dtype. "
            f"Received: {a.dtype.name} and {b.dtype.name}"
        )
    if not a.dtype.is_floating:
        raise ValueError(
            f"Images must be floating point. Received: dtype={a.dtype.name}"
        )
    if a.shape[1:3] != b.shape[1:3]:
        raise ValueError(
            "Both images must have the same height and width. "
            f"Received: shapes {a.shape} and {b.shape}"
        )
    for axis, name in ((0, "batch"), (3, "channel")):
        sa, sb = a.shape[axis], b.shape[axis]
        if sa is not None and sb is not None and sa != sb and 1 not in (sa, sb):
            raise ValueError(
                f"The {name} sizes must be equal or one of them 1. "
                f"Received: shapes {a.shape} and {b.shape}"
            )
    if a.shape.is_fully_defined() and a.shape == b.shape:
        return a, b
    shape = tf.broadcast_dynamic_shape(tf.shape(a), tf.shape(b))
    return tf.broadcast_to(a, shape), tf.broadcast_to(b, shape)


def _ssim_parts(a: tf.Tensor, b: tf.Tensor, pad: str | bool = False):
    """Luminance map, contrast-structure map and local variances of two images."""
    size = min(MAX_WINDOW, a.shape[1], a.shape[2])
    window = gaussian_window(size, WINDOW_STD, a.dtype)
    if pad:
        before, after = (size - 1) // 2, size // 2
        a = pad_2d(a, before, after, before, after, pad)
        b = pad_2d(b, before, after, before, after, pad)
    # One depthwise filtering of the five stacked moments.
    moments = filter_2d(tf.concat([a, b, a * a, b * b, a * b], axis=-1), window)
    mu_a, mu_b, mean_aa, mean_bb, mean_ab = tf.split(moments, 5, axis=-1)
    var_a = mean_aa - mu_a**2
    var_b = mean_bb - mu_b**2
    cov = mean_ab - mu_a * mu_b
    luminance = (2 * mu_a * mu_b + SSIM_C1) / (mu_a**2 + mu_b**2 + SSIM_C1)
    contrast_structure = (2 * cov + SSIM_C2) / (var_a + var_b + SSIM_C2)
    return luminance, contrast_structure, var_a, var_b


@tf.autograph.experimental.do_not_convert
def ssim(a, b, weighted: bool = False, pad: str | bool = False) -> tf.Tensor:
    """Structural similarity of two image batches, per channel.

    Args:
        a: ``(B, H, W, C)`` float tensor; batch and channel sizes equal to
            ``b``'s or 1 (broadcast).
        b: a tensor of the same dtype and spatial size.
        weighted: average the SSIM map with the information weights
            ``log((1 + var_a / C2) (1 + var_b / C2))`` instead of uniformly.
        pad: ``False`` (valid convolution) or a padding mode, ``"constant"``,
            ``"reflect"``, ``"replicate"`` or ``"circular"`` ("same" output size).

    Returns:
        ``(B, C)`` tensor; 1 for identical images.

    Raises:
        ValueError: on a bad rank, size, dtype or padding mode.
    """
    a, b = _check_pair(a, b)
    luminance, contrast_structure, var_a, var_b = _ssim_parts(a, b, pad)
    ssim_map = luminance * contrast_structure
    if not weighted:
        return tf.reduce_mean(ssim_map, axis=(1, 2))
    weights = tf.math.log((1 + var_a / SSIM_C2) * (1 + var_b / SSIM_C2))
    return tf.reduce_sum(ssim_map * weights, axis=(1, 2)) / tf.reduce_sum(
        weights, axis=(1, 2)
    )


@tf.autograph.experimental.do_not_convert
def ms_ssim(a, b, power_factors: Sequence[float] = MS_SSIM_POWER_FACTORS) -> tf.Tensor:
    """Multi-scale SSIM of two image batches, per channel; ``(B, C)``.

    One scale per power factor; the gradient of ``relu(v) ** p`` is taken as 0
    where ``v <= 0`` (instead of NaN), so it is safe inside a training loss.
    """
    a, b = _check_pair(a, b)
    if len(power_factors) < 1:
        raise ValueError(
            f"`power_factors` must not be empty. Received: {power_factors!r}"
        )
    result = tf.ones_like(a[:, 0, 0, :])
    for power in power_factors[:-1]:
        _, contrast_structure, _, _ = _ssim_parts(a, b)
        result *= safe_pow(tf.reduce_mean(contrast_structure, axis=(1, 2)), power)
        a, b = downsample_2x(a), downsample_2x(b)
    luminance, contrast_structure, _, _ = _ssim_parts(a, b)
    last = tf.reduce_mean(luminance * contrast_structure, axis=(1, 2))
    return result * safe_pow(last, power_factors[-1])


@tf.autograph.experimental.do_not_convert
def mse(a, b) -> tf.Tensor:
    """Mean squared error over height and width, per channel; ``(B, C)``."""
    a, b = _check_pair(a, b)
    return tf.reduce_mean(tf.square(a - b), axis=(1, 2))


@tf.autograph.experimental.do_not_convert
def pearson_squared(a, b) -> tf.Tensor:
    """Squared Pearson correlation of each sample's flattened values; ``(B,)``.

    ``r = sum(da * db) / (sqrt(sum da**2) sqrt(sum db**2) + 1e-8)`` with
    ``da = a - mean(a)`` per sample; a constant image gives ``r = 0``.
    """
    a, b = _check_pair(a, b)
    a = tf.reshape(a, (tf.shape(a)[0], -1))
    b = tf.reshape(b, (tf.shape(b)[0], -1))
    da = a - tf.reduce_mean(a, axis=1, keepdims=True)
    db = b - tf.reduce_mean(b, axis=1, keepdims=True)
    norms = safe_sqrt(tf.reduce_sum(da * da, axis=1)) * safe_sqrt(
        tf.reduce_sum(db * db, axis=1)
    )
    r = tf.reduce_sum(da * db, axis=1) / (norms + 1e-8)
    return tf.square(r)
