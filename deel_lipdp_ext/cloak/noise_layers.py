"""Stained-Glass-style noise layers: a learned, seeded stochastic input transform.

Reference: Protopia AI's ``stainedglass_core`` noise layers (closed source; the
API follows its public docs) and the Cloak algorithm they cite (Mireshghallah
et al., "Not All Features Are Equal", WWW 2021). For every input feature i

    sigma_i = s_min + (s_max - s_min) (1 + tanh(shallow * rho_i)) / 2
    y = mask * x + mu + sigma * eps,    eps ~ N(0, I) (seeded)

with learned means ``locs`` (mu) and pre-activation stds ``rhos`` (rho). With
``percent_to_mask = p`` the floor(p * n) features of highest sigma are masked
(they carry mean plus noise only). Departure from the docs' wording "mask = sigma
< quantile(sigma, 1 - p)": masking is by rank (ties broken by flat index), so at
initialisation, when every sigma is equal, exactly floor(p * n) features are
masked instead of all of them.

Weight decay shrinks ``locs`` and ``rhos`` towards 0 (sigma towards the middle
of its range): train them without weight decay.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

_PACKAGE = "deel_lipdp_ext"


@dataclasses.dataclass
class ForwardCapture:
    """What one forward pass of a noise layer produced, for the cloak losses.

    ``trace`` identifies the graph (or eager mode) the tensors belong to, so a
    loss can never read tensors left by another trace of ``tf.function``.
    """

    trace: Any
    inputs: tf.Tensor
    outputs: tf.Tensor
    std: tf.Tensor
    mask: tf.Tensor | None
    super_batched: bool = False


def current_trace() -> Any:
    """The graph being traced, or the string ``"eager"``."""
    if tf.executing_eagerly():
        return "eager"
    return tf.compat.v1.get_default_graph()


class NoiseLayer(keras.layers.Layer):
    """Abstract noise layer: ``y = mask * x + mean + std * eps``.

    Subclasses implement ``mean_estimator(x)`` (the mean, broadcastable to one
    sample's shape) and ``std_estimator(x)`` (the std, or a pair ``(std, mask)``
    whose mask is 1 for kept features and 0 for masked ones). Both must return
    tensors of one sample's shape ``x.shape[1:]``.

    Args:
        value_range: ``(low, high)`` to clip the output to; ``None`` for either
            side leaves it unbounded. ``None`` (default): no clipping.
        seed: seed of the layer's noise (int, or None for a random one). The
            noise of the k-th call is drawn from ``(seed, k)``; k is saved with
            the layer.

    Call arguments:
        inputs: ``(batch, *features)`` tensor.
        noise_mask: optional boolean tensor broadcastable to ``inputs``; where
            False the input passes through untransformed.

    The std, mean and mask of the most recent call are readable as ``std``,
    ``mean`` and ``mask`` (tensors of one sample's shape; ``mask`` is None for a
    layer without one).
    """

    def __init__(
        self,
        value_range: Sequence[float | None] | None = None,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.value_range = _check_value_range(value_range, type(self).__name__)
        self.seed = seed
        # Noise is drawn statelessly from (seed, number of calls): the call count
        # is a saved weight, so a loaded layer continues its noise stream instead
        # of replaying draws it already used.
        self._noise_seed = random.randrange(2**31) if seed is None else int(seed)
        self.last_capture: ForwardCapture | None = None

    def mean_estimator(self, inputs: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define mean_estimator")

    def std_estimator(self, inputs: tf.Tensor) -> tf.Tensor | tuple:
        raise NotImplementedError(f"{type(self).__name__} must define std_estimator")

    @property
    def has_mask(self) -> bool:
        """Whether ``std_estimator`` returns a mask."""
        return False

    def _build_records(self, feature_shape: tuple[int, ...]) -> None:
        """Creates the non-trainable records of the last call's std, mean, mask."""

        def record(name):
            return self.add_weight(
                name=name, shape=feature_shape, initializer="zeros", trainable=False
            )

        self._last_std = record("last_std")
        self._last_mean = record("last_mean")
        self._last_mask = record("last_mask") if self.has_mask else None
        self._calls = self.add_weight(
            name="calls", shape=(), initializer="zeros", dtype="int64", trainable=False
        )

    def call(self, inputs, noise_mask=None):
        mean = self.mean_estimator(inputs)
        estimate = self.std_estimator(inputs)
        std, mask = estimate if isinstance(estimate, tuple) else (estimate, None)
        kept = inputs if mask is None else inputs * mask
        seed = tf.stack([tf.constant(self._noise_seed, tf.int64), self._calls.value])
        noise = tf.random.stateless_normal(tf.shape(inputs), seed, dtype=inputs.dtype)
        outputs = kept + mean + std * noise
        if noise_mask is not None:
            outputs = tf.where(tf.cast(noise_mask, tf.bool), outputs, inputs)
        if self.value_range is not None:
            low, high = self.value_range
            if low is not None:
                outputs = tf.maximum(outputs, low)
            if high is not None:
                outputs = tf.minimum(outputs, high)
        self._last_std.assign(std)
        self._last_mean.assign(mean)
        if mask is not None:
            self._last_mask.assign(mask)
        self._calls.assign_add(1)
        self.last_capture = ForwardCapture(current_trace(), inputs, outputs, std, mask)
        return outputs

    def capture_for_loss(self) -> ForwardCapture:
        """The last forward pass's tensors, checked to belong to the current trace.

        Raises:
            RuntimeError: if the layer has not run in this trace (eager mode or
                the ``tf.function`` being traced) before the loss.
        """
        capture = self.last_capture
        if capture is None or capture.trace is not current_trace():
            raise RuntimeError(
                f"The noise layer {self.name!r} has not run in this trace: call the "
                "NoisyModel on the batch before evaluating a cloak loss on it."
            )
        return capture

    def _record(self, name: str):
        if not self.built or int(self._calls.numpy()) == 0:
            raise RuntimeError(
                f"The noise layer {self.name!r} has not been called yet: its last "
                "std, mean and mask do not exist."
            )
        variable = getattr(self, name)
        return None if variable is None else tf.convert_to_tensor(variable)

    @property
    def std(self) -> tf.Tensor:
        """Std of the last call, one sample's shape."""
        return self._record("_last_std")

    @property
    def mean(self) -> tf.Tensor:
        """Mean of the last call, one sample's shape."""
        return self._record("_last_mean")

    @property
    def mask(self) -> tf.Tensor | None:
        """Mask of the last call (1 kept, 0 masked), or None without a mask."""
        return self._record("_last_mask")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        value_range = None if self.value_range is None else list(self.value_range)
        config.update({"value_range": value_range, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CloakNoiseLayer(NoiseLayer):
    """Cloak noise layer with learned per-feature means and stds.

    Args:
        scale: ``(s_min, s_max)``, the range of the std, ``0 <= s_min < s_max``.
        shallow: slope of the tanh that maps ``rhos`` to the std (> 0).
        percent_to_mask: fraction ``p`` in ``[0, 1)`` of features (those of
            highest std) to mask, or None for no mask.
        value_range: output clipping, see ``NoiseLayer``.
        locs_requires_grad: whether ``locs`` is trainable.
        rhos_requires_grad: whether ``rhos`` is trainable.
        rhos_init: initial value of every ``rho`` (-4 gives
            ``std ~= s_min + 3.4e-4 (s_max - s_min)``).
        seed: noise seed.

    Input shape: ``(batch, *features)``; output shape: the same.

    Example:
        >>> layer = CloakNoiseLayer(scale=(1e-3, 1.0), percent_to_mask=0.5, seed=0)
        >>> y = layer(tf.zeros((4, 8, 8, 1)))
    """

    def __init__(
        self,
        scale: Sequence[float] = (1e-4, 2.0),
        shallow: float = 1.0,
        percent_to_mask: float | None = None,
        value_range: Sequence[float | None] | None = None,
        locs_requires_grad: bool = True,
        rhos_requires_grad: bool = True,
        rhos_init: float = -4.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(value_range=value_range, seed=seed, **kwargs)
        owner = type(self).__name__
        try:
            s_min, s_max = (float(s) for s in scale)
        except (TypeError, ValueError):
            s_min = s_max = float("nan")
        if not (0 <= s_min < s_max and math.isfinite(s_max)):
            raise ValueError(
                f"`scale` of {owner} must be (s_min, s_max) with 0 <= s_min < s_max. "
                f"Received: scale={scale!r}"
            )
        if not (isinstance(shallow, int | float) and shallow > 0):
            raise ValueError(
                f"`shallow` of {owner} must be positive. Received: shallow={shallow!r}"
            )
        if percent_to_mask is not None and not (
            isinstance(percent_to_mask, int | float) and 0 <= percent_to_mask < 1
        ):
            raise ValueError(
                f"`percent_to_mask` of {owner} must be None or in [0, 1). "
                f"Received: percent_to_mask={percent_to_mask!r}"
            )
        if not (isinstance(rhos_init, int | float) and math.isfinite(rhos_init)):
            raise ValueError(
                f"`rhos_init` of {owner} must be a finite number. "
                f"Received: rhos_init={rhos_init!r}"
            )
        self.scale = (s_min, s_max)
        self.shallow = float(shallow)
        self.percent_to_mask = percent_to_mask
        self.locs_requires_grad = bool(locs_requires_grad)
        self.rhos_requires_grad = bool(rhos_requires_grad)
        self.rhos_init = float(rhos_init)

    @property
    def has_mask(self) -> bool:
        return self.percent_to_mask is not None

    def parameter_shape(self, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of ``locs`` and ``rhos`` for one sample of ``feature_shape``."""
        return tuple(feature_shape)

    def expand(self, parameter: tf.Tensor) -> tf.Tensor:
        """Maps a parameter-shaped tensor to one sample's shape."""
        return parameter

    def build(self, input_shape):
        feature_shape = tuple(input_shape[1:])
        if None in feature_shape:
            raise ValueError(
                f"{type(self).__name__} needs a fully known sample shape. "
                f"Received: input_shape={input_shape}"
            )
        self.feature_shape = feature_shape
        shape = self.parameter_shape(feature_shape)
        self.locs = self.add_weight(
            name="locs",
            shape=shape,
            initializer="zeros",
            trainable=self.locs_requires_grad,
        )
        self.rhos = self.add_weight(
            name="rhos",
            shape=shape,
            initializer=keras.initializers.Constant(self.rhos_init),
            trainable=self.rhos_requires_grad,
        )
        self._build_records(feature_shape)

    def parameter_std(self) -> tf.Tensor:
        """Std per parameter (per feature, or per patch), from ``rhos``."""
        s_min, s_max = self.scale
        rhos = tf.convert_to_tensor(self.rhos)
        return s_min + (s_max - s_min) * (1 + tf.tanh(self.shallow * rhos)) / 2

    def parameter_mask(self, std: tf.Tensor) -> tf.Tensor:
        """1 for the parameters kept, 0 for the floor(p * n) of highest std."""
        flat = tf.reshape(std, (-1,))
        size = flat.shape[0]
        kept = size - math.floor(self.percent_to_mask * size)
        order = tf.argsort(flat, stable=True)
        ranks = tf.scatter_nd(order[:, None], tf.range(size), (size,))
        mask = tf.cast(ranks < kept, std.dtype)
        return tf.stop_gradient(tf.reshape(mask, tf.shape(std)))

    def mean_estimator(self, inputs):
        return tf.cast(self.expand(tf.convert_to_tensor(self.locs)), inputs.dtype)

    def std_estimator(self, inputs):
        std = self.parameter_std()
        expanded = tf.cast(self.expand(std), inputs.dtype)
        if not self.has_mask:
            return expanded
        mask = tf.cast(self.expand(self.parameter_mask(std)), inputs.dtype)
        return expanded, mask

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scale": list(self.scale),
                "shallow": self.shallow,
                "percent_to_mask": self.percent_to_mask,
                "locs_requires_grad": self.locs_requires_grad,
                "rhos_requires_grad": self.rhos_requires_grad,
                "rhos_init": self.rhos_init,
            }
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PatchCloakNoiseLayer(CloakNoiseLayer):
    """Cloak noise layer with one mean and one std per (patch, channel).

    Input shape: ``(batch, height, width, channels)``. The image is tiled by
    ``patch_size x patch_size`` patches (the last row/column of patches may be
    cut by the border); ``locs`` and ``rhos`` have shape
    ``(ceil(H / P), ceil(W / P), C)`` and are repeated over each patch. With
    ``percent_to_mask`` the mask is chosen per patch. The composite cloak loss
    never applies this layer's mask (as in Stained Glass).

    Args:
        patch_size: side ``P`` of the square patches, a positive int.
        **kwargs: the arguments of ``CloakNoiseLayer``.
    """

    def __init__(self, patch_size: int, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(patch_size, int) and not isinstance(patch_size, bool)) or (
            patch_size <= 0
        ):
            raise ValueError(
                "`patch_size` of PatchCloakNoiseLayer must be a positive int. "
                f"Received: patch_size={patch_size!r}"
            )
        self.patch_size = patch_size

    def parameter_shape(self, feature_shape):
        if len(feature_shape) != 3:
            raise ValueError(
                "PatchCloakNoiseLayer expects (batch, height, width, channels) "
                f"images. Received: sample shape {feature_shape}"
            )
        height, width, channels = feature_shape
        p = self.patch_size
        return (-(-height // p), -(-width // p), channels)

    def expand(self, parameter):
        height, width, _ = self.feature_shape
        p = self.patch_size
        tiled = tf.repeat(tf.repeat(parameter, p, axis=0), p, axis=1)
        return tiled[:height, :width, :]

    def get_config(self):
        config = super().get_config()
        config["patch_size"] = self.patch_size
        return config


def _check_value_range(value_range, owner: str):
    if value_range is None:
        return None
    try:
        low, high = value_range
        low = None if low is None else float(low)
        high = None if high is None else float(high)
    except (TypeError, ValueError):
        low, high = float("nan"), None
    bad = (low is not None and math.isnan(low)) or (
        high is not None and math.isnan(high)
    )
    if bad or (low is not None and high is not None and not low < high):
        raise ValueError(
            f"`value_range` of {owner} must be None or (low, high) with low < high "
            f"(None for an open side). Received: value_range={value_range!r}"
        )
    return (low, high)
