"""Small builders shared by the tests."""

import keras
import numpy as np
import tensorflow as tf

from deel_lipdp_ext import DPParameters, DPSequential, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.data import DatasetMetadata


def metadata(
    input_shape=(8, 8, 1), num_classes=10, n=1000, batch_size=50, sampling="poisson"
):
    return DatasetMetadata(
        input_shape=input_shape,
        num_classes=num_classes,
        nb_samples_train=n,
        nb_samples_test=0,
        batch_size=batch_size,
        nb_steps_per_epoch=-(-n // batch_size),
        sampling=sampling,
        input_bound=1.0,
    )


def dp_model(
    layers,
    input_shape=(8, 8, 1),
    num_classes=10,
    loss=None,
    sigma=1.0,
    strategy="global",
    batch_size=50,
    n=1000,
    optimizer=None,
    sampling="poisson",
    report_train_metrics=False,
    **compile_kw,
):
    """A compiled DPSequential. Its metadata describes `n` samples drawn in
    batches of expected size `batch_size`: a test that fits arrays passes
    sampling="shuffle" and its own n and batch size (fit checks them)."""
    model = DPSequential(
        [keras.Input(input_shape), *layers],
        dp_parameters=DPParameters(sigma, 1e-5, noisify_strategy=strategy, seed=0),
        dataset_metadata=metadata(input_shape, num_classes, n, batch_size, sampling),
        report_train_metrics=report_train_metrics,
    )
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.1),
        loss=loss or losses.DP_TauCategoricalCrossentropy(8.0),
        metrics=["accuracy"],
        **compile_kw,
    )
    return model


def small_cnn():
    return [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_QuickSpectralConv2D(4, 3),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(10),
    ]


def fitted_with_large_steps():
    """`small_cnn` fitted 2 epochs with SGD(2.0) on 100 unit samples: its
    kernels end far from where the projections started them."""
    model = dp_model(
        small_cnn(),
        sigma=0.5,
        optimizer=keras.optimizers.SGD(2.0),
        n=100,
        sampling="shuffle",
    )
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model.fit(x, y, batch_size=50, epochs=2, verbose=0)
    return model


def unit_samples(n, shape, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)
    return x / np.linalg.norm(x.reshape(n, -1), axis=1).reshape(
        (-1,) + (1,) * len(shape)
    )


def one_hot(labels, k=10):
    return np.eye(k, dtype=np.float32)[np.asarray(labels) % k]


def step_updates(model, *batch, steps: int = 1):
    """Switch the model's projection off, run `steps` train steps on `batch`, and
    return each step's update (after - before) per variable path, so the update
    is exactly -lr * (summed gradient + noise) / B."""
    model._project = lambda: None
    updates = []
    for _ in range(steps):
        before = {v.path: v.numpy().copy() for v in model.trainable_variables}
        model.train_on_batch(*batch)
        updates.append(
            {v.path: v.numpy() - before[v.path] for v in model.trainable_variables}
        )
    return updates


def assert_contraction_at_ties(layer, shape, seed: int, n: int = 16) -> None:
    """Asserts ``||J^T g|| <= ||g||`` per sample for `layer` on inputs from
    {-1, 0, 1}: they tie everywhere and sit on every kink (0), where the
    gradient TensorFlow picks decides (docs/design.md, rule 9). The backward
    pass runs in a tf.function with an unknown batch dimension, as in fit."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(-1, 2, size=(n, *shape)), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec((None, *shape)), tf.TensorSpec(None)])
    def input_gradient(x, g):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
        return tape.gradient(out, x, output_gradients=tf.reshape(g, tf.shape(out)))

    g = tf.constant(rng.normal(size=layer(x).shape), tf.float32)
    norms = [
        np.linalg.norm(np.reshape(t, (n, -1)), axis=1)
        for t in (input_gradient(x, g), g)
    ]
    assert np.all(norms[0] <= norms[1] * (1 + 1e-6)), np.max(norms[0] / norms[1])


def write_npz_with_a_class_the_test_lacks(
    path, n_train, side, n_test, skip_first=False
):
    """An MNIST-style .npz whose training labels hold class 9 once (row 0;
    left out with `skip_first`) while the test labels hold classes 0-8: the
    neighbouring pair of the class-count reviews. Returns `path`."""
    rng = np.random.default_rng(0)
    y_train = rng.integers(0, 9, n_train)
    y_train[0] = 9
    rows = slice(1 if skip_first else 0, n_train)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, side, side), dtype=np.uint8)[rows],
        y_train=y_train[rows],
        x_test=rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        y_test=np.arange(n_test) % 9,
    )
    return path
