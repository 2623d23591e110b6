"""Accountant timings: one epsilon report, a 100-epoch curve, a calibration.

For RDP and PLD, our functions beside dp-accounting called directly on the
same event (the floor: our layer should cost nothing on top). Setting: the
reference run, q = 256/60000, sigma = 1.1, 235 steps per epoch, delta = 1e-5.
Each timing is the median of `--repeats` runs, side by side in one process.
Writes JSON.

    python benchmarks/accountant.py [--repeats 3] [--pld-curve-epochs 100]
        [--out benchmarks/results/accountant.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import dp_accounting  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from deel_lipdp_ext.accounting import (  # noqa: E402
    PrivacySpec,
    calibrate_noise_multiplier,
    epsilon_curve,
    epsilon_for_spec,
)

Q, SIGMA, STEPS_PER_EPOCH, DELTA, EPOCHS = 256 / 60000, 1.1, 235, 1e-5, 100


def direct_epsilon(accountant: str, epochs: int, sigma: float = SIGMA) -> float:
    acc = (
        rdp_privacy_accountant.RdpAccountant()
        if accountant == "rdp"
        else pld_privacy_accountant.PLDAccountant()
    )
    event = dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma))
    acc.compose(event, epochs * STEPS_PER_EPOCH)
    return acc.get_epsilon(DELTA)


def direct_curve(accountant: str, epochs: int) -> list[float]:
    return [direct_epsilon(accountant, e) for e in range(1, epochs + 1)]


def direct_calibration(accountant: str, target: float, tol: float = 1e-3) -> float:
    lo, hi = 0.3, 20.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if direct_epsilon(accountant, EPOCHS, mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def timed(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pld-curve-epochs", type=int, default=100)
    parser.add_argument("--out", default="benchmarks/results/accountant.json")
    args = parser.parse_args()

    per_epoch = PrivacySpec(Q, STEPS_PER_EPOCH, (SIGMA,), DELTA)
    full = PrivacySpec(Q, EPOCHS * STEPS_PER_EPOCH, (SIGMA,), DELTA)
    rows = []
    for acc in ("rdp", "pld"):
        target = direct_epsilon(acc, EPOCHS, 1.3)
        curve_epochs = EPOCHS if acc == "rdp" else args.pld_curve_epochs
        tasks = {
            f"one report ({EPOCHS} epochs)": (
                lambda acc=acc: epsilon_for_spec(full, acc),
                lambda acc=acc: direct_epsilon(acc, EPOCHS),
            ),
            f"curve ({curve_epochs} epochs)": (
                lambda acc=acc, n=curve_epochs: list(epsilon_curve(per_epoch, n, acc)),
                lambda acc=acc, n=curve_epochs: direct_curve(acc, n),
            ),
            "calibration (tol 1e-3)": (
                lambda acc=acc, t=target: calibrate_noise_multiplier(
                    t, DELTA, Q, EPOCHS * STEPS_PER_EPOCH, acc
                ),
                lambda acc=acc, t=target: direct_calibration(acc, t),
            ),
        }
        for task, (ours, direct) in tasks.items():
            repeats = args.repeats if acc == "rdp" or "curve" not in task else 1
            t_ours, v_ours = timed(ours, repeats)
            t_direct, v_direct = timed(direct, repeats)
            last = v_ours[-1] if isinstance(v_ours, list) else v_ours
            last_direct = v_direct[-1] if isinstance(v_direct, list) else v_direct
            rows.append(
                {
                    "accountant": acc,
                    "task": task,
                    "ours_s": t_ours,
                    "dp_accounting_s": t_direct,
                    "ratio": t_ours / t_direct,
                    "value": float(last),
                    "value_dp_accounting": float(last_direct),
                }
            )

    header = (
        f"{'acc':4} {'task':26} {'ours (s)':>9} {'dp-acc (s)':>10} "
        f"{'ratio':>6} {'value':>10} {'dp-acc value':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['accountant']:4} {r['task']:26} {r['ours_s']:9.4f} "
            f"{r['dp_accounting_s']:10.4f} {r['ratio']:6.2f} {r['value']:10.5f} "
            f"{r['value_dp_accounting']:12.5f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "setting": {
                    "q": Q,
                    "sigma": SIGMA,
                    "steps_per_epoch": STEPS_PER_EPOCH,
                    "delta": DELTA,
                    "epochs": EPOCHS,
                },
                "machine": platform.platform(),
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
