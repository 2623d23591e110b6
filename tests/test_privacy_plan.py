"""The privacy plan: the noise added and the epsilon reported are one object's."""

import keras
import numpy as np
import pytest

from deel_lipdp_ext import DPModel, DPParameters, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.accounting import effective_noise_multiplier
from deel_lipdp_ext.callbacks import AdaptiveQuantileClipping, DP_Accountant
from deel_lipdp_ext.data import poisson_batches
from deel_lipdp_ext.dpsgd import DPSGDModel
from deel_lipdp_ext.privacy_plan import LEDGER_CAPACITY, PrivacyPlan, privacy_plan_of

from .helpers import dp_model, metadata, one_hot, unit_samples

SIGMA = 1.7
STEPS = 4  # noise draws per measurement


def _chain():
    return [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(64, nm_coef=1.0),
        L.DP_GroupSort(2),
        L.DP_QuickSpectralDense(64, nm_coef=2.0),
        L.DP_QuickSpectralDense(64, nm_coef=0.5),
    ]


def _sequential(strategy):
    return dp_model(
        _chain(),
        num_classes=64,
        sigma=SIGMA,
        strategy=strategy,
        optimizer=keras.optimizers.SGD(1.0),
    )


def _functional(strategy):
    inputs = keras.Input((8, 8, 1))
    h = inputs
    for layer in _chain():
        h = layer(h)
    model = DPModel(
        inputs=inputs,
        outputs=h,
        dp_parameters=DPParameters(SIGMA, 1e-5, noisify_strategy=strategy),
        dataset_metadata=metadata(num_classes=64),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=losses.DP_TauCategoricalCrossentropy(8.0),
    )
    return model


def _dpsgd(strategy):
    net = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(64)]
    )
    model = DPSGDModel(
        net, DPParameters(SIGMA, 1e-5), metadata(num_classes=64), l2_norm_clip=0.7
    )
    model.compile(keras.optimizers.SGD(1.0), keras.losses.MeanSquaredError())
    return model


def _stds_and_sensitivities(model):
    """Zero data gradient (all sample weights 0), SGD(1), no projection: the
    update of each variable IS its noise / B. Returns (measured std x B,
    sensitivity) per variable."""
    b = model.dataset_metadata.batch_size
    if isinstance(model, DPSGDModel):
        variables = model.model.trainable_variables
        sensitivities = {v.path: model.l2_norm_clip for v in variables}
    else:
        model._project = lambda: None
        variables = model.trainable_variables
        bounds = model.compute_gradient_bounds()
        sensitivities = {k: float(v) for k, v in bounds.items()}
    before = {v.path: v.numpy().copy() for v in variables}
    x, y = unit_samples(8, (8, 8, 1)), one_hot(np.arange(8), 64)
    # STEPS draws from the same weights (so the same bounds): 4 x 4096 draws per
    # 64x64 kernel keep the 3% tolerance above 5 standard errors of the std.
    updates = {v.path: [] for v in variables}
    for _ in range(STEPS):
        for v in variables:
            v.assign(before[v.path])
        model.train_on_batch(x, y, np.zeros(8, np.float32))
        for v in variables:
            updates[v.path].append(v.numpy() - before[v.path])
    stds = {p: float(np.std(np.concatenate(u))) * b for p, u in updates.items()}
    # per-step stds, for the failure message: a wrong step shows as one outlier
    per_step = {
        p: [round(float(np.std(x)) * b, 4) for x in u] for p, u in updates.items()
    }
    return stds, sensitivities, per_step


@pytest.mark.parametrize(
    "make, strategy",
    [
        (_sequential, "global"),
        (_sequential, "per-layer"),
        (_functional, "global"),
        (_functional, "per-layer"),
        (_dpsgd, "global"),
    ],
)
def test_the_noise_applied_and_the_accounted_multiplier_are_the_same(make, strategy):
    """Measured noise std / sensitivity per variable gives each noise group's
    multiplier; the accounting event's multiplier must be their composition."""
    model = make(strategy)
    stds, sensitivities, per_step = _stds_and_sensitivities(model)
    (steps,) = model.privacy_plan.ledger()
    if isinstance(model, DPSGDModel):  # one joint group: sensitivity C
        kernel = model.model.layers[-1].kernel.path  # 4 x 4096 draws
        measured = [stds[kernel] / model.l2_norm_clip]
    elif strategy == "global":
        total = np.sqrt(sum(s**2 for s in sensitivities.values()))
        measured = [np.mean([stds[p] for p in stds]) / total]
    else:
        measured = [stds[p] / sensitivities[p] for p in stds]
        expected = {2: SIGMA * 1.0, 4: SIGMA * 2.0, 5: SIGMA * 0.5}
        for index, multiplier in expected.items():
            path = model.dp_layers[index].kernel.path
            assert stds[path] / sensitivities[path] == pytest.approx(
                multiplier, rel=0.03
            ), (path, sensitivities, per_step)
    assert steps.count == STEPS
    assert steps.parameter == pytest.approx(
        effective_noise_multiplier(measured), rel=0.03
    )
    # and the plan's planning uses the same composition as what ran
    assert model.privacy_plan.current_step_multiplier() == pytest.approx(
        steps.parameter, rel=1e-12
    )


def test_calibration_covers_per_layer_noise_and_planned_releases():
    """Calibrating sigma through the plan's own event: a per-layer model with
    an adaptive-clipping callback ends training at the target epsilon as
    DP_Accountant reports it (within tolerance, never above)."""
    n, b, epochs, target = 400, 40, 4, 2.0
    x, y = unit_samples(n, (8, 8, 1)), one_hot(np.arange(n))
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(32, nm_coef=1.0),
            L.DP_ClipGradient(1.0, mode="dynamic"),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(10, nm_coef=0.5),
        ],
        strategy="per-layer",
        n=n,
        batch_size=b,
    )
    clipping = AdaptiveQuantileClipping(
        poisson_batches(x, y, b), patience=2, noise_multiplier=3.0
    )
    clipping.set_model(model)  # attaches its release schedule to the plan
    sigma = model.privacy_plan.calibrate_noise_multiplier(
        target, epochs, tolerance=1e-3
    )
    model.set_noise_multiplier(sigma)
    accountant = DP_Accountant()
    history = model.fit(
        poisson_batches(x, y, b),
        epochs=epochs,
        verbose=0,
        callbacks=[clipping, accountant],
    )
    reported = history.history["epsilon"][-1]
    assert reported <= target
    # sigma - tolerance would have overshot: the calibration is tight
    fresh = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(32, nm_coef=1.0),
            L.DP_ClipGradient(1.0, mode="dynamic"),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(10, nm_coef=0.5),
        ],
        sigma=sigma - 1e-3,
        strategy="per-layer",
        n=n,
        batch_size=b,
    )
    fresh.build((None, 8, 8, 1))
    # A callback serves one model: the same schedule, for the fresh one.
    AdaptiveQuantileClipping(
        poisson_batches(x, y, b), patience=2, noise_multiplier=3.0
    ).set_model(fresh)
    planned = fresh.privacy_plan.planned_ledger(epochs)
    assert fresh.privacy_plan.epsilon(planned=planned) > target
    # The ledger holds the steps at the per-layer composition and two updates.
    steps = [r for r in model.privacy_plan.ledger() if r.name == "gradient_steps"]
    assert steps[0].parameter == pytest.approx(
        effective_noise_multiplier([sigma, sigma * 0.5])
    )
    assert sum(r.count for r in model.privacy_plan.ledger()) == epochs * 10 + 2


def test_a_new_noise_multiplier_starts_a_new_segment():
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
        ]
    )
    x, y = unit_samples(8, (8, 8, 1)), one_hot(np.arange(8))
    model.train_on_batch(x, y)
    model.set_noise_multiplier(3.0)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    assert [(r.parameter, r.count) for r in model.privacy_plan.ledger()] == [
        (1.0, 1),
        (3.0, 2),
    ]


def test_a_full_ledger_refuses_to_train_and_zeroes_a_traced_step():
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
        ]
    )
    plan = model.privacy_plan
    x, y = unit_samples(8, (8, 8, 1)), one_hot(np.arange(8))
    model.train_on_batch(x, y)  # traced with sigma 1: row 0
    for k in range(1, LEDGER_CAPACITY):  # fill every row with distinct releases
        plan.ledger_table.assign(
            plan.ledger_table.numpy()
            + np.eye(LEDGER_CAPACITY, 5)[k] * 0
            + np.outer(np.eye(LEDGER_CAPACITY)[k], [2.0, 1.0 + k, 1.0, 1.0, 4.0])
        )
    plan.ledger_size.assign(LEDGER_CAPACITY)
    model.set_noise_multiplier(2.5)  # a mechanism with no row left
    model._project = lambda: None  # (post-processing: not a release)
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.train_on_batch(x, y)
    for b, v in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())  # nothing released unrecorded
    with pytest.raises(ValueError, match="ledger is full"):
        model.fit(x, y, verbose=0)


def test_privacy_plan_of_accepts_a_dp_model_or_a_plan_only():
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
        ]
    )
    assert privacy_plan_of(model) is model.privacy_plan
    assert privacy_plan_of(model.privacy_plan) is model.privacy_plan
    assert isinstance(model.privacy_plan, PrivacyPlan)
    with pytest.raises(TypeError, match="DP model"):
        privacy_plan_of(keras.Sequential())


def test_max_epochs_and_the_curve_plan_the_mechanism_that_runs():
    """Per-layer noise and a clipping callback's planned releases included:
    n epochs fit the budget, n + 1 do not, and the curve agrees."""
    n, b = 400, 40
    x, y = unit_samples(n, (8, 8, 1)), one_hot(np.arange(n))
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(32, nm_coef=1.0),
            L.DP_ClipGradient(1.0, mode="dynamic"),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(10, nm_coef=0.5),
        ],
        sigma=6.0,
        strategy="per-layer",
        n=n,
        batch_size=b,
    )
    clipping = AdaptiveQuantileClipping(
        poisson_batches(x, y, b), patience=2, noise_multiplier=6.0
    )
    clipping.set_model(model)
    plan = model.privacy_plan
    epochs = plan.max_epochs(4.0)
    assert epochs >= 3
    curve = plan.epsilon_curve(epochs + 1)
    assert curve[epochs - 1] <= 4.0 < curve[epochs]
    assert curve[epochs - 1] == pytest.approx(
        plan.epsilon(planned=plan.planned_ledger(epochs)), rel=1e-9
    )
