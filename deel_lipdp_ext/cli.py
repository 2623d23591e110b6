"""The `lipdp` command: `demo`, `train`, `evaluate`, `epsilon`, `calibrate`.

`epsilon`, `calibrate` and `--help` answer without importing TensorFlow; the
commands that train import it with its start-up log lines silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys


def _add_run_arguments(p: argparse.ArgumentParser, epochs_default) -> None:
    """Flags shared by `demo` and `train` (None: the recipe's value)."""
    p.add_argument("--epochs", type=int, default=epochs_default)
    p.add_argument("--target-epsilon", type=float, default=None, help="default 3")
    p.add_argument("--delta", type=float, default=None, help="default 1e-5")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="expected batch size of the Poisson batches (default: the recipe's)",
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam's initial learning rate (default: the recipe's)",
    )
    p.add_argument("--output-dir", default=None)
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the noise and the batches (reproducible, not secret); "
        "default: operating-system entropy",
    )
    p.add_argument("--accountant", choices=["rdp", "pld"], default=None)
    p.add_argument("--verbose", type=int, default=None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipdp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train the recommended DP recipe on the bundled digits"
    )
    _add_run_arguments(demo, 30)
    train = sub.add_parser(
        "train",
        help="train a preset on the digits or an .npz, checkpoint, resume",
        description="Train a preset (deel_lipdp_ext.models) with sigma calibrated "
        "for the target epsilon; writes model.keras after every epoch, run.json, "
        "report.json and report.png into the output directory.",
    )
    train.add_argument(
        "--data",
        default=None,
        help="'digits' (bundled, default) or an .npz path with x_train, y_train, "
        "x_test, y_test",
    )
    train.add_argument(
        "--preset",
        default=None,
        help="scattering_mlp (default), lipschitz_mlp, small_cnn or cifar_cnn",
    )
    train.add_argument(
        "--config",
        default=None,
        help="a TOML file of the same settings (underscores: target_epsilon = 3.0); "
        "flags override it",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --output-dir (epsilon of the whole run)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --output-dir that holds a run (its files are "
        "replaced)",
    )
    train.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="the number of classes of class-index labels (public; default: "
        "counted in the test labels, never in the training labels)",
    )
    _add_run_arguments(train, None)
    evaluate = sub.add_parser(
        "evaluate", help="test accuracy and epsilon of a saved DP model"
    )
    evaluate.add_argument("model", help="a .keras file written by lipdp train")
    evaluate.add_argument("--data", default="digits", help="'digits' or an .npz path")
    evaluate.add_argument("--accountant", choices=["rdp", "pld"], default="pld")
    audit = sub.add_parser(
        "audit",
        help="measure an epsilon lower bound with canaries, next to the reported one",
        description="Train with m canaries (each in the training set with "
        "probability 1/2), score them, and report the epsilon lower bound of the "
        "one-run audit (Steinke et al. 2023) next to the reported epsilon; "
        "writes audit.json and audit.png.",
    )
    audit.add_argument("--data", default="digits", help="'digits' or an .npz path")
    audit.add_argument(
        "--model",
        choices=["clipless", "dpsgd"],
        default="clipless",
        help="the recommended clipless recipe or DP-SGD on a tanh CNN",
    )
    audit.add_argument(
        "--epsilon",
        type=float,
        nargs="*",
        default=[3.0],
        help="target epsilons, one run each (default: 3)",
    )
    audit.add_argument(
        "--no-noise", action="store_true", help="add the run without noise"
    )
    audit.add_argument("--epochs", type=int, default=None)
    audit.add_argument("--canaries", type=int, default=200)
    audit.add_argument("--guesses", type=int, default=40)
    audit.add_argument("--kind", choices=["mislabeled", "noise"], default="noise")
    audit.add_argument("--delta", type=float, default=1e-5)
    audit.add_argument("--seed", type=int, default=None)
    audit.add_argument("--output-dir", default="runs/audit")
    for name in ("epsilon", "calibrate"):
        p = sub.add_parser(name, help=f"{name} for a Poisson-subsampled Gaussian run")
        if name == "epsilon":
            p.add_argument("--noise-multiplier", type=float, required=True)
        else:
            p.add_argument("--target-epsilon", type=float, required=True)
        p.add_argument("--sampling-rate", type=float, required=True)
        p.add_argument("--epochs", type=int, required=True)
        p.add_argument("--delta", type=float, default=1e-5)
        p.add_argument("--accountant", choices=["rdp", "pld"], default="rdp")
    return parser


_RUN_FIELDS = (
    "data",
    "preset",
    "epochs",
    "target_epsilon",
    "delta",
    "batch_size",
    "learning_rate",
    "accountant",
    "seed",
    "output_dir",
    "resume",
    "overwrite",
    "num_classes",
    "verbose",
)


def _train_settings(args: argparse.Namespace) -> dict:
    """TrainConfig keyword arguments: the TOML file, then the flags given."""
    settings = {}
    if args.config is not None:
        import tomllib

        with open(args.config, "rb") as f:
            settings = tomllib.load(f)
        unknown = sorted(set(settings) - set(_RUN_FIELDS))
        if unknown:
            raise SystemExit(
                f"lipdp train: unknown setting(s) {unknown} in {args.config}; "
                f"known: {list(_RUN_FIELDS)}"
            )
    for name in _RUN_FIELDS:
        value = getattr(args, name)
        if value is not None and value is not False:
            settings[name] = value
    if settings.get("resume"):
        ignored = sorted(set(settings) - {"resume", "output_dir", "verbose"})
        if ignored:
            raise SystemExit(
                f"lipdp train --resume continues the saved run with its own "
                f"settings; remove {ignored}"
            )
    return settings


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines
    (absl, oneDNN, CUDA stubs) ignore TF_CPP_MIN_LOG_LEVEL since TF 2.20."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _import_tensorflow_quietly() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules:
        with _quiet_stderr():
            import tensorflow  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("demo", "train", "evaluate", "audit"):
        _import_tensorflow_quietly()
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        given = {
            name: getattr(args, name)
            for name in _RUN_FIELDS
            if getattr(args, name, None) is not None
        }
        run_demo(DemoConfig(**given))
        return 0
    if args.command == "train":
        from .train import TrainConfig, run_train

        run_train(TrainConfig(**_train_settings(args)))
        return 0
    if args.command == "evaluate":
        from .train import evaluate_model

        result = evaluate_model(args.model, args.data, args.accountant)
        print(
            f"test_accuracy={result['test_accuracy']:.4f} "
            f"epsilon={result['epsilon']:.4f} delta={result['delta']} "
            f"steps={result['steps']} sampling={','.join(result['sampling'])} "
            f"accountant={args.accountant}"
        )
        return 0
    if args.command == "audit":
        return _audit(args)
    from .accounting import (
        PrivacySpec,
        calibrate_noise_multiplier,
        epsilon_for_spec,
        steps_per_epoch,
    )

    steps = args.epochs * steps_per_epoch(args.sampling_rate)
    if args.command == "epsilon":
        spec = PrivacySpec(
            args.sampling_rate, steps, (args.noise_multiplier,), args.delta
        )
        print(
            f"epsilon={epsilon_for_spec(spec, args.accountant):.6f} delta={args.delta} "
            f"steps={steps} accountant={args.accountant}"
        )
    else:
        sigma = calibrate_noise_multiplier(
            args.target_epsilon, args.delta, args.sampling_rate, steps, args.accountant
        )
        print(
            f"noise_multiplier={sigma:.6f} steps={steps} accountant={args.accountant}"
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    from .audit.report import table, write_report
    from .audit.run import AuditConfig, run_audit

    epsilons = list(args.epsilon) + ([None] if args.no_noise else [])
    if not epsilons:
        raise SystemExit("lipdp audit: give --epsilon values or --no-noise")
    runs = [
        run_audit(
            AuditConfig(
                data=args.data,
                model=args.model,
                epsilon=epsilon,
                epochs=args.epochs,
                num_canaries=args.canaries,
                num_guesses=args.guesses,
                kind=args.kind,
                delta=args.delta,
                seed=args.seed,
            )
        )
        for epsilon in epsilons
    ]
    print(table(runs))
    json_path, png_path = write_report(runs, args.output_dir)
    print(f"\nReport written to {json_path} and {png_path}")
    return 0 if all(run["holds"] for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
