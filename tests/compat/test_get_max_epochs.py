"""`sensitivity.get_max_epochs`: deel-lipdp's signature on the model's privacy
plan, never above epsilon_max; the spec form of `accounting` still works."""

from fractions import Fraction

import keras
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deel_lipdp_ext import accounting
from deel_lipdp_ext.accounting import PrivacySpec
from deel_lipdp_ext.sensitivity import get_max_epochs

from ..helpers import dp_model, one_hot, small_cnn, unit_samples


def _epsilon_after(model, epochs, accountant="rdp"):
    plan = model.privacy_plan
    first = plan.completed_epochs()
    return plan.epsilon(accountant, plan.planned_ledger(epochs, first_epoch=first))


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return dp_model(small_cnn(), sigma=1.1, n=1000, batch_size=50)


@given(epsilon_max=st.floats(0.3, 12.0))
def test_never_exceeds_epsilon_max_and_is_the_largest(model, epsilon_max):
    epochs = get_max_epochs(epsilon_max, model, epochs_max=200)
    if epochs > 0:
        assert _epsilon_after(model, epochs) <= epsilon_max
    if epochs < 200:
        assert _epsilon_after(model, epochs + 1) > epsilon_max


def test_matches_the_spec_form(model):
    spec = PrivacySpec(50 / 1000, 20, (1.1,), 1e-5)  # one epoch: 20 steps at q
    assert get_max_epochs(4.0, model) == accounting.get_max_epochs(4.0, spec)
    assert get_max_epochs(4.0, spec) == accounting.get_max_epochs(4.0, spec)
    assert get_max_epochs(4.0, model.privacy_plan) == get_max_epochs(4.0, model)


def test_pld_and_tiny_budget(model):
    epochs = get_max_epochs(2.0, model, accountant="pld", epochs_max=100)
    assert 0 < epochs < 100
    assert _epsilon_after(model, epochs, "pld") <= 2.0
    assert get_max_epochs(1e-3, model) == 0


def test_epochs_max_caps_and_none_searches_further():
    m = dp_model(small_cnn(), sigma=20.0, n=1000, batch_size=10)
    assert get_max_epochs(5.0, m, epochs_max=8) == 8  # 8 epochs stay in budget
    unbounded = get_max_epochs(5.0, m, epochs_max=None)
    assert unbounded > 1024
    assert _epsilon_after(m, unbounded) <= 5.0 < _epsilon_after(m, unbounded + 1)


def test_counts_only_the_epochs_still_to_run():
    m = dp_model(small_cnn(), sigma=3.0, n=200, batch_size=50, sampling="shuffle")
    before = get_max_epochs(3.0, m)
    assert before > 2
    x, y = unit_samples(200, (8, 8, 1)), one_hot(np.arange(200))
    m.fit(x, y, batch_size=50, epochs=2, verbose=0)
    after = get_max_epochs(3.0, m)
    assert after == before - 2
    assert _epsilon_after(m, after) <= 3.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"safe": False}, "safe=False"),
        ({"epochs_max": 0}, "epochs_max"),
        ({"epochs_max": 2.5}, "epochs_max"),
        ({"accountant": "moments"}, "accountant"),
    ],
)
def test_refusals(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_max_epochs(1.0, model, **kwargs)
    with pytest.raises(ValueError, match="epsilon_max"):
        get_max_epochs(0.0, model)


def test_a_model_without_dp_configuration_is_refused():
    from deel_lipdp_ext import DPSequential

    with pytest.raises(ValueError, match="dp_parameters"):
        get_max_epochs(1.0, DPSequential())


def test_numpy_scalars_are_numbers():
    """A review: np.float32 / np.int64 budgets and noise multipliers were
    refused (Python numbers and np.float64 accepted)."""
    from deel_lipdp_ext import DPParameters

    params = DPParameters(np.float32(1.5), np.float32(1e-5))
    assert type(params.noise_multiplier) is float and params.noise_multiplier == 1.5
    model = dp_model(small_cnn())
    assert get_max_epochs(np.float32(3.0), model) == get_max_epochs(3.0, model)
    assert get_max_epochs(np.int64(3), model) == get_max_epochs(3, model)
    with pytest.raises(ValueError, match="epsilon_max"):
        get_max_epochs(True, model)
    # checked as stored (a review: 1 - 1e-30 passed as < 1, stored as 1.0)
    with pytest.raises(ValueError, match="delta"):
        DPParameters(1.0, Fraction(10**30 - 1, 10**30))
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPParameters(Fraction(1, 10**400), 1e-5)
