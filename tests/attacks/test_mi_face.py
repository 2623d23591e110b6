"""MI-FACE: the cost falls, process_func is respected, the log is complete."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.attacks import MI_FACE


def _classifier():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    return model


def test_cost_falls_and_the_log_holds_pre_update_costs():
    model = _classifier()
    attack = MI_FACE(
        model,
        input_shape=(1, 4, 4, 1),
        target_label=2,
        lam=1.0,
        num_itr=30,
        log_interval=0,
    )
    x, log = attack.attack()
    assert len(log) == 30 and len(attack.log_image) == 30
    assert log[-1] < log[0]
    assert log[0] == pytest.approx(
        1 - float(model(tf.zeros((1, 4, 4, 1)))[0, 2]), rel=1e-6
    )
    np.testing.assert_allclose(x, attack.log_image[-1])
    assert attack.best_cost <= min(log)
    assert float(model(x)[0, 2]) > float(model(tf.zeros((1, 4, 4, 1)))[0, 2])


def test_process_func_is_applied_after_each_step():
    model = _classifier()
    attack = MI_FACE(
        model,
        input_shape=(1, 4, 4, 1),
        target_label=0,
        lam=5.0,
        num_itr=10,
        process_func=lambda x: tf.clip_by_value(x, 0.0, 0.1),
        log_interval=0,
    )
    x, _ = attack.attack()
    for image in attack.log_image:
        assert image.min() >= 0.0 and image.max() <= 0.1


def test_auxterm_and_softmax_and_init():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    init = np.ones((1, 2), "float32")
    attack = MI_FACE(
        model,
        input_shape=(1, 2),
        target_label=1,
        lam=0.1,
        num_itr=5,
        apply_softmax=True,
        auxterm_func=lambda x: tf.reduce_sum(x**2),
        log_interval=0,
    )
    _, log = attack.attack(init_x=init)
    p = tf.nn.softmax(model(init), axis=1)
    assert log[0] == pytest.approx(1 - float(p[0, 1]) + 2.0, rel=1e-6)
    with pytest.raises(ValueError, match="init_x"):
        attack.attack(init_x=np.ones((1, 3)))


def test_refusals():
    with pytest.raises(ValueError, match="batch of 1"):
        MI_FACE(_classifier(), input_shape=(2, 4, 4, 1))
    with pytest.raises(ValueError, match="num_itr"):
        MI_FACE(_classifier(), input_shape=(1, 4, 4, 1), num_itr=0)
