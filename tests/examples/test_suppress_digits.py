"""The suppress-privacy example runs end to end and reaches its target sparsity."""

import pytest


@pytest.mark.slow
def test_suppress_example_reaches_90_percent_sparsity(run_example, tmp_path):
    rows = run_example("suppress_digits.py")
    table = [r for r in rows if len(r) == 5 and r[0].isdigit()]
    assert len(table) == 12
    theoretical, actual = float(table[-1][3]), float(table[-1][4])
    assert theoretical == pytest.approx(0.9, abs=1e-4)
    assert abs(actual - theoretical) <= 0.01
    assert float(table[-1][2]) > 0.8  # test accuracy at 90% sparsity
    assert (tmp_path / "suppress_digits.png").stat().st_size > 10_000
