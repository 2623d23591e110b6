"""MAD competition between MSE and 1 - SSIM on scikit-image's `camera` (64x64).

Four syntheses from the same noisy start: minimise and maximise each metric
while holding the other at its initial value (plenoptic's MAD competition,
ported to TensorFlow). The table prints each metric at the start and at the
end of every run; the four images and the loss curves are saved.

python examples/mad_competition.py [--output-dir runs/mad] [--iterations 300]
"""

import argparse
import os
import warnings

import keras
import matplotlib
import tensorflow as tf
from skimage import data

from deel_lipdp_ext.imaging import metrics
from deel_lipdp_ext.synthesis import MADCompetition, mad_imshow_all, mad_loss_all

matplotlib.use("Agg")


def mse(x, y):
    return tf.reduce_mean(metrics.mse(x, y))


def dssim(x, y):
    return 1 - tf.reduce_mean(metrics.ssim(x, y))


def camera(size: int = 64) -> tf.Tensor:
    """The bundled 512x512 camera image, block-averaged to ``size``, in [0, 1]."""
    image = data.camera().astype("float32") / 255.0
    block = image.shape[0] // size
    small = image.reshape(size, block, size, block).mean(axis=(1, 3))
    return tf.constant(small[None, :, :, None])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/mad")
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    image = camera()
    runs = {}
    print(
        f"{'run':>14} {'iters':>5} {'mse start':>9} {'mse end':>9} "
        f"{'1-ssim start':>12} {'1-ssim end':>10}"
    )
    for optimized, reference, lam in ((mse, dssim, 10.0), (dssim, mse, 1e4)):
        for minmax in ("min", "max"):
            keras.utils.set_random_seed(0)  # the same noisy start for all four
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # convergence notes
                mad = MADCompetition(
                    image, optimized, reference, minmax, metric_tradeoff_lambda=lam
                )
                mad.setup(initial_noise=0.1, optimizer_kwargs={"lr": 0.005})
                mad.synthesize(max_iter=args.iterations, stop_criterion=1e-6)
            name = f"{minmax} {optimized.__name__}"
            runs[name] = mad
            start, end = mad.initial_image, mad.mad_image
            print(
                f"{name:>14} {len(mad.losses) - 1:5d} {float(mse(image, start)):9.5f} "
                f"{float(mse(image, end)):9.5f} {float(dssim(image, start)):12.4f} "
                f"{float(dssim(image, end)):10.4f}"
            )
    order = (runs["min mse"], runs["min dssim"], runs["max mse"], runs["max dssim"])
    fig = mad_imshow_all(*order, metric1_name="MSE", metric2_name="1-SSIM")
    images_path = os.path.join(args.output_dir, "mad_images.png")
    fig.savefig(images_path, dpi=120)
    fig = mad_loss_all(*order, metric1_name="MSE", metric2_name="1-SSIM")
    losses_path = os.path.join(args.output_dir, "mad_losses.png")
    fig.savefig(losses_path, dpi=120, bbox_inches="tight")
    print(f"figures: {images_path}, {losses_path}")


if __name__ == "__main__":
    main()
