"""The MI-FACE and MAD examples run end to end and print their tables."""

import pytest


@pytest.mark.slow
def test_mad_example_moves_each_metric_and_holds_the_other(run_example, tmp_path):
    rows = run_example("mad_competition.py", "--iterations", "60")
    table = {
        f"{r[0]} {r[1]}": [float(v) for v in r[2:]]
        for r in rows
        if len(r) == 7 and r[0] in ("min", "max")
    }
    assert len(table) == 4
    mse_start, mse_end = table["min mse"][1:3]
    assert mse_end < mse_start
    assert table["max mse"][2] > table["max mse"][1]
    assert table["min dssim"][4] < table["min dssim"][3]
    assert table["max dssim"][4] > table["max dssim"][3]
    assert (tmp_path / "mad_images.png").exists() and (
        tmp_path / "mad_losses.png"
    ).exists()


@pytest.mark.slow
def test_mi_face_example_prints_epsilon_accuracy_and_similarity(run_example, tmp_path):
    rows = run_example("mi_face_vs_dpsgd.py")
    table = {
        r[0]: r[1:] for r in rows if r and r[0] in ("non-private", "DP-SGD", "clipless")
    }
    assert set(table) == {"non-private", "DP-SGD", "clipless"}
    assert table["non-private"][0] == "inf"
    assert float(table["DP-SGD"][0]) == pytest.approx(float(table["clipless"][0]))
    for values in table.values():
        assert 0.0 <= float(values[1]) <= 1.0 and -1.0 <= float(values[2]) <= 1.0
    assert (tmp_path / "mi_face_vs_dpsgd.png").exists()
