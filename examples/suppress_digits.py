"""Suppress privacy on the bundled digits: drive the first dense layer to 90% sparsity.

A small CNN is trained with `SuppressModel` (plain SGD) and a `SuppressMasker`
callback; the controller raises the sparsity of `fc1/kernel` from 0 to 0.9 on
MindArmour's cubic schedule. The table shows, per epoch, the training loss,
the test accuracy, the scheduled (theoretical) sparsity and the actual
fraction of zero weights; a plot of both curves is saved.

python examples/suppress_digits.py [--output-dir runs/suppress]
"""

import argparse
import os

import keras
import matplotlib
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deel_lipdp_ext.suppress import (
    MaskLayerDes,
    SuppressMasker,
    SuppressModel,
    SuppressPrivacyFactory,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EPOCHS, BATCH, LR = 12, 32, 0.05


def build_network():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="fc2"),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/suppress")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0
    )
    batch_num = -(-len(x_train) // BATCH)

    network = build_network()
    fc1 = [v.path for v in network.trainable_variables].index("sequential/fc1/kernel")
    ctrl = SuppressPrivacyFactory.create(
        network,
        [MaskLayerDes("fc1/kernel", fc1, False, True, -1)],
        policy="local_train",
        end_epoch=EPOCHS - 2,  # reach the target, then train 2 epochs at it
        batch_num=batch_num,
        start_epoch=2,
        mask_times=(EPOCHS - 3) * batch_num // 12,  # one update every 12 steps
        lr=LR,
        sparse_end=0.90,
        sparse_start=0.0,
    )
    model = SuppressModel(
        network,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        keras.optimizers.SGD(LR),
        metrics=["accuracy"],
    )
    model.link_suppress_ctrl(ctrl)
    history = model.fit(
        x_train,
        y_train,
        epochs=EPOCHS,
        batch_size=BATCH,
        validation_data=(x_test, y_test),
        verbose=0,
        callbacks=[SuppressMasker(model, ctrl)],
    )
    logs = history.history
    print(f"{'epoch':>5} {'loss':>7} {'test acc':>8} {'theoretical':>11} {'actual':>7}")
    for e in range(EPOCHS):
        print(
            f"{e + 1:5d} {logs['loss'][e]:7.4f} {logs['val_accuracy'][e]:8.3f} "
            f"{logs['suppress_sparsity'][e]:11.4f} "
            f"{logs['actual_sparsity_fc1_kernel'][e]:7.4f}"
        )
    combined, conv1, _ = ctrl.calc_actual_sparse_for_conv(network)
    print(f"conv1 actual sparsity (not masked): {conv1:.4f}")

    keras.utils.set_random_seed(0)
    baseline = build_network()
    baseline.compile(
        keras.optimizers.SGD(LR),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    baseline.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH, verbose=0)
    _, baseline_accuracy = baseline.evaluate(x_test, y_test, verbose=0)
    print(f"same network without suppression: test acc {baseline_accuracy:.3f}")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(1, EPOCHS + 1)
    ax.plot(epochs, logs["suppress_sparsity"], "o-", label="theoretical (schedule)")
    ax.plot(epochs, logs["actual_sparsity_fc1_kernel"], "s--", label="actual fc1")
    ax.plot(epochs, logs["val_accuracy"], "^-", label="test accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.output_dir, "suppress_digits.png")
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
