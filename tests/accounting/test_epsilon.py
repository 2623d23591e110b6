import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from deel_lipdp_ext.accounting import (
    PrivacySpec,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    epsilon_for_spec,
    get_max_epochs,
    make_dp_event,
)


def reference_epsilon(q, sigma, steps, delta, accountant):
    acc = (
        rdp_privacy_accountant.RdpAccountant()
        if accountant == "rdp"
        else pld_privacy_accountant.PLDAccountant()
    )
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, steps)
    return acc.get_epsilon(delta)


def test_golden_value_from_design_doc():
    # docs/index.md (accounting figures), checked on this machine:
    # q=256/60000, sigma=1.1, 14040 steps, delta=1e-5.
    spec = PrivacySpec(256 / 60000, 14040, (1.1,), 1e-5)
    assert epsilon_for_spec(spec, "rdp") == pytest.approx(2.594, abs=1e-3)
    assert epsilon_for_spec(spec, "pld") == pytest.approx(2.380, abs=1e-3)


@given(
    st.floats(1e-3, 0.5),
    st.floats(0.6, 5.0),
    st.integers(1, 2000),
    st.sampled_from([1e-3, 1e-5, 1e-7]),
)
def test_epsilon_equals_dp_accounting_rdp(q, sigma, steps, delta):
    ours = epsilon_for_spec(PrivacySpec(q, steps, (sigma,), delta), "rdp")
    assert ours == pytest.approx(
        reference_epsilon(q, sigma, steps, delta, "rdp"), rel=1e-9
    )


# PLD's cost grows quickly with q and 1/sigma: a smaller range, fewer examples.
@settings(max_examples=5)
@given(
    st.floats(1e-3, 0.05),
    st.floats(0.8, 3.0),
    st.integers(1, 300),
    st.sampled_from([1e-3, 1e-5]),
)
def test_epsilon_equals_dp_accounting_pld(q, sigma, steps, delta):
    accountant = "pld"
    ours = epsilon_for_spec(PrivacySpec(q, steps, (sigma,), delta), accountant)
    assert ours == pytest.approx(
        reference_epsilon(q, sigma, steps, delta, accountant), rel=1e-9
    )


def test_per_layer_composition_equals_explicit_composition():
    sigmas = (1.0, 2.0, 1.5)
    q, steps, delta = 0.01, 300, 1e-5
    ours = epsilon_for_spec(PrivacySpec(q, steps, sigmas, delta), "rdp")
    # Explicit: every step releases the three Gaussians on the same sampled batch.
    # Gaussians on disjoint coordinates = one Gaussian of the stacked vector with
    # sensitivity sqrt(sum 1/sigma_l^2) relative to unit noise.
    eff = effective_noise_multiplier(sigmas)
    assert eff == pytest.approx((1 + 1 / 4 + 1 / 2.25) ** -0.5)
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(eff)),
        steps,
    )
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-12)
    # Without subsampling, RDP of composed Gaussians adds exactly: same number.
    composed = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(s) for s in sigmas]
    )
    acc2 = rdp_privacy_accountant.RdpAccountant()
    acc2.compose(composed, steps)
    full = epsilon_for_spec(PrivacySpec(1.0, steps, sigmas, delta), "rdp")
    assert full == pytest.approx(acc2.get_epsilon(delta), rel=1e-9)


def test_zero_steps_is_zero_epsilon():
    assert epsilon_for_spec(PrivacySpec(0.1, 0, (1.0,), 1e-5)) == 0.0
    assert isinstance(
        make_dp_event(PrivacySpec(0.1, 0, (1.0,), 1e-5)), dp_accounting.NoOpDpEvent
    )


@given(st.floats(0.005, 0.3), st.integers(10, 500), st.floats(1.0, 4.0))
def test_epsilon_is_monotone_in_steps_and_inverse_sigma(q, steps, sigma):
    e = epsilon_for_spec(PrivacySpec(q, steps, (sigma,), 1e-5))
    assert epsilon_for_spec(PrivacySpec(q, steps + 10, (sigma,), 1e-5)) >= e
    assert epsilon_for_spec(PrivacySpec(q, steps, (sigma * 1.1,), 1e-5)) <= e


@given(st.floats(0.5, 8.0), st.floats(0.01, 0.3), st.integers(20, 400))
def test_calibration_never_overshoots_and_is_tight(target, q, steps):
    _check_calibration("rdp", target, q, steps)


@pytest.mark.slow
@settings(max_examples=3)
@given(st.floats(1.0, 8.0), st.floats(0.005, 0.03), st.integers(20, 100))
def test_pld_calibration_never_overshoots_and_is_tight(target, q, steps):
    _check_calibration("pld", target, q, steps)


def _check_calibration(accountant, target, q, steps):
    tol = 1e-2
    sigma = calibrate_noise_multiplier(
        target, 1e-5, q, steps, accountant, tolerance=tol
    )
    assert epsilon_for_spec(PrivacySpec(q, steps, (sigma,), 1e-5), accountant) <= target
    if sigma - tol > 0:
        assert (
            epsilon_for_spec(PrivacySpec(q, steps, (sigma - tol,), 1e-5), accountant)
            > target
        )


def test_max_epochs_guarantee():
    spec = PrivacySpec(0.05, 20, (1.0,), 1e-5)  # 20 steps per epoch
    budget = 3.0
    epochs = get_max_epochs(budget, spec)

    def eps(e):
        return epsilon_for_spec(PrivacySpec(0.05, 20 * e, (1.0,), 1e-5))

    assert epochs >= 1 and eps(epochs) <= budget < eps(epochs + 1)
    assert get_max_epochs(1e-3, spec) == 0


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="sampling_rate"):
        PrivacySpec(0.0, 1, (1.0,), 1e-5)
    with pytest.raises(ValueError, match="accountant"):
        epsilon_for_spec(PrivacySpec(0.1, 1, (1.0,), 1e-5), "moments")
    with pytest.raises(ValueError, match="noise_multipliers"):
        PrivacySpec(0.1, 1, (0.0,), 1e-5)
