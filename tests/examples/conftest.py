"""Runs an example script in a subprocess and returns its printed table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def run_example(tmp_path):
    """``run_example(script, *args)``: the script's stdout lines, split on spaces;
    it writes its figures under ``tmp_path`` (``--output-dir``)."""

    def run(script: str, *args: str) -> list[list[str]]:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run(
            [
                sys.executable,
                str(EXAMPLES / script),
                "--output-dir",
                str(tmp_path),
                *args,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return [line.split() for line in result.stdout.splitlines()]

    return run
