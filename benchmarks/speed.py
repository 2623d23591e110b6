"""Seconds per epoch and peak memory: non-private Keras, clipless DP, DP-SGD
(vectorised and ghost clipping), side by side.

Two networks on MNIST-shaped data (28x28x1, 10 classes, random values: time
and memory only):
* the standard DP-SGD tanh CNN (`dpsgd.tanh_cnn`, ~26k parameters), trained
  by plain Keras and by `DPSGDModel(clipping="vectorized" | "ghost")`;
* a Lipschitz network (`architecture()`), trained by plain Keras (the same
  layers in a `keras.Sequential`), by `DPSequential` (clipless) and by
  `DPSGDModel` (per-example clipping, vectorised: ghost clipping does not
  cover the DP layers), so clipless and DP-SGD compare on one network.
Ratios are to plain Keras on the same network and the same batches. For each
batch size B and sampling (Poisson: `data.poisson_batches`, variable size;
shuffle: fixed B), the models' epochs alternate in one process (A, B, C, A,
B, C...) and the table reports medians of wall and process CPU time. A
ratio is the median over repeats of the model's time over its baseline's in
the same repeat (paired: drift between repeats cancels), with its range. The
peak memory of one epoch is TensorFlow's CPU allocator peak above what was
allocated before it (after warm-up). Writes JSON.

    python benchmarks/speed.py [--n 16384] [--batch-sizes 256 1024 4096]
        [--epochs 2] [--repeats 5] [--out benchmarks/results/speed.json]
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
from deel_lipdp_ext.dpsgd import DPSGDModel, tanh_cnn  # noqa: E402
from deel_lipdp_ext.losses import DP_TauCategoricalCrossentropy  # noqa: E402

SHAPE = (28, 28, 1)
#: model -> the non-private model its ratios are taken against.
BASELINE = {
    "keras_cnn": "keras_cnn",
    "dpsgd_vectorized": "keras_cnn",
    "dpsgd_ghost": "keras_cnn",
    "keras_lipschitz": "keras_lipschitz",
    "clipless": "keras_lipschitz",
    "dpsgd_lipschitz": "keras_lipschitz",
}
MODELS = tuple(BASELINE)


def architecture():
    """The Lipschitz network (its layers, after DP_BoundedInput)."""
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


def make_data(n: int, batch_size: int, sampling: str):
    rng = np.random.default_rng(0)
    x = rng.random((n, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, n)
    train, _, meta = from_numpy(
        x, y, batch_size=batch_size, sampling=sampling, num_classes=10, seed=0
    )
    return train, meta


def _plain(model: keras.Model) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model


def build(kind: str, meta) -> keras.Model:
    """A compiled model of `kind` (one of MODELS) for data `meta`."""
    if kind == "keras_cnn":
        return _plain(tanh_cnn(SHAPE, 10))
    if kind == "keras_lipschitz":
        return _plain(keras.Sequential([keras.Input(SHAPE), *architecture()]))
    dp = DPParameters(1.0, 1e-5, seed=0)
    if kind == "clipless":
        model = DPSequential(
            [keras.Input(SHAPE), L.DP_BoundedInput(upper_bound=1.0), *architecture()],
            dp_parameters=dp,
            dataset_metadata=meta,
        )
        loss = DP_TauCategoricalCrossentropy(8.0)
    elif kind == "dpsgd_lipschitz":
        model = DPSGDModel(
            keras.Sequential([keras.Input(SHAPE), *architecture()]),
            dp,
            meta,
            l2_norm_clip=1.0,
            clipping="vectorized",
        )
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    else:
        model = DPSGDModel(
            tanh_cnn(SHAPE, 10),
            dp,
            meta,
            l2_norm_clip=1.0,
            clipping=kind.removeprefix("dpsgd_"),
        )
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss)
    return model


def time_epochs(model, ds, epochs: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per epoch; the first fit (traces)
    is not timed."""
    if not getattr(model, "_warm", False):
        model.fit(ds, epochs=1, verbose=0)
        model._warm = True
    wall, cpu = [], []
    for _ in range(epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.fit(ds, epochs=1, verbose=0)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def peak_memory_mib(model, ds) -> float:
    """Peak TensorFlow CPU memory of one epoch above what was allocated
    before it (MiB; the allocator's own statistics), after warm-up."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    model.fit(ds, epochs=1, verbose=0)
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    return (peak - before) / 2**20


def measure(args) -> list[dict]:
    rows = []
    for batch_size in args.batch_sizes:
        for sampling in args.samplings:
            train, meta = make_data(args.n, batch_size, sampling)
            models = {kind: build(kind, meta) for kind in args.models}
            times = {kind: [] for kind in args.models}
            for _ in range(args.repeats):  # alternate: drift hits all alike
                for kind, model in models.items():
                    times[kind].append(time_epochs(model, train, args.epochs))
            for kind in args.models:
                row = {"model": kind, "batch_size": batch_size, "sampling": sampling}
                for i, clock in enumerate(("wall", "cpu")):
                    row[f"{clock}_s"] = statistics.median(t[i] for t in times[kind])
                    # paired: each repeat's time over its baseline's in the
                    # same repeat (neighbouring epochs), then their median
                    paired = [
                        t[i] / b[i]
                        for t, b in zip(times[kind], times[BASELINE[kind]], strict=True)
                    ]
                    row[f"{clock}_ratio"] = statistics.median(paired)
                    row[f"{clock}_ratio_range"] = [min(paired), max(paired)]
                row["peak_mib"] = peak_memory_mib(models[kind], train)
                rows.append(row)
            print(f"B={batch_size} {sampling}: done", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'model':<17} {'B':>5} {'sampling':<8} {'wall s':>8} {'cpu s':>8} "
        f"{'wall x (range)':>17} {'cpu x (range)':>17} {'peak MiB':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<17} {r['batch_size']:>5} {r['sampling']:<8} "
            f"{r['wall_s']:8.3f} {r['cpu_s']:8.3f} {_ratio(r, 'wall'):>17} "
            f"{_ratio(r, 'cpu'):>17} {r['peak_mib']:9.1f}"
        )


def _ratio(row: dict, clock: str) -> str:
    low, high = row[f"{clock}_ratio_range"]
    return f"{row[f'{clock}_ratio']:.2f} ({low:.2f}-{high:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--samplings", nargs="+", default=["poisson", "shuffle"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/speed.json")
    args = parser.parse_args()
    needed = {BASELINE[m] for m in args.models} - set(args.models)
    if needed:
        parser.error(f"--models needs the baselines {sorted(needed)} too")
    rows = measure(args)
    print_table(rows)
    write_result(
        args.out,
        {
            "config": vars(args),
            "device": tf.config.list_logical_devices()[-1].device_type,
            "rows": rows,
        },
    )


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
