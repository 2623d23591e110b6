"""Clipless DP training on two worker processes (MultiWorkerMirroredStrategy).

The launcher starts `--workers` copies of this script on this machine, each
with its TF_CONFIG (127.0.0.1, ports chosen free at run time), waits for
them, and prints one row per worker: steps, epsilon, test accuracy and a
hash of the final weights (identical on every worker, or it exits 1).
Each worker samples its own shard of the digits at the rate q = B / N
(`distribution.distributed_poisson_batches`): the union over the workers of
a step is a Poisson sample of the whole dataset, so the epsilon is the
single-device one.

python examples/multi_worker.py --workers 2 --output-dir runs/multi_worker

`--check noise` trains DP-SGD on batches whose sample weights are all 0 (the
data gradient is zero) with SGD(1.0): each step's update is the noise alone,
and each worker writes its std next to the planned sigma * C / B.
`--check refusals` has each worker call `fit` (outside the strategy's scope)
on data Keras would shard by batches (a tf.data dataset, arrays), which the
model must refuse, and writes the errors.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from deel_lipdp_ext.distribution import local_tf_configs


def launch(args) -> int:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = local_tf_configs(args.workers, chief=args.chief)
    processes = []
    for index in range(args.workers):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        if args.workers > 1:
            env["TF_CONFIG"] = configs[index]
        command = [sys.executable, __file__, "--worker-index", str(index)]
        command += ["--output-dir", str(out), "--check", args.check]
        command += ["--epochs", str(args.epochs)]
        processes.append(subprocess.Popen(command, env=env))
    deadline = time.monotonic() + args.timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            print("a worker did not finish in time", file=sys.stderr)
            return 1
    if any(codes):
        print(f"worker exit codes: {codes}", file=sys.stderr)
        return 1
    results = [
        json.loads((out / f"worker_{i}.json").read_text()) for i in range(args.workers)
    ]
    columns = [k for k in results[0] if k != "epsilons"]
    print("worker " + " ".join(columns))
    for i, result in enumerate(results):
        print(f"{i} " + " ".join(str(result[k]) for k in columns))
    same = all(
        r["weights_sha256"] == results[0]["weights_sha256"]
        and r["epsilons"] == results[0]["epsilons"]
        for r in results
    )
    print("identical_weights_and_epsilon", same)
    return 0 if same else 1


def weights_hash(model) -> str:
    """A hash of the model's weights and of its privacy ledger (the run's
    lineage, a per-process identity, left out)."""
    digest = hashlib.sha256()
    for v in model.variables:
        if not v.path.endswith("dp_lineage"):
            digest.update(v.path.encode() + v.numpy().tobytes())
    return digest.hexdigest()[:16]


def work(args) -> None:
    import tensorflow as tf

    # Created first, before any other TensorFlow op (it sets up the cluster).
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy()
        if "TF_CONFIG" in os.environ
        else tf.distribute.get_strategy()
    )
    import keras
    import numpy as np

    from deel_lipdp_ext import DPParameters, DPSequential, layers, losses
    from deel_lipdp_ext.callbacks import DP_Accountant
    from deel_lipdp_ext.data import (
        DatasetMetadata,
        bound_normalize,
        declare_sampling,
        digits_arrays,
        poisson_batches,
    )
    from deel_lipdp_ext.distribution import distributed_poisson_batches
    from deel_lipdp_ext.dpsgd import DPSGDModel

    keras.utils.set_random_seed(0)  # the same initial weights on every worker
    if args.check == "noise":
        sigma, clip, batch = 1.1, 0.7, 50
        meta = DatasetMetadata(
            (16,), 32, nb_samples_train=1000, nb_samples_test=0, batch_size=batch
        )
        with strategy.scope():
            inner = keras.Sequential(
                [keras.Input((16,)), keras.layers.Dense(64), keras.layers.Dense(32)]
            )
            model = DPSGDModel(
                inner, DPParameters(sigma, 1e-5), meta, l2_norm_clip=clip
            )
            model.compile(keras.optimizers.SGD(1.0), "mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 16)).astype(np.float32)
        y = rng.normal(size=(8, 32)).astype(np.float32)
        zero = np.zeros(8, np.float32)  # sample weights 0: no data gradient

        def zero_weight_batches(_):
            return tf.data.Dataset.from_tensors((x, y, zero)).repeat(10)

        data = (
            strategy.experimental_distribute_dataset(zero_weight_batches(None))
            if "TF_CONFIG" in os.environ
            else zero_weight_batches(None)
        )
        data = declare_sampling(data, meta)
        updates = []

        class Updates(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.before = [v.numpy() for v in model.trainable_variables]

            def on_train_batch_end(self, batch, logs=None):
                after = [v.numpy() for v in model.trainable_variables]
                updates.append(
                    np.concatenate(
                        [
                            (a - b).ravel()
                            for a, b in zip(after, self.before, strict=True)
                        ]
                    )
                )

        model.fit(data, epochs=1, steps_per_epoch=10, callbacks=[Updates()], verbose=0)
        noise = np.concatenate(updates)
        result = {
            "steps": int(model.dp_steps.numpy()),
            "draws": int(noise.size),
            "update_std": float(np.std(noise)),
            "planned_std": sigma * clip / batch,
            "lag1_correlation": float(np.corrcoef(updates[0], updates[1])[0, 1]),
            "weights_sha256": weights_hash(model),
            "epsilons": [model.privacy_plan.epsilon()],
        }
    else:
        x_tr, y_tr, x_te, y_te = digits_arrays(0.2, 0)
        bound = bound_normalize(1.0)
        x_tr, x_te = bound(x_tr.astype(np.float32)), bound(x_te.astype(np.float32))
        y_tr, y_te = np.eye(10, dtype=np.float32)[y_tr], np.eye(10)[y_te]
        meta = DatasetMetadata(
            (8, 8, 1),
            10,
            nb_samples_train=len(x_tr),
            nb_samples_test=len(x_te),
            batch_size=128,
        )
        with strategy.scope():
            model = DPSequential(
                [
                    keras.Input((8, 8, 1)),
                    layers.DP_BoundedInput(upper_bound=1.0),
                    layers.DP_Flatten(),
                    layers.DP_SpectralDense(64),
                    layers.DP_GroupSort(2),
                    layers.DP_QuickSpectralDense(10),
                ],
                dp_parameters=DPParameters(1.0, 1e-5),
                dataset_metadata=meta,
            )
            model.compile(
                keras.optimizers.Adam(0.01),
                losses.DP_TauCategoricalCrossentropy(8.0),
                metrics=["accuracy"],
            )
        train = (
            distributed_poisson_batches(strategy, x_tr, y_tr, 128)
            if "TF_CONFIG" in os.environ
            else poisson_batches(x_tr, y_tr, 128)
        )
        if args.check == "refusals":  # data Keras would shard by batches
            refused = []
            for data in (poisson_batches(x_tr, y_tr, 128), x_tr):
                try:
                    model.fit(
                        data,
                        y_tr if data is x_tr else None,
                        epochs=1,
                        batch_size=128 if data is x_tr else None,
                        verbose=0,
                    )
                    refused.append("trained")
                except ValueError as error:
                    refused.append(str(error)[:60])
            result = {
                "refused": refused,
                "steps": int(model.dp_steps.numpy()),
                "weights_sha256": weights_hash(model),
                "epsilons": [],
            }
            Path(args.output_dir, f"worker_{args.worker_index}.json").write_text(
                json.dumps(result)
            )
            return
        accountant = DP_Accountant()
        model.fit(train, epochs=args.epochs, callbacks=[accountant], verbose=0)
        # Every worker evaluates the whole test set by itself (no collective).
        predictions = np.argmax(np.asarray(model(x_te, training=False)), axis=1)
        result = {
            "steps": int(model.dp_steps.numpy()),
            "epsilon": round(accountant.history[-1]["epsilon"], 4),
            "test_accuracy": round(float(np.mean(predictions == y_te.argmax(1))), 4),
            "weights_sha256": weights_hash(model),
            "epsilons": [h["epsilon"] for h in accountant.history],
        }
    path = Path(args.output_dir) / f"worker_{args.worker_index}.json"
    path.write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-index", type=int, default=None)
    parser.add_argument("--output-dir", default="runs/multi_worker")
    parser.add_argument(
        "--check", choices=("train", "noise", "refusals"), default="train"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=500.0)
    parser.add_argument(
        "--chief", action="store_true", help="the first process is a 'chief' task"
    )
    args = parser.parse_args()
    if args.worker_index is None:
        return launch(args)
    work(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
