"""The statistics of empirical privacy audits (NumPy and SciPy only).

Two tests turn what an attacker observes into an epsilon LOWER bound that holds
with confidence `1 - beta` whatever the training run did:

* the one-run canary audit (Steinke, Nasr, Jagielski, "Privacy Auditing with
  One (1) Training Run", NeurIPS 2023): m canaries, each in the training set
  independently with probability 1/2; the auditor makes r guesses ("in" for the
  highest scores, "out" for the lowest) of which v are correct. If training is
  (eps, delta)-DP then

      P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i,
      f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u],

  so every eps whose right-hand side is below beta is refuted;
* membership inference at a score threshold: with TPR and FPR measured on
  members and non-members, (eps, delta)-DP implies TPR <= e^eps FPR + delta, so
  eps >= log((TPR_low - delta) / FPR_high) with Clopper-Pearson bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

#: bisection steps of `one_run_epsilon_lower_bound` (the bracket [0, 64] shrinks
#: to 64 / 2^50 < 1e-13)
_BISECTION_STEPS = 50
_EPSILON_CEILING = 64.0


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1). Received: {confidence!r}")
    return float(confidence)


def _check_delta(delta: float) -> float:
    if not (0.0 <= delta < 1.0) or math.isnan(delta):
        raise ValueError(f"`delta` must be in [0, 1). Received: {delta!r}")
    return float(delta)


def one_run_p_value(
    epsilon: float,
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float = 0.0,
) -> float:
    """The largest probability, under (epsilon, delta)-DP, of at least
    `num_correct` correct guesses out of `num_guesses` (Steinke et al. 2023).

    Args:
        epsilon: the epsilon tested (>= 0).
        num_canaries: m, all the randomised canaries (abstentions included).
        num_guesses: r, the canaries the auditor guessed on (<= m).
        num_correct: v, the correct guesses (<= r).
        delta: the delta tested.

    Returns:
        A p-value in [0, 1]: small refutes (epsilon, delta)-DP.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    delta = _check_delta(delta)
    if epsilon < 0 or math.isnan(epsilon):
        raise ValueError(f"`epsilon` must be >= 0. Received: {epsilon!r}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Bin(r, q) >= v]
    if delta == 0.0:
        return min(1.0, tail)
    # f(v - i) - f(v) = P[v - i <= Bin(r, q) < v], accumulated for i = 1..v
    between = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    slope = float(np.max(between / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * m * delta * slope)


def one_run_epsilon_lower_bound(
    num_canaries: int,
    num_guesses: int,
    num_correct: int,
    delta: float = 0.0,
    confidence: float = 0.95,
) -> float:
    """The largest epsilon the one-run audit refutes at `confidence`.

    Every epsilon below the returned value has `one_run_p_value < beta`
    (beta = 1 - confidence); the value is the bisection's lower end, so it
    errs low. Returns 0.0 when even epsilon = 0 is not refuted.
    """
    beta = 1.0 - _check_confidence(confidence)

    def refuted(epsilon: float) -> bool:
        return (
            one_run_p_value(epsilon, num_canaries, num_guesses, num_correct, delta)
            < beta
        )

    if not refuted(0.0):
        return 0.0
    low, high = 0.0, _EPSILON_CEILING
    if refuted(high):
        return high
    for _ in range(_BISECTION_STEPS):
        middle = 0.5 * (low + high)
        if refuted(middle):
            low = middle
        else:
            high = middle
    return low


def guesses_from_scores(
    scores: Sequence[float], num_in: int, num_out: int
) -> np.ndarray:
    """The auditor's guesses: +1 ("in") for the `num_in` highest scores, -1
    ("out") for the `num_out` lowest, 0 (abstain) for the others. Ties are
    broken by position, which the scores cannot depend on.

    Returns:
        int array of shape (m,), values in {-1, 0, +1}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or not np.all(np.isfinite(scores)):
        raise ValueError("`scores` must be a finite 1-D array (one per canary).")
    m = scores.shape[0]
    if num_in < 0 or num_out < 0 or num_in + num_out > m:
        raise ValueError(
            f"Cannot make {num_in} 'in' and {num_out} 'out' guesses on {m} canaries."
        )
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(m, dtype=np.int64)
    if num_out:
        guesses[order[:num_out]] = -1
    if num_in:
        guesses[order[m - num_in :]] = 1
    return guesses


def count_correct(guesses: np.ndarray, included: np.ndarray) -> tuple[int, int]:
    """(r, v): the guesses made and the correct ones, given each canary's
    inclusion (bool array, True: in the training set)."""
    guesses = np.asarray(guesses)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    if guesses.shape != truth.shape:
        raise ValueError(
            f"One guess per canary: {guesses.shape} guesses, {truth.shape} canaries."
        )
    return int(np.count_nonzero(guesses)), int(np.count_nonzero(guesses == truth))


def clopper_pearson(
    successes: int, trials: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of a binomial proportion.

    Each end holds with probability >= 1 - (1 - confidence) / 2.
    """
    _check_counts(trials, trials, successes)
    alpha = 1.0 - _check_confidence(confidence)
    low = (
        0.0
        if successes == 0
        else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    )
    high = (
        1.0
        if successes == trials
        else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    )
    return low, high


def roc_curve(
    member_scores: Sequence[float], nonmember_scores: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the rule "member if score >= threshold", for
    every distinct score, from the strictest threshold (+inf: nothing flagged)
    to the loosest (everything flagged)."""
    members = _finite_scores(member_scores, "member_scores")
    others = _finite_scores(nonmember_scores, "nonmember_scores")
    distinct = np.unique(np.concatenate([members, others]))[::-1]
    thresholds = np.concatenate([[np.inf], distinct])
    members.sort()
    others.sort()
    tpr = 1.0 - np.searchsorted(members, thresholds, side="left") / members.size
    fpr = 1.0 - np.searchsorted(others, thresholds, side="left") / others.size
    return fpr, tpr, thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under an ROC curve given by increasing fpr (trapezoids; ties count
    one half, as the Mann-Whitney statistic)."""
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The best TPR of a threshold whose FPR is <= target."""
    allowed = fpr <= target
    return float(np.max(tpr[allowed])) if np.any(allowed) else 0.0


def membership_epsilon_lower_bound(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    delta: float = 0.0,
    confidence: float = 0.95,
    fpr_targets: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> float:
    """Epsilon refuted by a membership-inference threshold, at `confidence`.

    For each FPR target (fixed in advance), the threshold with the largest TPR
    at an empirical FPR <= target gives log((TPR_low - delta) / FPR_high) with
    Clopper-Pearson bounds; the confidence is split across the targets
    (Bonferroni), so picking the best of them is accounted for.
    """
    delta = _check_delta(delta)
    alpha = (1.0 - _check_confidence(confidence)) / len(fpr_targets)
    members = _finite_scores(member_scores, "member_scores")
    others = _finite_scores(nonmember_scores, "nonmember_scores")
    fpr, tpr, _ = roc_curve(members, others)
    best = 0.0
    for target in fpr_targets:
        allowed = np.flatnonzero(fpr <= target)
        if allowed.size == 0:
            continue
        index = allowed[np.argmax(tpr[allowed])]
        true_pos = int(round(tpr[index] * members.size))
        false_pos = int(round(fpr[index] * others.size))
        # this target's error budget alpha, half to each end used
        tpr_low, _ = clopper_pearson(true_pos, members.size, 1 - alpha)
        _, fpr_high = clopper_pearson(false_pos, others.size, 1 - alpha)
        if tpr_low - delta > 0 and fpr_high > 0:
            best = max(best, math.log((tpr_low - delta) / fpr_high))
    return best


def _finite_scores(scores, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError(f"`{name}` must be a non-empty array of finite scores.")
    return scores


def _check_counts(m: int, r: int, v: int) -> tuple[int, int, int]:
    for name, value in (("num_canaries", m), ("num_guesses", r), ("num_correct", v)):
        if not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0. Received: {value!r}")
    if not v <= r <= m:
        raise ValueError(
            f"Need num_correct <= num_guesses <= num_canaries. Received: "
            f"v={v}, r={r}, m={m}"
        )
    return int(m), int(r), int(v)


__all__ = [
    "auc",
    "clopper_pearson",
    "count_correct",
    "guesses_from_scores",
    "membership_epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "roc_curve",
    "tpr_at_fpr",
]
