"""Noise layers: the Cloak math, masks, seeding, records and serialisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.cloak import CloakNoiseLayer, NoiseLayer, PatchCloakNoiseLayer


def _std_formula(rhos, s_min, s_max, shallow=1.0):
    return s_min + (s_max - s_min) * (1 + np.tanh(shallow * rhos)) / 2


def test_output_is_mask_times_x_plus_mean_plus_std_noise():
    layer = CloakNoiseLayer(scale=(0.1, 2.0), shallow=0.5, seed=3)
    x = np.random.rand(4000, 3, 2).astype("float32")
    layer.build(x.shape)
    rhos = np.random.uniform(-3, 3, (3, 2)).astype("float32")
    locs = np.random.uniform(-1, 1, (3, 2)).astype("float32")
    layer.rhos.assign(rhos)
    layer.locs.assign(locs)
    residual = layer(x).numpy() - x
    std = _std_formula(rhos, 0.1, 2.0, 0.5)
    np.testing.assert_allclose(layer.std.numpy(), std, rtol=1e-6)
    np.testing.assert_allclose(layer.mean.numpy(), locs)
    assert layer.mask is None
    # 4000 draws per feature: mean within 4 standard errors, std within 5%.
    np.testing.assert_array_less(
        np.abs(residual.mean(0) - locs), 4 * std / np.sqrt(4000)
    )
    np.testing.assert_allclose(residual.std(0), std, rtol=0.05)


def test_initial_std_is_near_s_min():
    layer = CloakNoiseLayer(scale=(1e-3, 1.0), seed=0)
    layer(tf.zeros((1, 5)))
    np.testing.assert_allclose(
        layer.std.numpy(), 1e-3 + 3.35e-4 * (1 - 1e-3), rtol=1e-2
    )


def test_percent_to_mask_masks_the_highest_stds_by_rank():
    layer = CloakNoiseLayer(scale=(0.01, 1.0), percent_to_mask=0.3, seed=0)
    x = np.ones((2, 10), "float32")
    layer(x)  # all stds equal: exactly floor(0.3 * 10) = 3 masked, by index
    np.testing.assert_array_equal(layer.mask.numpy(), [1] * 7 + [0] * 3)
    layer.rhos.assign(np.arange(10, 0, -1, dtype="float32") - 5)
    y = layer(x).numpy()
    np.testing.assert_array_equal(layer.mask.numpy(), [0] * 3 + [1] * 7)
    # Masked features carry mean + noise only: no trace of x (= 1) left.
    std = layer.std.numpy()
    masked_residual = y[:, :3] - 0.0
    assert np.all(np.abs(masked_residual) < 6 * std[:3])
    assert np.all(np.abs(y[:, 3:] - 1.0) < 6 * std[3:])


def test_noise_mask_passes_unselected_rows_through_and_value_range_clips():
    layer = CloakNoiseLayer(scale=(0.5, 1.0), value_range=(0.0, None), seed=0)
    x = np.random.rand(6, 4).astype("float32")
    rows = np.array([False] * 3 + [True] * 3)[:, None]
    y = layer(x, noise_mask=rows).numpy()
    np.testing.assert_array_equal(y[:3], x[:3])
    assert not np.allclose(y[3:], x[3:])
    assert y.min() >= 0.0
    with pytest.raises(ValueError, match="value_range"):
        CloakNoiseLayer(value_range=(1.0, 0.0))


def test_noise_is_seeded():
    x = np.zeros((3, 4), "float32")
    first = CloakNoiseLayer(scale=(0.5, 1.0), seed=11)(x).numpy()
    second = CloakNoiseLayer(scale=(0.5, 1.0), seed=11)(x).numpy()
    other = CloakNoiseLayer(scale=(0.5, 1.0), seed=12)(x).numpy()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_patch_layer_shares_parameters_within_each_patch():
    layer = PatchCloakNoiseLayer(patch_size=3, scale=(0.1, 1.0), percent_to_mask=0.25)
    x = np.zeros((2, 8, 7, 2), "float32")
    layer.build(x.shape)
    assert tuple(layer.rhos.shape) == (3, 3, 2)
    rhos = np.random.uniform(-2, 2, (3, 3, 2)).astype("float32")
    layer.rhos.assign(rhos)
    layer(x)
    std = layer.std.numpy()
    expected = np.repeat(np.repeat(_std_formula(rhos, 0.1, 1.0), 3, 0), 3, 1)[:8, :7]
    np.testing.assert_allclose(std, expected, rtol=1e-6)
    # The mask is chosen per patch: floor(0.25 * 18) = 4 patches masked.
    patch_mask = layer.mask.numpy()[::3, ::3]
    assert patch_mask.size - patch_mask.sum() == 4
    np.testing.assert_array_equal(
        layer.mask.numpy(), np.repeat(np.repeat(patch_mask, 3, 0), 3, 1)[:8, :7]
    )


def test_gradients_reach_locs_and_rhos():
    layer = CloakNoiseLayer(scale=(0.1, 1.0), seed=0)
    x = tf.random.uniform((8, 5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x)))
    grads = tape.gradient(loss, [layer.locs, layer.rhos])
    assert all(g is not None and float(tf.norm(g)) > 0 for g in grads)


def test_frozen_parameters_are_not_trainable():
    layer = CloakNoiseLayer(locs_requires_grad=False)
    layer.build((None, 4))
    assert [v.name for v in layer.trainable_variables] == ["rhos"]


def test_records_are_refused_before_the_first_call():
    layer = CloakNoiseLayer()
    with pytest.raises(RuntimeError, match="not been called"):
        _ = layer.std


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": (1.0, 0.5)}, "scale"),
        ({"scale": (-1.0, 0.5)}, "scale"),
        ({"scale": 3.0}, "scale"),
        ({"shallow": 0}, "shallow"),
        ({"percent_to_mask": 1.0}, "percent_to_mask"),
        ({"percent_to_mask": -0.1}, "percent_to_mask"),
        ({"rhos_init": float("nan")}, "rhos_init"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CloakNoiseLayer(**kwargs)


def test_bad_patch_arguments_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        PatchCloakNoiseLayer(patch_size=0)
    with pytest.raises(ValueError, match="height, width, channels"):
        PatchCloakNoiseLayer(patch_size=2)(tf.zeros((1, 4, 4)))


def test_the_abstract_layer_needs_estimators():
    with pytest.raises(NotImplementedError, match="mean_estimator"):
        NoiseLayer()(tf.zeros((1, 2)))


@pytest.mark.parametrize(
    "layer",
    [
        CloakNoiseLayer(
            scale=(1e-3, 0.5),
            percent_to_mask=0.2,
            value_range=(0, 1),
            rhos_init=-1.0,
            seed=5,
        ),
        PatchCloakNoiseLayer(patch_size=2, scale=(0.01, 0.3), seed=1),
    ],
    ids=["cloak", "patch"],
)
def test_serialisation_round_trip(layer, tmp_path):
    x = np.random.rand(2, 6, 6, 1).astype("float32")
    model = keras.Sequential([keras.Input((6, 6, 1)), layer])
    layer.rhos.assign(np.random.uniform(-2, 2, layer.rhos.shape))
    model(x)
    path = tmp_path / "noise.keras"
    model.save(path)
    loaded = keras.models.load_model(path).layers[0]
    assert type(loaded) is type(layer)
    assert loaded.get_config() == layer.get_config()
    np.testing.assert_array_equal(loaded.rhos.numpy(), layer.rhos.numpy())
    np.testing.assert_array_equal(loaded.std.numpy(), layer.std.numpy())
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
