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
    gram = tf.matmul(w, w, transpose_a=True)  # sigma(gram) = sigma(w)^2
    fro = tf.norm(gram)
    safe_fro = tf.where(fro > 0, fro, tf.ones_like(fro))
    h = gram / safe_fro
    log_scale = tf.math.log(safe_fro)  # gram = exp(log_scale) * h, ||h||_F = 1
    for _ in range(iterations):
        h = tf.matmul(h, h)
        f = tf.norm(h)
        safe_f = tf.where(f > 0, f, tf.ones_like(f))
        h = h / safe_f
        log_scale = 2.0 * log_scale + tf.math.log(safe_f)
    power = 2.0 ** (iterations + 1)  # exp(log_scale) >= sigma(w)^power
    bound = tf.exp(log_scale / power) * (1.0 + SAFETY_MARGIN)
    bound = tf.where(fro > 0, bound, tf.zeros_like(bound))
    return tf.cast(bound, tf.float32)


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
