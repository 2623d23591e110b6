"""Image metrics against golden values (docs/ports.md) and an independent
NumPy reference written from the SSIM definition (explicit window loops)."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext.imaging import metrics


def _reference_ssim_parts(a, b):
    """SSIM maps of two 2-D float64 arrays, valid window, explicit loops."""
    n = min(11, *a.shape)
    coords = np.arange(1, n + 1) - (n + 1) / 2
    g = np.exp(-(coords**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    rows, cols = a.shape[0] - n + 1, a.shape[1] - n + 1
    lum = np.empty((rows, cols))
    cs = np.empty((rows, cols))
    for i in range(rows):
        for j in range(cols):
            pa, pb = a[i : i + n, j : j + n], b[i : i + n, j : j + n]
            ma, mb = (window * pa).sum(), (window * pb).sum()
            va = (window * pa * pa).sum() - ma**2
            vb = (window * pb * pb).sum() - mb**2
            cov = (window * pa * pb).sum() - ma * mb
            lum[i, j] = (2 * ma * mb + 1e-4) / (ma**2 + mb**2 + 1e-4)
            cs[i, j] = (2 * cov + 9e-4) / (va + vb + 9e-4)
    return lum, cs


def _reference_ms_ssim(a, b, powers=metrics.MS_SSIM_POWER_FACTORS):
    def down(x):
        x = np.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)), mode="edge")
        return x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))

    value = 1.0
    for p in powers[:-1]:
        _, cs = _reference_ssim_parts(a, b)
        value *= max(cs.mean(), 0.0) ** p
        a, b = down(a), down(b)
    lum, cs = _reference_ssim_parts(a, b)
    return value * max((lum * cs).mean(), 0.0) ** powers[-1]


def _golden_pair():
    x = np.linspace(0, 1, 16)
    a = np.outer(x, x)[None, :, :, None]
    return a, a**2


def test_ssim_golden_values():
    # docs/ports.md: NumPy float64, valid convolution; tolerance rel 1e-12.
    a, b = _golden_pair()
    assert float(metrics.ssim(a, b)[0, 0]) == pytest.approx(
        0.4209315435735542, rel=1e-12
    )
    assert float(metrics.ssim(a, b, weighted=True)[0, 0]) == pytest.approx(
        0.4632720757708981, rel=1e-12
    )


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (32, 32), (7, 13)])
def test_identical_images_score_one(size):
    x = np.random.rand(3, *size, 2)
    np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.ms_ssim(x, x), 1.0, rtol=1e-12)
    np.testing.assert_allclose(metrics.mse(x, x), 0.0, atol=0)
    # r = S / (S + 1e-8) by definition: 1 up to the 1e-8 guard.
    np.testing.assert_allclose(metrics.pearson_squared(x, x), 1.0, rtol=1e-7)


@given(
    height=st.integers(4, 24),
    width=st.integers(4, 24),
    seed=st.integers(0, 2**16),
    pair=st.sampled_from(["independent", "correlated"]),
)
def test_ssim_and_ms_ssim_match_the_loop_reference(height, width, seed, pair):
    rng = np.random.default_rng(seed)
    a = rng.random((height, width))
    b = (
        rng.random((height, width))
        if pair == "independent"
        else a + 0.1 * rng.random(a.shape)
    )
    lum, cs = _reference_ssim_parts(a, b)
    got = float(metrics.ssim(a[None, :, :, None], b[None, :, :, None])[0, 0])
    assert got == pytest.approx((lum * cs).mean(), rel=1e-10, abs=1e-12)
    got_ms = float(metrics.ms_ssim(a[None, :, :, None], b[None, :, :, None])[0, 0])
    assert got_ms == pytest.approx(_reference_ms_ssim(a, b), rel=1e-9, abs=1e-12)


def test_per_channel_and_broadcast_shapes():
    a = np.random.rand(4, 12, 12, 3)
    b = np.random.rand(1, 12, 12, 3)
    assert metrics.ssim(a, b).shape == (4, 3)
    assert metrics.ms_ssim(a, b).shape == (4, 3)
    assert metrics.mse(a, b).shape == (4, 3)
    per_channel = [
        float(metrics.ssim(a[:1, ..., c : c + 1], b[..., c : c + 1])[0, 0])
        for c in range(3)
    ]
    np.testing.assert_allclose(metrics.ssim(a, b)[0], per_channel, rtol=1e-12)
    np.testing.assert_allclose(metrics.mse(a, b), ((a - b) ** 2).mean(axis=(1, 2)))


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_padded_ssim_keeps_the_image_size_and_scores_one_on_itself(mode):
    x = np.random.rand(2, 9, 10, 1)
    y = np.random.rand(2, 9, 10, 1)
    np.testing.assert_allclose(metrics.ssim(x, x, pad=mode), 1.0, rtol=1e-12)
    assert float(tf.reduce_max(metrics.ssim(x, y, pad=mode))) < 1.0


def test_pearson_is_affine_invariant_and_zero_for_a_constant():
    a = np.random.rand(3, 8, 8, 1)
    np.testing.assert_allclose(metrics.pearson_squared(a, -3 * a + 2), 1.0, rtol=1e-7)
    np.testing.assert_allclose(metrics.pearson_squared(a, np.ones_like(a)), 0.0)


def test_gradients_are_finite_where_relu_and_sqrt_meet_zero():
    a = tf.Variable(np.random.rand(2, 8, 8, 1).astype("float32"))
    b = tf.constant(np.random.rand(2, 8, 8, 1).astype("float32"))
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(metrics.ms_ssim(a, b)) + tf.reduce_sum(
            metrics.pearson_squared(a, tf.ones_like(b))
        )
    grad = tape.gradient(value, a)
    assert np.isfinite(grad.numpy()).all()


def test_the_metric_is_differentiable_and_descends():
    target = tf.constant(np.random.rand(1, 16, 16, 1).astype("float32"))
    x = tf.Variable(np.random.rand(1, 16, 16, 1).astype("float32"))
    before = float(metrics.ssim(x, target)[0, 0])
    for _ in range(20):
        with tf.GradientTape() as tape:
            loss = 1 - metrics.ssim(x, target)[0, 0]
        x.assign_sub(0.5 * tape.gradient(loss, x))
    assert float(metrics.ssim(x, target)[0, 0]) > before + 0.1


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((8, 8, 1)), np.zeros((8, 8, 1)), "4-D"),
        (np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 9, 1)), "height and width"),
        (np.zeros((2, 8, 8, 1)), np.zeros((3, 8, 8, 1)), "batch"),
        (np.zeros((1, 8, 8, 2)), np.zeros((1, 8, 8, 3)), "channel"),
        (np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1), "float32"), "dtype"),
    ],
)
def test_bad_inputs_are_refused(a, b, match):
    with pytest.raises(ValueError, match=match):
        metrics.ssim(a, b)


def test_bad_padding_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        metrics.ssim(np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1)), pad="edge")
