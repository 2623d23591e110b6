"""The cloak example runs end to end (one epoch per setting) and writes its figure."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cloak_digits.py"


@pytest.mark.slow
def test_cloak_example_prints_its_table_and_saves_the_figure(tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--output-dir", str(tmp_path), "--epochs", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    table = [r for r in rows if r and r[0] in ("composite", "image", "image[-1,1]")]
    assert len(table) == 7
    for row in table:
        accuracy = float(row[2])
        assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "cloak_digits.png").stat().st_size > 10_000
