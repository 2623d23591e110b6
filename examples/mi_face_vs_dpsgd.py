"""MI-FACE model inversion against a softmax model: non-private, DP-SGD, clipless.

The flow of AIJack's "MI-FACE vs DPSGD" tutorial on the bundled scikit-learn
digits: the same softmax model (one dense layer on the flattened 8x8 image)
is trained non-privately, with classical DP-SGD (per-example clipping) and
with the clipless library, the two private runs at the same epsilon (same
noise multiplier, sampling rate and steps). MI-FACE then reconstructs one
image per class from each model; the table prints epsilon, test accuracy and
how much each reconstruction resembles its class mean (Pearson correlation,
averaged over the 10 classes), and a grid of the reconstructions is saved.

python examples/mi_face_vs_dpsgd.py [--output-dir runs/mi_face]
"""

import argparse
import os

import keras
import matplotlib
import numpy as np
import tensorflow as tf

from deel_lipdp_ext import DPParameters, DPSequential, callbacks, layers, losses
from deel_lipdp_ext.attacks import MI_FACE
from deel_lipdp_ext.data import load_digits_dataset
from deel_lipdp_ext.dpsgd import DPSGDModel

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EPOCHS, BATCH, SIGMA, DELTA, CLIP = 30, 128, 2.0, 1e-5, 1.0


def arrays(dataset):
    xs, ys = [], []
    for batch in dataset:
        x, y = batch[0].numpy(), batch[1].numpy()
        keep = batch[2].numpy() > 0 if len(batch) == 3 else np.ones(len(x), bool)
        xs.append(x[keep])
        ys.append(y[keep])
    return np.concatenate(xs), np.concatenate(ys)


def softmax_net(input_shape, classes):
    return keras.Sequential(
        [keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(classes)]
    )


def train_models(train, test, meta):
    x_test, y_test = arrays(test)
    cce = keras.losses.CategoricalCrossentropy(from_logits=True)
    results = {}

    plain = softmax_net(meta.input_shape, meta.num_classes)
    plain.compile(keras.optimizers.SGD(0.5), cce, metrics=["accuracy"])
    x_train, y_train = arrays(train)
    plain.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    results["non-private"] = (plain, None)

    dpsgd = DPSGDModel(
        softmax_net(meta.input_shape, meta.num_classes),
        DPParameters(SIGMA, DELTA, seed=0),
        meta,
        l2_norm_clip=CLIP,
    )
    dpsgd.compile(keras.optimizers.SGD(2.0), cce, metrics=["accuracy"])
    history = dpsgd.fit(
        train, epochs=EPOCHS, verbose=0, callbacks=[callbacks.DP_Accountant()]
    )
    results["DP-SGD"] = (dpsgd, history.history["epsilon"][-1])

    clipless = DPSequential(
        [
            keras.Input(meta.input_shape),
            layers.DP_BoundedInput(upper_bound=1.0),
            layers.DP_Flatten(),
            layers.DP_QuickSpectralDense(meta.num_classes),
        ],
        dp_parameters=DPParameters(noise_multiplier=SIGMA, delta=DELTA, seed=0),
        dataset_metadata=meta,
    )
    clipless.compile(
        keras.optimizers.SGD(0.5, momentum=0.9),
        losses.DP_TauCategoricalCrossentropy(tau=16.0),
        metrics=["accuracy"],
    )
    history = clipless.fit(
        train, epochs=EPOCHS, verbose=0, callbacks=[callbacks.DP_Accountant()]
    )
    results["clipless"] = (clipless, history.history["epsilon"][-1])

    table = {}
    for name, (model, epsilon) in results.items():
        accuracy = float(
            np.mean(
                np.argmax(model.predict(x_test, verbose=0), 1) == np.argmax(y_test, 1)
            )
        )
        table[name] = {"model": model, "epsilon": epsilon, "accuracy": accuracy}
    return table, x_train, y_train


def invert(model, input_shape, label):
    """MI-FACE on the unit ball (the models' input domain)."""

    def project(x):
        norm = tf.norm(x)
        return x * tf.minimum(1.0, 1.0 / tf.maximum(norm, 1e-12))

    attack = MI_FACE(
        model,
        input_shape=(1, *input_shape),
        target_label=label,
        lam=0.1,
        num_itr=300,
        apply_softmax=True,
        process_func=project,
        log_interval=0,
    )
    image, log = attack.attack()
    return image[0], log


def correlation(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/mi_face")
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    train, test, meta = load_digits_dataset(batch_size=BATCH, input_bound=1.0)
    table, x_train, y_train = train_models(train, test, meta)
    labels = np.argmax(y_train, 1)
    class_means = [x_train[labels == c].mean(axis=0) for c in range(meta.num_classes)]

    fig, axes = plt.subplots(4, meta.num_classes, figsize=(10, 4.4))
    for c in range(meta.num_classes):
        axes[0, c].imshow(class_means[c][..., 0], cmap="gray")
    axes[0, 0].set_ylabel("class mean", fontsize=7)
    print(
        f"{'model':>12} {'epsilon':>8} {'test acc':>8} {'MI-FACE r':>9} "
        f"{'final cost':>10}"
    )
    for row, (name, entry) in enumerate(table.items(), start=1):
        scores, costs = [], []
        for c in range(meta.num_classes):
            image, log = invert(entry["model"], meta.input_shape, c)
            scores.append(correlation(image, class_means[c]))
            costs.append(log[-1])
            axes[row, c].imshow(image[..., 0], cmap="gray")
        axes[row, 0].set_ylabel(name, fontsize=7)
        epsilon = "inf" if entry["epsilon"] is None else f"{entry['epsilon']:.3f}"
        print(
            f"{name:>12} {epsilon:>8} {entry['accuracy']:8.3f} "
            f"{np.mean(scores):9.3f} {np.mean(costs):10.4f}"
        )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = os.path.join(args.output_dir, "mi_face_vs_dpsgd.png")
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
