import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import DPModel, DPParameters, DPSequential, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.accounting import effective_noise_multiplier

from .helpers import (
    dp_model,
    fitted_with_large_steps,
    metadata,
    one_hot,
    small_cnn,
    step_updates,
    unit_samples,
)


def data(n=100, shape=(8, 8, 1), k=10, seed=0):
    return unit_samples(n, shape, seed), one_hot(np.arange(n), k)


# ------------------------------------------------------------------ refusals
def test_refuses_a_non_dp_layer_naming_it():
    with pytest.raises(TypeError, match="plain_dense"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_Flatten(),
                keras.layers.Dense(10, name="plain_dense"),
            ]
        )


def test_refuses_a_loss_without_get_L():
    with pytest.raises(TypeError, match="categorical_crossentropy"):
        dp_model(small_cnn(), loss=keras.losses.CategoricalCrossentropy())


def test_refuses_a_missing_bounded_input():
    with pytest.raises(ValueError, match="DP_BoundedInput"):
        dp_model([L.DP_Flatten(), L.DP_QuickSpectralDense(10)])


def test_refuses_an_unknown_strategy():
    with pytest.raises(ValueError, match="'local'"):
        DPParameters(1.0, 1e-5, noisify_strategy="local")


def test_refuses_bad_noise_and_delta():
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPParameters(0.0, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        DPParameters(1.0, 1.5)


def test_refuses_nan_input_before_updating():
    model = dp_model(small_cnn())
    before = [v.numpy().copy() for v in model.trainable_variables]
    x, y = data(4)
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        model.train_on_batch(x, y)
    for b, v in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())


def test_refuses_sample_weights_above_one():
    model = dp_model(small_cnn())
    x, y = data(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 1\]"):
        model.train_on_batch(x, y, sample_weight=np.array([1, 2, 1, 1], np.float32))


def test_unchecked_bounded_input_refuses_samples_above_the_bound():
    layers = [
        L.DP_BoundedInput(upper_bound=1.0, enforce_clipping=False),
        *small_cnn()[1:],
    ]
    model = dp_model(layers, jit_compile=False)
    x, y = data(4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="enforce_clipping=False"):
        model.train_on_batch(x * 2.0, y)
    with pytest.raises(ValueError, match="XLA"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0, enforce_clipping=False),
                *small_cnn()[1:],
            ],
            jit_compile=True,
        )


def test_refuses_missing_dp_parameters():
    model = DPSequential([keras.Input((8, 8, 1)), *small_cnn()])
    with pytest.raises(ValueError, match="dp_parameters"):
        model.compile(loss=losses.DP_TauCategoricalCrossentropy(1.0))


def test_dpmodel_refuses_a_branching_graph():
    inputs = keras.Input((4,))
    h = L.DP_BoundedInput(upper_bound=1.0)(inputs)
    a = L.DP_QuickSpectralDense(4)(h)
    b = L.DP_QuickSpectralDense(4)(h)  # second branch from h, not a chain
    with pytest.raises(ValueError, match="chain"):
        DPModel(
            inputs=inputs,
            outputs=keras.layers.Add()([a, b]),
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata((4,), 4),
        )


# ---------------------------------------------------------- noise calibration
@pytest.mark.parametrize("strategy", ["global", "per-layer"])
def test_noise_std_matches_sigma_times_sensitivity(strategy):
    """Zero data gradient (all weights 0), SGD lr 1, no projection: the update IS
    the noise; its std per variable must match the formula within 3%, and the
    accountant must be told the multipliers that were applied."""
    sigma = 1.7
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(64, nm_coef=1.0),
        L.DP_GroupSort(2),
        L.DP_QuickSpectralDense(64, nm_coef=2.0),
        L.DP_AddBias(1.0, nm_coef=0.5),
        L.DP_QuickSpectralDense(64),
    ]
    model = dp_model(
        layers,
        input_shape=(8, 8, 1),
        num_classes=64,
        sigma=sigma,
        strategy=strategy,
        optimizer=keras.optimizers.SGD(1.0),
    )
    bounds = {k: float(v) for k, v in model.compute_gradient_bounds().items()}
    x, y = data(8, k=64)
    # Four noise draws from the same weights (so the same bounds): 4 x 4096
    # draws per kernel keep the 3% tolerance above 5 standard errors.
    initial = model.get_weights()
    steps = []
    for _ in range(4):
        model.set_weights(initial)
        steps += step_updates(model, x, y, np.zeros(8, np.float32))
    updates = {p: np.concatenate([u[p].ravel() for u in steps]) for p in steps[0]}
    b = model.dataset_metadata.batch_size  # the noisy sum is divided by B
    bounds = {k: v / b for k, v in bounds.items()}
    global_std = sigma * np.sqrt(sum(b**2 for b in bounds.values()))
    nm = {
        layer.bounded_variable.path: layer.nm_coef
        for layer in model.dp_layers
        if layer.has_parameters()
    }
    for v in model.trainable_variables:
        update = updates[v.path]
        expected = (
            global_std if strategy == "global" else sigma * bounds[v.path] * nm[v.path]
        )
        tolerance = 0.03 if update.size >= 4096 else 0.2  # the 4x64-entry bias
        per_step = [float(np.std(u[v.path])) / expected for u in steps]
        assert np.std(update) == pytest.approx(expected, rel=tolerance), (
            v.path,
            per_step,
        )
        assert abs(np.mean(update)) < 5 * expected / np.sqrt(update.size)
    # epsilon is computed from the plan's ledger: it must describe this noise
    applied = (
        (sigma,)
        if strategy == "global"
        else tuple(sigma * nm[v.path] for v in model.trainable_variables)
    )
    (steps,) = model.privacy_plan.ledger()
    assert steps.count == 4
    assert steps.parameter == pytest.approx(effective_noise_multiplier(applied))


def test_noise_is_independent_across_variables_and_steps():
    """Same-shape variables must not share noise: the difference of their updates
    would cancel it. Correlations across variables and steps must be ~0."""
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(64),
        L.DP_QuickSpectralDense(64),
        L.DP_QuickSpectralDense(64),
    ]
    model = dp_model(layers, num_classes=64, optimizer=keras.optimizers.SGD(1.0))
    x, y = data(4, k=64)
    steps = step_updates(model, x, y, np.zeros(4, np.float32), steps=2)
    flat = np.stack(
        [u.ravel() for step in steps for u in step.values() if u.size == 4096]
    )
    corr = np.corrcoef(flat)
    off_diagonal = corr[~np.eye(len(flat), dtype=bool)]
    assert len(flat) == 6 and np.max(np.abs(off_diagonal)) < 5 / np.sqrt(4096)


_REPRODUCE = """
import keras, numpy as np
from tests.helpers import dp_model, small_cnn, unit_samples, one_hot
keras.utils.set_random_seed(1)
model = dp_model(small_cnn())
model.train_on_batch(unit_samples(8, (8, 8, 1)), one_hot(np.arange(8)))
print(float(np.sum([np.sum(v.numpy() ** 2) for v in model.trainable_variables])))
"""


def test_noise_is_reproducible_with_a_seed_across_runs():
    """Two runs (processes) with DPParameters(seed=0) take the same step; in one
    process, a second model from the same seed draws other noise (shared noise
    would let the difference of two models' updates cancel it)."""
    runs = [
        subprocess.run(
            [sys.executable, "-c", _REPRODUCE],
            capture_output=True,
            text=True,
            check=True,
            cwd=str(pathlib.Path(__file__).parent.parent),
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        ).stdout.split()[-1]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    models = [dp_model(small_cnn(), sigma=1.0) for _ in range(2)]
    for model in models:
        model.set_weights(models[0].get_weights())
        model.train_on_batch(*data(8), np.zeros(8, np.float32))  # noise only
    difference = [
        a.numpy() - b.numpy()
        for a, b in zip(*(m.trainable_variables for m in models), strict=True)
    ]
    assert max(np.max(np.abs(d)) for d in difference) > 0


# -------------------------------------------------------------- keras usage
@pytest.mark.parametrize("jit", [False, True])
def test_fit_evaluate_predict_and_metrics_in_logs(jit):
    model = dp_model(
        small_cnn(),
        sigma=0.5,
        jit_compile=jit,
        n=200,
        sampling="shuffle",
        report_train_metrics=True,
    )
    x, y = data(200)
    history = model.fit(x, y, batch_size=50, epochs=2, verbose=0)
    assert set(history.history) >= {"loss", "accuracy", "sensitivity"}
    assert int(model.dp_steps.numpy()) == 8
    results = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(results) >= {"loss", "accuracy"}
    assert model.predict(x[:3], verbose=0).shape == (3, 10)


def test_jit_sanitises_nan_samples_instead_of_training_on_them():
    model = dp_model(small_cnn(), sigma=1e-9, jit_compile=True)
    x, y = data(4)
    x[1] = np.nan
    model.train_on_batch(x, y)
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


def test_projection_keeps_certified_constants_near_one():
    model = fitted_with_large_steps()
    for layer in model.dp_layers:
        if hasattr(layer, "lipschitz_bound"):
            assert float(layer.lipschitz_bound()) == pytest.approx(1.0, abs=0.02), (
                layer.name
            )


def test_save_load_round_trip_restores_weights_parameters_and_steps(tmp_path):
    model = dp_model(small_cnn(), sigma=0.8, n=100, sampling="shuffle")
    x, y = data(100)
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DPSequential)
    assert loaded.dp_parameters.to_dict() == model.dp_parameters.to_dict()
    assert loaded.dataset_metadata == model.dataset_metadata
    assert int(loaded.dp_steps.numpy()) == int(model.dp_steps.numpy()) == 2
    np.testing.assert_allclose(
        loaded.predict(x[:5], verbose=0),
        model.predict(x[:5], verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )
    assert loaded.privacy_plan.ledger() == model.privacy_plan.ledger()


def test_resume_gives_the_epsilon_of_the_whole_run(tmp_path):
    x, y = data(200)
    model = dp_model(small_cnn(), sigma=1.0, n=200, sampling="shuffle")
    model.fit(x, y, batch_size=50, epochs=2, verbose=0)
    model.save(tmp_path / "m.keras")
    resumed = keras.models.load_model(tmp_path / "m.keras")
    resumed.fit(x, y, batch_size=50, epochs=1, verbose=0)
    straight = dp_model(small_cnn(), sigma=1.0, n=200, sampling="shuffle")
    straight.fit(x, y, batch_size=50, epochs=3, verbose=0)
    assert int(resumed.dp_steps.numpy()) == int(straight.dp_steps.numpy()) == 12
    assert resumed.privacy_plan.epsilon() == straight.privacy_plan.epsilon()


def test_dpmodel_functional_chain_trains_and_round_trips(tmp_path):
    inputs = keras.Input((8, 8, 1))
    h = inputs
    chain = small_cnn()
    for layer in chain:
        h = layer(h)
    model = DPModel(
        inputs=inputs,
        outputs=h,
        dp_layers=chain,
        dp_parameters=DPParameters(1.0, 1e-5, seed=0),
        dataset_metadata=metadata(n=100, sampling="shuffle"),
    )
    model.compile(optimizer="sgd", loss=losses.DP_TauCategoricalCrossentropy(4.0))
    x, y = data(100)
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    model.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    assert isinstance(loaded, DPModel)
    assert [type(a) for a in loaded.dp_layers] == [type(b) for b in chain]
    assert int(loaded.dp_steps.numpy()) == 2
    np.testing.assert_allclose(
        loaded.predict(x[:3], verbose=0),
        model.predict(x[:3], verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_residual_model_trains_with_per_layer_noise():
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_QuickSpectralConv2D(4, 2, strides=2),
        *L.make_residuals(
            "1-lip-add", [L.DP_QuickSpectralConv2D(4, 3), L.DP_GroupSort(2)]
        ),
        L.DP_ScaledGlobalL2NormPooling2D(),
        L.DP_QuickSpectralDense(10),
    ]
    model = dp_model(layers, strategy="per-layer", n=100, sampling="shuffle")
    x, y = data(100)
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    (steps,) = model.privacy_plan.ledger()
    assert steps.parameter == pytest.approx(effective_noise_multiplier([1.0] * 3))


def test_refuses_outputs_with_extra_axes():
    """A (batch, T, C) output would sum T per-position losses per sample."""
    layers = [L.DP_BoundedInput(upper_bound=1.0), L.DP_Reshape((8, 8))]
    model = dp_model(layers, num_classes=8)
    x = unit_samples(4, (8, 8, 1))
    with pytest.raises(ValueError, match=r"\(batch, outputs\)"):
        model.train_on_batch(x, np.zeros((4, 8, 8), np.float32))


def test_refuses_a_loss_without_one_value_per_sample():
    """A get_L loss returning (batch, k) values would be summed over k per sample."""

    class PerOutputMAE(losses.DP_MeanAbsoluteError):
        bounds_proven = True  # the shape check is under test

        def call(self, y_true, y_pred):
            return tf.abs(y_true - y_pred)  # (batch, outputs): not per sample

    model = dp_model(small_cnn(), loss=PerOutputMAE())
    x, y = data(4)
    with pytest.raises(ValueError, match="one value per sample"):
        model.train_on_batch(x, y)


def test_a_model_without_input_builds_in_its_first_step_and_trains():
    """Without keras.Input a quick-spectral kernel is built inside the traced
    step: its certificate memory was made from a tensor of that graph, and
    fit failed ("defined in FuncGraph one_step_on_data")."""
    model = DPSequential(
        [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(2)],
        dp_parameters=DPParameters(1.0, 1e-5, seed=0),
        dataset_metadata=metadata((8,), 2, n=64, batch_size=8, sampling="shuffle"),
    )
    model.compile(keras.optimizers.SGD(0.1), losses.DP_TauCategoricalCrossentropy(8.0))
    x, y = unit_samples(64, (8,)), one_hot(np.arange(64), 2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert model.privacy_plan.steps_taken() == 8


def test_loss_weights_are_refused_not_ignored():
    """A review: compile(loss_weights=[5.0]) was silently ignored (the step
    calls the DP loss per sample, unweighted)."""
    with pytest.raises(ValueError, match="loss_weights"):
        dp_model(small_cnn(), loss_weights=[5.0])
