"""Two worker processes on this machine (MultiWorkerMirroredStrategy over
127.0.0.1, ports chosen free at run time), started by examples/multi_worker.py:
identical weights and epsilon on both, and the noise of one global step is
the single-device noise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "multi_worker.py"

pytestmark = pytest.mark.slow


def launch(tmp_path: Path, workers: int, check: str, *extra: str) -> list[dict]:
    out = tmp_path / f"{check}_{workers}"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--workers",
            str(workers),
            "--check",
            check,
            "--output-dir",
            str(out),
            "--timeout",
            "400",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=500,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "identical_weights_and_epsilon True" in result.stdout
    return [json.loads((out / f"worker_{i}.json").read_text()) for i in range(workers)]


def test_two_workers_train_to_identical_weights_and_epsilon(tmp_path):
    workers = launch(tmp_path, 2, "train")
    steps = -(-1437 // 128)
    for result in workers:
        assert result["steps"] == 2 * steps
        assert len(result["epsilons"]) == 2
        assert result["test_accuracy"] > 0.5
    assert workers[0] == workers[1]


def test_two_workers_add_the_single_device_noise_once_per_step(tmp_path):
    """Sample weights 0, SGD(1.0): the update is the noise. Its std under two
    workers equals the single-device one within 3% (31 680 draws each: 3% is
    over 5 standard errors of the ratio) and the planned sigma * C / B;
    noise added by both workers would show sqrt(2) or 2 times it."""
    (single,) = launch(tmp_path, 1, "noise")
    two = launch(tmp_path, 2, "noise")
    assert two[0] == two[1]
    for result in (single, two[0]):
        assert result["steps"] == 10
        assert result["update_std"] == pytest.approx(result["planned_std"], rel=0.03)
        assert abs(result["lag1_correlation"]) < 5 / (result["draws"] / 10) ** 0.5
    assert two[0]["update_std"] == pytest.approx(single["update_std"], rel=0.03)
    assert two[0]["epsilons"] == single["epsilons"]


def test_two_workers_refuse_data_keras_would_shard_by_batches(tmp_path):
    """fit outside the strategy's scope (as the guide writes it) on a plain
    Poisson dataset or on arrays: each worker refuses before any step (each
    would train its own batches, some rows twice and some never). The
    cluster has a "chief" task, which counts as a worker too."""
    for result in launch(tmp_path, 2, "refusals", "--chief"):
        assert result["steps"] == 0
        assert all(
            message.startswith("Under several workers") for message in result["refused"]
        ), result["refused"]
