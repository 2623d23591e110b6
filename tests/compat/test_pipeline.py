"""`deel_lipdp_ext.pipeline`: deel-lipdp's loader, offline and with sampling
the accountant can trust."""

import socket

import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import data
from deel_lipdp_ext.layers.base import BOUND_MARGIN
from deel_lipdp_ext.pipeline import (
    BoundFunction,
    bound_clip_value,
    bound_normalize,
    load_and_prepare_data,
)
from deel_lipdp_ext.privacy_plan import SAMPLING_LABELS, SHUFFLE


def _norms(x):
    x = np.asarray(x)
    return np.linalg.norm(x.reshape(len(x), -1), axis=1)


def _first_train_batch(ds):
    x, y, mask = next(iter(ds))
    keep = mask.numpy() > 0
    return x.numpy()[keep], y.numpy()[keep]


# ------------------------------------------------------------ bound functions
def test_bound_clip_value_is_deel_lipdps_pair():
    pair = bound_clip_value(2.0)
    function, bound = pair  # deel-lipdp's call pattern: (function, bound)
    assert isinstance(pair, BoundFunction) and bound == 2.0
    long, label = function(tf.fill((4, 4, 1), 3.0), 7)
    assert label == 7
    # at the bound, less the margin every bounding step keeps below it
    assert float(tf.norm(long)) == pytest.approx(2.0 * BOUND_MARGIN, rel=1e-6)
    short, _ = function(tf.fill((4, 4, 1), 0.1), 7)
    np.testing.assert_allclose(short.numpy(), 0.1)  # inside the ball: unchanged


def test_bound_normalize_is_deel_lipdps_pair():
    function, bound = bound_normalize()
    assert bound == 1.0
    x, _ = function(tf.fill((3, 3), 0.2), 0)
    assert float(tf.norm(x)) == pytest.approx(BOUND_MARGIN, rel=1e-6)
    zero, _ = function(tf.zeros((3, 3)), 0)
    assert float(tf.reduce_max(tf.abs(zero))) == 0.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), "one"])
def test_bound_clip_value_refuses_a_bad_bound(bad):
    with pytest.raises(ValueError, match="upper_bound"):
        bound_clip_value(bad)


# ------------------------------------------------------------ load_and_prepare_data
def test_npz_is_scaled_bounded_and_poisson_sampled(mnist_npz):
    train, test, meta = load_and_prepare_data(
        str(mnist_npz), 100, bound_fct=bound_clip_value(1.0)
    )
    assert meta.input_shape == (28, 28, 1)
    assert (meta.nb_classes, meta.num_classes) == (10, 10)
    assert meta.nb_samples_train == 300 and meta.nb_samples_test == 60
    assert meta.batch_size == 100 and meta.nb_steps_per_epochs == 3
    assert meta.input_bound == meta.max_norm == 1.0
    assert meta.sampling == "poisson"
    provenance = data.sampling_provenance(train)
    assert provenance.sampling == "poisson" and not provenance.seeded
    x, y = _first_train_batch(train)
    assert np.all(_norms(x) <= 1.0 + 1e-5)
    assert y.shape[1] == 10 and np.all(y.sum(axis=1) == 1)
    x_test, _ = next(iter(test))
    assert np.all(_norms(x_test) <= 1.0 + 1e-5)  # the test set is bounded too


def test_no_bound_fct_clips_to_the_largest_image_norm(tmp_path):
    ones = np.full((20, 4, 4, 3), 255, np.uint8)
    np.savez(
        tmp_path / "d.npz",
        x_train=ones,
        y_train=np.arange(20) % 2,
        x_test=ones[:4],
        y_test=np.arange(4) % 2,
    )
    train, _, meta = load_and_prepare_data(
        str(tmp_path / "d.npz"), 5, sampling="shuffle"
    )
    assert meta.input_bound == pytest.approx(np.sqrt(4 * 4 * 3))
    x, _ = next(iter(train))
    np.testing.assert_allclose(x.numpy(), 1.0)  # pixels / 255: within the bound


def test_keras_style_arrays_and_mapping_are_accepted():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
    y = np.arange(40) % 4
    keras_style = ((x, y), (x[:8], y[:8]))
    _, _, meta = load_and_prepare_data(keras_style, 10, bound_fct=bound_normalize())
    assert (meta.input_shape, meta.nb_classes) == ((6, 6, 1), 4)
    mapping = {"x_train": x, "y_train": y, "x_test": x[:8], "y_test": y[:8]}
    _, _, meta2 = load_and_prepare_data(mapping, 10)
    assert meta2.nb_samples_train == 40
    flat = (x, y, x[:8], y[:8])
    assert load_and_prepare_data(flat, 10)[2].nb_samples_test == 8


def test_dataset_name_is_refused_without_any_download(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("load_and_prepare_data tried to open a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for name in ("mnist", "cifar10"):
        with pytest.raises(ValueError, match=r"does not download.*local \.npz"):
            load_and_prepare_data(name, 256)
    with pytest.raises(ValueError, match="does not download"):
        load_and_prepare_data(dataset_name="mnist", batch_size=256)


def test_missing_npz_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_and_prepare_data(str(tmp_path / "absent.npz"), 32)


def test_shuffle_sampling_keeps_its_heuristic_label(mnist_npz):
    train, _, meta = load_and_prepare_data(
        str(mnist_npz), 64, sampling="shuffle", drop_remainder=True
    )
    assert meta.sampling == "shuffle"
    assert data.sampling_provenance(train).sampling == "shuffle"
    sizes = [int(x.shape[0]) for x, _ in train]
    # ceil(300 / 64) steps, as the accountant counts them; the short last batch
    # is kept: the loss is divided by the constant B, so it weighs no sample more.
    assert sizes == [64, 64, 64, 64, 44]
    assert "heuristic" in SAMPLING_LABELS[SHUFFLE]


def test_digits_is_bundled_and_offline():
    train, test, meta = load_and_prepare_data(
        "digits", 128, bound_fct=bound_clip_value(1.0), seed=3
    )
    assert meta.input_shape == (8, 8, 1) and meta.nb_classes == 10
    assert meta.input_bound == 1.0 and meta.sampling == "poisson"
    assert data.sampling_provenance(train).seeded
    x, _ = _first_train_batch(train)
    assert np.all(_norms(x) <= 1.0 + 1e-5)


def test_colorspaces(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    arrays = ((rgb, np.arange(12) % 3), (rgb[:3], np.arange(3)))
    for colorspace, channels in [
        ("RGB", 3),
        ("rgb", 3),
        ("HSV", 3),
        ("YUV", 3),
        ("yiq", 3),
        ("grayscale", 1),
    ]:
        _, test, meta = load_and_prepare_data(arrays, 4, colorspace=colorspace)
        assert meta.input_shape == (4, 4, channels), colorspace
    _, test, _ = load_and_prepare_data(
        arrays, 4, colorspace="HSV", bound_fct=bound_clip_value(100.0)
    )
    x_test, _ = next(iter(test))
    expected = tf.image.rgb_to_hsv(rgb[:3].astype(np.float32) / 255.0)
    np.testing.assert_allclose(x_test.numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="colorspace"):
        load_and_prepare_data(arrays, 4, colorspace="LAB")
    with pytest.raises(ValueError, match="RGB images"):
        load_and_prepare_data("digits", 128, colorspace="HSV")
    assert load_and_prepare_data("digits", 128, colorspace="grayscale")[2].input_shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bound_fct": (lambda x, y: (x, y), 1.0)}, "bound_fct"),
        ({"augmentation_fct": lambda x, y: (x, y)}, "augmentation_fct"),
        ({"sampling": "fixed"}, "sampling"),
        ({"drop_remainder": "yes"}, "drop_remainder"),
    ],
)
def test_refusals(mnist_npz, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_and_prepare_data(str(mnist_npz), 32, **kwargs)


def test_dataset_given_twice_or_never_is_refused(mnist_npz):
    with pytest.raises(ValueError, match="once"):
        load_and_prepare_data(str(mnist_npz), 32, dataset_name="digits")
    with pytest.raises(ValueError, match="needs a dataset"):
        load_and_prepare_data(batch_size=32)


def test_a_public_class_count_for_labels_the_test_split_lacks():
    """Class-index labels are counted in the test labels (never the training
    ones, whose max + 1 showed whether the only sample of the last class was
    present); a class the test split lacks needs num_classes (a review)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
    y = np.arange(40) % 3
    y[0] = 3
    data = ((x, y), (x[:8], np.arange(8) % 3))
    with pytest.raises(ValueError, match="counted in the test labels"):
        load_and_prepare_data(data, 10)
    _, _, meta = load_and_prepare_data(data, 10, num_classes=4)
    assert meta.nb_classes == 4
