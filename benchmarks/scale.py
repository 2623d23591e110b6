"""Samples per second under tf.distribute: 1, 2 and 4 replicas (logical CPU
devices of one process, MirroredStrategy) and 2 worker processes
(MultiWorkerMirroredStrategy over 127.0.0.1), clipless and DP-SGD.

On a machine with 2 CPU cores the logical devices and the workers share the
same cores: the point is correctness and overhead (what the replica rules
cost: an all-reduce per step, the first replica's noise, one scalar
all-reduce of the sensitivity), not speed-up. Ratios are to 1 replica in the
same run. MNIST-shaped random data (time only), Poisson batches
(`distribution.distributed_poisson_batches`), the networks of
benchmarks/speed.py: the Lipschitz CNN (clipless) and the tanh CNN (DP-SGD,
ghost clipping). Medians of `--epochs` timed epochs after one warm-up epoch.
Writes JSON.

    python benchmarks/scale.py [--n 8192] [--batch-size 256] [--epochs 3]
        [--out benchmarks/results/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS = ("clipless", "dpsgd_ghost")


def setup(workers: bool):
    """The TensorFlow set-up of this process: a multi-worker strategy when
    TF_CONFIG is set (before any other TensorFlow op), else 4 logical CPUs."""
    import tensorflow as tf

    if workers:
        return tf.distribute.MultiWorkerMirroredStrategy()
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 4,
    )
    return None


def time_model(kind: str, strategy, args) -> float:
    """Median seconds per epoch of `kind` under `strategy` (None: 1 device)."""
    import numpy as np
    import tensorflow as tf

    from deel_lipdp_ext.data import DatasetMetadata, poisson_batches
    from deel_lipdp_ext.distribution import distributed_poisson_batches

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import SHAPE, build  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.random((args.n, *SHAPE)).astype(np.float32)
    x /= np.linalg.norm(x.reshape(args.n, -1), axis=1)[:, None, None, None]
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, args.n)]
    meta = DatasetMetadata(
        SHAPE,
        10,
        nb_samples_train=args.n,
        nb_samples_test=0,
        batch_size=args.batch_size,
    )
    scope = (
        strategy.scope()
        if strategy is not None
        else tf.distribute.get_strategy().scope()
    )
    with scope:
        model = build(kind, meta)
    data = (
        poisson_batches(x, y, args.batch_size)
        if strategy is None
        else distributed_poisson_batches(strategy, x, y, args.batch_size)
    )
    model.fit(data, epochs=1, verbose=0)  # traces
    seconds = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        model.fit(data, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def in_process(args) -> list[dict]:
    import tensorflow as tf

    setup(workers=False)
    rows = []
    for replicas in (1, 2, 4):
        strategy = (
            None
            if replicas == 1
            else tf.distribute.MirroredStrategy(
                [f"/cpu:{i}" for i in range(replicas)],
                # collective ops of strategies with different device counts
                # clash within one process
                cross_device_ops=tf.distribute.ReductionToOneDevice(),
            )
        )
        for kind in args.models:
            seconds = time_model(kind, strategy, args)
            rows.append(
                {
                    "model": kind,
                    "setting": f"{replicas} replica(s)",
                    "seconds_per_epoch": seconds,
                }
            )
            print(f"{kind} {replicas} replica(s): {seconds:.2f} s", flush=True)
    return rows


def two_workers(args) -> list[dict]:
    from deel_lipdp_ext.distribution import local_tf_configs

    rows = []
    for kind in args.models:
        configs = local_tf_configs(2)
        outputs = [Path(args.out).with_suffix(f".worker{i}.json") for i in range(2)]
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(outputs[i]),
                    "--models",
                    kind,
                    "--n",
                    str(args.n),
                    "--batch-size",
                    str(args.batch_size),
                    "--epochs",
                    str(args.epochs),
                ],
                env={**os.environ, "TF_CONFIG": configs[i]},
            )
            for i in range(2)
        ]
        if any(p.wait(timeout=1800) for p in processes):
            raise RuntimeError(f"a worker failed ({kind})")
        seconds = max(json.loads(o.read_text())["seconds_per_epoch"] for o in outputs)
        for o in outputs:
            o.unlink()
        rows.append(
            {"model": kind, "setting": "2 workers", "seconds_per_epoch": seconds}
        )
        print(f"{kind} 2 workers: {seconds:.2f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:  # one process of the 2-worker run
        strategy = setup(workers=True)
        seconds = time_model(args.models[0], strategy, args)
        Path(args.worker).write_text(json.dumps({"seconds_per_epoch": seconds}))
        return
    rows = in_process(args) + two_workers(args)
    for row in rows:
        base = next(
            r
            for r in rows
            if r["model"] == row["model"] and r["setting"] == "1 replica(s)"
        )
        row["samples_per_s"] = args.n / row["seconds_per_epoch"]
        row["ratio_to_1"] = row["samples_per_s"] / base["samples_per_s"]
    print(f"{'model':<12} {'setting':<13} {'s/epoch':>8} {'samples/s':>10} {'x 1':>6}")
    for r in rows:
        print(
            f"{r['model']:<12} {r['setting']:<13} {r['seconds_per_epoch']:8.2f} "
            f"{r['samples_per_s']:10.0f} {r['ratio_to_1']:6.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "config": {
                    **{k: v for k, v in vars(args).items() if k != "worker"},
                    "cpu_count": os.cpu_count(),
                    "machine": platform.machine(),
                },
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
