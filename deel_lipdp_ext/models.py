"""Preset DP models, in the style of `keras.applications`, and their recipes.

Each preset function returns an UNCOMPILED `DPSequential` for an input shape
and a class count. `recipe(preset, dataset_size)` gives the settings measured
to work with it: the preset's arguments, the batch size, epochs, loss
temperature, optimizer and learning-rate schedule, and the noise strategy.
`benchmarks/accuracy.py` measures them; docs/index.md ("Presets and recipes")
lists the figures.

The recommended preset is `scattering_mlp`: a Lipschitz MLP (or, on small
datasets, a linear layer) on fixed scattering features of the images
(`features.ScatteringFeatures`, computed per sample before the DP model, so
the bound is that of any input). Its recipe carries the feature map
(`Recipe.feature_map()`); the data loaders take it as `feature_map=`.

Design choices (docs/design.md has the bounds):
* Convolutions have `kernel_size == strides` ("patch" convolutions): each
  pixel is in one patch, so the kernel-gradient bound has no sqrt(kh kw)
  factor, and the Björck-orthogonal reshaped kernel makes the layer
  norm-preserving when it has enough output channels.
* GroupSort(2) activations and orthogonal layers keep gradient norms.
* A `DP_ClipGradient` on the logits ("loss-gradient clipping"): the bound of
  every layer scales with the clip value instead of the loss's Lipschitz
  constant; samples with larger loss gradients are clipped, as in DP-SGD, at
  the cost of one ordinary backward pass.
* Per-layer noise with a larger `nm_coef` on the convolutions: a convolution's
  kernel gradient sums one term per patch, and these partly cancel, so a
  typical sample uses a small part of its bound (mean ratio ~0.1 on the
  digits, `sensitivity.gradient_norm_check`), while the dense head uses about
  half of its own. Giving the convolutions a larger share of the noise moves
  the privacy budget to the layers whose gradients fill their bounds. Any
  `nm_coef` is sound: the accounting composes what each layer gets.

Example:
    >>> from deel_lipdp_ext.data import load_digits_dataset
    >>> settings = recipe("scattering_mlp", 1437)
    >>> train, test, meta = load_digits_dataset(
    ...     settings.batch_size, feature_map=settings.feature_map())
    >>> model = settings.build(meta, settings.dp_parameters(delta=1e-5))
    >>> model.compile(**settings.compile_arguments(meta))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keras

from . import layers as L
from .data import DatasetMetadata
from .losses import DP_TauCategoricalCrossentropy
from .model import DPSequential
from .privacy_plan import DPParameters

__all__ = [
    "Recipe",
    "scattering_mlp",
    "lipschitz_mlp",
    "small_cnn",
    "cifar_cnn",
    "recipe",
    "PRESETS",
]


def _model(
    name: str,
    body: list,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    input_bound: float,
    loss_gradient_clip: float | None,
    augmentation: keras.layers.Layer | None,
    augmentation_multiplicity: int,
) -> DPSequential:
    head = [L.DP_QuickSpectralDense(num_classes)]
    if loss_gradient_clip is not None:
        head.append(L.DP_ClipGradient(loss_gradient_clip))
    return DPSequential(
        [
            keras.Input(tuple(input_shape)),
            L.DP_BoundedInput(upper_bound=input_bound),
            *body,
            *head,
        ],
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
        augmentation=augmentation,
        augmentation_multiplicity=augmentation_multiplicity,
        name=name,
    )


def _dense_block(hidden: Sequence[int]) -> list:
    body = []
    for units in hidden:
        body += [L.DP_SpectralDense(units), L.DP_GroupSort(2)]
    return body


def lipschitz_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    hidden: Sequence[int] = (128,),
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
    augmentation: keras.layers.Layer | None = None,
    augmentation_multiplicity: int = 1,
    name: str = "lipschitz_mlp",
) -> DPSequential:
    """Flatten, orthogonal dense layers with GroupSort(2), a dense head.

    Args:
        input_shape: one sample's shape.
        num_classes: outputs.
        dp_parameters: `DPParameters`, as for `DPSequential`.
        dataset_metadata: `DatasetMetadata`, as for `DPSequential`.
        hidden: widths of the hidden layers (even numbers).
        input_bound: the L2 bound of one sample (`DP_BoundedInput`).
        loss_gradient_clip: clip value of the loss gradient (None: no clip).
        augmentation: a per-sample augmentation layer (`DPSequential`).
        augmentation_multiplicity: K, the augmented copies of each sample
            (its loss is the mean over them).
        name: the model's name.
    """
    return _model(
        name,
        [L.DP_Flatten(), *_dense_block(hidden)],
        input_shape,
        num_classes,
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
        input_bound=input_bound,
        loss_gradient_clip=loss_gradient_clip,
        augmentation=augmentation,
        augmentation_multiplicity=augmentation_multiplicity,
    )


def small_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    channels: Sequence[int] = (16, 64),
    hidden: Sequence[int] = (128,),
    conv_nm_coef: float = 3.0,
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
    augmentation: keras.layers.Layer | None = None,
    augmentation_multiplicity: int = 1,
) -> DPSequential:
    """Patch convolutions (2x2, stride 2) with GroupSort(2), orthogonal dense
    layers, a dense head: for 28x28 (MNIST) or 8x8 (digits) grey images.

    Args:
        channels: output channels of each 2x2/2 convolution (each halves H, W).
        hidden: widths of the dense layers after the convolutions.
        conv_nm_coef: the convolutions' `nm_coef` (their share of the noise
            under the "per-layer" strategy; ignored under "global").

    The other arguments are those of `lipschitz_mlp`.
    """
    body = []
    for filters in channels:
        body += [
            L.DP_SpectralConv2D(
                filters, 2, strides=2, padding="valid", nm_coef=conv_nm_coef
            ),
            L.DP_GroupSort(2),
        ]
    body += [L.DP_Flatten(), *_dense_block(hidden)]
    return _model(
        "small_cnn",
        body,
        input_shape,
        num_classes,
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
        input_bound=input_bound,
        loss_gradient_clip=loss_gradient_clip,
        augmentation=augmentation,
        augmentation_multiplicity=augmentation_multiplicity,
    )


def cifar_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    dp_parameters: DPParameters,
    dataset_metadata: DatasetMetadata,
    channels: Sequence[int] = (32, 64, 128),
    conv_nm_coef: float = 3.0,
    input_bound: float = 1.0,
    loss_gradient_clip: float | None = 0.3,
    augmentation: keras.layers.Layer | None = None,
    augmentation_multiplicity: int = 1,
) -> DPSequential:
    """For 32x32x3 images: patch convolutions (2x2, stride 2) with GroupSort,
    each followed by a 3x3 convolution whose operator norm is certified for its
    input size, then a global L2-norm pooling and a dense head.

    Args: as `small_cnn`.
    """
    body = []
    for filters in channels:
        body += [
            L.DP_SpectralConv2D(
                filters, 2, strides=2, padding="valid", nm_coef=conv_nm_coef
            ),
            L.DP_GroupSort(2),
            L.DP_QuickSpectralConv2D(filters, 3, padding="same", nm_coef=conv_nm_coef),
            L.DP_GroupSort(2),
        ]
    body.append(L.DP_ScaledGlobalL2NormPooling2D())
    return _model(
        "cifar_cnn",
        body,
        input_shape,
        num_classes,
        dp_parameters=dp_parameters,
        dataset_metadata=dataset_metadata,
        input_bound=input_bound,
        loss_gradient_clip=loss_gradient_clip,
        augmentation=augmentation,
        augmentation_multiplicity=augmentation_multiplicity,
    )


def scattering_mlp(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (256,),
    **arguments,
) -> DPSequential:
    """`lipschitz_mlp` for scattering features: its input shape is that of
    the FEATURES (`features.ScatteringFeatures`, e.g. (7, 7, 81) for 28x28
    images with J = 2), which the data loaders compute with
    `feature_map=recipe("scattering_mlp", n).feature_map()`.

    Args:
        input_shape: one sample's feature shape.
        num_classes: outputs.
        hidden: widths of the hidden layers (even numbers; () for a linear
            classifier).
        **arguments: the other arguments of `lipschitz_mlp` (`dp_parameters`,
            `dataset_metadata`, `input_bound`, `loss_gradient_clip`, ...).
    """
    return lipschitz_mlp(
        input_shape, num_classes, hidden=hidden, name="scattering_mlp", **arguments
    )


PRESETS = {
    "scattering_mlp": scattering_mlp,
    "lipschitz_mlp": lipschitz_mlp,
    "small_cnn": small_cnn,
    "cifar_cnn": cifar_cnn,
}


@dataclass(frozen=True)
class Recipe:
    """A preset and the settings to train it.

    Args:
        preset: a `PRESETS` name.
        batch_size: expected batch size B (Poisson sampling).
        epochs: epochs to plan the noise for.
        learning_rate: Adam's initial learning rate, decayed by cosine to 0
            over the planned steps.
        tau: temperature of `DP_TauCategoricalCrossentropy`.
        model_arguments: keyword arguments of the preset function.
        noisify_strategy: `DPParameters.noisify_strategy`.
        accountant: "pld" or "rdp", for calibration and `DP_Accountant`.
        features: arguments of `features.ScatteringFeatures` (J, L, groups)
            applied to the images before the model, or None (raw images).
    """

    preset: str
    batch_size: int
    epochs: int
    learning_rate: float
    tau: float
    model_arguments: Mapping = field(default_factory=dict)
    noisify_strategy: str = "per-layer"
    accountant: str = "pld"
    features: Mapping | None = None

    def feature_map(self):
        """The fixed per-sample feature map to give the data loader
        (`feature_map=`), or None."""
        if self.features is None:
            return None
        from .features import ScatteringFeatures

        return ScatteringFeatures(**self.features)

    def dp_parameters(
        self, delta: float, noise_multiplier: float = 1.0, seed: int | None = None
    ) -> DPParameters:
        """`DPParameters` with this recipe's strategy (calibrate sigma after
        building: `model.privacy_plan.calibrate_noise_multiplier`)."""
        return DPParameters(
            noise_multiplier, delta, noisify_strategy=self.noisify_strategy, seed=seed
        )

    def build(
        self,
        dataset_metadata: DatasetMetadata,
        dp_parameters: DPParameters,
        **overrides,
    ) -> DPSequential:
        """The preset for the metadata's input shape and classes (uncompiled);
        `overrides` replace or add preset arguments."""
        return PRESETS[self.preset](
            dataset_metadata.input_shape,
            dataset_metadata.num_classes,
            dp_parameters=dp_parameters,
            dataset_metadata=dataset_metadata,
            **{**self.model_arguments, **overrides},
        )

    def compile_arguments(self, dataset_metadata: DatasetMetadata) -> dict:
        """`optimizer`, `loss` and `metrics` for `model.compile`."""
        steps = self.epochs * dataset_metadata.nb_steps_per_epoch
        schedule = keras.optimizers.schedules.CosineDecay(self.learning_rate, steps)
        return {
            "optimizer": keras.optimizers.Adam(schedule),
            "loss": DP_TauCategoricalCrossentropy(self.tau),
            "metrics": ["accuracy"],
        }


#: Datasets with fewer samples than this get the small-data recipe.
SMALL_DATASET = 10_000

# (large-data recipe, small-data recipe) per preset; the batch size of the
# small-data one is capped at the dataset size.
_RECIPES = {
    "scattering_mlp": (
        Recipe(
            "scattering_mlp",
            4096,
            30,
            3e-3,
            64.0,
            {"hidden": (256,)},
            features={"J": 2, "L": 8, "groups": 9},
        ),
        Recipe(
            "scattering_mlp",
            512,
            30,
            2e-2,
            64.0,
            {"hidden": (), "loss_gradient_clip": 0.05},
            features={"J": 1, "L": 8, "groups": 3},
        ),
    ),
    "lipschitz_mlp": (
        Recipe("lipschitz_mlp", 4096, 30, 3e-3, 64.0),
        Recipe(
            "lipschitz_mlp",
            512,
            30,
            2e-2,
            64.0,
            {"hidden": (), "loss_gradient_clip": 0.05},
        ),
    ),
    "small_cnn": (
        Recipe("small_cnn", 4096, 30, 3e-3, 64.0),
        Recipe(
            "small_cnn",
            512,
            30,
            2e-2,
            64.0,
            {
                "channels": (8,),
                "hidden": (),
                "conv_nm_coef": 4.0,
                "loss_gradient_clip": 0.05,
            },
        ),
    ),
    "cifar_cnn": (
        Recipe("cifar_cnn", 4096, 30, 3e-3, 32.0),
        Recipe("cifar_cnn", 512, 30, 1e-2, 32.0, {"loss_gradient_clip": 0.05}),
    ),
}


def recipe(preset: str = "scattering_mlp", dataset_size: int | None = None) -> Recipe:
    """The recommended settings of a preset (`PRESETS` names): the large-data
    recipe, or for `dataset_size` < `SMALL_DATASET` (e.g. the 1437 training
    digits) a smaller model with smaller batches.

    Raises:
        ValueError: an unknown preset name, or a dataset_size below 1.
    """
    if preset not in _RECIPES:
        raise ValueError(
            f"`preset` must be one of {sorted(_RECIPES)}. Received: preset={preset!r}"
        )
    if dataset_size is not None and dataset_size < 1:
        raise ValueError(f"`dataset_size` must be >= 1. Received: {dataset_size!r}")
    large, small = _RECIPES[preset]
    if dataset_size is None or dataset_size >= SMALL_DATASET:
        return large
    return dataclasses.replace(small, batch_size=min(small.batch_size, dataset_size))
