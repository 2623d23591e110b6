"""Datasets for DP training: metadata, input bounding, Poisson or shuffled batches.

Nothing is downloaded: `load_digits_dataset` uses scikit-learn's bundled
digits, `load_npz_dataset` reads a file the user gives, `from_numpy` wraps
any arrays.

Sampling:
* "poisson": every step includes each training sample independently with
  probability q = batch_size / N (what the accountant assumes). Batches are
  padded to a fixed size with a 0/1 sample weight (mask) so `tf.function` /
  XLA see one shape.
* "shuffle": a fresh permutation cut into batches each epoch. The accountant
  still uses the Poisson analysis: the usual heuristic, not a proof; the
  epsilon report says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

SAMPLINGS = ("poisson", "shuffle")


@dataclass(frozen=True)
class DatasetMetadata:
    """What the DP model and the accountant need to know about the training data.

    Args:
        input_shape: shape of one sample (no batch axis).
        num_classes: size of the label vectors.
        nb_samples_train: N, the number of training samples.
        nb_samples_test: number of test samples.
        batch_size: the EXPECTED batch size B (the loss denominator).
        nb_steps_per_epoch: optimizer steps in one epoch.
        sampling: "poisson" or "shuffle".
        input_bound: L2 norm bound of one sample after preprocessing, if known.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    nb_samples_train: int
    nb_samples_test: int
    batch_size: int
    nb_steps_per_epoch: int
    sampling: str = "poisson"
    input_bound: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for name in ("nb_samples_train", "batch_size", "nb_steps_per_epoch"):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(
                    f"`{name}` of DatasetMetadata must be a positive int. "
                    f"Received: {name}={value!r}"
                )
        if self.batch_size > self.nb_samples_train:
            raise ValueError(
                "`batch_size` of DatasetMetadata cannot exceed nb_samples_train. "
                f"Received: batch_size={self.batch_size}, "
                f"nb_samples_train={self.nb_samples_train}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(
                "`sampling` of DatasetMetadata must be 'poisson' or 'shuffle'. "
                f"Received: sampling={self.sampling!r}"
            )

    @property
    def sampling_rate(self) -> float:
        """q = expected batch size / number of training samples."""
        return self.batch_size / self.nb_samples_train

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetMetadata:
        return cls(**d)


def _per_sample_norms(x: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x.reshape(len(x), -1), axis=1)


def bound_normalize(bound: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A function scaling every sample (axis 0 = samples) to L2 norm `bound`.

    An all-zero sample stays zero.
    """

    def normalize(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        norms = _per_sample_norms(x)
        scale = np.where(norms > 0, bound / np.where(norms > 0, norms, 1.0), 0.0)
        return (x * scale.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)

    return normalize


def bound_clip_value(clip_value: float) -> Callable[[np.ndarray], np.ndarray]:
    """A function projecting every sample onto the L2 ball of radius `clip_value`."""

    def clip(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        norms = _per_sample_norms(x)
        scale = np.minimum(1.0, clip_value / np.maximum(norms, 1e-30))
        return (x * scale.reshape((-1,) + (1,) * (x.ndim - 1))).astype(np.float32)

    return clip


def max_poisson_batch_size(n: int, q: float) -> int:
    """Padded size of Poisson batches: mean + 10 standard deviations + 10.

    A Binomial(n, q) exceeds it with probability below 1e-20 (Chernoff); if
    it ever does, batching raises instead of dropping samples.
    """
    mean = n * q
    return int(min(n, math.ceil(mean + 10.0 * math.sqrt(mean * (1.0 - q)) + 10)))


def poisson_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None
) -> tf.data.Dataset:
    """Poisson-subsampled batches `(x, y, mask)` padded to a fixed size.

    One epoch has ceil(N / batch_size) steps; each step includes every sample
    independently with probability q = batch_size / N. Iterating the dataset
    again (next epoch) draws fresh batches from the same seeded generator.
    """
    n = len(x)
    q = batch_size / n
    steps = math.ceil(n / batch_size)
    padded = max_poisson_batch_size(n, q)
    rng = np.random.default_rng(seed)

    def generate():
        for _ in range(steps):
            idx = np.flatnonzero(rng.random(n) < q)
            if len(idx) > padded:
                raise RuntimeError(
                    f"A Poisson batch of {len(idx)} samples exceeds the padded size "
                    f"{padded} (probability < 1e-20): refusing to drop samples."
                )
            mask = np.zeros(padded, np.float32)
            mask[: len(idx)] = 1.0
            xb = np.zeros((padded, *x.shape[1:]), np.float32)
            yb = np.zeros((padded, *y.shape[1:]), np.float32)
            xb[: len(idx)] = x[idx]
            yb[: len(idx)] = y[idx]
            yield xb, yb, mask

    signature = (
        tf.TensorSpec((padded, *x.shape[1:]), tf.float32),
        tf.TensorSpec((padded, *y.shape[1:]), tf.float32),
        tf.TensorSpec((padded,), tf.float32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def shuffled_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, seed: int | None = None
) -> tf.data.Dataset:
    """A fresh permutation each epoch, cut into batches (the last may be short)."""
    ds = tf.data.Dataset.from_tensor_slices(
        (x.astype(np.float32), y.astype(np.float32))
    )
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(2)


def _one_hot(y: np.ndarray, num_classes: int | None) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return y.astype(np.float32)
    y = y.reshape(-1).astype(np.int64)
    k = int(num_classes or (y.max() + 1))
    if y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"Labels must lie in [0, {k}). Received range [{y.min()}, {y.max()}]"
        )
    return np.eye(k, dtype=np.float32)[y]


def from_numpy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    batch_size: int,
    input_bound: float = 1.0,
    preprocessing: str = "normalize",
    sampling: str = "poisson",
    num_classes: int | None = None,
    seed: int | None = 0,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, DatasetMetadata]:
    """Wrap arrays as DP-ready datasets.

    Args:
        x_train, y_train: samples (N, ...) and labels (integers or one-hot).
        x_test, y_test: optional held-out arrays, batched without sampling.
        batch_size: expected batch size B.
        input_bound: L2 bound of one sample after preprocessing.
        preprocessing: "normalize" (every sample scaled to norm `input_bound`)
            or "clip" (samples projected onto the ball).
        sampling: "poisson" or "shuffle".
        num_classes: number of classes if the labels are integers.
        seed: seed of the batch sampling.

    Returns:
        (train dataset, test dataset or None, DatasetMetadata).
    """
    if sampling not in SAMPLINGS:
        raise ValueError(
            f"`sampling` must be 'poisson' or 'shuffle'. Received: {sampling!r}"
        )
    if preprocessing == "normalize":
        bound = bound_normalize(input_bound)
    elif preprocessing == "clip":
        bound = bound_clip_value(input_bound)
    else:
        raise ValueError(
            "`preprocessing` must be 'normalize' or 'clip'. "
            f"Received: {preprocessing!r}"
        )
    x_train = np.asarray(x_train, np.float32)
    if not np.all(np.isfinite(x_train)):
        raise ValueError("x_train contains NaN or Inf values.")
    if len(x_train) != len(y_train):
        raise ValueError(
            f"x_train and y_train differ in length: {len(x_train)} vs {len(y_train)}"
        )
    y_train = _one_hot(y_train, num_classes)
    x_train = bound(x_train)
    batches = poisson_batches if sampling == "poisson" else shuffled_batches
    ds_train = batches(x_train, y_train, batch_size, seed=seed)
    ds_test = None
    n_test = 0
    if x_test is not None:
        y_test = _one_hot(y_test, y_train.shape[1])
        x_test = bound(np.asarray(x_test, np.float32))
        n_test = len(x_test)
        ds_test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(batch_size)
    meta = DatasetMetadata(
        input_shape=x_train.shape[1:],
        num_classes=int(y_train.shape[1]),
        nb_samples_train=len(x_train),
        nb_samples_test=n_test,
        batch_size=int(batch_size),
        nb_steps_per_epoch=math.ceil(len(x_train) / batch_size),
        sampling=sampling,
        input_bound=float(input_bound),
    )
    return ds_train, ds_test, meta


def load_digits_dataset(
    batch_size: int = 128,
    input_bound: float = 1.0,
    *,
    test_size: float = 0.2,
    sampling: str = "poisson",
    preprocessing: str = "normalize",
    seed: int = 0,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetMetadata]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), offline.

    Pixels are scaled to [0, 1], images shaped (8, 8, 1), labels one-hot,
    a stratified train/test split made with `seed`, then each image bounded.

    Returns:
        (train dataset, test dataset, DatasetMetadata).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return from_numpy(
        x_tr,
        y_tr,
        x_te,
        y_te,
        batch_size=batch_size,
        input_bound=input_bound,
        preprocessing=preprocessing,
        sampling=sampling,
        num_classes=10,
        seed=seed,
    )


def load_npz_dataset(path: str | os.PathLike, **kwargs):
    """A user's MNIST-style `.npz` (keys x_train, y_train, x_test, y_test).

    Grey images of shape (N, H, W) get a channel axis; uint8 pixels are scaled
    by 1/255 (decided by dtype, not by the private values). Other arguments go
    to `from_numpy`.

    Raises:
        FileNotFoundError: naming the missing file and the expected keys.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Dataset file not found: {path!r}. Expected an .npz with arrays "
            "x_train, y_train, x_test, y_test (e.g. keras' mnist.npz saved locally); "
            "nothing is downloaded."
        )
    with np.load(path) as data:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(data.files)
        if missing:
            raise KeyError(
                f"{path!r} lacks the arrays {sorted(missing)}; has {data.files}"
            )
        arrays = {k: data[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    for key in ("x_train", "x_test"):
        x = arrays[key].astype(np.float32)
        if arrays[key].dtype == np.uint8:
            x = x / 255.0
        arrays[key] = x[..., None] if x.ndim == 3 else x
    return from_numpy(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        **kwargs,
    )
