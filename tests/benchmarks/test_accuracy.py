"""`--quick` runs of the accuracy and ablation benchmarks, end to end."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _quick_run(script: str, output: Path) -> tuple[str, list[dict]]:
    """Run `benchmarks/<script> --quick`; return its stdout and JSON rows."""
    run = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout, json.loads(output.read_text())["rows"]


def test_accuracy_benchmark_quick_run_writes_its_table_and_json(tmp_path):
    stdout, rows = _quick_run("accuracy.py", tmp_path / "accuracy.json")
    assert "dataset  method" in stdout
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


def test_ablation_benchmark_quick_run_writes_its_table_and_json(tmp_path):
    stdout, rows = _quick_run("ablation.py", tmp_path / "ablation.json")
    assert "variant" in stdout
    assert [r["variant"] for r in rows] == [
        "recipe",
        "small_cnn, augmentation multiplicity 4 (shifts)",
    ]
    for row in rows:
        assert row["epsilon"] <= row["target_epsilon"] == 3.0
        assert 0.0 <= row["test_accuracy"] <= 1.0
