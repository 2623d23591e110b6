"""DP training under tf.distribute, on the logical CPU devices of conftest.py.

The rule under test (deel_lipdp_ext/distribution.py): one Gaussian of the
planned std per coordinate per GLOBAL step, whatever the number of replicas,
the sum of the samples' gradients over the global batch, divided by the
global expected batch size; weights identical on every replica; the same
ledger and epsilon as one device.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import DPParameters, DPSequential, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.callbacks import DP_Accountant
from deel_lipdp_ext.data import (
    DatasetMetadata,
    bound_normalize,
    declare_sampling,
    digits_arrays,
    poisson_batches,
    sampling_provenance,
)
from deel_lipdp_ext.distribution import (
    check_strategy,
    distributed_poisson_batches,
)
from deel_lipdp_ext.dpsgd import DPSGDModel
from deel_lipdp_ext.dynamic_clipping import (
    AdaptiveQuantileClipping,
    LaplaceAdaptiveLossGradientClipping,
    clip_layer_gradient_norms,
    dynamic_clip_layers,
)

from .helpers import dp_model, step_updates


def strategy_of(replicas: int) -> tf.distribute.Strategy:
    """The default strategy (1) or a MirroredStrategy over logical CPUs. Its
    all-reduce goes through one device: the default collective ops of two
    strategies with different device counts clash within one process (the
    two-worker test, tests/test_multi_worker.py, runs the collectives)."""
    if replicas == 1:
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def local_copies(strategy, variable) -> list[np.ndarray]:
    value = getattr(variable, "value", variable)
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


# ------------------------------------------------------------------ noise
def _clipless(sigma):
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(64),
        L.DP_GroupSort(2),
        L.DP_QuickSpectralDense(64),
        L.DP_AddBias(1.0),
        L.DP_QuickSpectralDense(64),
    ]
    return dp_model(
        layers,
        input_shape=(8, 8, 1),
        num_classes=64,
        sigma=sigma,
        optimizer=keras.optimizers.SGD(1.0),
    )


def _noise_updates(replicas: int, sigma: float, steps: int = 4):
    """Updates of `steps` zero-data-gradient steps (weights 0), each from the
    same initial weights, under `replicas` replicas; and the planned std."""
    strategy = strategy_of(replicas)
    with strategy.scope():
        model = _clipless(sigma)
    x = np.random.default_rng(1).uniform(size=(8, 8, 8, 1)).astype(np.float32) / 8
    y = np.eye(64, dtype=np.float32)[:8]
    initial = model.get_weights()
    bounds = model.compute_gradient_bounds()
    b = model.dataset_metadata.batch_size
    planned = sigma * np.sqrt(sum(float(v) ** 2 for v in bounds.values())) / b
    updates = []
    for _ in range(steps):
        model.set_weights(initial)
        (update,) = step_updates(model, x, y, np.zeros(8, np.float32))
        for v in model.trainable_variables:  # every replica got the same update
            copies = local_copies(strategy, v)
            assert all(np.array_equal(copies[0], c) for c in copies[1:]), v.path
        updates.append(np.concatenate([u.ravel() for u in update.values()]))
    return np.stack(updates), planned, model


def test_noise_is_one_gaussian_per_global_step_under_2_and_4_replicas():
    """With the data gradient forced to zero the update IS the noise: its std
    under 2 and 4 replicas equals the single-device one within 3% (12 000
    draws each: 3% is over 4 standard errors of the ratio), and equals the
    planned std. Noise added in every replica would show sqrt(R) (independent
    streams) or R (one shared stream) times the std."""
    sigma = 1.3
    single, planned, _ = _noise_updates(1, sigma)
    assert np.std(single) == pytest.approx(planned, rel=0.03)
    for replicas in (2, 4):
        updates, planned_r, model = _noise_updates(replicas, sigma)
        assert planned_r == pytest.approx(planned, rel=1e-6)
        assert np.std(updates) == pytest.approx(np.std(single), rel=0.03), replicas
        assert abs(np.mean(updates)) < 5 * planned / np.sqrt(updates.size)
        # uncorrelated across steps, never repeated
        for i in range(len(updates)):
            for j in range(i + 1, len(updates)):
                corr = np.corrcoef(updates[i], updates[j])[0, 1]
                assert abs(corr) < 5 / np.sqrt(updates.shape[1]), (i, j, corr)
        steps = model.privacy_plan.ledger()[0].count
        assert steps == len(updates)  # one ledger entry per global step


def _dpsgd(clipping, sigma, clip):
    inner = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(64), keras.layers.Dense(32)]
    )
    meta = DatasetMetadata(
        (16,), 32, nb_samples_train=1000, nb_samples_test=0, batch_size=50
    )
    model = DPSGDModel(
        inner,
        DPParameters(sigma, 1e-5, seed=0),
        meta,
        l2_norm_clip=clip,
        clipping=clipping,
    )
    model.compile(keras.optimizers.SGD(1.0), keras.losses.MeanSquaredError())
    return model


@pytest.mark.parametrize("clipping", ["ghost", "vectorized"])
def test_dpsgd_noise_is_one_gaussian_per_global_step(clipping):
    """DP-SGD (sensitivity: the clip norm C) under 2 replicas: the update of a
    zero-data-gradient step has std sigma C / B, not sqrt(2) or 2 times it."""
    sigma, clip = 1.1, 0.7
    with strategy_of(2).scope():
        model = _dpsgd(clipping, sigma, clip)
    x = np.random.default_rng(2).normal(size=(8, 16)).astype(np.float32)
    y = np.random.default_rng(3).normal(size=(8, 32)).astype(np.float32)
    updates = [
        np.concatenate([u.ravel() for u in update.values()])
        for update in step_updates(model, x, y, np.zeros(8, np.float32), steps=5)
    ]
    planned = sigma * clip / 50
    assert np.std(np.concatenate(updates)) == pytest.approx(planned, rel=0.03)
    assert model.clipping_method == clipping


def test_data_gradient_is_the_sum_over_the_global_batch():
    """sigma ~ 0: the update under 2 replicas equals the single-device update
    of the same batch (the replicas' sums add up; B is the global one)."""
    results = []
    x = np.random.default_rng(4).uniform(size=(8, 8, 8, 1)).astype(np.float32) / 8
    y = np.eye(64, dtype=np.float32)[np.arange(8) % 64]
    for replicas in (1, 2):
        keras.utils.set_random_seed(0)
        with strategy_of(replicas).scope():
            model = _clipless(1e-12)
        (update,) = step_updates(model, x, y, np.ones(8, np.float32))
        results.append(update)
    for one, two in zip(results[0].values(), results[1].values(), strict=True):
        scale = np.abs(one).max()
        assert scale > 1e-6  # the data moved the weights
        # float32 sums in another order: equal to rounding, not twice as large
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5 * scale)


def test_undistributed_data_never_reaches_every_replica_whole():
    """strategy.run gives every replica the whole of an undistributed batch
    (each sample counted once per replica, against noise for one): the train
    function refuses it; train_on_batch splits its batch (the test above)."""
    with strategy_of(2).scope():
        model = _clipless(1.0)
    x = np.zeros((4, 8, 8, 1), np.float32)
    y = np.eye(64, dtype=np.float32)[:4]
    model.make_train_function()
    batches = iter(tf.data.Dataset.from_tensors((x, y)))
    with pytest.raises(ValueError, match="each sample would count once per replica"):
        model.train_function(batches)
    assert int(model.dp_steps.numpy()) == 0


# ---------------------------------------------------------------- sampling
TINY = DatasetMetadata((4,), 2, nb_samples_train=100, nb_samples_test=0, batch_size=10)


def _tiny_model(compile_kwargs=None, metadata=TINY) -> DPSequential:
    """A one-layer DP model of 4 inputs for `metadata` (TINY: 100 samples,
    B = 10), compiled with `compile_kwargs` (refusals raise from compile)."""
    model = DPSequential(
        [
            keras.Input((4,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_QuickSpectralDense(2),
        ],
        dp_parameters=DPParameters(1.0, 1e-5),
        dataset_metadata=metadata,
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        losses.DP_TauCategoricalCrossentropy(1.0),
        **(compile_kwargs or {}),
    )
    return model


def test_distributed_poisson_batches_split_the_single_device_batch():
    """With one seed, the replicas' batches of a step are a partition of the
    batch poisson_batches draws on one device (every row once)."""
    strategy = strategy_of(2)
    x = np.arange(300, dtype=np.float32)[:, None]
    y = np.zeros((300, 1), np.float32)
    single = [sorted(b[0][:, 0].numpy().tolist()) for b in poisson_batches(x, y, 30, 7)]
    distributed = distributed_poisson_batches(strategy, x, y, 30, 7)
    steps = 0
    for (xb, _, mask), rows in zip(distributed, single, strict=True):
        parts = [
            t[:, 0].numpy().tolist() for t in strategy.experimental_local_results(xb)
        ]
        assert sorted(sum(parts, [])) == rows
        assert all(
            m.numpy().tolist() == [1.0] * len(p)
            for m, p in zip(
                strategy.experimental_local_results(mask), parts, strict=True
            )
        )
        steps += 1
    assert steps == 10


def test_distributed_poisson_batches_take_a_public_sample_count():
    """nb_samples: the same draws as poisson_batches at q = B / N_public, with
    its steps and provenance (the rows' count stays out of the mechanism)."""
    strategy = strategy_of(2)
    x = np.arange(280, dtype=np.float32)[:, None]
    y = np.zeros((280, 1), np.float32)
    single = [
        sorted(b[0][:, 0].numpy().tolist())
        for b in poisson_batches(x, y, 30, 7, nb_samples=300)
    ]
    distributed = distributed_poisson_batches(strategy, x, y, 30, 7, nb_samples=300)
    assert sampling_provenance(distributed).nb_samples == 300
    split = [
        sorted(
            sum(
                (
                    t[:, 0].numpy().tolist()
                    for t in strategy.experimental_local_results(b[0])
                ),
                [],
            )
        )
        for b in distributed
    ]
    assert split == single and len(split) == 10


def test_poisson_shards_partition_the_batch():
    """Each of W shards (one per worker) keeps the rows i % W == w of the
    same draws: together, the unsharded batch."""
    x = np.arange(500, dtype=np.float32)[:, None]
    y = np.zeros((500, 1), np.float32)
    whole = [set(b[0][:, 0].numpy().tolist()) for b in poisson_batches(x, y, 40, 3)]
    shards = [
        [
            b[0][:, 0].numpy().tolist()
            for b in poisson_batches(x, y, 40, 3, shard=(w, 3))
        ]
        for w in range(3)
    ]
    for step, rows in enumerate(whole):
        union = []
        for w in range(3):
            assert all(int(r) % 3 == w for r in shards[w][step])
            union += shards[w][step]
        assert sorted(union) == sorted(rows)


def test_fit_refuses_a_single_shard_and_bad_shards():
    x = np.zeros((100, 4), np.float32)
    y = np.zeros((100, 2), np.float32)
    with pytest.raises(ValueError, match="shard"):
        poisson_batches(x, y, 10, shard=(2, 2))
    model = _tiny_model()
    with pytest.raises(ValueError, match="shard"):
        model.fit(poisson_batches(x, y, 10, shard=(0, 2)), epochs=1, verbose=0)


def test_multi_worker_fit_refuses_undistributed_data(monkeypatch):
    """Under several workers, arrays or a tf.data dataset would be sharded by
    batches (no longer Poisson): fit names the distributed sampler."""
    import deel_lipdp_ext.privacy_plan as plan_module

    x = np.zeros((100, 4), np.float32)
    y = np.zeros((100, 2), np.float32)
    model = _tiny_model()
    monkeypatch.setattr(plan_module, "num_workers", lambda strategy=None: 2)
    with pytest.raises(ValueError, match="distributed_poisson_batches"):
        model.fit(poisson_batches(x, y, 10), epochs=1, verbose=0)


# --------------------------------------------------------------- training
def _digits():
    x_tr, y_tr, x_te, y_te = digits_arrays(0.2, 0)
    bound = bound_normalize(1.0)
    eye = np.eye(10, dtype=np.float32)
    return (
        bound(x_tr.astype(np.float32)),
        eye[y_tr],
        bound(x_te.astype(np.float32)),
        eye[y_te],
    )


def _digits_model(meta, metrics=None):
    """A compiled two-layer DP network for the digits of `meta`."""
    model = DPSequential(
        [
            keras.Input((8, 8, 1)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_SpectralDense(64),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(10),
        ],
        dp_parameters=DPParameters(1.0, 1e-5),
        dataset_metadata=meta,
    )
    model.compile(
        keras.optimizers.Adam(0.01),
        losses.DP_TauCategoricalCrossentropy(8.0),
        metrics=metrics,
    )
    return model


def _digits_meta(n: int, batch_size: int, n_test: int = 0) -> DatasetMetadata:
    return DatasetMetadata(
        (8, 8, 1), 10, nb_samples_train=n, nb_samples_test=n_test, batch_size=batch_size
    )


def test_two_replicas_train_like_one_device():
    """Same model and data on 1 device and on 2 replicas: the same epsilon
    after every epoch, test accuracies within noise of each other, and the
    weights identical on both replicas at the end."""
    x_tr, y_tr, x_te, y_te = _digits()
    meta = _digits_meta(len(x_tr), 128, n_test=len(x_te))
    histories, accuracies = [], []
    for replicas in (1, 2):
        strategy = strategy_of(replicas)
        with strategy.scope():
            model = _digits_model(meta, metrics=["accuracy"])
        data = (
            poisson_batches(x_tr, y_tr, 128)
            if replicas == 1
            else distributed_poisson_batches(strategy, x_tr, y_tr, 128)
        )
        accountant = DP_Accountant()
        model.fit(data, epochs=4, callbacks=[accountant], verbose=0)
        histories.append([(h["steps"], h["epsilon"]) for h in accountant.history])
        accuracies.append(
            model.evaluate(x_te, y_te, verbose=0, return_dict=True)["accuracy"]
        )
        for v in model.variables:
            copies = local_copies(strategy, v)
            assert all(np.array_equal(copies[0], c) for c in copies[1:]), v.path
    assert histories[0] == histories[1]
    assert min(accuracies) > 0.7, accuracies
    assert abs(accuracies[0] - accuracies[1]) < 0.1, accuracies


def test_fit_on_a_tf_data_dataset_under_two_replicas():
    """A plain poisson_batches dataset (split over the replicas by Keras)
    trains under 2 replicas; every step is recorded as Poisson."""
    x_tr, y_tr, _, _ = _digits()
    meta = _digits_meta(len(x_tr), 64)
    with strategy_of(2).scope():
        model = _digits_model(meta)
    model.fit(poisson_batches(x_tr, y_tr, 64), epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == meta.nb_steps_per_epoch
    assert model.privacy_plan.samplings() == ("poisson",)


def test_xla_is_refused_by_name_under_several_replicas():
    with strategy_of(2).scope():
        with pytest.raises(ValueError, match="jit_compile=True"):
            _tiny_model({"jit_compile": True})
        dpsgd = _dpsgd("ghost", 1.0, 1.0)
        with pytest.raises(ValueError, match="jit_compile=True"):
            dpsgd.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=True)


# ---------------------------------------------------------------- refusals
def test_unsupported_strategies_are_refused_by_name(monkeypatch):
    with tf.distribute.experimental.CentralStorageStrategy().scope():
        with pytest.raises(NotImplementedError, match="CentralStorageStrategy"):
            check_strategy("DPSequential")
    for name in ("TPUStrategy", "ParameterServerStrategy"):
        fake = type(name, (), {"num_replicas_in_sync": 2})()
        monkeypatch.setattr(tf.distribute, "has_strategy", lambda: True)
        monkeypatch.setattr(tf.distribute, "get_strategy", lambda fake=fake: fake)
        with pytest.raises(NotImplementedError, match=name):
            check_strategy("DPSequential")


def test_declared_distributed_datasets_are_accepted_and_labelled():
    """A declared dataset that splits each batch (experimental_distribute_
    dataset) trains, labelled "declared"; one of distribute_datasets_from_
    function, which gives every replica a dataset of its own (a whole batch
    each: fourth review, R times the declared rate), is refused."""
    strategy = strategy_of(2)
    x = np.zeros((100, 4), np.float32)
    y = np.zeros((100, 2), np.float32)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    declared = declare_sampling(strategy.experimental_distribute_dataset(batches), TINY)
    with strategy.scope():
        model = _tiny_model()
    model.fit(declared, epochs=1, verbose=0)
    assert model.privacy_plan.samplings() == ("declared by the user",)
    per_replica = strategy.distribute_datasets_from_function(lambda _: batches)
    with pytest.raises(TypeError, match="distribute_datasets_from_function"):
        declare_sampling(per_replica, TINY)


# ------------------------------------------------------------ resume runs
class _Interrupt(keras.callbacks.Callback):
    """Stops the process's training (as a crash would) after an epoch."""

    def __init__(self, after_epoch):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt("simulated crash")


class _NoiseProbe(keras.callbacks.Callback):
    """The noise stream's key and the step counter at each batch."""

    def __init__(self):
        super().__init__()
        self.draws = []

    def on_train_batch_begin(self, batch, logs=None):
        plan = self.model.privacy_plan
        self.draws.append((plan._key, int(plan.steps.numpy())))


def test_backup_and_restore_under_two_replicas_keeps_the_whole_run(tmp_path):
    """A run interrupted after 2 of 4 epochs and resumed by BackupAndRestore
    (new model objects, as after a restart) reports the epsilon of the whole
    uninterrupted run; the resumed steps continue the step counter with a
    new noise key, so no (key, step) pair of the noise repeats."""
    x_tr, y_tr, _, _ = _digits()
    meta = _digits_meta(len(x_tr), 128)
    strategy = strategy_of(2)

    def run(epochs, callbacks):
        with strategy.scope():
            model = _digits_model(meta)
        try:
            model.fit(
                distributed_poisson_batches(strategy, x_tr, y_tr, 128),
                epochs=epochs,
                callbacks=callbacks,
                verbose=0,
            )
        except KeyboardInterrupt:
            pass
        return model

    whole = run(4, [])
    backup = str(tmp_path / "backup")
    before, after = _NoiseProbe(), _NoiseProbe()
    run(4, [keras.callbacks.BackupAndRestore(backup), before, _Interrupt(1)])
    resumed = run(4, [keras.callbacks.BackupAndRestore(backup), after])
    steps = meta.nb_steps_per_epoch
    assert [s for _, s in before.draws] == list(range(2 * steps))
    assert [s for _, s in after.draws] == list(range(2 * steps, 4 * steps))
    assert not {k for k, _ in before.draws} & {k for k, _ in after.draws}
    assert int(resumed.dp_steps.numpy()) == int(whole.dp_steps.numpy()) == 4 * steps
    assert resumed.privacy_plan.ledger() == whole.privacy_plan.ledger()
    assert resumed.privacy_plan.epsilon() == pytest.approx(
        whole.privacy_plan.epsilon(), rel=1e-12
    )


def test_keras_file_of_a_distributed_run_keeps_its_ledger(tmp_path):
    """A model trained under 2 replicas, saved as .keras and loaded under a
    new 2-replica strategy, keeps its steps, ledger and epsilon, and trains
    on from there with a new noise key."""
    x_tr, y_tr, _, _ = _digits()
    meta = _digits_meta(len(x_tr), 256)
    strategy = strategy_of(2)
    with strategy.scope():
        model = _digits_model(meta)
    model.fit(
        distributed_poisson_batches(strategy, x_tr, y_tr, 256), epochs=1, verbose=0
    )
    path = str(tmp_path / "model.keras")
    model.save(path)
    with strategy_of(2).scope():
        loaded = keras.models.load_model(path)
    assert int(loaded.dp_steps.numpy()) == meta.nb_steps_per_epoch
    assert loaded.privacy_plan.ledger() == model.privacy_plan.ledger()
    assert loaded.privacy_plan.epsilon() == model.privacy_plan.epsilon()
    assert loaded.privacy_plan._key != model.privacy_plan._key
    loaded.fit(
        distributed_poisson_batches(loaded.distribute_strategy, x_tr, y_tr, 256),
        epochs=1,
        verbose=0,
    )
    assert int(loaded.dp_steps.numpy()) == 2 * meta.nb_steps_per_epoch
    assert loaded.privacy_plan.epsilon() > model.privacy_plan.epsilon()


# ------------------------------------------------- adversarial review (fixed)
def _samples(n):
    """n samples of the _clipless input shape, and labels."""
    x = np.random.default_rng(n).uniform(size=(n, 8, 8, 1)).astype(np.float32) / 8
    return x, np.eye(64, dtype=np.float32)[np.arange(n) % 64]


def _two_rows():
    x = np.random.default_rng(4).uniform(size=(2, 8, 8, 1)).astype(np.float32) / 8
    return x, np.eye(64, dtype=np.float32)[:2]


@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
def test_optimizer_clipping_cannot_reveal_a_replicas_sample(clip):
    """Keras clips each replica's gradient before summing them. Had the first
    replica's (noisy) term been clipped alone, the update's norm would be
    the clip c without a sample of replica 1 and larger with it (1.0 vs 1.41
    c). The replicas now hand the optimizer the released update: its norm
    is the same whether the sample is there or not."""
    c = 1e-3
    x, y = _two_rows()
    norms = []
    for present in (0.0, 1.0):
        with strategy_of(2).scope():
            model = _clipless(1.0)
            model.compile(
                keras.optimizers.SGD(1.0, **{clip: c}),
                losses.DP_TauCategoricalCrossentropy(8.0),
            )
        (update,) = step_updates(model, x, y, np.array([0.0, present], np.float32))
        norms.append(
            [float(np.linalg.norm(u)) / c for u in update.values()]
            if clip == "clipnorm"
            else [float(np.sqrt(sum(np.sum(u**2) for u in update.values()))) / c]
        )
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-4)
    np.testing.assert_allclose(norms[0], 2.0, rtol=1e-4)  # R copies of c


def test_a_custom_strategy_run_of_train_step_is_refused():
    """strategy.run(model.train_step, args=(batch,)) gives every replica the
    whole batch: each sample would count twice against noise for once."""
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    x, y = _two_rows()
    with pytest.raises(ValueError, match="inside fit or train_on_batch"):
        strategy.run(model.train_step, args=((x, y, np.ones(2, np.float32)),))
    assert int(model.dp_steps.numpy()) == 0


def test_a_dataset_of_another_strategy_is_refused():
    """Data split for 4 replicas, trained by a 2-replica model, would drop
    rows by their position in the batch."""
    x_tr, y_tr, _, _ = _digits()
    meta = _digits_meta(len(x_tr), 128)
    with strategy_of(2).scope():
        model = _digits_model(meta)
    other = distributed_poisson_batches(strategy_of(4), x_tr, y_tr, 128)
    with pytest.raises(ValueError, match="another strategy"):
        model.fit(other, epochs=1, verbose=0)
    assert int(model.dp_steps.numpy()) == 0


def test_a_model_created_outside_the_scope_is_refused():
    x, y = _two_rows()
    model = _clipless(1.0)
    with strategy_of(2).scope():
        with pytest.raises(ValueError, match="created outside"):
            model.compile(
                keras.optimizers.SGD(0.1), losses.DP_TauCategoricalCrossentropy(8.0)
            )
    assert int(model.dp_steps.numpy()) == 0


def test_batches_smaller_than_the_replicas_and_the_seeded_epochs_of_fit():
    """Empty and 1-row batches over 2 replicas train (B = 1); and with one
    seed and sigma ~ 0, fit on 2 replicas trains on exactly the batches of
    one device (building the model reads no batch, so no epoch is skipped)."""
    x_tr, y_tr, _, _ = _digits()
    x_tr, y_tr = x_tr[:30], y_tr[:30]
    meta = _digits_meta(30, 1)
    weights = []
    for replicas in (1, 2):
        keras.utils.set_random_seed(0)
        strategy = strategy_of(replicas)
        with strategy.scope():
            model = DPSequential(
                [
                    keras.Input((8, 8, 1)),
                    L.DP_BoundedInput(upper_bound=1.0),
                    L.DP_Flatten(),
                    L.DP_QuickSpectralDense(10),
                ],
                dp_parameters=DPParameters(1e-9, 1e-5),
                dataset_metadata=meta,
            )
            model.compile(
                keras.optimizers.SGD(1.0), losses.DP_TauCategoricalCrossentropy(8.0)
            )
        model._project = lambda: None
        data = (
            poisson_batches(x_tr, y_tr, 1, seed=5)
            if replicas == 1
            else distributed_poisson_batches(strategy, x_tr, y_tr, 1, seed=5)
        )
        model.fit(data, epochs=2, verbose=0)
        assert int(model.dp_steps.numpy()) == 60
        weights.append([v.numpy() for v in model.trainable_variables])
    for one, two in zip(*weights, strict=True):
        np.testing.assert_allclose(two, one, atol=1e-6)


def test_only_stock_optimizers_without_clipping_skip_the_released_sum():
    """The extra all-reduce is skipped only where the optimizer provably just
    sums the replicas' gradients."""
    from deel_lipdp_ext.distribution import sums_replica_gradients

    assert sums_replica_gradients(keras.optimizers.Adam(0.1))
    assert sums_replica_gradients(keras.optimizers.SGD(0.1))
    for kwargs in (
        {"clipnorm": 1.0},
        {"global_clipnorm": 1.0},
        {"clipvalue": 1.0},
        {"gradient_accumulation_steps": 2},
    ):
        assert not sums_replica_gradients(keras.optimizers.SGD(0.1, **kwargs))

    class Custom(keras.optimizers.SGD):
        pass

    assert not sums_replica_gradients(Custom(0.1))
    assert not sums_replica_gradients(
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    )
    variable = keras.Variable(1.0)
    variable.overwrite_with_gradient = True
    assert not sums_replica_gradients(keras.optimizers.SGD(0.1), [variable])


def test_a_direct_train_function_call_is_refused_even_with_distributed_data():
    """A distributed dataset can give every replica the whole batch
    (distribute_datasets_from_function returning the same batches on each
    replica): a train function called outside fit / train_on_batch would
    count each sample R times. It runs only from those two."""
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    x, y = _two_rows()
    model.train_on_batch(x, y)  # traced once, from train_on_batch: allowed
    whole = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensors((x, y)).repeat()
    )
    with pytest.raises(ValueError, match="each sample would count once per replica"):
        model.train_function(iter(whole))
    assert int(model.dp_steps.numpy()) == 1


def test_the_train_function_takes_only_iterators_that_split_the_batch():
    """Third review: the train function's guard read the strategy in scope,
    so after fit (outside the scope) a direct call with every replica given
    the whole batch ran (update 2x, one step recorded); a callback could do
    it during fit with a plain iterator. Now the model's strategy decides,
    and only iterators of datasets that split each batch are taken."""
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    x, y = _two_rows()
    model.fit(poisson_batches(*_samples(1000), 50, seed=3), epochs=1, verbose=0)
    steps = int(model.dp_steps.numpy())
    whole = strategy.distribute_datasets_from_function(
        lambda _: tf.data.Dataset.from_tensors((x, y)).repeat()
    )
    plain = tf.data.Dataset.from_tensors((x, y)).repeat()
    for iterator in (iter(whole), iter(plain)):
        with pytest.raises(ValueError, match="each sample would count once per"):
            model.train_function(iterator)
    assert int(model.dp_steps.numpy()) == steps

    class DirectCall(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.train_function(iter(plain))

    with pytest.raises(ValueError, match="was not made by them"):
        model.fit(
            poisson_batches(*_samples(1000), 50, seed=4),
            epochs=1,
            verbose=0,
            callbacks=[DirectCall()],
        )


def test_a_train_step_of_ones_own_traced_inside_fit_is_refused_when_run():
    """Fourth review: `strategy.run(model.train_step)` in a tf.function of
    one's own, traced inside fit (where the trace-time check passes), gave
    every replica the whole batch when run, inside fit or after it (update
    2x, one step). The step now guards in the graph that the model's train
    function is running; tracing it inside fit is refused at once (a train
    step called directly during fit), so here it is traced between fits."""
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    x, y = _two_rows()
    batch = (tf.constant(x), tf.constant(y))
    step = tf.function(lambda b: strategy.run(model.train_step, args=(b,)))
    outcomes = []

    class Run(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            if batch_index == 0:
                with pytest.raises(tf.errors.InvalidArgumentError) as refused:
                    step(batch)
                outcomes.append(str(refused.value))

    class Trace(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            with pytest.raises(RuntimeError, match="called directly while fit"):
                step.get_concrete_function(batch)
            outcomes.append("refused at trace")

    data = poisson_batches(*_samples(1000), 50, seed=6)
    fit = dict(epochs=1, verbose=0, steps_per_epoch=1)
    model.fit(data, **fit, callbacks=[Trace()])
    step.get_concrete_function(batch)  # outside fit: the trace-time check passes
    before = [v.numpy() for v in model.trainable_variables]
    model.fit(data, **fit, callbacks=[Run()])
    assert outcomes[0] == "refused at trace"
    assert "assertion failed: [DP tr" in outcomes[1]  # TensorFlow cuts the rest
    trained = [v.numpy() for v in model.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(trained, before, strict=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="assertion failed"):
        step(batch)  # after fit
    for now, then in zip(model.trainable_variables, trained, strict=True):
        np.testing.assert_array_equal(now, then)


def test_strategies_that_could_split_otherwise_are_refused():
    """Fourth review: a MirroredStrategy subclass (or an instance with its
    experimental_distribute_dataset replaced) decides which replica gets
    which samples; fit marked what it returned as splitting (update 2x)."""

    class Custom(tf.distribute.MirroredStrategy):
        pass

    custom = Custom(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with custom.scope(), pytest.raises(NotImplementedError, match="a subclass"):
        _clipless(1.0)
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    strategy.experimental_distribute_dataset = lambda dataset, options=None: None
    try:
        with pytest.raises(NotImplementedError, match="replaced on the instance"):
            model.train_on_batch(*_two_rows())
    finally:
        del strategy.experimental_distribute_dataset


def test_padding_rows_do_not_count_against_the_batch_limit():
    """Fourth review: the global limit counted each replica's bucket padding
    (B = 3, 4 replicas: 32 rows against a limit of 31, every step refused).
    Rows of weight 0 are not samples."""
    strategy = strategy_of(4)
    metadata = DatasetMetadata(
        (4,), 2, nb_samples_train=1000, nb_samples_test=0, batch_size=3
    )
    with strategy.scope():
        model = _tiny_model(metadata=metadata)
    x = np.random.default_rng(0).normal(size=(1000, 4)).astype(np.float32) / 4
    y = np.eye(2, dtype=np.float32)[np.arange(1000) % 2]
    data = distributed_poisson_batches(strategy, x, y, 3, seed=0, padding="buckets")
    model.fit(data, epochs=1, verbose=0, steps_per_epoch=5)
    assert int(model.dp_steps.numpy()) == 5


def test_jit_compile_set_after_compile_is_refused_by_name():
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    model.jit_compile = True
    with pytest.raises(ValueError, match="jit_compile=True does not run"):
        model.train_on_batch(*_two_rows())


def test_train_on_batch_inside_fit_keeps_fit_running():
    """train_on_batch from a callback nests in fit: fit's later steps still
    run (and are labelled unverified, as after any train_on_batch)."""
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
    x, y = _two_rows()

    class Nested(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                self.model.train_on_batch(x, y)

    data = poisson_batches(*_samples(1000), 50, seed=5)
    model.fit(data, epochs=1, verbose=0, callbacks=[Nested()])
    assert int(model.dp_steps.numpy()) == len(list(data)) + 1


def test_the_batch_size_limit_holds_for_the_global_batch():
    """Third review: the limit on a batch's rows was checked per replica, so
    4 replicas took 4x the rows the declared sampling can produce."""
    strategy = strategy_of(4)
    with strategy.scope():
        model = _clipless(1.0)
    limit = model.privacy_plan.max_batch_size()
    rows = 4 * (limit // 4 + 1)  # every replica's share is under the limit
    x, y = _samples(rows)
    before = [v.numpy() for v in model.trainable_variables]
    with pytest.raises(tf.errors.InvalidArgumentError, match="more samples than"):
        model.train_on_batch(x, y)
    for now, then in zip(model.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(now, then)  # nothing of the batch released
    steps = int(model.dp_steps.numpy())  # (the refused step may count: conservative)
    model.train_on_batch(*_samples(limit))
    assert int(model.dp_steps.numpy()) == steps + 1


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_accumulation_steps": 2},
        {"use_ema": True, "ema_overwrite_frequency": 1},
    ],
)
def test_optimizer_options_keras_cannot_run_under_replicas_are_refused(options):
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(1.0)
        with pytest.raises(ValueError, match=f"optimizer's {next(iter(options))}"):
            model.compile(
                keras.optimizers.SGD(0.1, **options), losses.DP_KCosineSimilarity()
            )


def test_an_optimizer_with_a_replaced_gradient_method_gets_the_released_sum():
    """A stock class is trusted to only sum the replicas' gradients unless a
    gradient-path method was replaced on the instance (a per-replica clip
    patched in would reveal another replica's sample)."""
    from deel_lipdp_ext.distribution import sums_replica_gradients

    optimizer = keras.optimizers.SGD(0.1)
    assert sums_replica_gradients(optimizer)
    optimizer._clip_gradients = lambda grads: [tf.clip_by_norm(g, 1e-3) for g in grads]
    assert not sums_replica_gradients(optimizer)


def test_the_noise_uses_the_largest_replica_sensitivity():
    """Replica copies made to differ (replica 1's copy of a kernel tripled):
    its samples' bound is larger than replica 0's, and the noise (drawn by
    replica 0) must be scaled by the larger one."""
    sigma = 1.0
    strategy = strategy_of(2)
    with strategy.scope():
        model = _clipless(sigma)
    model._project = lambda: None
    kernel = model.layers[2].kernel
    initial = model.get_weights()
    base = float(
        np.sqrt(sum(float(v) ** 2 for v in model.compute_gradient_bounds().values()))
    )
    with strategy_of(1).scope():
        reference = _clipless(sigma)
    reference.set_weights(initial)
    reference.layers[2].kernel.assign(3.0 * kernel.numpy())
    larger = float(
        np.sqrt(
            sum(float(v) ** 2 for v in reference.compute_gradient_bounds().values())
        )
    )
    assert larger > 1.2 * base
    x = np.random.default_rng(2).uniform(size=(8, 8, 8, 1)).astype(np.float32) / 8
    y = np.eye(64, dtype=np.float32)[:8]
    updates = []
    for _ in range(4):
        model.set_weights(initial)
        copies = strategy.experimental_local_results(kernel.value)
        copies[1].assign(3.0 * copies[0].numpy())
        before = [local_copies(strategy, v)[0] for v in model.trainable_variables]
        model.train_on_batch(x, y, np.zeros(8, np.float32))
        after = [local_copies(strategy, v)[0] for v in model.trainable_variables]
        updates.append(
            np.concatenate(
                [(a - b).ravel() for a, b in zip(after, before, strict=True)]
            )
        )
    b = model.dataset_metadata.batch_size
    assert np.std(np.concatenate(updates)) == pytest.approx(
        sigma * larger / b, rel=0.03
    )


def _dynamic_clipless(n):
    """(8, 8, 1) -> 16 classes, ending in a dynamic DP_ClipGradient."""
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(16),
        L.DP_ClipGradient(1.0, mode="dynamic"),
    ]
    return dp_model(layers, num_classes=16, n=n, batch_size=20, sigma=1.0)


def test_dynamic_clipping_runs_under_several_replicas():
    """Under two replicas the clip-value release stopped fit with "train_step
    was called directly while fit runs": its norms went through the train
    step's guards (a review). They are the single device's norms, an
    oversized batch is still refused, and the releases are in the ledger."""
    x, y = _samples(200)
    y = y[:, :16]
    strategy = strategy_of(2)
    with strategy.scope():
        model = _dynamic_clipless(200)
    alone = _dynamic_clipless(200)
    alone.set_weights(model.get_weights())
    clips = dynamic_clip_layers(model)
    with strategy.scope():
        norms, included = clip_layer_gradient_norms(model, clips, x[:20], y[:20])
        limit = model.privacy_plan.max_batch_size()
        big_x, big_y = _samples(limit + 1)
        with pytest.raises(ValueError, match="more samples than"):
            clip_layer_gradient_norms(model, clips, big_x, big_y[:, :16])
    expected, _ = clip_layer_gradient_norms(
        alone, dynamic_clip_layers(alone), x[:20], y[:20]
    )
    np.testing.assert_allclose(norms[0], expected[0], rtol=1e-6)
    assert included.sum() == 20
    batches = poisson_batches(x, y, 20)
    for clipping in (
        AdaptiveQuantileClipping(batches, noise_multiplier=1.0),
        LaplaceAdaptiveLossGradientClipping(batches, epsilon=1.0),
    ):
        model.fit(batches, epochs=2, verbose=0, callbacks=[clipping, DP_Accountant()])
    counts = {(r.name, r.mechanism): r.count for r in model.privacy_plan.ledger()}
    assert counts == {
        ("gradient_steps", "gaussian"): 40,
        ("gaussian", "gaussian"): 2,  # the quantile releases
        ("pure_dp", "pure_dp"): 2,  # the Laplace choices
    }
