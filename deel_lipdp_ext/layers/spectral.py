"""Certified operator-norm bounds and the post-step projections.

Power iteration UNDER-estimates a spectral norm, so it is used only for the
projection (post-processing). The number the bound passes use comes from
Gram iteration, which gives a guaranteed UPPER bound:
with G_1 = W^T W and G_{k+1} = G_k^2, sigma_max(W)^(2^k) = ||G_k||_2 <=
||G_k||_F, hence sigma_max(W) <= ||G_k||_F^(1 / 2^k), converging to
sigma_max from above. The same iterate gives a LOWER bound (for a PSD G,
lambda_max >= tr(G^2) / tr(G)), used only to skip the frequencies of a
convolution that cannot hold its largest singular value.

Reference: Delattre, Barthélemy, Araujo, Allauzen, "Efficient Bound of
Lipschitz Constant for Convolutional Layers by Gram Iteration", ICML 2023.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from deel.lip.normalizers import bjorck_normalization, spectral_normalization

# Relative margin added after the float64 Gram iteration, so its rounding can
# never make the certified number smaller than the truth (the cast to float32
# rounds up: `_float32_certificate`).
SAFETY_MARGIN = 1e-5
GRAM_ITERATIONS = 12


#: Squarings between two renormalisations of the Gram iteration. After a
#: renormalisation to trace 1 the eigenvalues lie in [0, 1] and the largest is
#: >= 1/n, so three squarings keep it >= n^-8 (no underflow below n ~ 1e38).
RENORMALISE_EVERY = 3
#: Squarings of every frequency before those that cannot hold the largest
#: singular value are dropped (`_largest_gram_bound`).
PRUNE_AFTER = 3


class _GramState(NamedTuple):
    """G_k = exp(log_trace) * h with trace(h) = 1 for each matrix W of a batch:
    G_1 = W^H W and G_(k+1) = G_k^2, so G_k's eigenvalues are
    sigma_i(W)^power with power = 2^k."""

    h: tf.Tensor  # (batch, n, n), Hermitian
    log_trace: tf.Tensor  # (batch,) float64
    power: int
    first_trace: tf.Tensor  # (batch,) trace of G_1: 0 for a zero matrix


def _gram_start(matrices: tf.Tensor) -> _GramState:
    gram = tf.matmul(matrices, matrices, adjoint_a=True)
    trace = tf.math.real(tf.linalg.trace(gram))
    h = gram / tf.cast(trace, gram.dtype)[:, None, None]
    return _GramState(h, tf.math.log(trace), 2, trace)


def _gram_squarings(state: _GramState, squarings: int) -> _GramState:
    """`squarings` squarings, renormalised to trace 1 every
    `RENORMALISE_EVERY` of them and at the end (one matmul per squaring)."""
    h, log_trace = state.h, state.log_trace
    pending = 0
    for step in range(1, squarings + 1):
        h = tf.matmul(h, h)
        pending += 1
        if pending == RENORMALISE_EVERY or step == squarings:
            trace = tf.math.real(tf.linalg.trace(h))
            log_trace = log_trace * 2.0**pending + tf.math.log(trace)
            h = h / tf.cast(trace, h.dtype)[:, None, None]
            pending = 0
    return _GramState(h, log_trace, state.power * 2**squarings, state.first_trace)


def _log_frobenius(h: tf.Tensor) -> tf.Tensor:
    return 0.5 * tf.math.log(
        tf.reduce_sum(tf.math.real(tf.math.conj(h) * h), axis=(-2, -1))
    )


def _log_upper_bound(state: _GramState) -> tf.Tensor:
    """log sigma_max <= log ||G_k||_F / 2^k (as ||G_k||_2 <= ||G_k||_F)."""
    return (state.log_trace + _log_frobenius(state.h)) / state.power


def _log_lower_bound(state: _GramState) -> tf.Tensor:
    """log sigma_max >= log(tr(G_k^2) / tr(G_k)) / 2^k: for a positive
    semi-definite G, sum lambda^2 / sum lambda <= lambda_max."""
    return (state.log_trace + 2.0 * _log_frobenius(state.h)) / state.power


def _certified(log_upper: tf.Tensor, state: _GramState) -> tf.Tensor:
    """exp(log_upper) with the safety margin; 0 for a zero matrix (whose
    iterate is 0/0 = NaN); +inf (no finite certificate) for a matrix holding
    NaN or Inf, or any other NaN, so that no maximum can drop it (XLA's
    reduce_max on CPU skips NaN)."""
    bound = tf.exp(log_upper) * (1.0 + SAFETY_MARGIN)
    bound = tf.where(state.first_trace == 0, tf.zeros_like(bound), bound)
    return tf.where(tf.math.is_nan(bound), tf.constant(math.inf, tf.float64), bound)


def _gram_iteration(matrices: tf.Tensor, iterations: int) -> tf.Tensor:
    """Upper bounds of the largest singular value of each matrix of a batch.

    `matrices`: (batch, m, n), real or complex float64. After the Gram product
    G_1 = W^H W and `iterations` squarings, sigma_max(W)^(2^k) = ||G_k||_2 <=
    ||G_k||_F with k = iterations + 1. Returns a float64 tensor (batch,): 0 for
    a zero matrix, +inf if a matrix holds NaN or Inf (`_certified`).
    """
    state = _gram_start(matrices)
    if state.h.shape[-1] == 1:  # a 1 x 1 Gram: sqrt(trace) is exact
        iterations = 0
    state = _gram_squarings(state, iterations)
    return _certified(_log_upper_bound(state), state)


def _frequencies_to_keep(state: _GramState) -> tuple[tf.Tensor, tf.Tensor]:
    """(indices of the batch // 8 matrices with the largest upper bounds,
    whether every other matrix is certified below the largest singular value
    of the batch): a dropped matrix's upper bound is below the best lower
    bound, which belongs to a kept matrix (its upper bound is above its lower
    bound). A NaN upper bound counts as +inf (kept, or nothing is dropped).
    A 1e-9 margin (in log) covers the float64 rounding of both bounds."""
    keep = state.h.shape[0] // 8
    zero = state.first_trace == 0  # sigma_max = 0: cannot hold the maximum
    minus_inf = tf.constant(-math.inf, tf.float64)
    upper = tf.where(zero, minus_inf, _log_upper_bound(state))
    upper = tf.where(tf.math.is_nan(upper), -minus_inf, upper)  # kept, or no pruning
    lower = tf.where(zero, minus_inf, _log_lower_bound(state))
    top = tf.math.top_k(upper, keep + 1)
    prunable = top.values[keep] < tf.reduce_max(lower) - 1e-9
    return top.indices[:keep], prunable


def _largest_gram_bound(matrices: tf.Tensor, iterations: int) -> tf.Tensor:
    """`max(_gram_iteration(matrices, iterations))`, the later squarings only
    for the matrices that can hold the maximum: after `PRUNE_AFTER` squarings
    the batch // 8 with the largest upper bounds go on when every other one is
    certified below the maximum (`_frequencies_to_keep`), else all of them do.
    The result is the same number either way: the maximum's matrix is kept."""
    batch, gram_size = matrices.shape[0], matrices.shape[-1]
    if gram_size == 1 or batch is None or batch < 16 or iterations <= PRUNE_AFTER:
        return tf.reduce_max(_gram_iteration(matrices, iterations))
    first = PRUNE_AFTER
    state = _gram_squarings(_gram_start(matrices), first)

    def finish(part: _GramState) -> tf.Tensor:
        part = _gram_squarings(part, iterations - first)
        return tf.reduce_max(_certified(_log_upper_bound(part), part))

    indices, prunable = _frequencies_to_keep(state)
    kept = _GramState(
        tf.gather(state.h, indices),
        tf.gather(state.log_trace, indices),
        state.power,
        tf.gather(state.first_trace, indices),
    )
    return tf.cond(prunable, lambda: finish(kept), lambda: finish(state))


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
    w, scale = _as_float64(matrix)
    if w.shape[0] is not None and w.shape[1] is not None and w.shape[0] < w.shape[1]:
        w = tf.transpose(w)
    bound = scale * _gram_iteration(w[None], iterations)[0]
    return _float32_certificate(bound + _flush_allowance(matrix, 1))


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
    grid = (int(input_size[0]) + kh - 1, int(input_size[1]) + kw - 1)
    # K^(w) = sum over taps t of e^(-i w.t) K_t: one matmul with the phases.
    # Its Gram iteration runs on min(c_in, c_out) x min(c_in, c_out) Grams, so
    # a kernel with more outputs gives (K^(w))^H = sum_t e^(+i w.t) K_t^T.
    adjoint = c_in < c_out
    if adjoint:
        kernel = tf.transpose(kernel, (0, 1, 3, 2))
    real, scale = _as_float64(kernel)
    taps = tf.reshape(tf.cast(real, tf.complex128), (kh * kw, c_in * c_out))
    phases = tf.constant(_half_spectrum_phases((kh, kw), grid, conjugate=adjoint))
    shape = (-1, c_out, c_in) if adjoint else (-1, c_in, c_out)
    matrices = tf.reshape(tf.matmul(phases, taps), shape)
    bound = scale * _largest_gram_bound(matrices, iterations)
    return _float32_certificate(bound + _flush_allowance(kernel, kh * kw))


def _as_float64(weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(weights / scale in float64, scale): a float64 input is divided by
    its largest magnitude, so its Gram products neither underflow (entries
    under 1e-154) nor overflow; narrower inputs are cast (their squares stay
    within float64's range) with scale 1."""
    if weights.dtype != tf.float64:
        return tf.cast(weights, tf.float64), tf.constant(1.0, tf.float64)
    largest = tf.reduce_max(tf.abs(weights))
    scale = tf.where(largest > 0, largest, tf.ones_like(largest))
    return weights / scale, scale


def _flush_allowance(weights: tf.Tensor, taps: int) -> tf.Tensor:
    """What flushing subnormals to zero can hide (float64 scalar): this CPU
    reads a float32 or bfloat16 subnormal as 0 in the cast to float64, and a
    float64 subnormal as 0 in float64 arithmetic, while a GPU may still
    compute with them. Each hidden entry is under the dtype's smallest normal
    (2^-126, 2^-1022), so the hidden kernel has a norm under
    taps * sqrt(entries per tap) * that (each tap acts through a shift of
    norm <= 1). Float16 subnormals convert exactly."""
    smallest_normal = {
        tf.float32: 2.0**-126,
        tf.bfloat16: 2.0**-126,
        tf.float64: 2.0**-1022,
    }
    dtype = tf.as_dtype(weights.dtype)  # numpy arrays too
    if dtype not in smallest_normal:
        return tf.constant(0.0, tf.float64)
    per_tap = math.prod(int(d) for d in weights.shape) // taps
    allowance = taps * math.sqrt(per_tap) * smallest_normal[dtype]
    return tf.constant(allowance, tf.float64)


def _float32_certificate(bound: tf.Tensor) -> tf.Tensor:
    """A float64 bound as a float32 certificate never below it, the one
    conversion of every certificate: NaN (no bound) is +inf; the cast is
    rounded UP when it rounded down; a positive bound is never below the
    smallest normal float32 (the cast of a bound under 1.2e-38 would be
    flushed to 0, a certificate of 0 for a nonzero kernel)."""
    bound = tf.where(tf.math.is_nan(bound), tf.constant(math.inf, tf.float64), bound)
    bound32 = tf.cast(bound, tf.float32)
    rounded_down = tf.cast(bound32, tf.float64) < bound
    bound32 = tf.where(
        rounded_down, tf.math.nextafter(bound32, tf.constant(math.inf)), bound32
    )
    # positive by its bits: this CPU reads a float64 subnormal as 0 in `> 0`
    positive = tf.bitcast(bound, tf.int64) > 0
    floor = tf.constant(np.finfo(np.float32).tiny, tf.float32)
    return tf.where(positive & (bound32 < floor), floor, bound32)


@functools.lru_cache(maxsize=64)
def _half_spectrum_phases(
    kernel_size: tuple[int, int], grid: tuple[int, int], conjugate: bool
) -> np.ndarray:
    """(frequencies, kh * kw) complex128 matrix of e^(-2 pi i (u a / gh +
    v b / gw)) (conjugated if `conjugate`), for the real FFT's frequencies
    (u, v) in [0, gh) x [0, gw // 2] (the others are the conjugates of these,
    with the same singular values) and the taps (a, b) in row-major order. The
    angles are reduced modulo 1 in integers before the float64 cos and sin."""
    (kh, kw), (gh, gw) = kernel_size, grid
    u = np.arange(gh)[:, None, None, None]
    v = np.arange(gw // 2 + 1)[None, :, None, None]
    a = np.arange(kh)[None, None, :, None]
    b = np.arange(kw)[None, None, None, :]
    turns = ((u * a) % gh) / gh + ((v * b) % gw) / gw
    phases = np.exp((2j if conjugate else -2j) * np.pi * turns)
    return phases.reshape(gh * (gw // 2 + 1), kh * kw)


def _working_dtype(tensor) -> tuple[tf.DType, tf.DType]:
    """(the dtype of `tensor`, the dtype a projection computes it in): float32
    for 16-bit tensors (their range and precision are too small for a
    division by the certificate or Björck's iteration), else its own."""
    dtype = tf.as_dtype(tensor.dtype)
    return dtype, tf.float32 if dtype.size == 2 else dtype


def rescale_to_certificate(
    kernel: tf.Tensor, bound: tf.Tensor, taps: int = 1
) -> tuple[tf.Tensor, tf.Tensor]:
    """`kernel / bound` (a projection's last step: certificate ~1) and the
    certified Lipschitz bound of that computed quotient
    (`rescaled_certificate`). A zero or infinite bound leaves the kernel as
    it is (a division by +inf would zero it, silently: its certificate stays
    +inf instead). The division runs in `_working_dtype` and the quotient is
    cast to the kernel's dtype (its rounding is part of the error
    `rescaled_certificate` measures)."""
    usable = (bound > 0) & tf.math.is_finite(bound)
    divisor = tf.where(usable, bound, tf.ones_like(bound))
    dtype, compute = _working_dtype(kernel)
    quotient = tf.cast(kernel, compute) / tf.cast(divisor, compute)
    rescaled = tf.cast(quotient, dtype)
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
    Subnormal entries of `rescaled` read as 0 by the cast hide at most
    `_flush_allowance`, which is added. The float64 sums and norms are
    covered by a 1e-9 relative margin, and the result is rounded UP to
    float32 (`_float32_certificate`).

    Args:
        kernel: (taps..., c_in, c_out) with the taps leading, or a matrix.
        bound: scalar, a certified Lipschitz bound of `kernel`.
        divisor: scalar > 0.
        rescaled: `kernel / divisor` as computed (any float dtype).
        taps: kh * kw for a convolution kernel, 1 for a matrix.

    Returns:
        Scalar float32 tensor >= the Lipschitz constant of `rescaled`: +inf
        when the bound is +inf or a kernel holds NaN or Inf.
    """
    divisor = tf.cast(divisor, tf.float64)
    exact = tf.cast(kernel, tf.float64) / divisor  # within 2^-53 of the quotient
    error = tf.abs(tf.cast(rescaled, tf.float64) - exact) + 2.0**-52 * tf.abs(exact)
    per_tap = tf.norm(tf.reshape(error, (taps, -1)), axis=1)
    hidden = _flush_allowance(rescaled, taps)
    total = (tf.cast(bound, tf.float64) / divisor + tf.reduce_sum(per_tap) + hidden) * (
        1.0 + 1e-9
    )
    return _float32_certificate(total)


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
    A 16-bit matrix is projected in float32 (`_working_dtype`: Björck's
    iteration overflowed to NaN in float16) and cast back.
    """
    dtype, compute = _working_dtype(matrix)
    normalized, new_u, _ = spectral_normalization(
        tf.cast(matrix, compute), tf.cast(u, compute)
    )
    # A zero or NaN matrix gives a zero or NaN vector, from which the power
    # iteration never recovers: such a vector is not kept.
    usable = tf.reduce_all(tf.math.is_finite(new_u)) & tf.reduce_any(new_u != 0)
    u.assign(tf.where(usable, tf.cast(new_u, u.dtype), u))
    if orthogonalize:
        normalized = bjorck_normalization(normalized)
    return tf.cast(normalized * target, dtype)
