"""Augmentation multiplicity: the mean loss over K augmented copies of each
sample keeps the per-sample bound; bad augmentations are refused."""

import keras
import numpy as np
import pytest

from deel_lipdp_ext import DPParameters, DPSequential, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.sensitivity import gradient_norm_check

from .helpers import metadata, one_hot, small_cnn, unit_samples


def _model(augmentation=None, k=1, layers=None, n=100, **kwargs):
    model = DPSequential(
        [keras.Input((8, 8, 1)), *(layers or small_cnn())],
        dp_parameters=DPParameters(1.0, 1e-5),
        dataset_metadata=metadata(n=n, batch_size=50, sampling="shuffle"),
        augmentation=augmentation,
        augmentation_multiplicity=k,
        **kwargs,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=losses.DP_TauCategoricalCrossentropy(8.0),
        metrics=["accuracy"],
    )
    return model


def _shifts():
    return keras.Sequential(
        [
            keras.layers.RandomTranslation(0.25, 0.25, fill_mode="constant"),
            keras.layers.RandomFlip("horizontal"),
        ]
    )


def test_the_mean_over_copies_without_augmentation_is_the_plain_loss():
    x, y = unit_samples(6, (8, 8, 1)), one_hot(range(6))
    plain, repeated = _model(), _model(k=4)
    repeated.set_weights(plain.get_weights())
    a, _ = plain.sample_losses(x, y)
    b, predictions = repeated.sample_losses(x, y)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    assert predictions.shape[0] == 24  # every copy went through the model


@pytest.mark.parametrize("k", [1, 4])
def test_augmented_per_sample_gradients_stay_within_the_bounds(k):
    """Each copy is projected onto the input ball by DP_BoundedInput, so the
    mean of the copies' gradients obeys the bound of one sample."""
    model = _model(_shifts(), k)
    x, y = unit_samples(16, (8, 8, 1), seed=k), one_hot(range(16))
    x *= 3.0  # above the input bound: the first layer must project each copy
    report = gradient_norm_check(model, (x, y))
    assert report.max_ratio <= 1 + 1e-4


def test_fit_with_augmentation_trains_and_round_trips(tmp_path):
    model = _model(_shifts(), 2)
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 2
    model.save(tmp_path / "aug.keras")
    loaded = keras.models.load_model(tmp_path / "aug.keras")
    assert loaded.augmentation_multiplicity == 2
    assert [type(a).__name__ for a in loaded.augmentation.layers] == [
        "RandomTranslation",
        "RandomFlip",
    ]


def test_augmentations_that_could_break_the_bound_are_refused():
    with pytest.raises(ValueError, match="mixes samples"):
        _model(keras.Sequential([keras.layers.MixUp()]), 2)
    with pytest.raises(ValueError, match="no weights"):
        _model(keras.Sequential([keras.layers.Dense(1)]), 2)
    with pytest.raises(ValueError, match="keep the sample shape"):
        _model(keras.Sequential([keras.layers.Resizing(4, 4)]), 2)
    with pytest.raises(ValueError, match="int >= 1"):
        _model(None, 0)
    trusting = [
        L.DP_BoundedInput(upper_bound=1.0, enforce_clipping=False),
        *small_cnn()[1:],
    ]
    model = _model(_shifts(), 2, layers=trusting)
    with pytest.raises(ValueError, match="enforce_clipping=True"):
        model.train_on_batch(unit_samples(4, (8, 8, 1)), one_hot(range(4)))


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("augment", [False, True])
def test_loss_gradient_clipping_holds_per_sample_with_multiplicity(k, augment):
    """A clip on the logits acts per ROW, and a sample is K rows: each row is
    clipped to clip / K so the sample's K rows sum to the clip. (The review
    found the K rows each clipped to the full value: ratio K.)"""
    layers = [*small_cnn(), L.DP_ClipGradient(0.05)]
    flips = keras.Sequential([keras.layers.RandomFlip("horizontal")])
    model = _model(flips if augment else None, k, layers=layers)
    x = unit_samples(16, (8, 8, 1), seed=k)
    y = one_hot((np.arange(16) + 3) % 10)  # wrong labels: large loss gradients
    report = gradient_norm_check(model, (x, y))
    assert report.max_ratio <= 1 + 1e-4
    # the clip is active and nearly reached: without the / K it would be K x
    assert report.max_ratio > 0.5


def test_a_dynamic_clip_with_multiplicity_is_refused():
    layers = [*small_cnn(), L.DP_ClipGradient(0.05, mode="dynamic")]
    model = _model(None, 2, layers=layers)
    with pytest.raises(ValueError, match="mode='dynamic'"):
        model.train_on_batch(unit_samples(4, (8, 8, 1)), one_hot(range(4)))


class _Roll(keras.layers.Layer):
    """Weightless, shape-keeping, and it mixes samples."""

    def call(self, x, training=None):
        return keras.ops.roll(x, 1, axis=0)


class _FlipThenRoll(keras.layers.RandomFlip):
    def call(self, x, training=True):
        return keras.ops.roll(super().call(x, training=training), 1, axis=0)


def _functional_roll():
    inputs = keras.Input((8, 8, 1))
    return keras.Model(inputs, keras.ops.roll(inputs, 1, axis=0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.layers.Lambda(lambda x: keras.ops.roll(x, 1, axis=0)),
        lambda: keras.Sequential([keras.layers.RandomFlip(), _Roll()]),
        lambda: _FlipThenRoll(),
        _functional_roll,
    ],
)
def test_augmentations_not_known_to_be_per_sample_are_refused(make):
    """A weightless layer that keeps shapes can still combine samples (the
    review's tf.roll: ratio 1.755 on the summed gradient); only exact types
    known to work per sample are accepted."""
    with pytest.raises(ValueError, match="not a layer known to transform"):
        _model(make(), 2)


def test_known_per_sample_augmentations_are_accepted():
    augmentation = keras.Sequential(
        [
            keras.layers.RandomZoom(0.1),
            keras.layers.RandomRotation(0.05),
            keras.layers.RandomContrast(0.1),
        ]
    )
    model = _model(augmentation, 2)
    assert model.augmentation is augmentation
