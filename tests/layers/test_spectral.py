import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext import layers as L
from deel_lipdp_ext.layers.spectral import (
    GRAM_ITERATIONS,
    _float32_certificate,
    _frequencies_to_keep,
    _gram_iteration,
    _gram_squarings,
    _gram_start,
    _largest_gram_bound,
    conv_operator_norm_upper_bound,
    conv_overlap,
    rescale_to_certificate,
    rescaled_certificate,
    spectral_norm_upper_bound,
)


@given(
    st.integers(1, 40), st.integers(1, 40), st.integers(0, 10_000), st.floats(1e-3, 1e3)
)
def test_gram_bound_is_an_upper_bound_and_tight(m, n, seed, scale):
    w = np.random.default_rng(seed).normal(size=(m, n)) * scale
    true = np.linalg.norm(w, 2)
    bound = float(spectral_norm_upper_bound(tf.constant(w, tf.float32)))
    assert bound >= true * (1 - 1e-6)
    assert bound <= true * 1.002


def test_gram_bound_on_orthogonal_and_rank_one_and_zero():
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(256, 256)))
    b = float(spectral_norm_upper_bound(tf.constant(q)))
    assert 1.0 <= b <= 1.001  # all singular values equal: the hardest case for Gram
    u = np.outer(np.arange(1, 6), np.arange(1, 4)).astype(float)
    assert float(spectral_norm_upper_bound(tf.constant(u))) >= np.linalg.norm(u, 2)
    assert float(spectral_norm_upper_bound(tf.zeros((3, 4), tf.float16))) == 0.0
    # float32: what flushed subnormals could hide, sqrt(12) * 2^-126; float64:
    # sqrt(12) * 2^-1022, as float32 the smallest normal
    zero32 = float(spectral_norm_upper_bound(tf.zeros((3, 4))))
    assert 0.0 < zero32 <= np.sqrt(12) * 2.0**-126 * 1.001
    zero64 = float(spectral_norm_upper_bound(tf.zeros((3, 4), tf.float64)))
    assert zero64 == np.finfo(np.float32).tiny


@given(
    st.integers(1, 24), st.integers(1, 24), st.integers(-100, 100), st.integers(0, 999)
)
def test_gram_bound_keeps_its_scale_across_renormalisations(m, n, exponent, seed):
    """The iterate is renormalised every few squarings and the scale kept as
    logs: float64 matrices from 1e-100 to 1e100 (beyond float32's range: the
    first Gram product must not underflow), with singular values spread
    over many decades, are bounded from above and tightly (in float64); the
    float32 certificate of a positive bound is never flushed below the
    smallest normal float32."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    spread = 10.0 ** -rng.uniform(0, 12, size=min(m, n))
    w = (u[:, : min(m, n)] * spread) @ v[: min(m, n)] * 10.0**exponent
    true = np.linalg.norm(w, 2)
    bound = float(_gram_iteration(tf.constant(w)[None], GRAM_ITERATIONS)[0])
    assert true * (1 - 1e-6) <= bound <= true * 1.002
    certificate = float(spectral_norm_upper_bound(tf.constant(w)))
    assert certificate >= min(true, np.finfo(np.float32).tiny)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_inf_kernel_has_no_finite_certificate(bad, jit):
    """A non-finite entry gives +inf (no finite bound), also under XLA, whose
    reduce_max on CPU skips NaN: the old Frobenius guard turned a NaN kernel
    into the certificate 0, and a NaN passed to a maximum can vanish."""
    matrix = np.ones((4, 3), np.float32)
    matrix[1, 2] = bad
    kernel = np.ones((3, 3, 2, 4), np.float32)
    kernel[0, 1, 1, 3] = bad
    layer = _conv_layer(4, 3, 1, "same", (5, 5, 2))
    strided = _conv_layer(4, 3, 2, "same", (5, 5, 2))  # both bounds, a minimum
    certificates = tf.function(
        lambda m, k: (
            spectral_norm_upper_bound(m),
            conv_operator_norm_upper_bound(k, (5, 5)),
            layer._certificate(k),
            strided._certificate(k),
        ),
        jit_compile=jit,
    )
    for certificate in certificates(tf.constant(matrix), tf.constant(kernel)):
        assert float(certificate) == np.inf


@pytest.mark.parametrize("shape", [(5, 3), (64, 4), (3, 3, 2, 2), (2, 3, 1, 5)])
def test_subnormal_kernels_are_not_certified_below_their_norm(shape):
    """This CPU reads float32 subnormals as 0 when casting them (a GPU may
    compute with them): subnormal and mixed kernels, one normal entry among
    subnormals included, keep a certificate above their exact norm."""
    rng = np.random.default_rng(len(shape))
    for values in (
        np.full(shape, 1e-40, np.float32),
        (rng.uniform(-1, 1, shape) * 1.1e-38).astype(np.float32),
        np.where(np.arange(np.prod(shape)).reshape(shape) == 0, 1.2e-38, 1.1e-38),
    ):
        values = values.astype(np.float32)
        exact64 = values.astype(np.float64)  # numpy does not flush
        if len(shape) == 2:
            exact = np.linalg.norm(exact64, 2)
            certificate = float(spectral_norm_upper_bound(tf.constant(values)))
        else:
            exact = np.max(
                np.linalg.svd(
                    _full_spectrum_matrices(exact64, (4, 4)), compute_uv=False
                )
            )
            certificate = float(
                conv_operator_norm_upper_bound(tf.constant(values), (4, 4))
            )
        assert exact > 0 and certificate >= exact


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 2)])
def test_16_bit_subnormal_kernels_are_not_certified_below_their_norm(dtype, shape):
    """bfloat16 subnormals (float32's exponent range) are read as 0 by the
    cast to float64 on this CPU and get the float32 flush allowance; float16
    subnormals convert exactly and get none. Both claims, attacked with
    all-subnormal kernels and one normal entry among subnormals."""
    tiny = float(tf.experimental.numpy.finfo(dtype).tiny)
    for values in (
        np.full(shape, tiny / 3),
        np.where(np.arange(np.prod(shape)).reshape(shape) == 0, tiny, tiny / 3),
    ):
        values = values.astype(tf.as_dtype(dtype).as_numpy_dtype)
        kernel = tf.constant(values)
        exact64 = values.astype(np.float64)  # numpy does not flush
        if len(shape) == 2:
            exact = np.linalg.norm(exact64, 2)
            certificate = float(spectral_norm_upper_bound(kernel))
        else:
            exact = np.max(
                np.linalg.svd(
                    _full_spectrum_matrices(exact64, (4, 4)), compute_uv=False
                )
            )
            certificate = float(conv_operator_norm_upper_bound(kernel, (4, 4)))
        assert exact > 0 and certificate >= exact


@pytest.mark.parametrize("scale", [1e-310, 1e-300, 1e-155, 1e150, 1e300])
def test_float64_matrices_far_from_one_are_bounded(scale):
    """A float64 input is divided by its largest entry before the Gram
    products (which would underflow or overflow), and all-subnormal ones
    (which this CPU reads as 0) get the flush allowance: the certificate is never
    below the norm (the smallest normal float32 at least, +inf beyond
    float32's range)."""
    w = np.random.default_rng(0).normal(size=(6, 4)) * scale
    true = np.linalg.norm(w, 2)
    certificate = float(spectral_norm_upper_bound(tf.constant(w)))
    assert certificate >= min(true, np.finfo(np.float32).tiny)
    if true > np.finfo(np.float32).max:
        assert certificate == np.inf
    else:
        assert certificate <= max(true * 1.002, np.finfo(np.float32).tiny)
    kernel = np.random.default_rng(1).normal(size=(3, 3, 2, 4)) * scale
    exact = np.max(
        np.linalg.svd(_full_spectrum_matrices(kernel, (4, 4)), compute_uv=False)
    )
    conv = float(conv_operator_norm_upper_bound(tf.constant(kernel), (4, 4)))
    assert conv >= min(exact, np.finfo(np.float32).tiny)


def test_conv_overlap():
    assert conv_overlap((3, 3), (1, 1)) == 9
    assert conv_overlap((3, 3), (2, 2)) == 4
    assert conv_overlap((2, 2), (2, 2)) == 1
    assert conv_overlap((5, 1), (2, 1)) == 3


# ------------------------------------------- convolution operator certificate
def _conv_layer(
    filters, kernel, strides, padding, input_shape, orthogonal=False, **kwargs
):
    cls = L.DP_SpectralConv2D if orthogonal else L.DP_QuickSpectralConv2D
    layer = cls(filters, kernel, strides=strides, padding=padding, **kwargs)
    layer.build((None, *input_shape))
    return layer


def _exact_operator_norm(kernel, strides, padding, input_shape):
    """Largest singular value of the convolution as a dense matrix (the layer
    applied to every basis image), by SVD: the truth, for small inputs."""
    h, w, c = input_shape
    basis = tf.reshape(tf.eye(h * w * c, dtype=tf.float64), (-1, h, w, c))
    out = tf.nn.conv2d(basis, tf.cast(kernel, tf.float64), strides, padding.upper())
    matrix = tf.reshape(out, (h * w * c, -1))
    return tf.linalg.svd(matrix, compute_uv=False)[0]


#: The kernel families of `_kernel`.
KERNEL_KINDS = st.sampled_from(["gaussian", "equal", "checkerboard", "spike"])


def _kernel(kind, shape, rng):
    kh, kw, cin, cout = shape
    if kind == "gaussian":
        return rng.normal(size=shape)
    if kind == "equal":  # all mass at frequency 0: the boundary matters most
        return np.ones(shape)
    if kind == "checkerboard":  # all mass at the highest frequency
        sign = (-1.0) ** np.add.outer(np.arange(kh), np.arange(kw))
        return np.broadcast_to(sign[:, :, None, None], shape).copy()
    spike = np.zeros(shape)
    spike[kh // 2, kw // 2] = rng.normal(size=(cin, cout))
    return spike


@given(
    st.integers(1, 5),
    st.integers(1, 5),
    st.sampled_from([1, 2, 3]),
    st.sampled_from(["same", "valid"]),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(1, 3),
    st.integers(1, 3),
    KERNEL_KINDS,
    st.integers(0, 10_000),
)
def test_conv_certificate_is_never_below_the_exact_operator_norm(
    kh, kw, stride, padding, extra_h, extra_w, cin, cout, kind, seed
):
    shape = (kh + extra_h, kw + extra_w, cin)
    layer = _conv_layer(cout, (kh, kw), stride, padding, shape)
    kernel = _kernel(kind, (kh, kw, cin, cout), np.random.default_rng(seed))
    layer.kernel.assign(kernel.astype(np.float32))
    exact = float(_exact_operator_norm(layer.kernel, stride, padding, shape))
    assert float(layer.lipschitz_bound()) >= exact * (1 - 1e-6)


@given(
    st.tuples(
        st.integers(1, 5), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6)
    ),
    st.tuples(st.integers(0, 6), st.integers(0, 6)),
    KERNEL_KINDS,
    st.integers(0, 10_000),
)
def test_conv_operator_bound_is_the_full_spectrum_norm(shape, extra, kind, seed):
    """The phases matmul on the real FFT's half grid (either orientation,
    1 x 1 Grams included) gives the largest singular value over ALL the
    frequencies of the (H + kh - 1, W + kw - 1) grid (numpy's full FFT, SVD),
    from above and within the Gram slack."""
    size = (shape[0] + extra[0], shape[1] + extra[1])
    kernel = _kernel(kind, shape, np.random.default_rng(seed)).astype(np.float32)
    spectrum = _full_spectrum_matrices(kernel.astype(np.float64), size)
    exact = np.max(np.linalg.svd(spectrum, compute_uv=False))
    bound = float(conv_operator_norm_upper_bound(tf.constant(kernel), size))
    assert exact * (1 - 1e-9) <= bound <= exact * 1.002 + 1e-30


@given(
    st.sampled_from([((3, 3), 1), ((2, 2), 1), ((1, 3), 1), ((2, 2), 2), ((3, 2), 3)]),
    st.integers(1, 4),
    st.integers(1, 4),
    KERNEL_KINDS,
    st.integers(0, 10_000),
)
def test_a_conv_computes_only_the_bound_that_can_be_the_smaller(
    kernel_stride, cin, cout, kind, seed
):
    """With unit strides the layer computes the operator bound alone, without
    overlap (kernel <= stride) the reshaped bound alone: the skipped one is
    never smaller beyond the Gram slack, whatever the kernel."""
    kernel_size, stride = kernel_stride
    shape = (6, 7, cin)
    layer = _conv_layer(cout, kernel_size, stride, "same", shape)
    kernel = _kernel(kind, (*kernel_size, cin, cout), np.random.default_rng(seed))
    kernel = tf.constant(kernel.astype(np.float32))
    reshaped = np.sqrt(layer.overlap) * float(
        spectral_norm_upper_bound(tf.reshape(kernel, (-1, cout)))
    )
    operator = float(conv_operator_norm_upper_bound(kernel, shape[:2]))
    certificate = float(layer._certificate(kernel))
    assert certificate <= min(reshaped, operator) * 1.002 + 1e-30
    assert certificate >= float(_exact_operator_norm(kernel, stride, "same", shape))


def _batch_with_spectra(rng, batch, n, kind):
    """(batch, n, n) complex matrices with chosen singular values: `flat`
    ones (all equal: the loosest early bounds), `ties` (every matrix's top
    value within 1e-6 of the others), or `spread` (one decade per matrix)."""
    tops = {
        "flat": rng.uniform(0.5, 1.0, batch),
        "ties": 1.0 + 1e-6 * rng.uniform(size=batch),
        "spread": 10.0 ** rng.uniform(-1, 1, batch),
    }[kind]
    matrices = []
    for top in tops:
        u, _ = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
        v, _ = np.linalg.qr(rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n)))
        values = np.full(n, top) if kind == "flat" else top * rng.uniform(0, 1, n)
        values[0] = top
        matrices.append((u * values) @ v)
    return np.stack(matrices), tops.max()


@given(
    st.integers(16, 80),
    st.integers(2, 8),
    st.sampled_from(["flat", "ties", "spread"]),
    st.integers(0, 10_000),
)
def test_pruned_frequencies_give_the_unpruned_certificate(batch, n, kind, seed):
    """The later squarings run only for the matrices that can hold the
    maximum: the result is the unpruned maximum (to float64 rounding) and
    never below the true largest singular value, for flat spectra, near ties
    and spread ones."""
    matrices, true = _batch_with_spectra(np.random.default_rng(seed), batch, n, kind)
    matrices = tf.constant(matrices)
    pruned = float(_largest_gram_bound(matrices, 10))
    unpruned = float(tf.reduce_max(_gram_iteration(matrices, 10)))
    assert pruned == pytest.approx(unpruned, rel=1e-12)
    assert pruned >= true


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("position", [0, 17, 63])
def test_a_nan_matrix_in_a_batch_is_never_pruned_away(jit, position):
    """One NaN matrix among 64 gives +inf, pruned or not, also under XLA
    (whose reduce_max on CPU skips NaN)."""
    matrices, _ = _batch_with_spectra(np.random.default_rng(position), 64, 4, "spread")
    matrices[position, 1, 2] = np.nan
    largest = tf.function(lambda m: _largest_gram_bound(m, 10), jit_compile=jit)
    assert float(largest(tf.constant(matrices))) == np.inf


def _full_spectrum_matrices(kernel, size):
    kh, kw, cin, cout = kernel.shape
    padded = np.zeros((size[0] + kh - 1, size[1] + kw - 1, cin, cout))
    padded[:kh, :kw] = kernel
    return np.fft.fft2(padded, axes=(0, 1)).reshape(-1, cin, cout)


def test_pruning_keeps_the_largest_frequency_and_runs_for_typical_kernels():
    """After three squarings a random 3x3x32x16 kernel on 14x14 needs at most
    an eighth of its 256 frequencies, among them the one with the largest
    singular value; with every frequency equal (a 1x1 kernel) nothing can be
    dropped."""
    rng = np.random.default_rng(0)
    matrices = _full_spectrum_matrices(rng.normal(size=(3, 3, 32, 16)), (14, 14))
    state = _gram_squarings(_gram_start(tf.constant(matrices)), 3)
    indices, prunable = _frequencies_to_keep(state)
    top = np.argmax(np.linalg.svd(matrices, compute_uv=False)[:, 0])
    assert bool(prunable) and top in indices.numpy() and len(indices) == 256 // 8
    flat = _full_spectrum_matrices(rng.normal(size=(1, 1, 32, 16)), (14, 14))
    state = _gram_squarings(_gram_start(tf.constant(flat)), 3)
    assert not bool(_frequencies_to_keep(state)[1])


def test_adversarially_optimised_kernels_stay_below_the_certificate():
    """Gradient ascent on exact norm / certificate over the kernel, for each
    padding and stride: the ratio never exceeds 1."""
    for stride, padding in [(1, "same"), (1, "valid"), (2, "same"), (2, "valid")]:
        shape = (6, 6, 2)
        layer = _conv_layer(2, 3, stride, padding, shape)
        kernel = tf.Variable(np.random.default_rng(stride).normal(size=(3, 3, 2, 2)))
        optimizer = keras.optimizers.Adam(0.05)
        worst = 0.0
        for _ in range(40):
            with tf.GradientTape() as tape:
                exact = _exact_operator_norm(kernel, stride, padding, shape)
                certificate = tf.cast(layer._certificate(kernel), tf.float64)
                ratio = exact / certificate
            worst = max(worst, float(ratio))
            optimizer.apply([-tape.gradient(ratio, kernel)], [kernel])
        assert worst <= 1.0 + 1e-6, (stride, padding, worst)
        assert worst > 0.9  # the search found near-tight kernels


def _power_iteration_norm(layer, input_shape, steps=200):
    x = tf.random.stateless_normal((1, *input_shape), seed=(0, 1))
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(x)
            energy = 0.5 * tf.reduce_sum(tf.square(layer(x)))
        g = tape.gradient(energy, x)
        x = g / tf.norm(g)
    return float(tf.norm(layer(x)))  # a LOWER bound of the operator norm


@pytest.mark.parametrize("channels", [16, 32])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("orthogonal", [False, True])
def test_conv_certificate_is_tight_on_28x28(channels, kernel_size, orthogonal):
    """The old certificate sqrt(kh kw) ||M||_2 was 1.3-2.5x the truth: every
    conv lost a third of its signal. Now true / certified >= 0.9, for random
    kernels and for projected layers (which are then ~1-Lipschitz for real)."""
    shape = (28, 28, channels)
    layer = _conv_layer(channels, kernel_size, 1, "same", shape, orthogonal)
    rng = np.random.default_rng(kernel_size)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    certificate = float(layer.lipschitz_bound())
    assert _power_iteration_norm(layer, shape) / certificate >= 0.9
    layer.project()
    assert float(layer.lipschitz_bound()) == pytest.approx(1.0, abs=2e-3)
    assert _power_iteration_norm(layer, shape) >= 0.9


def test_a_conv_certified_for_one_input_size_refuses_another():
    layer = _conv_layer(4, 3, 1, "same", (8, 8, 2))
    layer(tf.zeros((1, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        layer(tf.zeros((1, 16, 16, 2)))


# ------------------------------ the certificate of a rescaled kernel
def _top_singular_pair(matrix):
    u, _, vt = np.linalg.svd(matrix)
    return u[:, 0], vt[0]


@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 10_000),
    st.sampled_from([0.0, 1e-7, 1e-6, 1e-3]),
    st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_rescaled_certificate_covers_a_wrong_division(m, n, seed, error, dtype):
    """`rescaled` is kernel / bound as computed, then pushed along the top
    singular direction (a division that rounds, or is computed, badly) and
    stored in `dtype`: the certificate still bounds its exact norm."""
    kernel = np.random.default_rng(seed).normal(size=(m, n)).astype(np.float32)
    true = np.linalg.norm(kernel.astype(np.float64), 2)
    bound = np.nextafter(np.float32(true), np.float32(np.inf))  # a tight certificate
    u, v = _top_singular_pair(kernel.astype(np.float64))
    rescaled = (kernel.astype(np.float64) / bound + error * np.outer(u, v)).astype(
        dtype
    )
    certificate = float(
        rescaled_certificate(
            tf.constant(kernel), tf.constant(bound), tf.constant(bound), rescaled
        )
    )
    exact = np.linalg.norm(rescaled.astype(np.float64), 2)
    assert certificate >= exact
    assert certificate <= exact * (1 + 1e-5) + 2 * error + 1e-3 * (dtype == np.float16)


@pytest.mark.parametrize("shape, taps", [((5, 3), 1), ((3, 3, 2, 2), 9)])
def test_rescaled_certificate_covers_subnormal_quotients(shape, taps):
    """A quotient whose entries are float32 subnormals (read as 0 by this
    CPU's cast to float64) still gets a certificate above its norm."""
    rescaled = np.full(shape, 1e-40, np.float32)
    certificate = float(
        rescaled_certificate(
            tf.zeros(shape), tf.constant(0.0), tf.constant(1.0), rescaled, taps=taps
        )
    )
    if taps == 1:
        exact = np.linalg.norm(rescaled.astype(np.float64), 2)
    else:
        exact = float(
            _exact_operator_norm(rescaled.astype(np.float64), 1, "same", (4, 4, 2))
        )
    assert exact > 0 and certificate >= exact


@pytest.mark.parametrize("stride, padding", [(1, "same"), (1, "valid"), (2, "same")])
def test_rescaled_certificate_sums_the_error_over_the_taps(stride, padding):
    """The same rank-one error on every tap of a 3x3 kernel adds up over the
    taps (its operator norm is ~9 eps on a large input): a Frobenius norm of
    the whole error (3 eps) would be below it."""
    eps = 1e-3
    a, b = np.array([0.6, 0.8]), np.array([1.0, 0.0, 0.0])
    error = np.broadcast_to(eps * np.outer(a, b), (3, 3, 2, 3)).astype(np.float32)
    zero = tf.zeros((3, 3, 2, 3))
    certificate = float(
        rescaled_certificate(zero, tf.constant(0.0), tf.constant(1.0), error, taps=9)
    )
    shape = (8, 8, 2)
    exact = float(_exact_operator_norm(error, stride, padding, shape))
    assert exact > 1.2 * np.linalg.norm(error)  # the tap sum is needed
    assert certificate >= exact


@given(
    st.sampled_from([(1, "same"), (1, "valid"), (2, "same"), (2, "valid")]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.booleans(),
    st.integers(0, 10_000),
    st.floats(1e-3, 1e3),
)
def test_the_projected_kernels_certificate_bounds_its_exact_norm(
    stride_padding, cin, cout, orthogonal, seed, scale
):
    """The certificate a conv's projection remembers (and the next bound pass
    serves) is never below the exact operator norm of the assigned kernel."""
    stride, padding = stride_padding
    shape = (5, 5, cin)
    layer = _conv_layer(cout, 3, stride, padding, shape, orthogonal)
    rng = np.random.default_rng(seed)
    layer.kernel.assign(
        (scale * rng.normal(size=layer.kernel.shape)).astype(np.float32)
    )
    layer.project()
    certificate = float(layer.lipschitz_bound())
    exact = float(_exact_operator_norm(layer.kernel, stride, padding, shape))
    assert certificate >= exact
    assert certificate == pytest.approx(1.0, abs=2e-3)


@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 10_000), st.booleans())
def test_the_projected_dense_kernels_certificate_bounds_its_exact_norm(
    n_in, units, seed, orthogonal
):
    layer = (L.DP_SpectralDense if orthogonal else L.DP_QuickSpectralDense)(units)
    layer.build((None, n_in))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(n_in, units)).astype(np.float32) * 7.0)
    layer.project()
    exact = np.linalg.norm(np.asarray(layer.kernel, np.float64), 2)
    assert float(layer.lipschitz_bound()) >= exact


def _layer_and_exact_norm(conv, orthogonal, shape=(6, 6, 2), strides=1, **kwargs):
    """A built spectral layer with 3 outputs (conv: 3x3, "same", on `shape`;
    dense: on shape[-1] inputs) and a function giving the exact norm of the
    kernel it holds (SVD, float64)."""
    if conv:
        layer = _conv_layer(3, 3, strides, "same", shape, orthogonal, **kwargs)
        return layer, lambda: float(
            _exact_operator_norm(layer.kernel, strides, "same", shape)
        )
    layer = (L.DP_SpectralDense if orthogonal else L.DP_QuickSpectralDense)(3, **kwargs)
    layer.build((None, shape[-1]))
    return layer, lambda: np.linalg.norm(np.asarray(layer.kernel).astype(np.float64), 2)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_spectral_layers_of_other_float_dtypes_project_and_certify(
    dtype, orthogonal, conv
):
    """A layer built with dtype="float64" crashed in `build` (a float64 kernel
    divided by the float32 certificate); each dtype now keeps its kernel dtype
    and a certificate never below the exact norm of the kernel it stores."""
    # Keras's orthogonal initializer has no bfloat16 QR
    init = "glorot_uniform" if dtype == "bfloat16" else "orthogonal"
    layer, exact = _layer_and_exact_norm(
        conv, orthogonal, strides=2, kernel_initializer=init, dtype=dtype
    )
    assert layer.kernel.dtype == dtype
    assert float(layer.lipschitz_bound()) >= exact()
    rng = np.random.default_rng(0)
    # 3e4: a float16 kernel whose norm (~1e5) is above float16's range
    for scale in (5.0, 3e4):
        kernel = scale * rng.normal(size=layer.kernel.shape)
        layer.kernel.assign(np.clip(kernel, -6e4, 6e4).astype(dtype))
        layer.project()
        assert layer.kernel.dtype == dtype
        certificate = float(layer.lipschitz_bound())
        assert 0.5 <= exact() <= certificate <= 1.05, scale


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_rescaled_certificate_of_an_infinite_bound_or_a_nan_kernel_is_inf(bad):
    """inf / inf gave a NaN certificate, which no comparison can read as a
    bound; it is +inf."""
    kernel = tf.constant([[1.0, 2.0], [3.0, bad]])
    bound = tf.constant(math.inf)
    _, certificate = rescale_to_certificate(kernel, bound)
    assert float(certificate) == math.inf
    certificate = rescaled_certificate(
        kernel, tf.constant(4.0), tf.constant(4.0), kernel / 4.0
    )
    assert float(certificate) == math.inf


@pytest.mark.parametrize("conv", [False, True])
def test_the_power_iteration_recovers_after_a_zero_or_nan_kernel(conv):
    """A zero kernel (here the initializer's) or a NaN one set the power
    iteration's vector to 0 or NaN for good: every later projection of the
    Björck layers gave a NaN kernel. That vector is no longer kept."""
    layer, exact = _layer_and_exact_norm(conv, True, kernel_initializer="zeros")
    rng = np.random.default_rng(0)
    for poison in (0.0, math.nan):
        layer.kernel.assign(np.full(layer.kernel.shape, poison, np.float32))
        layer.project()
        layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
        layer.project()
        kernel = np.asarray(layer.kernel)
        assert np.isfinite(kernel).all() and np.abs(kernel).max() > 0, poison
        assert 0.5 <= exact() <= float(layer.lipschitz_bound()) <= 1.05, poison


@pytest.mark.parametrize("conv", [False, True])
def test_a_kernel_whose_certificate_overflows_is_not_silently_zeroed(conv):
    """Entries near the float32 maximum: the certificate is +inf. Dividing by
    it zeroed the kernel, and the layer trained on as a dead one; the kernel
    is now left as it is, with certificate +inf (never NaN)."""
    layer, _ = _layer_and_exact_norm(conv, False)
    kernel = np.full(layer.kernel.shape, 3e38, np.float32)
    layer.kernel.assign(kernel)
    layer.project()
    np.testing.assert_array_equal(np.asarray(layer.kernel), kernel)
    assert float(layer.lipschitz_bound()) == math.inf


@given(
    st.one_of(
        st.floats(0.0, 1e300, allow_subnormal=True),
        st.floats(1.0, 1.0 + 1e-6),  # between two float32 neighbours of 1
        st.sampled_from([math.inf, math.nan, 3.5e38, 1e-39, 1e-320]),
    )
)
def test_every_certificate_is_rounded_up_to_float32(value):
    """The one float64 -> float32 conversion of the certificates never gives
    less than its input: NaN is +inf, a rounded-down cast is moved up one
    float32, a positive value is never flushed below the smallest normal."""
    certificate = float(_float32_certificate(tf.constant(value, tf.float64)))
    if math.isnan(value):
        assert certificate == math.inf
        return
    assert certificate >= value
    if 1.2e-38 < value < 3.4e38:  # tight: the next float32 at most
        assert certificate <= np.nextafter(np.float32(value), np.float32(np.inf))
