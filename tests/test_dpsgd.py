"""Classical DP-SGD: per-example gradients, clipping, noise and accounting."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext import DPParameters, callbacks
from deel_lipdp_ext._keras_utils import broadcast_batch_matmuls, onednn_enabled
from deel_lipdp_ext.accounting import PrivacySpec, compute_epsilon, make_dp_event
from deel_lipdp_ext.dpsgd import DPSGDModel
from deel_lipdp_ext.layers.base import BOUND_MARGIN
from tests.helpers import metadata

LOSS = keras.losses.CategoricalCrossentropy(from_logits=True)


def _net():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(3, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


def _model(clip=1.0, sigma=1.0, batch_size=16, seed=0, net=None, n=1000, report=True):
    """A compiled DPSGDModel; `n` != 1000 describes arrays fitted with shuffled
    batches of `batch_size` (what `fit` checks)."""
    model = DPSGDModel(
        net or _net(),
        DPParameters(sigma, 1e-5, seed=seed),
        metadata(
            batch_size=batch_size,
            n=n,
            sampling="poisson" if n == 1000 else "shuffle",
        ),
        l2_norm_clip=clip,
        report_train_metrics=report,
    )
    model.compile(keras.optimizers.SGD(0.1), LOSS)
    return model


def _batch(n=6, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (scale * rng.standard_normal((n, 8, 8, 1))).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, n)]
    return x, y


@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_vectorised_per_example_gradients_equal_a_one_example_loop(scale):
    model = _model()
    x, y = _batch(scale=scale)
    model(x)
    grads, _, losses = model.per_example_gradients(x, y)
    variables = model.model.trainable_variables
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(LOSS.call(y[i : i + 1], model.model(x[i : i + 1])))
        assert float(losses[i]) == pytest.approx(float(loss), rel=1e-5)
        for g, ref in zip(grads, tape.gradient(loss, variables), strict=True):
            np.testing.assert_allclose(g[i], ref, rtol=1e-4, atol=1e-6)


def test_an_empty_batch_has_no_per_example_gradient():
    """The one zero row an empty batch runs (TensorFlow's loop cannot stack
    zero examples) is sliced off: nothing of it reaches the clipped sum."""
    model = _model()
    x, y = _batch()
    model(x)
    grads, y_pred, losses = model.per_example_gradients(x[:0], y[:0])
    assert len(losses) == 0 and len(y_pred) == 0
    for g, v in zip(grads, model.model.trainable_variables, strict=True):
        assert tuple(g.shape) == (0, *v.shape)
    clipped, _ = model.clip_per_example(grads)
    noiseless = [tf.reduce_sum(g, axis=0) for g in clipped]
    assert all(float(tf.reduce_max(tf.abs(g))) == 0.0 for g in noiseless)


def _attention_net():
    sequence = keras.Input((8, 8))
    heads = keras.layers.MultiHeadAttention(2, 4)(sequence, sequence)
    return keras.Model(sequence, keras.layers.Dense(10)(keras.layers.Flatten()(heads)))


def _einsum_net():
    return keras.Sequential(
        [
            keras.Input((8, 8)),
            keras.layers.EinsumDense("abc,cde->abde", (8, 2, 4)),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )


@pytest.mark.parametrize("net", [_attention_net, _einsum_net])
def test_per_example_gradients_of_attention_and_einsum_layers_are_each_example_s_own(
    net,
):
    """Vectorised, a per-example (1, T, d) by (d, k) product became a
    (B, 1, T, d) by (d, k) one, which TensorFlow's oneDNN kernel computes
    wrongly from the fourth example on: EinsumDense gradients 29-100% off,
    MultiHeadAttention crashed the process (corrupted memory). Such a model's
    examples run in a loop (`_keras_utils.per_example_map`)."""
    model = _model(net=net(), batch_size=8, n=64)
    x = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(8)]
    model(x)
    _assert_each_example_s_own_gradient(model, x, y)


def _assert_each_example_s_own_gradient(model, x, y):
    """`per_example_gradients` equals a loop over one-example passes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the loop's, on oneDNN
        grads, _, _ = model.per_example_gradients(x, y)
    variables = model.model.trainable_variables
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(LOSS.call(y[i : i + 1], model.model(x[i : i + 1])))
        for g, ref in zip(grads, tape.gradient(loss, variables), strict=True):
            np.testing.assert_allclose(g[i], ref, rtol=1e-4, atol=1e-5)


class _LoopedProjection(keras.layers.Layer):
    """x @ w inside a tf.while_loop: the product sits in a nested function."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3))

    def call(self, x):
        shape = tf.concat([tf.shape(x)[:-1], [3]], 0)
        return tf.while_loop(
            lambda i, total: i < 1,
            lambda i, total: (i + 1, total + tf.matmul(x, self.w)),
            (0, tf.zeros(shape)),
        )[1]


def test_products_in_nested_functions_and_einsums_are_found_too():
    """A review: the first check read the outer graph's batched products only.
    A product inside a while loop's body went unseen (rows 4-7 off by 30-65%,
    or a crash), and so did an Einsum: EinsumDense("ab...,bc->ac...") gave
    per-example gradients 36-409% off, and one replaced example moved the
    clipped sum by 4.3 against the replace-one bound of 2 at B = 32. The
    vectorised graph is now traced apart and never run; a per-example pass
    that itself needs such a product is refused by name."""
    looped = keras.Sequential(
        [keras.Input((5, 8)), _LoopedProjection(), keras.layers.Flatten()]
    )
    looped.add(keras.layers.Dense(10))
    model = _model(net=looped, batch_size=8, n=64)
    x = np.random.default_rng(2).normal(size=(8, 5, 8)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(8)]
    model(x)
    _assert_each_example_s_own_gradient(model, x, y)

    ellipsis = keras.Sequential(
        [
            keras.Input((8, 6, 1)),
            keras.layers.EinsumDense("ab...,bc->ac...", 3),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model = _model(net=ellipsis, batch_size=8, n=64)
    x = np.random.default_rng(3).normal(size=(8, 8, 6, 1)).astype(np.float32)
    if onednn_enabled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises(ValueError, match="each example's own pass"):
                model.per_example_gradients(x, y)


def test_the_products_onednn_computes_wrongly_are_found_in_a_graph():
    """`broadcast_batch_matmuls` reads the graph only (the kernel is never
    run): batched products whose batch axes broadcast at rank >= 4."""
    kernel = tf.ones((8, 3))

    def traced(fn, shape):
        return tf.function(fn).get_concrete_function(tf.TensorSpec(shape)).graph

    per_example = traced(
        lambda x: tf.vectorized_map(lambda xi: tf.matmul(xi[None], kernel), x),
        (6, 5, 8),
    )
    assert broadcast_batch_matmuls(per_example.get_operations())
    for fn, shape in (
        (lambda x: tf.matmul(x, kernel), (6, 5, 8)),  # rank 3
        (lambda x: tf.matmul(x, tf.transpose(x, [0, 1, 3, 2])), (6, 2, 5, 8)),
    ):
        assert not broadcast_batch_matmuls(traced(fn, shape).get_operations())
    unknown = traced(lambda x: tf.matmul(x, tf.ones((1, 1, 8, 3))), (6, 1, 5, 8))
    assert broadcast_batch_matmuls(unknown.get_operations())


@given(
    clip=st.floats(1e-3, 10.0), scale=st.floats(1e-3, 100.0), seed=st.integers(0, 99)
)
def test_every_clipped_gradient_has_norm_at_most_c(clip, scale, seed):
    model = _model(clip=clip)
    x, y = _batch(n=5, scale=scale, seed=seed)
    model(x)
    grads, _, _ = model.per_example_gradients(x, y)
    clipped, norms = model.clip_per_example(grads)
    flat = tf.concat([tf.reshape(g, (5, -1)) for g in clipped], axis=1)
    clipped_norms = np.linalg.norm(flat.numpy().astype(np.float64), axis=1)
    assert np.all(clipped_norms <= clip)  # exact: the clip aims at C (1 - 1e-6)
    # Gradients already inside the ball are left unchanged.
    small = norms.numpy() <= clip * BOUND_MARGIN
    raw = tf.concat([tf.reshape(g, (5, -1)) for g in grads], axis=1).numpy()
    np.testing.assert_allclose(flat.numpy()[small], raw[small], rtol=1e-6)


def test_a_sample_cannot_outweigh_one_over_b_in_a_short_batch():
    # The sum is divided by the expected batch size B=16, not by the 2 examples.
    model = _model(clip=1.0, sigma=0.0 + 1e-12, batch_size=16)
    x, y = _batch(n=2, scale=50.0)
    model(x)
    grads, _, _ = model.per_example_gradients(x, y)
    clipped, _ = model.clip_per_example(grads)
    update = model.noisy_gradient(clipped, tf.ones(2))
    norm = float(tf.linalg.global_norm(update))
    assert norm <= 2 * 1.0 / 16 * (1 + 1e-5)


@pytest.mark.slow
def test_noise_std_is_sigma_c_over_b():
    sigma, clip, batch = 1.3, 0.7, 8
    model = _model(clip=clip, sigma=sigma, batch_size=batch, seed=1)
    x, y = _batch(n=4)
    model(x)
    zeros = [tf.zeros((4, *v.shape)) for v in model.model.trainable_variables]
    draws = np.concatenate(
        [
            np.concatenate(
                [g.numpy().ravel() for g in model.noisy_gradient(zeros, tf.ones(4))]
            )
            for _ in range(40)
        ]
    )
    # ~ 40 * 430 draws: the std within 2%, the mean within 5 standard errors.
    expected = sigma * clip / batch
    assert draws.std() == pytest.approx(expected, rel=0.02)
    assert abs(draws.mean()) < 5 * expected / np.sqrt(draws.size)


def test_fit_reports_the_clipless_event_through_dp_accountant():
    model = _model(batch_size=50, n=200)
    rng = np.random.default_rng(0)
    x = rng.random((200, 8, 8, 1), dtype=np.float32)
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 200)]
    mask = (rng.random(200) < 0.9).astype("float32")
    history = model.fit(
        x,
        y,
        sample_weight=mask,
        batch_size=50,
        epochs=2,
        verbose=0,
        callbacks=[callbacks.DP_Accountant()],
    )
    assert int(model.dp_steps.numpy()) == 8
    (steps,) = model.privacy_plan.ledger()
    assert (steps.count, steps.parameter, steps.sampling_rate) == (8, 1.0, 0.25)
    expected = compute_epsilon(make_dp_event(PrivacySpec(0.25, 8, (1.0,), 1e-5)), 1e-5)
    assert history.history["epsilon"][-1] == pytest.approx(expected)
    assert np.isfinite(history.history["loss"]).all()


def test_training_learns_on_separable_data():
    rng = np.random.default_rng(1)
    x = rng.random((400, 8, 8, 1), dtype=np.float32)
    labels = (x.mean(axis=(1, 2, 3)) > 0.5).astype(int)
    x[labels == 1] += 0.5
    y = np.eye(10, dtype="float32")[labels]
    model = _model(clip=1.0, sigma=0.5, batch_size=50, n=400)
    model.compile(keras.optimizers.SGD(0.5), LOSS, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=50, epochs=4, verbose=0)
    assert history.history["accuracy"][-1] > 0.8


def test_save_and_load_round_trip(tmp_path):
    model = _model(batch_size=6, n=6)
    x, y = _batch()
    model.fit(x, y, batch_size=6, verbose=0)
    path = tmp_path / "dpsgd.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, DPSGDModel) and loaded.l2_norm_clip == 1.0
    assert int(loaded.dp_steps.numpy()) == 1
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    # compiled as saved (a review found compiled=True with no loss): it
    # trains on without a new compile, and its ledger goes on
    assert type(loaded.loss) is type(model.loss)
    loaded.fit(x, y, batch_size=6, verbose=0)
    assert loaded.privacy_plan.steps_taken() == 2


def test_refusals():
    with pytest.raises(ValueError, match="l2_norm_clip"):
        _model(clip=0.0)
    with pytest.raises(ValueError, match="global"):
        DPSGDModel(
            _net(),
            DPParameters(1.0, 1e-5, noisify_strategy="per-layer"),
            metadata(),
            l2_norm_clip=1.0,
        )
    with pytest.raises(TypeError, match="dp_parameters"):
        DPSGDModel(_net(), 1.0, metadata(), l2_norm_clip=1.0)
    net = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.BatchNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    with pytest.raises(ValueError, match="mixes the examples"):
        DPSGDModel(net, DPParameters(1.0, 1e-5), metadata(), l2_norm_clip=1.0)
    model = _model()
    model.compile(keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy())
    model.loss = lambda y, p: tf.reduce_mean(p)
    with pytest.raises(ValueError, match="one value per example"):
        model.train_on_batch(*_batch())


def test_time_distributed_over_an_unknown_number_of_steps_is_refused():
    """Keras (3.15) maps a TimeDistributed layer over as many steps as the
    batch has examples when the time axis is unknown (it reads shape[0]
    before the transpose): a (2, 5, 5, 8) batch gave (2, 2, 5, 3) outputs,
    and each example's own pass (batch 1) used its first step alone
    (per-example norms 61-88% off the one-example loop; a review)."""
    layers = keras.layers
    inner = layers.EinsumDense("abc,cd->abd", (5, 3))
    dynamic = keras.Sequential(
        [
            keras.Input((None, 5, 8)),
            layers.TimeDistributed(inner),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )
    traced = tf.function(
        dynamic.layers[0], input_signature=[tf.TensorSpec((None, None, 5, 8))]
    )
    assert traced(np.ones((2, 5, 5, 8), np.float32)).shape[1] == 2  # Keras's bug
    with pytest.raises(ValueError, match="unknown number of steps"):
        DPSGDModel(dynamic, DPParameters(1.0, 1e-5), metadata(), l2_norm_clip=1.0)
    static = keras.Sequential(
        [
            keras.Input((5, 5, 8)),
            layers.TimeDistributed(layers.EinsumDense("abc,cd->abd", (5, 3))),
            layers.GlobalAveragePooling2D(),
            layers.Dense(10),
        ]
    )
    DPSGDModel(static, DPParameters(1.0, 1e-5), metadata(), l2_norm_clip=1.0)


def test_a_sample_weight_above_one_is_refused():
    # A weight of 2 would double an example's share: over the bound 1/B.
    model = _model()
    x, y = _batch(n=4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="sample weights"):
        model.train_on_batch(x, y, sample_weight=np.array([1.0, 2.0, 1.0, 1.0]))


def test_a_nan_input_is_refused():
    model = _model()
    x, y = _batch(n=4)
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        model.train_on_batch(x, y)


def test_integer_labels_work_with_a_sparse_loss():
    model = _model()
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _batch(n=8)
    logs = model.train_on_batch(x, np.argmax(y, axis=1), return_dict=True)
    assert np.isfinite(logs["loss"])


def test_l2_norm_clip_set_after_construction_is_checked():
    model = _model()
    for bad in (0.0, 1e-30, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="l2_norm_clip"):
            model.l2_norm_clip = bad
    model.l2_norm_clip = 2
    assert model.l2_norm_clip == 2.0


def test_loss_weights_are_refused_not_ignored():
    """A review: compile(loss_weights=[5.0]) was silently ignored (the step
    reads the loss per example)."""
    with pytest.raises(ValueError, match="loss_weights"):
        _model().compile(keras.optimizers.SGD(0.1), LOSS, loss_weights=[5.0])
    with pytest.raises(ValueError, match="loss_weights"):
        _model().compile(keras.optimizers.SGD(0.1), LOSS, [5.0])
