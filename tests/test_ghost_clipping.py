"""Ghost clipping: the clipped sum equals the one-example loop, for every
supported layer, on hypothesis-generated shapes; examples that overflow are
dropped; unsupported networks are refused by name."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deel_lipdp_ext import DPParameters, ghost_clipping
from deel_lipdp_ext.dpsgd import DPSGDModel
from deel_lipdp_ext.ghost_clipping import (
    clipped_gradient_sum,
    ghost_clipping_support,
    uses_fast_rule,
)

from .helpers import metadata

LOSS = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
CLASSES = 3


def _losses(y, y_pred):
    return LOSS(y, y_pred)


def one_example_loop(model, x, y, weights, clip):
    """sum_i w_i min(1, C / ||g_i||) g_i with each g_i from its own
    one-example forward and backward pass (float64 accumulation)."""
    total = [np.zeros(v.shape, np.float64) for v in model.trainable_variables]
    norms = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(
                _losses(y[i : i + 1], model(x[i : i + 1], training=True))
            )
        grads = tape.gradient(
            loss, model.trainable_variables, unconnected_gradients="zero"
        )
        grads = [tf.convert_to_tensor(g).numpy().astype(np.float64) for g in grads]
        norm = np.sqrt(sum(float(np.sum(g**2)) for g in grads))
        norms.append(norm)
        coefficient = weights[i] * min(1.0, clip / norm)
        for k, g in enumerate(grads):
            total[k] += coefficient * g
    return total, np.array(norms)


def assert_ghost_matches_loop(model, x, y, clip=0.5):
    rng = np.random.default_rng(len(x))
    weights = rng.uniform(0.2, 1.0, len(x)).astype(np.float32)
    expected, expected_norms = one_example_loop(model, x, y, weights, clip)
    got = clipped_gradient_sum(
        model, tf.constant(x), tf.constant(y), _losses, tf.constant(weights), clip
    )
    np.testing.assert_allclose(got.norms.numpy(), expected_norms, rtol=1e-5)
    for variable, g, e in zip(
        model.trainable_variables, got.gradients, expected, strict=True
    ):
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(
            g.numpy(), e, rtol=1e-5, atol=1e-5 * scale, err_msg=variable.path
        )
    return got


def _labels(batch, seed):
    return np.eye(CLASSES, dtype=np.float32)[
        np.random.default_rng(seed).integers(0, CLASSES, batch)
    ]


def _inputs(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _head(model_layers, input_shape, dtype="float32"):
    return keras.Sequential(
        [
            keras.Input(input_shape, dtype=dtype),
            *model_layers,
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    )


SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
ACTIVATIONS = st.sampled_from([None, "tanh", "relu"])


@SETTINGS
@given(
    batch=st.integers(1, 6),
    steps=st.integers(1, 9),
    d_in=st.integers(1, 12),
    units=st.integers(1, 12),
    activation=ACTIVATIONS,
    use_bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_dense_on_vectors_and_sequences(
    batch, steps, d_in, units, activation, use_bias, seed
):
    """Covers T = 1, the Gram form (T (d_in + d_out) < d_in d_out) and the
    materialised form."""
    shape = (d_in,) if steps == 1 else (steps, d_in)
    layer = keras.layers.Dense(units, activation=activation, use_bias=use_bias)
    model = _head([layer], shape)
    assert uses_fast_rule(layer)
    assert_ghost_matches_loop(
        model, _inputs((batch, *shape), seed), _labels(batch, seed)
    )


@SETTINGS
@given(
    batch=st.integers(1, 4),
    size=st.integers(7, 10),
    channels=st.integers(1, 3),
    filters=st.integers(1, 5),
    kernel=st.integers(1, 4),
    stride_or_dilation=st.sampled_from([(1, 1), (2, 1), (3, 1), (1, 2)]),
    padding=st.sampled_from(["valid", "same"]),
    activation=ACTIVATIONS,
    seed=st.integers(0, 1000),
)
def test_conv2d(
    batch,
    size,
    channels,
    filters,
    kernel,
    stride_or_dilation,
    padding,
    activation,
    seed,
):
    strides, dilation = stride_or_dilation
    layer = keras.layers.Conv2D(
        filters,
        (kernel, max(1, kernel - 1)),
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        activation=activation,
    )
    model = _head([layer], (size, size + 1, channels))
    assert uses_fast_rule(layer)
    assert_ghost_matches_loop(
        model, _inputs((batch, size, size + 1, channels), seed), _labels(batch, seed)
    )


@SETTINGS
@given(
    batch=st.integers(1, 4),
    length=st.integers(10, 14),
    channels=st.integers(1, 4),
    filters=st.integers(1, 5),
    kernel=st.integers(1, 4),
    stride_or_dilation=st.sampled_from([(1, 1), (2, 1), (1, 3)]),
    padding=st.sampled_from(["valid", "same"]),
    seed=st.integers(0, 1000),
)
def test_conv1d(
    batch, length, channels, filters, kernel, stride_or_dilation, padding, seed
):
    strides, dilation = stride_or_dilation
    layer = keras.layers.Conv1D(
        filters, kernel, strides=strides, dilation_rate=dilation, padding=padding
    )
    model = _head([layer], (length, channels))
    assert uses_fast_rule(layer)
    assert_ghost_matches_loop(
        model, _inputs((batch, length, channels), seed), _labels(batch, seed)
    )


@SETTINGS
@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 5),
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    heads=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_einsum_dense(batch, steps, d_in, d_out, heads, seed):
    layers = [
        keras.layers.EinsumDense(
            "abc,cde->abde", (steps, heads, d_out), bias_axes="de", activation="tanh"
        ),
        keras.layers.Reshape((steps * heads * d_out,)),
        keras.layers.EinsumDense("ab,bc->ac", d_out, bias_axes="c"),
    ]
    model = _head(layers, (steps, d_in))
    assert all(uses_fast_rule(layer) for layer in layers if layer.weights)
    assert_ghost_matches_loop(
        model, _inputs((batch, steps, d_in), seed), _labels(batch, seed)
    )


@SETTINGS
@given(
    batch=st.integers(1, 5),
    length=st.integers(1, 8),
    vocabulary=st.integers(2, 6),
    dim=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_embedding_with_repeated_ids(batch, length, vocabulary, dim, seed):
    """Few ids, so positions of one example share rows (the cross terms).
    Negative ids read from the end of the table, as Keras's take does (a
    review: -1 was measured apart from the last row, then dropped)."""
    layer = keras.layers.Embedding(vocabulary, dim)
    model = _head([layer], (length,), dtype="int32")
    assert uses_fast_rule(layer)
    ids = np.random.default_rng(seed).integers(-vocabulary, vocabulary, (batch, length))
    assert_ghost_matches_loop(model, ids.astype(np.int32), _labels(batch, seed))


@SETTINGS
@given(
    batch=st.integers(1, 5),
    steps=st.integers(1, 4),
    d=st.integers(2, 6),
    seed=st.integers(0, 1000),
)
def test_layer_normalization_and_a_shared_layer_by_the_per_layer_pass(
    batch, steps, d, seed
):
    norm = keras.layers.LayerNormalization()
    shared = keras.layers.Dense(d, activation="tanh")
    inputs = keras.Input((steps, d))
    outputs = keras.layers.Dense(CLASSES)(
        keras.layers.Flatten()(shared(norm(shared(inputs))))
    )
    model = keras.Model(inputs, outputs)
    assert not uses_fast_rule(norm)
    assert_ghost_matches_loop(
        model, _inputs((batch, steps, d), seed), _labels(batch, seed)
    )


def test_nested_models_and_an_unused_branch():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, "tanh")])
    unused = keras.layers.Dense(4)
    inputs = keras.Input((6,))
    _ = unused(inputs)  # built, weights trainable, never reaches the loss
    outputs = keras.layers.Dense(CLASSES)(inner(inputs))
    model = keras.Model(inputs, outputs)
    got = assert_ghost_matches_loop(model, _inputs((5, 6), 1), _labels(5, 1))
    assert len(got.gradients) == len(model.trainable_variables)


def test_every_example_contributes_at_most_c_even_when_its_gradient_is_huge():
    """Alone in a batch, an example's clipped sum is its whole contribution."""
    model = _head([keras.layers.Conv1D(4, 3, activation="tanh")], (8, 2))
    x = (
        _inputs((6, 8, 2), 3)
        * np.array([1, 10, 1e3, 1e5, 1e-3, 0], np.float32)[:, None, None]
    )
    y = _labels(6, 3)
    for i in range(len(x)):
        got = clipped_gradient_sum(
            model, x[i : i + 1], y[i : i + 1], _losses, tf.ones([1]), 0.25
        )
        norm = np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in got.gradients))
        assert norm <= 0.25 * (1 + 1e-6)


def test_an_example_whose_forward_pass_overflows_is_dropped():
    model = _head([keras.layers.Dense(4)], (5,))
    x, y = _inputs((4, 5), 2), _labels(4, 2)
    model.layers[0].kernel.assign(tf.ones([5, 4]))
    x[2] = 3e38  # 5 * 3e38 overflows to inf in the first matmul
    _, loop_norms = one_example_loop(model, x, y, np.ones(4), 0.5)
    assert not np.isfinite(loop_norms[2])  # the logits overflow
    weights = tf.ones([4])
    got = clipped_gradient_sum(model, x, y, _losses, weights, 0.5)
    assert not np.isfinite(got.norms.numpy()[2])
    keep = [0, 1, 3]
    expected, _ = one_example_loop(model, x[keep], y[keep], np.ones(3), 0.5)
    for g, e in zip(got.gradients, expected, strict=True):
        assert np.all(np.isfinite(g.numpy()))
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)


class _BatchCentering(keras.layers.Layer):
    """Subtracts the batch mean: example i's output depends on the others."""

    def call(self, x):
        return x - tf.reduce_mean(x, axis=0, keepdims=True)


def test_networks_that_could_mix_examples_are_refused_by_name():
    x = keras.Input((4,))
    cases = {
        "custom layer": keras.Sequential([x, _BatchCentering(), keras.layers.Dense(3)]),
        "Lambda": keras.Sequential(
            [x, keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(3)]
        ),
        "keras.ops": keras.Model(
            x, keras.layers.Dense(3)(x - keras.ops.mean(x, axis=0, keepdims=True))
        ),
    }
    for name, model in cases.items():
        reason = ghost_clipping_support(model)
        assert reason is not None, name
        with pytest.raises(ValueError, match="not exact"):
            clipped_gradient_sum(
                model, tf.ones([2, 4]), tf.ones([2, 3]), _losses, tf.ones([2]), 1.0
            )
    assert "_batch_centering" in ghost_clipping_support(cases["custom layer"])
    assert ghost_clipping_support(keras.Sequential([x, keras.layers.Dense(3)])) is None


def _small_net():
    """A fresh (4,) -> (3,) dense network: a network belongs to one DP model."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])


def _dpsgd(net, clipping, sigma=1.0):
    model = DPSGDModel(
        net,
        DPParameters(sigma, 1e-5, seed=0),
        metadata((4,), CLASSES, n=100, batch_size=8, sampling="shuffle"),
        l2_norm_clip=0.5,
        clipping=clipping,
    )
    model.compile(keras.optimizers.SGD(1.0), LOSS)
    return model


def test_dpsgd_model_chooses_ghost_where_exact_and_refuses_it_by_name_elsewhere():
    # a fresh network per model: a network belongs to one DP model
    def dense():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(CLASSES)])

    def custom():
        return keras.Sequential(
            [keras.Input((4,)), _BatchCentering(), keras.layers.Dense(CLASSES)]
        )

    assert _dpsgd(dense(), "auto").clipping_method == "ghost"
    assert _dpsgd(dense(), "vectorized").clipping_method == "vectorized"
    assert _dpsgd(custom(), "auto").clipping_method == "vectorized"
    with pytest.raises(ValueError, match="_batch_centering.*clipping='vectorized'"):
        _dpsgd(custom(), "ghost")
    with pytest.raises(ValueError, match="clipping"):
        _dpsgd(dense(), "fast")


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
def test_ghost_and_vectorized_steps_apply_the_same_update(jit):
    """Noise 1e-9: the two methods' updates agree (same clipped sum)."""
    x, y = _inputs((8, 4), 5) * 3, _labels(8, 5)
    updates = {}
    for clipping in ("ghost", "vectorized"):
        keras.utils.set_random_seed(0)
        net = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(CLASSES),
            ]
        )
        model = _dpsgd(net, clipping, sigma=1e-9)
        model.compile(keras.optimizers.SGD(1.0), LOSS, jit_compile=jit)
        before = [v.numpy().copy() for v in net.trainable_variables]
        model.train_on_batch(x, y)
        updates[clipping] = [
            v.numpy() - b for v, b in zip(net.trainable_variables, before, strict=True)
        ]
    for g, v in zip(updates["ghost"], updates["vectorized"], strict=True):
        np.testing.assert_allclose(g, v, rtol=1e-4, atol=1e-6)


def test_clipping_survives_a_keras_save_and_load(tmp_path):
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(CLASSES)])
    model = _dpsgd(net, "vectorized")
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.clipping == "vectorized"


def test_layers_without_a_fast_rule_get_the_per_layer_pass():
    """Unknown spatial size, grouped and causal convolutions, wrappers and
    recurrent layers: exact through the per-layer vectorised pass."""
    cases = [
        (
            keras.Sequential(
                [
                    keras.Input((None, None, 2)),
                    keras.layers.Conv2D(3, 3, activation="tanh"),
                    keras.layers.GlobalAveragePooling2D(),
                    keras.layers.Dense(CLASSES),
                ]
            ),
            (7, 6, 2),
        ),
        (_head([keras.layers.Conv2D(4, 2, groups=2)], (6, 6, 2)), (6, 6, 2)),
        (_head([keras.layers.Conv1D(3, 3, padding="causal")], (7, 2)), (7, 2)),
        (
            _head([keras.layers.TimeDistributed(keras.layers.Dense(3))], (4, 5)),
            (4, 5),
        ),
        (_head([keras.layers.SimpleRNN(4)], (5, 3)), (5, 3)),
    ]
    for model, shape in cases:
        assert ghost_clipping_support(model) is None, model.name
        assert_ghost_matches_loop(model, _inputs((4, *shape), 7), _labels(4, 7))


def test_a_layer_shared_with_a_nested_model_is_counted_once():
    shared = keras.layers.Dense(5, activation="tanh")
    inner = keras.Sequential([keras.Input((5,)), shared])
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(CLASSES)(inner(shared(inputs)))
    model = keras.Model(inputs, outputs)
    assert_ghost_matches_loop(model, _inputs((4, 5), 8), _labels(4, 8))


def _linear_loss(y, y_pred):
    """delta at the output = y: the labels choose the output gradients."""
    return tf.reduce_sum(y * tf.reshape(y_pred, tf.shape(y)), axis=1)


def _cancelling_rows(rng, width, rows):
    """Output-gradient rows d, -d, ..., -d + e (|d| ~ 1e4, |e| ~ 0.1 to 30):
    an example whose row terms cancel almost exactly."""
    d = rng.normal(size=width) * 1e4
    e = rng.normal(size=width) * 10 ** rng.uniform(-1, 1.5)
    signs = [1.0 if k % 2 == 0 else -1.0 for k in range(rows)]
    out = np.stack([s * d for s in signs])
    out[-1] = -signs[-2] * d + e if rows > 1 else e
    return out.reshape(1, -1).astype(np.float32)


def _contribution(model, x, y, clip=1.0):
    got = clipped_gradient_sum(model, x, y, _linear_loss, tf.ones([1]), clip)
    return float(
        np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in got.gradients))
    )


def test_an_example_whose_rows_cancel_still_contributes_at_most_c():
    """A review found contributions of 166 C (Dense on rows), 213 C (Conv2D)
    and 23 C (Embedding, one id twice): float32 rounding of the Gram terms
    <a_t, a_t'> <delta_t, delta_t'> gave norms near 0 when the rows cancel."""
    rng = np.random.default_rng(0)
    dense = keras.Sequential(
        [
            keras.Input((2, 16)),
            keras.layers.Dense(16, use_bias=False),
            keras.layers.Flatten(),
        ]
    )
    conv = keras.Sequential(
        [
            keras.Input((3, 3, 8)),
            keras.layers.Conv2D(32, 2, use_bias=False),
            keras.layers.Flatten(),
        ]
    )
    embedding = keras.Sequential(
        [
            keras.Input((2,), dtype="int32"),
            keras.layers.Embedding(10, 16),
            keras.layers.Flatten(),
        ]
    )
    worst = 0.0
    for _ in range(40):
        a = rng.normal(size=16).astype(np.float32)
        worst = max(
            worst,
            _contribution(dense, np.stack([a, a])[None], _cancelling_rows(rng, 16, 2)),
        )
        patch = np.broadcast_to(rng.normal(size=8), (3, 3, 8))[None].astype(np.float32)
        worst = max(worst, _contribution(conv, patch, _cancelling_rows(rng, 32, 4)))
        ids = np.array([[3, 3]], np.int32)
        worst = max(worst, _contribution(embedding, ids, _cancelling_rows(rng, 16, 2)))
    assert worst <= 1.0 + 1e-6


def test_built_in_layers_that_mix_examples_are_refused_by_name():
    """A review found these accepted, with a replace-one sensitivity of
    2 C (B - 1) for a batch-centring activation."""

    def centring(t):
        return t - keras.ops.mean(t, axis=0, keepdims=True)

    x = keras.Input((4, 3))
    mixing = {
        "Softmax(axis=0)": keras.layers.Softmax(axis=0),
        "UnitNormalization(axis=0)": keras.layers.UnitNormalization(axis=0),
        "Softmax(axis=-3)": keras.layers.Softmax(axis=-3),
        "Activation(custom)": keras.layers.Activation(centring),
        "Dense(custom activation)": keras.layers.Dense(3, activation=centring),
        "MixUp": keras.layers.MixUp(),
        "BatchNormalization": keras.layers.BatchNormalization(),
    }
    for name, layer in mixing.items():
        model = keras.Sequential(
            [x, layer, keras.layers.Flatten(), keras.layers.Dense(2)]
        )
        reason = ghost_clipping_support(model)
        assert reason is not None and layer.name in reason, name
    stateful = keras.Sequential(
        [keras.Input((4, 3), batch_size=2), keras.layers.SimpleRNN(2, stateful=True)]
    )
    assert "stateful" in ghost_clipping_support(stateful)
    attention_in = keras.Input((4, 3))
    batch_attention = keras.layers.MultiHeadAttention(2, 2, attention_axes=(0,))
    model = keras.Model(
        attention_in,
        keras.layers.Flatten()(batch_attention(attention_in, attention_in)),
    )
    assert "axis" in ghost_clipping_support(model)
    fine = keras.Sequential(
        [
            x,
            keras.layers.Softmax(axis=-1),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3, activation="gelu"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    assert ghost_clipping_support(fine) is None


def test_weights_outside_0_1_cannot_raise_a_contribution_above_c():
    model = _head([keras.layers.Dense(4)], (5,))
    x, y = _inputs((4, 5), 4) * 100, _labels(4, 4)
    for weight in (5.0, -3.0, np.nan, np.inf):
        got = clipped_gradient_sum(
            model, x[:1], y[:1], _losses, tf.constant([weight], tf.float32), 0.5
        )
        norm = np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in got.gradients))
        assert norm <= 0.5 * (1 + 1e-6), weight


def test_huge_inputs_with_tiny_gradients_keep_their_norm():
    """||a|| ||delta|| from squared sums: 1e19^2 overflows and 1e-19^2
    flushes to zero, while every product a_k delta_o is about 1."""
    for d_in, d_out, big, tiny in ((3, 1000, 1e19, 1e-19), (1000, 3, 1e-19, 1e19)):
        model = keras.Sequential([keras.Input((d_in,)), keras.layers.Dense(d_out)])
        x = np.full((1, d_in), big, np.float32)
        y = np.full((1, d_out), tiny, np.float32)
        got = clipped_gradient_sum(model, x, y, _linear_loss, tf.ones([1]), 1.0)
        norm = np.sqrt(sum(float(tf.reduce_sum(tf.square(g))) for g in got.gradients))
        assert norm <= 1.0 + 1e-6, (d_in, d_out, norm)


def test_second_review_mixing_networks_are_refused():
    """Found accepted by a second review, each moving example 0's
    contribution by 0.2 to 1.6 C when only the other examples changed."""
    vector = keras.Input((3,))
    query = keras.Input((4, 3))
    scalar = keras.Input(())
    cases = {
        "softmax on a batch-only output": keras.Sequential(
            [vector, keras.layers.EinsumDense("ab,b->a", (), activation="softmax")]
        ),
        "attention axis -7 (wraps to the batch)": keras.Model(
            query,
            keras.layers.Flatten()(
                keras.layers.MultiHeadAttention(2, 3, attention_axes=(-7,))(
                    query, query
                )
            ),
        ),
        "Masking on a batch-only input": keras.Sequential(
            [
                scalar,
                keras.layers.Masking(5.0),
                keras.layers.Reshape((1,)),
                keras.layers.Dense(2),
            ]
        ),
        "Softmax inside TimeDistributed": keras.Sequential(
            [
                query,
                keras.layers.TimeDistributed(keras.layers.Softmax(axis=-1)),
                keras.layers.Flatten(),
            ]
        ),
        "EinsumDense moving the batch into the features": keras.Sequential(
            [
                keras.Input(batch_shape=(4, 3)),
                keras.layers.EinsumDense("ab,bc->ca", (4,)),
            ]
        ),
    }
    for name, model in cases.items():
        assert ghost_clipping_support(model) is not None, name


def test_an_embedding_row_shared_by_thousands_of_positions_contributes_at_most_c():
    """Adding n float32 copies of R / n overshot C by 1e-4 at n = 4096; the
    row is now measured and added once."""
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((4096,), dtype="int32"),
            keras.layers.Embedding(3, 4),
            keras.layers.Flatten(),
        ]
    )
    ids = np.full((1, 4096), 2, np.int32)
    for _ in range(3):
        y = rng.normal(size=(1, 4096 * 4)).astype(np.float32)
        assert _contribution(model, ids, y) <= 1.0 + 1e-6


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_labels_outnumbering_the_inputs_count_each_input_row_once(layer):
    """One input row with 16 label rows broadcasts to 16 losses: the clipped
    sum holds one example's contribution (at most C), not 16 copies of it,
    and non-finite dropped rows still never reach it."""
    if layer == "dense":
        net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
        x = np.full((1, 6), 3.0, np.float32)
    else:
        net = keras.Sequential(
            [keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3), keras.layers.Flatten()]
        )
        x = np.full((1, 6, 6, 2), 3.0, np.float32)
    out = net.output_shape[-1]
    y = np.eye(out, dtype=np.float32)[np.arange(16) % out]
    clip = 0.5

    def squared_errors(y, y_pred):  # broadcasts (16, k) against (1, k)
        return tf.reduce_sum(tf.square(y - y_pred), axis=-1)

    step = clipped_gradient_sum(
        net, tf.constant(x), tf.constant(y), squared_errors, tf.ones(16), clip
    )
    total = np.sqrt(sum(float(tf.reduce_sum(g**2)) for g in step.gradients))
    assert total <= clip * (1 + 1e-6)


def test_tensor_float_32_is_turned_off_before_the_clipped_sum(monkeypatch):
    """A review: on an H100 TensorFlow runs float32 matmuls in TF32 by default,
    whose rounding put contributions up to 1.0005 C (emulated). Where it is
    possible, clipped_gradient_sum turns it off (its sums are matmuls)."""
    import deel_lipdp_ext._keras_utils as keras_utils

    net = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    x = np.full((1, 6), 100.0, np.float32)
    y = np.eye(4, dtype=np.float32)[:1]
    monkeypatch.setattr(keras_utils, "tensor_float_32_possible", lambda: True)
    try:
        with pytest.warns(UserWarning, match="TensorFloat-32 execution turned off"):
            step = clipped_gradient_sum(
                net, tf.constant(x), tf.constant(y), _losses, tf.ones(1), 1.0
            )
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)
    total = np.sqrt(sum(float(tf.reduce_sum(g**2)) for g in step.gradients))
    assert total == pytest.approx(1.0, rel=1e-5)


def test_layers_with_internal_dropout_take_the_vectorised_path():
    """A review: the per-layer backward pass of an LSTM or attention with
    dropout drew other masks than the forward pass (sums off by 38-107%)."""
    net = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.LSTM(4, dropout=0.5), keras.layers.Dense(2)]
    )
    assert "dropout" in ghost_clipping_support(net)
    calm = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.LSTM(4), keras.layers.Dense(2)]
    )
    assert ghost_clipping_support(calm) is None


def test_a_loss_over_the_batch_axis_is_refused():
    """A review: CosineSimilarity(axis=0) made each example's loss depend on
    the others (replace-one 3.9 C against 2 C under ghost clipping)."""
    model = DPSGDModel(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)]),
        DPParameters(1.0, 1e-5, seed=1),
        metadata(
            input_shape=(4,), num_classes=4, n=64, batch_size=8, sampling="shuffle"
        ),
        l2_norm_clip=1.0,
    )
    model.compile(keras.optimizers.SGD(0.1), keras.losses.CosineSimilarity(axis=0))
    x = np.ones((8, 4), np.float32)
    with pytest.raises(ValueError, match="reduces over axis=0, the batch"):
        model.train_on_batch(x, x)


@pytest.mark.parametrize("clipping", ["ghost", "auto"])
def test_a_loss_axis_is_read_on_the_predictions_the_loss_sees(clipping):
    """A review: CosineSimilarity(axis=-2) on (B, T, 1) predictions with
    (B, T) labels passed the axis check, but Keras's loss squeezes the
    predictions to (B, T) first, where -2 is the batch axis: each loss was a
    cosine over the batch (4.38 C for one removed example at B = 64; T = 8
    at B = 8: 2.42 C against the replace-one bound 2 C). Values of another
    length than the batch are refused too."""
    steps = 3
    model = DPSGDModel(
        keras.Sequential(
            [
                keras.Input((steps, 4)),
                keras.layers.Dense(8, "tanh"),
                keras.layers.Dense(1),
            ]
        ),
        DPParameters(1.0, 1e-5, seed=1),
        metadata(
            input_shape=(steps, 4),
            num_classes=steps,
            n=64,
            batch_size=8,
            sampling="shuffle",
        ),
        l2_norm_clip=1.0,
        clipping=clipping,
    )
    model.compile(keras.optimizers.SGD(0.1), keras.losses.CosineSimilarity(axis=-2))
    x = np.random.default_rng(0).normal(size=(8, steps, 4)).astype(np.float32)
    y = np.ones((8, steps), np.float32)
    with pytest.raises(ValueError, match="reduces over axis=-2, the batch"):
        model.train_on_batch(x, y)

    def per_step_losses(y_true, y_pred):  # (T,) values: one per step, not per example
        return tf.reduce_sum(tf.square(y_true - y_pred[..., 0]), axis=0)

    # ghost refuses any loss function; auto takes the vectorised path
    match = (
        "is not known to compute" if clipping == "ghost" else "one value per example"
    )
    with pytest.raises(ValueError, match=match):
        model.compile(keras.optimizers.SGD(0.1), per_step_losses)
        model.train_on_batch(x, y)


def test_a_huge_input_with_a_tiny_gradient_contributes_its_whole_clip():
    """A review: the dense rule formed c * delta before the product with the
    input; for an input of 1e37 and an output gradient of 1e-37 clipped to
    C = 1e-3, c * delta (1e-40) flushed to zero and the example gave 0 C
    (0.79 C in fit). Rows are scaled first now."""
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    net.layers[0].kernel.assign([[1.0]])
    x = np.full((1, 1), 1e37, np.float32)

    def tiny_losses(y, y_pred):
        return 1e-37 * tf.reduce_sum(y_pred * y, axis=-1)

    step = clipped_gradient_sum(
        net, tf.constant(x), tf.ones((1, 1)), tiny_losses, tf.ones(1), 1e-3
    )
    assert float(tf.norm(step.gradients[0])) == pytest.approx(1e-3, rel=1e-5)


# ============================= fourth review (stop 30): a fresh adversary
def _released_sum(net_fn, loss, x, y, clipping, num_classes):
    """(model, update(rows)): update(rows) trains a fresh DPSGDModel(clipping)
    (sigma ~ 0) on rows of (x, y) and returns the released sum (the update
    times B), per variable."""
    batch = len(x)

    def update(rows):
        keras.utils.set_random_seed(0)
        net = net_fn()
        model = DPSGDModel(
            net,
            DPParameters(1e-7, 1e-5, seed=0),
            metadata(
                x.shape[1:],
                num_classes,
                n=100 * batch,
                batch_size=batch,
                sampling="shuffle",
            ),
            l2_norm_clip=1.0,
            clipping=clipping,
        )
        model.compile(keras.optimizers.SGD(1.0), loss=loss)
        before = [v.numpy().astype(np.float64) for v in net.trainable_variables]
        model.train_on_batch(x[rows], y[rows])
        after = [v.numpy().astype(np.float64) for v in net.trainable_variables]
        return model, [(b - a) * batch for b, a in zip(before, after, strict=True)]

    return update


def _distance(a, b) -> float:
    return float(np.sqrt(sum(np.sum((u - v) ** 2) for u, v in zip(a, b, strict=True))))


def _one_example_effect(clipping, loss, batch=8, seed=1):
    """Largest change of the released sum (sigma ~ 0) when one example is
    removed, in units of C, for DPSGDModel(clipping) trained by `loss`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 4)).astype(np.float32)
    y = rng.integers(0, 2, batch).astype(np.int32)

    def net():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])

    update = _released_sum(net, loss, x, y, clipping, 3)
    model, full = update(list(range(batch)))
    effects = [
        _distance(full, update([i for i in range(batch) if i != k])[1])
        for k in range(batch)
    ]
    return model, max(effects)


def test_a_loss_that_compares_examples_takes_the_vectorised_path():
    """keras.losses.Circle compares the examples of a batch; ghost clipping
    differentiates the summed loss, so one example moved the others'
    gradients: 3.1 C at B = 32, 64 C at B = 128. Unknown losses (one's own
    function) go to the vectorised path, which evaluates each example alone."""
    model, effect = _one_example_effect("auto", keras.losses.Circle())
    assert model.clipping_method == "vectorized"
    assert effect <= 1.0 + 1e-4
    _, effect = _one_example_effect("auto", "circle")
    assert effect <= 1.0 + 1e-4
    own = _dpsgd(_small_net(), "auto")
    own.compile(keras.optimizers.SGD(1.0), loss=lambda y, p: tf.reduce_sum(p, -1))
    assert own.clipping_method == "vectorized"
    with pytest.raises(ValueError, match="Circle is not known"):
        _dpsgd(_small_net(), "ghost").compile(
            keras.optimizers.SGD(1.0), keras.losses.Circle()
        )
    for name in ("categorical_crossentropy", "mse"):
        known = _dpsgd(_small_net(), "ghost")
        known.compile(keras.optimizers.SGD(1.0), loss=name)
        assert known.clipping_method == "ghost"


def test_a_layer_inside_two_wrappers_takes_the_vectorised_path():
    """One Dense inside two TimeDistributed: two ghost units owned its
    kernel, each clipped its part, and the sum kept only the last unit's
    (3.69 of a true 7.38)."""
    inner = keras.layers.Dense(2)
    x = keras.Input((3, 4))
    y = keras.layers.Add()(
        [keras.layers.TimeDistributed(inner)(x), keras.layers.TimeDistributed(inner)(x)]
    )
    net = keras.Model(x, keras.layers.Flatten()(y))
    assert "share the weight" in ghost_clipping_support(net)


def test_einsum_equations_without_an_exact_rule_are_refused():
    """A repeated kernel letter crashed the rule; a bias over the batch
    letter (fixed batch) gave a wrongly shaped gradient."""
    for equation, bias_axes, shape in (
        ("ab,bb->ab", None, (3,)),
        ("ab,bc->ac", "ac", (3,)),
    ):
        x = keras.Input(shape, batch_size=5)
        layer = keras.layers.EinsumDense(equation, (3,), bias_axes=bias_axes)
        net = keras.Model(x, layer(x))
        assert "equation" in ghost_clipping_support(net)


def test_a_stateful_layer_and_a_vanishing_clip_are_refused():
    """A stateful RNN carried one step's data into the next step without
    noise (1.3 C on the next clipped sum); a clip of 1e-25 clipped nothing
    (squares flushed to zero: 1e6 C)."""
    net = keras.Sequential(
        [
            keras.Input((5, 3), batch_size=1),
            keras.layers.SimpleRNN(4, stateful=True),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(ValueError, match="stateful"):
        DPSGDModel(net, DPParameters(1.0, 1e-5), metadata((5, 3), 3), 1.0)
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="l2_norm_clip"):
        DPSGDModel(dense, DPParameters(1.0, 1e-5), metadata((4,), 3), 1e-25)


def test_an_allowed_loss_with_its_function_replaced_is_not_trusted():
    """A MeanSquaredError whose fn was replaced by one that centres the batch
    passed the type check and ran ghost clipping (3.19 C)."""
    loss = keras.losses.MeanSquaredError()
    loss.fn = lambda y, p: tf.reduce_mean(tf.square(p - tf.reduce_mean(p, 0) - y), -1)
    model = _dpsgd(_small_net(), "auto")
    model.compile(keras.optimizers.SGD(1.0), loss=loss)
    assert model.clipping_method == "vectorized"
    with pytest.raises(ValueError, match="MeanSquaredError is not known"):
        _dpsgd(_small_net(), "ghost").compile(keras.optimizers.SGD(1.0), loss=loss)


def test_a_dp_loss_with_a_method_replaced_is_not_trusted():
    """A DP loss whose _labels, replaced on the instance, centred the batch
    ran ghost clipping (2.75 C)."""
    from deel_lipdp_ext import losses

    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    loss = losses.DP_MeanAbsoluteError()
    loss._labels = lambda y_true, y_pred: y_true - tf.reduce_mean(y_true, 0)
    model = _dpsgd(net, "auto")
    model.compile(keras.optimizers.SGD(1.0), loss=loss)
    assert model.clipping_method == "vectorized"


def _removal_effect(net_fn, loss, x, y, clipping):
    """Change of the released sum (sigma ~ 0, in units of C) when the last
    example is removed, for DPSGDModel(clipping) with `loss`."""
    update = _released_sum(net_fn, loss, x, y, clipping, 2)
    model, full = update(np.arange(len(x)))
    return model, _distance(full, update(np.arange(len(x) - 1))[1])


def test_hinge_losses_take_the_vectorised_path():
    """Keras maps hinge labels {0, 1} to {-1, 1} only if every label of the
    batch is 0 or 1: one label of 0.5 changed every other example's loss,
    and ghost clipping (which differentiates the summed loss) let it move
    the sum by 10.9 C at B = 64 (a review)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.integers(0, 2, (32, 1)).astype(np.float32)
    y[-1] = 0.5  # the example removed

    def net():
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, "tanh"), keras.layers.Dense(1)]
        )

    for loss in ("hinge", "squared_hinge", keras.losses.Hinge()):
        model, effect = _removal_effect(net, loss, x, y, "auto")
        assert model.clipping_method == "vectorized", loss
        assert effect <= 1.0 + 1e-4, (loss, effect)
    with pytest.raises(ValueError, match="not known"):
        _dpsgd(_small_net(), "ghost").compile(
            keras.optimizers.SGD(1.0), keras.losses.SquaredHinge()
        )


def test_attention_over_rank_2_inputs_is_refused():
    """Attention()([h, h]) on (batch, d) scores (batch, batch): every example
    is mixed into the others (34.9 C for one example at B = 64 under ghost
    clipping; AdditiveAttention 21.7 C; a review)."""
    vector = keras.Input((6,))
    sequence = keras.Input((4, 6))
    for attention in (keras.layers.Attention, keras.layers.AdditiveAttention):
        hidden = keras.layers.Dense(6)(vector)
        flat = keras.Model(vector, keras.layers.Dense(1)(attention()([hidden, hidden])))
        assert "attends over the axis before the features" in ghost_clipping_support(
            flat
        )
        mixed = keras.Model(
            [sequence, vector],
            keras.layers.Flatten()(attention()([sequence, vector])),
        )
        assert ghost_clipping_support(mixed) is not None
        over_steps = keras.Model(
            sequence, keras.layers.Flatten()(attention()([sequence, sequence]))
        )
        assert ghost_clipping_support(over_steps) is None  # rank 3: per example

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)

    def net():
        inputs = keras.Input((6,))
        hidden = keras.layers.Dense(6)(inputs)
        return keras.Model(
            inputs, keras.layers.Dense(1)(keras.layers.Attention()([hidden, hidden]))
        )

    model, effect = _removal_effect(net, "mse", x, y, "auto")
    assert model.clipping_method == "vectorized"
    assert effect <= 1.0 + 1e-4


def test_labels_broadcast_along_the_class_axis_are_refused():
    """Labels (B,) against predictions (B, B): Keras broadcasts the label
    vector along the class axis, so on a batch every example's MSE read every
    label, and one record moved the ghost-clipped sum by 44.7 C at B = 32
    (a review). Ghost clipping refuses such labels; the vectorised path,
    which evaluates each example alone, keeps them within C."""
    rng = np.random.default_rng(0)
    batch = 16
    x = rng.uniform(0.5, 1.0, size=(batch, 4)).astype(np.float32)
    y = rng.normal(size=(batch,)).astype(np.float32)
    y[-1] = 1e3  # the example removed

    def net(units=batch):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])

    for loss in ("mse", keras.losses.Huber(), keras.losses.CosineSimilarity()):
        for clipping in ("ghost", "auto"):
            with pytest.raises(ValueError, match="read the other examples' labels"):
                _removal_effect(net, loss, x, y, clipping)
        _, effect = _removal_effect(net, loss, x, y, "vectorized")
        assert effect <= 1.0 + 1e-4, (loss, effect)
    # Labels of the predictions' shape, (B,) for one output, sparse ids: fine.
    model, effect = _removal_effect(lambda: net(1), "mse", x, y, "ghost")
    assert model.clipping_method == "ghost" and effect <= 1.0 + 1e-4
    ids = rng.integers(0, 3, batch)
    _removal_effect(lambda: net(3), "sparse_categorical_crossentropy", x, ids, "ghost")
    one_hot = np.eye(3, dtype=np.float32)[ids]
    _removal_effect(lambda: net(3), "mse", x, one_hot, "ghost")


def test_attention_masks_do_not_count_as_attended_inputs():
    """(batch, steps) padding masks passed to attention were counted as rank-2
    inputs, and a per-example network was refused (a review)."""
    sequence = keras.Input((5, 8))
    mask = keras.Input((5,), dtype="bool")
    attention = keras.layers.Attention()([sequence, sequence], mask=[mask, mask])
    model = keras.Model([sequence, mask], keras.layers.Flatten()(attention))
    assert ghost_clipping_support(model) is None
    heads = keras.layers.MultiHeadAttention(2, 4)(
        sequence, sequence, query_mask=mask, value_mask=mask
    )
    model = keras.Model([sequence, mask], keras.layers.Flatten()(heads))
    assert ghost_clipping_support(model) is None


def test_loss_functions_get_keras_s_squeeze_before_any_check():
    """`loss="poisson"`, "kl_divergence" and "categorical_hinge" (functions)
    do not squeeze: (B,) labels against (B, 1) predictions broadcast to
    (B, B) and every loss read every label (6.9, 16.2 and 10.4 C under ghost
    clipping; a review)."""
    rng = np.random.default_rng(0)
    batch = 16
    x = rng.uniform(0.5, 1.0, size=(batch, 4)).astype(np.float32)
    y = rng.uniform(0.1, 1.0, size=(batch,)).astype(np.float32)
    y[-1] = 50.0  # the example removed

    def net():
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(1, activation="softplus")]
        )

    for loss in (
        "poisson",
        "kl_divergence",
        "categorical_hinge",
        "binary_crossentropy",
    ):
        for clipping in ("auto", "vectorized"):
            labels = np.clip(y, 0, 1) if loss == "binary_crossentropy" else y
            _, effect = _removal_effect(net, loss, x, labels, clipping)
            assert effect <= 1.0 + 1e-4, (loss, clipping, effect)


def test_attention_called_with_keyword_inputs_is_checked_too():
    """`Attention()(inputs=[h, h])` on (batch, d) added no rank, so a shared
    layer also called on rank-3 tensors passed (13.9 C for one example; a
    review); masks passed positionally are not attended inputs."""
    sequence = keras.Input((5, 6))
    vector = keras.Input((6,))
    shared = keras.layers.Attention()
    pooled = keras.layers.GlobalAveragePooling1D()(shared([sequence, sequence]))
    hidden = keras.layers.Dense(6)(vector)
    mixed = shared(inputs=[hidden, hidden])
    model = keras.Model([sequence, vector], keras.layers.Concatenate()([pooled, mixed]))
    assert "attends over the axis" in ghost_clipping_support(model)
    alone = keras.layers.Attention()
    model = keras.Model(vector, alone(inputs=[hidden, hidden]))
    assert ghost_clipping_support(model) is not None
    mask = keras.Input((5,), dtype="bool")
    attention = keras.layers.Attention()([sequence, sequence], [mask, mask])
    model = keras.Model([sequence, mask], keras.layers.Flatten()(attention))
    assert ghost_clipping_support(model) is None
    keyword = keras.layers.Attention()(inputs=[sequence, sequence])
    assert (
        ghost_clipping_support(keras.Model(sequence, keras.layers.Flatten()(keyword)))
        is None
    )


def test_an_attention_mask_of_another_rank_is_refused():
    """A (batch, steps) `attention_mask` on MultiHeadAttention: Keras pads it
    to (1, 1, batch, steps), its batch axis on the query axis, so each
    example's positions were masked by other examples' inputs (3.38 C
    against the replace-one bound of 2 C; a review)."""
    sequence = keras.Input((2, 4))
    mask = keras.layers.Dense(2, activation="relu")(keras.layers.Flatten()(sequence))
    heads = keras.layers.MultiHeadAttention(1, 4)(
        sequence, sequence, attention_mask=mask
    )
    model = keras.Model(sequence, keras.layers.Dense(1)(keras.layers.Flatten()(heads)))
    assert "attention_mask of rank 2" in ghost_clipping_support(model)
    full = keras.Input((2, 2), dtype="bool")  # (batch, T, S): as Keras documents
    heads = keras.layers.MultiHeadAttention(1, 4)(
        sequence, sequence, attention_mask=full
    )
    model = keras.Model([sequence, full], keras.layers.Flatten()(heads))
    assert ghost_clipping_support(model) is None


def test_attention_over_mixed_ranks_or_masked_over_several_axes_is_refused():
    """Masks of the expected rank still mixed examples when MultiHeadAttention
    attended over two axes (Keras padded a (B, S1, S2) value_mask to
    (1, 1, B, S1, 1, S2): other examples' outputs moved by 0.32), and an
    Attention over a rank-3 query and a rank-4 value broadcast one's batch
    axis against the other's (a review)."""
    grid = keras.Input((4, 4, 2))
    value_mask = keras.layers.Reshape((4, 4))(keras.layers.Dense(1, "relu")(grid))
    heads = keras.layers.MultiHeadAttention(1, 2)(grid, grid, value_mask=value_mask)
    model = keras.Model(grid, keras.layers.Flatten()(heads))
    assert "masked while attending over 2 axes" in ghost_clipping_support(model)
    unmasked = keras.layers.MultiHeadAttention(1, 2)(grid, grid)
    assert (
        ghost_clipping_support(keras.Model(grid, keras.layers.Flatten()(unmasked)))
        is None
    )
    query, value = keras.Input((5, 2)), keras.Input((1, 5, 2))
    mixed = keras.layers.Attention()([query, value])
    model = keras.Model([query, value], keras.layers.Flatten()(mixed))
    assert "different ranks" in ghost_clipping_support(model)


def _attention_block(shape):
    """A functional block: MultiHeadAttention of its input over itself."""
    query = keras.Input(shape)
    return keras.Model(query, keras.layers.MultiHeadAttention(2, 4)(query, query))


def test_keras_masks_that_reach_layers_unchecked_are_refused():
    """A review: a Keras mask made outside a nested block (Embedding with
    mask_zero in a Sequential) reached the block's MultiHeadAttention at run
    time, although the block's own graph shows no mask: attending over two
    axes, Keras padded it so that other examples' outputs moved (by
    0.006-0.018). And a (batch, steps) mask given to a Softmax of (batch,
    steps, units) broadcasts across examples when batch = steps = units."""
    layers = keras.layers
    nested = keras.Sequential(
        [
            keras.Input((None, None), dtype="int32"),
            layers.Embedding(7, 4, mask_zero=True),
            _attention_block((None, None, 4)),
            layers.GlobalAveragePooling2D(),
            layers.Dense(1),
        ]
    )
    assert "with a Keras mask" in ghost_clipping_support(nested)
    softmax = keras.Sequential(
        [
            keras.Input((None,), dtype="int32"),
            layers.Embedding(7, 4, mask_zero=True),
            layers.Dense(5),
            layers.Softmax(),
        ]
    )
    assert "gets a mask of rank 2 for inputs of rank [3]" in ghost_clipping_support(
        softmax
    )
    unmasked = keras.Sequential(
        [keras.Input((None,), dtype="int32"), layers.Embedding(7, 4), layers.Dense(5)]
    )
    unmasked.add(layers.Softmax())
    assert ghost_clipping_support(unmasked) is None


def test_the_per_layer_pass_keeps_the_keras_masks_of_its_inputs(monkeypatch):
    """A review: MultiHeadAttention reads its query's Keras mask and then
    removes it, so the per-layer backward pass ran unmasked (sums 0.13-1.76
    off the one-example loop). The mask is recorded before the call and put
    back on each example's inputs. (Such a network, a mask entering a nested
    block, is now refused by the support check, bypassed here to pin the
    pass itself.)"""
    monkeypatch.setattr(ghost_clipping, "ghost_clipping_support", lambda model: None)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 8, mask_zero=True),
            _attention_block((5, 8)),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES),
        ]
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 7, (4, 5)).astype(np.int32)
    ids[:, 3:] = 0
    ids[0, 1:] = 0
    assert_ghost_matches_loop(model, ids, _labels(4, 0), clip=1e6)
    assert_ghost_matches_loop(model, ids, _labels(4, 1), clip=0.05)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_the_one_example_loop(causal):
    """The per-layer pass of MultiHeadAttention (`tf.vectorized_map`) wrote
    (B, 1, T, d) by (d, k) products for its projections, which TensorFlow's
    oneDNN kernel computes wrongly from the fourth example on (a review:
    norms 21% off, then a crash from corrupted memory); such a pass runs in
    a loop instead (`_keras_utils.per_example_map`)."""
    sequence = keras.Input((5, 8))
    heads = keras.layers.MultiHeadAttention(2, 4)(
        sequence, sequence, use_causal_mask=causal
    )
    model = keras.Model(
        sequence, keras.layers.Dense(CLASSES)(keras.layers.Flatten()(heads))
    )
    assert ghost_clipping_support(model) is None
    x = _inputs((6, 5, 8), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the loop's, on oneDNN
        assert_ghost_matches_loop(model, x, _labels(6, 3), clip=1e6)
        assert_ghost_matches_loop(model, x, _labels(6, 4), clip=0.05)
