"""The main job: calibrate sigma for a target epsilon, train a small DP Lipschitz
CNN on the bundled digits, report epsilon and accuracy per epoch."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import keras

from .callbacks import DP_Accountant
from .data import load_digits_dataset
from .models import Recipe, recipe
from .sensitivity import gradient_norm_check


@dataclass
class DemoConfig:
    epochs: int = 30
    target_epsilon: float = 3.0
    delta: float = 1e-5
    batch_size: int | None = None  # None: the recipe's (512)
    learning_rate: float | None = None  # None: the recipe's (Adam, cosine decay)
    output_dir: str = "runs/demo"
    seed: int | None = None  # None: secret noise and batches (OS entropy)
    accountant: str = "pld"
    verbose: int = 1


def demo_recipe(config: DemoConfig, dataset_size: int) -> Recipe:
    """`models.recipe("small_cnn", dataset_size)` (a 2x2/2 patch convolution
    with 8 channels, GroupSort, a dense head; per-layer noise; loss-gradient
    clipping), with the config's overrides."""
    settings = recipe("small_cnn", dataset_size)
    overrides = {"epochs": config.epochs, "accountant": config.accountant}
    if config.batch_size is not None:
        overrides["batch_size"] = config.batch_size
    if config.learning_rate is not None:
        overrides["learning_rate"] = config.learning_rate
    return dataclasses.replace(settings, **overrides)


def run_demo(config: DemoConfig) -> dict:
    """Train and write report.json / report.png into `config.output_dir`.

    Returns:
        The report dict (sigma, per-epoch epsilon and accuracies, tightness).
    """
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    _, _, full = load_digits_dataset(batch_size=1, seed=config.seed)
    settings = demo_recipe(config, full.nb_samples_train)
    train, test, meta = load_digits_dataset(
        batch_size=settings.batch_size,
        input_bound=1.0,
        sampling="poisson",
        seed=config.seed,
    )
    model = settings.build(meta, settings.dp_parameters(config.delta, seed=config.seed))
    # Calibrate the mechanism that runs: the model's own privacy plan.
    sigma = model.privacy_plan.calibrate_noise_multiplier(
        config.target_epsilon, config.epochs, config.accountant
    )
    model.set_noise_multiplier(sigma)
    steps = config.epochs * meta.nb_steps_per_epoch
    print(
        f"Calibrated noise multiplier sigma={sigma:.4f} for "
        f"epsilon<={config.target_epsilon}"
        f" (delta={config.delta}, q={meta.sampling_rate:.4f}, {steps} steps, "
        f"{config.accountant.upper()})"
    )
    model.compile(**settings.compile_arguments(meta))
    accountant = DP_Accountant(
        config.accountant, epsilon_budget=config.target_epsilon * 1.0001
    )
    start = time.perf_counter()
    history = model.fit(
        train,
        epochs=config.epochs,
        validation_data=test,
        callbacks=[accountant],
        verbose=config.verbose,
    )
    seconds = time.perf_counter() - start
    # Tightness on the TEST data: on training data it would be a release
    # without noise.
    check = gradient_norm_check(model, test, max_batches=2)
    h = history.history
    rows = [
        {
            "epoch": i + 1,
            "epsilon": h["epsilon"][i],
            "test_accuracy": h["val_accuracy"][i],
        }
        for i in range(len(h["epsilon"]))
    ]
    report = {
        "noise_multiplier": sigma,
        "delta": config.delta,
        "accountant": config.accountant,
        "sampling": list(model.privacy_plan.samplings()),
        "seed": config.seed,
        "sampling_rate": meta.sampling_rate,
        "batch_size": meta.batch_size,
        "recipe": dataclasses.asdict(settings),
        "train_seconds": seconds,
        "epochs": rows,
        "final_epsilon": rows[-1]["epsilon"],
        "final_test_accuracy": rows[-1]["test_accuracy"],
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
    with open(os.path.join(output_dir, "report.json"), "w") as f:
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
    ax.set_title(f"Clipless DP on digits, sigma={report['noise_multiplier']:.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "report.png"), dpi=100)
    plt.close(fig)
