"""Every DP layer: config and .keras round-trip, its bound properties, its errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from deel_lipdp_ext import layers as L

from ..helpers import assert_contraction_at_ties, dp_model, one_hot, unit_samples

# (factory, input shape) for every layer type
LAYERS = [
    (lambda: L.DP_BoundedInput(upper_bound=2.0, enforce_clipping=True), (4, 4, 2)),
    (lambda: L.DP_ClipGradient(clip_value=0.5, mode="dynamic"), (4, 4, 2)),
    (lambda: L.DP_AddBias(norm_max=1.5), (4, 4, 2)),
    (lambda: L.DP_Flatten(), (4, 4, 2)),
    (lambda: L.DP_Reshape((8, 4)), (4, 4, 2)),
    (lambda: L.DP_Permute((2, 1, 3)), (4, 4, 2)),
    (lambda: L.DP_GroupSort(4), (4, 4, 4)),
    (lambda: L.DP_GroupSort(2), (6,)),
    (lambda: L.DP_ReLU(negative_slope=0.2), (4, 4, 2)),
    (lambda: L.DP_MaxPool2D(2), (4, 4, 2)),
    (lambda: L.DP_ScaledL2NormPooling2D(2, padding="same"), (5, 5, 2)),
    (lambda: L.DP_ScaledL2NormPooling1D(3), (9, 2)),
    (lambda: L.DP_ScaledGlobalL2NormPooling2D(), (4, 4, 2)),
    (lambda: L.DP_LayerCentering(), (4, 4, 2)),
    (lambda: L.DP_QuickSpectralDense(5, nm_coef=2.0), (7,)),
    (lambda: L.DP_QuickFrobeniusDense(5), (7,)),
    (lambda: L.DP_SpectralDense(7), (7,)),
    (lambda: L.DP_QuickSpectralConv2D(3, 3, strides=2, padding="valid"), (6, 6, 2)),
    (lambda: L.DP_SpectralConv2D(4, 2, strides=1), (6, 6, 2)),
    (lambda: L.DP_SplitResidual(), (4,)),
    (lambda: L.DP_MergeResidual("add"), None),
    (lambda: L.DP_WrappedResidual(L.DP_QuickSpectralDense(4)), None),
]
GNP = (L.GNPLayer,)


def _ids(item):
    return type(item[0]()).__name__ + str(item[1])


def _call(layer, x):
    if isinstance(layer, L.DP_MergeResidual | L.DP_WrappedResidual):
        return layer((x, x))
    return layer(x)


@pytest.mark.parametrize("factory,shape", LAYERS, ids=[_ids(i) for i in LAYERS])
def test_config_round_trip_same_function(factory, shape):
    shape = shape or (4,)
    layer = factory()
    x = tf.constant(np.random.default_rng(0).normal(size=(3, *shape)), tf.float32)
    out = _call(layer, x)
    clone = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)
    )
    assert type(clone) is type(layer)
    assert clone.get_config() == layer.get_config()
    clone_out = _call(clone, x)
    if layer.weights:
        clone.set_weights(layer.get_weights())
        clone_out = _call(clone, x)
    for a, b in zip(tf.nest.flatten(out), tf.nest.flatten(clone_out), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_every_layer_round_trips_in_a_saved_model(tmp_path):
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_QuickSpectralConv2D(4, 3),
        L.DP_AddBias(1.0),
        L.DP_GroupSort(2),
        L.DP_ReLU(),
        L.DP_LayerCentering(),
        L.DP_SpectralConv2D(4, 2),
        L.DP_ClipGradient(1.0),
        *L.make_residuals("add", [L.DP_QuickSpectralConv2D(4, 3), L.DP_AddBias(0.5)]),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_MaxPool2D(2),
        L.DP_Permute((2, 1, 3)),
        L.DP_Reshape((4, 4)),
        L.DP_ScaledL2NormPooling1D(2),
        L.DP_Flatten(),
        L.DP_SpectralDense(4),
        L.DP_QuickFrobeniusDense(4),
        L.DP_QuickSpectralDense(3),
    ]
    model = dp_model(
        layers,
        input_shape=(8, 8, 1),
        num_classes=3,
        n=20,
        batch_size=10,
        sampling="shuffle",
    )
    x, y = unit_samples(20, (8, 8, 1)), one_hot(np.arange(20), 3)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)
    model.save(tmp_path / "all.keras")
    loaded = keras.models.load_model(tmp_path / "all.keras")
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
    b1, b2 = model.compute_gradient_bounds(), loaded.compute_gradient_bounds()
    in_order = [float(b1[v.path]) for v in model.trainable_variables]
    assert in_order == pytest.approx(
        [float(b2[v.path]) for v in loaded.trainable_variables]
    )


GNP_LAYERS = [(f, s) for f, s in LAYERS if isinstance(f(), GNP)]


@pytest.mark.parametrize("factory,shape", GNP_LAYERS, ids=[_ids(i) for i in GNP_LAYERS])
def test_gnp_layers_are_norm_non_increasing_and_1_lipschitz(factory, shape):
    layer = factory()
    rng = np.random.default_rng(1)
    a = tf.constant(rng.normal(size=(64, *shape)), tf.float32)
    b = a + tf.constant(
        rng.normal(size=(64, *shape)) * rng.choice([1e-3, 1.0]), tf.float32
    )

    def norms(t):
        return np.linalg.norm(np.reshape(t, (64, -1)), axis=1)

    fa, fb = layer(a), layer(b)
    assert np.all(norms(fa) <= norms(a) * (1 + 1e-5))
    assert np.all(norms(fa - fb) <= norms(a - b) * (1 + 1e-5))
    with tf.GradientTape() as tape:
        tape.watch(a)
        out = layer(a)
        g = tf.constant(rng.normal(size=out.shape), tf.float32)
        total = tf.reduce_sum(out * g)
    assert np.all(norms(tape.gradient(total, a)) <= norms(g) * (1 + 1e-5))


@pytest.mark.parametrize("factory,shape", GNP_LAYERS, ids=[_ids(i) for i in GNP_LAYERS])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_gnp_layers_keep_the_gradient_norm_at_ties(factory, shape, seed):
    """Inputs on a grid of three values tie everywhere (zero backgrounds,
    equal biases): the backward pass must stay a contraction there too. A
    GroupSort(2) of minimum/maximum sent both output gradients of a tied
    pair to one entry: sqrt(2) times the output gradient's norm."""
    assert_contraction_at_ties(factory(), shape, seed)


def test_group_sort_gradient_is_a_permutation_of_the_output_gradient():
    layer = L.DP_GroupSort(2)
    inf = float("inf")
    x = tf.constant([[0.0, 0.0, 1.0, 1.0, 3.0, 2.0, -0.0, 0.0, inf, 1.0, inf, inf]])
    g = tf.constant([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(x)
    np.testing.assert_array_equal(out, [[0, 0, 1, 1, 2, 3, 0, 0, 1, inf, inf, inf]])
    np.testing.assert_array_equal(
        tape.gradient(out, x, output_gradients=g),
        [[1, 2, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12]],
    )


def _empirical_lipschitz(layer, shape, iters=60):
    """Power iteration on J^T J of a linear layer (its operator norm)."""
    v = tf.random.normal((1, *shape))
    for _ in range(iters):
        v = v / tf.norm(v)
        with tf.GradientTape() as tape:
            tape.watch(v)
            out = layer(v)
            energy = tf.reduce_sum(out * tf.stop_gradient(out))
        v = tape.gradient(energy, v)  # J^T J v
    return float(tf.sqrt(tf.norm(v)))  # ||J^T J v|| -> sigma_max^2 for unit v


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [(3, 1, "same"), (3, 2, "same"), (2, 2, "valid"), (5, 1, "valid"), (3, 2, "valid")],
)
def test_conv_certified_constant_bounds_the_true_operator_norm(
    kernel, strides, padding
):
    conv = L.DP_QuickSpectralConv2D(3, kernel, strides=strides, padding=padding)
    shape = (10, 10, 2)
    conv.build((None, *shape))
    conv.kernel.assign(conv.kernel * 3.0 + tf.random.normal(conv.kernel.shape) * 0.3)
    true = _empirical_lipschitz(conv, shape)
    certified = float(conv.lipschitz_bound())
    assert true <= certified * (1 + 1e-4)


def test_projection_makes_dense_and_conv_certified_constants_about_one():
    for layer, shape in [
        (L.DP_QuickSpectralDense(6), (9,)),
        (L.DP_SpectralDense(6), (9,)),
        (L.DP_QuickFrobeniusDense(6), (9,)),
        (L.DP_QuickSpectralConv2D(4, 3), (6, 6, 2)),
        (L.DP_SpectralConv2D(4, 3, strides=2), (6, 6, 2)),
    ]:
        layer.build((None, *shape))
        layer.kernel.assign(layer.kernel * 5.0)
        layer.project()
        bound = float(layer.lipschitz_bound())
        assert bound <= 1.0 + 2e-3, type(layer).__name__
        if not isinstance(layer, L.DP_QuickFrobeniusDense):
            assert bound >= 0.99, type(layer).__name__


def test_spectral_dense_projection_is_orthogonal():
    layer = L.DP_SpectralDense(8)
    layer.build((None, 8))
    layer.kernel.assign(tf.random.normal((8, 8)))
    layer.project()
    s = np.linalg.svd(layer.kernel.numpy(), compute_uv=False)
    np.testing.assert_allclose(s, 1.0, atol=2e-2)


def test_clip_gradient_clips_each_sample_to_clip_value():
    clip = L.DP_ClipGradient(clip_value=0.2)
    x = tf.random.normal((4, 3))
    g = tf.constant([[1.0, 0, 0], [0, 0.1, 0], [3.0, 4.0, 0], [0, 0, 0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        total = tf.reduce_sum(clip(x, training=True) * g)
    out = tape.gradient(total, x).numpy()
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms, [0.2, 0.1, 0.2, 0.0], rtol=1e-5)
    assert float(clip.backpropagate_inputs(1.0, 1.0)) == pytest.approx(0.2)
    assert float(clip.backpropagate_inputs(1.0, 0.05)) == pytest.approx(0.05)


def test_clip_gradient_copies_per_sample_are_set_only_as_ints_of_at_least_one():
    """A review: copies_per_sample = 0.1 set on the layer (or in a subclass's
    __init__) clipped each row at 10x the clip value its bound reports (9.9x
    measured)."""
    clip = L.DP_ClipGradient(clip_value=0.2)
    with pytest.raises(AttributeError):
        clip.copies_per_sample = 0.1
    for bad in (0, 0.5, True, 2.0):
        with pytest.raises(ValueError, match="int >= 1"):
            clip.set_copies_per_sample(bad)
    clip._copies = 0.1  # past the API
    with pytest.raises(ValueError, match="copies per sample"):
        clip(tf.ones((2, 3)), training=True)
    clip.set_copies_per_sample(np.int64(4))
    assert clip.copies_per_sample == 4


def test_bounded_input_projects_onto_the_ball():
    layer = L.DP_BoundedInput(upper_bound=0.5)
    x = tf.constant([[3.0, 4.0], [0.1, 0.0], [0.0, 0.0]])
    out = layer(x).numpy()
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    # projected samples land just inside the ball (1e-6 margin against float
    # rounding), never above it; samples inside are unchanged
    assert norms[0] <= 0.5
    np.testing.assert_allclose(norms, [0.5, 0.1, 0.0], rtol=2e-6)
    np.testing.assert_array_equal(out[1:], x.numpy()[1:])


def test_rescaled_samples_never_exceed_the_bound_in_float32():
    from deel_lipdp_ext.data import bound_clip_value, bound_normalize

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 28, 28)).astype(np.float32)
    x[0] = 1e-30  # squares underflow in float32
    x[1] = 3e30  # squares overflow in float32
    for bound in (1.0, 0.3, 7.0):
        for fn in (bound_normalize(bound), bound_clip_value(bound)):
            norms = np.linalg.norm(fn(x).astype(np.float64).reshape(2000, -1), axis=1)
            assert norms.max() <= bound
        layer = L.DP_BoundedInput(upper_bound=bound)
        out = layer(tf.constant(x.reshape(2000, -1))).numpy().astype(np.float64)
        assert np.linalg.norm(out, axis=1).max() <= bound


def test_add_bias_bounds_with_positions():
    bias = L.DP_AddBias(norm_max=1.0)
    bias.build((None, 4, 4, 3))
    bias.bias.assign([3.0, 4.0, 0.0])
    bias.project()
    assert float(tf.norm(bias.bias)) == pytest.approx(1.0)
    assert float(bias.propagate_inputs(2.0)) == pytest.approx(2.0 + 4.0 * 1.0)
    assert float(bias.backpropagate_params(1.0, 0.5)) == pytest.approx(4.0 * 0.5)


def test_add_bias_positions_come_from_its_build_shape_only():
    """positions set from 64 to 1 after build: the bias-gradient bound
    sqrt(P) g fell 8 times, and a sample's gradient reached 1.34 times it (a
    review)."""
    bias = L.DP_AddBias(norm_max=1.0)
    bias.build((None, 8, 8, 3))
    assert bias.positions == 64
    with pytest.raises(AttributeError):
        bias.positions = 1
    assert float(bias.backpropagate_params(1.0, 1.0)) == pytest.approx(8.0)


def test_add_bias_bounds_a_bias_whose_squares_flush_to_zero():
    """A plain float32 norm read a bias of entries 1e-20 as 0, so the next
    kernel's gradient bound ignored it: 7e5 times too small behind an input
    bound of 1e-25 (a review). Its projection read that norm too."""
    bias = L.DP_AddBias(norm_max=1.0)
    bias.build((None, 16))
    bias.bias.assign(np.full(16, 1e-20, np.float32))
    true_norm = 4e-20
    assert float(bias.propagate_inputs(1e-30)) >= true_norm * (1 - 1e-6)
    small = L.DP_AddBias(norm_max=1e-19)
    small.build((None, 16))
    small.bias.assign(np.full(16, 1e-19, np.float32))  # norm 4e-19
    small.project()
    projected = np.linalg.norm(small.bias.numpy().astype(np.float64))
    assert 0.99e-19 <= projected <= 1e-19 * (1 + 1e-6)


@pytest.mark.parametrize(
    "attribute,value",
    [
        ("strides", (1, 1)),
        ("strides", (1, 2)),
        ("kernel_size", (2, 2)),
        ("padding", "valid"),
    ],
)
def test_a_convolution_refuses_a_geometry_changed_after_construction(attribute, value):
    """Strides set from 2 to 1 after construction: the forward pass used the
    new ones, the bounds the old overlap (a kernel gradient 1.44 times its
    bound, a certificate 1.09 times too small: a review)."""
    x, y = unit_samples(20, (8, 8, 1)), one_hot(np.arange(20))
    conv = L.DP_QuickSpectralConv2D(4, 3, strides=2)
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            conv,
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(10),
        ],
        n=20,
        batch_size=10,
        sampling="shuffle",
    )
    setattr(conv, attribute, value)
    for use in (
        lambda: model.fit(x, y, batch_size=10, verbose=0),
        lambda: conv(tf.zeros((1, 8, 8, 1))),
        lambda: conv.backpropagate_params(1.0, 1.0),
        lambda: conv.project(),
    ):
        with pytest.raises(ValueError, match="cannot change after construction"):
            use()
    fresh = L.DP_QuickSpectralConv2D(4, 3, strides=2)
    with pytest.raises(AttributeError):
        fresh.overlap = 1  # derived from the geometry, never set


@pytest.mark.parametrize(
    "attribute,value,match",
    [
        ("upper_bound", -1.0, "upper_bound=-1.0"),
        ("upper_bound", float("nan"), "upper_bound=nan"),
        ("upper_bound", 1e30, "must be <="),
        ("enforce_clipping", 0, "enforce_clipping=0"),
    ],
)
def test_bounded_input_checks_its_arguments_at_every_use(attribute, value, match):
    """The constructor's checks held only at construction: a bound set to -1
    afterwards gave negative gradient bounds (the checks of DP_ReLU and
    DP_MaxPool2D already run at every trace)."""
    layer = L.DP_BoundedInput(upper_bound=1.0)
    setattr(layer, attribute, value)
    for use in (lambda: layer(tf.ones((2, 4))), lambda: layer.propagate_inputs(None)):
        with pytest.raises(ValueError, match=match):
            use()


def test_dp_lambda_spot_checks_the_function_with_its_arguments():
    """The build's spot check called the function without `arguments`: a
    default scale of 1 passed for a layer that applies 50 (found with the
    review of the frozen arguments)."""
    layer = L.DP_Lambda(
        lambda t, scale=1.0: scale * t, lipschitz=1.0, arguments={"scale": 50.0}
    )
    with pytest.raises(ValueError, match="is not 1.0-Lipschitz"):
        layer(tf.ones((1, 8)))


def test_dp_lambda_refuses_a_variable_in_its_arguments():
    """A variable's value can change after the constant is certified (and
    the frozen copy's comparison could not run in a traced step: a review)."""
    with pytest.raises(ValueError, match="must be constants"):
        L.DP_Lambda(
            lambda t, scale: scale * t,
            lipschitz=1.0,
            arguments={"scale": tf.Variable(1.0)},
        )


def test_dp_lambda_refuses_a_function_that_reads_variables():
    """`lambda t: v * t` with v assigned 50 after build: the bound kept
    lipschitz 1, a kernel gradient reached 50 times it (a review)."""
    v = tf.Variable(1.0)
    layer = L.DP_Lambda(lambda t: v * t, lipschitz=1.0)
    with pytest.raises(ValueError, match="reads variables"):
        layer(tf.ones((1, 8)))


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.layers.Dropout(0.5, seed=1),
        lambda: keras.layers.GaussianNoise(1.0, seed=1),
    ],
)
def test_dp_lambda_refuses_a_keras_layer_that_acts_only_in_training(make):
    """A review: a Keras Dropout called by the function did nothing at build
    (not training) and scaled kept units by 2 in the train step: kernel
    gradients 1.67x their bound. The trace runs as in training, where its
    random state is a variable read."""
    inner = make()
    layer = L.DP_Lambda(lambda t: inner(t), lipschitz=1.0)
    with pytest.raises(ValueError, match="reads variables"):
        dp_model(
            [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(16), layer]
            + [L.DP_QuickSpectralDense(10)],
            input_shape=(16,),
        )


def _scale_argument(layer):
    layer.arguments["scale"] = 50.0  # in place


@pytest.mark.parametrize(
    "change",
    [
        lambda layer: setattr(layer, "lipschitz", 0.01),
        lambda layer: setattr(layer, "function", lambda t, scale: 50.0 * t),
        _scale_argument,
        lambda layer: setattr(layer, "arguments", {"scale": 50.0}),
    ],
)
def test_dp_lambda_refuses_a_function_or_constant_changed_after_construction(
    change,
):
    """lipschitz lowered from 1 to 0.01 (or the function replaced by 50 x, or
    its argument set to 50) after build: the bounds read the new constant,
    the forward pass ran the function: a kernel gradient 100 (50) times its
    bound (reviews)."""
    layer = L.DP_Lambda(
        lambda t, scale: scale * t, lipschitz=1.0, arguments={"scale": 1.0}
    )
    model = dp_model(
        [L.DP_BoundedInput(upper_bound=1.0), layer, L.DP_QuickSpectralDense(2)],
        input_shape=(8,),
        num_classes=2,
    )
    change(layer)
    for use in (
        lambda: model.train_on_batch(unit_samples(4, (8,)), one_hot(range(4), 2)),
        lambda: layer(tf.ones((1, 8))),
        lambda: layer.propagate_inputs(1.0),
        lambda: layer.backpropagate_inputs(1.0, 1.0),
    ):
        with pytest.raises(ValueError, match="cannot change after construction"):
            use()


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: L.DP_BoundedInput(upper_bound=-1.0), "upper_bound=-1.0"),
        (lambda: L.DP_ClipGradient(clip_value=1.0, mode="auto"), "mode='auto'"),
        (lambda: L.DP_AddBias(norm_max=0), "norm_max=0"),
        (lambda: L.DP_QuickSpectralDense(0), "units=0"),
        (lambda: L.DP_QuickSpectralConv2D(4, 3, padding="causal"), "padding='causal'"),
        (lambda: L.DP_QuickSpectralConv2D(4, 3, use_bias=True), "use_bias"),
        (lambda: L.DP_QuickSpectralConv2D(4, 3, dilation_rate=2), "dilation_rate"),
        (lambda: L.DP_MaxPool2D(2, strides=1), "strides == pool_size"),
        (lambda: L.DP_ScaledL2NormPooling2D(2, strides=1), "strides == pool_size"),
        (lambda: L.DP_ReLU(threshold=0.5), "threshold=0.5"),
        (lambda: L.DP_ReLU(negative_slope=2.0), "negative_slope=2.0"),
        (lambda: L.DP_MergeResidual("concat"), "'concat'"),
        (lambda: L.DP_WrappedResidual(keras.layers.Dense(3, name="plain")), "plain"),
        (lambda: L.DP_GroupSort(0), "n=0"),
    ],
)
def test_bad_arguments_are_refused_naming_them(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_gnp_factory_refuses_a_layer_with_weights():
    dp_dense = L.DP_GNP_Factory(keras.layers.Dense, name="DP_UnsafeDense")
    with pytest.raises(ValueError, match="parameter-free"):
        dp_dense(3)(tf.zeros((1, 2)))


def test_dp_lambda_bounds_scale_with_its_constant():
    layer = L.DP_Lambda(lambda t: 2.0 * tf.tanh(t), lipschitz=2.0)
    assert float(layer.propagate_inputs(tf.constant(1.5))) == pytest.approx(3.0)
    assert float(layer.backpropagate_inputs(1.0, tf.constant(0.5))) == pytest.approx(
        1.0
    )


def test_input_layer_and_lambda_round_trip_in_a_saved_model(tmp_path):
    """DP_InputLayer starts the model; DP_Lambda saves its function (Keras needs
    safe_mode=False to load a lambda) and its certified constant."""
    from deel_lipdp_ext import DPParameters, DPSequential, losses

    from ..helpers import metadata

    model = DPSequential(
        [
            L.DP_InputLayer(shape=(4,)),
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Lambda(lambda t: 0.5 * t, lipschitz=0.5),
            L.DP_QuickSpectralDense(3),
        ],
        dp_parameters=DPParameters(1.0, 1e-5, seed=0),
        dataset_metadata=metadata((4,), 3),
    )
    model.compile(optimizer="sgd", loss=losses.DP_TauCategoricalCrossentropy(2.0))
    assert [type(x).__name__ for x in model.dp_layers][0] == "DP_BoundedInput"
    x = unit_samples(5, (4,))
    model.save(tmp_path / "lam.keras")
    loaded = keras.models.load_model(tmp_path / "lam.keras", safe_mode=False)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert loaded.dp_layers[1].lipschitz == 0.5
    b1, b2 = model.compute_gradient_bounds(), loaded.compute_gradient_bounds()
    assert sorted(float(v) for v in b1.values()) == pytest.approx(
        sorted(float(v) for v in b2.values())
    )
