"""Cloak loss factories: train a noise layer to hide its input while the task works.

Reference: Stained Glass ``loss/cloak`` (Protopia AI; closed source, the
signatures and return triple follow its public docs). Each factory returns
``(loss_fn, get_components, get_hyperparameters)``:

- ``loss_fn(*args, **kwargs)`` calls the task ``loss_function(*args,
  **kwargs)`` (in ``fit``: ``(y_true, y_pred)``) and adds the privacy terms,
  read from the noise layer's forward pass in the same trace;
- ``get_components()`` returns the named loss terms of the last evaluation as
  Python floats, ``get_hyperparameters()`` the factory's hyperparameters;
  each may be called at most once after each evaluation of the loss (a second
  call, or a call before any evaluation, raises ``RuntimeError``).

Graph safety: the loss reads tensors only from the forward pass of the trace
it runs in (``NoiseLayer.capture_for_loss``) and writes its components to
``tf.Variable``s, so it works under ``tf.function``, in ``model.fit`` and with
XLA, and no tensor leaks from one trace to another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from .attackers import attacker_transforms, multi_attacker_privacy_loss
from .noise_layers import ForwardCapture, PatchCloakNoiseLayer
from .noisy_model import NoisyModel

LossFactoryResult = tuple[
    Callable[..., tf.Tensor],
    Callable[[], dict[str, float]],
    Callable[[], dict[str, Any]],
]


def negative_log_mean(std: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
    """``-log(sum(mask * std) / sum(mask))`` over every element (mask 1 if None).

    Raises:
        ValueError: (eager) if the mask keeps no element; in a graph the same
            condition fails a runtime assertion.
    """
    std = tf.convert_to_tensor(std)
    if mask is None:
        return -tf.math.log(tf.reduce_mean(std))
    mask = tf.cast(mask, std.dtype)
    kept = tf.reduce_sum(mask * tf.ones_like(std))
    if tf.executing_eagerly() and float(kept) <= 0:
        raise ValueError("negative_log_mean: the std mask keeps no element.")
    checks = (
        []
        if tf.executing_eagerly()
        else [
            tf.debugging.assert_positive(kept, message="the std mask keeps no element")
        ]
    )
    with tf.control_dependencies(checks):
        return -tf.math.log(tf.reduce_sum(mask * std) / kept)


class _ComponentRecorder:
    """Loss components kept in ``tf.Variable``s, served once per evaluation."""

    def __init__(self, names: Sequence[str], hyperparameters: dict[str, Any]):
        self._values = {
            name: tf.Variable(0.0, trainable=False, dtype=tf.float32, name=name)
            for name in names
        }
        self._evaluations = tf.Variable(0, trainable=False, dtype=tf.int64)
        self._hyperparameters = dict(hyperparameters)
        self._served = {"components": 0, "hyperparameters": 0}

    def record(self, values: dict[str, tf.Tensor]) -> None:
        for name, value in values.items():
            self._values[name].assign(tf.cast(tf.stop_gradient(value), tf.float32))
        self._evaluations.assign_add(1)

    def _serve(self, getter: str) -> None:
        evaluations = int(self._evaluations.numpy())
        if evaluations == 0:
            raise RuntimeError(
                f"get_{getter}() was called before the loss was evaluated: run a "
                "forward pass and the loss first."
            )
        if self._served[getter] == evaluations:
            raise RuntimeError(
                f"get_{getter}() may be called at most once after each forward "
                "pass, and was already called since the last one."
            )
        self._served[getter] = evaluations

    def get_components(self) -> dict[str, float]:
        self._serve("components")
        return {name: float(v.numpy()) for name, v in self._values.items()}

    def get_hyperparameters(self) -> dict[str, Any]:
        self._serve("hyperparameters")
        return dict(self._hyperparameters)


def _check_noisy_model(noisy_model) -> None:
    if not isinstance(noisy_model, NoisyModel):
        raise TypeError(
            "`noisy_model` must be a NoisyModel. "
            f"Received: {type(noisy_model).__name__}"
        )


def _check_callable(loss_function) -> None:
    if not callable(loss_function):
        raise TypeError(
            "`loss_function` must be callable. "
            f"Received: {type(loss_function).__name__}"
        )


def _real(name: str, value, *, low: float | None = None, strict: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '>='} {low}"
        raise ValueError(
            f"`{name}` must be a finite number{bound}. Received: {name}={value!r}"
        )
    return float(value)


def _task_loss(loss_function, args, kwargs) -> tf.Tensor:
    task = tf.convert_to_tensor(loss_function(*args, **kwargs))
    if task.shape.rank != 0:
        raise ValueError(
            "`loss_function` must return a scalar (reduce over the batch). "
            f"Received: a tensor of shape {task.shape}"
        )
    return task


def composite_cloak_loss_factory(
    noisy_model: NoisyModel,
    loss_function: Callable[..., tf.Tensor],
    alpha: float,
    respect_std_mask: bool = True,
) -> LossFactoryResult:
    """``(1 - alpha) * task + alpha * negative_log_mean(std, mask)``.

    Args:
        noisy_model: the ``NoisyModel`` whose noise layer is trained.
        loss_function: task loss, returning a scalar.
        alpha: in ``[0, 1]``; 0 favours the task, 1 the transform's strength
            (a larger mean std).
        respect_std_mask: average the std over the unmasked features only. Ignored
            when the noise layer has no mask, and for ``PatchCloakNoiseLayer``
            (whose mask is never respected, as in Stained Glass).

    Returns:
        ``(loss_fn, get_components, get_hyperparameters)``; the components are
        ``task_loss``, ``noise_loss`` and ``composite_loss``; the
        hyperparameters ``{"alpha": alpha}``.

    Raises:
        TypeError: ``noisy_model`` is not a NoisyModel, ``loss_function`` not callable.
        ValueError: ``alpha`` outside ``[0, 1]``.
    """
    _check_noisy_model(noisy_model)
    _check_callable(loss_function)
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool)) or not (
        0 <= alpha <= 1
    ):
        raise ValueError(f"`alpha` must be in [0, 1]. Received: alpha={alpha!r}")
    alpha = float(alpha)
    layer = noisy_model.noise_layer
    use_mask = bool(respect_std_mask) and not isinstance(layer, PatchCloakNoiseLayer)
    recorder = _ComponentRecorder(
        ("task_loss", "noise_loss", "composite_loss"), {"alpha": alpha}
    )

    def loss_fn(*args, **kwargs):
        capture = layer.capture_for_loss()
        task = _task_loss(loss_function, args, kwargs)
        mask = capture.mask if use_mask else None
        noise = tf.cast(negative_log_mean(capture.std, mask), task.dtype)
        composite = (1 - alpha) * task + alpha * noise
        recorder.record(
            {"task_loss": task, "noise_loss": noise, "composite_loss": composite}
        )
        return composite

    return loss_fn, recorder.get_components, recorder.get_hyperparameters


def _super_batch_halves(capture: ForwardCapture) -> tuple[tf.Tensor, tf.Tensor]:
    """Clean first half of the captured input, noisy second half of the output."""
    if not capture.super_batched:
        raise ValueError(
            "super_batched=True, but the noise layer did not run a super-batch: "
            "call the NoisyModel inside `noisy_model.distillation_context()`."
        )
    size = capture.inputs.shape[0]
    if size is not None and size % 2:
        raise ValueError(
            f"A super-batch must have an even size (clean half, noisy half). "
            f"Received: a batch of {size}"
        )
    half = tf.shape(capture.inputs)[0] // 2
    return capture.inputs[:half], capture.outputs[half:]


def image_similarity_cloak_loss_factory(
    noisy_model: NoisyModel,
    loss_function: Callable[..., tf.Tensor],
    *,
    ms_ssim_weight: float,
    pearson_weight: float,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    super_batched: bool = False,
    gamma_values: Sequence[float] = (0.5, 2.0),
    blur_sigma: float = 2.0,
    wavelet_threshold: float = 0.1,
) -> LossFactoryResult:
    """``task + ms_ssim_weight * ms_ssim_total + pearson_weight * pearson_total``.

    The clean image (the noise layer's input) and the noisy one (its output) are
    denormalised per channel to ``[0, 1]`` (``x * image_std[c] + image_mean[c]``),
    passed through each attacker transform (``cloak.attackers``) and compared:
    ``ms_ssim_total`` is the mean of the 7 + len(gamma_values) MS-SSIM
    components (9 by default), ``pearson_total`` the mean of the
    4 + len(gamma_values) squared-Pearson components (6 by default).

    Args:
        noisy_model: the ``NoisyModel`` whose noise layer is trained; images are
            channels-last ``(B, H, W, C)`` with ``C == len(image_mean)``.
        loss_function: task loss, returning a scalar.
        ms_ssim_weight: non-negative weight of the MS-SSIM total.
        pearson_weight: non-negative weight of the Pearson total.
        image_mean: per-channel mean of the noise layer's input normalisation.
        image_std: per-channel std of that normalisation (entries positive).
        super_batched: the model runs under ``distillation_context()``: compare
            the clean half of the input with the noisy half of the output.
        gamma_values: exponents of the gamma attackers (distinct, positive).
        blur_sigma: std (pixels) of the blur attacker, positive.
        wavelet_threshold: soft threshold of the Haar denoiser, non-negative.

    Returns:
        ``(loss_fn, get_components, get_hyperparameters)``; the components are
        ``ms_ssim_<t>`` and ``pearson_sq_<t>`` per attacker, ``ms_ssim_total``,
        ``pearson_total``, ``task_loss`` and ``composite_loss``.

    Raises:
        TypeError: ``noisy_model`` is not a NoisyModel, ``loss_function`` not callable.
        ValueError: ``image_mean`` and ``image_std`` differ in length, or another
            argument is out of range.
    """
    _check_noisy_model(noisy_model)
    _check_callable(loss_function)
    ms_ssim_weight = _real("ms_ssim_weight", ms_ssim_weight, low=0)
    pearson_weight = _real("pearson_weight", pearson_weight, low=0)
    image_mean = [_real("image_mean", m) for m in image_mean]
    image_std = [_real("image_std", s, low=0, strict=True) for s in image_std]
    if len(image_mean) != len(image_std) or not image_mean:
        raise ValueError(
            "`image_mean` and `image_std` must have the same, non-zero length. "
            f"Received: {len(image_mean)} and {len(image_std)} values"
        )
    gamma_values = tuple(
        _real("gamma_values", g, low=0, strict=True) for g in gamma_values
    )
    if len(set(gamma_values)) != len(gamma_values):
        raise ValueError(f"`gamma_values` must be distinct. Received: {gamma_values}")
    blur_sigma = _real("blur_sigma", blur_sigma, low=0, strict=True)
    wavelet_threshold = _real("wavelet_threshold", wavelet_threshold, low=0)
    _, ms_ssim_names, pearson_names = attacker_transforms(gamma_values)
    ms_ssim_keys = [f"ms_ssim_{n}" for n in ms_ssim_names]
    pearson_keys = [f"pearson_sq_{n}" for n in pearson_names]
    hyperparameters = {
        "ms_ssim_weight": ms_ssim_weight,
        "pearson_weight": pearson_weight,
        "image_mean": tuple(image_mean),
        "image_std": tuple(image_std),
        "super_batched": bool(super_batched),
        "gamma_values": gamma_values,
        "blur_sigma": blur_sigma,
        "wavelet_threshold": wavelet_threshold,
    }
    recorder = _ComponentRecorder(
        [
            *ms_ssim_keys,
            *pearson_keys,
            "ms_ssim_total",
            "pearson_total",
            "task_loss",
            "composite_loss",
        ],
        hyperparameters,
    )
    layer = noisy_model.noise_layer
    channels = len(image_mean)

    def denormalise(images: tf.Tensor) -> tf.Tensor:
        if images.shape.rank != 4 or images.shape[-1] != channels:
            raise ValueError(
                "The image-similarity cloak loss needs channels-last images "
                f"(B, H, W, {channels}) to match image_mean. "
                f"Received: shape {images.shape}"
            )
        mean = tf.constant(image_mean, dtype=images.dtype)
        std = tf.constant(image_std, dtype=images.dtype)
        return images * std + mean

    def loss_fn(*args, **kwargs):
        capture = layer.capture_for_loss()
        if super_batched:
            clean, noisy = _super_batch_halves(capture)
        else:
            clean, noisy = capture.inputs, capture.outputs
        task = _task_loss(loss_function, args, kwargs)
        components = multi_attacker_privacy_loss(
            denormalise(noisy),
            denormalise(clean),
            gamma_values,
            blur_sigma,
            wavelet_threshold,
        )
        components = {k: tf.cast(v, task.dtype) for k, v in components.items()}
        ms_ssim_total = tf.add_n([components[k] for k in ms_ssim_keys]) / len(
            ms_ssim_keys
        )
        pearson_total = tf.add_n([components[k] for k in pearson_keys]) / len(
            pearson_keys
        )
        composite = (
            task + ms_ssim_weight * ms_ssim_total + pearson_weight * pearson_total
        )
        recorder.record(
            {
                **components,
                "ms_ssim_total": ms_ssim_total,
                "pearson_total": pearson_total,
                "task_loss": task,
                "composite_loss": composite,
            }
        )
        return composite

    return loss_fn, recorder.get_components, recorder.get_hyperparameters
