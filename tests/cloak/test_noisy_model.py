"""NoisyModel: forward, fit, the distillation super-batch, serialisation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.cloak import CloakNoiseLayer, NoisyModel


def _classifier():
    return keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )


def test_forward_is_base_of_noise():
    base = _classifier()
    layer = CloakNoiseLayer(scale=(0.2, 1.0), seed=0)
    model = NoisyModel(base, layer)
    x = np.random.rand(5, 8, 8, 1).astype("float32")
    out = model(x)
    np.testing.assert_allclose(
        out, base(model.noise_layer.last_capture.outputs), rtol=1e-6
    )


def test_distillation_context_runs_a_clean_and_a_noisy_half():
    base = _classifier()
    model = NoisyModel(base, CloakNoiseLayer(scale=(0.5, 1.0), seed=0))
    x = np.random.rand(3, 8, 8, 1).astype("float32")
    with model.distillation_context():
        assert model.distilling
        out = model(x).numpy()
        capture = model.noise_layer.last_capture
    assert not model.distilling
    assert out.shape == (6, 10) and capture.super_batched
    np.testing.assert_allclose(out[:3], base(x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[3:], base(x), atol=1e-3)
    np.testing.assert_array_equal(capture.inputs[:3], x)
    np.testing.assert_array_equal(capture.inputs[3:], x)


def test_fit_trains_only_the_noise_layer_when_the_base_is_frozen():
    base = _classifier()
    base.trainable = False
    kernel = base.layers[-1].kernel.numpy().copy()
    model = NoisyModel(base, CloakNoiseLayer(scale=(0.01, 1.0), seed=0))
    model.compile(keras.optimizers.Adam(0.1), loss=lambda y, p: -tf.reduce_mean(p))
    rhos = None
    x = np.random.rand(32, 8, 8, 1).astype("float32")
    model.fit(x, np.zeros(32), epochs=1, batch_size=8, verbose=0)
    rhos = model.noise_layer.rhos.numpy()
    assert not np.allclose(rhos, -4.0)
    np.testing.assert_array_equal(base.layers[-1].kernel.numpy(), kernel)


def test_refuses_what_is_not_a_noise_layer_or_model():
    with pytest.raises(TypeError, match="noise_layer"):
        NoisyModel(_classifier(), keras.layers.Dense(3))
    with pytest.raises(TypeError, match="base_model"):
        NoisyModel(lambda x: x, CloakNoiseLayer())


def test_save_and_load_round_trip(tmp_path):
    model = NoisyModel(
        _classifier(), CloakNoiseLayer(scale=(0.01, 1.0), percent_to_mask=0.5, seed=4)
    )
    x = np.random.rand(4, 8, 8, 1).astype("float32")
    model(x)
    model.noise_layer.rhos.assign(np.random.uniform(-2, 2, (8, 8, 1)))
    path = tmp_path / "noisy.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, NoisyModel)
    assert loaded.noise_layer.get_config() == model.noise_layer.get_config()
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Same weights and call count: the loaded model continues the noise stream.
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
