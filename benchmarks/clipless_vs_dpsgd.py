"""Clipless DP training vs classical DP-SGD (per-example clipping), side by side.

The same Lipschitz architecture (that of examples/digits_clipless.py; DP-SGD
trains the same layers as a plain Sequential), the same Poisson
batches of the bundled digits, the same noise multiplier, sampling rate and
number of steps, hence the same epsilon. Epochs alternate between the two
models in one process; the table reports the median seconds per epoch (wall
and process CPU), the peak memory of one training epoch (each measured in a
fresh subprocess: peak RSS during the epoch minus RSS before it), test
accuracy and epsilon. Writes JSON.

    python benchmarks/clipless_vs_dpsgd.py [--epochs 10] [--batch-size 256]
        [--config digits|deep] [--out benchmarks/results/clipless_vs_dpsgd.json]

``--config deep`` times the deeper network of benchmarks/speed.py on 28x28
random images (accuracy there is chance: labels are random).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from speed import architecture as deep_architecture  # noqa: E402
from speed import write_result  # noqa: E402

from deel_lipdp_ext import DPParameters, DPSequential  # noqa: E402
from deel_lipdp_ext import layers as L  # noqa: E402
from deel_lipdp_ext.data import from_numpy, load_digits_dataset  # noqa: E402
from deel_lipdp_ext.dpsgd import DPSGDModel  # noqa: E402
from deel_lipdp_ext.losses import DP_TauCategoricalCrossentropy  # noqa: E402

SIGMA, DELTA, CLIP = 2.0, 1e-5, 1.0


def small_architecture():
    """The Lipschitz network of examples/digits_clipless.py."""
    return [
        L.DP_SpectralConv2D(8, 2, strides=2, padding="valid"),
        L.DP_GroupSort(2),
        L.DP_Flatten(),
        L.DP_QuickSpectralDense(10),
    ]


ARCHITECTURES = {"digits": small_architecture, "deep": deep_architecture}


def load(config: str, batch_size: int):
    """``digits``: the bundled digits; ``deep``: 4096 random 28x28 images (time and
    memory only: their labels are random)."""
    if config == "digits":
        return load_digits_dataset(batch_size=batch_size, input_bound=1.0)
    rng = np.random.default_rng(0)
    x = rng.random((4096, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 4096)
    return from_numpy(
        x[:3584], y[:3584], x[3584:], y[3584:], batch_size=batch_size, num_classes=10
    )


def dpsgd_model(meta, architecture):
    """The same layers as a plain Sequential, trained with per-example clipping."""
    net = keras.Sequential([keras.Input(meta.input_shape), *architecture()])
    model = DPSGDModel(net, DPParameters(SIGMA, DELTA, seed=0), meta, l2_norm_clip=CLIP)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def build(kind: str, meta, config: str):
    architecture = ARCHITECTURES[config]
    if kind == "dpsgd":
        return dpsgd_model(meta, architecture)
    model = DPSequential(
        [
            keras.Input(meta.input_shape),
            L.DP_BoundedInput(upper_bound=1.0),
            *architecture(),
        ],
        dp_parameters=DPParameters(SIGMA, DELTA, seed=0),
        dataset_metadata=meta,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.3, momentum=0.9),
        loss=DP_TauCategoricalCrossentropy(16.0),
        metrics=["accuracy"],
    )
    return model


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory(kind: str, batch_size: int, config: str) -> None:
    """Subprocess mode: peak RSS growth (MiB) of one epoch after a warm-up epoch."""
    train, _, meta = load(config, batch_size)
    model = build(kind, meta, config)
    model.fit(train, epochs=1, verbose=0)  # trace, build the optimizer
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = rss_kib("VmRSS")
    model.fit(train, epochs=1, verbose=0)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - before) / 1024}))


def memory_in_subprocess(kind: str, batch_size: int, config: str) -> float:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory",
            kind,
            "--batch-size",
            str(batch_size),
            "--config",
            config,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--config", choices=tuple(ARCHITECTURES), default="digits")
    parser.add_argument("--memory", choices=("clipless", "dpsgd"))
    parser.add_argument("--out", default="benchmarks/results/clipless_vs_dpsgd.json")
    args = parser.parse_args()
    if args.memory:
        measure_memory(args.memory, args.batch_size, args.config)
        return
    keras.utils.set_random_seed(0)
    train, test, meta = load(args.config, args.batch_size)
    models = {kind: build(kind, meta, args.config) for kind in ("clipless", "dpsgd")}
    times = {kind: [] for kind in models}
    for epoch in range(args.epochs + 1):  # epoch 0 traces: not timed
        for kind, model in models.items():  # alternate, so drift hits both alike
            start, start_cpu = time.perf_counter(), time.process_time()
            model.fit(train, epochs=1, verbose=0)
            if epoch:
                times[kind].append(
                    (time.perf_counter() - start, time.process_time() - start_cpu)
                )
    rows = {}
    for kind, model in models.items():
        _, accuracy = model.evaluate(test, verbose=0)
        epsilon = model.privacy_plan.epsilon("rdp")
        rows[kind] = {
            "wall_s": statistics.median(t[0] for t in times[kind]),
            "cpu_s": statistics.median(t[1] for t in times[kind]),
            "peak_mib": memory_in_subprocess(kind, args.batch_size, args.config),
            "test_accuracy": float(accuracy),
            "epsilon": float(epsilon),
            "steps": int(model.dp_steps.numpy()),
        }
    c, d = rows["clipless"], rows["dpsgd"]
    ratios = {
        "dpsgd_over_clipless_wall": d["wall_s"] / c["wall_s"],
        "dpsgd_over_clipless_cpu": d["cpu_s"] / c["cpu_s"],
        "clipless_over_dpsgd_memory": c["peak_mib"] / max(d["peak_mib"], 1e-9),
    }
    print(
        f"{'model':<9} {'wall s/epoch':>12} {'cpu s/epoch':>11} {'peak MiB':>9} "
        f"{'test acc':>8} {'epsilon':>8}"
    )
    for kind, r in rows.items():
        print(
            f"{kind:<9} {r['wall_s']:12.3f} {r['cpu_s']:11.3f} {r['peak_mib']:9.1f} "
            f"{r['test_accuracy']:8.3f} {r['epsilon']:8.4f}"
        )
    print(
        f"DP-SGD / clipless time: {ratios['dpsgd_over_clipless_wall']:.2f}x wall, "
        f"{ratios['dpsgd_over_clipless_cpu']:.2f}x CPU; clipless / DP-SGD peak "
        f"memory: {ratios['clipless_over_dpsgd_memory']:.3f}"
    )
    config = {**vars(args), "sigma": SIGMA, "delta": DELTA, "l2_norm_clip": CLIP}
    write_result(args.out, {"config": config, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
