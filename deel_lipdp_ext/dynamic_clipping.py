"""Dynamic clipping: callbacks that privately update `DP_ClipGradient(mode="dynamic")`.

A clipping value chosen from the data is a private release. Each callback
spends its own privacy budget on it, records the release in the ledger of the
model's privacy plan (so `DP_Accountant` includes it) and announces its
schedule to the plan (so budgets, calibration and `epsilon_curve` plan for
it). The new value only changes the sensitivity bounds of later steps, whose
noise follows: a post-processing of the release.

- `AdaptiveQuantileClipping`: geometric update towards a target quantile of
  the per-sample gradient norms (Andrew, Thakkar, McMahan, Ramaswamy 2021),
  from a Gaussian-noised count on one Poisson batch: a Poisson-subsampled
  Gaussian event per update.
- `LaplaceAdaptiveLossGradientClipping`: picks the clipping value of the loss
  gradient from a grid with the sparse vector technique (AboveThreshold,
  Dwork & Roth 2014, Thm 3.23): a pure epsilon-DP event per update.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
import weakref
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras.src.trainers.data_adapters import data_adapter_utils

from ._validation import require_positive
from .accounting import Release
from .bounds import walk_layers
from .distribution import num_workers
from .layers.base import sample_norms
from .layers.clipping import DP_ClipGradient
from .model import DPTrainer
from .privacy_plan import (
    ReproducibleNoiseWarning,
    privacy_plan_of,
)


def _clipless_model(model, owner: str) -> DPTrainer:
    if not isinstance(model, DPTrainer):
        raise TypeError(
            f"{owner} needs a clipless DP model (DPSequential/DPModel). "
            f"Received: {type(model).__name__}"
        )
    return model


def dynamic_clip_layers(model) -> list[DP_ClipGradient]:
    """The model's `DP_ClipGradient` layers with mode "dynamic", in call order,
    inside residual wrappers too (they were missed: a false refusal)."""
    dp_layers = _clipless_model(model, "dynamic_clip_layers").dp_layers
    return [
        layer
        for layer, _ in walk_layers(dp_layers)
        if isinstance(layer, DP_ClipGradient) and layer.mode == "dynamic"
    ]


def clip_layer_gradient_norms(
    model, layers: Sequence[DP_ClipGradient], x, y, weight=None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-sample norms of the gradient each layer clips, in loss-gradient units.

    The norms are those of the gradient of sample i's (weighted) loss at the
    layer's output, as the train step computes it (later clipping layers
    included): the quantity `clip_value` clips.

    Returns:
        (one array of shape (batch,) per layer, the 0/1 inclusion mask (batch,)).
    """
    model = _clipless_model(model, "clip_layer_gradient_norms")
    x, y, weight = model.sanitize_batch(x, y, weight, train_step=False)
    with contextlib.ExitStack() as stack:
        recorded = [stack.enter_context(layer.recording_outputs()) for layer in layers]
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = tf.reduce_sum(model.per_sample_losses(y, y_pred, weight))
        for layer, outputs in zip(layers, recorded, strict=True):
            if len(outputs) != 1:
                raise ValueError(
                    f"DP_ClipGradient '{layer.name}' ran {len(outputs)} times in one "
                    "forward pass; dynamic clipping needs exactly one."
                )
        gradients = tape.gradient(loss, [outputs[0] for outputs in recorded])
    norms = [sample_norms(g).numpy() for g in gradients]
    return norms, (weight.numpy() > 0).astype(np.float64)


_SEEDED_RELEASES = itertools.count()


class _DynamicClipping(keras.callbacks.Callback):
    """Shared schedule: an update at the start of every `patience`-th epoch
    of the model (epochs 0, patience, 2 patience, ... counted over all its
    fits: `PrivacyPlan.model_epoch`), on one batch of `ds_train`."""

    name = "dynamic_clipping"

    def __init__(
        self,
        ds_train: tf.data.Dataset,
        patience: int,
        quantile: float,
        seed: int | None,
    ):
        super().__init__()
        if not 0 < quantile < 1:
            raise ValueError(
                f"`quantile` of {type(self).__name__} must be in (0, 1). "
                f"Received: quantile={quantile!r}"
            )
        self.quantile = float(quantile)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(
                f"`patience` of {type(self).__name__} must be an int >= 1. "
                f"Received: patience={patience!r}"
            )
        if not isinstance(ds_train, tf.data.Dataset):
            raise TypeError(
                f"`ds_train` of {type(self).__name__} must be a tf.data.Dataset of "
                f"batches. Received: {type(ds_train).__name__}"
            )
        self.ds_train = ds_train
        self.patience = patience
        if seed is not None:
            warnings.warn(
                f"{type(self).__name__}(seed={seed}) fixes the noise of its clip "
                "updates: the privacy guarantee assumes the seed stays secret and "
                "is never reused. Use seed=None (default) for noise from the "
                "operating system's entropy.",
                ReproducibleNoiseWarning,
                stacklevel=3,
            )
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.updates = 0
        self._iterator = None

    # ----------------------------------------------------------- accounting
    def release(self) -> Release:  # pragma: no cover - abstract
        raise NotImplementedError

    def scheduled_release(self, epoch: int) -> Release | None:
        """The release this callback makes at the start of the model's epoch
        `epoch` (`PrivacyPlan.model_epoch`: counted over all its fits)."""
        return self.release() if epoch % self.patience == 0 else None

    def set_model(self, model):
        owner = self._owner() if getattr(self, "_owner", None) else None
        if owner is not None and owner is not model:
            raise ValueError(
                f"This {type(self).__name__} already serves another model: its "
                "releases, schedule and noise belong to that model's ledger. "
                "Make a new callback for each model."
            )
        super().set_model(model)
        self._owner = weakref.ref(model)
        schedules = privacy_plan_of(_clipless_model(model, type(self).__name__))
        if self not in schedules.release_schedules:
            schedules.release_schedules.append(self)

    def sampling_label(self) -> str:
        """How `ds_train` samples (the ledger's label for this release); ""
        for a release that claims no amplification by subsampling.

        Every release needs a `ds_train` tied to the model's sampling, even
        one that claims no subsampling: the counts' sensitivity 1 assumes a
        record at most once per batch (a review: `repeat().batch()` and a
        batch of one record ten times were taken, 3.52 reported for 21.6).

        Raises:
            ValueError: a `ds_train` that cannot be tied to the sampling of
                the model's metadata.
        """
        label = privacy_plan_of(self.model).dataset_sampling(self.ds_train)
        return "" if self.release().sampling_rate == 1.0 else label

    # ------------------------------------------------------------- training
    def target_layers(self) -> list[DP_ClipGradient]:  # pragma: no cover
        raise NotImplementedError

    def on_train_begin(self, logs=None):
        _clipless_model(self.model, type(self).__name__)
        if num_workers(self.model.distribute_strategy) > 1:
            raise ValueError(
                f"{type(self).__name__} is not supported under several workers: "
                "each worker's callback would make its own noisy release (each "
                "steering its replicas' clip values) while the ledger records one."
            )
        self.target_layers()  # raises if the model has no suitable layer
        self.sampling_label()  # raises if ds_train is not the model's sampling

    def _next_batch(self):
        for _ in range(2):  # a fresh iterator once, when one epoch is used up
            if self._iterator is None:
                self._iterator = iter(self.ds_train)
            try:
                return data_adapter_utils.unpack_x_y_sample_weight(next(self._iterator))
            except StopIteration:
                self._iterator = None
        raise ValueError(f"`ds_train` of {type(self).__name__} yields no batch.")

    def on_epoch_begin(self, epoch, logs=None):
        plan = privacy_plan_of(self.model)
        if self.scheduled_release(plan.model_epoch(epoch)) is None:
            return
        layers = self.target_layers()
        x, y, weight = self._next_batch()
        norms, included = clip_layer_gradient_norms(self.model, layers, x, y, weight)
        # Recorded first: if the ledger cannot take it, nothing is released.
        plan.record_release(self.release(), self.sampling_label())
        # The clip values now come from this model's data: another model may
        # not take these layers without this release (a review: 0.87
        # reported for 33.1).
        plan.record.note_stepped([layer.clip_value for layer in layers])
        if self.seed is not None:
            # A fixed seed is folded, at each release, with the number of
            # seeded releases made before in this process and with how much
            # the model's ledger holds: no two releases of one process (two
            # callbacks, one callback or its copies on several models) share
            # noise, nor does a run resumed once from a checkpoint with the
            # run that wrote it (a review: seed=3 drew the same noise for two
            # callbacks, a copied callback and a resume, and the logged clip
            # values gave the exact difference of two private counts). Two
            # runs of the same program, or two resumes of one checkpoint, do
            # replay it: a fixed seed is for one run.
            recorded = sum(release.count for release in plan.ledger())
            self.rng = np.random.default_rng(
                [self.seed, next(_SEEDED_RELEASES), recorded]
            )
        self.update(layers, norms, included)
        self.updates += 1

    def update(self, layers, norms, included) -> None:  # pragma: no cover
        raise NotImplementedError

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        layers = self.target_layers()
        for layer in layers:
            key = "clip_value" if len(layers) == 1 else f"clip_value_{layer.name}"
            logs[key] = float(layer.clip_value.numpy())


class AdaptiveQuantileClipping(_DynamicClipping):
    """Moves every dynamic `DP_ClipGradient` towards the `quantile` of the
    per-sample gradient norms it sees, privately.

    At the start of every `patience`-th epoch, on one batch of `ds_train`,
    for each of the k dynamic layers: b = #{samples whose norm <= C};
    b~ = b + N(0, noise_multiplier^2); C <- C * exp(-learning_rate * (b~ / B
    - quantile)), B the expected batch size. Adding or removing a sample moves
    each count by at most 1, so the k counts have L2 sensitivity sqrt(k): the
    release is a Gaussian of noise multiplier noise_multiplier / sqrt(k),
    Poisson-subsampled at the model's sampling rate (`ds_train` must be
    batched like the training data, e.g. `poisson_batches`).

    Args:
        ds_train: batches `(x, y)` or `(x, y, mask)` of the training data.
        patience: epochs between updates.
        noise_multiplier: std of the noise on each count.
        quantile: target fraction of unclipped samples, in (0, 1).
        learning_rate: step of the geometric update.
        seed: seed of the count noise.
    """

    name = "adaptive_quantile_clipping"

    def __init__(
        self,
        ds_train: tf.data.Dataset,
        *,
        patience: int = 1,
        noise_multiplier: float,
        quantile: float = 0.9,
        learning_rate: float = 0.2,
        seed: int | None = None,
    ):
        super().__init__(ds_train, patience, quantile, seed)
        owner = "AdaptiveQuantileClipping"
        self.noise_multiplier = require_positive(
            "noise_multiplier", noise_multiplier, owner
        )
        self.learning_rate = require_positive("learning_rate", learning_rate, owner)

    def target_layers(self):
        layers = dynamic_clip_layers(self.model)
        if not layers:
            raise ValueError(
                "AdaptiveQuantileClipping needs at least one "
                "DP_ClipGradient(mode='dynamic') layer in the model."
            )
        return layers

    def release(self) -> Release:
        k = len(self.target_layers())
        return Release(
            self.name,
            "gaussian",
            self.noise_multiplier / np.sqrt(k),
            privacy_plan_of(self.model).dataset_metadata.sampling_rate,
        )

    def update(self, layers, norms, included) -> None:
        expected = float(privacy_plan_of(self.model).expected_batch_size)
        for layer, n in zip(layers, norms, strict=True):
            clip = float(layer.clip_value.numpy())
            count = float(np.sum(included * (n <= clip)))
            noisy = count + self.noise_multiplier * self.rng.standard_normal()
            step = -self.learning_rate * (noisy / expected - self.quantile)
            # Kept in float32's normal range (post-processing of the release).
            bounds = np.finfo(np.float32)
            layer.set_clip_value(
                float(np.clip(clip * np.exp(step), bounds.tiny, bounds.max))
            )


class LaplaceAdaptiveLossGradientClipping(_DynamicClipping):
    """Sets the clipping value of the LOSS gradient (the model's last layer,
    a `DP_ClipGradient(mode="dynamic")`) with the sparse vector technique.

    At the start of every `patience`-th epoch, on one batch of `ds_train`:
    candidates c_0 > c_1 > ... (default: the loss's Lipschitz constant L
    times ratio^j, the largest possible norm first); with rho ~ Lap(2/eps)
    and nu_j ~ Lap(4/eps), stop at the first j where
    #{samples whose norm > c_j} + nu_j >= (1 - quantile) * B + rho, and keep
    c_{j-1} (c_0 if j = 0; the last candidate if none stops). The counts have
    sensitivity 1, so this is epsilon-DP (AboveThreshold). It is accounted as
    a pure-DP release, without amplification by subsampling.

    Args:
        ds_train: batches `(x, y)` or `(x, y, mask)` of the training data.
        patience: epochs between updates.
        epsilon: the pure-DP budget of ONE update.
        quantile: target fraction of unclipped samples, in (0, 1).
        candidates: decreasing positive clip values (default: L * 0.8^j,
            j = 0..19).
        seed: seed of the Laplace noise.
    """

    name = "laplace_svt_clipping"

    def __init__(
        self,
        ds_train: tf.data.Dataset,
        *,
        patience: int = 1,
        epsilon: float,
        quantile: float = 0.9,
        candidates: Sequence[float] | None = None,
        seed: int | None = None,
    ):
        super().__init__(ds_train, patience, quantile, seed)
        owner = "LaplaceAdaptiveLossGradientClipping"
        self.epsilon = require_positive("epsilon", epsilon, owner)
        if candidates is not None:
            c = [require_positive("candidates", v, owner) for v in candidates]
            if not c or any(a <= b for a, b in zip(c, c[1:], strict=False)):
                raise ValueError(
                    f"`candidates` of {owner} must be strictly decreasing. "
                    f"Received: {candidates!r}"
                )
            candidates = c
        self.candidates = candidates

    def target_layers(self):
        last = self.model.dp_layers[-1]
        if not (isinstance(last, DP_ClipGradient) and last.mode == "dynamic"):
            raise ValueError(
                "LaplaceAdaptiveLossGradientClipping clips the loss gradient: the "
                "model's last layer must be DP_ClipGradient(mode='dynamic'). "
                f"Received: {type(last).__name__} '{last.name}'"
            )
        return [last]

    def release(self) -> Release:
        return Release(self.name, "pure_dp", self.epsilon)

    def grid(self) -> list[float]:
        if self.candidates is not None:
            return list(self.candidates)
        top = self.model.loss_lipschitz_constant()
        return [top * 0.8**j for j in range(20)]

    def choose(self, norms: np.ndarray, included: np.ndarray) -> float:
        """AboveThreshold over the grid (see the class docstring)."""
        grid = self.grid()
        expected = privacy_plan_of(self.model).expected_batch_size
        threshold = (1.0 - self.quantile) * expected
        noisy_threshold = threshold + self.rng.laplace(0.0, 2.0 / self.epsilon)
        for j, c in enumerate(grid):
            above = float(np.sum(included * (norms > c)))
            if above + self.rng.laplace(0.0, 4.0 / self.epsilon) >= noisy_threshold:
                return grid[max(j - 1, 0)]
        return grid[-1]

    def update(self, layers, norms, included) -> None:
        layers[0].set_clip_value(self.choose(norms[0], included))
