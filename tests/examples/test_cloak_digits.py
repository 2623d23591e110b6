"""The cloak example runs end to end (one epoch per setting) and writes its figure."""

import pytest


@pytest.mark.slow
def test_cloak_example_prints_its_table_and_saves_the_figure(run_example, tmp_path):
    rows = run_example("cloak_digits.py", "--epochs", "1")
    table = [r for r in rows if r and r[0] in ("composite", "image", "image[-1,1]")]
    assert len(table) == 7
    for row in table:
        accuracy = float(row[2])
        assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "cloak_digits.png").stat().st_size > 10_000
