"""DP_GNP_Factory: which Keras layers it refuses, and the ones it still wraps."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from deel_lipdp_ext import layers as L

from ..helpers import assert_contraction_at_ties, dp_model, one_hot, unit_samples


def test_factory_refuses_batch_norm_and_dropout_naming_them():
    """BatchNormalization(center=False, scale=False) built (its moving statistics,
    computed without noise, leaked into the saved model) and Dropout(0.5) gave
    per-sample gradients 1/(1-rate) times their bound."""
    with pytest.raises(
        ValueError, match=r"BatchNormalization: .*statistics.*Received: layer_cls="
    ):
        L.DP_GNP_Factory(keras.layers.BatchNormalization, name="DP_TestBN")
    with pytest.raises(ValueError, match=r"Dropout: .*1/\(1-rate\).*Received:"):
        L.DP_GNP_Factory(keras.layers.Dropout, name="DP_TestDropout")


class _UserBatchNorm(keras.layers.BatchNormalization):
    pass


@pytest.mark.parametrize(
    "layer_cls,match",
    [
        (keras.layers.SpatialDropout2D, r"SpatialDropout2D \(a Dropout\)"),
        (keras.layers.GaussianDropout, "GaussianDropout"),
        (keras.layers.AlphaDropout, "AlphaDropout"),
        (keras.layers.GaussianNoise, "GaussianNoise"),
        (keras.layers.LayerNormalization, "LayerNormalization"),
        (keras.layers.GroupNormalization, "GroupNormalization"),
        (keras.layers.UnitNormalization, "UnitNormalization"),
        (keras.layers.Normalization, "Normalization"),
        (_UserBatchNorm, r"_UserBatchNorm \(a BatchNormalization\)"),
        (keras.layers.MixUp, "mixes samples"),
        (keras.layers.ActivityRegularization, "loss"),
        (keras.layers.Masking, "Masking"),
        (keras.layers.Concatenate, "DP_MergeResidual"),
        (keras.layers.Softmax, "Softmax"),
        (keras.layers.Attention, "Attention"),
        (keras.layers.UpSampling2D, "repeats entries"),
        (keras.layers.RepeatVector, "repeats entries"),
        (keras.layers.AdaptiveMaxPooling2D, "AdaptiveMaxPooling2D"),
        (keras.layers.Resizing, "Resizing"),
        (keras.layers.RandomContrast, "RandomContrast"),
        (keras.layers.Discretization, "Discretization"),
        (keras.layers.Lambda, "DP_Lambda"),
        (keras.layers.TimeDistributed, r"TimeDistributed \(a Wrapper\)"),
        (keras.layers.Bidirectional, "runs sub-layers"),
        (keras.layers.MaxPooling3D, "every tied entry"),
        (keras.Sequential, r"Sequential \(a Model\)"),
        (L.DP_QuickSpectralDense, "already a DP layer"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_factory_refuses_keras_layers_that_are_not_gnp_per_sample_maps(
    layer_cls, match
):
    with pytest.raises(ValueError, match=match) as info:
        L.DP_GNP_Factory(layer_cls, name="DP_TestRefused")
    assert str(info.value).startswith(
        f"DP_GNP_Factory cannot wrap {layer_cls.__name__}"
    )
    assert "Received: layer_cls=" in str(info.value)


def test_factory_refuses_what_is_not_a_layer_class():
    with pytest.raises(TypeError, match="layer_cls"):
        L.DP_GNP_Factory(keras.layers.Flatten(), name="DP_TestInstance")


class _RunningMax(keras.layers.Layer):
    """Parameter-free in its output, but keeps a non-trainable data statistic."""

    def build(self, input_shape):
        self.running = self.add_weight(
            name="running_max", shape=(), initializer="zeros", trainable=False
        )

    def call(self, inputs):
        return inputs


def test_factory_refuses_a_layer_with_a_non_trainable_weight_at_build():
    dp_cls = L.DP_GNP_Factory(_RunningMax, name="DP_TestRunningMax")
    layer = dp_cls()
    with pytest.raises(ValueError, match=r"parameter-free.*running_max"):
        layer(tf.zeros((1, 3)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: keras.layers.Rescaling(2.0), "scale=2.0"),
        (lambda: keras.layers.Rescaling([0.5, -1.5]), r"scale=\[0.5, -1.5\]"),
        (lambda: keras.layers.Rescaling(0.5, offset=0.1), "offset=0.1"),
        (lambda: keras.layers.Activation("sigmoid"), "activation=<function sigmoid"),
        (lambda: keras.layers.Activation("gelu"), "activation=<function gelu"),
        (lambda: keras.layers.Activation("celu"), "activation=<function celu"),
        (lambda: keras.layers.ReLU(threshold=0.5), "threshold=0.5"),
        (lambda: keras.layers.LeakyReLU(negative_slope=1.5), "negative_slope=1.5"),
        (lambda: keras.layers.ELU(alpha=2.0), "alpha=2.0"),
        (lambda: keras.layers.MaxPooling2D(3, strides=1), r"strides=\(1, 1\)"),
        (
            lambda: keras.layers.AveragePooling2D(3, strides=1, padding="same"),
            "padding='same'",
        ),
        (lambda: keras.layers.Flatten(activity_regularizer="l2"), "activity_reg"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_factory_refuses_non_gnp_arguments_when_built(make, match):
    proto = make()
    dp_cls = L.DP_GNP_Factory(type(proto), name=f"DP_Test{type(proto).__name__}")
    layer = dp_cls.from_config(proto.get_config())
    with pytest.raises(ValueError, match=match) as info:
        layer(tf.zeros((2, 6, 6, 2)))
    assert "is not GNP" in str(info.value)
    assert "Received: " in str(info.value)


# Keras layers the factory accepts (with these arguments): each must be GNP.
ACCEPTED = [
    (lambda: keras.layers.Rescaling(0.5), (4, 4, 2)),
    (lambda: keras.layers.Rescaling([0.5, -1.0]), (4, 4, 2)),
    *[
        (lambda a=a: keras.layers.Activation(a), (4, 4, 2))
        for a in (
            "linear",
            "relu",
            "relu6",
            "leaky_relu",
            "elu",
            "tanh",
            "hard_tanh",
            "softsign",
            "soft_shrink",
            "tanh_shrink",
        )
    ],
    (lambda: keras.layers.ReLU(max_value=1.0, negative_slope=0.5), (4, 4, 2)),
    (lambda: keras.layers.LeakyReLU(negative_slope=0.3), (4, 4, 2)),
    (lambda: keras.layers.ELU(alpha=0.7), (4, 4, 2)),
    (lambda: keras.layers.MaxPooling2D(2, padding="same"), (5, 5, 2)),
    (lambda: keras.layers.MaxPooling1D(2, strides=3), (8, 2)),
    (lambda: keras.layers.AveragePooling2D(3, strides=1), (5, 5, 2)),
    (lambda: keras.layers.AveragePooling1D(2, padding="same"), (7, 2)),
    (lambda: keras.layers.GlobalAveragePooling2D(), (4, 4, 2)),
    (lambda: keras.layers.GlobalMaxPooling1D(), (6, 2)),
    (lambda: keras.layers.Cropping2D(1), (5, 5, 2)),
    (lambda: keras.layers.ZeroPadding2D(1), (4, 4, 2)),
    (lambda: keras.layers.Identity(), (4, 4, 2)),
]


@pytest.mark.parametrize("make,shape", ACCEPTED)
def test_accepted_keras_layers_are_norm_non_increasing_and_1_lipschitz(make, shape):
    proto = make()
    dp_cls = L.DP_GNP_Factory(type(proto), name=f"DP_Test{type(proto).__name__}")
    layer = dp_cls.from_config(proto.get_config())
    rng = np.random.default_rng(2)
    a = tf.constant(3.0 * rng.normal(size=(64, *shape)), tf.float32)
    b = a + tf.constant(rng.normal(size=(64, *shape)), tf.float32)

    def norms(t):
        return np.linalg.norm(np.reshape(t, (64, -1)), axis=1)

    fa, fb = layer(a), layer(b)
    assert isinstance(layer, L.GNPLayer) and not layer.weights
    assert np.all(norms(fa) <= norms(a) * (1 + 1e-5))
    assert np.all(norms(fa - fb) <= norms(a - b) * (1 + 1e-5))
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = layer(a)
        g = tf.constant(rng.normal(size=out.shape), tf.float32)
        total = tf.reduce_sum(out * g)
    assert np.all(norms(tape.gradient(total, a)) <= norms(g) * (1 + 1e-5))


@pytest.mark.parametrize("make,shape", ACCEPTED)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_accepted_keras_layers_keep_the_gradient_norm_at_ties(make, shape, seed):
    """celu's gradient was 2 at 0, MaxPooling3D's sqrt(8) at a tie."""
    proto = make()
    dp_cls = L.DP_GNP_Factory(type(proto), name=f"DP_Test{type(proto).__name__}")
    assert_contraction_at_ties(dp_cls.from_config(proto.get_config()), shape, seed)


class _Halve(keras.layers.Layer):
    """A user layer its author certifies GNP: x -> x / 2."""

    def call(self, inputs):
        return 0.5 * inputs


DP_TestHalve = L.DP_GNP_Factory(_Halve, name="DP_TestHalve")
DP_TestCropping2D = L.DP_GNP_Factory(keras.layers.Cropping2D, name="DP_TestCropping2D")


def test_user_certified_gnp_layer_round_trips_in_a_saved_model(tmp_path):
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralConv2D(4, 3),
            DP_TestHalve(),
            DP_TestCropping2D(1),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(3),
        ],
        input_shape=(8, 8, 1),
        num_classes=3,
        n=20,
        batch_size=10,
        sampling="shuffle",
    )
    x, y = unit_samples(20, (8, 8, 1)), one_hot(np.arange(20), 3)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    model.save(tmp_path / "user_gnp.keras")
    loaded = keras.models.load_model(tmp_path / "user_gnp.keras")
    assert [type(la).__name__ for la in loaded.layers][2:4] == [
        "DP_TestHalve",
        "DP_TestCropping2D",
    ]
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    b1, b2 = model.compute_gradient_bounds(), loaded.compute_gradient_bounds()
    assert [float(b1[v.path]) for v in model.trainable_variables] == pytest.approx(
        [float(b2[v.path]) for v in loaded.trainable_variables]
    )


def test_factory_refuses_an_argument_that_broadcasts_a_sample_into_copies():
    """Rescaling(scale=ones((16, 1, 1))) passed |scale| <= 1 but broadcast
    each (1, 8, 2) sample into 16 copies while declaring its input shape:
    after a global L2 pooling, 4 times the bound (a review)."""
    dp_rescaling = L.DP_GNP_Factory(keras.layers.Rescaling, name="DP_TestRescalingB")
    for scale, offset in (
        (np.ones((16, 1, 1), np.float32), 0.0),
        (0.5, np.zeros((16, 1, 1), np.float32)),
    ):
        layer = dp_rescaling(scale=scale, offset=offset)
        with pytest.raises(ValueError, match="not the declared"):
            layer(tf.zeros((2, 1, 8, 2)))
    fine = dp_rescaling(scale=np.full((8, 2), 0.5, np.float32))  # per-feature
    assert fine(tf.ones((2, 1, 8, 2))).shape == (2, 1, 8, 2)


def test_a_rescaling_that_copies_samples_is_refused_at_call_time():
    """The build-time check saw only the build shape: a layer built on
    another shape, on a None axis, or whose scale was set after build, copied
    each sample (4 to 16 times the bound; a review)."""
    dp_rescaling = L.DP_GNP_Factory(keras.layers.Rescaling, name="DP_TestRescalingC")
    copies = np.ones((16, 1, 1), np.float32)
    for build_shape in ((None, 16, 8, 2), (None, None, 8, 2)):
        layer = dp_rescaling(scale=copies)
        layer.build(build_shape)
        with pytest.raises(ValueError, match="broadcasts each sample into copies"):
            layer(tf.zeros((2, 1, 8, 2)))
        for jit in (False, True):  # XLA drops the assert: the reshape fails
            with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
                tf.function(
                    layer,
                    input_signature=[tf.TensorSpec((None, None, 8, 2))],
                    jit_compile=jit,
                )(tf.zeros((2, 1, 8, 2)))
    layer = dp_rescaling(scale=1.0)
    layer(tf.zeros((2, 1, 8, 2)))
    layer.scale = 16.0  # after build
    with pytest.raises(ValueError, match=r"\|scale\| <= 1"):
        layer(tf.zeros((2, 1, 8, 2)))


def test_hand_written_gnp_layers_check_their_arguments_at_every_trace():
    """Set after construction, DP_ReLU's negative_slope = 10 made it
    10-Lipschitz, and DP_MaxPool2D's strides = 1 overlapped its windows
    (2 times the bound on a spike; a review)."""
    relu = L.DP_ReLU()
    relu(tf.zeros((2, 4)))
    relu.negative_slope = 10.0
    with pytest.raises(ValueError, match="negative_slope"):
        relu(tf.zeros((2, 4)))
    pool = L.DP_MaxPool2D(2)
    pool(tf.zeros((1, 4, 4, 1)))
    pool.strides = (1, 1)
    with pytest.raises(ValueError, match="strides == pool_size"):
        pool(tf.zeros((1, 4, 4, 1)))


def test_factory_refuses_a_layer_whose_sub_layer_builds_at_its_first_call():
    """A review: a frozen Dense(gain 5) inside a user layer builds its kernel
    when first called, after the factory's weight check at build; the model
    trained with first-kernel gradients 4.63x their bound."""

    class FrozenProjection(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(
                16,
                use_bias=False,
                trainable=False,
                kernel_initializer=keras.initializers.Identity(gain=5.0),
            )

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(ValueError, match="sub-layers=\\['dense"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_QuickSpectralDense(16),
                L.DP_GNP_Factory(FrozenProjection)(),
                L.DP_QuickSpectralDense(10),
            ],
            input_shape=(16,),
        )
