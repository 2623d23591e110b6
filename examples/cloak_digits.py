"""Train a Stained-Glass-style noise layer in front of a frozen digits classifier.

A small CNN is trained on the bundled scikit-learn digits and frozen; then a
`CloakNoiseLayer` is trained in front of it with each cloak loss factory. For
every setting the table shows the test accuracy through the transform, the
mean std of the noise, and what an attacker's post-processing still recovers
of the clean image (MS-SSIM and squared-Pearson totals of the attacker battery,
on the test set; lower is more private), also for an attacker who removes the
transform's learned mean first. A figure of clean / transformed test
digits is saved.

python examples/cloak_digits.py [--output-dir runs/cloak] [--epochs 8]
"""

import argparse
import os

import keras
import matplotlib
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from deel_lipdp_ext import cloak

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEAN, STD = 0.5, 0.5  # inputs are normalised as (x01 - 0.5) / 0.5


def load_digits_split():
    digits = load_digits()
    x01 = (digits.images / 16.0).astype("float32")[..., None]
    x = (x01 - MEAN) / STD
    return train_test_split(x, digits.target, test_size=0.25, random_state=0)


def train_classifier(x, y):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        keras.optimizers.Adam(3e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=15, batch_size=64, verbose=0)
    model.trainable = False
    return model


def privacy_scores(noisy_model, x, remove_mean=False):
    """Attacker-battery totals of the test set through the trained transform.

    ``remove_mean``: an attacker who knows (or estimates, by averaging many
    transformed inputs) the transform's learned mean subtracts it first.
    """
    layer = noisy_model.noise_layer
    noisy = layer(x)
    if remove_mean:
        noisy = noisy - layer.mean
    components = cloak.multi_attacker_privacy_loss(
        noisy * STD + MEAN, tf.constant(x) * STD + MEAN
    )
    ms = [v for k, v in components.items() if k.startswith("ms_ssim_")]
    pearson = [v for k, v in components.items() if k.startswith("pearson_sq_")]
    return float(tf.reduce_mean(ms)), float(tf.reduce_mean(pearson))


def run(classifier, factory, setting, data, epochs, value_range=None):
    x_train, x_test, y_train, y_test = data
    layer = cloak.CloakNoiseLayer(
        scale=(1e-3, 3.0), rhos_init=-3.0, value_range=value_range, seed=0
    )
    model = cloak.NoisyModel(classifier, layer)
    task = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if factory == "composite":
        loss_fn, get_components, _ = cloak.composite_cloak_loss_factory(
            model, task, alpha=setting
        )
    else:
        loss_fn, get_components, _ = cloak.image_similarity_cloak_loss_factory(
            model,
            task,
            ms_ssim_weight=setting,
            pearson_weight=setting,
            image_mean=[MEAN],
            image_std=[STD],
        )
    model.compile(keras.optimizers.Adam(0.05), loss=loss_fn, metrics=["accuracy"])
    history = model.fit(
        x_train,
        y_train,
        epochs=epochs,
        batch_size=64,
        verbose=0,
        callbacks=[cloak.LossComponentsLogger(get_components, prefix="train_")],
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    ms, pearson = privacy_scores(model, x_test)
    ms_known_mean, _ = privacy_scores(model, x_test, remove_mean=True)
    composite = history.history["train_composite_loss"]
    return {
        "factory": factory,
        "setting": setting,
        "accuracy": accuracy,
        "mean_std": float(tf.reduce_mean(layer.std)),
        "ms_ssim_total": ms,
        "pearson_total": pearson,
        "ms_ssim_known_mean": ms_known_mean,
        "first_loss": composite[0],
        "last_loss": composite[-1],
        "model": model,
    }


def save_figure(rows, x_test, path):
    fig, axes = plt.subplots(len(rows) + 1, 6, figsize=(7, 1.3 * (len(rows) + 1)))
    for j in range(6):
        axes[0, j].imshow(x_test[j, :, :, 0] * STD + MEAN, cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_ylabel("clean", rotation=0, ha="right", fontsize=7)
    for i, row in enumerate(rows, start=1):
        noisy = row["model"].noise_layer(x_test[:6]).numpy() * STD + MEAN
        for j in range(6):
            axes[i, j].imshow(noisy[j, :, :, 0], cmap="gray", vmin=0, vmax=1)
        label = f"{row['factory']}\n{row['setting']}"
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/cloak")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    keras.utils.set_random_seed(0)
    data = load_digits_split()
    x_train, x_test, y_train, y_test = data
    classifier = train_classifier(x_train, y_train)
    _, clean_accuracy = classifier.evaluate(x_test, y_test, verbose=0)
    print(f"frozen classifier, clean test accuracy: {clean_accuracy:.3f}")
    settings = [("composite", a) for a in (0.0, 0.2, 0.5, 0.8)]
    settings += [("image", w) for w in (0.5, 2.0)]
    rows = [run(classifier, f, s, data, args.epochs) for f, s in settings]
    # The same loss with the output clipped to the input range (-1, 1).
    rows.append(run(classifier, "image", 2.0, data, args.epochs, value_range=(-1, 1)))
    rows[-1]["factory"] = "image[-1,1]"
    header = (
        f"{'factory':>11} {'alpha/w':>7} {'acc':>6} {'mean std':>8} "
        f"{'ms-ssim':>7} {'pearson2':>8} {'ms-ssim|mean':>12} {'loss 1st':>8} "
        f"{'loss last':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['factory']:>11} {r['setting']:7.2f} {r['accuracy']:6.3f} "
            f"{r['mean_std']:8.4f} {r['ms_ssim_total']:7.3f} {r['pearson_total']:8.3f} "
            f"{r['ms_ssim_known_mean']:12.3f} "
            f"{r['first_loss']:8.4f} {r['last_loss']:9.4f}"
        )
    path = os.path.join(args.output_dir, "cloak_digits.png")
    save_figure(rows, x_test, path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
