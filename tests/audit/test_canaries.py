"""The canary audit: canaries, their coins, the guesses, one audited run
through the library's pipeline, and `lipdp audit`."""

import json
import math

import numpy as np
import pytest

from deel_lipdp_ext.audit import statistics as S
from deel_lipdp_ext.audit.canaries import (
    Canaries,
    audit_scores,
    insert_canaries,
    make_canaries,
)
from deel_lipdp_ext.audit.run import AuditConfig, run_audit
from deel_lipdp_ext.cli import main

from ..helpers import write_npz_with_a_class_the_test_lacks


def _pool(n=300):
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, n)


def test_mislabeled_canaries_never_keep_their_true_label():
    x, labels = _pool()
    canaries = make_canaries("mislabeled", 200, x, labels, 10, seed=1)
    source = [int(np.flatnonzero((x == c).all(axis=(1, 2, 3)))[0]) for c in canaries.x]
    assert np.all(canaries.labels != labels[source])
    assert len(set(source)) == 200  # drawn without replacement
    # the coins: each canary in with probability 1/2 (99.9% binomial range)
    assert 200 * 0.5 - 3.3 * math.sqrt(50) < canaries.included.sum() < 100 + 3.3 * 7.1


def test_noise_canaries_stay_in_the_data_range_and_coins_are_secret_by_default():
    x, labels = _pool()
    a = make_canaries("noise", 100, x, labels, 10)
    b = make_canaries("noise", 100, x, labels, 10)
    assert a.x.min() >= x.min() and a.x.max() <= x.max()
    assert not np.array_equal(a.included, b.included)  # fresh entropy


@pytest.mark.parametrize(
    "kind, m, message",
    [
        ("poison", 10, "kind"),
        ("noise", 1, "num_canaries"),
        ("noise", 301, "num_canaries"),
    ],
)
def test_bad_canary_arguments_are_refused(kind, m, message):
    x, labels = _pool()
    with pytest.raises(ValueError, match=message):
        make_canaries(kind, m, x, labels, 10)


def test_only_the_included_canaries_are_inserted():
    x, labels = _pool(50)
    canaries = make_canaries("mislabeled", 40, x, labels, 10, seed=3)
    x_in, y_in = insert_canaries(x[:10], labels[:10], canaries)
    assert x_in.shape[0] == 10 + canaries.included.sum()
    np.testing.assert_array_equal(x_in[10:], canaries.x[canaries.included])
    np.testing.assert_array_equal(y_in[10:], canaries.labels[canaries.included])


def test_a_perfect_score_gives_the_closed_form_and_a_blind_one_nothing():
    included = np.arange(100) % 2 == 0
    canaries = Canaries(np.zeros((100, 1)), np.zeros(100, int), included, "noise")
    perfect = audit_scores(included.astype(float), canaries, 20, delta=0.0)
    assert (perfect.num_guesses, perfect.num_correct) == (20, 20)
    assert perfect.epsilon_lower_bound == pytest.approx(
        -math.log(0.05 ** (-1 / 20) - 1)
    )
    assert perfect.canary_auc == 1.0 and perfect.holds  # reported inf by default
    assert perfect.tpr_at_fpr_001 == 1.0 and perfect.membership_epsilon_lower_bound > 1
    # a bound above the reported epsilon is a contradiction, whichever test
    leaky = audit_scores(included.astype(float), canaries, 20, 1e-5, 0.95, 0.5)
    assert not leaky.holds
    blind = audit_scores(-included.astype(float), canaries, 20, 1e-5, 0.95, 3.0)
    assert blind.epsilon_lower_bound == 0.0 and blind.num_correct == 0
    assert blind.to_dict()["epsilon_reported"] == 3.0


def test_an_audited_run_reports_both_epsilons(tmp_path):
    """A short DP run on the digits: the reported epsilon is the target, the
    lower bound is consistent with the guesses, and it does not exceed it."""
    out = run_audit(
        AuditConfig(epsilon=2.0, epochs=2, num_canaries=60, num_guesses=20, seed=0)
    )
    r = out["result"]
    assert r["epsilon_reported"] == pytest.approx(2.0, abs=0.01)
    assert r["epsilon_lower_bound"] == S.one_run_epsilon_lower_bound(
        60, r["num_guesses"], r["num_correct"], 1e-5, 0.95
    )
    assert out["holds"] and len(out["scores"]) == 60
    assert 0.5 < out["test_accuracy"] <= 1.0


def test_lipdp_audit_writes_its_json_and_png(tmp_path, capsys):
    code = main(
        [
            "audit",
            "--epsilon",
            "3",
            "--no-noise",
            "--epochs",
            "1",
            "--canaries",
            "40",
            "--guesses",
            "10",
            "--seed",
            "0",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "audit.json").read_text())
    assert [run["config"]["epsilon"] for run in report["runs"]] == [3.0, None]
    assert report["runs"][1]["result"]["epsilon_reported"] == "inf"
    assert (tmp_path / "audit.png").stat().st_size > 10_000
    assert "epsilon lower bound" in capsys.readouterr().out


def test_the_audit_counts_classes_in_the_held_out_labels_only(tmp_path):
    """max(y_train, y_held) + 1 gave the audited model 10 outputs or 9 as the
    only training sample of class 9 was present or not (a review): the count
    comes from the held-out labels, and a training label beyond it is
    refused by name before anything trains."""
    path = write_npz_with_a_class_the_test_lacks(tmp_path / "nine.npz", 200, 8, 100)
    with pytest.raises(ValueError, match=r"lie in \[0, 9\)"):
        run_audit(AuditConfig(data=str(path), epsilon=2.0, epochs=1, num_canaries=20))
