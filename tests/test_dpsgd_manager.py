"""AIJack's DPSGDManager in TensorFlow: lots, batches, the DP optimizer."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from deel_lipdp_ext.accounting import GeneralMomentAccountant
from deel_lipdp_ext.dpsgd_manager import DPSGDManager


class _Recorder:
    def __init__(self):
        self.steps = []

    def add_step_info(self, params, q, steps):
        self.steps.append((params, q, steps))


def _manager(n=400, lot=40, batch=1, iterations=10, clip=1.0, accountant=None, seed=0):
    x = np.random.default_rng(0).random((n, 3)).astype("float32")
    y = np.arange(n) % 2
    return DPSGDManager(
        accountant or _Recorder(),
        keras.optimizers.SGD,
        clip,
        (x, y),
        lot,
        batch,
        iterations,
        seed=seed,
    )


@pytest.mark.slow
def test_lot_sizes_follow_binomial_n_q():
    manager = _manager(n=200, lot=20, iterations=4000)
    sizes = np.array([len(x) for x, _ in manager._lots()])
    assert len(sizes) == 4000  # P(empty lot) = 0.9**200 ~ 7e-10
    # Chi-square goodness of fit against Binomial(200, 0.1) on pooled bins.
    edges = np.array([0, 14, 16, 18, 20, 22, 24, 26, 201])
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(edges - 1, 200, 0.1)) * len(sizes)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(observed) - 1) > 1e-3


def test_empty_lots_are_skipped():
    manager = _manager(n=50, lot=1, iterations=200)
    sizes = [len(x) for x, _ in manager._lots()]
    assert 0 not in sizes and len(sizes) < 200


def test_batch_loader_is_sequential_and_drops_the_last_short_batch():
    manager = _manager(batch=3)
    lot = (np.arange(10), np.arange(10) * 2)
    batches = list(manager.batch_loader(lot))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_step_clips_accumulates_and_step_for_lot_applies_the_mean():
    recorder = _Recorder()
    manager = _manager(lot=4, batch=1, clip=1.0, accountant=recorder)
    cls, _, _ = manager.privatize(noise_multiplier=0.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable([0.0, 0.0])
    optimizer.step([tf.constant([3.0, 4.0])], [v])  # norm 5 -> clipped to 1
    optimizer.step([tf.constant([0.3, 0.4])], [v])  # norm 0.5 -> kept
    np.testing.assert_array_equal(v.numpy(), [0.0, 0.0])  # step does not update
    optimizer.step_for_lot()
    # acc = (0.6, 0.8)*(1/(1+1e-6)) + (0.3, 0.4); grad = acc * 1/4; w = -grad.
    acc = np.array([0.6, 0.8]) * (5 / (5 + 1e-6)) + np.array([0.3, 0.4])
    np.testing.assert_allclose(v.numpy(), -acc / 4, rtol=1e-6)
    assert recorder.steps == [({"sigma": 0.0}, 4 / 400, 1)]
    assert type(optimizer).__name__ == "DPSGD"


def test_noise_std_is_c_sigma_times_batch_over_lot():
    manager = _manager(lot=40, batch=2, clip=0.5)
    cls, _, _ = manager.privatize(noise_multiplier=2.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable(tf.zeros(20000))
    optimizer.step([tf.zeros(20000)], [v])
    optimizer.step_for_lot()
    assert float(tf.math.reduce_std(v)) == pytest.approx(0.5 * 2.0 * 2 / 40, rel=0.03)


def test_lot_loader_applies_every_lot_including_the_last():
    recorder = _Recorder()
    manager = _manager(lot=40, iterations=5, accountant=recorder)
    cls, lot_loader, batch_loader = manager.privatize(noise_multiplier=0.5)
    optimizer = cls(learning_rate=0.0)
    v = tf.Variable([1.0])
    lots = 0
    for x_lot, y_lot in lot_loader(optimizer):
        lots += 1
        for _ in batch_loader((x_lot, y_lot)):
            optimizer.zero_grad()
            optimizer.step([tf.constant([1.0])], [v])
    assert len(recorder.steps) == lots == 5
    # A break loses the lot being processed.
    for _ in lot_loader(optimizer):
        break
    assert len(recorder.steps) == 5


def test_the_tutorial_loop_trains_and_counts_in_the_accountant():
    accountant = GeneralMomentAccountant(
        noise_type="Gaussian",
        search="ternary",
        precision=0.001,
        order_max=1,
        order_min=72,
        max_iterations=1000,
        bound_type="rdp_upperbound_closedformula",
        backend="python",
    )
    x = np.random.default_rng(0).random((400, 4)).astype("float32")
    y = (x.sum(axis=1) > 2).astype("int64")
    # Micro-batches of 10 (not 1) keep the eager loop short; epsilon depends on
    # sigma, q and the number of lots only.
    manager = DPSGDManager(
        accountant, keras.optimizers.SGD, 1.0, (x, y), 40, 10, 10, seed=0
    )
    cls, lot_loader, batch_loader = manager.privatize(noise_multiplier=0.5)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    optimizer = cls(learning_rate=0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def gradients(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb))
        return tape.gradient(loss, model.trainable_variables)

    for _ in range(10):
        for x_lot, y_lot in lot_loader(optimizer):
            for xb, yb in batch_loader((x_lot, y_lot)):
                optimizer.zero_grad()
                optimizer.step(gradients(xb, yb), model.trainable_variables)
    # 100 lots recorded, as add_step_info({"sigma": 0.5}, 0.1, 100) at once.
    assert accountant.get_epsilon(1e-5) == pytest.approx(35.14997033525883, rel=1e-9)
    accuracy = np.mean(np.argmax(model(x), axis=1) == y)
    assert accuracy > 0.6


def test_refusals():
    with pytest.raises(NotImplementedError, match="smoothing"):
        DPSGDManager(
            _Recorder(),
            keras.optimizers.SGD,
            1.0,
            (np.zeros(4), np.zeros(4)),
            2,
            1,
            1,
            smoothing=True,
        )
    with pytest.raises(TypeError, match="optimizer_cls"):
        DPSGDManager(_Recorder(), "sgd", 1.0, (np.zeros(4), np.zeros(4)), 2, 1, 1)
    with pytest.raises(ValueError, match="same"):
        DPSGDManager(
            _Recorder(), keras.optimizers.SGD, 1.0, (np.zeros(4), np.zeros(3)), 2, 1, 1
        )
    with pytest.raises(ValueError, match="lot_size"):
        _manager(n=10, lot=11)
    cls, _, _ = _manager().privatize(noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="Invalid noise_multiplier"):
        cls(learning_rate=0.1)
    cls, _, _ = _manager(clip=-1.0).privatize(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="Invalid l2_norm_clip"):
        cls(learning_rate=0.1)
