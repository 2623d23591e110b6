"""SuppressCtrl: the schedule and layer-update vectors of docs/ports.md, the
update rule against a literal one-weight-at-a-time reference, validations."""

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext.suppress import (
    MaskLayerDes,
    SuppressCtrl,
    SuppressPrivacyFactory,
    update_layer_masks,
)
from deel_lipdp_ext.suppress.masks import part_count

W = np.array([0.001, -0.003, 0.2, -0.6, 1.5, 0.004, -0.0001, 0.8, -1.3, 0.0])


def _network(units=4, inputs=3):
    return keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(units, name="fc1"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def _ctrl(net=None, layers=None, **kwargs):
    net = net or _network()
    layers = layers or [MaskLayerDes("fc1/kernel", 0, False, False, -1)]
    args = {
        "end_epoch": 10,
        "batch_num": 20,
        "start_epoch": 3,
        "mask_times": 1000,
        "lr": 0.05,
        "sparse_end": 0.9,
        "sparse_start": 0.0,
        **kwargs,
    }
    return SuppressCtrl(net, layers, **args)


def test_schedule_a_vectors():
    # docs/ports.md, schedule A (the upstream unit-test config), to 1e-6.
    net = _network()
    net.layers[0].kernel.assign(np.linspace(-1, 1, 12).reshape(3, 4))
    ctrl = _ctrl(
        net,
        end_epoch=5,
        start_epoch=1,
        batch_num=10,
        mask_times=10,
        sparse_end=0.5,
        sparse_start=0.0,
    )
    assert ctrl.mask_all_steps == 50 and ctrl.mask_step_interval == 5.0
    masked = []
    for step in range(1, 51):
        epoch, in_epoch = (step - 1) // 10 + 1, (step - 1) % 10 + 1
        ctrl.update_status(epoch, step, in_epoch)
        if ctrl.to_do_mask:
            ctrl.update_mask(net, step)
            masked.append((epoch, step, ctrl.cur_sparse))
    expected = [
        (1, 5, 0.110656),
        (1, 10, 0.224316),
        (2, 15, 0.313376),
        (2, 20, 0.380836),
        (3, 25, 0.429696),
        (3, 30, 0.462956),
        (4, 35, 0.483616),
        (4, 40, 0.494676),
        (5, 45, 0.499136),
        (5, 48, 0.499892),
    ]
    assert [(e, s) for e, s, _ in masked] == [(e, s) for e, s, _ in expected]
    np.testing.assert_allclose(
        [c for *_, c in masked], [c for *_, c in expected], atol=1e-6
    )
    assert ctrl.mask_start_step == 1
    # mask_started latches: masking goes on at the interval after end_epoch.
    ctrl.update_status(6, 53, 3)
    assert ctrl.mask_started and ctrl.to_do_mask


def test_default_mask_times_masks_every_step():
    ctrl = _ctrl()
    assert ctrl.mask_step_interval == pytest.approx(0.16)
    for step in range(41, 45):
        ctrl.update_status(3, step, step - 40)
        assert ctrl.to_do_mask


def _literal_update(w, mul, thd, stop, wmax, lr, min_num, lower, noise, ub):
    """MindArmour's per-weight rules (docs/ports.md), one weight at a time."""
    mul, add = mul.astype(float).copy(), np.zeros_like(w)
    m = n = p = q = 0
    lb = 0.005
    for i, wi in enumerate(w):
        if mul[i] <= 0:
            add[i] = wi / lr
            m += 1
        elif abs(wi) <= thd:
            if m < w.size - min_num and m < stop:
                mul[i], add[i] = 0, wi / lr
                m += 1
            else:
                b = min(lb, thd)
                add[i] = (wi - b) / lr if wi > 0 else (wi + b) / lr
                p += 1
        elif lower and abs(wi) <= lb and thd > 0.5 * lb:
            mul[i] = 1
            add[i] = (wi - lb) / lr if wi > 0 else (wi + lb) / lr
            p += 1
        elif abs(wi) > ub:
            mul[i] = 1
            add[i] = (wi - ub) / lr if wi > 0 else (wi + ub) / lr
            n += 1
        else:
            mul[i], add[i] = 1, 0.0
    return mul, add, (m, n, p, q)


@pytest.mark.parametrize(
    "stop, thd, mul, add, counts, after",
    [
        (
            3,
            0.001,
            [0, 1, 1, 1, 1, 1, 0, 1, 1, 0],
            [0.02, 0, 0, 0, 6.0, 0, -0.002, 0, -2.0, 0],
            (3, 2, 0, 0),
            [0, -0.003, 0.2, -0.6, 1.2, 0.004, 0, 0.8, -1.2, 0],
        ),
        (
            4,
            0.003,
            [0, 0, 1, 1, 1, 1, 0, 1, 1, 0],
            [0.02, -0.06, 0, 0, 6.0, -0.02, -0.002, 0, -2.0, 0],
            (4, 2, 1, 0),
            [0, 0, 0.2, -0.6, 1.2, 0.005, 0, 0.8, -1.2, 0],
        ),
    ],
)
def test_layer_update_vectors(stop, thd, mul, add, counts, after):
    # docs/ports.md layer update, lr 0.05, ub 1.2, lower clip on, no noise.
    assert float(np.partition(np.abs(W), stop - 1)[stop - 1]) == thd
    got_mul, got_add, got_counts = update_layer_masks(
        W,
        np.ones(10),
        thd,
        stop,
        np.abs(W).max(),
        0.05,
        min_num=0,
        is_lower_clip=True,
        is_add_noise=False,
        upper_bound=1.2,
    )
    np.testing.assert_array_equal(got_mul, mul)
    np.testing.assert_allclose(got_add, add, atol=1e-6)
    assert got_counts == counts
    # One plain SGD step with zero task gradient: w - lr * (A + 0 * M).
    np.testing.assert_allclose(W - 0.05 * got_add, after, atol=1e-6)


@given(
    weights=st.lists(st.floats(-2, 2, allow_nan=False), min_size=1, max_size=40),
    ties=st.booleans(),
    stop_frac=st.floats(0.0, 1.0),
    min_num=st.integers(-1, 10),
    lower=st.booleans(),
    premasked=st.integers(0, 2**40),
)
def test_vectorised_update_equals_the_literal_rule(
    weights, ties, stop_frac, min_num, lower, premasked
):
    w = np.array(weights)
    if ties:
        w = np.round(w, 1)  # many weights tie at the threshold
    mul = np.array(
        [0.0 if (premasked >> i) & 1 and i % 3 == 0 else 1.0 for i in range(w.size)]
    )
    stop = max(1, int(stop_frac * w.size))
    thd = float(np.partition(np.abs(w), stop - 1)[stop - 1])
    args = (w, mul, thd, stop, float(np.abs(w).max()), 0.05)
    got = update_layer_masks(
        *args, min_num=min_num, is_lower_clip=lower, is_add_noise=False, upper_bound=1.2
    )
    ref = _literal_update(*args, min_num, lower, False, 1.2)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-6, atol=1e-6)
    assert got[2] == ref[2]


def test_noise_is_added_to_large_kept_weights_only():
    np.random.seed(3)
    mul, add, counts = update_layer_masks(
        W,
        np.ones(10),
        0.001,
        3,
        1.5,
        0.05,
        min_num=0,
        is_lower_clip=False,
        is_add_noise=True,
        upper_bound=1.2,
    )
    noised = np.abs(W) > 0.5
    noised &= np.abs(W) <= 1.2  # upper clipping comes first
    assert counts[3] == int(noised.sum()) == 2
    assert np.all(np.abs(add[noised] * 0.05) <= 0.1)
    assert np.all(add[(~noised) & (np.abs(W) < 0.5) & (mul > 0)] == 0)


def test_min_num_keeps_weights():
    mul, add, counts = update_layer_masks(
        W,
        np.ones(10),
        0.2,
        5,
        1.5,
        0.05,
        min_num=7,
        is_lower_clip=False,
        is_add_noise=False,
        upper_bound=1.2,
    )
    assert counts[0] == 3  # size - min_num = 3 suppressed at most
    assert int((mul == 0).sum()) == 3


def test_part_count():
    assert part_count(10_000) == 1
    assert part_count(2 * 10**9) == 2
    assert part_count(2**34) == 16
    assert part_count(10**9 + 1) == 1  # odd: cannot halve


def test_masks_match_parameters_by_path_substring():
    net = _network()
    ctrl = _ctrl(net, [MaskLayerDes("fc1/kernel", 0, True, True, 2, upper_bound=0.05)])
    mask = ctrl.grads_mask_list[0]
    assert mask.mask_able and mask.shape == (3, 4) and mask.upper_bound == 0.1
    assert ctrl.grad_idx_map == [0, -1, -1, -1]
    assert not ctrl.grads_mask_list[1].mask_able
    assert ctrl.mask_initialized


def test_large_layers_use_the_threshold_update():
    net = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(2, name="first"),
            keras.layers.Dense(10_001, name="big"),
        ]
    )
    ctrl = _ctrl(net, [MaskLayerDes("big/kernel", 2, True, True, -1)], sparse_end=0.5)
    mask = ctrl.grads_mask_list[2]
    assert mask.is_approximity and not mask.is_add_noise and not mask.is_lower_clip
    kernel = net.layers[1].kernel
    values = np.random.permutation(np.arange(1, kernel.shape.num_elements() + 1))
    kernel.assign(values.reshape(kernel.shape).astype("float32") / values.size)
    ctrl.mask_start_step = 0
    ctrl.update_mask(net, 0, target_sparse=0.3)
    suppressed = int((mask.mul_mask_array_flat == 0).sum())
    n = mask.para_num
    assert mask.sparse_pos_list[-1] == suppressed
    assert abs(suppressed - int(0.3 * n)) <= 1
    # Every suppressed weight is below every kept one.
    flat = np.abs(kernel.numpy()).reshape(-1)
    assert (
        flat[mask.mul_mask_array_flat == 0].max()
        < flat[mask.mul_mask_array_flat > 0].min()
    )
    # No increase of the stop position (< last + part_num) leaves the layer idle.
    ctrl.update_mask(net, 0, target_sparse=0.3)
    assert mask.sparse_pos_list == [0, suppressed]
    # One more weight: the next smallest unmasked one is suppressed.
    ctrl.update_mask(net, 0, target_sparse=(suppressed + 1.5) / n)
    assert mask.sparse_pos_list[-1] == suppressed + 1


def test_a_small_first_parameter_aborts_the_update():
    net = _network()
    net.layers[0].kernel.assign(np.full((3, 4), 0.01))
    ctrl = _ctrl(net)
    ctrl.update_mask(net, 100, target_sparse=0.5)
    assert ctrl.cur_sparse == 0.5
    assert ctrl.grads_mask_list[0].sparse_pos_list == [0]


def test_sparsity_helpers():
    net = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Conv2D(2, 3, name="conv1"),
            keras.layers.Conv2D(2, 3, name="conv2"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc1"),
        ]
    )
    ctrl = _ctrl(net, [MaskLayerDes("conv1/kernel", 0, False, False, -1)])
    ctrl.grads_mask_list[0].mul_mask_array_flat[:9] = 0
    combined, first, second = ctrl.calc_theoretical_sparse_for_conv()
    # Gradient 1 (the bias) is a placeholder of one entry.
    assert (first, second) == (0.5, 0.0) and combined == pytest.approx(9 / 19)
    kernel = net.layers[1].kernel
    kernel.assign(np.zeros(kernel.shape))
    combined, first, second = ctrl.calc_actual_sparse_for_conv(net)
    assert (first, second) == (0.0, 1.0) and combined == pytest.approx(36 / 54)
    assert ctrl.calc_actual_sparse_for_layer(net, "conv2/kernel") == 1.0
    assert ctrl.calc_actual_sparse_for_layer(net, "nothing") == 0.0
    with pytest.raises(TypeError, match="layer_name"):
        ctrl.calc_actual_sparse_for_layer(net, 3)
    with pytest.raises(TypeError, match="networks"):
        ctrl.calc_actual_sparse_for_layer("net", "conv1")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"end_epoch": True}, ValueError, "should not be bool"),
        ({"batch_num": 2.0}, TypeError, "batch_num"),
        ({"start_epoch": 0}, ValueError, "start_epoch"),
        ({"mask_times": -1}, ValueError, "mask_times"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": 0.6}, ValueError, "lr"),
        ({"sparse_end": 1}, TypeError, "sparse_end"),
        ({"sparse_start": None}, TypeError, "sparse_start"),
        ({"sparse_start": -0.1}, ValueError, "sparse_start"),
        ({"start_epoch": 11}, ValueError, "start_epoch"),
        ({"end_epoch": 101}, ValueError, "end_epoch"),
        ({"sparse_end": 1.0}, ValueError, "sparse_end"),
        ({"sparse_end": 0.0}, ValueError, "sparse_end"),
        ({"sparse_start": 0.9}, ValueError, "sparse_start"),
    ],
)
def test_controller_validations(kwargs, error, match):
    with pytest.raises(error, match=match):
        _ctrl(**kwargs)


def test_end_epoch_100_is_allowed():
    assert _ctrl(end_epoch=100).end_epoch == 100


@pytest.mark.parametrize(
    "networks, layers, error, match",
    [
        ("net", None, TypeError, "networks"),
        (None, ("fc1/kernel",), TypeError, "mask_layers"),
        (None, ["fc1/kernel"], ValueError, "MaskLayerDes"),
        (
            None,
            [
                MaskLayerDes("fc1/kernel", 0, False, False, -1),
                MaskLayerDes("fc1/kernel", 2, False, False, -1),
            ],
            ValueError,
            "duplicate",
        ),
        (
            None,
            [
                MaskLayerDes("fc1/kernel", 0, False, False, -1),
                MaskLayerDes("out/kernel", 0, False, False, -1),
            ],
            ValueError,
            "duplicate",
        ),
        (None, [MaskLayerDes("conv9", 0, False, False, -1)], ValueError, "can't match"),
        (
            None,
            [MaskLayerDes("fc1/kernel", 1, False, False, -1)],
            ValueError,
            "grad_idx",
        ),
        (
            None,
            [MaskLayerDes("fc1/kernel", 9, False, False, -1)],
            ValueError,
            "grad_idx",
        ),
    ],
)
def test_mask_layer_list_validations(networks, layers, error, match):
    net = _network() if networks is None else networks
    with pytest.raises(error, match=match):
        SuppressCtrl(net, layers, 10, 20, 3, 1000, 0.05, 0.9, 0.0)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((1, 0, False, False, 0), TypeError, "layer_name"),
        (("a", 0.0, False, False, 0), TypeError, "grad_idx"),
        (("a", True, False, False, 0), TypeError, "grad_idx"),
        (("a", -1, False, False, 0), ValueError, "grad_idx"),
        (("a", 0, 1, False, 0), TypeError, "is_add_noise"),
        (("a", 0, False, None, 0), TypeError, "is_lower_clip"),
        (("a", 0, False, False, 0.5), TypeError, "min_num"),
        (("a", 0, False, False, 0, "1"), TypeError, "upper_bound"),
        (("a", 0, False, False, 0, 0), ValueError, "upper_bound"),
    ],
)
def test_mask_layer_des_validations(args, error, match):
    with pytest.raises(error, match=match):
        MaskLayerDes(*args)


def test_factory_policy():
    net = _network()
    layers = [MaskLayerDes("fc1/kernel", 0, False, False, -1)]
    ctrl = SuppressPrivacyFactory.create(net, layers)
    assert (ctrl.end_epoch, ctrl.batch_num, ctrl.start_epoch, ctrl.lr) == (
        10,
        20,
        3,
        0.05,
    )
    with pytest.raises(TypeError, match="policy"):
        SuppressPrivacyFactory.create(net, layers, policy=1)
    with pytest.raises(ValueError, match="Only local training"):
        SuppressPrivacyFactory.create(net, layers, policy="federated")


def test_short_intervals_only_log(caplog):
    with caplog.at_level("INFO", logger="deel_lipdp_ext.suppress"):
        _ctrl(mask_times=1000)
    assert "precision may be poor" in caplog.text
