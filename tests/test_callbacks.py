import csv

import dp_accounting
import keras
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from deel_lipdp_ext.accounting import PrivacySpec, epsilon_for_spec
from deel_lipdp_ext.callbacks import DP_Accountant

from .helpers import dp_model, one_hot, small_cnn, unit_samples


def fit(model, epochs, callbacks):
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    return model.fit(x, y, batch_size=50, epochs=epochs, verbose=0, callbacks=callbacks)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_in_logs_equals_dp_accounting(accountant, tmp_path):
    model = dp_model(small_cnn(), sigma=1.3, n=200, batch_size=50, sampling="shuffle")
    log = []
    history = fit(
        model,
        3,
        [
            DP_Accountant(accountant, log_fn=lambda e, r: log.append((e, r))),
            keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        ],
    )
    q, steps_per_epoch = 50 / 200, 4
    for epoch, eps in enumerate(history.history["epsilon"], start=1):
        acc = (
            rdp_privacy_accountant.RdpAccountant()
            if accountant == "rdp"
            else pld_privacy_accountant.PLDAccountant()
        )
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.3)),
            epoch * steps_per_epoch,
        )
        assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert history.history["delta"] == [1e-5] * 3
    assert [e for e, _ in log] == [0, 1, 2]
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["epsilon"]) == pytest.approx(history.history["epsilon"][-1])


def test_budget_stops_at_the_last_epoch_within_budget():
    spec_eps = [
        epsilon_for_spec(PrivacySpec(0.25, 4 * e, (1.3,), 1e-5)) for e in range(1, 20)
    ]
    budget = (spec_eps[4] + spec_eps[5]) / 2  # 5 epochs fit, 6 do not
    model = dp_model(small_cnn(), sigma=1.3, n=200, batch_size=50, sampling="shuffle")
    history = fit(model, 19, [DP_Accountant(epsilon_budget=budget)])
    assert len(history.history["epsilon"]) == 5
    assert history.history["epsilon"][-1] <= budget


def test_budget_too_small_for_one_epoch_refuses():
    model = dp_model(small_cnn(), sigma=1.3, n=200, batch_size=50, sampling="shuffle")
    with pytest.raises(ValueError, match="One epoch already exceeds"):
        fit(model, 2, [DP_Accountant(epsilon_budget=1e-3)])


def test_accountant_needs_a_dp_model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse", optimizer="sgd")
    with pytest.raises(TypeError, match="DP model"):
        model.fit(
            np.zeros((4, 2)), np.zeros((4, 1)), verbose=0, callbacks=[DP_Accountant()]
        )


def test_bad_accountant_name():
    with pytest.raises(ValueError, match="'moments'"):
        DP_Accountant("moments")
