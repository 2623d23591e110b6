"""deel-lipdp's examples/mnist_train.py, written from its documentation, with
only the imports changed (`lipdp` -> `deel_lipdp_ext`): it must run as is.

The data is a generated MNIST-layout `.npz` (and the bundled digits), the
batch size small, and fit runs one epoch.
"""

import logging

import tensorflow as tf

from deel_lipdp_ext import layers, losses
from deel_lipdp_ext.model import DP_Accountant, DP_Sequential, DPParameters
from deel_lipdp_ext.pipeline import bound_clip_value, load_and_prepare_data
from deel_lipdp_ext.sensitivity import get_max_epochs


def deel_lipdp_script(dataset, batch_size, width=512, filters=16):
    """The example's structure; returns (model, epochs, history)."""
    dp_parameters = DPParameters(
        noisify_strategy="global",
        noise_multiplier=2.5,
        delta=1e-5,
    )
    epsilon_max = 1.0
    input_upper_bound = 1.0
    ds_train, ds_test, dataset_metadata = load_and_prepare_data(
        dataset,
        batch_size,
        colorspace="RGB",
        drop_remainder=True,
        bound_fct=bound_clip_value(input_upper_bound),
    )
    model = DP_Sequential(
        layers=[
            layers.DP_BoundedInput(
                input_shape=dataset_metadata.input_shape,
                upper_bound=input_upper_bound,
            ),
            layers.DP_SpectralConv2D(
                filters=filters,
                kernel_size=3,
                kernel_initializer="orthogonal",
                strides=1,
                use_bias=False,
            ),
            layers.DP_GroupSort(2),
            layers.DP_ScaledL2NormPooling2D(pool_size=2, strides=2),
            layers.DP_LayerCentering(),
            layers.DP_Flatten(),
            layers.DP_SpectralDense(width),
            layers.DP_GroupSort(),
            layers.DP_LayerCentering(),
            layers.DP_SpectralDense(dataset_metadata.nb_classes),
        ],
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
    )
    model.compile(
        loss=losses.DP_TauCategoricalCrossentropy(18.0),
        optimizer=tf.keras.optimizers.Adam(learning_rate=5e-4),
        metrics=["accuracy"],
    )
    num_epochs = get_max_epochs(epsilon_max, model)
    hist = model.fit(
        ds_train,
        epochs=min(num_epochs, 1),
        validation_data=ds_test,
        callbacks=[DP_Accountant(log_fn="logging")],
        verbose=0,
    )
    return model, num_epochs, hist


def test_mnist_train_example_runs_on_a_local_npz(mnist_npz, caplog):
    with caplog.at_level(logging.INFO, logger="deel_lipdp_ext"):
        # q = 50 / 300 at sigma 2.5: one epoch stays below epsilon_max = 1.
        model, num_epochs, hist = deel_lipdp_script(str(mnist_npz), 50)
    assert num_epochs >= 1
    (epsilon,) = hist.history["epsilon"]
    assert 0 < epsilon <= 1.0
    assert "val_accuracy" in hist.history
    assert int(model.dp_steps.numpy()) == 6  # ceil(300 / 50) Poisson steps
    assert model.privacy_plan.is_exact()  # secret Poisson batches: no heuristic
    logged = [r for r in caplog.records if r.name == "deel_lipdp_ext"]
    assert len(logged) == 1 and "epsilon=" in logged[0].getMessage()


def test_mnist_train_example_runs_on_the_bundled_digits():
    model, num_epochs, hist = deel_lipdp_script("digits", 128, width=64, filters=8)
    meta = model.dataset_metadata
    assert (meta.input_shape, meta.nb_classes) == ((8, 8, 1), 10)
    assert num_epochs >= 1
    assert hist.history["epsilon"][0] <= 1.0
