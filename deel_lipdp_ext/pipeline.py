"""deel-lipdp's `pipeline` API (`load_and_prepare_data`, `bound_clip_value`,
`bound_normalize`) on top of `deel_lipdp_ext.data`.

A deel-lipdp script keeps its calls and changes its imports
(docs/migration.md). What differs, and why:

* Nothing is downloaded. deel-lipdp loaded a dataset NAME with
  tensorflow-datasets; here the first argument is the path of a local `.npz`
  (keys x_train, y_train, x_test, y_test, as `data.load_npz_dataset`),
  "digits" (scikit-learn's bundled 8x8 digits, `data.load_digits_dataset`),
  or the arrays themselves. Any other name is refused with a clear error.
* Sampling is what the accountant assumes. deel-lipdp shuffled and cut
  fixed-size batches (`drop_remainder=True`) and accounted them as Poisson
  samples. The default here is TRUE Poisson sampling (`data.poisson_batches`:
  each sample joins each step with probability q = B / N, batches of exactly
  the sampled rows with a mask of ones), so the epsilon is exact; `sampling="shuffle"`
  gives shuffled batches, reported as the heuristic they are.
  `drop_remainder` asks for fixed-size batches so that deel-lipdp's bound held;
  here it is not needed (the loss is divided by the constant expected batch
  size B, docs/design.md rule 1): Poisson batches vary in size anyway, and
  a short last shuffled batch is kept, which cannot raise any sample's weight.
* The input bound is enforced on the data: `bound_fct=None` (deel-lipdp: no
  bounding, bound reported as the largest possible norm) clips every sample to
  `sqrt(H * W * C)`, the norm of an all-ones image, so the metadata's bound is
  true whatever the pixel range.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from ._validation import require_positive
from .data import (
    NPZ_KEYS,
    SAMPLINGS,
    DatasetMetadata,
    _as_images,
    _read_npz_images,
    from_numpy,
    load_digits_dataset,
)
from .layers.base import BOUND_MARGIN

__all__ = [
    "BoundFunction",
    "bound_clip_value",
    "bound_normalize",
    "load_and_prepare_data",
    "COLORSPACES",
]

COLORSPACES = ("RGB", "HSV", "YIQ", "YUV", "GRAYSCALE")
"""Accepted `colorspace` values (case-insensitive): "RGB" leaves the images as
they are; the others need 3-channel RGB images, except "GRAYSCALE", which also
leaves 1-channel images as they are."""

_CONVERSIONS = {
    "HSV": tf.image.rgb_to_hsv,
    "YIQ": tf.image.rgb_to_yiq,
    "YUV": tf.image.rgb_to_yuv,
    "GRAYSCALE": tf.image.rgb_to_grayscale,
}

#: Bundled dataset names (nothing is downloaded).
BUNDLED = ("digits",)


class BoundFunction(NamedTuple):
    """deel-lipdp's `(function, bound)` pair: `function(x, y) -> (x', y)`
    bounds ONE sample `x` to L2 norm `bound` (over all its axes).

    `load_and_prepare_data(bound_fct=...)` applies the same bound to every
    sample, with `data.bound_clip_value` / `data.bound_normalize`.
    """

    function: Callable
    bound: float


def _rescaled(x, bound: float, clip_only: bool) -> tf.Tensor:
    """One sample `x` scaled to L2 norm `bound * BOUND_MARGIN` (clip_only: only
    if its norm is above `bound`; otherwise only if it is not all zero), with
    the norm and the scaling in float64 so that no float32 square underflows
    or overflows (the same rule as `data.bound_normalize` / `bound_clip_value`)."""
    x = tf.cast(tf.convert_to_tensor(x, tf.float32), tf.float64)
    norm = tf.norm(tf.reshape(x, [-1]))
    scale = bound * BOUND_MARGIN / tf.maximum(norm, 1e-300)
    keep = norm <= bound if clip_only else tf.equal(norm, 0.0)
    return tf.cast(tf.where(keep, x, x * scale), tf.float32)


def bound_clip_value(upper_bound: float) -> BoundFunction:
    """Project each sample onto the L2 ball of radius `upper_bound`.

    Args:
        upper_bound: the largest L2 norm of one sample (> 0).

    Returns:
        `BoundFunction(function, upper_bound)`; unpacks as deel-lipdp's pair.

    Example:
        >>> clip, bound = bound_clip_value(1.0)
        >>> bound
        1.0
    """
    bound = require_positive("upper_bound", upper_bound, "bound_clip_value")

    def clip(x, y):
        """Scale `x` down to just inside norm `upper_bound` if it is longer."""
        return _rescaled(x, bound, clip_only=True), y

    clip.preprocessing = "clip"
    return BoundFunction(clip, bound)


def bound_normalize(bound: float = 1.0) -> BoundFunction:
    """Scale each sample to L2 norm `bound` (1 in deel-lipdp); an all-zero
    sample stays zero.

    Returns:
        `BoundFunction(function, bound)`; unpacks as deel-lipdp's pair.

    Example:
        >>> normalize, norm = bound_normalize()
        >>> norm
        1.0
    """
    bound = require_positive("bound", bound, "bound_normalize")

    def normalize(x, y):
        """Scale `x` to just inside norm `bound` (zero stays zero)."""
        return _rescaled(x, bound, clip_only=False), y

    normalize.preprocessing = "normalize"
    return BoundFunction(normalize, bound)


def _preprocessing(bound_fct, input_shape: tuple[int, ...]) -> tuple[str, float]:
    """`data.from_numpy`'s (preprocessing, input_bound) for a `bound_fct`."""
    if bound_fct is None:
        # Pixels in [0, 1]: no sample is longer than an all-ones image; the
        # clip makes the bound true for any data.
        return "clip", math.sqrt(float(np.prod(input_shape)))
    function = bound_fct[0] if isinstance(bound_fct, tuple) else None
    mode = getattr(function, "preprocessing", None)
    if mode not in ("clip", "normalize") or len(bound_fct) != 2:
        raise ValueError(
            "`bound_fct` of load_and_prepare_data must be None, "
            "bound_clip_value(upper_bound) or bound_normalize() from "
            "deel_lipdp_ext.pipeline (a function of unknown effect cannot "
            f"certify the input bound). Received: bound_fct={bound_fct!r}"
        )
    return mode, float(bound_fct[1])


def _convert_colorspace(x: np.ndarray, colorspace: str) -> np.ndarray:
    """Images `x` (N, H, W, C) in `colorspace` (see `COLORSPACES`).

    Raises:
        ValueError: an unknown colorspace, or one that needs RGB images
            (3 channels) given other images.
    """
    name = colorspace.upper() if isinstance(colorspace, str) else colorspace
    if name not in COLORSPACES:
        raise ValueError(
            "`colorspace` of load_and_prepare_data must be one of "
            f"{', '.join(COLORSPACES)} (case-insensitive). "
            f"Received: colorspace={colorspace!r}"
        )
    channels = x.shape[-1] if x.ndim == 4 else None
    if name == "RGB" or (name == "GRAYSCALE" and channels == 1):
        return x
    if channels != 3:
        raise ValueError(
            f"`colorspace={colorspace!r}` converts RGB images (N, H, W, 3); use "
            f"colorspace='RGB' to keep these images as they are. Received images "
            f"of shape {x.shape[1:]}"
        )
    convert = _CONVERSIONS[name]
    chunks = [
        convert(tf.convert_to_tensor(x[i : i + 4096])).numpy()
        for i in range(0, len(x), 4096)
    ]
    return np.concatenate(chunks).astype(np.float32)


def _arrays_from(source) -> dict[str, np.ndarray]:
    """The raw arrays NPZ_KEYS of a local .npz path or of in-memory arrays."""
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path) and not path.endswith(".npz"):
            raise ValueError(
                "load_and_prepare_data does not download datasets (deel-lipdp "
                "fetched them with tensorflow-datasets). Pass the path of a local "
                ".npz file with arrays x_train, y_train, x_test, y_test (e.g. "
                "keras' mnist.npz saved beforehand), 'digits' for scikit-learn's "
                "bundled digits, or the arrays themselves. "
                f"Received: dataset_name_or_path={path!r}"
            )
        return _read_npz_images(path)
    if isinstance(source, Mapping):
        missing = [k for k in NPZ_KEYS if k not in source]
        if missing:
            raise KeyError(
                f"The dataset mapping lacks the arrays {missing}. "
                f"Received keys: {sorted(source)}"
            )
        arrays = {k: source[k] for k in NPZ_KEYS}
    elif isinstance(source, tuple | list) and len(source) == 4:
        arrays = dict(zip(NPZ_KEYS, source, strict=True))
    elif (
        isinstance(source, tuple | list)
        and len(source) == 2
        and all(isinstance(s, tuple | list) and len(s) == 2 for s in source)
    ):  # keras.datasets' ((x_train, y_train), (x_test, y_test))
        (x_tr, y_tr), (x_te, y_te) = source
        arrays = dict(zip(NPZ_KEYS, (x_tr, y_tr, x_te, y_te), strict=True))
    else:
        raise ValueError(
            "`dataset_name_or_path` of load_and_prepare_data must be a local .npz "
            "path, 'digits', ((x_train, y_train), (x_test, y_test)), "
            "(x_train, y_train, x_test, y_test) or a mapping with those keys. "
            f"Received: {type(source).__name__}"
        )
    for key in ("x_train", "x_test"):
        arrays[key] = _as_images(arrays[key])
    return arrays


def load_and_prepare_data(
    dataset_name_or_path=None,
    batch_size: int = 256,
    colorspace: str = "RGB",
    drop_remainder: bool = True,
    augmentation_fct: Callable | None = None,
    bound_fct: BoundFunction | None = None,
    *,
    sampling: str = "poisson",
    seed: int | None = None,
    dataset_name=None,
    num_classes: int | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, DatasetMetadata]:
    """deel-lipdp's data loader, offline, with sampling the accountant can trust.

    Pixels are scaled to [0, 1] (uint8 data, by dtype), grey images get a
    channel axis, labels become one-hot rows, the colorspace is converted, and
    every sample (train and test) is bounded by `bound_fct`.

    Args:
        dataset_name_or_path: a local `.npz` path (arrays x_train, y_train,
            x_test, y_test), "digits" (scikit-learn's bundled 8x8 digits,
            split 80/20), or arrays: ((x_train, y_train), (x_test, y_test)),
            (x_train, y_train, x_test, y_test) or a mapping with those keys.
            Dataset names (e.g. "mnist") are refused: nothing is downloaded.
        batch_size: the expected batch size B.
        colorspace: "RGB" (as-is), "HSV", "YIQ", "YUV" (from RGB images) or
            "GRAYSCALE" (from RGB; 1-channel images stay as they are).
        drop_remainder: accepted for deel-lipdp scripts; not needed here (see
            the module docstring): Poisson batches vary in size and
            a short last shuffled batch is kept (B is a constant denominator).
        augmentation_fct: must be None; augment per sample in the train step
            with `DPSequential(augmentation=...)` instead.
        bound_fct: None (clip to `sqrt(H * W * C)`, the norm of an all-ones
            image), `bound_clip_value(upper_bound)` or `bound_normalize()`.
        sampling: "poisson" (default: exact accounting) or "shuffle" (a fresh
            permutation per epoch, accounted as Poisson: a heuristic, and
            reported as such).
        seed: seed of the batch sampling; None (default): operating-system
            entropy, so the batches are secret.
        dataset_name: deel-lipdp's keyword for `dataset_name_or_path`.
        num_classes: the number of classes of class-index labels (public;
            None: counted in the test labels, never in the training labels:
            `data.from_numpy`). Not in deel-lipdp.

    Returns:
        (train dataset, test dataset, `DatasetMetadata`), the metadata with
        deel-lipdp's names too (`nb_classes`, `nb_steps_per_epochs`,
        `max_norm`).

    Raises:
        ValueError: a dataset name to download, an unknown colorspace, a
            `bound_fct` other than this module's, an augmentation function,
            or bad arguments.
        FileNotFoundError: a `.npz` path that does not exist.

    Example:
        >>> train, test, meta = load_and_prepare_data(
        ...     "digits", 128, bound_fct=bound_clip_value(1.0))
        >>> meta.nb_classes, meta.input_bound, meta.sampling
        (10, 1.0, 'poisson')
    """
    if dataset_name is not None:
        if dataset_name_or_path is not None:
            raise ValueError(
                "Pass the dataset once: `dataset_name_or_path` or deel-lipdp's "
                f"`dataset_name`. Received: {dataset_name_or_path!r} and "
                f"{dataset_name!r}"
            )
        dataset_name_or_path = dataset_name
    if dataset_name_or_path is None:
        raise ValueError(
            "load_and_prepare_data needs a dataset: a local .npz path, 'digits' or "
            "arrays (nothing is downloaded). Received: dataset_name_or_path=None"
        )
    if not isinstance(drop_remainder, bool):
        raise ValueError(
            "`drop_remainder` of load_and_prepare_data must be a bool. "
            f"Received: drop_remainder={drop_remainder!r}"
        )
    if augmentation_fct is not None:
        raise ValueError(
            "`augmentation_fct` of load_and_prepare_data is not supported: the "
            "batches are drawn from fixed arrays. Augment each sample in the "
            "train step with DPSequential(augmentation=...) "
            "(deel_lipdp_ext.augmentation). "
            f"Received: augmentation_fct={augmentation_fct!r}"
        )
    if sampling not in SAMPLINGS:
        raise ValueError(
            "`sampling` of load_and_prepare_data must be 'poisson' or 'shuffle'. "
            f"Received: sampling={sampling!r}"
        )
    if isinstance(dataset_name_or_path, str) and dataset_name_or_path in BUNDLED:
        digits_shape = (8, 8, 1)
        # Validates the colorspace; converts nothing (1-channel images).
        _convert_colorspace(np.zeros((1, *digits_shape), np.float32), colorspace)
        preprocessing, input_bound = _preprocessing(bound_fct, digits_shape)
        return load_digits_dataset(
            batch_size,
            input_bound,
            sampling=sampling,
            preprocessing=preprocessing,
            seed=seed,
        )
    arrays = _arrays_from(dataset_name_or_path)
    x_train = _convert_colorspace(arrays["x_train"], colorspace)
    x_test = _convert_colorspace(arrays["x_test"], colorspace)
    preprocessing, input_bound = _preprocessing(bound_fct, x_train.shape[1:])
    return from_numpy(
        x_train,
        arrays["y_train"],
        x_test,
        arrays["y_test"],
        batch_size=batch_size,
        input_bound=input_bound,
        preprocessing=preprocessing,
        sampling=sampling,
        seed=seed,
        num_classes=num_classes,
    )
