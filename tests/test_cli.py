import json
import os
import shutil
import subprocess
import sys

import pytest

from deel_lipdp_ext import cli


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_setting(tmp_path, capsys):
    assert (
        cli.main(
            [
                "demo",
                "--epochs",
                "2",
                "--target-epsilon",
                "1.0",
                "--batch-size",
                "400",
                "--output-dir",
                str(tmp_path),
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["epochs"]) == 2
    assert report["final_epsilon"] <= 1.0
    assert 0.0 <= report["final_test_accuracy"] <= 1.0
    tightness = report["tightness"].values()
    assert all(t["mean_ratio"] <= t["max_ratio"] <= 1 + 1e-4 for t in tightness)
    assert report["recipe"]["batch_size"] == 400  # the override
    assert report["recipe"]["noisify_strategy"] == "per-layer"
    assert report["accountant"] == "pld"
    assert (tmp_path / "report.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "epoch   epsilon" in out and "Tightness" in out


def test_epsilon_and_calibrate_commands(capsys):
    assert (
        cli.main(
            [
                "epsilon",
                "--noise-multiplier",
                "1.1",
                "--sampling-rate",
                "0.004",
                "--epochs",
                "60",
                "--delta",
                "1e-5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("epsilon=") and "steps=15000" in out
    eps = float(out.split()[0].split("=")[1])
    assert (
        cli.main(
            [
                "calibrate",
                "--target-epsilon",
                str(eps),
                "--sampling-rate",
                "0.004",
                "--epochs",
                "60",
            ]
        )
        == 0
    )
    sigma = float(capsys.readouterr().out.split()[0].split("=")[1])
    assert sigma == pytest.approx(1.1, abs=2e-3)


def test_epsilon_command_with_pld(capsys):
    from deel_lipdp_ext.accounting import PrivacySpec, epsilon_for_spec

    argv = ["epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.004"]
    assert cli.main([*argv, "--epochs", "60", "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    assert "accountant=pld" in out
    want = epsilon_for_spec(PrivacySpec(0.004, 15000, (1.1,), 1e-5), "pld")
    assert float(out.split()[0].split("=")[1]) == pytest.approx(want, abs=1e-6)


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )


def test_accounting_commands_do_not_import_tensorflow():
    # As the `lipdp` console script runs them (argv[0] is the script).
    code = (
        "import sys; sys.argv = ['/usr/bin/lipdp']\n"
        "from deel_lipdp_ext import cli\n"
        "assert cli.main(['epsilon', '--noise-multiplier', '1.1', "
        "'--sampling-rate', '0.004', '--epochs', '60']) == 0\n"
        "assert cli.main(['calibrate', '--target-epsilon', '3', "
        "'--sampling-rate', '0.004', '--epochs', '60']) == 0\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("epsilon=") and lines[1].startswith("noise_multiplier=")
    assert lines[-1] == "False False"


def test_console_script_prints_no_tensorflow_start_up_lines(tmp_path):
    # The installed console script; without one (a checkout not installed
    # with pip), `python -m deel_lipdp_ext` takes the same light import path.
    script = shutil.which("lipdp", path=os.path.dirname(sys.executable))
    command = [script] if script else [sys.executable, "-m", "deel_lipdp_ext"]
    result = subprocess.run(
        [*command, "epsilon", "--noise-multiplier", "1.1", "--sampling-rate", "0.004"]
        + ["--epochs", "60"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("epsilon=")
    assert result.stderr == ""


def test_quiet_tensorflow_import_keeps_stderr_working():
    code = (
        "import sys; sys.argv = ['lipdp']\n"
        "from deel_lipdp_ext import cli\n"
        "cli._import_tensorflow_quietly()\n"
        "import tensorflow\n"
        "sys.stderr.write('still-visible\\n')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "I0000" not in result.stderr and "absl" not in result.stderr
    assert result.stderr.strip() == "still-visible"


def test_plain_import_registers_every_serialisable_class():
    # keras.models.load_model finds the classes after `import deel_lipdp_ext`
    # (Keras imports only its own packages when it deserialises).
    code = (
        "import deel_lipdp_ext, keras\n"
        "names = ['DPSequential', 'DPModel', 'DP_SpectralDense', "
        "'DP_BoundedInput', 'DP_TauCategoricalCrossentropy']\n"
        "print(all(keras.saving.get_registered_object('deel_lipdp_ext>' + n) "
        "is not None for n in names))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True"


def test_rdp_epsilon_command_leaves_the_pld_library_unloaded_until_used():
    """dp-accounting's PLD library (scipy.signal, scipy.stats) and its
    calibration (scipy.optimize) are loaded only when used (`lipdp epsilon`:
    0.5 s instead of 1.3 s); a PLD epsilon computed after it still equals
    the accountant's."""
    code = (
        "import sys; sys.argv = ['/usr/bin/lipdp']\n"
        "from deel_lipdp_ext import cli\n"
        "assert cli.main(['epsilon', '--noise-multiplier', '1.1', "
        "'--sampling-rate', '0.004', '--epochs', '60']) == 0\n"
        "print('scipy.signal' in sys.modules, 'scipy.optimize' in sys.modules, "
        "'dp_accounting.pld.common' in sys.modules)\n"
        "assert cli.main(['epsilon', '--noise-multiplier', '1.1', "
        "'--sampling-rate', '0.004', '--epochs', '60', '--accountant', 'pld']) == 0\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == "False False False"
    from deel_lipdp_ext.accounting import PrivacySpec, epsilon_for_spec

    want = epsilon_for_spec(PrivacySpec(0.004, 15000, (1.1,), 1e-5), "pld")
    assert float(lines[2].split()[0].split("=")[1]) == pytest.approx(want, abs=1e-6)
