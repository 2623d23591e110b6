"""`train.run_train` / `lipdp train`: checkpoints, resume with the epsilon of
the whole run, `lipdp evaluate` reading the result."""

import json

import keras
import numpy as np
import pytest

from deel_lipdp_ext import cli, train
from deel_lipdp_ext.train import TrainConfig, evaluate_model, run_train

from .helpers import write_npz_with_a_class_the_test_lacks


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 300),
        x_test=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 100),
    )
    return str(path)


def _config(npz, out, **changes):
    settings = dict(
        data=npz,
        epochs=3,
        batch_size=100,
        target_epsilon=2.0,
        output_dir=str(out),
        verbose=0,
    )
    return TrainConfig(**{**settings, **changes})


def _crashing_after_epoch(monkeypatch, last: int = 0):
    """The process dies after the checkpoint of epoch `last` + 1 (0-based
    `last`); returns what undoes it."""
    save = train._SaveRun.on_epoch_end

    def crash(self, epoch, logs=None):
        save(self, epoch, logs)
        if epoch == last:
            raise KeyboardInterrupt

    monkeypatch.setattr(train._SaveRun, "on_epoch_end", crash)
    return lambda: monkeypatch.setattr(train._SaveRun, "on_epoch_end", save)


def test_interrupted_run_resumes_with_the_epsilon_of_the_whole_run(
    npz, tmp_path, monkeypatch
):
    undo = _crashing_after_epoch(monkeypatch, last=1)
    with pytest.raises(KeyboardInterrupt):
        run_train(_config(npz, tmp_path / "run"))
    undo()
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [r["epoch"] for r in state["epochs"]] == [1, 2]

    resumed = run_train(TrainConfig(output_dir=str(tmp_path / "run"), resume=True))
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]
    straight = run_train(_config(npz, tmp_path / "straight"))
    # Same plan (sigma, steps): the same epsilon, within the target.
    assert resumed["noise_multiplier"] == straight["noise_multiplier"]
    assert resumed["final_epsilon"] == pytest.approx(straight["final_epsilon"])
    assert resumed["final_epsilon"] <= 2.0 * 1.0001
    epsilons = [r["epsilon"] for r in resumed["epochs"]]
    assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1]

    evaluated = evaluate_model(str(tmp_path / "run" / "model.keras"), npz)
    assert evaluated["epsilon"] == pytest.approx(resumed["final_epsilon"])
    assert evaluated["steps"] == 9  # 3 epochs of 3 Poisson steps (q = 1/3)
    assert evaluated["test_accuracy"] == pytest.approx(
        resumed["final_test_accuracy"], abs=1e-6
    )


def test_cli_train_with_a_toml_config_then_evaluate(npz, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'data = "{npz}"\nepochs = 1\nbatch_size = 100\ntarget_epsilon = 1.0\n'
        "verbose = 0\n"
    )
    out = tmp_path / "out"
    argv = ["train", "--config", str(config), "--output-dir", str(out)]
    assert cli.main([*argv, "--learning-rate", "0.01"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["learning_rate"] == 0.01  # the flag
    assert report["recipe"]["epochs"] == 1  # the file
    assert report["final_epsilon"] <= 1.0 * 1.0001
    assert (out / "report.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(["evaluate", str(out / "model.keras"), "--data", npz]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    values = dict(item.split("=") for item in line.split())
    assert float(values["epsilon"]) == pytest.approx(report["final_epsilon"], abs=1e-4)
    assert 0.0 <= float(values["test_accuracy"]) <= 1.0


def test_bad_inputs_are_named(npz, tmp_path):
    with pytest.raises(FileNotFoundError, match="digits"):
        run_train(_config(str(tmp_path / "missing.npz"), tmp_path))
    with pytest.raises(ValueError, match="preset"):
        run_train(_config(npz, tmp_path, preset="resnet"))
    with pytest.raises(FileNotFoundError, match="resume=True"):
        run_train(TrainConfig(output_dir=str(tmp_path / "empty"), resume=True))
    config = tmp_path / "bad.toml"
    config.write_text("learnin_rate = 0.1\n")
    with pytest.raises(SystemExit, match="learnin_rate"):
        cli.main(["train", "--config", str(config)])


def test_reports_take_epsilon_from_the_model_and_runs_never_mix(npz, tmp_path):
    out = tmp_path / "run"
    first = run_train(_config(npz, out, epochs=1))
    # a new run in the same directory is refused unless asked to overwrite
    with pytest.raises(FileExistsError, match="resume"):
        run_train(_config(npz, out, epochs=1))
    # edited rows in run.json cannot lower the reported epsilon
    state = json.loads((out / "run.json").read_text())
    for row in state["epochs"]:
        row["epsilon"] = 0.01
    (out / "run.json").write_text(json.dumps(state))
    # resuming a finished run trains nothing more and reports the same
    again = run_train(TrainConfig(output_dir=str(out), resume=True, verbose=0))
    assert again["final_epsilon"] == pytest.approx(first["final_epsilon"])
    assert [r["epoch"] for r in again["epochs"]] == [1]
    # a checkpoint whose run identity is not this run's: resume refused
    state = json.loads((out / "run.json").read_text())
    state["lineage"] += 1
    (out / "run.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="not the model of the run"):
        run_train(TrainConfig(output_dir=str(out), resume=True, verbose=0))
    fresh = run_train(_config(npz, out, epochs=1, overwrite=True))
    assert fresh["final_epsilon"] <= 2.0 * 1.0001


def test_an_interrupted_run_leaves_no_report_of_another_run(npz, tmp_path, monkeypatch):
    """An overwriting run killed mid-way left the first run's report.json
    (epsilon 1.0, 6 steps) beside its own checkpoint (12 steps, epsilon
    3.18; a review): reports are removed when a run starts or resumes."""
    out = tmp_path / "run"
    run_train(_config(npz, out, epochs=1, target_epsilon=1.0))
    assert (out / "report.json").exists() and (out / "report.png").exists()
    undo = _crashing_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_train(_config(npz, out, epochs=3, target_epsilon=8.0, overwrite=True))
    assert not (out / "report.json").exists() and not (out / "report.png").exists()
    undo()
    resumed = run_train(TrainConfig(output_dir=str(out), resume=True, verbose=0))
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == resumed["steps"] == 9  # 3 epochs of 3 steps
    assert report["final_epsilon"] == resumed["final_epsilon"]


def test_cli_resume_refuses_settings_it_would_ignore(tmp_path):
    with pytest.raises(SystemExit, match="learning_rate"):
        cli.main(
            ["train", "--resume", "--output-dir", str(tmp_path)]
            + ["--learning-rate", "0.1"]
        )


def test_a_public_class_count_for_labels_the_test_split_lacks(tmp_path):
    """The class count is never counted in the training labels: a dataset
    whose only sample of class 9 is in the training split trains with
    --num-classes 10 (10 outputs with or without that sample); without it,
    the test labels' count (9) refuses the training label 9 by name."""
    outputs = []
    for skip in (0, 1):  # with and without the only sample of class 9
        path = write_npz_with_a_class_the_test_lacks(
            tmp_path / f"{skip}.npz", 300, 28, 60, skip_first=bool(skip)
        )
        out = tmp_path / f"run{skip}"
        argv = ["train", "--data", str(path), "--output-dir", str(out), "--epochs", "1"]
        assert cli.main([*argv, "--num-classes", "10", "--verbose", "0"]) == 0
        model = keras.models.load_model(out / "model.keras")
        outputs.append((model.output_shape[-1], model.dataset_metadata.num_classes))
        assert evaluate_model(str(out / "model.keras"), str(path))["steps"] > 0
    assert outputs == [(10, 10), (10, 10)]
    with pytest.raises(ValueError, match=r"lie in \[0, 9\).*num_classes=9"):
        run_train(_config(str(tmp_path / "0.npz"), tmp_path / "counted", epochs=1))


def test_a_run_saved_without_a_class_count_resumes_with_its_models(
    tmp_path, monkeypatch
):
    """A run.json written before num_classes existed resumes with the
    model's own class count (its test split lacks class 9: counting the test
    labels refused the training label 9; a review); an overwriting run
    whose data is refused leaves the previous run in place; --num-classes 0
    (which fell through to the training labels) is refused."""
    path = write_npz_with_a_class_the_test_lacks(tmp_path / "nine.npz", 300, 28, 60)
    out = tmp_path / "run"
    undo = _crashing_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_train(_config(str(path), out, epochs=2, num_classes=10))
    undo()
    state = json.loads((out / "run.json").read_text())
    del state["config"]["num_classes"]  # as written before the setting existed
    (out / "run.json").write_text(json.dumps(state))
    resumed = run_train(TrainConfig(output_dir=str(out), resume=True, verbose=0))
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2]
    before = (out / "model.keras").read_bytes()
    with pytest.raises(ValueError, match="counted in the test labels"):
        run_train(_config(str(path), out, epochs=1, overwrite=True))
    assert (out / "model.keras").read_bytes() == before and (out / "run.json").exists()
    with pytest.raises(ValueError, match="positive int"):
        cli.main(
            [
                "train",
                "--data",
                str(path),
                "--output-dir",
                str(tmp_path / "z"),
                "--num-classes",
                "0",
                "--verbose",
                "0",
            ]
        )


def test_a_resume_refuses_settings_other_than_the_run_s(npz, tmp_path, monkeypatch):
    """A review: run_train(TrainConfig(resume=True, target_epsilon=1.0,
    epochs=10)) went on to the saved run's 3.0, the new target ignored."""
    undo = _crashing_after_epoch(monkeypatch, last=0)
    with pytest.raises(KeyboardInterrupt):
        run_train(_config(npz, tmp_path / "run"))
    undo()
    with pytest.raises(ValueError, match=r"target_epsilon=1.0 \(the run's: 2.0\)"):
        run_train(_config(npz, tmp_path / "run", resume=True, target_epsilon=1.0))
    resumed = run_train(_config(npz, tmp_path / "run", resume=True))  # the same
    assert [r["epoch"] for r in resumed["epochs"]] == [1, 2, 3]


def test_a_run_interrupted_between_its_checkpoint_and_run_json_resumes(
    npz, tmp_path, monkeypatch
):
    """A review: the checkpoint was saved before run.json learned its run
    identity (a new one in each process); a run killed between the two
    writes could never be resumed ("not the model of the run")."""
    update = train._update_json

    def dies_after_the_checkpoint(path, values):
        if "epochs" in values and len(values["epochs"]) == 2:
            raise KeyboardInterrupt
        update(path, values)

    undo = _crashing_after_epoch(monkeypatch, last=0)
    with pytest.raises(KeyboardInterrupt):
        run_train(_config(npz, tmp_path / "run"))
    undo()
    monkeypatch.setattr(train, "_update_json", dies_after_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):  # a new process: a new identity
        run_train(TrainConfig(output_dir=str(tmp_path / "run"), resume=True))
    monkeypatch.setattr(train, "_update_json", update)
    resumed = run_train(TrainConfig(output_dir=str(tmp_path / "run"), resume=True))
    assert resumed["epochs"][-1]["epoch"] == 3
    assert resumed["final_epsilon"] <= 2.0 * 1.0001
