"""`DP_Accountant` as deel-lipdp scripts use it: imported from `model`, with
`log_fn` "logging", "all", "wandb" or a callable."""

import logging
import sys
import types

import numpy as np
import pytest

from deel_lipdp_ext import callbacks, model
from deel_lipdp_ext.model import DP_Accountant

from ..helpers import dp_model, one_hot, small_cnn, unit_samples


def _fit_two_epochs(accountant):
    m = dp_model(small_cnn(), sigma=1.3, n=200, batch_size=50, sampling="shuffle")
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    return m.fit(x, y, batch_size=50, epochs=2, verbose=0, callbacks=[accountant])


def test_model_reexports_the_callback():
    assert model.DP_Accountant is callbacks.DP_Accountant
    assert DP_Accountant is callbacks.DP_Accountant
    with pytest.raises(AttributeError, match="no attribute"):
        model.DP_NoSuchThing  # noqa: B018


def test_log_fn_logging_writes_epsilon_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="deel_lipdp_ext"):
        history = _fit_two_epochs(DP_Accountant(log_fn="logging"))
    records = [r for r in caplog.records if r.name == "deel_lipdp_ext"]
    assert [r.levelno for r in records] == [logging.INFO] * 2
    for epoch, (record, eps) in enumerate(
        zip(records, history.history["epsilon"], strict=True), start=1
    ):
        message = record.getMessage()
        assert f"epoch {epoch}:" in message
        assert f"epsilon={eps:.6g}" in message and "delta=1e-05" in message


def test_log_fn_all_logs_and_prints(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="deel_lipdp_ext"):
        _fit_two_epochs(DP_Accountant(log_fn="all"))
    assert len([r for r in caplog.records if r.name == "deel_lipdp_ext"]) == 2
    printed = [
        line for line in capsys.readouterr().out.splitlines() if "epsilon=" in line
    ]
    assert len(printed) == 2


def test_log_fn_callable_keeps_its_signature():
    seen = []
    history = _fit_two_epochs(DP_Accountant(log_fn=lambda e, r: seen.append((e, r))))
    assert [e for e, _ in seen] == [0, 1]
    assert [r["epsilon"] for _, r in seen] == history.history["epsilon"]


def test_log_fn_wandb_uses_wandb_log_when_installed(monkeypatch):
    logged = []
    fake = types.ModuleType("wandb")
    fake.log = logged.append
    monkeypatch.setitem(sys.modules, "wandb", fake)
    history = _fit_two_epochs(DP_Accountant(log_fn="wandb"))
    assert [r["epoch"] for r in logged] == [1, 2]  # deel-lipdp counts from 1
    assert [r["epsilon"] for r in logged] == history.history["epsilon"]
    assert all(r["delta"] == 1e-5 for r in logged)


def test_log_fn_wandb_without_wandb_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match="needs the `wandb` package"):
        DP_Accountant(log_fn="wandb")


@pytest.mark.parametrize("bad", ["print", "tensorboard", 3])
def test_unknown_log_fn_is_refused(bad):
    with pytest.raises(ValueError, match="log_fn"):
        DP_Accountant(log_fn=bad)


def test_deel_lipdp_positional_log_fn_gets_a_hint():
    with pytest.raises(ValueError, match="pass log_fn='logging' by keyword"):
        DP_Accountant("logging")


def test_existing_arguments_still_work():
    accountant = DP_Accountant("pld", epsilon_budget=3.0)
    assert (accountant.accountant, accountant.epsilon_budget) == ("pld", 3.0)
    assert accountant.log_fn is None
