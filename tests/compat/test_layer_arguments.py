"""deel-lipdp's layer arguments from its examples: the harmless ones are
accepted, the ones our bounds do not cover are refused with a clear error."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import layers as L
from deel_lipdp_ext.sensitivity import gradient_norm_check

from ..helpers import dp_model, one_hot, unit_samples


def test_spectral_conv_accepts_use_bias_false_and_keras_defaults():
    for cls in (L.DP_SpectralConv2D, L.DP_QuickSpectralConv2D):
        layer = cls(
            filters=4,
            kernel_size=3,
            kernel_initializer="orthogonal",
            strides=1,
            use_bias=False,
            dilation_rate=1,
            data_format="channels_last",
        )
        assert layer(tf.ones((2, 6, 6, 1))).shape == (2, 6, 6, 4)
        assert "use_bias" not in layer.get_config()
        assert len(layer.trainable_variables) == 1  # no bias variable


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: L.DP_SpectralConv2D(4, 3, use_bias=True), "add a `DP_AddBias`"),
        (lambda: L.DP_QuickSpectralConv2D(4, 3, use_bias=True), "use_bias"),
        (lambda: L.DP_SpectralDense(4, use_bias=True), "add a `DP_AddBias`"),
        (lambda: L.DP_SpectralConv2D(4, 3, dilation_rate=2), "dilation"),
        (lambda: L.DP_SpectralConv2D(4, 3, data_format="channels_first"), "channels"),
    ],
)
def test_bias_and_unsupported_arguments_are_refused(factory, match):
    with pytest.raises(ValueError, match=match) as error:
        factory()
    assert "Received:" in str(error.value)


def test_dense_layers_accept_use_bias_false():
    for cls in (L.DP_SpectralDense, L.DP_QuickSpectralDense, L.DP_QuickFrobeniusDense):
        layer = cls(8, use_bias=False)
        assert layer(tf.ones((2, 3))).shape == (2, 8)
        assert len(layer.trainable_variables) == 1


def test_pooling_accepts_strides_equal_to_pool_size_only():
    layer = L.DP_ScaledL2NormPooling2D(pool_size=2, strides=2)
    assert layer(tf.ones((1, 4, 4, 3))).shape == (1, 2, 2, 3)
    assert L.DP_ScaledL2NormPooling2D(pool_size=(2, 3), strides=(2, 3)).pool_size
    for strides in (1, 3, (2, 1)):
        with pytest.raises(ValueError, match="strides == pool_size") as error:
            L.DP_ScaledL2NormPooling2D(pool_size=2, strides=strides)
        assert "Received:" in str(error.value)


def test_group_sort_without_argument_sorts_the_whole_axis():
    x = tf.constant([[3.0, 1.0, 4.0, 1.0, 5.0, 9.0]])
    np.testing.assert_array_equal(L.DP_GroupSort()(x).numpy(), [[1, 1, 3, 4, 5, 9]])
    np.testing.assert_array_equal(L.DP_GroupSort(2)(x).numpy(), [[1, 3, 1, 4, 5, 9]])
    np.testing.assert_array_equal(L.DP_GroupSort(3)(x).numpy(), [[1, 3, 4, 1, 5, 9]])
    assert L.DP_GroupSort().get_config()["n"] is None
    with pytest.raises(ValueError, match="must divide"):
        L.DP_GroupSort(4)(x)
    with pytest.raises(ValueError, match="Received: n=0"):
        L.DP_GroupSort(0)


def test_bounded_input_takes_input_shape_and_upper_bound():
    layer = L.DP_BoundedInput(input_shape=(4, 4, 1), upper_bound=1.0)
    out = layer(tf.fill((2, 4, 4, 1), 1.0))
    norms = np.linalg.norm(out.numpy().astype(np.float64).reshape(2, -1), axis=1)
    # projected just inside the ball (1e-6 margin against float rounding)
    assert norms.max() <= 1.0
    np.testing.assert_allclose(norms, 1, rtol=2e-6)


def _example_layers():
    return [
        L.DP_BoundedInput(input_shape=(8, 8, 1), upper_bound=1.0),
        L.DP_SpectralConv2D(
            filters=4,
            kernel_size=3,
            kernel_initializer="orthogonal",
            strides=1,
            use_bias=False,
        ),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(pool_size=2, strides=2),
        L.DP_LayerCentering(),
        L.DP_Flatten(),
        L.DP_SpectralDense(16),
        L.DP_GroupSort(),
        L.DP_LayerCentering(),
        L.DP_SpectralDense(10),
    ]


def test_example_layers_train_and_round_trip_as_keras(tmp_path):
    model = dp_model(_example_layers(), n=100, batch_size=50, sampling="shuffle")
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    model.save(tmp_path / "example.keras")
    loaded = keras.models.load_model(tmp_path / "example.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    sorts = [layer for layer in loaded.layers if isinstance(layer, L.DP_GroupSort)]
    assert [layer.n for layer in sorts] == [2, None]
    report = gradient_norm_check(model, (x[:16], y[:16]))
    assert report.max_ratio <= 1.0 + 1e-4
