"""Cloak loss factories: the formulas, masks, getters, graph safety and fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.cloak import (
    CloakNoiseLayer,
    LossComponentsLogger,
    NoisyModel,
    PatchCloakNoiseLayer,
    composite_cloak_loss_factory,
    image_similarity_cloak_loss_factory,
    negative_log_mean,
)

TASK = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MS_SSIM_NAMES = [
    "raw",
    "clamp",
    "minmax",
    "sobel",
    "blur",
    "gamma_0.5",
    "gamma_2.0",
    "wavelet",
    "zscore_sigmoid",
]
PEARSON_NAMES = ["raw", "sobel", "blur", "gamma_0.5", "gamma_2.0", "wavelet"]


def _model(layer=None, frozen=True):
    base = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    base.trainable = not frozen
    layer = layer or CloakNoiseLayer(scale=(0.01, 1.0), percent_to_mask=0.5, seed=0)
    return NoisyModel(base, layer)


def _data(n=64):
    x = np.random.rand(n, 8, 8, 1).astype("float32")
    return x, np.random.randint(0, 10, n)


def _image_loss(model, **kwargs):
    kwargs = {
        "ms_ssim_weight": 1.0,
        "pearson_weight": 1.0,
        "image_mean": [0.5],
        "image_std": [0.5],
        **kwargs,
    }
    return image_similarity_cloak_loss_factory(model, TASK, **kwargs)


def _spread_rhos(model):
    model.noise_layer.rhos.assign(np.linspace(-3, 3, 64).reshape(8, 8, 1))


def test_negative_log_mean():
    std = np.array([0.1, 0.2, 0.3, 1.4])
    assert float(negative_log_mean(std)) == pytest.approx(-np.log(0.5))
    mask = np.array([1.0, 1.0, 1.0, 0.0])
    assert float(negative_log_mean(std, mask)) == pytest.approx(-np.log(0.2))
    with pytest.raises(ValueError, match="keeps no element"):
        negative_log_mean(std, np.zeros(4))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_composite_is_the_interpolation_of_task_and_noise(alpha):
    model = _model()
    x, y = _data()
    model(x)
    _spread_rhos(model)
    loss_fn, get_components, get_hyperparameters = composite_cloak_loss_factory(
        model, TASK, alpha
    )
    pred = model(x)
    value = float(loss_fn(y, pred))
    task = float(TASK(y, pred))
    layer = model.noise_layer
    kept = layer.mask.numpy().astype(bool)
    noise = -np.log(layer.std.numpy()[kept].mean())
    assert value == pytest.approx((1 - alpha) * task + alpha * noise, rel=1e-5)
    if alpha == 0.0:
        assert value == pytest.approx(task, rel=1e-6)
    if alpha == 1.0:
        assert value == pytest.approx(noise, rel=1e-6)
    components = get_components()
    assert components == pytest.approx(
        {"task_loss": task, "noise_loss": noise, "composite_loss": value}, rel=1e-5
    )
    assert get_hyperparameters() == {"alpha": alpha}


def test_mask_respected_or_ignored():
    x, y = _data()
    values = {}
    for respect in (True, False):
        model = _model()
        model(x)
        _spread_rhos(model)
        loss_fn, _, _ = composite_cloak_loss_factory(model, TASK, 1.0, respect)
        values[respect] = float(loss_fn(y, model(x)))
        std, mask = model.noise_layer.std.numpy(), model.noise_layer.mask.numpy()
    assert mask.sum() == 32
    assert values[True] == pytest.approx(-np.log(std[mask == 1].mean()), rel=1e-6)
    assert values[False] == pytest.approx(-np.log(std.mean()), rel=1e-6)
    # Masked features are the highest stds: respecting the mask gives a larger loss.
    assert values[True] > values[False]


def test_patch_layer_mask_is_never_respected():
    layer = PatchCloakNoiseLayer(
        patch_size=2, scale=(0.01, 1.0), percent_to_mask=0.5, seed=0
    )
    model = _model(layer)
    x, y = _data()
    model(x)
    layer.rhos.assign(np.linspace(-3, 3, 16).reshape(4, 4, 1))
    loss_fn, _, _ = composite_cloak_loss_factory(
        model, TASK, 1.0, respect_std_mask=True
    )
    value = float(loss_fn(y, model(x)))
    assert layer.mask.numpy().sum() == 32
    assert value == pytest.approx(-np.log(layer.std.numpy().mean()), rel=1e-6)


@pytest.mark.parametrize("factory", ["composite", "image"])
def test_gradients_reach_the_noise_parameters(factory):
    model = _model()
    x, y = _data(16)
    model(x)
    if factory == "composite":
        loss_fn, _, _ = composite_cloak_loss_factory(model, TASK, 0.5)
    else:
        loss_fn, _, _ = _image_loss(model, ms_ssim_weight=1.0, pearson_weight=1.0)
    layer = model.noise_layer
    with tf.GradientTape() as tape:
        value = loss_fn(y, model(x))
    grads = tape.gradient(value, [layer.locs, layer.rhos])
    for grad in grads:
        assert grad is not None and np.isfinite(grad.numpy()).all()
        assert float(tf.norm(grad)) > 0


def test_image_loss_is_task_plus_weighted_means_of_named_components():
    model = _model()
    x, y = _data(16)
    loss_fn, get_components, get_hyperparameters = _image_loss(
        model, ms_ssim_weight=0.7, pearson_weight=0.2
    )
    pred = model(x)
    value = float(loss_fn(y, pred))
    c = get_components()
    ms_keys = [f"ms_ssim_{n}" for n in MS_SSIM_NAMES]
    p_keys = [f"pearson_sq_{n}" for n in PEARSON_NAMES]
    assert set(c) == {
        *ms_keys,
        *p_keys,
        "ms_ssim_total",
        "pearson_total",
        "task_loss",
        "composite_loss",
    }
    assert all(np.isfinite(v) for v in c.values())
    assert c["ms_ssim_total"] == pytest.approx(
        np.mean([c[k] for k in ms_keys]), rel=1e-5
    )
    assert c["pearson_total"] == pytest.approx(
        np.mean([c[k] for k in p_keys]), rel=1e-5
    )
    assert c["task_loss"] == pytest.approx(float(TASK(y, pred)), rel=1e-5)
    expected = c["task_loss"] + 0.7 * c["ms_ssim_total"] + 0.2 * c["pearson_total"]
    assert value == pytest.approx(expected, rel=1e-5)
    assert c["composite_loss"] == pytest.approx(value, rel=1e-6)
    assert get_hyperparameters()["gamma_values"] == (0.5, 2.0)


def test_image_loss_denormalises_before_comparing():
    # With an identity transform (std 0 everywhere), every component is that of
    # identical images: MS-SSIM and Pearson 1 whatever the normalisation.
    layer = CloakNoiseLayer(scale=(0.0, 1.0), rhos_init=-50.0, seed=0)
    model = _model(layer)
    x = (np.random.rand(4, 8, 8, 1).astype("float32") - 0.5) / 0.25
    loss_fn, get_components, _ = _image_loss(model, image_mean=[0.5], image_std=[0.25])
    loss_fn(np.zeros(4), model(x))
    c = get_components()
    for key in [f"ms_ssim_{n}" for n in MS_SSIM_NAMES]:
        assert c[key] == pytest.approx(1.0, abs=1e-4), key
    for key in [f"pearson_sq_{n}" for n in PEARSON_NAMES]:
        assert c[key] == pytest.approx(1.0, abs=1e-4), key


def test_other_gamma_counts_change_the_component_counts():
    model = _model()
    x, y = _data(8)
    loss_fn, get_components, _ = _image_loss(model, gamma_values=(0.3, 1.5, 3.0))
    loss_fn(y, model(x))
    c = get_components()
    assert sum(k.startswith("ms_ssim_") and "total" not in k for k in c) == 10
    assert sum(k.startswith("pearson_sq_") for k in c) == 7


def _distillation(y_true, y_pred):
    teacher, student = tf.split(y_pred, 2)
    return tf.reduce_mean(tf.square(teacher - student))


def test_super_batched_slices_the_clean_and_noisy_halves():
    model = _model(CloakNoiseLayer(scale=(0.3, 1.0), seed=0))
    x = np.random.rand(6, 8, 8, 1).astype("float32")
    loss_fn, get_components, _ = image_similarity_cloak_loss_factory(
        model,
        _distillation,
        ms_ssim_weight=1.0,
        pearson_weight=1.0,
        image_mean=[0.5],
        image_std=[0.5],
        super_batched=True,
    )
    with model.distillation_context():
        out = model(x)
        loss_fn(None, out)
    components = get_components()
    assert components["task_loss"] == pytest.approx(
        float(_distillation(None, out)), rel=1e-5
    )
    # The components are those of the clean input against the noisy half.
    noisy = model.noise_layer.last_capture.outputs[6:]
    plain_fn, get_plain, _ = image_similarity_cloak_loss_factory(
        model,
        _distillation,
        ms_ssim_weight=1.0,
        pearson_weight=1.0,
        image_mean=[0.5],
        image_std=[0.5],
    )
    model.noise_layer.last_capture.inputs = tf.constant(x)
    model.noise_layer.last_capture.outputs = noisy
    plain_fn(None, out)
    plain = get_plain()
    for key, value in components.items():
        assert value == pytest.approx(plain[key], rel=1e-5), key


def test_super_batched_refuses_a_plain_batch_and_an_odd_super_batch():
    model = _model()
    x, y = _data(6)
    loss_fn, _, _ = _image_loss(model, super_batched=True)
    with pytest.raises(ValueError, match="distillation_context"):
        loss_fn(y, model(x))
    model(x[:5])
    model.noise_layer.last_capture.super_batched = (
        True  # as if 5 rows were a super-batch
    )
    with pytest.raises(ValueError, match="even size"):
        loss_fn(y[:5], tf.zeros((5, 10)))


def test_getters_may_be_called_once_per_evaluation():
    model = _model()
    x, y = _data(8)
    loss_fn, get_components, get_hyperparameters = composite_cloak_loss_factory(
        model, TASK, 0.5
    )
    with pytest.raises(RuntimeError, match="before the loss was evaluated"):
        get_components()
    loss_fn(y, model(x))
    get_components()
    get_hyperparameters()
    with pytest.raises(RuntimeError, match="at most once"):
        get_components()
    with pytest.raises(RuntimeError, match="at most once"):
        get_hyperparameters()
    loss_fn(y, model(x))
    get_components()


def test_loss_refuses_a_forward_pass_from_another_trace():
    model = _model()
    x, y = _data(8)
    loss_fn, _, _ = composite_cloak_loss_factory(model, TASK, 0.5)
    with pytest.raises(RuntimeError, match="has not run in this trace"):
        loss_fn(y, tf.zeros((8, 10)))

    @tf.function
    def forward(x):
        return model(x)

    forward(x)  # leaves a capture from a graph trace behind
    with pytest.raises(RuntimeError, match="has not run in this trace"):
        loss_fn(y, tf.zeros((8, 10)))

    @tf.function
    def loss_only(y):
        return loss_fn(y, tf.zeros((8, 10)))

    model(x)  # an eager capture cannot be read by a traced loss either
    with pytest.raises(RuntimeError, match="has not run in this trace"):
        loss_only(y)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"image_mean": [0.5, 0.5], "image_std": [0.5]}, ValueError, "same"),
        ({"image_std": [0.0]}, ValueError, "image_std"),
        ({"ms_ssim_weight": -1.0}, ValueError, "ms_ssim_weight"),
        ({"pearson_weight": float("nan")}, ValueError, "pearson_weight"),
        ({"gamma_values": (2.0, 2.0)}, ValueError, "distinct"),
        ({"gamma_values": (0.0,)}, ValueError, "gamma_values"),
        ({"blur_sigma": 0}, ValueError, "blur_sigma"),
        ({"wavelet_threshold": -0.1}, ValueError, "wavelet_threshold"),
    ],
)
def test_image_factory_refusals(kwargs, error, match):
    with pytest.raises(error, match=match):
        _image_loss(_model(), **kwargs)


def test_image_loss_refuses_images_that_do_not_match_the_channels():
    model = _model()
    x, y = _data(4)
    loss_fn, _, _ = _image_loss(model, image_mean=[0.5, 0.5, 0.5], image_std=[1, 1, 1])
    with pytest.raises(ValueError, match="channels-last"):
        loss_fn(y, model(x))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, True, float("nan"), "0.5"])
def test_composite_factory_refuses_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        composite_cloak_loss_factory(_model(), TASK, alpha)


def test_factories_refuse_a_model_that_is_not_noisy_and_a_non_callable_loss():
    with pytest.raises(TypeError, match="NoisyModel"):
        composite_cloak_loss_factory(keras.Sequential(), TASK, 0.5)
    with pytest.raises(TypeError, match="callable"):
        image_similarity_cloak_loss_factory(
            _model(),
            "mse",
            ms_ssim_weight=1,
            pearson_weight=1,
            image_mean=[0],
            image_std=[1],
        )


def test_task_loss_must_be_a_scalar():
    model = _model()
    x, y = _data(4)
    loss_fn, _, _ = composite_cloak_loss_factory(
        model,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None),
        0.5,
    )
    with pytest.raises(ValueError, match="scalar"):
        loss_fn(y, model(x))


@pytest.mark.parametrize("factory", ["composite", "image"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_two_epochs_lowers_the_composite_loss(factory, jit_compile):
    model = _model()
    x, y = _data(128)
    if factory == "composite":
        loss_fn, get_components, _ = composite_cloak_loss_factory(model, TASK, 0.5)
    else:
        loss_fn, get_components, _ = _image_loss(model)
    model.compile(keras.optimizers.Adam(0.05), loss=loss_fn, jit_compile=jit_compile)
    history = model.fit(
        x,
        y,
        epochs=2,
        batch_size=32,
        verbose=0,
        callbacks=[LossComponentsLogger(get_components, prefix="c_")],
    )
    losses = history.history["loss"]
    assert losses[1] < losses[0]
    logged = history.history["c_composite_loss"]
    assert logged[1] < logged[0]
    assert logged[1] == pytest.approx(losses[1], rel=1e-3)
