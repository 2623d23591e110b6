"""The audit statistics against independent computations (SciPy's binomial
tails, its exact binomial test, the Mann-Whitney statistic) and against the
values printed in Steinke, Nasr, Jagielski (2023)."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from deel_lipdp_ext.audit import statistics as S


def _p_value_by_definition(eps, m, r, v, delta):
    """f(v) + 2 m delta max_{1 <= i <= m} (f(v - i) - f(v)) / i, with f(u) = 1
    for u <= 0, each tail from scipy's survival function."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(u):
        return 1.0 if u <= 0 else stats.binom.sf(u - 1, r, q)

    slope = max((f(v - i) - f(v)) / i for i in range(1, m + 1))
    return min(1.0, f(v) + 2 * m * delta * slope)


# (m, r, v, delta, printed eps lower bound at 95%): Appendix D and Section 7
PAPER = [
    (100, 100, 75, 0.0, 0.702),
    (100, 100, 75, 1e-4, 0.699),
    (1000, 100, 75, 1e-4, 0.673),
    (100000, 1510, 1439, 1e-5, 2.675),
]


@pytest.mark.parametrize("m, r, v, delta, printed", PAPER)
def test_the_lower_bounds_printed_in_the_paper(m, r, v, delta, printed):
    bound = S.one_run_epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    # printed with three decimals (rounded or truncated)
    assert abs(bound - printed) <= 1e-3


def test_the_p_value_printed_in_the_paper():
    """Appendix D: 75 of 100 guesses correct, eps = log 3, delta = 0."""
    assert S.one_run_p_value(math.log(3), 100, 100, 75) == pytest.approx(
        0.553, abs=5e-4
    )


@given(
    m=st.integers(1, 60),
    data=st.data(),
    eps=st.floats(0, 6),
    delta=st.sampled_from([0.0, 1e-5, 1e-3, 0.05]),
)
def test_the_p_value_equals_its_definition(m, data, eps, delta):
    r = data.draw(st.integers(0, m))
    v = data.draw(st.integers(0, r))
    expected = 1.0 if v == 0 else _p_value_by_definition(eps, m, r, v, delta)
    assert S.one_run_p_value(eps, m, r, v, delta) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )


@pytest.mark.parametrize("r", [16, 100, 1000])
def test_all_guesses_correct_has_a_closed_form(r):
    """delta = 0, v = r: p = q^r, so eps = -log(beta^(-1/r) - 1)."""
    expected = -math.log(0.05 ** (-1 / r) - 1)
    assert S.one_run_epsilon_lower_bound(r, r, r) == pytest.approx(expected, abs=1e-9)


@given(m=st.integers(1, 300), data=st.data(), delta=st.sampled_from([0.0, 1e-5]))
def test_every_epsilon_below_the_bound_is_refuted_and_none_above(m, data, delta):
    """The defining property, checked at the bound's two sides."""
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r))
    bound = S.one_run_epsilon_lower_bound(m, r, v, delta, confidence=0.95)
    assert bound >= 0
    if bound > 0:
        assert S.one_run_p_value(bound * (1 - 1e-9), m, r, v, delta) < 0.05
    assert S.one_run_p_value(bound + 1e-6, m, r, v, delta) >= 0.05


def test_a_chance_guesser_refutes_nothing_and_delta_only_weakens():
    assert S.one_run_epsilon_lower_bound(1000, 200, 100) == 0.0
    strict = S.one_run_epsilon_lower_bound(1000, 200, 190, delta=0.0)
    loose = S.one_run_epsilon_lower_bound(1000, 200, 190, delta=1e-5)
    assert 0 < loose < strict


def test_the_audit_is_sound_on_randomised_response():
    """An eps-DP mechanism (randomised response on each canary's inclusion
    bit, eps = 1): over 200 simulated audits at 95% confidence, the bound
    exceeds 1 in at most ~5% of them (binomial 99.9% quantile: 20)."""
    rng = np.random.default_rng(0)
    eps, m, exceed = 1.0, 200, 0
    for _ in range(200):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        observed = np.where(keep, included, ~included)
        scores = observed + rng.random(m) * 1e-3  # the observed bit, ties broken
        r, v = S.count_correct(S.guesses_from_scores(scores, 50, 50), included)
        exceed += S.one_run_epsilon_lower_bound(m, r, v) > eps
    assert exceed <= stats.binom.ppf(0.999, 200, 0.05)


def test_guesses_take_the_highest_and_lowest_scores():
    guesses = S.guesses_from_scores([0.5, 3.0, -1.0, 2.0, 0.0], num_in=2, num_out=1)
    np.testing.assert_array_equal(guesses, [0, 1, -1, 1, 0])
    assert S.count_correct(guesses, [True, True, True, False, False]) == (3, 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: S.guesses_from_scores([1.0, np.nan], 1, 0),
        lambda: S.guesses_from_scores([1.0, 2.0], 2, 1),
        lambda: S.one_run_p_value(1.0, 10, 11, 3),
        lambda: S.one_run_p_value(-1.0, 10, 5, 3),
        lambda: S.one_run_epsilon_lower_bound(10, 5, 3, delta=1.5),
        lambda: S.one_run_epsilon_lower_bound(10, 5, 3, confidence=1.0),
        lambda: S.clopper_pearson(5, 3),
        lambda: S.roc_curve([], [1.0]),
    ],
)
def test_bad_arguments_are_refused_with_a_message(call):
    with pytest.raises(ValueError, match="must|Need|Cannot"):
        call()


@given(
    trials=st.integers(1, 400), data=st.data(), confidence=st.sampled_from([0.9, 0.95])
)
def test_clopper_pearson_matches_scipys_exact_binomial_interval(
    trials, data, confidence
):
    k = data.draw(st.integers(0, trials))
    expected = stats.binomtest(k, trials).proportion_ci(confidence, method="exact")
    low, high = S.clopper_pearson(k, trials, confidence)
    assert low == pytest.approx(expected.low, abs=1e-9)
    assert high == pytest.approx(expected.high, abs=1e-9)


def test_roc_and_auc_match_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    members = np.round(rng.normal(0.5, 1, 300), 1)  # rounded: ties happen
    others = np.round(rng.normal(0.0, 1, 400), 1)
    fpr, tpr, thresholds = S.roc_curve(members, others)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    u = stats.mannwhitneyu(members, others).statistic
    assert S.auc(fpr, tpr) == pytest.approx(u / (300 * 400), abs=1e-12)
    # a point by hand: the threshold 1.0
    at = np.flatnonzero(thresholds == 1.0)[0]
    assert tpr[at] == pytest.approx(np.mean(members >= 1.0))
    assert fpr[at] == pytest.approx(np.mean(others >= 1.0))
    assert S.tpr_at_fpr(fpr, tpr, 0.1) == max(tpr[fpr <= 0.1])


def test_membership_bound_of_a_perfect_and_of_a_blind_attack():
    """Perfectly separated scores (1000 vs 1000): TPR_low ~ 0.995, FPR_high =
    1 - (alpha/2)^(1/1000) at Bonferroni-split alpha: log of their ratio. Equal
    score distributions refute nothing."""
    perfect = S.membership_epsilon_lower_bound(
        np.ones(1000), np.zeros(1000), fpr_targets=(1e-3,)
    )
    alpha = 0.05
    tpr_low = (alpha / 2) ** (1 / 1000)
    fpr_high = 1 - (alpha / 2) ** (1 / 1000)
    assert perfect == pytest.approx(math.log(tpr_low / fpr_high), rel=1e-9)
    rng = np.random.default_rng(2)
    blind = S.membership_epsilon_lower_bound(rng.random(1000), rng.random(1000))
    assert blind == 0.0
