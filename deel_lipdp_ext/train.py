"""Train a preset on the bundled digits or a user's `.npz`, with a checkpoint
after every epoch and resume; evaluate a saved model. `lipdp train`,
`lipdp evaluate` and `lipdp demo` run these.

A run lives in its output directory: `model.keras` (the model after the last
completed epoch: weights, optimizer state and the privacy ledger), `run.json`
(the run's settings) and `report.json` / `report.png`. `resume=True` loads
`model.keras` and trains the remaining planned epochs: the epsilon is that of
the whole run (the ledger is in the checkpoint) and the noise continues its
stream (`privacy_plan`: a restored model never replays a noise value).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import keras

from .callbacks import DP_Accountant
from .data import load_digits_dataset, load_npz_dataset
from .models import PRESETS, Recipe, recipe
from .sensitivity import gradient_norm_check

CHECKPOINT = "model.keras"
RUN_FILE = "run.json"
#: Written when a run ends, removed when one starts or resumes (a report
#: never describes a model other than the checkpoint beside it).
REPORT_FILES = ("report.json", "report.png")


@dataclass
class TrainConfig:
    """Settings of `run_train` (None: the preset's recipe decides).

    Args:
        data: "digits" (bundled) or the path of an `.npz` with x_train,
            y_train, x_test, y_test (MNIST layout; `data.load_npz_dataset`).
        preset: a `models.PRESETS` name.
        epochs: epochs to plan the noise for and to train.
        target_epsilon: epsilon of the whole run (delta = `delta`).
        batch_size: expected batch size of the Poisson batches.
        learning_rate: Adam's initial learning rate (cosine decay).
        accountant: "pld" or "rdp" (calibration and report).
        seed: None (default): secret noise and batches (OS entropy); an int:
            reproducible, not secret.
        output_dir: where the checkpoint and the reports go.
        resume: continue the run saved in `output_dir`, with its own
            settings (a run-defining field set to another value is refused).
        overwrite: start afresh in an `output_dir` that holds a run (its
            files are replaced); without it such a directory is refused, so a
            report never mixes two runs.
        checkpoint: save `model.keras` after every epoch.
        verbose: Keras' progress display (0, 1 or 2).
        num_classes: the number of classes of an `.npz` with class-index
            labels (public). None: the test labels' count (never counted in
            the training labels: `data.from_numpy`); the digits have 10.
    """

    data: str = "digits"
    preset: str = "scattering_mlp"
    epochs: int | None = None
    target_epsilon: float = 3.0
    delta: float = 1e-5
    batch_size: int | None = None
    learning_rate: float | None = None
    accountant: str = "pld"
    seed: int | None = None
    output_dir: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    checkpoint: bool = True
    verbose: int = 1
    num_classes: int | None = None


def load_data(
    data: str,
    batch_size: int,
    seed: int | None = None,
    feature_map=None,
    num_classes: int | None = None,
):
    """(train, test, metadata): Poisson batches of the digits or of an `.npz`
    path, each image (or its `feature_map` features) scaled to L2 norm 1;
    `num_classes` as in `TrainConfig`."""
    kwargs = {
        "batch_size": batch_size,
        "input_bound": 1.0,
        "seed": seed,
        "feature_map": feature_map,
    }
    if data == "digits":
        return load_digits_dataset(sampling="poisson", **kwargs)
    if not os.path.isfile(data):
        raise FileNotFoundError(
            f"`data` must be 'digits' or the path of an .npz file (x_train, "
            f"y_train, x_test, y_test). Received: {data!r} (no such file)"
        )
    return load_npz_dataset(
        data, preprocessing="normalize", num_classes=num_classes, **kwargs
    )


def run_recipe(config: TrainConfig, dataset_size: int) -> Recipe:
    """The preset's recipe for the dataset size, with the config's overrides."""
    if config.preset not in PRESETS:
        raise ValueError(
            f"`preset` must be one of {sorted(PRESETS)}. Received: {config.preset!r}"
        )
    overrides = {"accountant": config.accountant}
    for name in ("epochs", "batch_size", "learning_rate"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    return dataclasses.replace(recipe(config.preset, dataset_size), **overrides)


class _SaveRun(keras.callbacks.Callback):
    """After each epoch: the checkpoint, then the rows of the report so far."""

    def __init__(self, output_dir: str, rows: list, checkpoint: bool):
        super().__init__()
        self.output_dir = output_dir
        self.rows = rows
        self.checkpoint = checkpoint

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.rows.append(
            {
                "epoch": epoch + 1,
                "epsilon": float(logs["epsilon"]),
                "test_accuracy": float(logs["val_accuracy"]),
            }
        )
        # the privacy plan's run identity as saved with the checkpoint: a
        # resume refuses a checkpoint of another run. It is written before
        # the checkpoint too, as pending: a run interrupted between the two
        # writes could never be resumed (a review)
        lineage = int(self.model.privacy_plan.lineage.numpy())
        run_file = os.path.join(self.output_dir, RUN_FILE)
        _update_json(run_file, {"pending_lineage": lineage})
        if self.checkpoint:
            # write then rename: an interruption never leaves half a file
            final = os.path.join(self.output_dir, CHECKPOINT)
            partial = os.path.join(self.output_dir, "model.partial.keras")
            self.model.save(partial)
            os.replace(partial, final)
        _update_json(
            run_file, {"epochs": self.rows, "lineage": lineage, "pending_lineage": None}
        )


def _write_json(path: str, state: dict) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(partial, path)


def _update_json(path: str, values: dict) -> None:
    with open(path) as f:
        state = json.load(f)
    state.update(values)
    _write_json(path, state)


def _start(config: TrainConfig):
    """A new run: the recipe's model with sigma calibrated for the target."""
    existing = [
        name
        for name in (CHECKPOINT, RUN_FILE)
        if os.path.exists(os.path.join(config.output_dir, name))
    ]
    if existing and not config.overwrite:
        raise FileExistsError(
            f"{config.output_dir} already holds a run ({', '.join(existing)}): "
            "resume it (resume=True, --resume), or pass overwrite=True "
            "(--overwrite) or another output directory."
        )
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    _, _, full = load_data(config.data, 1, config.seed, None, config.num_classes)
    settings = run_recipe(config, full.nb_samples_train)
    train, test, meta = load_data(
        config.data,
        settings.batch_size,
        config.seed,
        settings.feature_map(),
        config.num_classes,
    )
    model = settings.build(meta, settings.dp_parameters(config.delta, seed=config.seed))
    sigma = model.privacy_plan.calibrate_noise_multiplier(
        config.target_epsilon, settings.epochs, settings.accountant
    )
    model.set_noise_multiplier(sigma)
    model.compile(**settings.compile_arguments(meta))
    for name in existing:  # only once the new run could be set up
        os.remove(os.path.join(config.output_dir, name))
    os.makedirs(config.output_dir, exist_ok=True)
    _write_json(
        os.path.join(config.output_dir, RUN_FILE),
        {
            "config": dataclasses.asdict(config),
            "recipe": dataclasses.asdict(settings),
            "noise_multiplier": sigma,
            "lineage": None,  # set with each checkpoint (`_SaveRun`)
            "epochs": [],
        },
    )
    return model, settings, train, test, [], config


def _resume(config: TrainConfig):
    """The run saved in `config.output_dir`, from its last completed epoch."""
    checkpoint = os.path.join(config.output_dir, CHECKPOINT)
    run_file = os.path.join(config.output_dir, RUN_FILE)
    if not (os.path.isfile(checkpoint) and os.path.isfile(run_file)):
        raise FileNotFoundError(
            f"resume=True needs {checkpoint} and {run_file} from an earlier run "
            f"with the same output_dir."
        )
    with open(run_file) as f:
        state = json.load(f)
    _refuse_other_settings(config, state["config"])
    settings = _recipe_of(state)
    model = keras.models.load_model(checkpoint)
    identities = (state.get("lineage"), state.get("pending_lineage"))
    if int(model.privacy_plan.lineage.numpy()) not in identities:
        raise ValueError(
            f"{checkpoint} is not the model of the run in {run_file} (their run "
            "identities differ): resume refused."
        )
    done = model.privacy_plan.completed_epochs()
    seed = state["config"]["seed"]
    if seed is not None:
        # Fresh, still reproducible batches: the same seed would replay the
        # batches of the first epochs.
        seed = seed * 1_000_003 + done
    run_config = TrainConfig(**state["config"])
    train, test, _ = load_data(
        run_config.data,
        settings.batch_size,
        seed,
        settings.feature_map(),
        model.dataset_metadata.num_classes,  # runs saved before num_classes too
    )
    return model, settings, train, test, state["epochs"][:done], run_config


#: TrainConfig fields that do not define a run (a resume may set them).
_RUN_INDEPENDENT = ("output_dir", "resume", "overwrite", "checkpoint", "verbose")


def _refuse_other_settings(config: TrainConfig, saved: dict) -> None:
    """A resume continues the saved run with its own settings: a field set
    (away from its default) to another value than the run's is refused, not
    ignored (a review: target_epsilon=1.0 given, the run went on to its
    3.0)."""
    default = TrainConfig()
    other = [
        f"{field.name}={getattr(config, field.name)!r} (the run's: "
        f"{saved.get(field.name)!r})"
        for field in dataclasses.fields(TrainConfig)
        if field.name not in _RUN_INDEPENDENT
        and getattr(config, field.name) != getattr(default, field.name)
        and getattr(config, field.name) != saved.get(field.name)
    ]
    if other:
        raise ValueError(
            "resume=True continues the saved run with its own settings; "
            f"these differ: {', '.join(other)}. Start a new run instead "
            "(another output_dir, or overwrite=True)."
        )


def _recipe_of(state: dict) -> Recipe:
    """The Recipe saved in a run.json (JSON lists back to tuples)."""
    saved = dict(state["recipe"])
    saved["model_arguments"] = {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in saved["model_arguments"].items()
    }
    return Recipe(**saved)


def run_train(config: TrainConfig) -> dict:
    """Train (or resume) and write `report.json` / `report.png` into
    `config.output_dir`.

    Returns:
        The report dict (sigma, per-epoch epsilon and test accuracy, tightness
        of the gradient bounds on the test data).
    """
    model, settings, train, test, rows, run_config = (
        _resume(config) if config.resume else _start(config)
    )
    for name in REPORT_FILES:  # the training below changes the checkpoint
        path = os.path.join(config.output_dir, name)
        if os.path.exists(path):
            os.remove(path)
    # epochs done: from the model's own step counter, not from the rows
    initial_epoch = model.privacy_plan.completed_epochs()
    meta = model.dataset_metadata
    sigma = model.dp_parameters.noise_multiplier
    steps = settings.epochs * meta.nb_steps_per_epoch
    resuming = f"Resuming at epoch {initial_epoch + 1}: " if initial_epoch else ""
    print(
        f"{resuming}"
        f"noise multiplier sigma={sigma:.4f} for epsilon<="
        f"{run_config.target_epsilon} "
        f"(delta={model.privacy_plan.delta}, q={meta.sampling_rate:.4f}, {steps} "
        f"steps, {settings.accountant.upper()})"
    )
    callbacks = [
        DP_Accountant(
            settings.accountant, epsilon_budget=run_config.target_epsilon * 1.0001
        ),
        _SaveRun(config.output_dir, rows, config.checkpoint),
    ]
    start = time.perf_counter()
    if initial_epoch < settings.epochs:
        model.fit(
            train,
            epochs=settings.epochs,
            initial_epoch=initial_epoch,
            validation_data=test,
            callbacks=callbacks,
            verbose=config.verbose,
        )
    else:
        print(f"The run already completed its {settings.epochs} planned epochs.")
    seconds = time.perf_counter() - start
    # Tightness on the TEST data: on training data it would be a release
    # without noise.
    check = gradient_norm_check(model, test, max_batches=2)
    plan = model.privacy_plan
    report = {
        "data": run_config.data,
        "noise_multiplier": sigma,
        "delta": plan.delta,
        "accountant": settings.accountant,
        "sampling": list(plan.samplings()),
        "seed": run_config.seed,
        "sampling_rate": meta.sampling_rate,
        "batch_size": meta.batch_size,
        "recipe": dataclasses.asdict(settings),
        "train_seconds": seconds,
        "epochs": rows,
        # from the model's ledger (what ran), never from the rows of run.json
        "final_epsilon": plan.epsilon(settings.accountant),
        "steps": plan.steps_taken(),
        "final_test_accuracy": rows[-1]["test_accuracy"] if rows else None,
        "tightness": {
            r.path: {"max_ratio": r.ratio, "mean_ratio": r.mean_ratio}
            for r in check.rows
        },
    }
    _write(report, config.output_dir)
    print(_table(rows))
    print("\nTightness of the gradient bounds (per-sample norm / bound, test data):")
    print(check.table())
    print(
        f"\nReport written to {os.path.join(config.output_dir, 'report.json')} "
        "and report.png"
    )
    return report


def evaluate_model(path: str, data: str, accountant: str = "pld") -> dict:
    """Test accuracy of a saved DP model on `data` ("digits" or an `.npz`
    path) and the epsilon of its recorded training (its privacy ledger).
    The feature map of the run (its recipe's `features`) is read from the
    `run.json` beside the model, if any.

    Returns:
        {"test_accuracy", "test_loss", "epsilon", "delta", "steps", "sampling"}.

    Raises:
        ValueError: the data's samples do not have the model's input shape.
    """
    model = keras.models.load_model(path)
    run_file = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_FILE)
    feature_map = None
    if os.path.isfile(run_file):
        with open(run_file) as f:
            feature_map = _recipe_of(json.load(f)).feature_map()
    _, test, meta = load_data(
        data,
        model.dataset_metadata.batch_size,
        feature_map=feature_map,
        num_classes=model.dataset_metadata.num_classes,
    )
    if tuple(meta.input_shape) != tuple(model.dataset_metadata.input_shape):
        raise ValueError(
            f"The model takes inputs of shape {model.dataset_metadata.input_shape}; "
            f"{data!r} gives {meta.input_shape} (a model trained on features "
            f"needs the {RUN_FILE} of its run beside it)."
        )
    if test is None:
        raise ValueError(f"{data!r} has no test split (x_test, y_test).")
    results = model.evaluate(test, verbose=0, return_dict=True)
    plan = model.privacy_plan
    return {
        "test_accuracy": float(results["accuracy"]),
        "test_loss": float(results["loss"]),
        "epsilon": plan.epsilon(accountant),
        "delta": plan.delta,
        "steps": plan.steps_taken(),
        "sampling": list(plan.samplings()),
    }


def _table(rows) -> str:
    lines = [f"{'epoch':>5} {'epsilon':>9} {'test acc':>9}"]
    lines += [
        f"{r['epoch']:>5} {r['epsilon']:>9.4f} {r['test_accuracy']:>9.4f}" for r in rows
    ]
    return "\n".join(lines)


def _write(report: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, REPORT_FILES[0]), "w") as f:
        json.dump(report, f, indent=2)
    epochs = [r["epoch"] for r in report["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        epochs, [r["test_accuracy"] for r in report["epochs"]], label="test accuracy"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["epsilon"] for r in report["epochs"]], "k--", label="epsilon")
    ax2.set_ylabel(f"epsilon (delta={report['delta']})")
    handles = ax.get_lines() + ax2.get_lines()
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    ax.set_title(f"Clipless DP training, sigma={report['noise_multiplier']:.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, REPORT_FILES[1]), dpi=100)
    plt.close(fig)
