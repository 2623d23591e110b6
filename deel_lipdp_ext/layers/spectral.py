"""Certified operator-norm bounds and the post-step projections.

Power iteration UNDER-estimates a spectral norm, so it is used only for the
projection (post-processing). The number the bound passes use comes from
Gram iteration, which gives a guaranteed UPPER bound:
with G_1 = W^T W and G_{k+1} = G_k^2, sigma_max(W)^(2^k) = ||G_k||_2 <=
||G_k||_F, hence sigma_max(W) <= ||G_k||_F^(1 / 2^k), converging to
sigma_max from above.

Reference: Delattre, Barthélemy, Araujo, Allauzen, "Efficient Bound of
Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023.
"""

from __future__ import annotations

import math

import tensorflow as tf
from deel.lip.normalizers import bjorck_normalization, spectral_normalization

# Relative margin added after the float64 computation and the cast to float32,
# so rounding can never make the certified number smaller than the truth.
SAFETY_MARGIN = 1e-5
GRAM_ITERATIONS = 12


def _gram_iteration(matrices: tf.Tensor, iterations: int) -> tf.Tensor:
    """Upper bounds of the largest singular value of each matrix of a batch.

    `matrices`: (batch, m, n), real or complex float64. With G_1 = W^H W and
    G_{k+1} = G_k^2 (each normalised by its Frobenius norm, the scale kept in
    log space), sigma_max(W)^(2^(k+1)) = ||G_k||_2 <= ||G_k||_F. Returns a
    float64 tensor (batch,), 0 for a zero matrix.
    """
    gram = tf.matmul(matrices, matrices, adjoint_a=True)

    def frobenius(h):
        return tf.sqrt(tf.reduce_sum(tf.math.real(tf.math.conj(h) * h), axis=(-2, -1)))

    fro = frobenius(gram)
    safe_fro = tf.where(fro > 0, fro, tf.ones_like(fro))
    h = gram / tf.cast(safe_fro, gram.dtype)[:, None, None]
    log_scale = tf.math.log(safe_fro)  # gram = exp(log_scale) * h, ||h||_F = 1
    for _ in range(iterations):
        h = tf.matmul(h, h)
        f = frobenius(h)
        safe_f = tf.where(f > 0, f, tf.ones_like(f))
        h = h / tf.cast(safe_f, h.dtype)[:, None, None]
        log_scale = 2.0 * log_scale + tf.math.log(safe_f)
    bound = tf.exp(log_scale / 2.0 ** (iterations + 1)) * (1.0 + SAFETY_MARGIN)
    return tf.where(fro > 0, bound, tf.zeros_like(bound))


def spectral_norm_upper_bound(
    matrix: tf.Tensor, iterations: int = GRAM_ITERATIONS
) -> tf.Tensor:
    """Guaranteed upper bound of the largest singular value of a 2-D matrix.

    Args:
        matrix: tensor of shape (m, n).
        iterations: Gram squarings after the first Gram product. The bound is
            at most `sigma_max * rank^(1 / 2^(iterations + 2))` (12 gives at
            most 0.05% slack for rank 1000).

    Returns:
        Scalar float32 tensor `>= sigma_max(matrix)`.
    """
    w = tf.cast(matrix, tf.float64)
    if w.shape[0] is not None and w.shape[1] is not None and w.shape[0] < w.shape[1]:
        w = tf.transpose(w)
    return tf.cast(_gram_iteration(w[None], iterations)[0], tf.float32)


def conv_operator_norm_upper_bound(
    kernel: tf.Tensor, input_size: tuple[int, int], iterations: int = 10
) -> tf.Tensor:
    """Guaranteed upper bound of the L2 operator norm of a 2-D convolution with
    this kernel on (H, W) inputs, for ANY zero padding and ANY stride.

    Any such convolution is a crop (and, for strides, a subsampling) of the
    full linear correlation of the zero-padded input, which is itself a crop of
    the CIRCULAR convolution on an (H + kh - 1, W + kw - 1) grid (no window
    wraps around). Cropping and subsampling cannot raise the norm, and the 2-D
    DFT block-diagonalises the circular convolution, so its norm is the
    largest sigma_max of the (c_in, c_out) matrices K^(w) over the grid's
    frequencies, each bounded from above by Gram iteration (float64).

    Args:
        kernel: (kh, kw, c_in, c_out).
        input_size: (H, W), static.
        iterations: Gram squarings per frequency (10: at most
            min(c_in, c_out)^(1/2^12) - 1 slack, 0.1% for 64 channels).

    Returns:
        Scalar float32 tensor `>=` the operator norm.

    Reference: Delattre, Barthelemy, Araujo, Allauzen, "Efficient Bound of
    Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023
    (the per-frequency Gram iteration); the embedding of zero padding into a
    larger circular convolution is the argument of Delattre, Barthelemy,
    Allauzen, "Spectral Norm of Convolutional Layers with Circular and Zero
    Paddings", 2024.
    """
    kh, kw, c_in, c_out = (int(d) for d in kernel.shape)
    grid_h, grid_w = int(input_size[0]) + kh - 1, int(input_size[1]) + kw - 1
    k = tf.transpose(tf.cast(kernel, tf.float64), (2, 3, 0, 1))  # c_in, c_out, kh, kw
    k = tf.pad(k, [[0, 0], [0, 0], [0, grid_h - kh], [0, grid_w - kw]])
    # The real-input FFT keeps half the frequencies: the others are conjugates,
    # with the same singular values.
    spectrum = tf.transpose(tf.signal.rfft2d(k), (2, 3, 0, 1))
    matrices = tf.reshape(spectrum, (-1, c_in, c_out))
    if c_in < c_out:
        matrices = tf.linalg.adjoint(matrices)
    return tf.cast(tf.reduce_max(_gram_iteration(matrices, iterations)), tf.float32)


def rescale_to_certificate(
    kernel: tf.Tensor, bound: tf.Tensor, taps: int = 1
) -> tuple[tf.Tensor, tf.Tensor]:
    """`kernel / bound` (a projection's last step: certificate ~1) and the
    certified Lipschitz bound of that computed quotient
    (`rescaled_certificate`). A zero bound leaves the kernel as it is."""
    divisor = tf.where(bound > 0, bound, tf.ones_like(bound))
    rescaled = kernel / divisor
    return rescaled, rescaled_certificate(kernel, bound, divisor, rescaled, taps)


def rescaled_certificate(
    kernel: tf.Tensor,
    bound: tf.Tensor,
    divisor: tf.Tensor,
    rescaled: tf.Tensor,
    taps: int = 1,
) -> tf.Tensor:
    """Certified Lipschitz bound of `rescaled`, the computed `kernel / divisor`,
    without a second Gram iteration.

    `bound` certifies `kernel` (for a matrix or a convolution), so the exact
    quotient has Lipschitz constant <= bound / divisor. The computed quotient
    differs from it by E, whatever rounding the division used; E is measured
    here in float64 (the exact quotient's float64 rounding, 2^-53 relative,
    is added back). A convolution is a sum over its taps of a (c_in, c_out)
    matrix acting through a partial shift (norm <= 1), so
    ||E|| <= sum over taps of ||E_tap||_F (`taps` = kh * kw; 1 for a matrix).
    The float64 sums and norms are covered by a 1e-9 relative margin, and the
    result is rounded UP to float32.

    Args:
        kernel: (taps..., c_in, c_out) with the taps leading, or a matrix.
        bound: scalar, a certified Lipschitz bound of `kernel`.
        divisor: scalar > 0.
        rescaled: `kernel / divisor` as computed (any float dtype).
        taps: kh * kw for a convolution kernel, 1 for a matrix.

    Returns:
        Scalar float32 tensor >= the Lipschitz constant of `rescaled`.
    """
    divisor = tf.cast(divisor, tf.float64)
    exact = tf.cast(kernel, tf.float64) / divisor  # within 2^-53 of the quotient
    error = tf.abs(tf.cast(rescaled, tf.float64) - exact) + 2.0**-52 * tf.abs(exact)
    per_tap = tf.norm(tf.reshape(error, (taps, -1)), axis=1)
    total = (tf.cast(bound, tf.float64) / divisor + tf.reduce_sum(per_tap)) * (
        1.0 + 1e-9
    )
    return tf.math.nextafter(tf.cast(total, tf.float32), tf.constant(math.inf))


def conv_overlap(kernel_size: tuple[int, int], strides: tuple[int, int]) -> int:
    """Most patches one input pixel can lie in: ceil(kh/sh) * ceil(kw/sw)."""
    (kh, kw), (sh, sw) = kernel_size, strides
    return math.ceil(kh / sh) * math.ceil(kw / sw)


def spectral_project(
    matrix: tf.Tensor, u: tf.Variable, target: float, orthogonalize: bool
) -> tf.Tensor:
    """Rescale `matrix` so its spectral norm is about `target` (post-processing).

    Uses deel-lip's power iteration (warm-started from `u`, updated in place)
    and, when `orthogonalize`, Björck orthonormalisation. The result is not
    certified: the bound passes re-certify it with `spectral_norm_upper_bound`.
    """
    normalized, new_u, _ = spectral_normalization(matrix, u)
    u.assign(new_u)
    if orthogonalize:
        normalized = bjorck_normalization(normalized)
    return normalized * target
