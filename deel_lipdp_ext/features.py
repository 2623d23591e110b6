"""Fixed per-sample feature maps, applied to the data before a DP model.

The 2D scattering transform (Mallat, "Group invariant scattering", 2012; Bruna
& Mallat, 2013) cascades Morlet wavelet filters, complex moduli and a Gaussian
low-pass: stable, translation-invariant features that are not learned. Tramer
& Boneh ("Differentially private learning needs better features", ICLR 2021)
train DP-SGD on them; here a clipless Lipschitz head is trained on them
(`models.recipe("scattering_linear")`).

Privacy: a feature map that is FIXED (chosen without looking at the private
data) and computed from each sample alone turns neighbouring datasets into
neighbouring datasets, so the DP guarantee of training on the features is the
guarantee with respect to the raw samples. `data.from_numpy(feature_map=...)`
runs a map of your own one sample at a time and refuses one whose output
changes with the order of the samples (state shared from call to call); that
the map is fixed and stateless stays the caller's promise (a map fitted on the
private data, e.g. a PCA, would need its own budget).
The features are then bounded like any input (each sample scaled to L2 norm
`input_bound`), so no Lipschitz constant of the map is needed.

Shapes: images (N, H, W) or (N, H, W, C) with H and W multiples of 2**J;
features (N, H / 2**J, W / 2**J, C * K) with K = 1 + J L + L**2 J (J - 1) / 2
(order 0, 1 and 2 coefficients).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

__all__ = [
    "ScatteringFeatures",
    "group_normalize",
    "morlet_filter_bank",
    "scattering_channels",
    "scattering_transform",
]

# Morlet parameters at scale j (pixels): envelope width, centre frequency.
_SIGMA0 = 0.8
_XI0 = 3.0 * math.pi / 4.0


def _gabor(size: tuple[int, int], sigma: float, theta: float, xi: float, slant: float):
    """A Gabor filter on a periodic (M, N) grid (5 x 5 periods summed), unit
    mass for xi = 0: exp(-u^T C u / 2) exp(i xi <u, e_theta>) / (2 pi sigma^2 /
    slant), with C the rotated diag(1, slant^2) / sigma^2."""
    m, n = size
    rotation = np.array(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    )
    curvature = rotation @ np.diag([1.0, slant**2]) @ rotation.T / (2 * sigma**2)
    out = np.zeros(size, complex)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            x, y = np.mgrid[ex * m : (ex + 1) * m, ey * n : (ey + 1) * n]
            phase = x * xi * math.cos(theta) + y * xi * math.sin(theta)
            quadratic = (
                curvature[0, 0] * x * x
                + (curvature[0, 1] + curvature[1, 0]) * x * y
                + curvature[1, 1] * y * y
            )
            out += np.exp(-quadratic + 1j * phase)
    return out / (2 * math.pi * sigma**2 / slant)


def morlet_filter_bank(
    size: tuple[int, int], J: int, L: int
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Fourier transforms (real parts) of the J L Morlet wavelets and of the
    low-pass, on an (M, N) grid.

    Returns:
        (psi_hat (J L, M, N), phi_hat (M, N), the scale j of each wavelet).
        Each wavelet has zero mean (psi_hat[:, 0, 0] = 0); phi has unit mass.
    """
    psi, scales = [], []
    for j in range(J):
        for t in range(L):
            theta = (int(L - L / 2 - 1) - t) * math.pi / L
            sigma, xi, slant = _SIGMA0 * 2**j, _XI0 / 2**j, 4.0 / L
            wave = _gabor(size, sigma, theta, xi, slant)
            envelope = _gabor(size, sigma, theta, 0.0, slant)
            wavelet = wave - wave.sum() / envelope.sum() * envelope
            psi.append(np.real(np.fft.fft2(wavelet)))
            scales.append(j)
    phi = np.real(np.fft.fft2(_gabor(size, _SIGMA0 * 2 ** (J - 1), 0.0, 0.0, 1.0)))
    return np.stack(psi), phi, scales


def scattering_channels(J: int, L: int) -> int:
    """Coefficients per input channel: 1 + J L + L^2 J (J - 1) / 2."""
    return 1 + J * L + L * L * J * (J - 1) // 2


@functools.lru_cache(maxsize=16)
def _scattering_function(h: int, w: int, J: int, L: int):
    """The traced transform of (B, h, w) images, built once per size."""
    step = 2**J
    # Reflect-pad to a multiple of 2**J with at least 2**(J-1) pixels a side,
    # so that the periodic filtering does not wrap one border onto the other.
    padded = ((h + step) // step + 1) * step, ((w + step) // step + 1) * step
    top, left = (padded[0] - h) // 2, (padded[1] - w) // 2
    psi_hat, phi_hat, scales = morlet_filter_bank(padded, J, L)
    psi_hat = tf.constant(psi_hat, tf.complex64)
    phi_hat = tf.constant(phi_hat, tf.complex64)
    out_h, out_w = h // step, w // step
    first_row, first_col = top // step, left // step

    def low_pass(signal_hat):  # (B, M, N) -> (B, H / 2^J, W / 2^J)
        smooth = tf.math.real(tf.signal.ifft2d(signal_hat * phi_hat))
        sub = smooth[:, ::step, ::step]
        return sub[:, first_row : first_row + out_h, first_col : first_col + out_w]

    def transform(x):  # (B, H, W) -> (B, h', w', K)
        x = tf.pad(
            x,
            [[0, 0], [top, padded[0] - h - top], [left, padded[1] - w - left]],
            mode="REFLECT",
        )
        x_hat = tf.signal.fft2d(tf.cast(x, tf.complex64))
        order0, order1, order2 = [low_pass(x_hat)], [], []
        for k1, j1 in enumerate(scales):
            u1 = tf.abs(tf.signal.ifft2d(x_hat * psi_hat[k1]))
            u1_hat = tf.signal.fft2d(tf.cast(u1, tf.complex64))
            order1.append(low_pass(u1_hat))
            for k2, j2 in enumerate(scales):
                if j2 > j1:
                    u2 = tf.abs(tf.signal.ifft2d(u1_hat * psi_hat[k2]))
                    order2.append(low_pass(tf.signal.fft2d(tf.cast(u2, tf.complex64))))
        return tf.stack(order0 + order1 + order2, axis=-1)

    return tf.function(
        transform, input_signature=[tf.TensorSpec((None, h, w), tf.float32)]
    )


def _is_int(value) -> bool:
    """An int or a NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def scattering_transform(
    images: np.ndarray, J: int = 2, L: int = 8, batch_size: int = 1000
) -> np.ndarray:
    """Order-2 scattering coefficients of each image, each channel apart.

    Args:
        images: (N, H, W) or (N, H, W, C) floats; H, W multiples of 2**J.
        J: number of scales (the output is subsampled by 2**J).
        L: number of orientations.
        batch_size: images transformed at a time (memory).

    Returns:
        float32 array (N, H / 2**J, W / 2**J, C * K), K = `scattering_channels`.

    Raises:
        ValueError: a bad shape, J or L, or non-finite pixels.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"`images` must have shape (N, H, W) or (N, H, W, C). Received: "
            f"{images.shape}"
        )
    if not all(_is_int(v) and v >= 1 for v in (J, L)):
        raise ValueError(f"J and L must be ints >= 1. Received: J={J!r}, L={L!r}")
    J, L = int(J), int(L)
    n, h, w, c = images.shape
    step = 2**J
    if h % step or w % step:
        raise ValueError(
            f"Image height and width must be multiples of 2**J={step}. "
            f"Received: {h}x{w}"
        )
    if not np.all(np.isfinite(images)):
        raise ValueError("`images` contains NaN or Inf values.")
    transform = _scattering_function(h, w, J, L)
    chunks = []
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        per_channel = [transform(tf.constant(batch[..., i])) for i in range(c)]
        chunks.append(tf.concat(per_channel, axis=-1).numpy())
    if not chunks:
        shape = (0, h // step, w // step, c * scattering_channels(J, L))
        return np.zeros(shape, np.float32)
    return np.concatenate(chunks).astype(np.float32)


def group_normalize(
    features: np.ndarray, groups: int, epsilon: float = 1e-5
) -> np.ndarray:
    """Per-sample group normalisation of (N, H, W, K) features: the K
    channels in `groups` consecutive groups, each standardised over its
    (H, W, K / groups) values of the SAME sample (no statistic crosses
    samples, so no privacy cost).

    Raises:
        ValueError: `groups` does not divide K, or features not 4-D.
    """
    features = np.asarray(features, np.float32)
    if features.ndim != 4 or groups < 1 or features.shape[-1] % groups:
        raise ValueError(
            f"`groups` must divide the channels of (N, H, W, K) features. "
            f"Received: groups={groups!r}, shape={features.shape}"
        )
    n, h, w, k = features.shape
    grouped = features.reshape(n, h, w, groups, k // groups)
    mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
    std = grouped.std(axis=(1, 2, 4), keepdims=True)
    return ((grouped - mean) / (std + epsilon)).reshape(n, h, w, k)


@dataclass(frozen=True)
class ScatteringFeatures:
    """The scattering transform then per-sample group normalisation, as a
    callable feature map (`data.from_numpy(feature_map=...)`).

    Args:
        J: scales (images shrink by 2**J).
        L: orientations.
        groups: groups of `group_normalize` (0: none); must divide C * K.
    """

    J: int = 2
    L: int = 8
    groups: int = 9

    def __call__(self, images: np.ndarray) -> np.ndarray:
        features = scattering_transform(images, self.J, self.L)
        if self.groups:
            features = group_normalize(features, self.groups)
        return features

    def get_config(self) -> dict:
        return asdict(self)
