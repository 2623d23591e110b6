"""Releases beside the gradient steps, pure-DP accounting, and epsilon curves."""

import dataclasses

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant
from dp_accounting.rdp.rdp_privacy_accountant import _laplace_rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from deel_lipdp_ext.accounting import (
    PrivacySpec,
    PureDpEvent,
    Release,
    compute_epsilon,
    epsilon_curve,
    epsilon_for_spec,
    get_max_epochs,
    make_dp_event,
    pure_dp_rdp,
)
from deel_lipdp_ext.accounting.epsilon import RDP_ORDERS


def _dp_accounting(event, delta, accountant):
    acc = (
        rdp_privacy_accountant.RdpAccountant()
        if accountant == "rdp"
        else pld_privacy_accountant.PLDAccountant()
    )
    acc.compose(event)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_gaussian_release_equals_explicit_composition(accountant):
    q, sigma, steps = 0.02, 1.2, 150
    release = Release("quantile", "gaussian", 4.0, 0.02, count=7)
    spec = PrivacySpec(q, steps, (sigma,), 1e-5, releases=(release,))
    explicit = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    q, dp_accounting.GaussianDpEvent(sigma)
                ),
                steps,
            ),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    0.02, dp_accounting.GaussianDpEvent(4.0)
                ),
                7,
            ),
        ]
    )
    assert epsilon_for_spec(spec, accountant) == pytest.approx(
        _dp_accounting(explicit, 1e-5, accountant), rel=1e-9
    )
    assert epsilon_for_spec(spec, accountant) > epsilon_for_spec(
        dataclasses.replace(spec, releases=()), accountant
    )


def test_laplace_events_equal_dp_accounting():
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(3.0), 4),
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.LaplaceDpEvent(2.0)),
        ]
    )
    assert compute_epsilon(event, 1e-5, "pld") == pytest.approx(
        _dp_accounting(event, 1e-5, "pld"), rel=1e-9
    )
    rdp_only = dp_accounting.SelfComposedDpEvent(dp_accounting.LaplaceDpEvent(3.0), 4)
    assert compute_epsilon(rdp_only, 1e-5, "rdp") == pytest.approx(
        _dp_accounting(rdp_only, 1e-5, "rdp"), rel=1e-9
    )


def _rr_renyi(eps, alpha):
    """Renyi divergence of the binary randomized-response pair, by definition."""
    log_p, log_1mp = -np.logaddexp(0.0, -eps), -np.logaddexp(0.0, eps)
    # sum_x P(x)^a Q(x)^(1-a) over the two outcomes, in log space (large orders).
    terms = [
        alpha * log_p + (1 - alpha) * log_1mp,
        alpha * log_1mp + (1 - alpha) * log_p,
    ]
    return np.logaddexp(*terms) / (alpha - 1)


@given(st.floats(0.01, 5.0), st.sampled_from(list(RDP_ORDERS[::7])))
def test_pure_dp_rdp_is_the_randomized_response_divergence(eps, alpha):
    got = pure_dp_rdp(eps, np.array([alpha]))[0]
    assert got == pytest.approx(_rr_renyi(eps, alpha), rel=1e-9, abs=1e-15)
    # Known caps: epsilon-DP implies (alpha, eps) and (alpha, alpha eps^2/2)-RDP.
    assert got <= min(eps, alpha * eps**2 / 2) * (1 + 1e-12)
    # It must dominate every eps-DP mechanism, e.g. Laplace of scale 1/eps.
    assert got >= _laplace_rdp(eps, alpha) * (1 - 1e-12)


@given(st.floats(0.05, 3.0), st.integers(1, 20))
def test_pure_dp_release_accounting(eps, count):
    spec = PrivacySpec(
        0.1, 0, (1.0,), 1e-6, releases=(Release("svt", "pure_dp", eps, count=count),)
    )
    # RDP: the pure-DP curve, count times, through dp-accounting's conversion.
    want = rdp_privacy_accountant.compute_epsilon(
        RDP_ORDERS, count * pure_dp_rdp(eps, RDP_ORDERS), 1e-6
    )[0]
    assert epsilon_for_spec(spec, "rdp") == pytest.approx(want, rel=1e-12)
    # PLD is never above basic composition, and one run is exactly eps (the
    # pessimistic (eps, 0) PLD). (The RDP conversion may exceed count * eps
    # slightly: it is a valid, looser bound.)
    pld_eps = epsilon_for_spec(spec, "pld")
    assert pld_eps <= count * (eps + 1e-4)  # pessimistic rounding: 1e-4 a run
    if count == 1:
        assert pld_eps == pytest.approx(eps, abs=2e-4)


def test_pure_dp_pld_equals_dp_accounting_from_privacy_parameters():
    params = dp_accounting.pld.common.DifferentialPrivacyParameters(0.7, 0)
    want = pld_lib.from_privacy_parameters(params).self_compose(5)
    got = compute_epsilon(
        dp_accounting.SelfComposedDpEvent(PureDpEvent(0.7), 5), 1e-5, "pld"
    )
    assert got == pytest.approx(want.get_epsilon_for_delta(1e-5), rel=1e-12)


def test_make_dp_event_holds_every_mechanism():
    spec = PrivacySpec(
        0.1,
        30,
        (1.0,),
        1e-5,
        releases=(
            Release("a", "gaussian", 3.0, 0.1, 2),
            Release("b", "pure_dp", 0.5, count=1),
            Release("a", "gaussian", 3.0, 0.1, 3),  # merged with the first
        ),
    )
    assert spec.releases == (
        Release("a", "gaussian", 3.0, 0.1, 5),
        Release("b", "pure_dp", 0.5, count=1),
    )
    event = make_dp_event(spec)
    assert [e.count for e in event.events] == [30, 5, 1]
    assert isinstance(event.events[2].event, PureDpEvent)


@given(
    st.floats(0.005, 0.2), st.floats(0.7, 3.0), st.integers(1, 50), st.integers(1, 12)
)
def test_rdp_curve_equals_one_report_per_epoch(q, sigma, steps, epochs):
    spec = PrivacySpec(
        q, steps, (sigma,), 1e-5, releases=(Release("svt", "pure_dp", 0.1),)
    )
    curve = epsilon_curve(spec, epochs)
    for e in range(1, epochs + 1):
        spec_e = dataclasses.replace(
            spec, steps=e * steps, releases=(Release("svt", "pure_dp", 0.1, count=e),)
        )
        assert curve[e - 1] == pytest.approx(epsilon_for_spec(spec_e), rel=1e-9)
    assert np.all(np.diff(curve) >= 0)


@settings(max_examples=3)
@given(st.floats(0.01, 0.05), st.integers(5, 30))
def test_pld_curve_equals_one_report_per_epoch(q, steps):
    spec = PrivacySpec(q, steps, (1.5,), 1e-5)
    curve = epsilon_curve(spec, 3, "pld")
    for e in (1, 3):
        assert curve[e - 1] == pytest.approx(
            epsilon_for_spec(dataclasses.replace(spec, steps=e * steps), "pld"),
            rel=1e-9,
        )


class _EveryOther:
    def scheduled_release(self, epoch):
        return Release("q", "gaussian", 2.0, 0.1) if epoch % 2 == 0 else None


def test_curve_follows_a_release_schedule():
    spec = PrivacySpec(0.1, 10, (1.0,), 1e-5)
    curve = epsilon_curve(spec, 5, schedules=[_EveryOther()])
    for e, updates in zip(range(1, 6), [1, 1, 2, 2, 3], strict=True):
        spec_e = dataclasses.replace(
            spec, steps=10 * e, releases=(Release("q", "gaussian", 2.0, 0.1, updates),)
        )
        assert curve[e - 1] == pytest.approx(epsilon_for_spec(spec_e), rel=1e-9)


def test_max_epochs_counts_the_releases():
    spec = PrivacySpec(0.05, 20, (1.0,), 1e-5)
    with_release = dataclasses.replace(spec, releases=(Release("svt", "pure_dp", 0.3),))
    n = get_max_epochs(4.0, with_release)
    assert n < get_max_epochs(4.0, spec)
    curve = epsilon_curve(with_release, n + 1)
    assert curve[n - 1] <= 4.0 < curve[n]


def test_bad_releases_are_refused():
    with pytest.raises(ValueError, match="mechanism"):
        Release("x", "laplace", 1.0)
    with pytest.raises(ValueError, match="parameter"):
        Release("x", "pure_dp", 0.0)
    with pytest.raises(ValueError, match="count"):
        Release("x", "pure_dp", 1.0, count=-1)
    with pytest.raises(TypeError, match="Release"):
        PrivacySpec(0.1, 1, (1.0,), 1e-5, releases=({"name": "x"},))
    with pytest.raises(TypeError, match="PrivacySpec"):
        epsilon_curve(object(), 3)
    with pytest.raises(ValueError, match="epochs"):
        epsilon_curve(PrivacySpec(0.1, 1, (1.0,), 1e-5), 0)
    with pytest.raises(ValueError, match="does not support"):
        compute_epsilon(dp_accounting.RandomizedResponseDpEvent(0.5, 2), 1e-5)
