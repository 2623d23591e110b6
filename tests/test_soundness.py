"""Soundness of the privacy core: no per-sample gradient ever exceeds its bound.

Random DP models are drawn from every layer type and loss; their weights are
rescaled away from the projection (so the CERTIFIED constants are exercised,
not the hoped-for 1); inputs are random, constant, and adversarially
optimised on the input-bound sphere. True per-sample gradients (vectorised
Jacobians) must satisfy ||g_var|| <= bound_var * (1 + 1e-4).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext import layers as L
from deel_lipdp_ext import losses
from deel_lipdp_ext.sensitivity import (
    gradient_norm_check,
    maximize_gradient_norm,
    per_sample_gradient_norms,
)

from .helpers import dp_model, one_hot, step_updates

LOSS_FACTORIES = [
    lambda: losses.DP_TauCategoricalCrossentropy(tau=8.0),
    lambda: losses.DP_TauCategoricalCrossentropy(tau=0.5),
    lambda: losses.DP_TauBCE(tau=2.0),
    lambda: losses.DP_KCosineSimilarity(K=0.3),
    lambda: losses.DP_MulticlassHKR(alpha=3.0, min_margin=0.5),
    lambda: losses.DP_MulticlassHinge(min_margin=1.0),
    lambda: losses.DP_MulticlassKR(),
    lambda: losses.DP_MeanAbsoluteError(),
]


def conv_block(draw, channels):
    kind = draw(
        st.sampled_from(
            [
                "qconv",
                "conv",
                "bias",
                "groupsort",
                "relu",
                "center",
                "maxpool",
                "l2pool",
                "residual",
                "clip",
            ]
        )
    )
    k = draw(st.sampled_from([1, 2, 3]))
    s = draw(st.sampled_from([1, 2]))
    pad = draw(st.sampled_from(["same", "valid"]))
    if kind == "qconv":
        return [L.DP_QuickSpectralConv2D(channels, k, strides=s, padding=pad)]
    if kind == "conv":
        return [L.DP_SpectralConv2D(channels, k, strides=s, padding="same")]
    if kind == "bias":
        return [L.DP_AddBias(norm_max=draw(st.sampled_from([0.1, 1.0, 5.0])))]
    if kind == "groupsort":
        return [L.DP_GroupSort(2)]
    if kind == "relu":
        return [L.DP_ReLU()]
    if kind == "center":
        return [L.DP_LayerCentering()]
    if kind == "maxpool":
        return [L.DP_MaxPool2D(2, padding="same")]
    if kind == "l2pool":
        return [L.DP_ScaledL2NormPooling2D(2, padding="same")]
    if kind == "clip":
        return [L.DP_ClipGradient(clip_value=draw(st.sampled_from([0.01, 0.5, 10.0])))]
    policy = draw(st.sampled_from(["add", "1-lip-add"]))
    return L.make_residuals(
        policy, [L.DP_QuickSpectralConv2D(channels, 3), L.DP_GroupSort(2)]
    )


def dense_block(draw, units):
    kind = draw(
        st.sampled_from(
            ["qdense", "dense", "frob", "bias", "groupsort", "residual", "clip"]
        )
    )
    if kind == "qdense":
        return [L.DP_QuickSpectralDense(units)]
    if kind == "dense":
        return [L.DP_SpectralDense(units)]
    if kind == "frob":
        return [L.DP_QuickFrobeniusDense(units)]
    if kind == "bias":
        return [L.DP_AddBias(norm_max=1.0)]
    if kind == "groupsort":
        return [L.DP_GroupSort(2)]
    if kind == "clip":
        return [L.DP_ClipGradient(clip_value=0.3)]
    return L.make_residuals("add", [L.DP_QuickSpectralDense(units), L.DP_AddBias(0.5)])


@st.composite
def architectures(draw):
    size = draw(st.sampled_from([4, 6, 8]))
    shape = (size, size, draw(st.sampled_from([1, 2])))
    classes = draw(st.sampled_from([2, 3, 5]))
    channels = draw(st.sampled_from([2, 4]))
    layers = [
        L.DP_BoundedInput(upper_bound=draw(st.sampled_from([0.5, 1.0, 3.0]))),
        L.DP_QuickSpectralConv2D(
            channels,
            draw(st.sampled_from([2, 3])),
            strides=draw(st.sampled_from([1, 2])),
        ),
    ]
    for _ in range(draw(st.integers(0, 3))):
        layers += conv_block(draw, channels)
    if draw(st.booleans()):
        layers += [L.DP_Flatten()]
    else:
        layers += [L.DP_ScaledGlobalL2NormPooling2D()]
    units = draw(st.sampled_from([4, 8]))
    for _ in range(draw(st.integers(0, 2))):
        layers += dense_block(draw, units) if _ else [L.DP_QuickSpectralDense(units)]
    layers += [L.DP_QuickSpectralDense(classes)]
    loss = draw(st.sampled_from(LOSS_FACTORIES))()
    scale = draw(st.sampled_from([0.5, 1.0, 2.0]))
    return shape, classes, layers, loss, scale


def perturb_weights(model, scale, seed):
    """Move the weights off the constraint set: certified constants must follow."""
    rng = np.random.default_rng(seed)
    for v in model.trainable_variables:
        v.assign(
            v.numpy() * scale * rng.uniform(0.5, 1.5)
            + rng.normal(scale=0.05, size=v.shape).astype(np.float32)
        )


def inputs_at_bound(shape, n, bound, rng):
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x[0] = 1.0  # constant image
    x[1] = 0.0
    x[1, 0, 0, 0] = 1.0  # one spike
    x = x * (bound / np.linalg.norm(x.reshape(n, -1), axis=1)).reshape(-1, 1, 1, 1)
    x[2] *= 0.0  # zero image (gradients through norms at 0)
    return x.astype(np.float32)


@given(architectures(), st.integers(0, 2**31 - 1))
def test_random_models_never_exceed_their_bounds(arch, seed):
    shape, classes, layers, loss, scale = arch
    model = dp_model(layers, input_shape=shape, num_classes=classes, loss=loss)
    perturb_weights(model, scale, seed)
    rng = np.random.default_rng(seed)
    x = inputs_at_bound(shape, 12, model.dp_layers[0].upper_bound, rng)
    y = one_hot(rng.integers(0, classes, 12), classes)
    y[3] = rng.normal(size=classes) * 10  # a crafted label
    report = gradient_norm_check(model, (x, y))  # raises on any violation
    assert report.max_ratio <= 1 + 1e-4


@pytest.mark.slow
@given(architectures(), st.integers(0, 2**31 - 1))
def test_adversarial_inputs_never_exceed_the_bounds(arch, seed):
    shape, classes, layers, loss, scale = arch
    model = dp_model(layers, input_shape=shape, num_classes=classes, loss=loss)
    perturb_weights(model, scale, seed)
    rng = np.random.default_rng(seed)
    x = inputs_at_bound(shape, 4, model.dp_layers[0].upper_bound, rng)
    y = one_hot(rng.integers(0, classes, 4), classes)
    x_adv = maximize_gradient_norm(model, x, y, steps=8)
    before = gradient_norm_check(model, (x, y)).max_ratio
    after = gradient_norm_check(model, (x_adv, y)).max_ratio
    assert after <= 1 + 1e-4
    assert after >= before * 0.9  # the search does not lose ground


def test_adversarial_search_approaches_the_dense_bound():
    """On a one-layer model the bound |x||g| is attainable; the attack gets close."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(3),
        ],
        input_shape=(2, 2, 1),
        num_classes=3,
    )
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 1)).astype(np.float32) * 1e-3
    y = one_hot([0, 1, 2], 3)
    x_adv = maximize_gradient_norm(model, x, y, steps=30, step_size=0.3)
    assert gradient_norm_check(model, (x_adv, y)).max_ratio > 0.6


def test_constant_image_breaks_the_padding_factor_but_not_our_bound():
    """docs/design.md rule 4: 3x3 stride-1 'same' conv, 28x28 constant image and
    constant upstream gradient (both norm 1): kernel gradient norm ~2.86,
    above deel-lipdp's padding-corrected 1.02, below our sqrt(9) = 3."""
    conv = L.DP_QuickSpectralConv2D(1, 3, padding="same")
    x = tf.ones((1, 28, 28, 1)) / 28.0
    conv.build(x.shape)
    g = tf.ones((1, 28, 28, 1)) / 28.0
    with tf.GradientTape() as tape:
        out = tf.reduce_sum(conv(x) * g)
    norm = float(tf.norm(tape.gradient(out, conv.kernel)))
    bound = float(conv.backpropagate_params(1.0, 1.0))
    assert 2.8 < norm <= bound
    assert bound == pytest.approx(3.0)
    assert norm > 1.02 * 2  # the padding-factor bound would be violated


@pytest.mark.parametrize("batch", ["short", "poisson"])
def test_train_step_never_weights_a_sample_above_L_over_B(batch):
    """Rule 1 in the REAL train step: one real sample in a short batch or a padded
    Poisson batch moves each variable by at most its bound (noise ~0, lr 1)."""
    layers = [
        L.DP_BoundedInput(upper_bound=1.0),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(8),
        L.DP_GroupSort(2),
        L.DP_QuickSpectralDense(4),
        L.DP_AddBias(1.0),
    ]
    model = dp_model(
        layers,
        input_shape=(4, 4, 1),
        num_classes=4,
        sigma=1e-9,
        batch_size=50,
        optimizer=keras.optimizers.SGD(1.0),
    )
    # The step moves a variable by (summed gradient + noise) / B, B = 50: one
    # sample's share is at most its bound / B.
    b = model.dataset_metadata.batch_size
    bounds = {k: float(v) / b for k, v in model.compute_gradient_bounds().items()}
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 0, 0, 0] = 1.0
    y = one_hot([1], 4)
    if batch == "short":
        data = (x, y)
    else:  # padded to 7 with zero-weight rows
        data = (
            np.concatenate([x, np.random.rand(6, 4, 4, 1).astype(np.float32)]),
            np.concatenate([y, one_hot([0] * 6, 4)]),
            np.array([1, 0, 0, 0, 0, 0, 0], np.float32),
        )
    norms = per_sample_gradient_norms(model, x, y)  # before the step moves the weights
    (updates,) = step_updates(model, *data)
    moved = {path: float(np.linalg.norm(u)) for path, u in updates.items()}
    assert max(moved.values()) > 0
    for path, delta in moved.items():
        assert delta <= bounds[path] * (1 + 1e-4), (path, delta, bounds[path])
    # The step divided by the EXPECTED batch size (50), not the actual one (1):
    # the move equals the sample's own gradient norm over B.
    for path, delta in moved.items():
        assert delta == pytest.approx(float(norms[path][0]) / b, rel=1e-3, abs=1e-7)


def test_the_report_s_mean_norm_is_the_mean_over_every_batch_seen():
    """The mean per-sample norm (the tightness users read to set nm_coef)
    averages over all batches, and never exceeds the max."""
    model = dp_model(
        [
            L.DP_BoundedInput(upper_bound=1.0),
            L.DP_Flatten(),
            L.DP_QuickSpectralDense(4),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralDense(3),
        ],
        input_shape=(2, 2, 1),
        num_classes=3,
    )
    rng = np.random.default_rng(1)
    batches = [
        (inputs_at_bound((2, 2, 1), n, 1.0, rng), one_hot(rng.integers(0, 3, n), 3))
        for n in (5, 3)
    ]
    report = gradient_norm_check(model, batches)
    norms = [per_sample_gradient_norms(model, *b) for b in batches]
    for row in report.rows:
        every = np.concatenate([n[row.path].numpy() for n in norms])
        assert row.mean_norm == pytest.approx(every.mean(), rel=1e-5)
        assert row.mean_ratio <= row.ratio
        assert row.max_norm == pytest.approx(every.max(), rel=1e-5)
    assert "mean ratio" in report.table()
    # Chunks (memory) change nothing: the same max and mean over every sample.
    chunked = gradient_norm_check(model, batches, chunk_size=2)
    for row, same in zip(report.rows, chunked.rows, strict=True):
        assert same.max_norm == pytest.approx(row.max_norm, rel=1e-5)
        assert same.mean_norm == pytest.approx(row.mean_norm, rel=1e-5)


class _HalvedBounds(L.DP_QuickSpectralDense):
    """Reports half the bound its gradients reach (what the check exists to
    catch)."""

    bounds_proven = True  # a false statement: under test

    def backpropagate_params(self, input_bound, gradient_bound):
        return 0.5 * super().backpropagate_params(input_bound, gradient_bound)


def _halved_model():
    return dp_model(
        [L.DP_BoundedInput(upper_bound=1.0), L.DP_Flatten(), _HalvedBounds(10)],
        n=10,
        batch_size=10,
        sampling="shuffle",
    )


@pytest.mark.parametrize("poison", ["weight", "label"])
def test_the_check_does_not_pass_a_batch_with_a_non_finite_label_or_weight(poison):
    """A review: one inf weight (or NaN label) made every per-sample norm of
    its chunk read 0, and a 2x violation passed as ratio 0."""
    model = _halved_model()
    x = np.random.default_rng(0).normal(size=(10, 8, 8, 1)).astype(np.float32)
    x /= np.linalg.norm(x.reshape(10, -1), axis=1)[:, None, None, None]
    y, w = one_hot(np.arange(10)), np.ones(10, np.float32)
    with pytest.raises(AssertionError, match="sensitivity claim is false"):
        gradient_norm_check(model, (x, y, w))
    if poison == "weight":
        w[7] = np.inf
    else:
        y[7, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        gradient_norm_check(model, (x, y, w))


def test_the_check_takes_column_weights_as_the_train_step_does():
    """A review: (batch, 1) sample weights broadcast the (batch,) losses to
    (batch, batch) and failed inside pfor; the train step flattens them."""
    model = _halved_model()
    x = np.full((6, 8, 8, 1), 1 / 8, np.float32)
    y, w = one_hot(np.arange(6)), np.linspace(0.2, 1.0, 6, dtype=np.float32)
    flat = gradient_norm_check(model, (x, y, w), raise_on_violation=False)
    column = gradient_norm_check(model, (x, y, w[:, None]), raise_on_violation=False)
    assert column.rows == flat.rows


def test_the_check_does_not_pass_when_it_checked_no_sample():
    """A review: an empty dataset, max_batches=0 or a used-up iterator passed
    with ratio 0 (with bounds half what the gradients reach)."""
    model = _halved_model()
    x, y = np.ones((4, 8, 8, 1), np.float32) / 8, one_hot(np.arange(4))
    for data, kwargs in (
        ((x[:0], y[:0]), {}),
        ((x, y), {"max_batches": 0}),
        (iter([]), {}),
    ):
        with pytest.raises(ValueError, match="checked no sample"):
            gradient_norm_check(model, data, **kwargs)
