"""The attacker battery of the image-similarity cloak loss.

An attacker who sees a transformed image may post-process it (clamp, rescale,
detect edges, blur, change gamma, denoise, standardise) before looking for the
original's structure. The privacy loss applies each of these fixed transforms
to both the noisy and the clean image and measures what survives with MS-SSIM
and squared Pearson correlation (``deel_lipdp_ext.imaging.metrics``).

Reference: Stained Glass ``loss/image_similarity`` (closed source: its docs
name the transforms, not their parameters; the definitions used here are in
``docs/ports.md``). Images are channels-last ``(B, H, W, C)`` in ``[0, 1]``;
every statistic is per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf

from ..imaging import metrics
from ..imaging._ops import filter_2d, gaussian_blur, pad_2d, safe_sqrt

Transform = Callable[[tf.Tensor], tf.Tensor]

SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def clamp(x: tf.Tensor) -> tf.Tensor:
    """Clips to ``[0, 1]``."""
    return tf.clip_by_value(x, 0.0, 1.0)


def _per_sample(reduce, x: tf.Tensor) -> tf.Tensor:
    return reduce(x, axis=(1, 2, 3), keepdims=True)


def minmax(x: tf.Tensor) -> tf.Tensor:
    """``(x - min) / (max - min + 1e-8)`` per sample."""
    low = _per_sample(tf.reduce_min, x)
    return (x - low) / (_per_sample(tf.reduce_max, x) - low + 1e-8)


def sobel(x: tf.Tensor) -> tf.Tensor:
    """Sobel gradient magnitude of the grey level of ``clamp(x)``, ``(B, H, W, 1)``.

    Grey = channel mean; 3x3 Sobel with reflect padding; magnitude
    ``sqrt(gx**2 + gy**2 + 1e-12)`` divided by its per-sample max + 1e-8.
    """
    grey = tf.reduce_mean(clamp(x), axis=-1, keepdims=True)
    padded = pad_2d(grey, 1, 1, 1, 1, "reflect")
    kernel_x = tf.constant(SOBEL_X, dtype=x.dtype)
    gx = filter_2d(padded, kernel_x)
    gy = filter_2d(padded, tf.transpose(kernel_x))
    magnitude = tf.sqrt(gx**2 + gy**2 + 1e-12)
    return magnitude / (_per_sample(tf.reduce_max, magnitude) + 1e-8)


def blur(x: tf.Tensor, sigma: float) -> tf.Tensor:
    """Gaussian blur of ``clamp(x)`` (std ``sigma`` pixels, reflect padding)."""
    return gaussian_blur(clamp(x), sigma)


def gamma(x: tf.Tensor, exponent: float) -> tf.Tensor:
    """``clip(x, 1e-6, 1) ** exponent`` (the floor keeps gradients finite)."""
    return tf.pow(tf.clip_by_value(x, 1e-6, 1.0), exponent)


def haar_forward(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """One-level orthonormal 2D Haar transform of even-sized images.

    Returns ``(LL, LH, HL, HH)``, each ``(B, H/2, W/2, C)``.
    """
    a, b = x[:, 0::2, 0::2, :], x[:, 0::2, 1::2, :]
    c, d = x[:, 1::2, 0::2, :], x[:, 1::2, 1::2, :]
    return (
        (a + b + c + d) / 2,
        (a - b + c - d) / 2,
        (a + b - c - d) / 2,
        (a - b - c + d) / 2,
    )


def haar_inverse(ll, lh, hl, hh) -> tf.Tensor:
    """Inverse of ``haar_forward``."""
    a = (ll + lh + hl + hh) / 2
    b = (ll - lh + hl - hh) / 2
    c = (ll + lh - hl - hh) / 2
    d = (ll - lh - hl + hh) / 2
    top = tf.stack([a, b], axis=3)  # (B, H/2, W/2, 2, C): columns interleaved
    bottom = tf.stack([c, d], axis=3)
    shape = tf.shape(ll)
    rows_top = tf.reshape(top, (shape[0], shape[1], 2 * shape[2], shape[3]))
    rows_bottom = tf.reshape(bottom, (shape[0], shape[1], 2 * shape[2], shape[3]))
    image = tf.stack([rows_top, rows_bottom], axis=2)
    return tf.reshape(image, (shape[0], 2 * shape[1], 2 * shape[2], shape[3]))


def wavelet_denoise(x: tf.Tensor, threshold: float) -> tf.Tensor:
    """Haar soft-threshold denoising of ``clamp(x)``, per channel.

    Odd sides are replicate-padded to even, detail bands soft-thresholded
    (``sign(d) max(|d| - threshold, 0)``), the image reconstructed, cropped
    and clamped.
    """
    height, width = x.shape[1], x.shape[2]
    padded = pad_2d(clamp(x), 0, height % 2, 0, width % 2, "replicate")
    ll, *details = haar_forward(padded)
    shrunk = [tf.sign(d) * tf.nn.relu(tf.abs(d) - threshold) for d in details]
    return clamp(haar_inverse(ll, *shrunk)[:, :height, :width, :])


def zscore_sigmoid(x: tf.Tensor) -> tf.Tensor:
    """``sigmoid((x - mean) / (std + 1e-8))`` per sample."""
    centred = x - _per_sample(tf.reduce_mean, x)
    std = safe_sqrt(_per_sample(tf.reduce_mean, centred**2))
    return tf.sigmoid(centred / (std + 1e-8))


def attacker_transforms(
    gamma_values: Sequence[float] = (0.5, 2.0),
    blur_sigma: float = 2.0,
    wavelet_threshold: float = 0.1,
) -> tuple[dict[str, Transform], tuple[str, ...], tuple[str, ...]]:
    """The battery: ``(transforms by name, MS-SSIM names, Pearson names)``.

    MS-SSIM uses every transform (7 + len(gamma_values)); Pearson drops the
    affine-equivalent or near-redundant ones (clamp, minmax, zscore_sigmoid),
    leaving 4 + len(gamma_values).
    """
    gammas = {f"gamma_{float(g)}": g for g in gamma_values}
    transforms: dict[str, Transform] = {
        "raw": lambda x: x,
        "clamp": clamp,
        "minmax": minmax,
        "sobel": sobel,
        "blur": lambda x: blur(x, blur_sigma),
    }
    for name, g in gammas.items():
        transforms[name] = lambda x, g=g: gamma(x, g)
    transforms["wavelet"] = lambda x: wavelet_denoise(x, wavelet_threshold)
    transforms["zscore_sigmoid"] = zscore_sigmoid
    ms_ssim_names = tuple(transforms)
    pearson_names = ("raw", "sobel", "blur", *gammas, "wavelet")
    return transforms, ms_ssim_names, pearson_names


@tf.autograph.experimental.do_not_convert
def multi_attacker_privacy_loss(
    noisy01: tf.Tensor,
    clean01: tf.Tensor,
    gamma_values: Sequence[float] = (0.5, 2.0),
    blur_sigma: float = 2.0,
    wavelet_threshold: float = 0.1,
) -> dict[str, tf.Tensor]:
    """MS-SSIM and squared Pearson of every attacker transform, batch means.

    Args:
        noisy01: ``(B, H, W, C)`` noisy images denormalised to ``[0, 1]``.
        clean01: the clean images, same shape and range.

    Returns:
        ``{"ms_ssim_<t>": scalar, ..., "pearson_sq_<t>": scalar, ...}``: per
        transform ``t``, MS-SSIM averaged over channels and batch, and the
        squared Pearson correlation averaged over the batch.
    """
    transforms, ms_ssim_names, pearson_names = attacker_transforms(
        gamma_values, blur_sigma, wavelet_threshold
    )
    batch = tf.shape(noisy01)[0]
    both = tf.concat([noisy01, clean01], axis=0)  # one pass of each transform
    outputs = {name: transform(both) for name, transform in transforms.items()}
    # MS-SSIM is per channel: stack every transform's channels and run it once.
    stacked = tf.concat([outputs[name] for name in ms_ssim_names], axis=-1)
    per_channel = metrics.ms_ssim(stacked[:batch], stacked[batch:])
    widths = [outputs[name].shape[-1] for name in ms_ssim_names]
    components = {}
    scores_by_name = tf.split(per_channel, widths, axis=-1)
    for name, scores in zip(ms_ssim_names, scores_by_name, strict=True):
        components[f"ms_ssim_{name}"] = tf.reduce_mean(scores)
    for name in pearson_names:
        out = outputs[name]
        components[f"pearson_sq_{name}"] = tf.reduce_mean(
            metrics.pearson_squared(out[:batch], out[batch:])
        )
    return components
