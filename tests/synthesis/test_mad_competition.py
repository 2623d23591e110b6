"""MADCompetition (docs/ports.md): structure, objective, auto-lambda, progress,
save/load checks, penalty/metric validation and the plots."""

import warnings

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf

from deel_lipdp_ext.imaging import metrics
from deel_lipdp_ext.synthesis import (
    LoadWarning,
    MADCompetition,
    mad_imshow_all,
    mad_loss_all,
    penalize_range,
)
from deel_lipdp_ext.synthesis.mad_competition import tradeoff_lambda_for_ratio

matplotlib.use("Agg")


def mse(x, y):
    return tf.reduce_mean(metrics.mse(x, y))


def dssim(x, y):
    return 1 - tf.reduce_mean(metrics.ssim(x, y))


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.random((1, 16, 16, 1), dtype=np.float32))


def _mad(minmax="min", lam=10.0, image=None, **kwargs):
    return MADCompetition(
        image if image is not None else _image(),
        mse,
        dssim,
        minmax,
        metric_tradeoff_lambda=lam,
        **kwargs,
    )


def test_penalize_range():
    assert float(penalize_range(tf.constant([-0.5, 0.2, 1.5]))) == pytest.approx(0.5)
    assert float(penalize_range(tf.random.uniform((2, 4, 4, 1)))) == 0.0


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.004, 0.01),
        (37.0, 100.0),
        (10**-0.5, 1.0),
        (10**0.5, 1.0),
        (10**1.5, 100.0),
        (10**2.5, 100.0),
    ],
)
def test_auto_lambda_rule_rounds_log10_half_to_even(ratio, expected):
    assert tradeoff_lambda_for_ratio(ratio) == expected


def test_auto_lambda_balances_the_metrics_on_noise():
    image = _image()

    def scaled(x, y):
        return 40.0 * mse(x, y)

    with pytest.warns(UserWarning, match="automatically set to 100.0"):
        mad = MADCompetition(image, scaled, mse, "min")
    assert mad.metric_tradeoff_lambda == 100.0


def test_lengths_before_and_after_setup_and_two_iterations():
    mad = _mad()
    assert len(mad.losses) == len(mad.penalties) == 0
    assert tf.size(mad.objective_function()) == 0
    assert tf.size(mad.mad_image) == 0
    mad.setup()
    assert len(mad.losses) == len(mad.penalties) == 1
    mad.synthesize(max_iter=2)
    assert len(mad.losses) == len(mad.penalties) == 3
    assert len(mad.gradient_norm) == len(mad.pixel_change_norm) == 2
    assert len(mad.reference_metric_loss) == len(mad.optimized_metric_loss) == 3


def test_metric_histories_are_lagged_as_upstream():
    mad = _mad()
    mad.setup()
    x0 = mad.mad_image.numpy().copy()
    mad.synthesize(max_iter=2)
    ref = mad.reference_metric_loss.numpy()
    opt = mad.optimized_metric_loss.numpy()
    # Entry 0 (setup) and entry 1 (iterate 0) are both the value at x_hat_0.
    assert ref[0] == pytest.approx(ref[1]) and opt[0] == pytest.approx(opt[1])
    assert opt[0] == pytest.approx(float(mse(mad.image, x0)), rel=1e-6)
    # The final image's value is not appended.
    final = float(mse(mad.image, mad.mad_image))
    assert opt[-1] != pytest.approx(final, rel=1e-9)


def test_objective_at_the_start_is_the_optimized_metric():
    mad = _mad(lam=10.0, penalty_lambda=0.0)
    mad.setup()
    assert float(mad.objective_function()) == pytest.approx(
        float(mse(mad.image, mad.mad_image)), rel=1e-6
    )
    mad_max = _mad("max", penalty_lambda=0.0)
    mad_max.setup()
    assert float(mad_max.objective_function()) == pytest.approx(
        -float(mse(mad_max.image, mad_max.mad_image)), rel=1e-6
    )


@pytest.mark.parametrize("minmax", ["min", "max"])
def test_synthesis_moves_the_optimized_metric_and_holds_the_reference(minmax):
    mad = _mad(minmax, lam=100.0)
    mad.setup(initial_noise=0.05)
    start_opt = float(mse(mad.image, mad.mad_image))
    target = float(dssim(mad.image, mad.mad_image))
    mad.synthesize(max_iter=60)
    end_opt = float(mse(mad.image, mad.mad_image))
    assert (end_opt < start_opt) if minmax == "min" else (end_opt > start_opt)
    assert float(dssim(mad.image, mad.mad_image)) == pytest.approx(target, abs=0.05)


def test_store_progress_and_get_progress():
    mad = _mad()
    mad.synthesize(max_iter=5, store_progress=2)
    assert mad.saved_mad_image.shape[0] == 4  # iterations 0, 2, 4 and the current
    with pytest.warns(UserWarning, match="not the same"):
        progress = mad.get_progress(3, iteration_selection="floor")
    assert progress["store_progress_iteration"] == 2
    np.testing.assert_array_equal(progress["saved_mad_image"], mad.saved_mad_image[1])
    last = mad.get_progress(None)
    assert last["gradient_norm"] is None and last["iteration"] == 5
    assert mad.get_progress(-1)["iteration"] == 5
    with pytest.raises(IndexError, match="out of bounds"):
        mad.get_progress(6)
    with pytest.raises(ValueError, match="same store_progress"):
        mad.synthesize(max_iter=1, store_progress=True)


def test_setup_rules():
    mad = _mad()
    mad.setup(optimizer=keras.optimizers.SGD, optimizer_kwargs={"momentum": 0.5})
    assert isinstance(mad.optimizer, keras.optimizers.SGD)
    assert float(mad.optimizer.learning_rate.numpy()) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="only be called once"):
        mad.setup()
    default = _mad()
    default.setup()
    assert (
        isinstance(default.optimizer, keras.optimizers.Adam)
        and default.optimizer.amsgrad
    )


def test_convergence_stops_early_and_nan_raises():
    mad = _mad(lam=0.0, penalty_lambda=0.0)
    mad.setup(optimizer=keras.optimizers.SGD, optimizer_kwargs={"lr": 0.0})
    with pytest.warns(UserWarning, match="converged"):
        mad.synthesize(max_iter=20, stop_iters_to_check=3)
    assert len(mad.losses) == 5

    def broken(x, y):
        return mse(x, y) * tf.where(tf.reduce_max(y) > 10, np.nan, 1.0)

    nan_mad = MADCompetition(
        _image(), broken, dssim, "max", metric_tradeoff_lambda=1.0, penalty_lambda=0.0
    )
    nan_mad.setup(optimizer=keras.optimizers.SGD, optimizer_kwargs={"lr": 1e4})
    with pytest.raises(ValueError, match="NaN"):
        nan_mad.synthesize(max_iter=50)


class _Halving:
    def __init__(self, optimizer, factor=0.5):
        self.optimizer, self.factor, self.calls = optimizer, factor, 0

    def step(self):
        self.calls += 1
        self.optimizer.learning_rate.assign(self.optimizer.learning_rate * self.factor)

    def state_dict(self):
        return {"calls": self.calls, "factor": self.factor}

    def load_state_dict(self, state):
        self.calls, self.factor = state["calls"], state["factor"]


def test_scheduler_steps_after_each_iteration():
    mad = _mad()
    mad.setup(scheduler=_Halving)
    mad.synthesize(max_iter=3)
    assert mad.scheduler.calls == 3
    assert float(mad.optimizer.learning_rate.numpy()) == pytest.approx(0.01 / 8)


def test_save_load_round_trip_and_resume(tmp_path):
    path = str(tmp_path / "mad.npz")
    mad = _mad()
    mad.synthesize(max_iter=3, store_progress=True)
    mad.save(path)
    loaded = _mad()
    loaded.load(path)
    np.testing.assert_array_equal(loaded.mad_image, mad.mad_image)
    np.testing.assert_allclose(loaded.losses, mad.losses)
    np.testing.assert_allclose(loaded.saved_mad_image, mad.saved_mad_image)
    # Adam state is restored: both continue identically.
    mad.synthesize(max_iter=2, store_progress=True)
    loaded.synthesize(max_iter=2, store_progress=True)
    np.testing.assert_allclose(loaded.mad_image, mad.mad_image, rtol=1e-6)
    assert len(loaded.losses) == 6


def test_load_checks(tmp_path):
    path = str(tmp_path / "mad.npz")
    mad = _mad()
    mad.synthesize(max_iter=1)
    mad.save(path)
    with pytest.raises(ValueError, match="just-initialized"):
        mad.load(path)
    with pytest.raises(ValueError, match="_image are different"):
        _mad(image=_image(seed=1)).load(path)
    with pytest.raises(ValueError, match="_metric_tradeoff_lambda"):
        _mad(lam=3.0).load(path)
    with pytest.raises(ValueError, match="_minmax"):
        _mad("max").load(path)
    with pytest.raises(ValueError, match="dtype"):
        _mad(image=tf.cast(_image(), tf.float64)).load(path)

    def mse_renamed(x, y):
        return tf.reduce_mean(metrics.mse(x, y))

    renamed = MADCompetition(
        _image(), mse_renamed, dssim, "min", metric_tradeoff_lambda=10
    )
    with pytest.raises(ValueError, match="different names"):
        renamed.load(path)

    def mse(x, y):  # same name, other values
        return 2 * tf.reduce_mean(metrics.mse(x, y))

    other = MADCompetition(_image(), mse, dssim, "min", metric_tradeoff_lambda=10)
    with pytest.raises(ValueError, match="_optimized_metric output"):
        other.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _mad(lam=3.0).load(path, raise_on_checks=False)
    assert any(issubclass(w.category, LoadWarning) for w in caught)


def test_setup_after_load_rules(tmp_path):
    path = str(tmp_path / "mad.npz")
    mad = _mad()
    mad.setup(optimizer=keras.optimizers.SGD, scheduler=_Halving)
    mad.synthesize(max_iter=1)
    mad.save(path)
    loaded = _mad()
    with pytest.warns(UserWarning, match="call setup"):
        loaded.load(path)
    with pytest.raises(ValueError, match="initial_noise"):
        loaded.setup(initial_noise=0.2)
    with pytest.raises(ValueError, match="must be None"):
        loaded.setup(optimizer=keras.optimizers.SGD, optimizer_kwargs={"lr": 1})
    with pytest.raises(ValueError, match="same type"):
        loaded.setup(optimizer=keras.optimizers.Adam)
    with pytest.raises(TypeError, match="saved scheduler"):
        loaded.setup(optimizer=keras.optimizers.SGD)
    again = _mad()
    again.load(path)
    with pytest.raises(
        ValueError, match="Don't know how to initialize saved optimizer"
    ):
        again.synthesize(max_iter=1)
    again.setup(optimizer=keras.optimizers.SGD, scheduler=_Halving)
    assert again.scheduler.calls == 1
    again.synthesize(max_iter=1)
    assert len(again.losses) == 3


def test_constructor_checks():
    image = _image()
    with pytest.raises(Exception, match="penalty_lambda must be non-negative"):
        _mad(penalty_lambda=-1)
    with pytest.raises(TypeError, match="float or complex"):
        MADCompetition(tf.zeros((1, 4, 4, 1), tf.int32), mse, dssim, "min", 1.0)
    with pytest.warns(UserWarning, match="outside"):
        MADCompetition(image * 2, mse, mse, "min", 1.0)
    with pytest.raises(ValueError, match="min', 'max"):
        _mad("median")
    with pytest.raises(TypeError, match="accept two tensors"):
        MADCompetition(image, lambda x: x, dssim, "min", 1.0)
    with pytest.raises(ValueError, match="scalar"):
        MADCompetition(
            image, lambda x, y: metrics.mse(x, y)[0] * tf.ones(2), dssim, "min", 1.0
        )
    with pytest.raises(ValueError, match="identical"):
        MADCompetition(image, lambda x, y: mse(x, y) + 1.0, dssim, "min", 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        MADCompetition(
            image, lambda x, y: -mse(x, y) - 1e-3 * tf.reduce_mean(y), dssim, "min", 1.0
        )


def test_penalty_checks():
    image = _image()
    variable = tf.Variable(1.0)
    bad = [
        ("not callable", 3.0, TypeError, "callable"),
        ("learnable", lambda x: variable * tf.reduce_sum(x), ValueError, "learnable"),
        ("not a tensor", lambda x: 1.0, ValueError, "tensor"),
        ("not scalar", lambda x: tf.reduce_sum(x, axis=2), ValueError, "single"),
        ("integer", lambda x: tf.cast(tf.reduce_sum(x), tf.int32), TypeError, "float"),
        ("dtype", lambda x: tf.cast(tf.reduce_sum(x), tf.float64), TypeError, "dtype"),
        (
            "no gradient",
            lambda x: tf.stop_gradient(tf.reduce_sum(x)),
            ValueError,
            "differentiable",
        ),
    ]
    for label, penalty, error, match in bad:
        with pytest.raises(error, match=match):
            _mad(image=image, penalty_function=penalty)
            pytest.fail(f"accepted a penalty: {label}")


def test_to_casts_the_images():
    mad = _mad()
    mad.synthesize(max_iter=1, store_progress=True)
    mad.to(tf.float64)
    assert mad.image.dtype == tf.float64 and mad.mad_image.dtype == tf.float64
    assert mad.saved_mad_image.dtype == tf.float64
    with pytest.raises(ValueError, match="floating"):
        mad.to(tf.int32)


def test_plots():
    mads = []
    for optimized, reference in ((mse, dssim), (dssim, mse)):
        for minmax in ("min", "max"):
            mad = MADCompetition(
                _image(), optimized, reference, minmax, metric_tradeoff_lambda=1.0
            )
            mad.synthesize(max_iter=2)
            mads.append(mad)
    m1_min, m1_max, m2_min, m2_max = mads
    fig = mad_imshow_all(m1_min, m2_min, m1_max, m2_max)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0] == "Reference image" and titles[1] == "Initial (noisy) image"
    assert titles[2].startswith("Minimize mse") and titles[5].startswith(
        "Maximize dssim"
    )
    fig = mad_loss_all(m1_min, m2_min, m1_max, m2_max)
    assert [ax.get_title() for ax in fig.axes] == ["dssim", "mse"]
    assert len(fig.axes[0].lines) == 4
    other = MADCompetition(
        _image(seed=3), mse, dssim, "min", metric_tradeoff_lambda=1.0
    )
    with pytest.raises(ValueError, match="same image"):
        mad_imshow_all(m1_min, m2_min, m1_max, other)


def _rewrite(path, edit):
    """Rewrites a saved file's JSON metadata with ``edit(meta)``."""
    import json

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("__metadata__")))
    edit(meta)
    with open(path, "wb") as handle:
        np.savez(handle, __metadata__=np.array(json.dumps(meta)), **arrays)


def test_load_checks_the_object_name_and_the_attribute_set(tmp_path):
    path = str(tmp_path / "mad.npz")
    mad = _mad()
    mad.synthesize(max_iter=1)
    mad.save(path)
    renamed = str(tmp_path / "renamed.npz")
    mad.save(renamed)
    _rewrite(renamed, lambda m: m["save_metadata"].update(synthesis_object="Metamer"))
    with pytest.raises(ValueError, match="Saved object was a Metamer"):
        _mad().load(renamed)

    def drop(meta):
        del meta["attributes"]["_penalties"]

    _rewrite(path, drop)
    with pytest.raises(ValueError, match="attributes differ"):
        _mad().load(path)
