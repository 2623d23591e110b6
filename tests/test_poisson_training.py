"""Training on unpadded Poisson batches: empty and short batches, XLA buckets."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext import DPParameters, data, losses
from deel_lipdp_ext import layers as L
from deel_lipdp_ext.dpsgd import DPSGDModel

from .helpers import dp_model, metadata, small_cnn


def _arrays(n, shape=(8,), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    x /= np.linalg.norm(x.reshape(n, -1), axis=1).reshape((-1,) + (1,) * len(shape))
    return x, np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]


def _clipless(n, b, jit):
    return dp_model(
        [L.DP_BoundedInput(upper_bound=1.0), L.DP_QuickSpectralDense(4)],
        input_shape=(8,),
        num_classes=4,
        batch_size=b,
        n=n,
        loss=losses.DP_TauCategoricalCrossentropy(1.0),
        jit_compile=jit,
    )


def _dpsgd(n, b, jit, clipping="vectorized", net=None, input_shape=(8,), classes=4):
    net = net or keras.Sequential([keras.Input(input_shape), keras.layers.Dense(4)])
    model = DPSGDModel(
        net,
        DPParameters(1.0, 1e-5, seed=0),
        metadata(input_shape, classes, n=n, batch_size=b),
        l2_norm_clip=1.0,
        **({} if clipping == "vectorized" else {"clipping": clipping}),
    )
    model.compile(
        keras.optimizers.SGD(0.1),
        keras.losses.CategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


MODELS = {
    "clipless": _clipless,
    "dpsgd-vectorized": _dpsgd,
    "dpsgd-ghost": lambda n, b, jit: _dpsgd(n, b, jit, "ghost"),
}


def _clipless_conv(n, b, jit):
    return dp_model(small_cnn(), n=n, batch_size=b, jit_compile=jit)


def _dpsgd_conv(n, b, jit, clipping):
    net = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    return _dpsgd(n, b, jit, clipping, net=net, input_shape=(8, 8, 1), classes=10)


CONV_MODELS = {
    "clipless": _clipless_conv,
    "dpsgd-vectorized": lambda n, b, jit: _dpsgd_conv(n, b, jit, "vectorized"),
    "dpsgd-ghost": lambda n, b, jit: _dpsgd_conv(n, b, jit, "ghost"),
}


@pytest.mark.parametrize("kind", sorted(CONV_MODELS))
def test_conv_networks_train_on_empty_poisson_batches(kind):
    """An empty batch failed a convolutional network's step: the clipless
    step's backward pass (oneDNN kernels gave gradients of inconsistent
    shapes at batch 0) and the vectorised DP-SGD pass (its loop cannot stack
    zero examples). Both now add noise alone."""
    n = 60
    x, y = _arrays(n, (8, 8, 1), classes=10)
    model = CONV_MODELS[kind](n, 1, False)
    ds = data.poisson_batches(x, y, 1, seed=0)
    assert [int(xb.shape[0]) for xb, _, _ in ds].count(0) > 10
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(ds, epochs=1, verbose=0)
    assert int(model.privacy_plan.steps.numpy()) == n
    for b, v in zip(before, model.trainable_variables, strict=True):
        assert np.all(np.isfinite(v.numpy())) and not np.array_equal(b, v.numpy())


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fit_on_poisson_batches_that_are_often_empty(kind, jit):
    """q = 1/120: over a third of the steps have no sample. Every step is
    accounted, the weights stay finite, and an empty step moves the weights
    by noise alone."""
    n = 120
    x, y = _arrays(n)
    model = MODELS[kind](n, 1, jit)
    ds = data.poisson_batches(x, y, 1, seed=0)
    sizes = [int(xb.shape[0]) for xb, _, _ in ds]
    assert sizes.count(0) > 20
    model.fit(ds, epochs=2, verbose=0)
    assert int(model.privacy_plan.steps.numpy()) == 2 * n
    for v in model.trainable_variables:
        assert np.all(np.isfinite(v.numpy()))


def test_xla_fit_pads_unpadded_poisson_batches_to_buckets(monkeypatch):
    """Under jit_compile=True fit hands Keras the bucketed dataset (a few
    shapes); without XLA the batches keep their exact size."""
    from deel_lipdp_ext import model as model_module

    padded = []
    real = model_module.pad_to_buckets

    def spy(ds):
        padded.append(ds)
        return real(ds)

    monkeypatch.setattr(model_module, "pad_to_buckets", spy)
    n, b = 400, 40
    x, y = _arrays(n)
    ds = data.poisson_batches(x, y, b, seed=1)
    _clipless(n, b, jit=False).fit(ds, verbose=0)
    assert padded == []
    model = _clipless(n, b, jit=True)
    model.fit(ds, verbose=0)
    assert padded == [ds]
    assert int(model.privacy_plan.steps.numpy()) == 10


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bucket_padding_rows_do_not_move_the_update(kind):
    """Rows of mask 0, as `pad_to_buckets` adds, contribute nothing even
    when they hold data: one XLA step on the padded batch applies the update
    of the same batch unpadded (noise made negligible)."""
    n, b = 400, 40
    x, y = _arrays(n)
    ((xb, yb, mask),) = data.poisson_batches(x, y, b, seed=3).take(1)
    padded = data.poisson_batches(x, y, b, seed=3, padding="buckets")
    ((xp, yp, mp),) = padded.take(1)  # the same draw (epoch 0), padded
    extra = xp.shape[0] - xb.shape[0]
    assert extra > 0 and not np.any(mp.numpy()[xb.shape[0] :])
    # zero rows would give zero gradients even unmasked: fill them with data
    filler_x, filler_y = _arrays(extra, seed=9)
    xp = np.concatenate([xb.numpy(), 50 * filler_x])
    yp = np.concatenate([yb.numpy(), filler_y])
    updates = []
    for batch in ((xb, yb, mask), (xp, yp, mp)):
        keras.utils.set_random_seed(0)
        model = MODELS[kind](n, b, True)
        model.privacy_plan.set_noise_multiplier(1e-9)
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.train_on_batch(*batch[:2], sample_weight=batch[2])
        updates.append(
            [
                v.numpy() - w
                for v, w in zip(model.trainable_variables, before, strict=True)
            ]
        )
    for plain, padded in zip(*updates, strict=True):
        np.testing.assert_allclose(padded, plain, atol=1e-6)


class _StoppedDense(L.DP_QuickSpectralDense):
    """A DP dense layer whose output carries no gradient to its kernel."""

    bounds_proven = True  # no gradient: within every bound

    def call(self, inputs, *args, **kwargs):
        return tf.stop_gradient(super().call(inputs, *args, **kwargs))


@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
@pytest.mark.parametrize("rows", [0, 3])
def test_a_variable_without_a_gradient_is_refused_on_every_step(mode, rows):
    """A review: with the empty-batch branch, an eager step on an empty
    batch skipped the refusal of a variable that gets no gradient (one
    noise-only step was accounted instead)."""
    model = dp_model(
        [L.DP_BoundedInput(upper_bound=1.0), L.DP_Flatten(), _StoppedDense(10)],
        n=60,
        batch_size=1,
        jit_compile=mode == "xla",
        run_eagerly=mode == "eager",
    )
    x = np.full((rows, 8, 8, 1), 0.01, np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(rows) % 10]
    batch = (x, y, np.ones(rows, np.float32))
    signature = (
        tf.TensorSpec((None, 8, 8, 1)),
        tf.TensorSpec((None, 10)),
        tf.TensorSpec((None,)),
    )
    batches = tf.data.Dataset.from_generator(
        lambda: iter([batch]), output_signature=signature
    )
    model.make_train_function()
    with pytest.raises(ValueError, match="received no gradient"):
        model.train_function(iter(batches))
