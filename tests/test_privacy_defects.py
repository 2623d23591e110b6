"""Regression tests of the adversarial review's privacy defects (issue 11).

Each test reproduces one situation in which the reported guarantee was false
and checks that it is now refused or accounted as it ran. Items 9 (the AIJack
DPSGDManager) and 14 (DP_GNP_Factory) live beside their modules, in
tests/aijack/test_dpsgd_manager.py and tests/layers/test_gnp.py.
"""

import copy
import json
import zipfile

import dp_accounting
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.framework import meta_graph
from tensorflow.python.grappler import tf_optimizer

from deel_lipdp_ext import DPModel, DPParameters, DPSequential, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.callbacks import (
    AdaptiveQuantileClipping,
    DP_Accountant,
    LaplaceAdaptiveLossGradientClipping,
)
from deel_lipdp_ext.data import (
    DatasetMetadata,
    declare_sampling,
    from_numpy,
    load_digits_dataset,
    poisson_batches,
    sampling_provenance,
)
from deel_lipdp_ext.dpsgd import DPSGDModel
from deel_lipdp_ext.layers.base import example_squares, sample_norms
from deel_lipdp_ext.privacy_plan import ROUNDING_MARGIN, ReproducibleNoiseWarning
from deel_lipdp_ext.sensitivity import gradient_norm_check

from .helpers import dp_model, metadata, one_hot, small_cnn, unit_samples


def _epsilon(*segments, delta=1e-5):
    """dp-accounting's RDP epsilon of (q, sigma, steps) segments composed."""
    acc = rdp_privacy_accountant.RdpAccountant()
    for q, sigma, steps in segments:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(
                q, dp_accounting.GaussianDpEvent(sigma)
            ),
            steps,
        )
    return acc.get_epsilon(delta)


# ------------------------------------------------------------ 1. layer reuse
def test_a_layer_used_twice_is_refused():
    """The same dense layer twice in a chain: its gradient is the sum of both
    uses (ratio 1.18-1.41 in the review) but one use was bounded."""
    d = L.DP_QuickSpectralDense(16)
    with pytest.raises(ValueError, match="used twice"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_Flatten(),
                L.DP_QuickSpectralDense(16),
                d,
                L.DP_ReLU(),
                d,
                L.DP_ReLU(),
                L.DP_QuickFrobeniusDense(10),
            ]
        )
    inner = L.DP_QuickSpectralDense(16)
    with pytest.raises(ValueError, match="used twice"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_Flatten(),
                L.DP_QuickSpectralDense(16),
                inner,
                *L.make_residuals("1-lip-add", [inner]),
                L.DP_QuickFrobeniusDense(10),
            ]
        )


class _TiedDense(L.DP_QuickSpectralDense):
    """A dense layer that reuses another layer's kernel (weight tying)."""

    bounds_proven = True  # each use is the parent's forward pass

    def __init__(self, tied, **kwargs):
        super().__init__(tied.units, **kwargs)
        self._tied = lambda: tied  # not tracked as a sub-layer

    def build(self, input_shape):
        self.kernel, self.u = self._tied().kernel, self._tied().u


def test_a_variable_shared_by_two_layers_is_refused():
    a = L.DP_QuickSpectralDense(16)
    with pytest.raises(ValueError, match="shared by layers"):
        DPSequential(
            [keras.Input((16,)), L.DP_BoundedInput(upper_bound=1.0), a, _TiedDense(a)],
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata((16,), 16),
        ).compile(loss=losses.DP_TauCategoricalCrossentropy(1.0))


# ------------------------------------------------- 2. nested DP_BoundedInput
def test_bounded_input_inside_a_wrapper_is_refused():
    """A trusting DP_BoundedInput(1e-3) in a residual branch was never checked:
    ratio 999.9 on the next kernel."""
    with pytest.raises(ValueError, match="first layer only"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_Flatten(),
                *L.make_residuals(
                    "1-lip-add",
                    [L.DP_BoundedInput(1e-3, enforce_clipping=False)],
                ),
                L.DP_QuickSpectralDense(10),
            ]
        )


# --------------------------------------------------------- 3. noise replay
def _noise_model(seed=None, n=40, batch=10):
    """A model whose data gradient is zero (all sample weights 0) and whose
    projection is off, so with SGD(1) each step's update is -noise / B."""
    model = DPSequential(
        [
            keras.Input((8,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralDense(256),
            L.DP_QuickSpectralDense(16),
        ],
        dp_parameters=DPParameters(1.0, 1e-5, seed=seed),
        dataset_metadata=metadata((8,), 16, n=n, batch_size=batch, sampling="shuffle"),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=losses.DP_TauCategoricalCrossentropy(1.0),
    )
    model._project = lambda: None
    return model


class _Crash(RuntimeError):
    pass


class _RecordUpdates(keras.callbacks.Callback):
    """Each train step's update of the first kernel (the noise)."""

    def __init__(self, sink, interrupt_after=None):
        super().__init__()
        self.sink, self.interrupt_after = sink, interrupt_after

    def on_train_batch_begin(self, batch, logs=None):
        self.before = self.model.layers[1].kernel.numpy().copy()

    def on_train_batch_end(self, batch, logs=None):
        self.sink.append((self.model.layers[1].kernel.numpy() - self.before).ravel())
        if self.interrupt_after is not None and len(self.sink) >= self.interrupt_after:
            raise _Crash  # what BackupAndRestore recovers from


def _fit(model, sink, epochs=1, **kwargs):
    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = one_hot(np.arange(40), 16)
    callbacks = kwargs.pop("callbacks", [])
    model.fit(
        x,
        y,
        sample_weight=np.zeros(40, np.float32),
        batch_size=10,
        epochs=epochs,
        verbose=0,
        callbacks=[*callbacks, _RecordUpdates(sink, kwargs.pop("interrupt", None))],
    )


def _max_correlation(first, second):
    corr = np.corrcoef(np.stack([*first, *second]))
    return np.max(np.abs(corr[: len(first), len(first) :]))


@pytest.mark.parametrize("seed", [None, 7])
def test_no_noise_value_repeats_across_resume_paths(tmp_path, seed):
    """Resume by load_model, by load_weights into a new model, by
    BackupAndRestore, by tf.train.Checkpoint, and by rolling the same model
    back: the noise after resuming is uncorrelated with all noise before (the
    review found cosine 1.000000 after load_weights)."""
    keras.utils.set_random_seed(0)
    before = []
    model = _noise_model(seed)
    _fit(model, before)  # 4 steps
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    _fit(model, before)  # 4 more: the steps a rollback to step 4 must not replay
    threshold = 5 / np.sqrt(before[0].size)

    def resumed(make):
        keras.utils.set_random_seed(0)
        resumed_model = make()
        # a rollback of the same model keeps counting what ran (4 + 4)
        ran = 8 if make is by_rollback else 4
        assert int(resumed_model.dp_steps.numpy()) == ran
        after = []
        _fit(resumed_model, after)
        return after

    def by_load_weights():
        m = _noise_model(seed)
        m.load_weights(tmp_path / "m.weights.h5")
        m._project = lambda: None
        return m

    def by_checkpoint():
        m = _noise_model(seed)
        tf.train.Checkpoint(model=m).restore(checkpoint).expect_partial()
        return m

    def by_load_model():
        m = keras.models.load_model(tmp_path / "m.keras")
        m._project = lambda: None
        return m

    def by_rollback():
        model.load_weights(tmp_path / "m.weights.h5")  # the same object
        return model

    for make in (by_load_model, by_load_weights, by_checkpoint, by_rollback):
        after = resumed(make)
        assert _max_correlation(before, after) < threshold, make.__name__
    # BackupAndRestore: a run interrupted after 2 steps, resumed in a new model.
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    keras.utils.set_random_seed(0)
    first_run, second_run = [], []
    with pytest.raises(_Crash):
        _fit(_noise_model(seed), first_run, epochs=3, callbacks=[backup], interrupt=6)
    keras.utils.set_random_seed(0)
    restarted = _noise_model(seed)
    _fit(restarted, second_run, epochs=3, callbacks=[backup])
    # Epoch 1 (4 steps) was backed up; epochs 2-3 ran again after the crash.
    assert int(restarted.dp_steps.numpy()) == 12 and len(second_run) == 8
    assert _max_correlation(first_run, second_run) < threshold


def test_default_noise_seeds_differ_between_runs():
    """Keras's global seed must not fix the noise: two runs after
    set_random_seed(0) draw independent noise (the default seed is OS entropy)."""
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        sink = []
        _fit(_noise_model(), sink)
        runs.append(sink)
    assert _max_correlation(*runs) < 5 / np.sqrt(runs[0][0].size)


def test_the_noise_seed_is_never_saved_and_a_fixed_seed_warns(tmp_path):
    with pytest.warns(ReproducibleNoiseWarning, match="secret"):
        model = _noise_model(seed=123456789)
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        config = archive.read("config.json").decode()
    assert "123456789" not in config
    assert "seed" not in json.loads(config)["config"]["dp_parameters"]


def test_dpsgd_noise_does_not_repeat_after_load_weights(tmp_path):
    def make():
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64)])
        model = DPSGDModel(
            net,
            DPParameters(1.0, 1e-5),
            metadata((8,), 64, n=40, batch_size=10, sampling="shuffle"),
            l2_norm_clip=1.0,
        )
        model.compile(keras.optimizers.SGD(1.0), keras.losses.MeanSquaredError())
        return model

    def steps(model, count):
        out = []
        for _ in range(count):
            before = model.model.layers[0].kernel.numpy().copy()
            model.train_on_batch(
                np.ones((10, 8), np.float32),
                np.zeros((10, 64), np.float32),
                sample_weight=np.zeros(10, np.float32),
            )
            out.append((model.model.layers[0].kernel.numpy() - before).ravel())
        return out

    keras.utils.set_random_seed(0)
    model = make()
    before = steps(model, 3)
    model.save_weights(tmp_path / "d.weights.h5")
    keras.utils.set_random_seed(0)
    resumed = make()
    resumed.load_weights(tmp_path / "d.weights.h5")
    assert int(resumed.dp_steps.numpy()) == 3
    assert _max_correlation(before, steps(resumed, 3)) < 5 / np.sqrt(512)


# ------------------------------------------- 4. batches vs declared sampling
def test_batches_that_cannot_come_from_the_declared_sampling_are_refused():
    """fit(x, y, batch_size=N) with B = 10 put every sample in every step while
    the report said q = 0.01 (epsilon 1.21 instead of 96.1)."""
    x, y = unit_samples(1000, (8, 8, 1)), one_hot(np.arange(1000))
    model = dp_model(small_cnn(), n=1000, batch_size=10)  # declares Poisson
    with pytest.raises(ValueError, match="declares 'poisson'"):
        model.fit(x, y, batch_size=1000, verbose=0)
    shuffled = dp_model(small_cnn(), n=1000, batch_size=10, sampling="shuffle")
    with pytest.raises(ValueError, match="batch_size=1000"):
        shuffled.fit(x, y, batch_size=1000, verbose=0)
    with pytest.raises(ValueError, match="100 training rows"):
        shuffled.fit(x[:100], y[:100], batch_size=10, verbose=0)
    with pytest.raises(ValueError, match="not built by deel_lipdp_ext"):
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(10), verbose=0)
    with pytest.raises(ValueError, match="batch_size: data 20 vs metadata 10"):
        model.fit(poisson_batches(x, y, 20), verbose=0)
    # A step outside fit cannot exceed the declared sampling either.
    with pytest.raises(ValueError, match="at most"):
        model.train_on_batch(x, y)
    assert int(model.dp_steps.numpy()) == 0


def test_the_report_states_the_sampling_that_ran():
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    model = dp_model(small_cnn(), sigma=1.0, n=200, batch_size=20)
    accountant = DP_Accountant()
    model.fit(poisson_batches(x, y, 20), epochs=1, verbose=0, callbacks=[accountant])
    model.fit(poisson_batches(x, y, 20, seed=3), epochs=1, verbose=0)
    declared = declare_sampling(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(20), model.dataset_metadata
    )
    model.fit(declared, epochs=1, verbose=0, callbacks=[accountant])
    model.train_on_batch(x[:20], y[:20])
    assert accountant.history[0]["sampling"] == ("poisson",)
    assert accountant.history[0]["exact"]
    samplings = model.privacy_plan.samplings()
    assert samplings == (
        "poisson",
        "poisson (seeded: reproducible, sampling not secret)",
        "declared by the user",
        "unverified (train_on_batch or a custom loop)",
    )
    assert not model.privacy_plan.is_exact()
    # Whatever the labels, epsilon is the composition of the 31 steps at q.
    assert model.privacy_plan.epsilon() == pytest.approx(
        _epsilon((0.1, 1.0, 31)), rel=1e-9
    )


def test_a_public_sample_count_keeps_the_data_size_out_of_the_mechanism():
    """By default q = B / N and ceil(N / B) steps come from the rows (the size
    is public; a saved model records N): one more row changed the step count,
    which the add/remove guarantee cannot hide (a review). With a public
    nb_samples, both neighbours run and report the same mechanism."""
    x, y = unit_samples(81, (8, 8, 1)), one_hot(np.arange(81))
    reports = []
    for rows in (80, 81):
        train, _, meta = from_numpy(
            x[:rows], y[:rows], batch_size=10, num_classes=10, nb_samples=100
        )
        model = DPSequential(
            [keras.Input((8, 8, 1)), *small_cnn()],
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=meta,
        )
        model.compile(
            keras.optimizers.SGD(0.1), losses.DP_TauCategoricalCrossentropy(8.0)
        )
        model.fit(train, epochs=1, verbose=0)
        reports.append((int(model.dp_steps.numpy()), model.privacy_plan.epsilon()))
    assert reports[0] == reports[1]
    assert reports[0][1] == pytest.approx(_epsilon((0.1, 1.0, 10)), rel=1e-9)


def _rows_per_step(model, x) -> list[list[int]]:
    """Run `model` eagerly and record the rows of `x` each train step gets."""
    seen = []
    keys = {float(v): i for i, v in enumerate(x.reshape(len(x), -1)[:, 0])}
    step = model.train_step

    def recording_step(data):
        seen.append(
            [keys[float(v)] for v in np.reshape(data[0], (len(data[0]), -1))[:, 0]]
        )
        return step(data)

    model.train_step = recording_step
    model.run_eagerly = True
    return seen


def test_fit_on_arrays_draws_secret_batches_whatever_the_global_seed():
    """Keras shuffles arrays from the global seed: after
    keras.utils.set_random_seed(0) every epoch of every run trained on the
    same known batches (accounted: fresh secret shuffles; with fixed batches
    N = 60000, B = 256, 10 epochs: epsilon 15.8, not 0.92; a review)."""
    x, y = unit_samples(40, (8, 8, 1)), one_hot(np.arange(40))
    x[:, 0, 0, 0] = np.linspace(0.01, 0.4, 40)  # a key per row
    orders = []
    for make in (
        lambda: dp_model(small_cnn(), n=40, batch_size=10, sampling="shuffle"),
        lambda: DPSGDModel(
            keras.Sequential(
                [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
            ),
            DPParameters(1.0, 1e-5),
            metadata(n=40, batch_size=10, sampling="shuffle"),
            l2_norm_clip=1.0,
        ),
    ):
        for _ in range(2):  # two runs, each from the same global seed
            keras.utils.set_random_seed(0)
            model = make()
            if not model.compiled:
                model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
            seen = _rows_per_step(model, x)
            model.fit(x, y, batch_size=10, epochs=2, verbose=0)
            epochs = [sum(seen[:4], []), sum(seen[4:], [])]
            assert all(sorted(epoch) == list(range(40)) for epoch in epochs)
            assert epochs[0] != epochs[1]
            orders.append(epochs[0])
            assert model.privacy_plan.samplings() == (
                "shuffle (accounted as Poisson: heuristic)",
            )
    assert orders[0] != orders[1] and orders[2] != orders[3]


def test_fit_on_arrays_keeps_keras_validation_split_and_sample_weight():
    """validation_split holds out the last rows (as Keras), and only when no
    validation_data is given: with both, Keras trained on all 125 rows for a
    metadata of N = 100 (13 steps per epoch accounted as 10; a review)."""
    x, y = unit_samples(125, (8, 8, 1)), one_hot(np.arange(125))
    x[:, 0, 0, 0] = np.linspace(0.01, 0.4, 125)
    model = dp_model(small_cnn(), n=100, batch_size=10, sampling="shuffle")
    with pytest.raises(ValueError, match="125 training rows"):
        model.fit(
            x,
            y,
            batch_size=10,
            validation_split=0.2,
            validation_data=(x[:5], y[:5]),
            verbose=0,
        )
    # a negative split passed 100 rows as 150 and trained all 100 at q = B / 150
    # (epsilon 0.62 reported for 4.85 with N = 10000, split -99; a review)
    larger = dp_model(small_cnn(), n=150, batch_size=10, sampling="shuffle")
    for split in (-0.5, float("nan"), 1.0):
        with pytest.raises(ValueError, match="validation_split must lie in"):
            larger.fit(x[:100], y[:100], batch_size=10, validation_split=split)
    assert int(larger.dp_steps.numpy()) == 0
    seen = _rows_per_step(model, x)
    weights = np.where(np.arange(125) % 2 == 0, 1.0, 0.5).astype(np.float32)
    history = model.fit(
        x, y, batch_size=10, validation_split=0.2, sample_weight=weights, verbose=0
    )
    assert sorted(sum(seen, [])) == list(range(100))  # the last 25 held out
    assert "val_loss" in history.history
    assert int(model.dp_steps.numpy()) == 10
    rows = slice(0, 100)
    model.fit(x[rows], y[rows], batch_size=10, validation_split=None, verbose=0)
    assert int(model.dp_steps.numpy()) == 20  # None: no split, as in Keras


def test_a_refused_fit_leaves_later_steps_unverified():
    """A fit refused after its data check (here: 99 weights for 100 rows)
    left the data's label, so a custom loop's steps were reported as checked
    shuffled batches (a review); refusals name what is wrong."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, batch_size=10, sampling="shuffle")
    with pytest.raises(ValueError, match="sample_weight differ in length: 100 vs 99"):
        model.fit(x, y, batch_size=10, sample_weight=np.ones(99), verbose=0)
    with pytest.raises(ValueError, match="takes y as one array.*dict"):
        model.fit(x, {"out": y}, batch_size=10, verbose=0)
    step = tf.function(model.train_step)
    step((x[:10], y[:10]))
    assert model.privacy_plan.samplings() == (
        "unverified (train_on_batch or a custom loop)",
    )


# ---------------------------------------- 5. past steps keep their mechanism
def test_epsilon_of_past_steps_survives_freezing_and_nm_coef_changes():
    """Per-layer noise: freezing 2 of 3 layers after 100 steps lowered the
    epsilon of those steps from 3.006 to 1.222; nm_coef=100 set afterwards
    lowered it to 2.073. The ledger keeps each step's mechanism."""
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(16),
        L.DP_QuickSpectralDense(16),
        L.DP_QuickSpectralDense(10),
    ]
    model = dp_model(layers, sigma=2.0, strategy="per-layer", n=200, batch_size=20)
    x, y = unit_samples(20, (8, 8, 1)), one_hot(np.arange(20))
    for _ in range(30):
        model.train_on_batch(x, y)
    three = 2.0 / np.sqrt(3)  # three per-layer Gaussians of sigma 2 compose
    assert model.privacy_plan.epsilon() == pytest.approx(
        _epsilon((0.1, three, 30)), rel=1e-9
    )
    model.dp_layers[2].trainable = False  # the first two dense layers
    model.dp_layers[3].trainable = False
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=losses.DP_TauCategoricalCrossentropy(8.0),
    )
    for _ in range(10):
        model.train_on_batch(x, y)
    ran = _epsilon((0.1, three, 30), (0.1, 2.0, 10))
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    # after compile: the step is traced again at its next call (it ran on
    # with 2.0 while the budget check planned with 200, a review)
    model.dp_layers[4].nm_coef = 100.0
    model.train_on_batch(x, y)
    ran = _epsilon((0.1, three, 30), (0.1, 2.0, 10), (0.1, 200.0, 1))
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    model.compile(  # a new trace: the same segment, the old ones unchanged
        optimizer=keras.optimizers.SGD(0.1),
        loss=losses.DP_TauCategoricalCrossentropy(8.0),
    )
    model.train_on_batch(x, y)
    ran = _epsilon((0.1, three, 30), (0.1, 2.0, 10), (0.1, 200.0, 2))
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)


# ------------------------------------------------ 6. ledger and load_weights
def test_load_weights_restores_the_ledger_of_releases(tmp_path):
    """Resuming with load_weights kept the steps but lost the dynamic-clipping
    releases: epsilon 6.251 before, 4.224 after."""

    def make():
        return dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_Flatten(),
                L.DP_QuickSpectralDense(10),
                L.DP_ClipGradient(1.0, mode="dynamic"),
            ],
            n=200,
            batch_size=50,
        )

    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    model = make()
    clipping = AdaptiveQuantileClipping(poisson_batches(x, y, 50), noise_multiplier=0.5)
    model.fit(poisson_batches(x, y, 50), epochs=3, verbose=0, callbacks=[clipping])
    assert len(model.privacy_plan.ledger()) == 2  # steps and clipping updates
    model.save_weights(tmp_path / "w.weights.h5")
    resumed = make()
    resumed.load_weights(tmp_path / "w.weights.h5")
    assert resumed.privacy_plan.ledger() == model.privacy_plan.ledger()
    assert resumed.privacy_plan.epsilon() == model.privacy_plan.epsilon()


# ------------------------------------------- 7. mismatched batch dimensions
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "shapes", [(1, 16, None), (1, 1, 16), (16, 1, None)], ids=["y16", "w16", "x16"]
)
def test_mismatched_batch_dimensions_are_refused(jit, shapes):
    """One x row with a 16-row y (or sample weight), or 16 x rows with one y
    row: the loss broadcast and the batch gradient was 16x the bound."""
    nx, ny, nw = shapes
    x = unit_samples(nx, (8, 8, 1))
    y = one_hot(np.zeros(ny, int))
    elements = (x, y) if nw is None else (x, y, np.ones(nw, np.float32))
    model = dp_model(small_cnn(), sigma=1e-9, jit_compile=jit, batch_size=16)
    ds = declare_sampling(
        tf.data.Dataset.from_tensors(elements).repeat(2), model.dataset_metadata
    )
    before = [v.numpy().copy() for v in model.trainable_variables]
    error = ValueError if jit else (ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(error, match="leading|broadcast"):
        model.fit(ds, verbose=0)
    for b, v in zip(before, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())


# ---------------------------------------------------- 8. Poisson seed default
def test_poisson_sampling_is_secret_by_default():
    """The sampler's seed defaulted to 0: anyone knowing the code knew each
    record's steps (reported 2.970, 4.729 for the known participations)."""
    x, y = unit_samples(500, (4,)), one_hot(np.arange(500), 4)
    batches = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        ds, _, _ = from_numpy(x, y, batch_size=50)
        batches.append(next(iter(ds))[0].numpy())  # the first batch's samples
        assert not sampling_provenance(ds).seeded
    assert not np.array_equal(batches[0], batches[1])
    seeded, _, _ = from_numpy(x, y, batch_size=50, seed=1)
    assert sampling_provenance(seeded).seeded
    train, _, _ = load_digits_dataset(batch_size=100)
    assert not sampling_provenance(train).seeded


# --------------------------------------------------- 10. overflow to float32
def test_finite_inputs_above_the_float32_range_never_reach_the_update():
    """Float64 inputs of 1e39 pass a float64 finiteness check, become inf under
    the float32 cast and made NaN; in DP-SGD one float32 sample of 3e38 gave
    NaN weights."""
    model = dp_model(small_cnn(), sigma=1e-9)
    x = unit_samples(4, (8, 8, 1)).astype(np.float64)
    x[1] = 1e39
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        model.train_on_batch(x, one_hot(range(4)))
    xla = dp_model(small_cnn(), sigma=1e-9, jit_compile=True)
    xla.train_on_batch(x, one_hot(range(4)))
    assert all(np.isfinite(v.numpy()).all() for v in xla.trainable_variables)
    net = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(4)]
    )
    dpsgd = DPSGDModel(
        net, DPParameters(1e-6, 1e-5), metadata((8,), 4, batch_size=4), l2_norm_clip=1.0
    )
    dpsgd.compile(keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    xs = np.ones((4, 8), np.float32)
    xs[2] = 3e38
    dpsgd.train_on_batch(xs, np.zeros((4, 4), np.float32))
    assert all(np.isfinite(v.numpy()).all() for v in net.trainable_variables)


# ---------------------------------------------- 11. NaN weight under XLA
def test_a_nan_sample_weight_under_xla_gives_a_finite_update():
    model = dp_model(small_cnn(), sigma=1e-9, jit_compile=True)
    weights = np.array([1.0, np.nan, 1.0, 1.0], np.float32)
    model.train_on_batch(unit_samples(4, (8, 8, 1)), one_hot(range(4)), weights)
    assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


# ------------------------------------------------------ 12. float labels
def test_fractional_column_labels_are_refused():
    """(N, 1) float labels 0.9, 0.2 were read as one class, every label 1.0."""
    x = unit_samples(10, (4,))
    y = np.array([[0.9], [0.2]] * 5)
    with pytest.raises(ValueError, match="whole numbers"):
        from_numpy(x, y, batch_size=2)
    _, _, meta = from_numpy(
        x, np.arange(10.0).reshape(-1, 1) % 3, batch_size=2, num_classes=3
    )
    assert meta.num_classes == 3  # integral floats are class indices


# ---------------------------------------------------- 13. mixed precision
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policies_are_refused(policy):
    """bf16/fp16 trained with ratios 1.0065 / 1.0009 and crashed in graph mode."""
    keras.config.set_dtype_policy(policy)
    try:
        with pytest.raises(ValueError, match="float32"):
            dp_model(small_cnn())
        net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
        with pytest.raises(ValueError, match="float32"):
            DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((8,), 4), 1.0)
    finally:
        keras.config.set_dtype_policy("float32")


def test_bounds_still_hold_on_a_model_that_passed_every_check():
    """The checks above refuse; what they accept keeps its bound."""
    model = dp_model(small_cnn(), sigma=1.0)
    report = gradient_norm_check(
        model, (unit_samples(16, (8, 8, 1)), one_hot(range(16)))
    )
    assert report.max_ratio <= 1 + 1e-4


# =================================== second adversarial review (same issue)
def _dense_model(n=1000, b=16, jit=False, sampling="shuffle", sigma=1e-9, **kw):
    model = DPSequential(
        [
            keras.Input((8,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralDense(4),
        ],
        dp_parameters=DPParameters(sigma, 1e-5),
        dataset_metadata=metadata((8,), 4, n=n, batch_size=b, sampling=sampling),
        **kw,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=losses.DP_TauCategoricalCrossentropy(1.0),
        jit_compile=jit,
    )
    model._project = lambda: None
    return model


def _relaxed(model, x, y):
    """Two steps of different batch sizes: the retrace relaxes the batch
    dimension to None, where XLA can no longer see it statically."""
    model.train_on_batch(x[:16], y[:16])
    model.train_on_batch(x[:15], y[:15])


@pytest.mark.parametrize("jit", [False, True])
def test_broadcasting_batches_never_reach_the_update_even_under_xla(jit):
    """With a relaxed batch dimension XLA dropped the assert, and one x row
    with 16 label rows gave a summed gradient 10x the per-sample bound."""
    x, y = unit_samples(16, (8,)), one_hot(np.zeros(16, int), 4)
    model = _dense_model(jit=jit)
    _relaxed(model, x, y)
    kernel = model.layers[1].kernel
    before = kernel.numpy().copy()
    try:
        model.train_on_batch(x[:1], y)  # one sample, 16 label rows
    except (ValueError, tf.errors.InvalidArgumentError):
        assert not jit  # outside XLA the assert refuses
    np.testing.assert_allclose(kernel.numpy(), before, atol=1e-6)  # noise ~1e-9


def test_dpsgd_broadcasting_batches_never_reach_the_update_under_xla():
    net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model = DPSGDModel(
        net,
        DPParameters(1e-9, 1e-5),
        metadata((8,), 4, n=1000, batch_size=16, sampling="shuffle"),
        l2_norm_clip=1.0,
    )
    model.compile(
        keras.optimizers.SGD(1.0), keras.losses.MeanSquaredError(), jit_compile=True
    )
    x, y = unit_samples(16, (8,)), np.ones((16, 4), np.float32)
    _relaxed(model, x, y)
    before = [v.numpy().copy() for v in net.trainable_variables]
    model.train_on_batch(x[:1], y)
    for b, v in zip(before, net.trainable_variables, strict=True):
        np.testing.assert_allclose(v.numpy(), b, atol=1e-6)


def test_batches_above_the_sampling_limit_never_reach_the_update_under_xla():
    x, y = unit_samples(1000, (8,)), one_hot(np.arange(1000), 4)
    model = _dense_model(b=10, jit=True)
    model.train_on_batch(x[:10], y[:10])
    model.train_on_batch(x[:9], y[:9])  # relaxed batch dimension
    kernel = model.layers[1].kernel
    before = kernel.numpy().copy()
    model.train_on_batch(x, y)  # 1000 rows where at most 10 can be drawn
    np.testing.assert_allclose(kernel.numpy(), before, atol=1e-6)


def test_inputs_of_another_shape_than_the_bounds_were_computed_for_are_refused():
    """DP_AddBias bounds its gradient with the positions seen at build: 64x64
    images on a model built for 4x4 gave 16x the bound."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_AddBias(1.0),
            L.DP_ScaledGlobalL2NormPooling2D(),
            L.DP_QuickFrobeniusDense(2),
        ],
        input_shape=(4, 4, 1),
        num_classes=2,
        n=20,
        batch_size=10,
        sampling="shuffle",
    )
    with pytest.raises(ValueError, match="input_shape"):
        model.fit(unit_samples(20, (64, 64, 1)), one_hot(range(20), 2), batch_size=10)


def test_a_merge_fed_the_same_branch_twice_is_refused():
    """(main, main) instead of (main, skip): the main branch's gradient doubled
    (ratio 2.0; 5.06 for four stacked blocks)."""
    inputs = keras.Input((16,))
    h = L.DP_BoundedInput(upper_bound=1.0)(inputs)
    pair = L.DP_SplitResidual()(h)
    branch = L.DP_WrappedResidual(L.DP_QuickSpectralDense(16))(pair)
    merged = L.DP_MergeResidual("add")((branch[0], branch[0]))
    outputs = L.DP_QuickFrobeniusDense(2)(merged)
    with pytest.raises(ValueError, match="exactly the outputs"):
        DPModel(
            inputs=inputs,
            outputs=outputs,
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata((16,), 2),
        )


def test_a_subsampled_release_must_read_the_declared_sampling():
    """Adaptive clipping read 20 records at q = 1 (or a fixed batch) and was
    accounted at the model's q: reported 8.07 where 21.49 ran."""
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
            L.DP_ClipGradient(1.0, mode="dynamic"),
        ],
        n=200,
        batch_size=20,
    )
    for wrong in (
        poisson_batches(x[:20], y[:20], 20),  # q = 1 on 20 records
        tf.data.Dataset.from_tensors((x[:51], y[:51])).repeat(),  # a fixed batch
    ):
        clipping = AdaptiveQuantileClipping(wrong, noise_multiplier=0.5)
        with pytest.raises(ValueError, match="nb_samples_train|not built"):
            model.fit(poisson_batches(x, y, 20), verbose=0, callbacks=[clipping])
    assert int(model.dp_steps.numpy()) == 0
    # a declared pipeline is accepted, and makes the report inexact
    declared = declare_sampling(
        tf.data.Dataset.from_tensors((x[:20], y[:20])).repeat(10),
        model.dataset_metadata,
    )
    clipping = AdaptiveQuantileClipping(declared, noise_multiplier=0.5)
    model.fit(poisson_batches(x, y, 20), verbose=0, callbacks=[clipping])
    assert "declared by the user" in model.privacy_plan.samplings()
    assert not model.privacy_plan.is_exact()


def test_the_metadata_cannot_change_under_a_traced_step():
    """configure() with N = 100 after 100 steps at N = 1000: the trace kept
    q = 0.01 and reported 1.34 where 7.93 ran."""
    model = _dense_model(n=1000, b=10, sigma=1.0)
    x, y = unit_samples(10, (8,)), one_hot(np.arange(10), 4)
    model.train_on_batch(x, y)
    smaller = metadata((8,), 4, n=100, batch_size=10, sampling="shuffle")
    with pytest.raises(ValueError, match="cannot change once steps have run"):
        model.privacy_plan.configure(model.dp_parameters, smaller)
    # sigma may change, and the next step is traced with it
    model.privacy_plan.set_noise_multiplier(4.0)
    model.train_on_batch(x, y)
    assert [r.parameter for r in model.privacy_plan.ledger()] == [1.0, 4.0]


class _HiddenStatistics(keras.layers.Layer):
    """A custom layer hiding a BatchNormalization (not in `.layers`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.BatchNormalization(momentum=0.0)

    def call(self, x, training=None):
        return self.norm(x, training=training)


class _Counter(keras.layers.Layer):
    """Writes a data statistic into a non-trainable weight in training."""

    def build(self, input_shape):
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        if training:
            self.seen.assign(tf.reduce_sum(x))
        return x


@pytest.mark.parametrize(
    "hidden",
    [
        lambda: _HiddenStatistics(),
        lambda: keras.layers.TimeDistributed(keras.layers.BatchNormalization()),
        lambda: _Counter(),
    ],
    ids=["custom", "wrapper", "state"],
)
def test_dpsgd_refuses_hidden_state_written_from_the_data(hidden):
    """A BatchNormalization inside a custom layer or a Keras wrapper held the
    raw features of the first record after one step, saved without noise."""
    net = keras.Sequential([keras.Input((3, 4)), hidden(), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="mixes the examples|non-trainable state"):
        DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((3, 4), 12), 1.0)


def test_training_metrics_are_withheld_unless_asked_for():
    """Training loss and metrics are computed from private batches without
    noise (two runs on D and D' told apart at sigma = 1e6)."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    held_out = unit_samples(20, (8, 8, 1), seed=1), one_hot(np.arange(20))
    history = model.fit(x, y, batch_size=50, validation_data=held_out, verbose=0)
    assert "loss" not in history.history and "accuracy" not in history.history
    assert {"sensitivity", "val_loss", "val_accuracy"} <= set(history.history)
    shown = dp_model(small_cnn(), n=100, sampling="shuffle", report_train_metrics=True)
    assert {"loss", "accuracy"} <= set(
        shown.fit(x, y, batch_size=50, verbose=0).history
    )


def test_steps_per_epoch_must_be_what_an_epoch_runs():
    """nb_steps_per_epoch = 1 with 20-step epochs: the budget stop and the
    calibration ended at 1.302 for a budget of 1."""
    with pytest.raises(ValueError, match="ceil"):
        metadata_with_steps = dict(
            input_shape=(8,),
            num_classes=4,
            nb_samples_train=1000,
            nb_samples_test=0,
            batch_size=50,
            nb_steps_per_epoch=1,
        )
        DatasetMetadata(**metadata_with_steps)


def test_a_release_the_ledger_cannot_take_changes_nothing():
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
            L.DP_ClipGradient(1.0, mode="dynamic"),
        ],
        n=200,
        batch_size=20,
    )
    plan = model.privacy_plan
    rows = np.zeros((plan.ledger_table.shape[0], 5))
    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] = 1.0, np.arange(1, 65), 0.5, 1
    plan.ledger_table.assign(rows)
    plan.ledger_size.assign(rows.shape[0])  # full
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    svt = LaplaceAdaptiveLossGradientClipping(poisson_batches(x, y, 20), epsilon=1.0)
    svt.set_model(model)
    with pytest.raises(ValueError, match="ledger is full"):
        svt.on_epoch_begin(0)
    assert float(model.dp_layers[-1].clip_value.numpy()) == 1.0  # not released


def test_dp_lambda_certificates_are_spot_checked():
    for function, lipschitz in ((lambda t: t + 1.0, 1.0), (lambda t: 3.0 * t, 1.0)):
        with pytest.raises(ValueError, match="map 0 to 0|not 1.0-Lipschitz"):
            dp_model(
                [
                    L.DP_BoundedInput(upper_bound=1.0),
                    L.DP_Flatten(),
                    L.DP_Lambda(function, lipschitz=lipschitz),
                    L.DP_QuickSpectralDense(10),
                ]
            )


def test_restoring_earlier_weights_does_not_roll_the_epsilon_back(tmp_path):
    """set_weights / load_weights / a checkpoint restore of EARLIER state into
    the same model (EarlyStopping(restore_best_weights=True) does this) rolled
    the saved ledger back: the epsilon forgot steps that ran."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    early = model.get_weights()
    model.save_weights(tmp_path / "early.weights.h5")
    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=50, epochs=3, verbose=0)
    ran = _epsilon((0.5, 1.0, 8))
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    model.set_weights(early)
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    model.load_weights(tmp_path / "early.weights.h5")
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    tf.train.Checkpoint(model=model).restore(checkpoint)
    assert model.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
    stopper = keras.callbacks.EarlyStopping(
        "val_loss", patience=0, restore_best_weights=True, mode="max"
    )
    model.fit(
        x,
        y,
        batch_size=50,
        epochs=3,
        validation_data=(unit_samples(20, (8, 8, 1), seed=1), one_hot(np.arange(20))),
        verbose=0,
        callbacks=[stopper],
    )
    assert model.privacy_plan.epsilon() >= _epsilon((0.5, 1.0, 10)) * (1 - 1e-9)
    # Weights of ANOTHER run loaded into this one: both runs are composed.
    other = dp_model(small_cnn(), n=100, sampling="shuffle")
    other.fit(x, y, batch_size=50, epochs=1, verbose=0)
    other.save_weights(tmp_path / "other.weights.h5")
    steps = int(model.dp_steps.numpy())
    model.load_weights(tmp_path / "other.weights.h5")
    assert model.privacy_plan.ledger()[0].count >= steps + 2


# ==================================== third review: round two of the adversary
def test_a_resumed_run_never_reports_less_after_a_restore(tmp_path):
    """Resume from a file, train, then restore the snapshot taken just after
    loading (EarlyStopping's restore_best_weights): the ledger fell back to the
    loaded 100 steps while 200 ran. Two runs from one saved start: loading one
    into the other forgot a run."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    first = dp_model(small_cnn(), n=100, sampling="shuffle")
    first.fit(x, y, batch_size=50, epochs=2, verbose=0)  # 4 steps
    first.save_weights(tmp_path / "first.weights.h5")
    resumed = dp_model(small_cnn(), n=100, sampling="shuffle")
    resumed.load_weights(tmp_path / "first.weights.h5")
    just_loaded = resumed.get_weights()
    resumed.fit(x, y, batch_size=50, epochs=2, verbose=0)  # 4 more
    ran = _epsilon((0.5, 1.0, 8))
    resumed.set_weights(just_loaded)
    assert resumed.privacy_plan.epsilon() >= ran * (1 - 1e-9)
    # two runs from one untrained start, then one loaded into the other
    start = dp_model(small_cnn(), n=100, sampling="shuffle")
    start.build((None, 8, 8, 1))
    start.save_weights(tmp_path / "start.weights.h5")
    runs = []
    for name in ("a", "b"):
        run = dp_model(small_cnn(), n=100, sampling="shuffle")
        run.load_weights(tmp_path / "start.weights.h5")
        run.fit(x, y, batch_size=50, epochs=2, verbose=0)
        run.save_weights(tmp_path / f"{name}.weights.h5")
        runs.append(run)
    runs[0].load_weights(tmp_path / "b.weights.h5")
    assert runs[0].privacy_plan.epsilon() >= ran * (1 - 1e-9)


def test_a_model_saved_after_a_rollback_carries_everything_that_ran(tmp_path):
    """EarlyStopping(restore_best_weights=True) picked epoch 1 of 6 and the
    saved file said epsilon 1.57 where 3.57 ran (adversarial review): the
    ledger variables are weights, and the rollback reset them before the save.
    Every save path now writes the combined ledger."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    start = model.get_weights()
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    after_one = model.get_weights()
    model.fit(x, y, batch_size=50, epochs=5, verbose=0)  # 12 steps in all
    ran = model.privacy_plan.epsilon()
    for snapshot in (after_one, start):
        model.set_weights(snapshot)  # as restore_best_weights does
        assert model.privacy_plan.epsilon() >= ran * (1 - 1e-9)
        model.save(tmp_path / "m.keras")
        model.save_weights(tmp_path / "m.weights.h5")
        loaded = keras.models.load_model(tmp_path / "m.keras")
        assert loaded.privacy_plan.epsilon() >= ran * (1 - 1e-9)
        fresh = dp_model(small_cnn(), n=100, sampling="shuffle")
        fresh.build((None, 8, 8, 1))
        fresh.load_weights(tmp_path / "m.weights.h5")
        assert fresh.privacy_plan.epsilon() >= ran * (1 - 1e-9)
    # and saving twice does not double-count
    model.save(tmp_path / "again.keras")
    again = keras.models.load_model(tmp_path / "again.keras")
    assert again.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)


def test_a_model_built_for_another_shape_than_the_metadata_is_refused():
    """keras.Input((4, 4, 1)) with metadata (16, 16, 1): the bias was bounded
    for 16 positions while 256 ran (ratio 3.8 under XLA)."""
    with pytest.raises(ValueError, match="takes inputs of shape"):
        DPSequential(
            [
                keras.Input((4, 4, 1)),
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_AddBias(1.0),
                L.DP_ScaledGlobalL2NormPooling2D(),
                L.DP_QuickFrobeniusDense(2),
            ],
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata((16, 16, 1), 2),
        ).compile(loss=losses.DP_TauCategoricalCrossentropy(1.0))


def test_layers_of_a_dp_model_cannot_be_reused_by_another():
    """A new DPSequential over a trained model's layers started a fresh
    ledger: 2.48 reported where 4.33 ran on those weights."""
    trained = dp_model(small_cnn())
    with pytest.raises(ValueError, match="belongs to another DP model"):
        DPSequential(
            [keras.Input((8, 8, 1)), *trained.layers],
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata(),
        ).compile(loss=losses.DP_TauCategoricalCrossentropy(1.0))


def _dpsgd_on(net):
    """A compiled DPSGDModel on `net` ((8,) -> (4,)), for 64 samples in
    shuffled batches of 8."""
    model = DPSGDModel(
        net,
        DPParameters(1.0, 1e-5, seed=0),
        metadata((8,), 4, n=64, batch_size=8, sampling="shuffle"),
        1.0,
    )
    model.compile(keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy())
    return model


def _fit_one_epoch(model):
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    model.fit(x, one_hot(np.arange(64), 4), batch_size=8, epochs=1, verbose=0)


def _trained_dpsgd_network():
    """A (8,) -> (4,) dense network and the DPSGDModel that trained it 8 steps."""
    net = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    first = _dpsgd_on(net)
    _fit_one_epoch(first)
    return net, first


def test_a_network_trained_by_one_dpsgd_model_cannot_be_wrapped_by_another():
    """A second DPSGDModel around a network the first trained 40 steps
    reported epsilon 3.79 after 8 more steps, where 7.11 ran on its weights."""
    net, first = _trained_dpsgd_network()
    for wrapped in (net, net.layers[-1], first):
        network = (
            wrapped
            if isinstance(wrapped, keras.Model)
            else keras.Sequential([keras.Input((8,)), wrapped])
        )
        with pytest.raises(ValueError, match="belongs to another DP model"):
            DPSGDModel(network, DPParameters(1.0, 1e-5), metadata((8,), 4), 1.0)


class _HoldsVariablesOf(keras.layers.Layer):
    """A dense layer holding another layer's kernel and bias."""

    def __init__(self, source, **kwargs):
        super().__init__(**kwargs)
        self.k, self.b = source.kernel, source.bias

    def call(self, x):
        return keras.ops.matmul(x, self.k) + self.b


def test_a_layer_holding_trained_variables_is_claimed_with_them():
    """A new layer holding a trained DPSGDModel's kernel and bias passed the
    claim (a layer object check): 3.79 reported after 8 more steps, 5.41 ran
    on those variables."""
    net, _first = _trained_dpsgd_network()
    tied = keras.Sequential([keras.Input((8,)), _HoldsVariablesOf(net.layers[-1])])
    with pytest.raises(ValueError, match="Variable .*kernel.* another DP model"):
        DPSGDModel(tied, DPParameters(1.0, 1e-5), metadata((8,), 4), 1.0)


def test_a_second_wrapper_of_a_trained_variable_is_claimed_with_it():
    """keras.Variable(kernel.value) wraps the same tf.Variable without the
    claim: a second DPSGDModel stepped the first one's kernel and reported
    3.79 where 7.11 ran on it. The claim is on the storage too."""
    net, _first = _trained_dpsgd_network()
    dense = net.layers[-1]
    alias = keras.Variable(dense.kernel.value)
    assert alias.value is dense.kernel.value
    holder = _HoldsVariablesOf(dense)
    holder.k = alias
    tied = keras.Sequential([keras.Input((8,)), holder])
    with pytest.raises(ValueError, match="another DP model"):
        DPSGDModel(tied, DPParameters(1.0, 1e-5), metadata((8,), 4), 1.0)


def test_a_frozen_encoder_serves_another_model_once_the_first_is_gone():
    """A frozen (public) encoder that a DP head was trained on is not trained
    by it: after that model is gone it serves the next one (a sweep of DP
    heads over one public backbone)."""
    import gc

    encoder = keras.layers.Dense(8)
    encoder.build((None, 8))
    encoder.trainable = False

    def head_model():
        return _dpsgd_on(
            keras.Sequential([keras.Input((8,)), encoder, keras.layers.Dense(4)])
        )

    first = head_model()
    _fit_one_epoch(first)
    with pytest.raises(ValueError, match="another DP model"):
        head_model()  # while the first is alive, it could still train it
    del first
    gc.collect()
    _fit_one_epoch(head_model())


def _cnn_trained_one_epoch(layers):
    """A DPSequential of `layers` (`small_cnn`) trained one epoch (2 steps)
    on 100 unit samples."""
    model = dp_model(layers, n=100, sampling="shuffle")
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    return model


def test_a_frozen_layer_that_loaded_trained_weights_stays_claimed(tmp_path):
    """A layer frozen when its model was built, then given trained weights by
    that model's load_weights, passed as untrained once the model was gone:
    a new model on it reported 4.87 where 9.10 ran on its kernel."""
    import gc

    trained = _cnn_trained_one_epoch(small_cnn())
    trained.save_weights(tmp_path / "m.weights.h5")
    layers = small_cnn()
    layers[1].trainable = False
    loaded = dp_model(layers, n=100, sampling="shuffle")
    loaded.load_weights(tmp_path / "m.weights.h5")
    del loaded
    gc.collect()
    layers[1].trainable = True
    with pytest.raises(ValueError, match="now gone"):
        dp_model(layers, n=100, sampling="shuffle")


def test_layers_trained_by_a_model_that_is_gone_stay_claimed():
    """The claim was a weak reference: once the trained model was collected,
    a DPSequential rebuilt from its layers started a fresh ledger (3.79 for
    7.11). Layers of a model that never stepped can still be reused."""
    import gc

    def build(layers):
        return dp_model(layers, n=100, sampling="shuffle")

    trained_layers, idle_layers = small_cnn(), small_cnn()
    trained = _cnn_trained_one_epoch(trained_layers)
    build(idle_layers)  # never stepped
    del trained
    gc.collect()
    with pytest.raises(ValueError, match="another DP model, now gone,"):
        build(trained_layers)
    build(idle_layers)


def test_a_claim_counts_restored_steps_of_a_model_that_is_gone(tmp_path):
    """A model that never stepped in this process but loaded a trained state
    holds those steps too: its layers stay claimed once it is gone."""
    import gc

    trained = _cnn_trained_one_epoch(small_cnn())
    trained.save_weights(tmp_path / "m.weights.h5")
    layers = small_cnn()
    loaded = dp_model(layers, n=100, sampling="shuffle")
    loaded.build((None, 8, 8, 1))
    loaded.load_weights(tmp_path / "m.weights.h5")
    del loaded
    gc.collect()
    with pytest.raises(ValueError, match="now gone"):
        dp_model(layers, n=100, sampling="shuffle")


class _LazyBlock(keras.layers.Layer):
    """Creates a BatchNormalization only when built."""

    def build(self, input_shape):
        self.norm = keras.layers.BatchNormalization(momentum=0.0)

    def call(self, x, training=None):
        return self.norm(x, training=training)


def test_dpsgd_checks_a_lazily_built_network_before_any_step():
    """An unbuilt network hid a BatchNormalization until its first call: one
    record's value was then saved in moving_mean. It is built (for the
    metadata's input shape) and checked at construction."""
    net = keras.Sequential([_LazyBlock(), keras.layers.Dense(2)])  # no Input
    with pytest.raises(ValueError, match="mixes the examples"):
        DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((4,), 2), 1.0)


def test_dpsgd_accepts_dropout_whose_only_state_is_its_random_generator():
    net = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((4,), 2), 1.0)


_WRITES = ("Assign", "ResourceApply", "ResourceScatter", "ResourceStrided")
# ops that forward a resource handle unchanged (lowered loops and conditions)
_FORWARDS = {"Identity", "IdentityN", "Enter", "Switch", "Merge", "Exit"}
_CALLS = {"While", "StatelessWhile", "If", "PartitionedCall", "StatefulPartitionedCall"}


def _unordered_accesses(model, input_shape, num_classes) -> list[tuple]:
    """Pairs (variable, write, other access) of one train step that nothing
    orders, in the graph as Grappler (the optimizer that rewrites every
    tf.function) leaves it: the runtime may run them in either order."""
    step = tf.function(lambda x, y, w: model.train_step((x, y, w)))
    graph = step.get_concrete_function(
        tf.TensorSpec((None, *input_shape)),
        tf.TensorSpec((None, num_classes)),
        tf.TensorSpec((None,)),
    ).graph
    handles = {i.op.name for _, i in graph.captures if i.dtype == tf.resource}
    fetches = {op.name for op in graph.get_operations() if op.type.startswith(_WRITES)}
    fetches |= {t.op.name for t in graph.outputs}
    fetches |= {op.name for op in graph.control_outputs}
    meta = meta_graph.create_meta_graph_def(graph=graph)
    meta.collection_def["train_op"].node_list.value.extend(sorted(fetches))
    nodes = {
        n.name: n
        for n in tf_optimizer.OptimizeGraph(config_pb2.ConfigProto(), meta).node
    }

    def source(name: str) -> str:
        name = name.lstrip("^").split(":")[0]
        while name in nodes and nodes[name].op in _FORWARDS:
            data = [i for i in nodes[name].input if not i.startswith("^")]
            if not data:
                break
            name = data[0].split(":")[0]
        return name

    accesses = {}
    for node in nodes.values():
        if node.op == "ReadVariableOp" or node.op.startswith(_WRITES):
            used = [source(node.input[0])]
        elif node.op in _CALLS:
            used = [source(i) for i in node.input if not i.startswith("^")]
        else:
            continue
        for handle in set(used) & handles:
            accesses.setdefault(handle, []).append(
                (node.name, node.op.startswith(_WRITES))
            )
    memo: dict[str, set] = {}

    def ancestors(name: str) -> set:
        if name not in memo:
            seen, stack = set(), [name]
            while stack:
                for parent in nodes[stack.pop()].input:
                    parent = parent.lstrip("^").split(":")[0]
                    if parent not in seen and parent in nodes:
                        seen.add(parent)
                        stack.append(parent)
            memo[name] = seen
        return memo[name]

    unordered = []
    for handle, ops in accesses.items():
        for i, (a, a_writes) in enumerate(ops):
            for b, b_writes in ops[i + 1 :]:
                if (a_writes or b_writes) and not (
                    a in ancestors(b) or b in ancestors(a)
                ):
                    unordered.append((handle, a, b))
    return unordered


@pytest.mark.parametrize(
    "make, strategy",
    [
        ("sequential", "global"),
        ("sequential", "per-layer"),
        ("functional", "per-layer"),
        ("dpsgd", "global"),
    ],
)
def test_every_write_of_a_train_step_is_ordered_with_every_access(make, strategy):
    """A layer's bound reads the kernels of the layers after it; the optimizer
    writes a kernel as soon as its own update is ready. Keras couples the
    updates (an IdentityN) and tf.function orders reads before writes, but
    Grappler removes both: under CPU contention about 1 step in 100 read a
    certificate AFTER that layer's update (its noise then followed other
    weights' bound, which can be smaller). In the optimized graph, every write
    of every variable (kernels, projection state, optimizer slots, the
    privacy plan's counters and ledger) must be ordered with every other
    access to that variable."""
    from . import test_privacy_plan as plans

    model = {
        "sequential": plans._sequential,
        "functional": plans._functional,
        "dpsgd": plans._dpsgd,
    }[make](strategy)
    assert _unordered_accesses(model, (8, 8, 1), 64) == []


# --- Batches that are structures of tensors (dict / list inputs) --------------


@pytest.mark.parametrize("part", ["x", "y", "sample_weight"])
def test_a_nested_batch_part_is_refused_by_name(part):
    from deel_lipdp_ext.model import sanitize_batch

    batch = {
        "x": np.zeros((4, 3), "float32"),
        "y": np.zeros((4, 2), "float32"),
        "sample_weight": np.ones(4, "float32"),
    }
    batch[part] = {"a": batch[part], "b": batch[part]}
    with pytest.raises(ValueError, match=f"{part} is a dict of tensors"):
        sanitize_batch(batch["x"], batch["y"], batch["sample_weight"])


def test_dict_inputs_are_refused_by_fit_and_by_the_train_step():
    model = dp_model(small_cnn(), n=8, batch_size=4, sampling="shuffle")
    x = {"image": unit_samples(8, (8, 8, 1))}
    with pytest.raises(ValueError, match="Received: dict"):
        model.fit(x, one_hot(range(8)), batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="x is a dict of tensors"):
        model.train_on_batch({"image": x["image"][:4]}, one_hot(range(4)))


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_dpsgd_refuses_a_network_with_several_inputs_or_outputs(kind):
    from deel_lipdp_ext.dpsgd import DPSGDModel

    a, b = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    if kind == "inputs":
        merged = keras.layers.Concatenate()([a, b])
        net = keras.Model({"a": a, "b": b}, keras.layers.Dense(2)(merged))
    else:
        net = keras.Model(a, [keras.layers.Dense(2)(a), keras.layers.Dense(1)(a)])
    with pytest.raises(ValueError, match=f"The network has 2 {kind}"):
        DPSGDModel(net, DPParameters(1.0, 1e-5, seed=1), metadata(), l2_norm_clip=1.0)


def test_tensor_float_32_is_turned_off_where_it_could_round_the_step(monkeypatch):
    """A review (ghost clipping, emulated): TensorFlow runs float32 matmuls in
    TF32 by default on Ampere+ GPUs; its 10-bit rounding is not covered by
    the bounds (1.0005 C). A DP model turns it off before its train step."""
    import deel_lipdp_ext._keras_utils as keras_utils

    monkeypatch.setattr(keras_utils, "tensor_float_32_possible", lambda: True)
    model = dp_model(small_cnn(), n=8, batch_size=4, sampling="shuffle")
    try:
        with pytest.warns(UserWarning, match="TensorFloat-32 execution turned off"):
            model.train_on_batch(unit_samples(4, (8, 8, 1)), one_hot(range(4)))
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)


def test_a_group_sort_tie_keeps_the_first_layers_gradient_within_its_bound():
    """Two units with equal weights tie for every input, as equal biases do
    on a zero background. GroupSort(2) of minimum/maximum sent both output
    gradients of the tied pair to one entry: the first kernel's gradient
    was 2.0 against a bound of 1.414."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralDense(4),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(2),
        ],
        input_shape=(3,),
        num_classes=2,
    )
    first, last = model.dp_layers[1], model.dp_layers[3]
    kernel = np.zeros((3, 4), np.float32)
    kernel[0, :2] = 0.6  # units 0 and 1 tie
    kernel[1, 2] = kernel[2, 3] = 0.5
    first.kernel.assign(kernel)
    last.kernel.assign(np.array([[0.5, -0.5], [0.5, -0.5], [0, 0], [0, 0]], "f"))
    x, y = np.array([[1.0, 0.0, 0.0]], "f"), np.array([[0.0, 1.0]], "f")
    report = gradient_norm_check(model, (x, y))  # raises above 1 + 1e-4
    assert report.max_ratio > 0.99  # the tie's gradient does reach the bound


# ============================= fourth review (stop 30): a fresh adversary
#: Squares of float32 values below ~1.0842e-19 are subnormal, which
#: TensorFlow's CPU kernels flush to zero.
_FLUSHED, _KEPT = 1.0841e-19, 1.0843e-19


def test_a_pooling_of_flushed_squares_keeps_the_bias_gradient_in_bound():
    """One entry per image whose square is normal and the others' flushed:
    the global norm counted that one entry, x / ||x|| had norm up to 28, and
    a bias before the pooling got 11x its bound."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_AddBias(norm_max=1.0),
            L.DP_ScaledGlobalL2NormPooling2D(),
            L.DP_QuickSpectralDense(10),
        ],
        input_shape=(28, 28, 1),
    )
    x = np.full((10, 28, 28, 1), _FLUSHED, np.float32)
    x[:, 0, 0] = _KEPT
    report = gradient_norm_check(model, (x, np.eye(10, dtype="f")))  # raises
    assert report.max_ratio <= 1 + 1e-4  # was 11


@pytest.mark.parametrize(
    "layer",
    [
        L.DP_ScaledGlobalL2NormPooling2D(),
        L.DP_ScaledL2NormPooling2D(4, padding="same"),
        L.DP_ScaledL2NormPooling1D(5),
    ],
    ids=lambda layer: type(layer).__name__,
)
@pytest.mark.parametrize("scale", [1e-30, 1e-20, _FLUSHED, 1e-15, 1.0, 1e18])
def test_l2_poolings_are_gnp_at_every_scale(layer, scale):
    """Each window's gradient has norm <= 1 (what GNP means) and its value
    is at most its norm, at scales where squares flush or nearly overflow
    (the old norms had window gradients of norm 4 at 1.08e-19); from 1e-15
    on, the value is the norm."""
    rng = np.random.default_rng(0)
    one_d = isinstance(layer, L.DP_ScaledL2NormPooling1D)
    shape = (2, 28, 3) if one_d else (2, 9, 9, 3)
    x = (scale * rng.uniform(1, 1.0003, size=shape)).astype(np.float32)
    x[..., 0, :] *= np.float32(_KEPT / _FLUSHED)
    x = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = layer(x)
        windows = tf.unstack(tf.reshape(y, [-1]))
    exact = _windows_norm_float64(layer, x.numpy().astype(np.float64)).ravel()
    assert np.all(y.numpy().ravel() <= exact * (1 + 1e-6))
    if scale >= 1e-15:
        np.testing.assert_allclose(y.numpy().ravel(), exact, rtol=1e-5)
    for window in windows[:: max(1, len(windows) // 8)]:
        gradient = tape.gradient(window, x).numpy().astype(np.float64)
        assert np.linalg.norm(gradient) <= 1 + 1e-5


def _windows_norm_float64(layer, x):
    """Reference window norms in float64 (zero padding for "same")."""
    if isinstance(layer, L.DP_ScaledGlobalL2NormPooling2D):
        return np.sqrt(np.sum(x**2, axis=(1, 2)))
    sizes = layer.pool_size
    if layer.padding == "same":
        pads = [(0, -n % p) for n, p in zip(x.shape[1:-1], sizes, strict=True)]
        x = np.pad(x, [(0, 0), *pads, (0, 0)])
    counts = [n // p for n, p in zip(x.shape[1:-1], sizes, strict=True)]
    x = x[(slice(None), *(slice(0, c * p) for c, p in zip(counts, sizes, strict=True)))]
    windows = [d for c, p in zip(counts, sizes, strict=True) for d in (c, p)]
    axes = tuple(2 * i for i in range(1, len(sizes) + 1))
    return np.sqrt(np.sum(x.reshape(x.shape[0], *windows, x.shape[-1]) ** 2, axis=axes))


@settings(max_examples=60, deadline=None)
@given(
    exponent=st.integers(-37, 37), seed=st.integers(0, 2**16), size=st.integers(1, 300)
)
def test_sample_norms_match_float64_at_every_scale(exponent, seed, size):
    """The norm DP_ClipGradient clips by and the poolings divide by: no
    square flushed to zero or overflowing, whatever the scale."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-1, 1, (3, size)) * 10.0**exponent).astype(np.float32)
    exact = np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(sample_norms(tf.constant(x)).numpy(), exact, rtol=1e-5)


def test_a_label_of_flushed_squares_keeps_the_cosine_loss_in_bound():
    """DP_KCosineSimilarity normalised a label of entries near 1e-19 by a norm
    that counted one entry: the logit gradient was sqrt(C) times L (10x at
    100 classes), on every step of any model with this loss."""
    loss = losses.DP_KCosineSimilarity(K=1.0)
    y = np.full((2, 100), _FLUSHED, np.float32)
    y[:, 0] = _KEPT
    z = tf.constant(np.random.default_rng(1).normal(size=(2, 100)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(z)
        total = tf.reduce_sum(loss.call(tf.constant(y), z))
    assert np.all(tf.norm(tape.gradient(total, z), axis=1) <= loss.get_L(100) * 1.0001)


def test_trusted_inputs_at_the_checks_slack_stay_within_the_bound():
    """enforce_clipping=False admits norms up to upper_bound (1 + 1e-6), but
    the bound pass started from upper_bound: a released gradient 1.000001x
    the sensitivity."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0, enforce_clipping=False),
            L.DP_QuickSpectralDense(4),
        ],
        input_shape=(8,),
        num_classes=4,
        loss=losses.DP_MulticlassKR(),
    )
    first = model.dp_layers[0]
    x = unit_samples(4, (8,)) * np.float32(1 + 9.5e-7)
    assert bool(first.inputs_within_bound(x))  # admitted
    assert float(first.propagate_inputs(None)) >= float(
        np.max(np.linalg.norm(x.astype(np.float64), axis=1))
    )
    report = gradient_norm_check(model, (x, one_hot(range(4), 4)))
    assert report.max_ratio > 0.99


def test_exported_state_after_a_rollback_carries_everything_that_ran(tmp_path):
    """After set_weights rolled the ledger back (restore_best_weights does),
    tf.train.Checkpoint, CheckpointManager and get_weights carried the
    rolled-back rows: a fresh model restored from them reported 2 of 12
    steps. dp_steps fell back too."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    early = model.get_weights()
    model.fit(x, y, batch_size=50, epochs=5, verbose=0)
    ran = _epsilon((0.5, 1.0, 12))
    model.set_weights(early)
    assert int(model.dp_steps.numpy()) == 12
    written = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    managed = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), str(tmp_path / "managed"), 1
    ).save()
    weights = model.get_weights()
    for restore in (
        lambda m: tf.train.Checkpoint(model=m).restore(written).expect_partial(),
        lambda m: tf.train.Checkpoint(model=m).restore(managed).expect_partial(),
        lambda m: m.set_weights(weights),
    ):
        fresh = dp_model(small_cnn(), n=100, sampling="shuffle")
        fresh.build((None, 8, 8, 1))
        restore(fresh)
        assert fresh.privacy_plan.epsilon() == pytest.approx(ran, rel=1e-9)
        assert fresh.privacy_plan.steps_taken() == 12
    # a checkpoint of earlier state restored in place: the count holds
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    tf.train.Checkpoint(model=model).restore(written)
    assert model.privacy_plan.steps_taken() == 14


def test_a_loaded_model_does_not_inherit_the_sampling_of_the_run_that_saved_it(
    tmp_path,
):
    """The sampling label was a saved variable: a file written during a
    Poisson fit made later custom-loop steps of the loaded model count as
    secret Poisson batches (epsilon 5.4 reported for 40 where 30 ran on the
    same 20 rows)."""
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    model = dp_model(small_cnn(), n=200, batch_size=20)
    saver = keras.callbacks.ModelCheckpoint(str(tmp_path / "mid.keras"))
    model.fit(poisson_batches(x, y, 20), epochs=1, verbose=0, callbacks=[saver])
    assert model.privacy_plan.is_exact()
    loaded = keras.models.load_model(tmp_path / "mid.keras")
    step = loaded.make_train_function()
    step(iter([(tf.constant(x[:20]), tf.constant(y[:20]))]))
    assert not loaded.privacy_plan.is_exact()
    assert "unverified" in loaded.privacy_plan.samplings()[-1]


def test_a_checkpoint_that_keeps_the_best_epoch_is_refused(tmp_path):
    """ModelCheckpoint(save_best_only=True) kept the file of epoch 1, chosen
    by epochs 2-6, and the file reported the epsilon of 10 steps where 60
    ran."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    best = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "b.keras"), save_best_only=True
    )
    with pytest.raises(ValueError, match="save_best_only"):
        model.fit(x, y, batch_size=50, epochs=2, verbose=0, callbacks=[best])
    every = keras.callbacks.ModelCheckpoint(str(tmp_path / "e.keras"))
    model.fit(x, y, batch_size=50, epochs=1, verbose=0, callbacks=[every])


def test_the_training_data_is_refused_as_validation_data():
    """Its validation loss is computed from the private samples without
    noise: it went round the withholding of training metrics."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, batch_size=20)
    train = poisson_batches(x, y, 20)
    with pytest.raises(ValueError, match="validation_data is the training data"):
        model.fit(train, validation_data=train, verbose=0)
    shuffled = dp_model(small_cnn(), n=100, sampling="shuffle")
    with pytest.raises(ValueError, match="validation_data is the training data"):
        shuffled.fit(x, y, batch_size=50, validation_data=(x, y), verbose=0)
    assert int(model.dp_steps.numpy()) == int(shuffled.dp_steps.numpy()) == 0


def test_a_second_fit_without_initial_epoch_keeps_the_budget():
    """The budget planned from the model's completed epochs, the clip updates
    ran on fit's epoch index, which a second fit restarts at 0: an update
    the budget did not plan, epsilon 2.66 for a budget of 1.73."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 4)
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralDense(4),
            L.DP_ClipGradient(1.0, mode="dynamic"),
        ],
        input_shape=(8,),
        num_classes=4,
        sigma=3.0,
        n=200,
        batch_size=20,
    )
    updates = LaplaceAdaptiveLossGradientClipping(
        poisson_batches(x, y, 20), patience=2, epsilon=1.0
    )
    model.fit(poisson_batches(x, y, 20), epochs=1, verbose=0, callbacks=[updates])
    plan = model.privacy_plan
    budget = plan.epsilon(planned=plan.planned_ledger(1, first_epoch=1)) * 1.02
    accountant = DP_Accountant(epsilon_budget=budget)
    model.fit(
        poisson_batches(x, y, 20), epochs=3, verbose=0, callbacks=[updates, accountant]
    )
    assert plan.epsilon() <= budget
    assert updates.updates == 1  # epoch 1 of the model: no update due


def test_the_noise_multiplier_can_change_from_a_callback():
    """set_noise_multiplier in on_epoch_end stopped fit with a TypeError (the
    train function was set to None while fit ran)."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, batch_size=20, sigma=2.0)

    class Lower(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.set_noise_multiplier(0.5)

    model.fit(poisson_batches(x, y, 20), epochs=3, verbose=0, callbacks=[Lower()])
    rows = sorted((r.parameter, r.count) for r in model.privacy_plan.ledger())
    assert rows == [(pytest.approx(0.5), 10), (pytest.approx(2.0), 5)]


class _NoiseFromEpoch1(keras.callbacks.Callback):
    """Sets the noise multiplier to `sigma` at the start of each epoch >= 1."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def on_epoch_begin(self, epoch, logs=None):
        if epoch >= 1:
            self.model.set_noise_multiplier(self.sigma)


def test_a_budget_holds_when_the_noise_changes_during_fit():
    """DP_Accountant(epsilon_budget=3) checked one more epoch at each epoch's
    end with the noise then configured: a callback lowering sigma from 4 to
    0.6 in on_epoch_begin ran 2 epochs to epsilon 11.7. The change is now
    checked before the next step, which does not run."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)

    def model(sigma):
        layers = [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(2)]
        return dp_model(layers, input_shape=(8,), num_classes=2, sigma=sigma, n=200)

    lowered = model(4.0)
    with pytest.raises(ValueError, match="would exceed epsilon_budget=3.0"):
        lowered.fit(
            poisson_batches(x, y, 50),
            epochs=10,
            verbose=0,
            callbacks=[DP_Accountant(epsilon_budget=3.0), _NoiseFromEpoch1(0.6)],
        )
    assert lowered.privacy_plan.steps_taken() == 4  # the first epoch only
    assert lowered.privacy_plan.epsilon() <= 3.0
    raised = model(4.0)  # more noise: within budget, training goes on
    accountant = DP_Accountant(epsilon_budget=3.0)
    raised.fit(
        poisson_batches(x, y, 50),
        epochs=3,
        verbose=0,
        callbacks=[accountant, _NoiseFromEpoch1(8.0)],
    )
    assert len(accountant.history) == 3
    assert raised.privacy_plan.epsilon() <= 3.0


class _NoiseAtBatch(keras.callbacks.Callback):
    """Sets the noise multiplier to `sigma` in on_train_batch_begin of
    batch `batch` of the first epoch."""

    def __init__(self, sigma, batch):
        super().__init__()
        self.sigma, self.batch = sigma, batch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.batch:
            self.model.set_noise_multiplier(self.sigma)


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_a_budget_holds_when_a_later_callback_changes_the_noise(steps_per_execution):
    """A callback after the DP_Accountant lowering sigma to 0.05 in the same
    on_train_batch_begin reached the step unchecked (epsilon 287 for a budget
    of 3; 931 with steps_per_execution=4, one execution for the epoch). The
    check runs in the train function, after every callback."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = dp_model(
        [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(2)],
        input_shape=(8,),
        num_classes=2,
        sigma=4.0,
        n=200,
        steps_per_execution=steps_per_execution,
    )
    with pytest.raises(ValueError, match="would exceed epsilon_budget=3.0"):
        model.fit(
            poisson_batches(x, y, 50),
            epochs=3,
            verbose=0,
            callbacks=[DP_Accountant(epsilon_budget=3.0), _NoiseAtBatch(0.05, 0)],
        )
    assert model.privacy_plan.steps_taken() == 0
    assert model.privacy_plan.step_checks == []  # fit ended: none left behind


def _budget_model(sigma=4.0, clip_layer=False):
    """(8,) -> (2,) DPSequential over 200 samples in Poisson batches of 50."""
    layers = [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(2)]
    if clip_layer:
        layers.append(L.DP_ClipGradient(2.0, mode="dynamic"))
    return dp_model(layers, input_shape=(8,), num_classes=2, sigma=sigma, n=200)


def _two_epoch_budget(model) -> float:
    """A budget just above two epochs of `model`'s plan."""
    plan = model.privacy_plan
    return plan.epsilon(planned=plan.planned_ledger(2)) * 1.01


class _SetAt(keras.callbacks.Callback):
    """Sets `target.attribute = value` at the start of epoch `epoch`."""

    def __init__(self, target, attribute, value, epoch):
        super().__init__()
        self.target, self.attribute, self.value, self.epoch = (
            target,
            attribute,
            value,
            epoch,
        )

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            setattr(self.target, self.attribute, self.value)


def test_a_budget_holds_for_a_release_whose_parameter_changed():
    """A clipping release made in on_epoch_begin with a parameter a callback
    changed (noise multiplier 10 -> 0.02) was recorded before any check:
    epsilon 1472 for a budget of 3. Each release is checked before it is
    recorded."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(clip_layer=True)
    clipping = AdaptiveQuantileClipping(
        poisson_batches(x, y, 50), patience=1, noise_multiplier=10.0
    )
    with pytest.raises(ValueError, match="release 'adaptive_quantile_clipping'"):
        model.fit(
            poisson_batches(x, y, 50),
            epochs=3,
            verbose=0,
            callbacks=[
                DP_Accountant(epsilon_budget=3.0),
                _SetAt(clipping, "noise_multiplier", 0.02, 1),
                clipping,
            ],
        )
    assert model.privacy_plan.epsilon() <= 3.0
    assert model.privacy_plan.steps_taken() == 4  # epoch 0 only


def test_a_budget_holds_when_a_callback_adds_steps():
    """150 train_on_batch steps from a callback, at the configuration
    checked, ran unchecked until the epoch's end: epsilon 8.96 for a budget
    of 3. Steps beyond the checked epoch are checked again."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)

    class ExtraSteps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                for _ in range(150):
                    self.model.train_on_batch(x[:50], y[:50])

    with pytest.raises(ValueError, match="would exceed epsilon_budget=3.0"):
        model.fit(
            poisson_batches(x, y, 50),
            epochs=5,
            verbose=0,
            callbacks=[DP_Accountant(epsilon_budget=3.0), ExtraSteps()],
        )
    assert model.privacy_plan.epsilon() <= 3.0


def test_a_budget_counts_every_step_of_a_long_execution():
    """steps_per_execution=40 over 4-step epochs: the check priced one epoch
    and the execution ran 40 steps (epsilon 4.36 for a budget of 3)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    model.compile(
        keras.optimizers.SGD(0.1),
        losses.DP_TauCategoricalCrossentropy(8.0),
        steps_per_execution=40,
    )
    batches = declare_sampling(
        poisson_batches(x, y, 50).repeat(), model.privacy_plan.dataset_metadata
    )
    with pytest.raises(ValueError, match="exceeds epsilon_budget=3.0"):
        model.fit(
            batches,
            epochs=1,
            steps_per_epoch=40,
            verbose=0,
            callbacks=[DP_Accountant(epsilon_budget=3.0)],
        )
    assert model.privacy_plan.steps_taken() == 0


def test_train_step_cannot_run_around_the_budget_check():
    """60 direct train_step calls from a callback ran unchecked (epsilon 5.41
    for a budget of 3): the budget check runs in the train function. Without
    a budget they ran with the fit's checked label (poisson, exact) on a
    batch of their own (a review): refused too."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)

    class Direct(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.train_step((x[:50], y[:50]))

    for budget in ([DP_Accountant(epsilon_budget=3.0)], []):
        with pytest.raises(RuntimeError, match="train_step was called directly"):
            model.fit(
                poisson_batches(x, y, 50), verbose=0, callbacks=[*budget, Direct()]
            )
        assert model.privacy_plan.epsilon() <= 3.0


def test_steps_outside_fits_own_calls_are_unverified():
    """Steps of fit's data only carry its label: a step traced before fit and
    run from a callback, and a train function a callback called with an
    iterator of its own (20 steps on one fixed batch), were recorded as exact
    Poisson (reviews); a callback's train_on_batch made fit's later steps
    'unverified'. Counted either way; the budget covers fit's own steps."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    step = tf.function(model.train_step)
    step.get_concrete_function((tf.constant(x[:50]), tf.constant(y[:50])))
    fixed = tf.data.Dataset.from_tensors((x[:50], y[:50])).repeat()

    class OwnSteps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 0:
                step((tf.constant(x[:50]), tf.constant(y[:50])))
                self.model.train_function(iter(fixed))
                self.model.train_on_batch(x[:50], y[:50])

    model.fit(poisson_batches(x, y, 50), epochs=2, verbose=0, callbacks=[OwnSteps()])
    counts = {r.sampling: r.count for r in model.privacy_plan.ledger()}
    assert counts == {
        "poisson": 8,  # fit's own, before and after the callbacks' steps
        "unverified (train_on_batch or a custom loop)": 6,
    }
    assert not model.privacy_plan.is_exact()
    model.fit(poisson_batches(x, y, 50), verbose=0)  # and a plain fit again
    counts = {r.sampling: r.count for r in model.privacy_plan.ledger()}
    assert counts["poisson"] == 12

    class Late(keras.callbacks.Callback):  # runs after fit's marker
        def on_train_batch_begin(self, batch, logs=None):
            model.set_noise_multiplier(3.0)  # its steps: a row of their own
            model.train_on_batch(x[:50], y[:50])
            model.set_noise_multiplier(2.0)

    class AppendLate(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            given.callbacks.append(Late())

    given = keras.callbacks.CallbackList([AppendLate()], model=model)
    model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=given)
    assert [type(c) for c in given.callbacks[:1]] == [AppendLate]
    assert not any(type(c).__name__ == "_FitStepMarker" for c in given.callbacks)
    counts = {(r.sampling, r.parameter): r.count for r in model.privacy_plan.ledger()}
    assert counts == {  # its train_on_batch took neither fit's mark nor label
        ("poisson", 2.0): 16,
        ("unverified (train_on_batch or a custom loop)", 2.0): 6,
        ("unverified (train_on_batch or a custom loop)", 3.0): 4,
    }


def test_fit_keeps_the_step_checks_registered_outside_it():
    """A fit refused half-way (or one without an accountant) cleared every
    budget check, also one a custom loop had registered: 208 steps ran,
    epsilon 10.6 for a budget of 3 (a review)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    accountant = DP_Accountant(epsilon_budget=3.0)
    keras.callbacks.CallbackList([accountant], model=model).on_train_begin()
    checks = list(model.privacy_plan.step_checks)
    assert checks
    with pytest.raises(ValueError, match="batch_size=32"):
        model.fit(x, y, batch_size=32, verbose=0)
    model.fit(poisson_batches(x, y, 50), verbose=0)
    assert model.privacy_plan.step_checks == checks
    with pytest.raises(ValueError, match="would exceed epsilon_budget=3.0"):
        for _ in range(200):
            model.train_on_batch(x[:50], y[:50])
    assert model.privacy_plan.epsilon() <= 3.0


def test_fit_cannot_run_inside_its_own_fit():
    """A fit from a callback cleared the outer fit's budget check (and reset
    its sampling and epoch offset): epsilon 33.1 for a budget of 3."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model()

    class Nested(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.fit(poisson_batches(x, y, 50), epochs=0, verbose=0)

    with pytest.raises(RuntimeError, match="while this model's fit runs"):
        model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[Nested()])
    model.fit(poisson_batches(x, y, 50), verbose=0)  # afterwards, it trains
    assert model.privacy_plan.steps_taken() == 4


def test_weak_settings_warn():
    """delta >= 1/N, and a fixed seed for the clip updates' noise, were
    accepted in silence."""
    with pytest.warns(UserWarning, match="delta=0.01 is >= 1/N"):
        DPSequential(
            [keras.Input((8,)), L.DP_BoundedInput(1.0), L.DP_QuickSpectralDense(4)],
            dp_parameters=DPParameters(1.0, 0.01),
            dataset_metadata=metadata((8,), 4, n=100),
        )
    x, y = unit_samples(40, (8,)), one_hot(np.arange(40), 4)
    with pytest.warns(ReproducibleNoiseWarning, match="seed=3"):
        LaplaceAdaptiveLossGradientClipping(
            poisson_batches(x, y, 10), patience=1, epsilon=1.0, seed=3
        )


def test_regularizers_are_refused_not_ignored():
    """An activity regularizer on a DP layer (a loss computed from the data)
    and weight regularizers were silently left out of the step."""
    with pytest.raises(ValueError, match="regularizers"):
        dp_model(
            [
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_QuickSpectralDense(4, activity_regularizer="l2"),
            ],
            input_shape=(8,),
            num_classes=4,
        )
    net = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(4, kernel_regularizer="l2")]
    )
    with pytest.raises(ValueError, match="regularizers"):
        DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((8,), 4), 1.0)


@pytest.mark.parametrize(
    "middle",
    [L.DP_GroupSort(2), L.DP_AddBias(1.0), L.DP_ReLU(), L.DP_ClipGradient(1.0)],
    ids=lambda layer: type(layer).__name__,
)
def test_a_layer_on_a_residual_pair_is_refused_by_name(middle):
    """A DP layer between DP_SplitResidual and DP_MergeResidual without
    DP_WrappedResidual was refused only by crashes that did not say why."""
    with pytest.raises(ValueError, match="wrap it in DP_WrappedResidual"):
        DPSequential(
            [
                keras.Input((8, 8, 2)),
                L.DP_BoundedInput(upper_bound=1.0),
                L.DP_SplitResidual(),
                middle,
                L.DP_MergeResidual("add"),
                L.DP_Flatten(),
                L.DP_QuickSpectralDense(4),
            ],
            dp_parameters=DPParameters(1.0, 1e-5),
            dataset_metadata=metadata((8, 8, 2), 4),
        )


# ============================= review of the stop-30 fixes (a fourth adversary)
#: Squares just below half an ulp of 1: a float32 sum of them after a 1 drops
#: every one (the sum rounds low by (n - 1) 2^-24).
_ROUNDED_AWAY = np.float32(2.0**-12 * (1 - 2e-3))


@pytest.mark.parametrize(
    "layer",
    [L.DP_ScaledGlobalL2NormPooling2D(), L.DP_ScaledL2NormPooling2D(32)],
    ids=lambda layer: type(layer).__name__,
)
def test_a_large_pooling_window_does_not_round_its_norm_low(layer):
    """A 32x32 window of one 1 and 1023 entries whose squares round away:
    the float32 sum was 1 where the norm is 1.00003, and x / sqrt(sum) had
    norm 1.00003 (1.03 at 1024x1024). Large windows sum in float64."""
    x = np.full((1, 32, 32, 1), _ROUNDED_AWAY, np.float32)
    x[0, 0, 0, 0] = 1.0  # first: the sum then rounds every later square away
    x = tf.constant(x)
    for run in (layer, tf.function(layer, jit_compile=True)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(run(x))
        assert float(tf.norm(tf.cast(tape.gradient(y, x), tf.float64))) <= 1 + 1e-7


@pytest.mark.parametrize("window", [2, 8])
def test_a_float32_pooling_window_rounds_within_the_noise_margin(window):
    """Windows of at most 64 entries (`pooling._FLOAT32_SUM_AREA`) keep a
    float32 sum: one 1 then entries whose squares round away must leave the
    gradient within the noise's ROUNDING_MARGIN of norm 1."""
    x = np.full((1, window, window, 1), _ROUNDED_AWAY, np.float32)
    x[0, 0, 0, 0] = 1.0
    x = tf.constant(x)
    layer = L.DP_ScaledL2NormPooling2D(window)
    for run in (layer, tf.function(layer, jit_compile=True)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(run(x))
        norm = float(tf.norm(tf.cast(tape.gradient(y, x), tf.float64)))
        assert norm <= 1 + ROUNDING_MARGIN


def test_the_input_projection_does_not_round_its_norm_low():
    """DP_BoundedInput measured ||x|| with a float32 sum: a 1024x1024 sample
    of 64 ones and entries whose squares round away came out 1.00005x
    upper_bound under XLA."""
    x = np.full((1, 1024, 1024, 1), _ROUNDED_AWAY, np.float32)
    x.reshape(-1)[:64] = 1.0
    true = float(np.linalg.norm(x.astype(np.float64)))
    layer = L.DP_BoundedInput(upper_bound=true * (1 - 5e-5))
    for run in (layer, tf.function(layer, jit_compile=True)):
        out = run(tf.constant(x)).numpy().astype(np.float64)
        assert np.linalg.norm(out) <= layer.upper_bound


def test_input_bounds_whose_squares_could_overflow_are_refused():
    """upper_bound 1e20: an entry of 1.9e19 made an L2 pooling's sum of
    squares inf, and the update non-finite with the sample, finite without
    (its presence shown)."""
    with pytest.raises(ValueError, match="upper_bound"):
        L.DP_BoundedInput(upper_bound=1e20)


def test_a_loss_replaced_after_compile_does_not_keep_ghost_clipping():
    """clipping='ghost' compiled with a per-example loss, then model.loss =
    Circle: the step ran ghost clipping on a loss that compares examples
    (3.1 C)."""
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = DPSGDModel(
        net,
        DPParameters(1.0, 1e-5),
        metadata((4,), 3, n=100, batch_size=8, sampling="shuffle"),
        1.0,
        clipping="ghost",
    )
    model.compile(
        keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy()
    )
    model.loss = keras.losses.Circle()
    with pytest.raises(ValueError, match="Circle is not known"):
        model.train_on_batch(np.ones((8, 4), "f"), np.zeros(8, "i"))


def test_guards_of_fit_see_through_nesting_and_copies(tmp_path):
    """A ModelCheckpoint(save_best_only=True) inside a CallbackList, and a
    copy or a view of the training arrays as validation data, passed."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    best = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "b.keras"), save_best_only=True
    )
    with pytest.raises(ValueError, match="save_best_only"):
        model.fit(
            x,
            y,
            batch_size=50,
            verbose=0,
            callbacks=[keras.callbacks.CallbackList([best])],
        )
    for same in (x.copy(), x[:]):
        with pytest.raises(ValueError, match="validation_data is the training data"):
            model.fit(x, y, batch_size=50, validation_data=(same, y), verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_a_budget_is_checked_after_backup_and_restore_restored(tmp_path):
    """DP_Accountant before BackupAndRestore in the callback list checked the
    budget against the fresh model, then the restore brought back 3 epochs
    and a 4th ran: epsilon 10.3 for a budget of 9.1."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise _Crash

    first = dp_model(small_cnn(), n=100, sampling="shuffle")
    with pytest.raises(_Crash):
        first.fit(x, y, batch_size=50, epochs=5, verbose=0, callbacks=[backup, Crash()])
    budget = _epsilon((0.5, 1.0, 7))  # 3 epochs fit, a 4th does not
    second = dp_model(small_cnn(), n=100, sampling="shuffle")
    accountant = DP_Accountant(epsilon_budget=budget)
    with pytest.raises(ValueError, match="already exceeds"):
        second.fit(
            x, y, batch_size=50, epochs=5, verbose=0, callbacks=[accountant, backup]
        )
    assert second.privacy_plan.epsilon() <= budget


def test_a_state_tree_after_a_checkpoint_restore_carries_everything_that_ran(
    tmp_path,
):
    """tf.train.Checkpoint.restore of earlier state, then get_state_tree into a
    fresh model: 2 of 12 steps."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    model.fit(x, y, batch_size=50, epochs=1, verbose=0)
    early = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    model.fit(x, y, batch_size=50, epochs=5, verbose=0)
    tf.train.Checkpoint(model=model).restore(early)
    fresh = dp_model(small_cnn(), n=100, sampling="shuffle")
    fresh.build((None, 8, 8, 1))
    fresh.set_state_tree(model.get_state_tree())
    assert fresh.privacy_plan.steps_taken() == 12
    assert fresh.privacy_plan.epsilon() == pytest.approx(_epsilon((0.5, 1.0, 12)))


# ============================= third round: the review of the second fixes
def test_every_form_of_fit_callbacks_is_checked_and_kept(tmp_path):
    """Callbacks as an iterator were used up by the check and fit ran
    without them (a budget of 7.4 ended at 16.6); a dict crashed; nested
    lists hid a save_best_only checkpoint and a BackupAndRestore (not moved
    first: a budget of 9.1 ended at 10.3)."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    budget = _epsilon((0.5, 1.0, 4)) * 1.001  # two epochs fit, a third does not
    for wrap in (
        lambda c: filter(None, [c]),
        lambda c: (item for item in [c]),
        lambda c: {"accountant": c},
        lambda c: [[c]],
    ):
        model = dp_model(small_cnn(), n=100, sampling="shuffle")
        accountant = DP_Accountant(epsilon_budget=budget)
        model.fit(x, y, batch_size=50, epochs=6, verbose=0, callbacks=wrap(accountant))
        assert int(model.dp_steps.numpy()) == 4
    best = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "b.keras"), save_best_only=True
    )
    with pytest.raises(ValueError, match="save_best_only"):
        model.fit(x, y, batch_size=50, verbose=0, callbacks=[[best]])

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise _Crash

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(_Crash):
        dp_model(small_cnn(), n=100, sampling="shuffle").fit(
            x, y, batch_size=50, epochs=5, verbose=0, callbacks=[backup, Crash()]
        )
    accountant = DP_Accountant(epsilon_budget=_epsilon((0.5, 1.0, 7)))
    for callbacks in (
        [keras.callbacks.CallbackList([accountant, backup])],
        [accountant, [backup]],
    ):
        resumed = dp_model(small_cnn(), n=100, sampling="shuffle")
        with pytest.raises(ValueError, match="already exceeds"):
            resumed.fit(x, y, batch_size=50, epochs=5, verbose=0, callbacks=callbacks)


def _amplifying_model_and_canary(**kwargs):
    """DP_BoundedInput(1e12), then a DP_Lambda of gain 1e8 before an L2
    pooling; and a batch whose first sample puts its norm in one entry."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1e12),
            L.DP_Lambda(lambda t: t * 1e8, lipschitz=1e8),
            L.DP_ScaledL2NormPooling2D(2),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(2),
        ],
        input_shape=(4, 4, 1),
        num_classes=2,
        n=2,
        batch_size=2,
        sampling="shuffle",
        **kwargs,
    )
    x = np.zeros((2, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = 0.99e12
    return model, x


def test_an_amplifying_layer_cannot_overflow_the_squares():
    """DP_BoundedInput(1e12) then DP_Lambda(x * 1e8): one sample's pooling
    window summed to inf, the update was NaN with it and finite without.
    Activation bounds above 1e18 now refuse the step (noise only, under XLA)."""
    model, x = _amplifying_model_and_canary()
    with pytest.raises(tf.errors.InvalidArgumentError, match="float32-safe norm"):
        model.train_on_batch(x, one_hot([0, 1], 2))


def test_per_example_squares_do_not_round_low_at_any_size():
    """DP-SGD's clip norms summed 2^22 float32 squares: under XLA one 512-entry
    example of ones among entries whose squares round away came out 2.4e-4
    low, and the clipped example contributed 1.00024 C."""
    n = 2**22
    x = np.full((1, n), _ROUNDED_AWAY, np.float32)
    x[0, :512] = 1.0
    exact = float(np.sum(x.astype(np.float64) ** 2))
    for run in (example_squares, tf.function(example_squares, jit_compile=True)):
        assert float(run(tf.constant(x))[0]) >= exact * (1 - 2e-5)
    plan = dp_model(small_cnn(), n=100_000, batch_size=4096).privacy_plan
    assert plan.noise_margin() >= 1 + 1e-4 + 4 * plan.max_batch_size() * 2.0**-24


def test_a_temperature_that_could_overflow_is_refused():
    """tau = 1e27: tau * z overflowed for one sample of norm 1e12 only (a NaN
    update showed its presence), inside the loss, past the activation
    guard."""
    for loss in (losses.DP_TauCategoricalCrossentropy, losses.DP_TauBCE):
        with pytest.raises(ValueError, match="tau"):
            loss(1e27)


def test_a_callback_list_is_kept_or_refused_but_never_reordered_silently(tmp_path):
    """A CallbackList given to fit lost its own history and progress-bar
    settings when flattened; one whose BackupAndRestore comes after the
    accountant cannot be reordered without them, so it is refused."""
    x, y = unit_samples(100, (8, 8, 1)), one_hot(np.arange(100))
    model = dp_model(small_cnn(), n=100, sampling="shuffle")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    accountant = DP_Accountant()
    with pytest.raises(ValueError, match="BackupAndRestore first"):
        model.fit(
            x,
            y,
            batch_size=50,
            verbose=0,
            callbacks=keras.callbacks.CallbackList([accountant, backup], model=model),
        )
    given = keras.callbacks.CallbackList(
        [backup, accountant], add_history=True, model=model
    )
    history = model.fit(x, y, batch_size=50, verbose=0, callbacks=given)
    assert history is given._history and "epsilon" in history.history


# ===================================== review of the whole change (stop 30)
def test_the_noise_std_carries_the_margin_and_tiny_sensitivities_add_up(
    monkeypatch,
):
    """The accountant assumes std = sigma * sensitivity; the rounding margin
    is on top of it, on the noise actually added. The global total of tiny
    sensitivities (1e-20: squares flushed to 0) was 0, and so was the noise."""
    model = dp_model(small_cnn(), n=1000, batch_size=50, sigma=2.0)
    plan = model.privacy_plan
    variables = model.trainable_variables
    for sensitivity in (0.5, 1e-20):
        groups = plan.noise_groups(variables, [sensitivity] * len(variables), None)
        total = float(groups[0].sensitivity)
        assert total == pytest.approx(sensitivity * np.sqrt(len(variables)), rel=1e-6)
        monkeypatch.setattr(
            plan, "_standard_normal", lambda size, draw=True: tf.ones([size])
        )
        zeros = [tf.zeros_like(v) for v in variables]
        noisy = plan.privatize(zeros, variables, groups)
        std = float(tf.reshape(noisy[0], [-1])[0]) * plan.expected_batch_size
        assert std == pytest.approx(2.0 * total * plan.noise_margin(), rel=1e-6)
        assert plan.noise_margin() > 1 + 1e-4


def test_an_overflowing_step_under_xla_releases_noise_only():
    """Under jit_compile the activation guard cannot assert: the step's
    summed gradient is replaced by zeros, so a sample whose squares would
    overflow leaves a finite update (it was NaN with the sample, finite
    without)."""
    model, x = _amplifying_model_and_canary(jit_compile=True, sigma=1e-3)
    model.train_on_batch(x, one_hot([0, 1], 2))
    assert all(np.all(np.isfinite(v.numpy())) for v in model.trainable_variables)


# ============================================ review round Z (stop 35)
def test_a_callback_list_made_for_another_model_serves_the_one_that_trains():
    """A CallbackList built for model `a` and given to `b.fit` kept `a`:
    its DP_Accountant logged a's epsilon (4.87 for 8 epochs while b reached
    11.96) and put its budget check on a, so nothing stopped b (a review)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    a, b = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    a.fit(poisson_batches(x, y, 50), verbose=0)
    b_plan = b.privacy_plan
    budget = _two_epoch_budget(b)
    accountant = DP_Accountant(epsilon_budget=budget)
    given = keras.callbacks.CallbackList([accountant], add_history=True, model=a)
    b.fit(poisson_batches(x, y, 50), epochs=6, verbose=0, callbacks=given)
    assert accountant.model is b
    assert b_plan.steps_taken() == 8  # two epochs within budget, then stopped
    assert b_plan.epsilon() <= budget
    logged = given._history.history["epsilon"]
    assert logged[-1] == pytest.approx(b_plan.epsilon())
    assert a.privacy_plan.steps_taken() == 4


@pytest.mark.parametrize("path", ["m.h5", "m.hdf5", "ck/weights.h5"])
def test_the_legacy_hdf5_format_is_refused_for_it_cannot_hold_the_ledger(
    tmp_path, path
):
    """Keras's legacy HDF5 writer saved the layers' weights, then failed on
    the ledger; loading that file reported epsilon 0 for trained weights (a
    review). Saving and loading it are refused with a clear error, from
    `save`, `ModelCheckpoint` and `load_weights`; `.keras` and `.weights.h5`
    keep the ledger."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    model.fit(poisson_batches(x, y, 50), verbose=0)
    target = tmp_path / path
    target.parent.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="legacy HDF5"):
        model.save(target)
    assert not target.exists()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "ck.h5"))
    with pytest.raises(ValueError, match="legacy HDF5"):
        model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[checkpoint])
    assert not (tmp_path / "ck.h5").exists()
    with pytest.raises(ValueError, match="legacy HDF5"):
        keras.saving.save_model(model, target)  # Keras's function, not model.save
    with h5py.File(target, "r") as saved:  # refused before any weight
        assert "model_weights" not in saved
    with h5py.File(target, "w") as legacy:  # a DP config with weights, no ledger
        legacy.attrs["model_config"] = json.dumps(
            {
                "class_name": keras.saving.get_registered_name(DPSequential),
                "config": model.get_config(),
            }
        )
    with pytest.raises(ValueError, match="legacy HDF5"):
        keras.saving.load_model(target)
    plain = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    keras.saving.save_model(plain, target)  # a legacy file from elsewhere
    fresh = _budget_model(sigma=2.0)
    with pytest.raises(ValueError, match="legacy HDF5"):
        fresh.load_weights(target)
    model.save_weights(tmp_path / "m.weights.h5")
    fresh.load_weights(tmp_path / "m.weights.h5")
    assert fresh.privacy_plan.steps_taken() == model.privacy_plan.steps_taken()


@pytest.mark.parametrize("hook", ["on_train_begin", "on_epoch_end"])
@pytest.mark.parametrize("call", ["evaluate", "predict", "custom loop"])
def test_the_accountant_stays_with_the_model_whose_fit_runs(call, hook):
    """A callback evaluating another model with fit's own callbacks (Keras
    binds them to that model) moved the accountant: it logged 0 and checked
    the budget against that model, and fit ran 24 steps, epsilon 3.40 for a
    budget of 2.10 (a review; again from on_train_begin, and through a custom
    loop's on_train_end: the reviews of the fixes). While a DP model's fit
    runs, its accountant refuses to be bound to another model."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    held_out = unit_samples(20, (8,), seed=5), one_hot(np.arange(20), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    plan = model.privacy_plan
    budget = _two_epoch_budget(model)
    accountant = DP_Accountant(epsilon_budget=budget)

    def peek(*args, **kwargs):
        if call == "evaluate":
            other.evaluate(*held_out, callbacks=callbacks, verbose=0)
        elif call == "predict":
            other.predict(held_out[0], callbacks=callbacks, verbose=0)
        else:
            loop = keras.callbacks.CallbackList([accountant], model=other)
            loop.on_train_begin()
            other.train_on_batch(x[:50], y[:50])
            loop.on_train_end()

    callbacks = [type("Peek", (keras.callbacks.Callback,), {hook: peek})(), accountant]
    with pytest.raises(ValueError, match="reports on the fit of model"):
        model.fit(poisson_batches(x, y, 50), epochs=6, verbose=0, callbacks=callbacks)
    assert plan.epsilon() <= budget
    assert other.privacy_plan.steps_taken() == 0
    assert plan.step_checks == [] and other.privacy_plan.step_checks == []
    history = model.fit(
        poisson_batches(x, y, 50), epochs=6, verbose=0, callbacks=[accountant]
    )
    assert plan.epsilon() <= budget  # released, then pinned to this fit again
    assert history.history["epsilon"][-1] == pytest.approx(plan.epsilon())


def test_an_accountant_is_released_when_a_fit_raises():
    """A fit that raised left its accountant pinned: a custom loop of another
    model then registered its budget check on the first one (48 steps ran,
    epsilon 26.2 for a budget of 5, and 0.33 was logged: a review)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    accountant = DP_Accountant(epsilon_budget=10.0)

    class Boom(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant, Boom()])
    assert model.privacy_plan.step_checks == []
    loop = keras.callbacks.CallbackList([accountant], model=other)
    loop.on_train_begin()
    assert other.privacy_plan.step_checks == [accountant._check_before]
    loop.on_train_end()
    assert other.privacy_plan.step_checks == []


def test_an_accountant_accounts_for_one_fit_at_a_time():
    """A callback of `a.fit` fitting another model with the same accountant
    moved it to that model: it logged the other's epsilon, 1.58, while `a`
    ran 24 steps, epsilon 3.40 for a budget of 2.10 (a review)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    accountant = DP_Accountant(epsilon_budget=10.0)

    class WarmUp(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            other.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant])

    with pytest.raises(ValueError, match="already reports on the fit of model"):
        model.fit(
            poisson_batches(x, y, 50), verbose=0, callbacks=[WarmUp(), accountant]
        )
    assert other.privacy_plan.steps_taken() == 0
    other.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant])  # after
    assert accountant.history[-1]["steps"] == other.privacy_plan.steps_taken() == 4


@pytest.mark.parametrize("what", ["layers", "weights"])
def test_layers_frozen_during_fit_stop_training_and_leave_their_noise(what):
    """Two of three per-layer-noised layers (or only their kernels) frozen by
    a callback, no recompile: the old trace trained them on, at the
    three-layer multiplier the ledger recorded, while the budget check
    planned with one layer's (epsilon 4.91 for budgets of 4.78 and 4.20:
    reviews). The step is traced again."""
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_QuickSpectralDense(8),
        L.DP_QuickSpectralDense(8),
        L.DP_QuickSpectralDense(2),
    ]
    model = dp_model(
        layers, input_shape=(8,), num_classes=2, sigma=2.0, strategy="per-layer", n=200
    )
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    frozen = model.dp_layers[1:3]
    if what == "weights":
        frozen = [layer.kernel for layer in frozen]

    class Freeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                for item in frozen:
                    item.trainable = False
                self.kernels = [
                    getattr(item, "kernel", item).numpy() for item in frozen
                ]

    freeze = Freeze()
    model.fit(poisson_batches(x, y, 50), epochs=3, verbose=0, callbacks=[freeze])
    for item, kernel in zip(frozen, freeze.kernels, strict=True):
        np.testing.assert_array_equal(getattr(item, "kernel", item).numpy(), kernel)
    rows = sorted((r.parameter, r.count) for r in model.privacy_plan.ledger())
    assert rows == [(pytest.approx(2 / np.sqrt(3)), 4), (pytest.approx(2.0), 8)]


def test_a_custom_loop_s_accountant_stays_with_its_model():
    """A custom loop (CallbackList + train_on_batch) evaluating another model
    with its accountant each epoch: unpinned outside fit, the accountant
    moved to that model, logged 0 and let 32 steps run to epsilon 3.90 for a
    budget of 2.08 (a review of bd288d1). It is pinned until on_train_end."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    plan = model.privacy_plan
    budget = _two_epoch_budget(model)
    accountant = DP_Accountant(epsilon_budget=budget)
    loop = keras.callbacks.CallbackList([accountant], model=model)
    loop.on_train_begin()
    for epoch in range(8):
        for batch in poisson_batches(x, y, 50).take(4):
            model.train_on_batch(*batch)
        loop.on_epoch_end(epoch, {})
        with pytest.raises(ValueError, match="reports on the fit of model"):
            other.evaluate(x[:20], y[:20], callbacks=[accountant], verbose=0)
        with pytest.raises(ValueError, match="reports on the fit of model"):
            other.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant])
        if model.stop_training:
            break
    loop.on_train_end()
    assert plan.steps_taken() == 8 and plan.epsilon() <= budget
    assert [r["steps"] for r in accountant.history] == [4, 8]
    assert other.privacy_plan.steps_taken() == 0
    assert plan.step_checks == []
    other.evaluate(x[:20], y[:20], callbacks=[accountant], verbose=0)  # released


def test_hkr_alpha_is_checked_at_every_use():
    """alpha = -1 set after construction gave a constant of 0.71 (it passed
    as positive) and a per-sample gradient twice its bound (a review)."""
    loss = losses.DP_MulticlassHKR(alpha=1.0)
    loss.alpha = -1.0
    with pytest.raises(ValueError, match="alpha"):
        loss.get_L(2)


def test_a_fit_inside_a_custom_loop_keeps_the_loop_s_pin():
    """A fit of the loop's model, run inside its custom loop, released the
    loop's pin: later another model's evaluate moved the accountant, and the
    loop ran 32 steps to epsilon 3.90 for a budget of 2.10 (a review)."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    accountant = DP_Accountant(epsilon_budget=50.0)
    loop = keras.callbacks.CallbackList([accountant], model=model)
    loop.on_train_begin()
    model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant])
    assert model.privacy_plan.step_checks == [accountant._check_before]
    with pytest.raises(ValueError, match="reports on the fit of model"):
        other.evaluate(x[:20], y[:20], callbacks=[accountant], verbose=0)
    loop.on_train_end()
    assert model.privacy_plan.step_checks == []
    other.evaluate(x[:20], y[:20], callbacks=[accountant], verbose=0)  # released


class _KeepGoing(keras.callbacks.Callback):
    """Resets the stop the accountant asks for (after it, in the same hook)."""

    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = False


def test_a_budget_holds_when_a_later_callback_resets_stop_training():
    """A review: the accountant kept a check that had failed as checked, so
    with stop_training reset by a later callback the next steps skipped the
    check: 8 epochs ran to epsilon 7.35 for a budget of 5.06. The next
    train-function call now refuses them."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    plan = model.privacy_plan
    budget = _two_epoch_budget(model)
    accountant = DP_Accountant(epsilon_budget=budget)
    with pytest.raises(ValueError, match="would exceed epsilon_budget"):
        model.fit(
            poisson_batches(x, y, 50),
            epochs=8,
            verbose=0,
            callbacks=[accountant, _KeepGoing()],
        )
    assert plan.steps_taken() == 8 and plan.epsilon() <= budget


def test_a_refused_step_retried_is_refused_again():
    """A review: a train_on_batch the budget refused, caught and retried,
    ran (the failed check was kept as checked): a custom loop lowering sigma
    to 0.6 reached 11.9 for a budget of 5.06."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    plan = model.privacy_plan
    budget = _two_epoch_budget(model)
    loop = keras.callbacks.CallbackList(
        [DP_Accountant(epsilon_budget=budget)], model=model
    )
    loop.on_train_begin()
    try:
        model.train_on_batch(x[:50], y[:50])
        model.set_noise_multiplier(0.3)
        for _ in range(3):
            with pytest.raises(ValueError, match="would exceed epsilon_budget"):
                model.train_on_batch(x[:50], y[:50])
    finally:
        loop.on_train_end()
    assert plan.steps_taken() == 1 and plan.epsilon() <= budget


def test_a_budget_holds_when_a_checkpoint_restore_rolls_the_step_counter_back(
    tmp_path,
):
    """A review: a callback restoring a tf.train.Checkpoint before each of 6
    train_on_batch steps rolled the step counter back, and the budget check
    read it: every step passed, 11.5 for a budget of 9.68. The check counts
    steps_taken, which never goes back."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model = _budget_model(sigma=2.0)
    plan = model.privacy_plan
    budget = _two_epoch_budget(model)
    checkpoint = tf.train.Checkpoint(model=model)
    early = checkpoint.write(str(tmp_path / "early"))

    class Rollback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for _ in range(6):
                checkpoint.restore(early)
                self.model.train_on_batch(x[:50], y[:50])

    with pytest.raises(ValueError, match="would exceed epsilon_budget"):
        model.fit(
            poisson_batches(x, y, 50),
            epochs=4,
            verbose=0,
            callbacks=[DP_Accountant(epsilon_budget=budget), Rollback()],
        )
    assert plan.steps_taken() <= 8 and plan.epsilon() <= budget


@pytest.mark.parametrize("make_copy", [copy.copy, copy.deepcopy])
def test_a_copy_of_an_accountant_is_bound_to_no_model_and_pinned_to_no_fit(
    make_copy,
):
    """A review: a copy made during a fit kept that fit's pin for good
    (another model's fit was refused after it ended), and a deep copy
    reported on a clone of the model."""
    x, y = unit_samples(200, (8,)), one_hot(np.arange(200), 2)
    model, other = _budget_model(sigma=2.0), _budget_model(sigma=2.0)
    accountant, copies = DP_Accountant(epsilon_budget=50.0), []

    class Copy(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            copies.append(make_copy(accountant))

    model.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[accountant, Copy()])
    (copied,) = copies
    assert copied._fitting is None and copied._pins == 0 and copied.model is None
    assert copied.history == accountant.history
    assert copied.history is not accountant.history
    other.fit(poisson_batches(x, y, 50), verbose=0, callbacks=[copied])
    assert copied.history[-1]["steps"] == other.privacy_plan.steps_taken() == 4
    assert len(accountant.history) == 1
