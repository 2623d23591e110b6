"""AIJack's DPSGDManager in TensorFlow: lots, batches, the DP optimizer.

Vectors and departures: docs/ports.md, "AIJack".
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats

from deel_lipdp_ext.aijack.dpsgd_manager import DPSGDManager
from deel_lipdp_ext.aijack.moment_accountant import GeneralMomentAccountant


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
    assert len(sizes) == 4000  # every lot, empty or not
    # Chi-square goodness of fit against Binomial(200, 0.1) on pooled bins.
    edges = np.array([0, 14, 16, 18, 20, 22, 24, 26, 201])
    observed = np.histogram(sizes, bins=edges)[0]
    expected = np.diff(stats.binom.cdf(edges - 1, 200, 0.1)) * len(sizes)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, len(observed) - 1) > 1e-3


def test_every_lot_is_a_noisy_step_even_when_empty():
    # q = 1/50: P(empty lot) = 0.98**50 ~ 0.36, so ~73 of the 200 lots are empty.
    recorder = _Recorder()
    manager = _manager(n=50, lot=1, iterations=200, accountant=recorder)
    cls, lot_loader, batch_loader = manager.privatize(noise_multiplier=1.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable([0.0, 0.0])
    optimizer.build([v])
    sizes, before_each_lot = [], []
    for x_lot, y_lot in lot_loader(optimizer):
        sizes.append(len(x_lot))
        before_each_lot.append(v.numpy().copy())
        if len(x_lot) == 0:
            assert x_lot.shape == (0, 3) and y_lot.shape == (0,)
        for _ in batch_loader((x_lot, y_lot)):
            optimizer.step([tf.zeros(2)], [v])
    assert len(sizes) == 200 and sizes.count(0) > 30
    assert len(recorder.steps) == 200
    # Zero gradients: each lot, empty ones included, moved v by its noise.
    moves = np.diff(np.stack([*before_each_lot, v.numpy()]), axis=0)
    assert np.all(np.abs(moves) > 0)


def test_an_empty_lot_before_any_step_needs_a_built_optimizer():
    recorder = _Recorder()
    cls, _, _ = _manager(accountant=recorder).privatize(noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match=r"optimizer\.build"):
        cls(learning_rate=1.0).step_for_lot()
    assert recorder.steps == []
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable(tf.zeros(1000))
    optimizer.build([v])
    optimizer.step_for_lot()  # noise only: std C sigma batch / lot = 1/40
    assert float(tf.math.reduce_std(v)) == pytest.approx(1 / 40, rel=0.15)
    assert len(recorder.steps) == 1


def test_two_optimizers_from_one_seeded_manager_draw_independent_noise():
    manager = _manager(lot=1, batch=1, clip=1.0, seed=0)
    cls, _, _ = manager.privatize(noise_multiplier=1.0)
    n = 20000
    noises = []
    for _ in range(2):
        optimizer = cls(learning_rate=1.0)
        v = tf.Variable(tf.zeros(n))
        optimizer.step([tf.zeros(n)], [v])
        optimizer.step_for_lot()
        noises.append(-v.numpy())
    corr = np.corrcoef(noises[0], noises[1])[0, 1]
    assert abs(corr) < 5 / np.sqrt(n)
    # A second manager from the same seed in this process does not share its
    # noise either (a run is reproduced by running the same program again).
    cls, _, _ = _manager(lot=1, batch=1, clip=1.0, seed=0).privatize(1.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable(tf.zeros(n))
    optimizer.step([tf.zeros(n)], [v])
    optimizer.step_for_lot()
    assert abs(np.corrcoef(-v.numpy(), noises[0])[0, 1]) < 5 / np.sqrt(n)


def test_unseeded_managers_ignore_the_keras_global_seed():
    noises = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        cls, _, _ = _manager(lot=1, seed=None).privatize(noise_multiplier=1.0)
        optimizer = cls(learning_rate=1.0)
        v = tf.Variable(tf.zeros(1000))
        optimizer.build([v])
        optimizer.step_for_lot()
        noises.append(v.numpy())
    assert abs(np.corrcoef(noises[0], noises[1])[0, 1]) < 5 / np.sqrt(1000)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_zero_noise_multiplier_is_refused_before_any_update(sigma):
    recorder = _Recorder()
    manager = _manager(accountant=recorder)
    with pytest.raises(ValueError, match="noise_multiplier"):
        manager.privatize(noise_multiplier=sigma)
    assert recorder.steps == []


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_clip_norm_is_refused_before_any_optimizer(clip):
    with pytest.raises(ValueError, match="l2_norm_clip"):
        _manager(clip=clip)
    manager = _manager()
    manager.l2_norm_clip = clip  # changed after construction
    with pytest.raises(ValueError, match="l2_norm_clip"):
        manager.privatize(noise_multiplier=1.0)


def test_batch_loader_gives_each_example_of_the_lot_in_order():
    manager = _manager(batch=1)
    lot = (np.arange(4), np.arange(4) * 2)
    batches = list(manager.batch_loader(lot))
    assert [b[0].tolist() for b in batches] == [[0], [1], [2], [3]]


def test_micro_batches_of_several_examples_are_refused():
    """Sequential micro-batches of b > 1: removing one record re-cuts every
    later micro-batch (15 C of influence for 16 micro-batches in the review)
    while the noise is calibrated to C."""
    with pytest.raises(ValueError, match="batch_size` must be 1"):
        _manager(batch=3)


def test_step_clips_accumulates_and_step_for_lot_applies_the_mean():
    recorder = _Recorder()
    manager = _manager(lot=4, batch=1, clip=1.0, accountant=recorder)
    # sigma = 0 is refused; at sigma = 1e-12 the noise (std 2.5e-13 after the
    # 1/4 factor) is far below the rtol of 1e-6 on values ~0.2.
    cls, _, _ = manager.privatize(noise_multiplier=1e-12)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable([0.0, 0.0])
    optimizer.step([tf.constant([3.0, 4.0])], [v])  # norm 5 -> clipped to 1
    optimizer.step([tf.constant([0.3, 0.4])], [v])  # norm 0.5 -> kept
    np.testing.assert_array_equal(v.numpy(), [0.0, 0.0])  # step does not update
    # acc = (3, 4) * (1 - 1e-6) / (5 + 1e-6) + (0.3, 0.4) (the clip aims at
    # C (1 - 1e-6)); grad = acc * 1/4; w = -grad.
    small = np.float32([0.3, 0.4]).astype(np.float64)  # the float32 gradient
    acc = np.array([3.0, 4.0]) * (1 - 1e-6) / (5 + 1e-6) + small
    np.testing.assert_allclose(optimizer._accumulators[0].numpy(), acc, rtol=1e-12)
    optimizer.step_for_lot()
    np.testing.assert_allclose(v.numpy(), -acc / 4, rtol=1e-6)
    assert recorder.steps == [({"sigma": 1e-12}, 4 / 400, 1)]
    assert type(optimizer).__name__ == "DPSGD"


def test_noise_std_is_c_sigma_times_batch_over_lot():
    manager = _manager(lot=40, batch=1, clip=0.5)
    cls, _, _ = manager.privatize(noise_multiplier=2.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable(tf.zeros(20000))
    optimizer.step([tf.zeros(20000)], [v])
    optimizer.step_for_lot()
    assert float(tf.math.reduce_std(v)) == pytest.approx(0.5 * 2.0 * 1 / 40, rel=0.03)


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
    # Epsilon depends on sigma, q and the number of lots only.
    manager = DPSGDManager(
        accountant, keras.optimizers.SGD, 1.0, (x, y), 40, 1, 10, seed=0
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
    with pytest.raises(ValueError, match="noise_multiplier"):
        _manager().privatize(noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        _manager(clip=-1.0)
    with pytest.raises(TypeError, match="noise_multiplier"):
        _manager().privatize(noise_multiplier=True)


def test_restoring_a_checkpoint_does_not_replay_the_noise(tmp_path):
    """The noise generator was a tracked attribute of the optimizer: restoring
    a tf.train.Checkpoint restored its state and replayed the noise (corr 1)."""
    cls, _, _ = _manager(lot=1, seed=0).privatize(noise_multiplier=1.0)
    optimizer = cls(learning_rate=1.0)
    v = tf.Variable(tf.zeros(4096))
    optimizer.build([v])
    checkpoint = tf.train.Checkpoint(optimizer=optimizer, v=v)
    path = checkpoint.save(str(tmp_path / "ckpt"))

    def noise(lots):
        draws = []
        for _ in range(lots):
            before = v.numpy().copy()
            optimizer.step_for_lot()  # no step: a noise-only lot
            draws.append(v.numpy() - before)
        return draws

    first = noise(3)
    checkpoint.restore(path)
    again = noise(3)
    corr = np.corrcoef(np.stack([*first, *again]))[:3, 3:]
    assert np.max(np.abs(corr)) < 5 / np.sqrt(4096)


def test_a_checkpoint_never_holds_a_lot_s_noise_free_gradient_sum(tmp_path):
    """The accumulators (the lot's clipped gradient sum, before noise) were
    tracked variables kept after the step: a checkpoint wrote them."""
    manager = _manager(lot=4, batch=1, clip=1.0)
    cls, _, _ = manager.privatize(noise_multiplier=1.0)
    optimizer = cls(learning_rate=0.1)
    v = tf.Variable([0.0, 0.0])
    optimizer.step([tf.constant([0.3, 0.4])], [v])
    optimizer.step_for_lot()
    np.testing.assert_array_equal(optimizer._accumulators[0].numpy(), [0.0, 0.0])
    path = tf.train.Checkpoint(optimizer=optimizer).save(str(tmp_path / "c"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert not any("accumulator" in name for name in names), names


def test_a_manager_drives_only_its_own_optimizers_with_micro_batches_of_one():
    """Manager A's optimizer under manager B's lot_loader drew lots of ~500
    at B's q = 0.5 while recording A's q = 0.01 (1.01 reported for 8.24), and
    batch_size = 8 set after construction cut micro-batches of 8 (a review)."""
    a, b = _manager(n=1000, lot=10), _manager(n=1000, lot=500)
    optimizer_a = a.privatize(1.0)[0](learning_rate=0.1)
    b.privatize(1.0)
    with pytest.raises(ValueError, match="this manager's privatize"):
        next(b.lot_loader(optimizer_a))
    assert next(a.lot_loader(optimizer_a))[0].shape[1] == 3  # its own: fine
    with pytest.raises(AttributeError):
        a.batch_size = 8
    assert a.batch_size == 1


def test_keras_s_own_update_paths_are_refused_and_nothing_moves():
    """`compile(DPSGD)` + `fit` trained with raw gradients (no clipping, no
    noise) while the accountant recorded nothing; so did `apply_gradients`
    (a review)."""
    recorder = _Recorder()
    manager = _manager(lot=8, accountant=recorder)
    cls, _, _ = manager.privatize(noise_multiplier=1.0)
    x, y = manager.x, manager.y.astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(cls(learning_rate=0.1), "mse")
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(RuntimeError, match="no clipping, no noise"):
        model.fit(x, y, epochs=1, verbose=0)
    for w, w0 in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, w0)

    optimizer = cls(learning_rate=1.0)
    v = tf.Variable([1.0, 2.0])
    optimizer.build([v])
    big = tf.constant([100.0, 100.0])
    calls = {
        "apply_gradients": lambda: optimizer.apply_gradients([(big, v)]),
        "apply": lambda: optimizer.apply([big], [v]),
        "stateless_apply": lambda: optimizer.stateless_apply(
            [tf.convert_to_tensor(w) for w in optimizer.variables],
            [big],
            [tf.convert_to_tensor(v)],
        ),
        "update_step": lambda: optimizer.update_step(big, v, 1.0),
        "apply_gradients (traced)": lambda: tf.function(
            lambda: optimizer.apply_gradients([(big, v)])
        )(),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="no clipping, no noise"):
            call()
        np.testing.assert_array_equal(v.numpy(), [1.0, 2.0], err_msg=name)
    assert recorder.steps == []
    # The DP path still updates, and counts.
    optimizer.step([big], [v])
    optimizer.step_for_lot()
    assert not np.array_equal(v.numpy(), [1.0, 2.0])
    assert len(recorder.steps) == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_clipped_share_never_exceeds_c_in_any_gradient_dtype(dtype):
    """Clipped and summed in bfloat16, the gradient (-92, -132, -88, 108)
    added 1.0076 C to the lot's sum (a review); now float64 throughout."""
    manager = _manager(lot=4, clip=1.0)
    cls, _, _ = manager.privatize(noise_multiplier=1.0)
    optimizer = cls(learning_rate=0.1)
    v = tf.Variable(tf.zeros([4], dtype))
    rng = np.random.default_rng(0)
    gradients = [np.array([-92.0, -132.0, -88.0, 108.0])] + [
        rng.normal(size=4) * rng.uniform(1, 100) for _ in range(300)
    ]
    for g in gradients:
        optimizer.zero_grad_for_lot()
        optimizer.step([tf.constant(g, dtype)], [v])
        (acc,) = optimizer._accumulators
        assert acc.dtype == tf.float64
        assert np.linalg.norm(acc.numpy()) <= 1.0
    optimizer.step_for_lot()  # the noisy mean lands in the variable's dtype
    assert v.dtype == tf.as_dtype(dtype) and np.all(np.isfinite(v.numpy()))


@settings(max_examples=60, deadline=None)
@given(
    values=arrays(
        np.float64,
        st.integers(1, 12),
        elements=st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
    ),
    clip=st.floats(1e-3, 1e3),
    dtype=st.sampled_from(["bfloat16", "float16", "float32", "float64"]),
)
def test_property_one_micro_batch_adds_at_most_c(values, clip, dtype):
    manager = _manager(lot=4, clip=clip)
    optimizer = manager.privatize(noise_multiplier=1.0)[0](learning_rate=0.1)
    v = tf.Variable(tf.zeros(values.shape, dtype))
    optimizer.step([tf.cast(values, dtype)], [v])  # may overflow to inf
    (acc,) = optimizer._accumulators
    assert np.linalg.norm(acc.numpy()) <= clip


def test_a_non_finite_gradient_contributes_nothing():
    """0 * inf is NaN: a record whose gradient overflowed made the whole
    model NaN, revealing that it was in the lot."""
    manager = _manager(lot=4, clip=1.0)
    optimizer = manager.privatize(noise_multiplier=1.0)[0](learning_rate=0.1)
    v, w = tf.Variable([0.0, 0.0]), tf.Variable([0.0])
    optimizer.step([tf.constant([0.3, 0.4]), tf.constant([0.0])], [v, w])
    for bad in (np.inf, -np.inf, np.nan):
        optimizer.step([tf.constant([bad, 1.0]), tf.constant([5.0])], [v, w])
    optimizer.step([tf.constant([0.3, 0.4]), None], [v, w])  # None: zero
    np.testing.assert_allclose(optimizer._accumulators[0].numpy(), [0.6, 0.8])
    np.testing.assert_array_equal(optimizer._accumulators[1].numpy(), [0.0])
    with pytest.raises(ValueError, match="variables of the first `step`"):
        optimizer.step([tf.constant([0.3, 0.4])], [tf.Variable([0.0, 0.0])])
