"""`benchmarks/accuracy.py --quick`: the accuracy benchmark runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_accuracy_benchmark_quick_run_writes_its_table_and_json(tmp_path):
    output = tmp_path / "accuracy.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "dataset  method" in run.stdout
    rows = json.loads(output.read_text())["rows"]
    assert {r["method"] for r in rows} == {"clipless", "dpsgd", "nonprivate"}
    for row in rows:
        assert set(row) >= {
            "dataset",
            "method",
            "target_epsilon",
            "epsilon",
            "test_accuracy",
            "epochs",
            "seconds_per_epoch",
        }
        assert 0.0 <= row["test_accuracy"] <= 1.0
        if row["method"] != "nonprivate":
            assert row["epsilon"] <= row["target_epsilon"] == 3.0
