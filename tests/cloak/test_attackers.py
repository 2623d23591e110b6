"""The attacker transforms of the image-similarity cloak loss."""

import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.cloak import attackers


def _images(shape=(3, 9, 7, 2), low=-0.3, high=1.3):
    return tf.constant(np.random.uniform(low, high, shape).astype("float64"))


def test_haar_is_orthonormal_and_invertible():
    x = _images((2, 6, 8, 3))
    bands = attackers.haar_forward(x)
    energy = sum(float(tf.reduce_sum(b**2)) for b in bands)
    assert energy == pytest.approx(float(tf.reduce_sum(x**2)), rel=1e-12)
    np.testing.assert_allclose(attackers.haar_inverse(*bands), x, atol=1e-12)


def test_wavelet_denoise_without_threshold_is_the_clamped_image():
    x = _images()  # odd height: replicate-padded then cropped
    np.testing.assert_allclose(
        attackers.wavelet_denoise(x, 0.0), attackers.clamp(x), atol=1e-12
    )


def test_wavelet_denoise_removes_small_details():
    flat = np.full((1, 8, 8, 1), 0.5)
    noisy = flat + np.random.uniform(-0.02, 0.02, flat.shape)
    denoised = attackers.wavelet_denoise(tf.constant(noisy), 0.1).numpy()
    ll = attackers.haar_forward(tf.constant(noisy))[0].numpy()
    # Details below the threshold are zeroed: each 2x2 block becomes its mean.
    np.testing.assert_allclose(denoised[0, ::2, ::2, 0], ll[0, :, :, 0] / 2, atol=1e-12)


def test_sobel_finds_a_vertical_edge_and_is_normalised():
    x = np.zeros((1, 6, 6, 3))
    x[:, :, 3:, :] = 1.0
    edges = attackers.sobel(tf.constant(x)).numpy()[0, :, :, 0]
    assert edges.shape == (6, 6)
    assert edges.max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(edges[:, 2:4], 1.0, atol=1e-6)
    np.testing.assert_allclose(edges[:, [0, 5]], 0.0, atol=1e-5)


def test_blur_keeps_constants_and_size_and_spreads_an_impulse():
    const = tf.fill((2, 9, 9, 1), 0.7)
    np.testing.assert_allclose(attackers.blur(const, 2.0), 0.7, rtol=1e-6)
    impulse = np.zeros((1, 15, 15, 1))
    impulse[0, 7, 7, 0] = 1.0
    out = attackers.blur(tf.constant(impulse), 2.0).numpy()[0, :, :, 0]
    assert out.shape == (15, 15)
    assert out.sum() == pytest.approx(1.0, rel=1e-9)
    profile = np.exp(-(np.arange(-6, 7) ** 2) / 8.0)
    profile /= profile.sum()
    np.testing.assert_allclose(out[1:14, 1:14], np.outer(profile, profile), rtol=1e-9)


def test_pointwise_transforms():
    x = _images()
    np.testing.assert_allclose(attackers.clamp(x), np.clip(x, 0, 1))
    mm = attackers.minmax(x).numpy()
    np.testing.assert_allclose(mm.min(axis=(1, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(mm.max(axis=(1, 2, 3)), 1.0, atol=1e-7)
    np.testing.assert_allclose(attackers.gamma(x, 2.0), np.clip(x, 1e-6, 1) ** 2)
    z = attackers.zscore_sigmoid(x).numpy()
    xs = x.numpy()
    ref = 1 / (
        1
        + np.exp(
            -(xs - xs.mean((1, 2, 3), keepdims=True))
            / (xs.std((1, 2, 3), keepdims=True) + 1e-8)
        )
    )
    np.testing.assert_allclose(z, ref, rtol=1e-9)


def test_battery_names_and_counts():
    transforms, ms_names, pearson_names = attackers.attacker_transforms()
    assert ms_names == (
        "raw",
        "clamp",
        "minmax",
        "sobel",
        "blur",
        "gamma_0.5",
        "gamma_2.0",
        "wavelet",
        "zscore_sigmoid",
    )
    assert pearson_names == (
        "raw",
        "sobel",
        "blur",
        "gamma_0.5",
        "gamma_2.0",
        "wavelet",
    )
    assert set(transforms) == set(ms_names)


def test_privacy_loss_is_one_for_identical_images_and_lower_for_noise():
    clean = tf.constant(np.random.rand(4, 16, 16, 1).astype("float32"))
    same = attackers.multi_attacker_privacy_loss(clean, clean)
    assert len(same) == 15
    np.testing.assert_allclose(list(same.values()), 1.0, atol=1e-4)
    noisy = clean + tf.random.normal(clean.shape, stddev=1.0, seed=0)
    scores = attackers.multi_attacker_privacy_loss(noisy, clean)
    assert all(float(v) < 0.9 for v in scores.values())
