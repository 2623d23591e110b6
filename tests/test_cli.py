import json

import pytest

from deel_lipdp_ext import cli


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    assert (
        cli.main(
            [
                "demo",
                "--epochs",
                "2",
                "--target-epsilon",
                "1.0",
                "--batch-size",
                "400",
                "--output-dir",
                str(tmp_path),
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["epochs"]) == 2
    assert report["final_epsilon"] <= 1.0
    assert 0.0 <= report["final_test_accuracy"] <= 1.0
    tightness = report["tightness"].values()
    assert all(t["mean_ratio"] <= t["max_ratio"] <= 1 + 1e-4 for t in tightness)
    assert report["recipe"]["batch_size"] == 400  # the override
    assert report["recipe"]["noisify_strategy"] == "per-layer"
    assert report["accountant"] == "pld"
    assert (tmp_path / "report.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "epoch   epsilon" in out and "Tightness" in out


def test_epsilon_and_calibrate_commands(capsys):
    assert (
        cli.main(
            [
                "epsilon",
                "--noise-multiplier",
                "1.1",
                "--sampling-rate",
                "0.004",
                "--epochs",
                "60",
                "--delta",
                "1e-5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("epsilon=") and "steps=15000" in out
    eps = float(out.split()[0].split("=")[1])
    assert (
        cli.main(
            [
                "calibrate",
                "--target-epsilon",
                str(eps),
                "--sampling-rate",
                "0.004",
                "--epochs",
                "60",
            ]
        )
        == 0
    )
    sigma = float(capsys.readouterr().out.split()[0].split("=")[1])
    assert sigma == pytest.approx(1.1, abs=2e-3)


def test_epsilon_command_with_pld(capsys):
    from deel_lipdp_ext.accounting import PrivacySpec, epsilon_for_spec

    argv = ["epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.004"]
    assert cli.main([*argv, "--epochs", "60", "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    assert "accountant=pld" in out
    want = epsilon_for_spec(PrivacySpec(0.004, 15000, (1.1,), 1e-5), "pld")
    assert float(out.split()[0].split("=")[1]) == pytest.approx(want, abs=1e-6)
