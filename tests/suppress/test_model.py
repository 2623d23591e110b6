"""SuppressModel and SuppressMasker: the masked step, training to the target
sparsity, the optimizer and callback refusals, save/load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.suppress import (
    MaskLayerDes,
    SuppressMasker,
    SuppressModel,
    SuppressPrivacyFactory,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _net(hidden=32):
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            keras.layers.Flatten(),
            keras.layers.Dense(hidden, name="fc1"),
            keras.layers.Dense(10, name="out"),
        ]
    )


def _data(n=320):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, n)


def _setup(
    net=None, layer="fc1/kernel", grad_idx=2, epochs=4, batch_num=10, lr=0.05, **kwargs
):
    net = net or _net()
    ctrl = SuppressPrivacyFactory.create(
        net,
        [MaskLayerDes(layer, grad_idx, False, False, -1)],
        end_epoch=epochs,
        batch_num=batch_num,
        start_epoch=1,
        mask_times=4 * batch_num,
        lr=lr,
        sparse_end=0.9,
        **kwargs,
    )
    model = SuppressModel(net, LOSS, keras.optimizers.SGD(lr), metrics=["accuracy"])
    model.link_suppress_ctrl(ctrl)
    return net, ctrl, model


def test_the_step_applies_g_prime_equals_a_plus_g_times_m():
    net = keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(1, use_bias=False, name="fc1")]
    )
    ctrl = SuppressPrivacyFactory.create(
        net,
        [MaskLayerDes("fc1/kernel", 0, False, True, 0)],
        end_epoch=5,
        batch_num=10,
        start_epoch=1,
        mask_times=10,
        lr=0.05,
        sparse_end=0.5,
    )
    model = SuppressModel(net, "mse", keras.optimizers.SGD(0.05))
    model.link_suppress_ctrl(ctrl)
    w = np.array([0.001, -0.003, 0.2, -0.6, 1.5, 0.004, -0.0001, 0.8, -1.3, 0.0])
    net.layers[0].kernel.assign(w[:, None])
    ctrl.mask_started = True
    ctrl.update_mask_layer(w, 0.001, 3, 1.5, 0)
    # Zero task gradient (zero input): w <- w - lr * A.
    model.fit(np.zeros((4, 10), "float32"), np.zeros((4, 1)), batch_size=4, verbose=0)
    np.testing.assert_allclose(
        net.layers[0].kernel.numpy()[:, 0],
        [0, -0.003, 0.2, -0.6, 1.2, 0.004, 0, 0.8, -1.2, 0],
        atol=1e-6,
    )
    # The add-mask is one-shot: once disarmed the step is w - lr * g * M (the
    # multiply-mask persists and zeroes the suppressed weights' gradient).
    ctrl.reset_zeros()
    x = np.random.rand(4, 10).astype("float32")
    before = net.layers[0].kernel.numpy()[:, 0].copy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.mean_squared_error(np.ones((4, 1)), net(x)))
    g = tape.gradient(loss, net.layers[0].kernel).numpy()[:, 0]
    model.fit(x, np.ones((4, 1)), batch_size=4, verbose=0)
    mul = ctrl.grads_mask_list[0].mul_mask_array_flat
    np.testing.assert_allclose(
        net.layers[0].kernel.numpy()[:, 0], before - 0.05 * g * mul, atol=1e-6
    )


def test_masks_are_not_applied_before_the_schedule_starts():
    net, ctrl, model = _setup()
    ctrl.grads_mask_list[2].mul_mask_array_flat[:] = 0
    ctrl.grads_mask_list[2].update()
    kernel = net.get_layer("fc1").kernel.numpy().copy()
    model.fit(*_data(32), batch_size=32, verbose=0)
    assert not np.allclose(net.get_layer("fc1").kernel.numpy(), kernel)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_training_reaches_the_scheduled_sparsity(jit_compile):
    net, ctrl, model = _setup()
    model.compile(keras.optimizers.SGD(0.05), LOSS, jit_compile=jit_compile)
    history = model.fit(
        *_data(),
        epochs=4,
        batch_size=32,
        verbose=0,
        callbacks=[SuppressMasker(model, ctrl)],
    )
    logs = history.history
    assert np.all(np.diff(logs["suppress_sparsity"]) > 0)
    assert ctrl.cur_sparse == pytest.approx(0.9, abs=1e-3)
    actual = ctrl.calc_actual_sparse_for_layer(net, "fc1/kernel")
    assert abs(actual - ctrl.cur_sparse) <= 0.01
    assert logs["actual_sparsity_fc1_kernel"][-1] == actual
    # Other layers are untouched by the masks.
    assert ctrl.calc_actual_sparse_for_layer(net, "out/kernel") == 0.0


def test_a_large_layer_reaches_the_scheduled_sparsity():
    net, ctrl, model = _setup(_net(hidden=160))  # fc1: 144 * 160 = 23040 weights
    assert ctrl.grads_mask_list[2].is_approximity
    model.fit(
        *_data(),
        epochs=4,
        batch_size=32,
        verbose=0,
        callbacks=[SuppressMasker(model, ctrl)],
    )
    actual = ctrl.calc_actual_sparse_for_layer(net, "fc1/kernel")
    assert abs(actual - ctrl.cur_sparse) <= 0.01
    assert ctrl.cur_sparse == pytest.approx(0.9, abs=1e-3)


def test_save_and_load_keeps_masks_and_controller_state(tmp_path):
    x, y = _data()
    net, ctrl, model = _setup(epochs=4)
    model.fit(
        x,
        y,
        epochs=2,
        batch_size=32,
        verbose=0,
        callbacks=[SuppressMasker(model, ctrl)],
    )
    path = tmp_path / "suppress.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    new_ctrl = loaded.suppress_ctrl
    assert isinstance(loaded, SuppressModel) and new_ctrl.model is loaded
    assert new_ctrl.get_config() == ctrl.get_config()
    for a, b in zip(new_ctrl.grads_mask_list, ctrl.grads_mask_list, strict=True):
        np.testing.assert_array_equal(a.mul_mask_array_flat, b.mul_mask_array_flat)
    for a, b in zip(
        new_ctrl.de_weight_mask_list, ctrl.de_weight_mask_list, strict=True
    ):
        np.testing.assert_array_equal(a.add_mask_array_flat, b.add_mask_array_flat)
        assert a.just_update == b.just_update
    assert int(loaded.optimizer.iterations.numpy()) == 20
    # Resuming both for the last 2 epochs gives the same weights and state.
    for m, c in ((model, ctrl), (loaded, new_ctrl)):
        m.fit(
            x,
            y,
            epochs=4,
            initial_epoch=2,
            batch_size=32,
            verbose=0,
            shuffle=False,
            callbacks=[SuppressMasker(m, c)],
        )
    for a, b in zip(loaded.network.weights, model.network.weights, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert new_ctrl.cur_sparse == ctrl.cur_sparse


def test_optimizer_refusals():
    net = _net()
    with pytest.raises(TypeError, match="SGD"):
        SuppressModel(net, LOSS, keras.optimizers.Adam(0.05))
    with pytest.raises(ValueError, match="momentum"):
        SuppressModel(net, LOSS, keras.optimizers.SGD(0.05, momentum=0.9))
    with pytest.raises(ValueError, match="weight_decay"):
        SuppressModel(net, LOSS, keras.optimizers.SGD(0.05, weight_decay=1e-4))
    with pytest.raises(ValueError, match="clipnorm"):
        SuppressModel(net, LOSS, keras.optimizers.SGD(0.05, clipnorm=1.0))
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.9)
    with pytest.raises(ValueError, match="schedule"):
        SuppressModel(net, LOSS, keras.optimizers.SGD(schedule))
    with pytest.raises(ValueError, match="needs an optimizer"):
        SuppressModel(net, LOSS, None)
    with pytest.raises(TypeError, match="network"):
        SuppressModel("net", LOSS, keras.optimizers.SGD(0.05))
    _, ctrl, model = _setup(lr=0.05)
    with pytest.raises(ValueError, match="momentum"):
        model.compile(keras.optimizers.SGD(0.05, momentum=0.5), LOSS)
    with pytest.raises(ValueError, match="controller's lr"):
        model.compile(keras.optimizers.SGD(0.1), LOSS)


def test_link_refusals():
    net, ctrl, model = _setup()
    with pytest.raises(ValueError, match="already linked"):
        model.link_suppress_ctrl(ctrl)
    other = SuppressModel(_net(), LOSS, keras.optimizers.SGD(0.05))
    with pytest.raises(ValueError, match="another network"):
        other.link_suppress_ctrl(ctrl)
    with pytest.raises(TypeError, match="suppress_pri_ctrl"):
        other.link_suppress_ctrl("ctrl")
    mismatch = SuppressModel(net, LOSS, keras.optimizers.SGD(0.1))
    ctrl2 = SuppressPrivacyFactory.create(
        net, [MaskLayerDes("fc1/kernel", 2, False, False, -1)], lr=0.05
    )
    with pytest.raises(ValueError, match="controller's lr"):
        mismatch.link_suppress_ctrl(ctrl2)


def test_masker_refusals():
    net, ctrl, model = _setup()
    with pytest.raises(TypeError, match="model"):
        SuppressMasker(net, ctrl)
    with pytest.raises(TypeError, match="suppress_ctrl"):
        SuppressMasker(model, None)
    x, y = _data(64)
    with pytest.raises(ValueError, match="batch_num"):
        model.fit(
            x, y, batch_size=32, verbose=0, callbacks=[SuppressMasker(model, ctrl)]
        )
    unlinked = SuppressModel(_net(), LOSS, keras.optimizers.SGD(0.05))
    with pytest.raises(ValueError, match="not linked"):
        unlinked.fit(
            x, y, batch_size=32, verbose=0, callbacks=[SuppressMasker(unlinked, ctrl)]
        )
    ctrl.mask_initialized = False
    with pytest.raises(ValueError, match="Not initialize network"):
        model.fit(
            *_data(320),
            batch_size=32,
            verbose=0,
            callbacks=[SuppressMasker(model, ctrl)],
        )
    net2, ctrl2, model2 = _setup()
    model2.compile(keras.optimizers.SGD(0.05), LOSS, steps_per_execution=2)
    with pytest.raises(ValueError, match="steps_per_execution"):
        model2.fit(
            *_data(320),
            batch_size=32,
            verbose=0,
            callbacks=[SuppressMasker(model2, ctrl2)],
        )
