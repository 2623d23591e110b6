"""Clipless DP fit time per epoch vs non-private Keras fit of the same architecture.

Same data, batch size and layers; runs alternate in one process (A, B, A, B...)
and the table reports medians and their ratio. Writes JSON.

    python benchmarks/speed.py [--epochs 3] [--repeats 3]
        [--out benchmarks/results/speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from deel_lipdp_ext import DPParameters, DPSequential  # noqa: E402
from deel_lipdp_ext import layers as L  # noqa: E402
from deel_lipdp_ext.data import from_numpy  # noqa: E402
from deel_lipdp_ext.losses import DP_TauCategoricalCrossentropy  # noqa: E402


def architecture():
    return [
        L.DP_QuickSpectralConv2D(16, 3, padding="same"),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_QuickSpectralConv2D(32, 3, padding="same"),
        L.DP_GroupSort(2),
        L.DP_ScaledL2NormPooling2D(2),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(64),
        L.DP_GroupSort(2),
        L.DP_QuickSpectralDense(10),
    ]


def make_data(n, size, batch_size, sampling):
    rng = np.random.default_rng(0)
    x = rng.random((n, size, size, 1)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return from_numpy(x, y, batch_size=batch_size, sampling=sampling, num_classes=10)


def clipless_model(meta):
    model = DPSequential(
        [
            keras.Input(meta.input_shape),
            L.DP_BoundedInput(upper_bound=1.0),
            *architecture(),
        ],
        dp_parameters=DPParameters(1.0, 1e-5, seed=0),
        dataset_metadata=meta,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=DP_TauCategoricalCrossentropy(8.0),
        metrics=["accuracy"],
    )
    return model


def plain_model(meta):
    """The same layers as a plain keras.Sequential: no bounds, noise or projection."""
    model = keras.Sequential([keras.Input(meta.input_shape), *architecture()])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def time_epochs(model, ds, epochs):
    """Median (wall, process CPU) seconds per epoch after a warm-up epoch.

    CPU time is reported beside wall time because wall time on small shared
    machines can be throttled in coarse steps that hide the difference.
    """
    model.fit(ds, epochs=1, verbose=0)  # trace and warm up
    wall, cpu = [], []
    for _ in range(epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.fit(ds, epochs=1, verbose=0)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    rows = []
    for sampling in ("shuffle", "poisson"):
        ds, _, meta = make_data(args.n, args.size, args.batch_size, sampling)
        plain_ds = ds.map(lambda *t: t[:2]) if sampling == "poisson" else ds
        dp, plain = clipless_model(meta), plain_model(meta)
        times = {"dp": [], "plain": []}
        for _ in range(args.repeats):  # alternate, so drift hits both alike
            times["plain"].append(time_epochs(plain, plain_ds, args.epochs))
            times["dp"].append(time_epochs(dp, ds, args.epochs))
        row = {"sampling": sampling}
        for i, kind in enumerate(("wall", "cpu")):
            p_s = statistics.median(t[i] for t in times["plain"])
            d_s = statistics.median(t[i] for t in times["dp"])
            row.update(
                {
                    f"non_private_{kind}_s": p_s,
                    f"clipless_{kind}_s": d_s,
                    f"{kind}_ratio": d_s / p_s,
                }
            )
        rows.append(row)
    print(
        f"{'sampling':<9} {'clock':<5} {'non-private s/epoch':>19} "
        f"{'clipless s/epoch':>17} {'ratio':>7}"
    )
    for r in rows:
        for kind in ("wall", "cpu"):
            print(
                f"{r['sampling']:<9} {kind:<5} {r[f'non_private_{kind}_s']:>19.3f} "
                f"{r[f'clipless_{kind}_s']:>17.3f} {r[f'{kind}_ratio']:>7.3f}"
            )
    write_result(args.out, {"config": vars(args), "rows": rows})


def write_result(path: str, result: dict) -> None:
    """Writes ``result`` with a description of the machine as JSON."""
    result = {
        **result,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
        },
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
