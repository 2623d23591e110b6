"""`benchmarks/speed.py` on a tiny configuration, end to end: every model
timed beside its non-private baseline, ratios and peak memory in the JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_speed_benchmark_writes_ratios_to_the_non_private_baseline(tmp_path):
    output = tmp_path / "speed.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--n",
            "256",
            "--batch-sizes",
            "64",
            "--models",
            "keras_cnn",
            "dpsgd_ghost",
            "dpsgd_vectorized",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--out",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert "wall x" in run.stdout
    rows = json.loads(output.read_text())["rows"]
    assert {(r["model"], r["sampling"]) for r in rows} == {
        (m, s)
        for m in ("keras_cnn", "dpsgd_ghost", "dpsgd_vectorized")
        for s in ("poisson", "shuffle")
    }
    for row in rows:
        assert row["wall_s"] > 0 and row["cpu_s"] > 0 and row["peak_mib"] >= 0
        for clock in ("wall", "cpu"):
            low, high = row[f"{clock}_ratio_range"]
            assert low <= row[f"{clock}_ratio"] <= high
        if row["model"] == "keras_cnn":
            assert row["wall_ratio"] == 1.0
    missing = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--models", "clipless"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "keras_lipschitz" in missing.stderr
