"""Each get_L is attacked: the gradient norm w.r.t. the logits never exceeds it,
whatever the logits and labels (even crafted labels), and comes within 5% of
it for some input."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext import losses

LOSSES = [
    losses.DP_TauCategoricalCrossentropy(tau=8.0),
    losses.DP_TauCategoricalCrossentropy(tau=0.5),
    losses.DP_TauBCE(tau=3.0),
    losses.DP_KCosineSimilarity(K=0.5),
    losses.DP_KCosineSimilarity(K=4.0),
    losses.DP_MulticlassHKR(alpha=5.0, min_margin=1.0),
    losses.DP_MulticlassHKR(alpha=0.0, min_margin=0.5),
    losses.DP_MulticlassHinge(min_margin=1.0),
    losses.DP_MulticlassKR(),
    losses.DP_MeanAbsoluteError(),
]


def grad_norms(loss, y, z):
    z = tf.constant(z, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(z)
        total = tf.reduce_sum(loss.call(tf.constant(y, tf.float32), z))
    return np.linalg.norm(tape.gradient(total, z).numpy(), axis=-1)


def candidate_inputs(k, rng, n=400):
    """Random logits at many scales, crafted labels, and structured worst cases."""
    scales = rng.choice([1e-3, 0.1, 1.0, 10.0, 100.0], size=(n, 1))
    z = rng.normal(size=(n, k)) * scales
    onehot = np.eye(k)[rng.integers(0, k, n)]
    crafted = rng.normal(size=(n, k)) * rng.choice([1.0, 5.0, 100.0], size=(n, 1))
    y = np.where(rng.random((n, 1)) < 0.5, onehot, crafted)
    # worst cases: a large wrong logit; tiny logits; margins all active
    wrong = np.zeros((k, k))
    for i in range(k):
        wrong[i, (i + 1) % k] = 30.0
        wrong[i, i] = -30.0
    binary = (rng.random((k, k)) < 0.5).astype(float)
    confidently_wrong = -30.0 * (2.0 * binary - 1.0)
    z = np.concatenate(
        [z, wrong, np.full((k, k), 1e-4), -np.eye(k) * 0.01, confidently_wrong]
    )
    y = np.concatenate([y, np.eye(k), np.eye(k), np.eye(k), binary])
    return y, z


MULTICLASS = (
    losses.DP_MulticlassHKR,
    losses.DP_MulticlassHinge,
    losses.DP_MulticlassKR,
    losses.DP_TauCategoricalCrossentropy,
)
CASES = [  # multiclass losses need at least two outputs
    (loss, k)
    for loss in LOSSES
    for k in (1, 2, 3, 10)
    if k > 1 or not isinstance(loss, MULTICLASS)
]


@pytest.mark.parametrize("loss,k", CASES, ids=[f"{c[0].name}-{c[1]}" for c in CASES])
def test_get_L_is_never_exceeded_and_is_tight(loss, k):
    rng = np.random.default_rng(k)
    y, z = candidate_inputs(k, rng)
    norms = grad_norms(loss, y, z)
    bound = loss.get_L(k)
    assert np.all(norms <= bound * (1 + 1e-5)), (norms.max(), bound)
    assert norms.max() >= 0.95 * bound, (norms.max(), bound)
    assert loss.get_L() >= bound  # the class-free bound is the worst case


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss.name)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_get_L_holds_for_any_label_property(loss, k, seed, scale):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(16, k)) * scale
    y = rng.normal(size=(16, k)) * rng.choice([0.0, 1.0, 50.0])
    assert np.all(grad_norms(loss, y, z) <= loss.get_L(k) * (1 + 1e-5))


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss.name)
def test_losses_round_trip_config(loss):
    clone = type(loss).from_config(loss.get_config())
    y = np.eye(4)[[0, 1, 2, 3]]
    z = np.random.default_rng(0).normal(size=(4, 4))
    np.testing.assert_allclose(loss.call(y, z), clone.call(y, z), rtol=1e-6)
    assert clone.get_L(4) == loss.get_L(4)


def test_bad_loss_arguments_name_the_argument():
    with pytest.raises(ValueError, match="tau"):
        losses.DP_TauCategoricalCrossentropy(tau=-1.0)
    with pytest.raises(ValueError, match="K"):
        losses.DP_KCosineSimilarity(K=0)
    with pytest.raises(ValueError, match="alpha"):
        losses.DP_MulticlassHKR(alpha=float("nan"))


def test_lipschitz_constant_refuses_plain_keras_loss():
    import keras

    with pytest.raises(TypeError, match="categorical_crossentropy"):
        losses.lipschitz_constant(
            keras.losses.CategoricalCrossentropy(name="categorical_crossentropy")
        )
    with pytest.raises(TypeError, match="mse"):
        losses.lipschitz_constant("mse")


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss.name)
def test_labels_that_would_broadcast_are_refused(loss):
    """(B, 1) labels against (B, C) logits would broadcast to a label of norm
    sqrt(C) and break get_L: refused, naming the shapes."""
    with pytest.raises(ValueError, match="same shape"):
        loss.call(tf.ones((4, 1)), tf.zeros((4, 3)))


class _DoubledCrossentropy(losses.DP_TauCategoricalCrossentropy):
    """Its call doubles the parent's loss; its get_L is the parent's."""

    def call(self, y_true, y_pred):
        return 2.0 * super().call(y_true, y_pred)


def test_a_loss_subclass_that_changes_call_but_not_get_l_is_refused():
    """A review: this subclass trained with per-sample logit gradients 1.45x
    the constant the model used (the inherited get_L)."""
    loss = _DoubledCrossentropy(8.0)
    y, z = np.eye(4, dtype=np.float32), 3.0 * np.eye(4, dtype=np.float32)
    assert float(np.max(grad_norms(loss, y, -z))) > loss.get_L(4)
    with pytest.raises(ValueError, match="_DoubledCrossentropy, which defines call"):
        losses.lipschitz_constant(loss, 4)

    class Proven(_DoubledCrossentropy):
        bounds_proven = True

        def get_L(self, num_classes=None):  # noqa: N802 (API name)
            return 2.0 * super().get_L(num_classes)

    assert losses.lipschitz_constant(Proven(8.0), 4) == 2 * loss.get_L(4)


def test_a_loss_call_set_on_the_instance_is_refused():
    loss = losses.DP_MeanAbsoluteError()
    loss.call = lambda y_true, y_pred: 5.0 * tf.reduce_sum(tf.abs(y_true - y_pred), -1)
    with pytest.raises(ValueError, match="call replaced on the instance"):
        losses.lipschitz_constant(loss, 4)


def test_a_temperature_too_small_for_float32_is_refused():
    """A review: from tau ~ 1e-38 every gradient was NaN, whatever the data."""
    for loss in (losses.DP_TauCategoricalCrossentropy, losses.DP_TauBCE):
        with pytest.raises(ValueError, match="tau"):
            loss(1e-38)
        norms = grad_norms(loss(losses.MIN_TAU), np.eye(3), 5.0 * np.eye(3))
        assert np.all(np.isfinite(norms))


def test_a_loss_helper_changed_in_a_subclass_or_on_the_instance_is_refused():
    """A review: DP_MeanAbsoluteError with `_labels` returning y - 2 y_pred
    (a subclass, or set on the instance) had logit gradients 3x its get_L."""

    class ShiftedLabels(losses.DP_MeanAbsoluteError):
        def _labels(self, y_true, y_pred):
            return y_true - 2.0 * y_pred

    with pytest.raises(ValueError, match="which defines _labels"):
        losses.lipschitz_constant(ShiftedLabels(), 4)
    loss = losses.DP_MeanAbsoluteError()
    loss._labels = lambda y_true, y_pred: y_true - 2.0 * y_pred
    with pytest.raises(ValueError, match="_labels replaced on the instance"):
        losses.lipschitz_constant(loss, 4)


def test_a_loss_mixin_listed_after_the_package_s_class_is_refused():
    """A review: a DPLoss mixin with `_labels` listed after
    DP_TauCategoricalCrossentropy came before DPLoss in the resolution
    order: logit gradients 515x get_L."""

    class LogitLabels(losses.DPLoss):
        def _labels(self, y_true, y_pred):
            return tf.clip_by_value(0.05 + y_pred, 0.0, 1.0)

    class Mixed(losses.DP_TauCategoricalCrossentropy, LogitLabels):
        pass

    with pytest.raises(ValueError, match="with .*LogitLabels, which defines _labels"):
        losses.lipschitz_constant(Mixed(0.01), 4)
