"""What each ingredient of the clipless recipe adds: the recipe of
`benchmarks/accuracy.py` at one epsilon, then with one ingredient changed at a
time, each repeated with fresh initialisations, noise and batches.

    python benchmarks/ablation.py                         # digits, eps 3, 5 repeats
    python benchmarks/ablation.py --datasets mnist --repeats 1
    python benchmarks/ablation.py --quick                 # smoke run (the test suite)

Prints a table (mean, min and max test accuracy per variant) and writes
`benchmarks/results/ablation.json` (one row per run, with the variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from accuracy import (  # noqa: E402
    DEFAULT_MNIST,
    DELTA,
    SETTINGS,
    _fit,
    load,
)
from speed import write_result  # noqa: E402

from deel_lipdp_ext.models import recipe  # noqa: E402


def settings_size(dataset: str) -> int:
    """Training samples, for `recipe` (digits: 1437, MNIST: 60000)."""
    return 1437 if dataset == "digits" else 60000


#: variant -> (recipe changes, preset argument changes, constant learning rate,
#: accountant).
VARIANTS = {
    "recipe": ({}, {}, False, "pld"),
    "global noise (one sensitivity)": (
        {"noisify_strategy": "global"},
        {},
        False,
        "pld",
    ),
    "no loss-gradient clipping": ({}, {"loss_gradient_clip": None}, False, "pld"),
    "constant learning rate": ({}, {}, True, "pld"),
    "RDP accountant (calibration)": ({"accountant": "rdp"}, {}, False, "rdp"),
    "no group normalisation of the features": ({"groups": 0}, {}, False, "pld"),
    "raw images (small_cnn recipe)": ({"preset": "small_cnn"}, {}, False, "pld"),
    "small_cnn, augmentation multiplicity 4 (shifts)": (
        {"preset": "small_cnn"},
        {"augmentation": "shift"},
        False,
        "pld",
    ),
}


def _augmentation(input_shape) -> keras.layers.Layer:
    """Random shifts of about one pixel in 8 (digits) or two in 28 (MNIST)."""
    factor = 1.0 / input_shape[0] if input_shape[0] < 16 else 2.0 / input_shape[0]
    return keras.layers.RandomTranslation(factor, factor, fill_mode="constant")


def run_variant(
    dataset: str, variant: str, target: float, mnist: str, epochs: int | None = None
) -> dict:
    recipe_changes, preset_changes, constant_lr, accountant = VARIANTS[variant]
    recipe_changes = dict(recipe_changes)
    settings = SETTINGS[dataset].clipless
    if "preset" in recipe_changes:  # another preset: its own recipe
        settings = recipe(recipe_changes.pop("preset"), settings_size(dataset))
    if "groups" in recipe_changes:
        features = {**settings.features, "groups": recipe_changes.pop("groups")}
        recipe_changes["features"] = features
    settings = dataclasses.replace(settings, **recipe_changes)
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    train, test, meta = load(
        dataset, settings.batch_size, mnist, False, False, settings.features
    )
    preset_changes = dict(preset_changes)
    if preset_changes.pop("augmentation", None):
        preset_changes["augmentation"] = _augmentation(meta.input_shape)
        preset_changes["augmentation_multiplicity"] = 4
    model = settings.build(meta, settings.dp_parameters(DELTA), **preset_changes)
    sigma = model.privacy_plan.calibrate_noise_multiplier(
        target, settings.epochs, accountant, tolerance=1e-3
    )
    model.set_noise_multiplier(sigma)
    compile_arguments = settings.compile_arguments(meta)
    if constant_lr:
        compile_arguments["optimizer"] = keras.optimizers.Adam(settings.learning_rate)
    model.compile(**compile_arguments)
    accuracy, epsilon, seconds = _fit(model, train, test, settings.epochs, True)
    return {
        "dataset": dataset,
        "variant": variant,
        "target_epsilon": target,
        "epsilon": epsilon,
        "accountant": accountant,
        "noise_multiplier": sigma,
        "test_accuracy": accuracy,
        "epochs": settings.epochs,
        "seconds_per_epoch": seconds,
    }


def table(rows) -> str:
    lines = [
        f"{'dataset':<8} {'variant':<38} {'runs':>4} {'mean':>7} {'min':>7} {'max':>7}"
    ]
    keys = dict.fromkeys((r["dataset"], r["variant"]) for r in rows)
    for dataset, variant in keys:
        acc = [
            r["test_accuracy"]
            for r in rows
            if r["dataset"] == dataset and r["variant"] == variant
        ]
        lines.append(
            f"{dataset:<8} {variant:<38} {len(acc):>4} {np.mean(acc):>7.4f} "
            f"{np.min(acc):>7.4f} {np.max(acc):>7.4f}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["digits"], choices=sorted(SETTINGS)
    )
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
    )
    parser.add_argument("--mnist", default=DEFAULT_MNIST)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="digits, two variants, one run of one epoch each: a smoke test",
    )
    parser.add_argument("--output", default="benchmarks/results/ablation.json")
    args = parser.parse_args(argv)
    epochs = None
    if args.quick:
        args.datasets, args.repeats, epochs = ["digits"], 1, 1
        args.variants = ["recipe", "small_cnn, augmentation multiplicity 4 (shifts)"]
    rows = []
    for dataset in args.datasets:
        for variant in args.variants:
            for repeat in range(args.repeats):
                keras.utils.set_random_seed(repeat)  # initialisation only
                row = run_variant(dataset, variant, args.epsilon, args.mnist, epochs)
                rows.append({**row, "repeat": repeat})
                print(
                    f"{dataset} {variant} #{repeat}: {row['test_accuracy']:.4f} "
                    f"(epsilon {row['epsilon']:.3f})",
                    flush=True,
                )
    print(table(rows))
    write_result(args.output, {"delta": DELTA, "quick": args.quick, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
