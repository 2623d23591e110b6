"""Gradient-norm-preserving (GNP) layers: parameter-free, 1-Lipschitz and
||f(x)|| <= ||x||.

`DP_GNP_Factory(layer_cls)` turns a Keras layer class with those properties
into a DP layer that leaves the bounds unchanged. The caller certifies the
properties; the factory refuses the Keras classes known not to have them, the
arguments that break them (when built), and any weight. The layers defined
here have them by construction, and their constructors refuse arguments that
would break them.
"""

from __future__ import annotations

import copy
import functools

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.layers.layer import CallContext

from .._validation import require_positive
from .base import DPLayer, GNPLayer, as_bound, sample_norms

_PACKAGE = "deel_lipdp_ext"


def _keras_layers(*names: str) -> tuple[type, ...]:
    """The `keras.layers` classes of these names that this Keras version has."""
    found = (getattr(keras.layers, n, None) for n in names)
    return tuple(c for c in found if isinstance(c, type))


# Keras classes that are not GNP per-sample maps (nor are their subclasses), and
# why. Layers that are GNP only for some arguments are checked at build time
# (`_CONFIG_CHECKS`).
_NOT_GNP: tuple[tuple[tuple[type, ...], str], ...] = (
    (
        (
            keras.Model,
            *_keras_layers(
                "Wrapper", "Bidirectional", "Pipeline", "RNN", "StackedRNNCells"
            ),
        ),
        "it runs sub-layers (a model, wrapper, pipeline or RNN) that the factory "
        "cannot check; wrap each parameter-free layer separately",
    ),
    (
        _keras_layers("Lambda", "TFSMLayer", "JaxLayer", "TorchModuleWrapper"),
        "it runs arbitrary code; use DP_Lambda, which takes its certified "
        "Lipschitz constant",
    ),
    (
        _keras_layers(
            "BatchNormalization",
            "LayerNormalization",
            "GroupNormalization",
            "UnitNormalization",
            "RMSNormalization",
            "Normalization",
        ),
        "it normalises with statistics of the data (of the batch, which mixes "
        "samples and keeps un-noised moving statistics in the model, or of the "
        "sample itself): not 1-Lipschitz",
    ),
    (
        _keras_layers("Dropout", "GaussianDropout", "AlphaDropout", "GaussianNoise"),
        "dropout and noise layers rescale or shift the sample (Dropout scales the "
        "kept entries by 1/(1-rate)), so per-sample gradients can exceed their "
        "bound",
    ),
    (_keras_layers("MixUp", "CutMix"), "it mixes samples across the batch"),
    (
        _keras_layers("MaxPooling3D"),
        "TensorFlow's 3-D max-pooling gradient sends the output gradient to "
        "every tied entry of a window (sqrt(8) times its norm at an 8-way tie)",
    ),
    (
        _keras_layers("ActivityRegularization"),
        "it adds a loss on the activations whose gradient the DP bounds do not cover",
    ),
    (
        _keras_layers("Masking"),
        "its data-dependent mask changes what later layers compute (pooling then "
        "averages over the unmasked steps only), which is not Lipschitz",
    ),
    (
        _keras_layers(
            "Add",
            "Subtract",
            "Multiply",
            "Average",
            "Maximum",
            "Minimum",
            "Concatenate",
            "Dot",
        ),
        "it merges several inputs; use DP_MergeResidual for residual branches",
    ),
    (
        _keras_layers(
            "Softmax",
            "Attention",
            "AdditiveAttention",
            "MultiHeadAttention",
            "GroupQueryAttention",
        ),
        "it is not 1-Lipschitz with f(0) = 0",
    ),
    (
        _keras_layers("UpSampling1D", "UpSampling2D", "UpSampling3D", "RepeatVector"),
        "it repeats entries, which multiplies the norm",
    ),
    (
        _keras_layers(
            "AdaptiveAveragePooling1D",
            "AdaptiveAveragePooling2D",
            "AdaptiveAveragePooling3D",
            "AdaptiveMaxPooling1D",
            "AdaptiveMaxPooling2D",
            "AdaptiveMaxPooling3D",
        ),
        "its bins overlap or repeat entries unless the input size is a multiple "
        "of the output size, so the norm can grow; use a pooling layer with "
        "strides == pool_size",
    ),
    (
        _keras_layers(
            "CategoryEncoding",
            "Discretization",
            "Hashing",
            "HashedCrossing",
            "IntegerLookup",
            "StringLookup",
            "TextVectorization",
            "MelSpectrogram",
            "STFTSpectrogram",
        ),
        "it encodes, discretises or turns the data into a spectrogram: not a "
        "1-Lipschitz map with f(0) = 0",
    ),
    (
        _keras_layers(
            "AugMix",
            "AutoContrast",
            "CenterCrop",
            "ContrastLimitedAdaptiveHistogramEqualization",
            "Equalization",
            "MaxNumBoundingBoxes",
            "RandAugment",
            "RandomBrightness",
            "RandomColorDegeneration",
            "RandomColorJitter",
            "RandomContrast",
            "RandomCrop",
            "RandomElasticTransform",
            "RandomErasing",
            "RandomGaussianBlur",
            "RandomGrayscale",
            "RandomHue",
            "RandomInvert",
            "RandomPerspective",
            "RandomPosterization",
            "RandomRotation",
            "RandomSaturation",
            "RandomSharpness",
            "RandomShear",
            "RandomTranslation",
            "RandomZoom",
            "Resizing",
            "Solarization",
        ),
        "it resamples, resizes or re-colours pixels (interpolation, contrast, "
        "brightness, histograms), which can raise the norm or move 0; augment in "
        "the input pipeline instead (Cropping2D and RandomFlip are GNP)",
    ),
)

# The activations of `keras.layers.Activation` that are 1-Lipschitz with f(0) = 0
# (hence |f(x)| <= |x|), with their default arguments, and whose TensorFlow
# gradient is at most 1 everywhere: not celu, max(x, 0) + expm1(min(x, 0)),
# whose two branches both take the gradient at x = 0 (derivative 2).
_GNP_ACTIVATIONS = tuple(
    getattr(keras.activations, n)
    for n in (
        "linear",
        "relu",
        "relu6",
        "leaky_relu",
        "elu",
        "tanh",
        "hard_tanh",
        "softsign",
        "soft_shrink",
        "tanh_shrink",
    )
    if hasattr(keras.activations, n)
)


def _class_refusal(layer_cls: type) -> str | None:
    """Why `layer_cls` is known not to be a GNP per-sample map, else None."""
    if issubclass(layer_cls, DPLayer):
        return f"{layer_cls.__name__}: it is already a DP layer, with its own bounds"
    for classes, why in _NOT_GNP:
        for known in classes:
            if issubclass(layer_cls, known):
                kind = "" if layer_cls is known else f" (a {known.__name__})"
                return f"{layer_cls.__name__}{kind}: {why}"
    return None


def _within(values, low: float, high: float) -> bool:
    v = np.asarray(values, dtype=np.float64)
    return bool(np.all((v >= low) & (v <= high)))


def _check_rescaling(layer) -> str | None:
    if _within(np.abs(layer.scale), 0.0, 1.0) and _within(layer.offset, 0.0, 0.0):
        return None
    return (
        "needs |scale| <= 1 and offset == 0 (1-Lipschitz with f(0) = 0). "
        f"Received: scale={layer.scale!r}, offset={layer.offset!r}"
    )


def _check_activation(layer) -> str | None:
    if any(layer.activation is f for f in _GNP_ACTIVATIONS):
        return None
    names = ", ".join(f.__name__ for f in _GNP_ACTIVATIONS)
    return (
        f"needs an activation that is 1-Lipschitz with f(0) = 0 ({names}); use "
        f"DP_Lambda for another one. Received: activation={layer.activation!r}"
    )


def _check_relu(layer) -> str | None:
    if layer.threshold == 0 and _within(layer.negative_slope, 0.0, 1.0):
        return None
    return (
        "needs threshold == 0 and 0 <= negative_slope <= 1. "
        f"Received: threshold={layer.threshold!r}, "
        f"negative_slope={layer.negative_slope!r}"
    )


def _check_leaky_relu(layer) -> str | None:
    if _within(layer.negative_slope, 0.0, 1.0):
        return None
    return (
        "needs 0 <= negative_slope <= 1. "
        f"Received: negative_slope={layer.negative_slope!r}"
    )


def _check_elu(layer) -> str | None:
    if _within(layer.alpha, 0.0, 1.0):
        return None
    return f"needs 0 <= alpha <= 1. Received: alpha={layer.alpha!r}"


def _check_pooling(layer) -> str | None:
    """No entry in two windows (max), or that or no padding (average)."""
    apart = all(s >= p for s, p in zip(layer.strides, layer.pool_size, strict=True))
    average = layer.pool_mode == "average"
    if apart or (average and layer.padding == "valid"):
        return None
    need = "strides >= pool_size" + (" or padding='valid'" if average else "")
    return (
        f"needs {need}: overlapping windows can raise the norm. "
        f"Received: pool_size={layer.pool_size!r}, strides={layer.strides!r}, "
        f"padding={layer.padding!r}"
    )


# Layers that are GNP only for some arguments: checked when the layer is built.
_CONFIG_CHECKS = (
    (_keras_layers("Rescaling"), _check_rescaling),
    (_keras_layers("Activation"), _check_activation),
    (_keras_layers("ReLU"), _check_relu),
    (_keras_layers("LeakyReLU"), _check_leaky_relu),
    (_keras_layers("ELU"), _check_elu),
    (
        _keras_layers(
            "MaxPooling1D",
            "MaxPooling2D",
            "MaxPooling3D",
            "AveragePooling1D",
            "AveragePooling2D",
            "AveragePooling3D",
        ),
        _check_pooling,
    ),
)


def _shape_refusal(layer, layer_cls: type, input_shape) -> str | None:
    """Why the layer's call gives a per-sample shape other than the one it
    declares, else None. A review: `Rescaling(scale=np.ones((16, 1, 1)))`
    broadcast each (1, 8, 2) sample into 16 copies, sqrt(16) times its norm,
    while declaring its input shape (4 times the bound after a pooling)."""
    shape = tuple(input_shape)
    if not shape or not all(d is None or isinstance(d, int) for d in shape):
        return None  # not a single tensor's shape: the config checks apply
    probe = (2, *shape[1:])
    try:
        declared = tuple(layer_cls.compute_output_shape(layer, probe))
    except NotImplementedError:
        return None  # Keras takes the shape its call gives: nothing declared

    try:
        traced = tuple(
            keras.src.backend.compute_output_spec(
                lambda x: layer_cls.call(layer, x),
                keras.KerasTensor(probe, dtype=layer.compute_dtype),
            ).shape
        )
    except Exception as error:  # noqa: BLE001 (any failure: not shown GNP)
        return f"its call could not be traced on inputs of shape {probe} ({error})"
    same = len(traced) == len(declared) and all(
        a == b or a is None or b is None for a, b in zip(traced, declared, strict=True)
    )
    if same:
        return None
    return (
        f"its call maps inputs of shape {probe} to shape {traced}, not the "
        f"declared {declared} (an argument that broadcasts, e.g. a scale with "
        "more axes than a sample, copies each sample: its norm grows)"
    )


def _config_refusal(layer, layer_cls: type) -> str | None:
    """Why this configured layer is not GNP (its class being allowed), else None."""
    if layer.activity_regularizer is not None:
        return (
            "an activity_regularizer adds a loss whose gradient the DP bounds do not "
            f"cover. Received: activity_regularizer={layer.activity_regularizer!r}"
        )
    for classes, check in _CONFIG_CHECKS:
        if any(issubclass(layer_cls, c) for c in classes):
            return check(layer)
    return None


def DP_GNP_Factory(layer_cls: type, name: str | None = None) -> type:
    """Wrap a parameter-free Keras layer class that is 1-Lipschitz and maps 0 to 0.

    Such a layer keeps ||f(x)|| <= ||x|| and ||J^T g|| <= ||g||, so both bound
    passes go through it unchanged. The caller certifies those properties for
    its own layers; Keras classes known not to have them (normalisation,
    dropout and noise, sample mixing, merges, attention, up-sampling, most
    preprocessing, composites; see `_NOT_GNP`) are refused here, and layers
    that have them only for some arguments (Rescaling, Activation, ReLU,
    LeakyReLU, ELU, max and average pooling) are checked when built. Building a
    layer that has any weight, trainable or not, a sub-layer (whose weights
    could come at its first call) or an activity regulariser raises.

    Args:
        layer_cls: a `keras.layers.Layer` subclass with those properties.
        name: class name to register under (default "DP_" + layer_cls name).

    Returns:
        A registered, serialisable subclass of `layer_cls`.

    Raises:
        TypeError: `layer_cls` is not a Keras layer class.
        ValueError: `layer_cls` is known not to be a GNP per-sample map.
    """
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, keras.layers.Layer)):
        raise TypeError(
            "`layer_cls` of DP_GNP_Factory must be a keras.layers.Layer subclass. "
            f"Received: layer_cls={layer_cls!r}"
        )
    refusal = _class_refusal(layer_cls)
    if refusal is not None:
        raise ValueError(
            f"DP_GNP_Factory cannot wrap {refusal}. Received: layer_cls={layer_cls!r}"
        )
    cls_name = name or f"DP_{layer_cls.__name__}"

    def refuse_weights(self) -> None:
        # A sub-layer may create its weights at its first call, after build
        # (a review: a frozen Dense(gain 5) inside, kernel gradients 4.63x
        # their bound): sub-layers are refused, and weights looked for again
        # after the shape check's call (Keras refuses new state once built).
        inner = [layer.name for layer in self._flatten_layers(include_self=False)]
        if inner or self.weights:
            raise ValueError(
                f"{cls_name} '{self.name}' wraps a layer with weights or "
                "sub-layers; a GNP layer must be parameter-free (no weight, "
                "trainable or not, and no layer inside that could create one). "
                f"Received: weights={[v.path for v in self.weights]}, "
                f"sub-layers={inner}"
            )

    def build(self, input_shape):
        refusal = _config_refusal(self, layer_cls)
        if refusal is not None:
            raise ValueError(
                f"{cls_name} '{self.name}' ({layer_cls.__name__}) is not GNP: {refusal}"
            )
        layer_cls.build(self, input_shape)
        refuse_weights(self)
        refusal = _shape_refusal(self, layer_cls, input_shape)
        if refusal is not None:
            raise ValueError(
                f"{cls_name} '{self.name}' ({layer_cls.__name__}) is not GNP: {refusal}"
            )
        refuse_weights(self)

    base_call = layer_cls.call

    @functools.wraps(base_call)  # keeps its signature (Keras reads `training`)
    def call(self, *args, **kwargs):
        # Arguments changed after build (a review: scale set to 10) are
        # checked again whenever the call is traced.
        refusal = _config_refusal(self, layer_cls)
        if refusal is not None:
            raise ValueError(
                f"{cls_name} '{self.name}' ({layer_cls.__name__}) is not GNP: {refusal}"
            )
        outputs = base_call(self, *args, **kwargs)
        if issubclass(layer_cls, keras.layers.Rescaling):
            # Its output has its input's shape unless scale or offset
            # broadcast a sample into copies (a review: built on another
            # shape, on a None axis, or under another image data format, 4
            # times the bound). A reshape to the input's shape then fails,
            # under XLA too (where asserts are dropped).
            inputs = args[0] if args else kwargs["inputs"]
            message = (
                f"{cls_name} '{self.name}' (Rescaling) is not GNP: its scale "
                "or offset broadcasts each sample into copies (the output "
                "shape differs from the input's), so its norm grows"
            )
            if not outputs.shape.is_compatible_with(inputs.shape):
                raise ValueError(
                    f"{message}. Received: input shape {inputs.shape}, output "
                    f"shape {outputs.shape}"
                )
            same = tf.debugging.assert_equal(
                tf.shape(outputs), tf.shape(inputs), message=message
            )
            with tf.control_dependencies([same]):
                outputs = tf.reshape(outputs, tf.shape(inputs))
        return outputs

    cls = type(
        cls_name,
        (layer_cls, GNPLayer),
        {
            "build": build,
            "call": call,
            "__doc__": (
                f"`{layer_cls.__name__}` as a DP layer (GNP: bounds pass through "
                "unchanged)."
            ),
        },
    )
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package=_PACKAGE)(cls)


DP_Flatten = DP_GNP_Factory(keras.layers.Flatten)
DP_Reshape = DP_GNP_Factory(keras.layers.Reshape)
DP_Permute = DP_GNP_Factory(keras.layers.Permute)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_InputLayer(keras.layers.InputLayer, GNPLayer):
    """`keras.layers.InputLayer` usable as the first entry of a DP model."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_ReLU(keras.layers.ReLU, GNPLayer):
    """ReLU (or leaky ReLU with `0 <= negative_slope <= 1`), 1-Lipschitz.

    `threshold` must be 0 (a positive threshold makes ReLU discontinuous) and
    `max_value` may be set (clipping is 1-Lipschitz and keeps 0 at 0).
    """

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, **kwargs):
        _check_dp_relu(threshold, negative_slope)
        super().__init__(max_value=max_value, negative_slope=negative_slope, **kwargs)

    def call(self, inputs):
        # Checked again at every trace: set after construction, a slope of
        # 10 made the layer 10-Lipschitz (a review).
        _check_dp_relu(self.threshold, self.negative_slope)
        return super().call(inputs)


def _check_dp_relu(threshold, negative_slope) -> None:
    if threshold != 0.0:
        raise ValueError(
            "DP_ReLU needs threshold=0 to be Lipschitz. "
            f"Received: threshold={threshold!r}"
        )
    if not 0.0 <= float(negative_slope) <= 1.0:
        raise ValueError(
            "DP_ReLU needs 0 <= negative_slope <= 1 to be 1-Lipschitz. "
            f"Received: negative_slope={negative_slope!r}"
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MaxPool2D(keras.layers.MaxPooling2D, GNPLayer):
    """Max pooling with non-overlapping windows (`strides == pool_size`, enforced).

    Each input lies in one window, and max is 1-Lipschitz per window, so the
    layer is GNP.
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", **kwargs):
        pool = (
            (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        )
        stride = (
            pool
            if strides is None
            else ((strides, strides) if isinstance(strides, int) else tuple(strides))
        )
        _check_dp_max_pool(pool, stride)
        super().__init__(pool_size=pool, strides=pool, padding=padding, **kwargs)

    def call(self, inputs):
        # Checked again at every trace: strides set to 1 after construction
        # made windows overlap, 2 times the bound on a spike (a review).
        _check_dp_max_pool(self.pool_size, self.strides)
        return super().call(inputs)


def _check_dp_max_pool(pool_size, strides) -> None:
    if tuple(strides) != tuple(pool_size):
        raise ValueError(
            "DP_MaxPool2D needs strides == pool_size (non-overlapping windows). "
            f"Received: pool_size={pool_size!r}, strides={strides!r}"
        )


def _max_min(inputs: tf.Tensor) -> tf.Tensor:
    """Each pair of adjacent channels (2k, 2k + 1) in ascending order, with a
    gradient that is a permutation of the output gradient, ties included.

    `concat([minimum(a, b), maximum(a, b)])` is not: at a tie TensorFlow
    sends both output gradients to `a`, so the input gradient could be
    sqrt(2) times the output gradient (a first-layer kernel gradient was
    found sqrt(2) above its bound), and its slices' gradients are slow when
    the batch dimension is unknown. Here each pair is kept or swapped (a
    gather: exact copies) on one decision, ``a <= b``, which both entries
    of the pair evaluate on the same two values (NaN included); the
    comparison has no gradient.
    """
    channels = inputs.shape[-1]
    swap = np.arange(channels).reshape(-1, 2)[:, ::-1].reshape(-1)
    swapped = tf.gather(inputs, swap, axis=-1)
    first = tf.constant(np.arange(channels) % 2 == 0)  # entry a of its pair
    in_order = (first & (inputs <= swapped)) | (~first & (swapped <= inputs))
    return tf.where(in_order, inputs, swapped)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_GroupSort(keras.layers.Layer, GNPLayer):
    """Sorts the last axis in groups of `n` (GroupSort activation).

    A permutation of its input within each group: norm preserving and
    1-Lipschitz. `n=2` ("MaxMin") keeps or swaps each pair instead of
    sorting (`_max_min`); either way the gradient is a permutation of the
    output gradient, ties included.

    Args:
        n: group size; must divide the size of the last axis. None (the
            default, as in deel-lip and deel-lipdp) sorts the whole last axis
            ("FullSort").

    Shapes: unchanged.

    Example:
        >>> maxmin = DP_GroupSort(2)
        >>> full_sort = DP_GroupSort()

    Reference: Anil, Lucas, Grosse, "Sorting out Lipschitz function
    approximation", ICML 2019.
    """

    def __init__(self, n: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(
                f"`n` of DP_GroupSort must be None or an int >= 1. Received: n={n!r}"
            )
        self.n = n

    def build(self, input_shape):
        size = input_shape[-1]
        if size is None or (self.n is not None and size % self.n):
            raise ValueError(
                f"DP_GroupSort '{self.name}': group size n={self.n} must divide the "
                f"last axis. Received input shape: {input_shape}"
            )
        self.group_size = size if self.n is None else self.n

    def call(self, inputs):
        group = self.group_size
        if group == 1:
            return inputs
        if group == 2:
            return _max_min(inputs)
        shape = tf.shape(inputs)
        grouped = tf.reshape(inputs, tf.concat([shape[:-1], [-1, group]], 0))
        out = tf.sort(grouped, axis=-1)  # gradient: scattered by a permutation
        return tf.reshape(out, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "n": self.n}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_LayerCentering(keras.layers.Layer, GNPLayer):
    """Subtracts the mean over the spatial axes, per channel.

    For (batch, H, W, C) the mean is over H and W; for (batch, F) over F.
    Centering is an orthogonal projection: norm non-increasing, 1-Lipschitz.
    """

    def call(self, inputs):
        axes = list(range(1, len(inputs.shape) - 1)) or [1]
        return inputs - tf.reduce_mean(inputs, axis=axes, keepdims=True)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_Lambda(keras.layers.Lambda, DPLayer):
    """A user function with a Lipschitz constant the USER certifies.

    Bounds: `||f(x)|| <= lipschitz * ||x||` (so f must map 0 to 0) and
    `||J^T g|| <= lipschitz * ||g||`. The function must not have parameters.
    Saving a lambda needs `safe_mode=False` on load (Keras rule).

    The function must stay the certified one: its `function`, `lipschitz`
    and `arguments` cannot change after construction, and a function that
    reads variables is refused at build. Python state it reads (a global, a
    mutable closure, a `py_function`) cannot be checked: changed later, the
    bounds are wrong (a review measured 50 times).

    Args:
        function: the function, applied per sample (no mixing across the batch).
        lipschitz: its L2 Lipschitz constant.
    """

    def __init__(self, function, lipschitz: float = 1.0, **kwargs):
        super().__init__(function, **kwargs)
        self.lipschitz = require_positive("lipschitz", lipschitz, "DP_Lambda")
        if any(
            isinstance(value, tf.Variable | keras.Variable)
            for value in keras.tree.flatten(self.arguments)
        ):
            raise ValueError(
                f"DP_Lambda '{self.name}': `arguments` must be constants: a "
                "variable's value can change after the Lipschitz constant is "
                "certified. Received a variable in arguments."
            )
        self._certified = (
            self.function,
            self.lipschitz,
            copy.deepcopy(self.arguments),
        )

    def _check_certified(self) -> None:
        """The function and constant of construction, which the bounds and
        the spot check are for.

        Raises:
            ValueError: either changed since (a lipschitz lowered from 1 to
                0.01 after build left a kernel gradient 100 times its bound;
                a function replaced by 50 x, 50 times: a review).
        """
        function, lipschitz, arguments = self._certified
        if (
            self.function is not function
            or self.lipschitz != lipschitz
            or not _same_arguments(self.arguments, arguments)
        ):
            raise ValueError(
                f"DP_Lambda '{self.name}': `function`, `lipschitz` and `arguments` "
                "cannot change after construction (the bounds are computed for "
                "them); build a new layer instead."
            )

    def call(self, inputs, mask=None, training=None):
        self._check_certified()
        return super().call(inputs, mask=mask, training=training)

    def build(self, input_shape):
        """Spot-check the certificate where it is cheap (static shapes): f(0)
        must be 0, and random pairs must respect the Lipschitz constant. A
        spot check cannot prove the certificate; it catches wrong ones."""
        self._check_certified()
        super().build(input_shape)

        def function(x):  # as `call` applies it (the spot check ignored
            return self.function(x, **self.arguments)  # `arguments`)

        def in_training(x):
            # Keras layers the function calls act as in a train step (a
            # review: a captured Dropout, inactive here, scaled kept units by
            # 2 in training: 1.67x the bound); their random state is then
            # read, and refused as a variable. A call context of its own,
            # so the one of a model being built keeps its flags.
            outer = global_state.get_global_attribute("current_call_ctx")
            context = CallContext(entry_layer=self)
            context.set_value("training", True)
            global_state.set_global_attribute("current_call_ctx", context)
            try:
                return function(x)
            finally:
                global_state.set_global_attribute("current_call_ctx", outer)

        spec = tf.TensorSpec((None, *input_shape[1:]), self.compute_dtype)
        traced = tf.function(in_training).get_concrete_function(spec)
        if traced.variables:  # (v.assign(50) after build: 50 times the bound)
            raise ValueError(
                f"DP_Lambda '{self.name}': the function reads variables "
                f"({', '.join(v.name for v in traced.variables)}) when "
                "training, whose values can change after its Lipschitz "
                "constant is certified (or a Keras layer's random state: "
                "dropout and noise are not Lipschitz maps); pass constants "
                "instead."
            )
        if None in tuple(input_shape[1:]):
            return
        shape = (8, *input_shape[1:])
        zero = function(tf.zeros((1, *input_shape[1:])))
        if float(tf.reduce_max(tf.abs(zero))) > 0.0:
            raise ValueError(
                f"DP_Lambda '{self.name}': the function must map 0 to 0 for the "
                "bound ||f(x)|| <= lipschitz * ||x|| to hold. Received: "
                f"max |f(0)| = {float(tf.reduce_max(tf.abs(zero)))}"
            )
        a = tf.random.stateless_normal(shape, seed=(0, 1))
        b = a + 0.1 * tf.random.stateless_normal(shape, seed=(0, 2))
        ratio = sample_norms(function(a) - function(b)) / sample_norms(a - b)
        if float(tf.reduce_max(ratio)) > self.lipschitz * (1.0 + 1e-4):
            raise ValueError(
                f"DP_Lambda '{self.name}': the function is not {self.lipschitz}-"
                "Lipschitz: a random pair of inputs is stretched by "
                f"{float(tf.reduce_max(ratio)):.4g}. Received: "
                f"lipschitz={self.lipschitz}"
            )

    def propagate_inputs(self, input_bound):
        self._check_certified()
        return as_bound(self.lipschitz) * input_bound

    def backpropagate_inputs(self, input_bound, gradient_bound):
        self._check_certified()
        return as_bound(self.lipschitz) * gradient_bound

    def get_config(self):
        return {**super().get_config(), "lipschitz": self.lipschitz}


def _same_arguments(now, certified) -> bool:
    """Whether a DP_Lambda's `arguments` (a dict of values, arrays included)
    still equal the copy taken at construction (an argument scaling the
    function by 50, set in place, left a bound 50 times too small: a
    review)."""
    try:
        keras.tree.assert_same_structure(now, certified)
    except (TypeError, ValueError):
        return False
    return all(
        a is b or bool(np.array_equal(np.asarray(a), np.asarray(b)))
        for a, b in zip(
            keras.tree.flatten(now), keras.tree.flatten(certified), strict=True
        )
    )
