"""Preset DP models, in the style of `keras.applications`, and their recipes.

Each preset function returns an UNCOMPILED `DPSequential` for an input shape
and a class count; `recipe(preset, ...)` gives the training settings measured
to work with it (batch size, epochs, loss and temperature, optimizer and
learning-rate schedule, loss-gradient clipping). `benchmarks/accuracy.py`
measures them; docs/index.md ("Presets and recipes") lists the figures.

Design choices (docs/design.md has the bounds):
* Convolutions have `kernel_size == strides` ("patch" convolutions): each
  pixel is in one patch, so the kernel-gradient bound has no sqrt(kh kw)
  factor and is tight, and the Björck-orthogonal reshaped kernel makes the
  layer norm-preserving when it has enough output channels.
* GroupSort(2) activations and orthogonal layers keep gradient norms, so every
  layer's per-sample gradient bound is reached by real samples: the noise is
  not wasted on slack.
* Few parameters: the noise norm grows with sqrt(#parameters).
* A `DP_ClipGradient` on the logits ("loss-gradient clipping"): the bound of
  every layer scales with the clip value instead of the loss's Lipschitz
  constant; samples with larger loss gradients are clipped, as in DP-SGD, at
  the cost of one ordinary backward pass.

Example:
    >>> model = small_cnn((28, 28, 1), 10, dp_parameters=params,
    ...                   dataset_metadata=meta)
    >>> settings = recipe("small_cnn", meta)
    >>> model.compile(**settings.compile_arguments(meta))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras

from . import layers as L
from .data import DatasetMetadata
from .losses import DP_TauCategoricalCrossentropy
from .model import DPSequential
from .privacy_plan import DPParameters

__all__ = ["Recipe", "lipschitz_mlp", "small_cnn", "cifar_cnn", "recipe", "PRESETS"]


def _head(num_classes: int, loss_gradient_clip: float | None) -> list:
    head = [L.DP_QuickSpectralDense(num_classes)]
    if loss_gradient_clip is not None:
        head.append(L.DP_ClipGradient(loss_gradient_clip))
    return head


def _model(
    body: list,
    input_shape,
    num_classes: int,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    input_bound: float,
    loss_gradient_clip: float | None,
    name: str,
) -> DPSequential:
    return DPSequential(
        [
            keras.Input(tuple(input_shape)),
            L.DP_BoundedInput(upper_bound=input_bound),
            *body,
            *_head(num_classes, loss_gradient_clip),
        ],
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
        name=name,
    )


def lipschitz_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    hidden: Sequence[int] = (128,),
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
) -> DPSequential:
    """Flatten, orthogonal dense layers with GroupSort(2), a dense head.

    Args:
        input_shape: one sample's shape.
        num_classes: outputs.
        dp_parameters, dataset_metadata: as for `DPSequential`.
        hidden: widths of the hidden layers (even numbers).
        input_bound: the L2 bound of one sample (`DP_BoundedInput`).
        loss_gradient_clip: clip value of the loss gradient (None: no clip).
    """
    body = [L.DP_Flatten()]
    for units in hidden:
        body += [L.DP_SpectralDense(units), L.DP_GroupSort(2)]
    return _model(
        body,
        input_shape,
        num_classes,
        dp_parameters,
        dataset_metadata,
        input_bound,
        loss_gradient_clip,
        "lipschitz_mlp",
    )


def small_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    channels: Sequence[int] = (16, 32),
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
) -> DPSequential:
    """Patch convolutions (2x2, stride 2) with GroupSort(2), then a dense head:
    for 28x28 (MNIST) or 8x8 (digits) grey images.

    Args:
        channels: output channels of each 2x2/2 convolution (each halves H, W).
        others: as `lipschitz_mlp`.
    """
    body = []
    for filters in channels:
        body += [
            L.DP_SpectralConv2D(filters, 2, strides=2, padding="valid"),
            L.DP_GroupSort(2),
        ]
    body.append(L.DP_Flatten())
    return _model(
        body,
        input_shape,
        num_classes,
        dp_parameters,
        dataset_metadata,
        input_bound,
        loss_gradient_clip,
        "small_cnn",
    )


def cifar_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    channels: Sequence[int] = (32, 64, 128),
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
) -> DPSequential:
    """For 32x32x3 images: patch convolutions (2x2, stride 2) with GroupSort,
    each followed by a 3x3 convolution whose operator norm is certified for its
    input size, then a global L2-norm pooling and a dense head.

    Args: as `small_cnn`.
    """
    body = []
    for filters in channels:
        body += [
            L.DP_SpectralConv2D(filters, 2, strides=2, padding="valid"),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralConv2D(filters, 3, padding="same"),
            L.DP_GroupSort(2),
        ]
    body.append(L.DP_ScaledGlobalL2NormPooling2D())
    return _model(
        body,
        input_shape,
        num_classes,
        dp_parameters,
        dataset_metadata,
        input_bound,
        loss_gradient_clip,
        "cifar_cnn",
    )


PRESETS = {
    "lipschitz_mlp": lipschitz_mlp,
    "small_cnn": small_cnn,
    "cifar_cnn": cifar_cnn,
}


@dataclass(frozen=True)
class Recipe:
    """Training settings for a preset.

    Args:
        batch_size: expected batch size B (Poisson sampling).
        epochs: epochs to plan the noise for.
        learning_rate: Adam's initial learning rate, decayed by cosine to 0
            over the planned steps.
        tau: temperature of `DP_TauCategoricalCrossentropy`.
    """

    batch_size: int
    epochs: int
    learning_rate: float
    tau: float

    def compile_arguments(self, dataset_metadata: DatasetMetadata) -> dict:
        """`optimizer`, `loss` and `metrics` for `model.compile`."""
        steps = self.epochs * dataset_metadata.nb_steps_per_epoch
        schedule = keras.optimizers.schedules.CosineDecay(self.learning_rate, steps)
        return {
            "optimizer": keras.optimizers.Adam(schedule),
            "loss": DP_TauCategoricalCrossentropy(self.tau),
            "metrics": ["accuracy"],
        }


_RECIPES = {
    "lipschitz_mlp": Recipe(batch_size=4096, epochs=30, learning_rate=3e-3, tau=64.0),
    "small_cnn": Recipe(batch_size=4096, epochs=30, learning_rate=3e-3, tau=64.0),
    "cifar_cnn": Recipe(batch_size=4096, epochs=30, learning_rate=3e-3, tau=32.0),
}


def recipe(preset: str, dataset_size: int | None = None) -> Recipe:
    """The recommended settings of a preset (`PRESETS` names). For a small
    dataset (`dataset_size` < 10000, e.g. the 1437 digits), full batches.

    Raises:
        ValueError: an unknown preset name.
    """
    if preset not in _RECIPES:
        raise ValueError(
            f"`preset` must be one of {sorted(_RECIPES)}. Received: preset={preset!r}"
        )
    found = _RECIPES[preset]
    if dataset_size is not None and dataset_size < 10_000:
        return Recipe(dataset_size, found.epochs, found.learning_rate, found.tau)
    return found
