"""The `lipdp` command: `lipdp demo`, `lipdp epsilon`, `lipdp calibrate`."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipdp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a DP Lipschitz CNN on the bundled digits")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--target-epsilon", type=float, default=3.0)
    demo.add_argument("--delta", type=float, default=1e-5)
    demo.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="expected batch size (default: the recipe's, 512)",
    )
    demo.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="Adam's initial learning rate (default: the recipe's)",
    )
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the noise and the batches (reproducible, not secret); "
        "default: operating-system entropy",
    )
    demo.add_argument("--accountant", choices=["rdp", "pld"], default="pld")
    demo.add_argument("--verbose", type=int, default=1)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        run_demo(
            DemoConfig(
                epochs=args.epochs,
                target_epsilon=args.target_epsilon,
                delta=args.delta,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                output_dir=args.output_dir,
                seed=args.seed,
                accountant=args.accountant,
                verbose=args.verbose,
            )
        )
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
