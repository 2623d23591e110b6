"""`benchmarks/audit.py --quick`, end to end: a DP run and its no-noise
reference, side by side, with the summary the note quotes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_audit_benchmark_quick_run_writes_its_table_and_json(tmp_path):
    output = tmp_path / "audit.json"
    run = subprocess.run(
        [
            sys.executable,
            "benchmarks/audit.py",
            "--quick",
            "--models",
            "clipless",
            "--canaries",
            "60",
            "--guesses",
            "20",
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "epsilon lower bound" in run.stdout
    result = json.loads(output.read_text())
    epsilons = [r["config"]["epsilon"] for r in result["runs"]]
    assert epsilons == [3.0, None]
    assert result["summary"]["all_hold"] is True
    dp = result["runs"][0]["result"]
    assert dp["epsilon_lower_bound"] <= dp["epsilon_reported"] <= 3.0
