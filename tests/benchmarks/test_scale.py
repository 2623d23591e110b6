"""`benchmarks/scale.py` on a tiny configuration, end to end: 1, 2 and 4
replicas and two worker processes, ratios to one replica in the JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scale_benchmark_writes_samples_per_second_for_every_setting(tmp_path):
    output = tmp_path / "scale.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/scale.py",
            "--n",
            "256",
            "--batch-size",
            "64",
            "--epochs",
            "1",
            "--models",
            "clipless",
            "--out",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert "samples/s" in run.stdout
    rows = json.loads(output.read_text())["rows"]
    settings = [r["setting"] for r in rows]
    assert settings == ["1 replica(s)", "2 replica(s)", "4 replica(s)", "2 workers"]
    assert rows[0]["ratio_to_1"] == 1.0
    assert all(r["samples_per_s"] > 0 for r in rows)
