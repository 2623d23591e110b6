"""Empirical privacy audit, side by side with the reported epsilon: for each
dataset, model, target epsilon (and the same pipeline without noise) and seed,
one training run with m canaries (deel_lipdp_ext.audit, the one-run audit of
Steinke, Nasr, Jagielski 2023) gives an epsilon lower bound at 95%
confidence; it must never exceed the reported epsilon.

    python benchmarks/audit.py                          # digits, clipless + DP-SGD
    python benchmarks/audit.py --datasets mnist         # ../shared/data/mnist.npz
    python benchmarks/audit.py --quick                  # smoke run (the test suite)

MNIST is read from a local .npz (`--mnist`); nothing is downloaded. Prints a
table and writes `benchmarks/results/audit.json` (every run with its scores,
and a summary: the largest lower-bound / reported ratio over the DP runs and
the strongest no-noise lower bound).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from accuracy import DEFAULT_MNIST  # noqa: E402
from speed import write_result  # noqa: E402

from deel_lipdp_ext.audit.canaries import Canaries, audit_scores  # noqa: E402
from deel_lipdp_ext.audit.report import summary, table  # noqa: E402
from deel_lipdp_ext.audit.run import AuditConfig, run_audit  # noqa: E402


def rescore(path: str) -> dict:
    """The statistics of every run again, from its stored canary scores and
    coins: the measurement is the scores; the statistics are deterministic."""
    with open(path) as f:
        result = json.load(f)
    for run in result["runs"]:
        config = run["config"]
        reported = run["result"]["epsilon_reported"]
        canaries = Canaries(
            np.zeros((len(run["scores"]), 1)),
            np.zeros(len(run["scores"]), np.int64),
            np.asarray(run["included"], dtype=bool),
            config["kind"],
        )
        audited = audit_scores(
            np.asarray(run["scores"]),
            canaries,
            config["num_guesses"],
            config["delta"],
            config["confidence"],
            math.inf if reported == "inf" else reported,
        )
        run["result"], run["holds"] = audited.to_dict(), audited.holds
    result["summary"] = summary(result["runs"])
    print(table(result["runs"]))
    print(result["summary"])
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits"])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["clipless", "dpsgd"],
        choices=["clipless", "dpsgd"],
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--guesses", type=int, default=40)
    parser.add_argument("--kind", choices=["noise", "mislabeled"], default="noise")
    parser.add_argument("--mnist", default=DEFAULT_MNIST)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, eps 3")
    parser.add_argument("--output", default="benchmarks/results/audit.json")
    parser.add_argument(
        "--rescore",
        default=None,
        help="recompute the statistics of an audit.json from its stored scores "
        "(no training) and rewrite it",
    )
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(args.rescore)
    if args.quick:
        args.epsilons, args.seeds = [3.0], [0]
    runs = []
    for dataset in args.datasets:
        data = args.mnist if dataset == "mnist" else dataset
        for model in args.models:
            for seed in args.seeds:
                for epsilon in [*args.epsilons, None]:
                    run = run_audit(
                        AuditConfig(
                            data=data,
                            model=model,
                            epsilon=epsilon,
                            epochs=1 if args.quick else None,
                            num_canaries=args.canaries,
                            num_guesses=args.guesses,
                            kind=args.kind,
                            seed=seed,
                        )
                    )
                    runs.append(run)
                    print(table(runs[-1:]).splitlines()[-1], f"seed {seed}", flush=True)
    print(table(runs))
    result = {"summary": summary(runs), "runs": runs}
    print(result["summary"])
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
