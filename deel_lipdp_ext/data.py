"""Datasets for DP training: metadata, input bounding, Poisson or shuffled batches.

Nothing is downloaded: `load_digits_dataset` uses scikit-learn's bundled
digits, `load_npz_dataset` reads a file the user gives, `from_numpy` wraps
any arrays.

Sampling:
* "poisson": every step includes each training sample independently with
  probability q = batch_size / N (what the accountant assumes), drawn in
  tf.data. Batches hold exactly the sampled rows (a variable batch
  dimension) with a sample weight (mask) of ones; for XLA they are padded to
  a few bucket sizes with masked rows (`pad_to_buckets`, done by a DP
  model's `fit` under `jit_compile=True`).
* "shuffle": a fresh permutation cut into batches each epoch. The accountant
  still uses the Poisson analysis: the usual heuristic, not a proof; the
  epsilon report says so.

Seeds default to the operating system's entropy: amplification by subsampling
needs the batches to be secret. A fixed seed gives reproducible batches, and
the report says the sampling was "seeded: not secret".

The datasets built here carry their provenance (`sampling_provenance`), which
a DP model's `fit` checks against its `DatasetMetadata`; a dataset built
elsewhere is refused unless the user vouches for it (`declare_sampling`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from ._validation import require_one_of, require_positive
from .accounting import steps_per_epoch
from .layers.base import BOUND_MARGIN

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
        nb_steps_per_epoch: optimizer steps in one epoch; must be ceil(N / B)
            (the default, from `accounting.steps_per_epoch`).
        sampling: "poisson" or "shuffle".
        input_bound: L2 norm bound of one sample after preprocessing, if known.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    nb_samples_train: int
    nb_samples_test: int
    batch_size: int
    nb_steps_per_epoch: int | None = None
    sampling: str = "poisson"
    input_bound: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        for name in ("nb_samples_train", "batch_size"):
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
        steps = self.nb_steps_per_epoch
        if steps is None:
            object.__setattr__(
                self, "nb_steps_per_epoch", steps_per_epoch(self.sampling_rate)
            )
        elif steps != steps_per_epoch(self.sampling_rate):
            # Budgets and calibration plan epochs with it: it must be what runs.
            raise ValueError(
                "`nb_steps_per_epoch` of DatasetMetadata must be ceil(N / B) = "
                f"{steps_per_epoch(self.sampling_rate)} (the steps of one epoch of "
                f"the samplers here). Received: nb_steps_per_epoch={steps!r}"
            )
        require_one_of("sampling", self.sampling, SAMPLINGS, "DatasetMetadata")

    @property
    def sampling_rate(self) -> float:
        """q = expected batch size / number of training samples."""
        return self.batch_size / self.nb_samples_train

    # deel-lipdp's names for the same fields (read-only; see docs/migration.md).
    @property
    def nb_classes(self) -> int:
        """deel-lipdp's name of `num_classes`."""
        return self.num_classes

    @property
    def nb_steps_per_epochs(self) -> int:
        """deel-lipdp's name of `nb_steps_per_epoch`."""
        return self.nb_steps_per_epoch

    @property
    def max_norm(self) -> float | None:
        """deel-lipdp's name of `input_bound`."""
        return self.input_bound

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DatasetMetadata:
        return cls(**d)


def _per_sample_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each sample in float64 (tiny float32 entries do not underflow
    when squared, huge ones do not overflow)."""
    return np.linalg.norm(np.asarray(x, np.float64).reshape(len(x), -1), axis=1)


def _rescale(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    scaled = np.asarray(x, np.float64) * scale.reshape((-1,) + (1,) * (x.ndim - 1))
    return scaled.astype(np.float32)


def bound_normalize(bound: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """A function scaling every sample (axis 0 = samples) to L2 norm `bound`
    (times `BOUND_MARGIN`, so that float32 rounding stays below it).

    An all-zero sample stays zero.
    """
    bound = require_positive("bound", bound, "bound_normalize")

    def normalize(x: np.ndarray) -> np.ndarray:
        norms = _per_sample_norms(x)
        target = bound * BOUND_MARGIN
        scale = np.where(norms > 0, target / np.where(norms > 0, norms, 1.0), 0.0)
        return _rescale(x, scale)

    return normalize


def bound_clip_value(clip_value: float) -> Callable[[np.ndarray], np.ndarray]:
    """A function projecting every sample onto the L2 ball of radius
    `clip_value` (samples above it land at `clip_value * BOUND_MARGIN`)."""
    clip_value = require_positive("clip_value", clip_value, "bound_clip_value")

    def clip(x: np.ndarray) -> np.ndarray:
        norms = _per_sample_norms(x)
        target = clip_value * BOUND_MARGIN
        # samples within the ball are unchanged; the others land just inside
        scale = np.where(norms > clip_value, target / np.maximum(norms, 1e-300), 1.0)
        return _rescale(x, scale)

    return clip


def max_poisson_batch_size(n: int, q: float) -> int:
    """Largest Poisson batch accepted: mean + 10 standard deviations + 10.

    A Binomial(n, q) exceeds it with probability below 1e-20 (Chernoff); if
    it ever does, batching raises instead of dropping samples.
    """
    mean = n * q
    return int(min(n, math.ceil(mean + 10.0 * math.sqrt(mean * (1.0 - q)) + 10)))


def poisson_bucket_width(n: int, q: float) -> int:
    """Row granularity of bucketed Poisson batches: one standard deviation of
    the batch size (at least 8), so a batch carries at most that many padded
    rows and about 10 bucket sizes (XLA compilations) cover every batch but
    those of probability below 1e-20."""
    return max(8, math.ceil(math.sqrt(n * q * (1.0 - q))))


def poisson_bucket_size(size: int, n: int, q: float) -> int:
    """The padded size of a Poisson batch of `size` rows under bucketing: the
    next multiple of the bucket width (an empty batch gets one bucket of
    masked rows), capped at `max_poisson_batch_size` (never below `size`)."""
    return int(_bucket_rows(tf.constant(size), n, q))


def _bucket_rows(size: tf.Tensor, n: int, q: float) -> tf.Tensor:
    """`poisson_bucket_size` on a scalar int32 tensor (inside tf.data)."""
    width = poisson_bucket_width(n, q)
    bucket = tf.maximum(1, (size + width - 1) // width) * width
    return tf.maximum(size, tf.minimum(bucket, max_poisson_batch_size(n, q)))


@dataclass(frozen=True)
class SamplingProvenance:
    """How a dataset's batches are drawn, attached by the builders here.

    Args:
        sampling: "poisson" or "shuffle".
        nb_samples: N, the samples it draws from.
        batch_size: the expected batch size B.
        seeded: a user seed fixed the sampling (reproducible, not secret).
        declared: the user vouches for it (`declare_sampling`), unchecked.
        padding: Poisson batches only: "none" (variable batch dimension) or
            "buckets" (padded with masked rows to `poisson_bucket_size`).
        shard: the number of shards the batches are split into (1: whole
            batches); over 1, only a distributed dataset of all the shards
            (`distribution.distributed_poisson_batches`) is a whole sample.
    """

    sampling: str
    nb_samples: int
    batch_size: int
    seeded: bool
    declared: bool = False
    padding: str = "none"
    shard: int = 1


_PROVENANCE_ATTRIBUTE = "_deel_lipdp_sampling"


def _with_provenance(ds, provenance: SamplingProvenance):
    """`ds` (a tf.data or distributed dataset), marked with its provenance."""
    setattr(ds, _PROVENANCE_ATTRIBUTE, provenance)
    return ds


def sampling_provenance(data) -> SamplingProvenance | None:
    """The provenance of a dataset built by this module or by
    `distribution.distributed_poisson_batches` (None otherwise; a dataset
    transformed after it was built has none)."""
    if not isinstance(data, tf.data.Dataset | tf.distribute.DistributedDataset):
        return None
    return getattr(data, _PROVENANCE_ATTRIBUTE, None)


def declare_sampling(dataset, metadata: DatasetMetadata):
    """Vouch that `dataset` (a tf.data dataset, or one distributed by
    `strategy.experimental_distribute_dataset`, which splits each global
    batch over the replicas) samples as `metadata` says (its sampling, N and
    B).

    For pipelines built outside this module. Nothing is checked: the epsilon
    is only as true as this declaration, and the report says "declared".
    A dataset of `distribute_datasets_from_function` is refused: it gives
    every replica a dataset of its own (`lambda _: poisson_batches(x, y, B)`
    gives each a whole batch, R * B per step); use
    `distribution.distributed_poisson_batches`.

    Raises:
        TypeError: not a dataset, or a `distribute_datasets_from_function`
            one.

    Returns:
        `dataset`, marked.
    """
    if not isinstance(dataset, tf.data.Dataset | tf.distribute.DistributedDataset):
        raise TypeError(
            f"declare_sampling takes a tf.data.Dataset (or a tf.distribute "
            f"distributed dataset). Received: "
            f"{type(dataset).__name__}"
        )
    if any(
        c.__name__ == "DistributedDatasetsFromFunction" for c in type(dataset).__mro__
    ):
        raise TypeError(
            "declare_sampling does not take a dataset of "
            "distribute_datasets_from_function: every replica gets a dataset of "
            "its own (a whole batch each, if they are alike), which no declaration "
            "of one global batch describes. Declare the tf.data dataset and let "
            "fit split it, or use distribution.distributed_poisson_batches."
        )
    if not isinstance(metadata, DatasetMetadata):
        raise TypeError(
            f"declare_sampling needs the DatasetMetadata it declares. Received: "
            f"{type(metadata).__name__}"
        )
    return _with_provenance(
        dataset,
        SamplingProvenance(
            metadata.sampling,
            metadata.nb_samples_train,
            metadata.batch_size,
            seeded=False,
            declared=True,
        ),
    )


def _secret_seed(seed: int | None) -> int:
    """`seed`, or 63 bits of operating-system entropy when it is None."""
    return secrets.randbits(63) if seed is None else int(seed)


POISSON_PADDINGS = ("none", "buckets")


def _inclusion_threshold(n: int, batch_size: int) -> int | None:
    """The int64 threshold t such that a full-range int64 draw r < t happens
    with probability floor(B * 2**64 / N) / 2**64, i.e. within 2**-64 BELOW
    q = B / N (never above: the accountant's q bounds the real one). None
    when q = 1 (every sample joins)."""
    scaled = (int(batch_size) << 64) // int(n)
    return None if scaled >= 1 << 64 else scaled - (1 << 63)


def public_nb_samples(rows: int, nb_samples: int | None) -> int:
    """N for sampling `rows` rows: `rows` itself (None), or a public
    `nb_samples` that must bound it (fewer rows only lower the batches)."""
    if nb_samples is None:
        return int(rows)
    if not isinstance(nb_samples, int | np.integer) or nb_samples < rows:
        raise ValueError(
            "nb_samples (a public N, fixed without the data) must be an int >= "
            f"the {rows} rows sampled from. Received: nb_samples={nb_samples!r}"
        )
    return int(nb_samples)


def _split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as the two 32-bit halves of a stateless RNG seed."""
    return seed >> 32, seed & 0xFFFFFFFF


def poisson_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int | None = None,
    *,
    padding: str = "none",
    shard: tuple[int, int] = (0, 1),
    nb_samples: int | None = None,
) -> tf.data.Dataset:
    """Poisson-subsampled batches `(x, y, mask)`, sampled inside tf.data.

    One epoch has ceil(N / batch_size) steps; each step includes every row
    of `x` independently with probability q = batch_size / N (exactly
    floor(B 2^64 / N) / 2^64: a full-range 64-bit stateless draw per sample,
    keyed by the seed, the epoch and the step). Iterating the dataset again
    (next epoch) draws fresh batches; two datasets with the same seed draw
    the same ones. A batch may be empty.

    Args:
        seed: None (default): operating-system entropy, so the batches are
            secret. An int: reproducible batches, reported as not secret.
        padding: "none" (default): batches have exactly the sampled rows (a
            variable batch dimension, no wasted compute) and a mask of ones.
            "buckets": padded with zero rows, mask 0, to
            `poisson_bucket_size` (a few shapes, for XLA); a DP model
            compiled with `jit_compile=True` pads a "none" dataset so itself.
        shard: (index, count): only the sampled rows i with i % count == index
            (the same draws as unsharded: with one seed, the shards' batches
            are disjoint parts of the unsharded batch; with different seeds,
            their union is still a Poisson sample at rate q). For several
            workers: `distribution.distributed_poisson_batches`.
        nb_samples: N. None (default): len(x), so the size of the private
            data sets q and the number of steps, and is public (as in DP-SGD
            generally). An int >= len(x) fixed without the data (a public
            bound on its size): q, the steps and the provenance then come
            from it alone, and the add/remove guarantee covers the size too
            (the expected batch has B len(x) / N rows).

    Raises:
        ValueError: batch_size outside [1, N], or nb_samples below len(x).
        tf.errors.InvalidArgumentError: (while iterating) a batch larger than
            `max_poisson_batch_size` (probability < 1e-20): samples are never
            dropped.
    """
    require_one_of("padding", padding, POISSON_PADDINGS, "poisson_batches")
    shard_index, shard_count = (int(v) for v in shard)
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard must be (index, count) with 0 <= index < count. Received: {shard}"
        )
    rows_in_x = len(x)
    n = public_nb_samples(rows_in_x, nb_samples)
    if not 0 < batch_size <= n:
        raise ValueError(
            f"batch_size must lie in [1, N={n}]. Received: batch_size={batch_size!r}"
        )
    q = batch_size / n
    steps = steps_per_epoch(q)
    limit = max_poisson_batch_size(n, q)
    threshold = _inclusion_threshold(n, batch_size)
    seed_words = _split_seed(_secret_seed(seed))
    x_all = tf.constant(np.asarray(x, np.float32))
    y_all = tf.constant(np.asarray(y, np.float32))
    epochs = itertools.count()

    def next_epoch():
        yield next(epochs)

    def draw(epoch, step):
        key = tf.random.experimental.stateless_fold_in(
            tf.constant(seed_words, tf.int64), epoch * steps + step
        )
        index = tf.range(rows_in_x, dtype=tf.int64)
        if threshold is None:
            sampled = tf.ones((rows_in_x,), tf.bool)
        else:
            bits = tf.random.stateless_uniform(
                (rows_in_x,), key, minval=None, maxval=None, dtype=tf.int64
            )
            sampled = bits < threshold
        if shard_count > 1:
            sampled &= tf.equal(index % shard_count, shard_index)
        rows = tf.where(sampled)[:, 0]
        size = tf.size(rows)
        check = tf.debugging.assert_less_equal(
            size,
            limit,
            message=f"A Poisson batch exceeds {limit} samples (probability "
            "< 1e-20): refusing to drop samples.",
        )
        with tf.control_dependencies([check]):
            xb, yb = tf.gather(x_all, rows), tf.gather(y_all, rows)
        return xb, yb, tf.ones([size], tf.float32)

    def steps_of(epoch):
        return tf.data.Dataset.range(steps).map(lambda step: (epoch, step))

    ds = tf.data.Dataset.from_generator(
        next_epoch, output_signature=tf.TensorSpec((), tf.int64)
    )
    ds = ds.flat_map(steps_of).map(
        draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    ds = ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)
    ds = _with_provenance(
        ds,
        SamplingProvenance(
            "poisson", n, int(batch_size), seed is not None, shard=shard_count
        ),
    )
    return pad_to_buckets(ds) if padding == "buckets" else ds


def bucket_padding(n: int, q: float) -> Callable:
    """The tf.data map padding a Poisson batch `(x, y, mask)` of a sample of
    `n` rows at rate `q` with zero rows of mask 0 to `poisson_bucket_size`."""

    def pad(xb, yb, mask):
        size = tf.shape(mask)[0]
        extra = _bucket_rows(size, n, q) - size

        def rows(t):
            return tf.pad(t, [[0, extra]] + [[0, 0]] * (t.shape.rank - 1))

        return rows(xb), rows(yb), rows(mask)

    return pad


def pad_to_buckets(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A Poisson dataset of this module (padding "none") with every batch
    padded by zero rows of mask 0 to `poisson_bucket_size`: a few batch
    shapes, hence a few XLA compilations. The provenance is kept; the rows,
    and so the privacy analysis, are unchanged (masked rows weigh 0).

    Raises:
        ValueError: a dataset that is not an unpadded Poisson dataset of
            this module.
    """
    provenance = sampling_provenance(dataset)
    if (
        provenance is None
        or provenance.sampling != "poisson"
        or provenance.declared
        or provenance.padding != "none"
    ):
        raise ValueError(
            "pad_to_buckets takes an unpadded Poisson dataset built by "
            f"data.poisson_batches. Received provenance: {provenance}"
        )
    n, q = provenance.nb_samples, provenance.batch_size / provenance.nb_samples
    padded = dataset.map(
        bucket_padding(n, q), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return _with_provenance(padded, dataclasses.replace(provenance, padding="buckets"))


def shuffled_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int | None = None,
    *,
    sample_weight: np.ndarray | None = None,
) -> tf.data.Dataset:
    """A fresh permutation each epoch, cut into batches (the last may be short).

    Args:
        seed: None (default): operating-system entropy (not TensorFlow's global
            seed). An int: reproducible order.
        sample_weight: optional per-sample weights (N,), batched with the
            samples as `(x, y, sample_weight)`.
    """
    parts = [np.asarray(x, np.float32), np.asarray(y, np.float32)]
    if sample_weight is not None:
        parts.append(np.asarray(sample_weight, np.float32))
    ds = tf.data.Dataset.from_tensor_slices(tuple(parts))
    ds = ds.shuffle(len(x), seed=_secret_seed(seed), reshuffle_each_iteration=True)
    return _with_provenance(
        ds.batch(batch_size).prefetch(2),
        SamplingProvenance("shuffle", len(x), int(batch_size), seed is not None),
    )


def _one_hot(
    y: np.ndarray, num_classes: int | None, counted_in: str = ""
) -> np.ndarray:
    """Labels as one-hot rows: (N, C) rows are kept; (N,) or (N, 1) must hold
    class indices (integers, or floats with integer values).

    Raises:
        ValueError: fractional labels of shape (N,) or (N, 1) (a probability
            per sample is not a class index), or labels out of range.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return y.astype(np.float32)
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise ValueError(
            f"Labels must have shape (N,), (N, 1) or (N, classes). Received: {y.shape}"
        )
    y = y.reshape(-1)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            bad = y[~np.isfinite(y) | (y != np.round(y))][:3]
            raise ValueError(
                "Labels of shape (N,) or (N, 1) are class indices and must be "
                "whole numbers; for soft or binary probabilities pass (N, classes) "
                f"rows. Received values such as {bad.tolist()}"
            )
    elif y.dtype.kind not in "iub":
        raise ValueError(f"Labels must be numbers. Received dtype {y.dtype}")
    y = y.astype(np.int64)
    k = int(y.max() + 1) if num_classes is None else int(num_classes)
    if y.min() < 0 or y.max() >= k:
        raise ValueError(
            f"Labels must lie in [0, {k}) (num_classes={k}{counted_in}). "
            f"Received range [{y.min()}, {y.max()}]"
        )
    return np.eye(k, dtype=np.float32)[y]


def _train_one_hot(y_train, y_test, num_classes: int | None) -> np.ndarray:
    """The training labels as one-hot rows of `_public_num_classes` classes."""
    k = _public_num_classes(y_train, y_test, num_classes)
    counted = (
        ", counted in the test labels: pass num_classes (lipdp train "
        "--num-classes) if the training data has more classes"
        if num_classes is None and k is not None
        else ""
    )
    return _one_hot(y_train, k, counted)


def _public_num_classes(y_train, y_test, num_classes: int | None) -> int | None:
    """The class count, never read from the training labels' values: given,
    the width of one-hot rows, or (class indices) max(y_test) + 1 from the
    held-out labels, which the guarantee does not cover (as validation
    metrics). max(y_train) + 1 made the model's output size show whether a
    sample of the last class was in the data (a review).

    Raises:
        ValueError: class indices with neither num_classes nor test labels.
    """
    if num_classes is not None:
        if not isinstance(num_classes, int | np.integer) or num_classes < 1:
            raise ValueError(
                "num_classes must be a positive int (0 would count the classes "
                f"in the training labels). Received: num_classes={num_classes!r}"
            )
        return int(num_classes)
    if np.ndim(y_train) == 2 and np.shape(y_train)[1] > 1:
        return None  # one-hot rows: their width
    if y_test is None:
        _one_hot(y_train, None)  # values that are no class indices: named first
        raise ValueError(
            "The training labels are class indices: pass num_classes (public). "
            "Counting the classes in the training labels (max + 1) would let the "
            "model's output size show whether a sample of the last class is in "
            "the data."
        )
    return int(_one_hot(y_test, None).shape[1])


def _batched_feature_maps() -> tuple[type, ...]:
    """Feature maps applied to whole batches: their per-sample computation is
    by construction (and tested: tests/test_features.py)."""
    from .features import ScatteringFeatures

    return (ScatteringFeatures,)


def _apply_feature_map(feature_map, x: np.ndarray) -> np.ndarray:
    """`feature_map` applied to each sample. A library map (exact type in
    `_batched_feature_maps`) runs on whole arrays; any other callable runs on
    one sample at a time (`_features_one_by_one`)."""
    if type(feature_map) in _batched_feature_maps():
        features = np.asarray(feature_map(x), np.float32)
    else:
        features = _features_one_by_one(feature_map, x)
    if len(features) != len(x):
        raise ValueError(
            f"feature_map must return one row per sample: {len(x)} samples gave "
            f"{len(features)} rows."
        )
    finite = np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"feature_map returned NaN or Inf values for {int((~finite).sum())} "
            f"sample(s) (first: index {int(np.argmin(finite))}); overflowing or "
            "non-finite inputs?"
        )
    return features


#: public inputs a user feature map also sees between its two passes (scales
#: of the noise): they move state that a pass over the data left saturated
#: (a running maximum that the first sample happened to set)
_PROBE_SCALES = (1e3, -1e3, 1e-3)


def _features_one_by_one(feature_map, x: np.ndarray) -> np.ndarray:
    """(N, ...) features of a user callable, computed one sample at a time,
    each time on a fresh `copy.deepcopy` of the map and on a copy of the
    sample (an in-place map cannot change the data), and copied out (a map
    returning a buffer that its next call overwrites cannot alias rows), so
    batch statistics and state kept on the map's instance cannot mix samples.

    A copy still shares what deepcopy does not copy: closures, module
    globals, class attributes, caches, variables. Two guards:
    - first calls on public noise (of one sample's shape, on throwaway
      copies, a draw each), 16 to 64 of them at random, so state the map
      fixes on its first calls or first distinct inputs (a fitted
      standardiser) is fixed without private data, or shows in the second
      pass;
    - every sample computed twice, in order and then, after calls on scaled
      public noise (`_PROBE_SCALES`; their errors are ignored) and 16 to 64
      more on noise, in a random order: features that differ show state
      carried from call to call (a running statistic, a flip every other
      call) or a random map, and the map is refused (for a handful of
      samples, state of a short period may meet each at the same phase by
      chance).
    These catch the usual mistakes, not every conceivable one (a memo cache
    is not detected): that the map is FIXED, deterministic and stateless
    stays the caller's promise.
    """

    def one(sample: np.ndarray) -> np.ndarray:
        try:
            fresh = copy.deepcopy(feature_map)
        except Exception as err:
            raise ValueError(
                "feature_map must be copyable (copy.deepcopy): each sample's "
                "features are computed on a fresh copy of it, so that no state "
                f"of the map carries one sample into another. Copying failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        return np.array(fresh(sample.copy()), np.float32, copy=True)

    if not len(x):
        return np.zeros((0,), np.float32)
    # Public noise first, a number of times the map cannot predict
    # (operating-system entropy): a map fitting itself on its first k calls
    # is then fixed on noise, or caught by the second pass (a review: a
    # standardiser fitted on its first 2 calls, one noise call then x[0],
    # was accepted, and x[0] moved every other sample's features).
    # Each noise call gets a draw of its own (a review: a map fitting itself
    # on its first 2 DISTINCT inputs saw the repeated noise once, then x[0]),
    # from a fixed stream, so a map fixed on noise is fixed alike every run.
    public = np.random.default_rng(0)

    def noise() -> np.ndarray:
        return public.random(x[:1].shape).astype(x.dtype)

    rng = np.random.default_rng()
    for _ in range(rng.integers(16, 65)):
        one(noise())
    rows = [one(x[i : i + 1]) for i in range(len(x))]
    if any(len(row) != 1 for row in rows):
        raise ValueError(
            "feature_map must return one row per sample: a single sample "
            f"gave {sorted({len(row) for row in rows})} rows."
        )
    for scale in _PROBE_SCALES:
        try:
            one(noise() * np.asarray(scale, x.dtype))
        except Exception:  # a map may refuse such inputs; only its state matters
            pass
    # The second pass starts after a random number of calls on public noise
    # and runs in a random order, which the map cannot predict: in a fixed
    # order, state of period 2 (a flip every other call) met each sample at
    # the same phase twice (a review: 39 of 40 samples' features moved with
    # one removed sample, and the map was accepted).
    for _ in range(rng.integers(16, 65)):
        one(noise())
    again = [None] * len(x)
    for i in rng.permutation(len(x)):
        again[i] = one(x[i : i + 1])
    changed = [
        i
        for i, (first, second) in enumerate(zip(rows, again, strict=True))
        if not np.array_equal(first, second, equal_nan=True)
    ]
    if changed:
        raise ValueError(
            "feature_map gave other features for the same sample on a second "
            f"pass in another order ({len(changed)} of {len(x)} samples, first: "
            f"index {changed[0]}): it keeps state from call to call (a closure, "
            "a module global, a class attribute or a variable), so one "
            "sample's features depend on other samples, or it is random. A "
            "feature map must be fixed without the private data, deterministic, "
            "and compute each sample alone (random augmentation belongs in "
            "training: `augmentation`)."
        )
    return np.concatenate(rows)


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
    seed: int | None = None,
    feature_map: Callable[[np.ndarray], np.ndarray] | None = None,
    nb_samples: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, DatasetMetadata]:
    """Wrap arrays as DP-ready datasets.

    Args:
        x_train: samples, shape (N, ...).
        y_train: their labels (integers or one-hot).
        x_test: optional held-out samples, batched without sampling.
        y_test: their labels.
        batch_size: expected batch size B.
        input_bound: L2 bound of one sample after preprocessing.
        preprocessing: "normalize" (every sample scaled to norm `input_bound`)
            or "clip" (samples projected onto the ball).
        sampling: "poisson" or "shuffle".
        num_classes: number of classes if the labels are class indices
            (public). None: the width of one-hot labels, or max(y_test) + 1
            (held-out labels); never counted in the training labels.
        seed: seed of the batch sampling; None (default): operating-system
            entropy (secret batches); an int: reproducible, not secret.
        feature_map: a FIXED function applied to x_train and x_test before
            the bound, chosen without the private data (e.g.
            `features.ScatteringFeatures()`, which runs on whole arrays); any
            other callable is applied to one sample at a time, on a fresh
            copy of it each time, and refused if a sample's features change
            with the order of the samples (state shared across copies: see
            `_features_one_by_one`).
        nb_samples: Poisson sampling only: a public N >= len(x_train), fixed
            without the data, for q = B / N, the steps of an epoch and the
            metadata (`poisson_batches`). None: len(x_train), which the
            metadata, and so a saved model, then record (the size is public).

    Returns:
        (train dataset, test dataset or None, DatasetMetadata).

    Raises:
        ValueError: NaN/Inf samples or features, mismatched lengths, a
            feature map that does not return one row per sample,
            nb_samples below len(x_train) or with shuffle sampling, or
            class-index labels with neither num_classes nor test labels.
    """
    require_one_of("sampling", sampling, SAMPLINGS, "from_numpy")
    if nb_samples is not None and sampling != "poisson":
        raise ValueError(
            "nb_samples (a public N) needs Poisson sampling: a shuffled epoch "
            "is a permutation of the rows themselves, so its steps count them. "
            f"Received: sampling={sampling!r}, nb_samples={nb_samples!r}"
        )
    n = public_nb_samples(len(x_train), nb_samples)
    input_bound = require_positive("input_bound", input_bound, "from_numpy")
    require_one_of("preprocessing", preprocessing, ("normalize", "clip"), "from_numpy")
    if preprocessing == "normalize":
        bound = bound_normalize(input_bound)
    else:
        bound = bound_clip_value(input_bound)
    x_train = np.asarray(x_train, np.float32)
    if not np.all(np.isfinite(x_train)):
        raise ValueError("x_train contains NaN or Inf values.")
    if len(x_train) != len(y_train):
        raise ValueError(
            f"x_train and y_train differ in length: {len(x_train)} vs {len(y_train)}"
        )
    y_train = _train_one_hot(y_train, y_test, num_classes)
    if feature_map is not None:
        x_train = _apply_feature_map(feature_map, x_train)
        if x_test is not None:
            x_test = _apply_feature_map(feature_map, np.asarray(x_test, np.float32))
    x_train = bound(x_train)
    if sampling == "poisson":
        ds_train = poisson_batches(
            x_train, y_train, batch_size, seed=seed, nb_samples=nb_samples
        )
    else:
        ds_train = shuffled_batches(x_train, y_train, batch_size, seed=seed)
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
        nb_samples_train=n,
        nb_samples_test=n_test,
        batch_size=int(batch_size),
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
    seed: int | None = None,
    split_seed: int = 0,
    feature_map: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DatasetMetadata]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), offline.

    Pixels are scaled to [0, 1], images shaped (8, 8, 1), labels one-hot,
    a stratified train/test split made with `split_seed` (public), then each
    image bounded. `seed` is the batch sampling's (None: secret, from the
    operating system's entropy); `feature_map` as in `from_numpy`.

    Returns:
        (train dataset, test dataset, DatasetMetadata).
    """
    x_tr, y_tr, x_te, y_te = digits_arrays(test_size, split_seed)
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
        feature_map=feature_map,
    )


def digits_arrays(
    test_size: float = 0.2, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of the bundled digits: images
    (n, 8, 8, 1) in [0, 1], integer labels, the stratified split of
    `load_digits_dataset`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        x,
        digits.target,
        test_size=test_size,
        stratify=digits.target,
        random_state=split_seed,
    )
    return x_tr, y_tr, x_te, y_te


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _as_images(x: np.ndarray) -> np.ndarray:
    """float32 images: uint8 pixels scaled by 1/255 (decided by dtype, not by
    the private values); grey images (N, H, W) get a channel axis."""
    x = np.asarray(x)
    scaled = x.astype(np.float32)
    if x.dtype == np.uint8:
        scaled = scaled / 255.0
    return scaled[..., None] if scaled.ndim == 3 else scaled


def _read_npz_images(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays `NPZ_KEYS` of a user's `.npz`, images through `_as_images`.

    Raises:
        FileNotFoundError: naming the missing file and the expected keys.
        KeyError: naming the missing arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Dataset file not found: {path!r}. Expected an .npz with arrays "
            "x_train, y_train, x_test, y_test (e.g. keras' mnist.npz saved locally); "
            "nothing is downloaded."
        )
    with np.load(path) as data:
        missing = set(NPZ_KEYS) - set(data.files)
        if missing:
            raise KeyError(
                f"{path!r} lacks the arrays {sorted(missing)}; has {data.files}"
            )
        arrays = {k: data[k] for k in NPZ_KEYS}
    for key in ("x_train", "x_test"):
        arrays[key] = _as_images(arrays[key])
    return arrays


def load_npz_dataset(path: str | os.PathLike, **kwargs):
    """A user's MNIST-style `.npz` (keys x_train, y_train, x_test, y_test).

    Grey images of shape (N, H, W) get a channel axis; uint8 pixels are scaled
    by 1/255 (decided by dtype, not by the private values). Other arguments go
    to `from_numpy`.

    Raises:
        FileNotFoundError: naming the missing file and the expected keys.
    """
    arrays = _read_npz_images(path)
    return from_numpy(
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        **kwargs,
    )
