"""`run_audit`: train the recommended recipe on a dataset with canaries and
report the epsilon it claims next to the epsilon the canaries refute."""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import numpy as np

from ..callbacks import DP_Accountant
from ..data import _read_npz_images, digits_arrays, from_numpy
from ..dpsgd import DPSGDModel, tanh_cnn
from ..models import SMALL_DATASET, recipe
from ..privacy_plan import DPParameters
from .canaries import (
    AuditResult,
    audit_scores,
    insert_canaries,
    losses_and_hits,
    make_canaries,
)

#: the noise multiplier of the "no noise" reference (sigma must be > 0)
NO_NOISE_SIGMA = 1e-9
#: DP-SGD settings of the accuracy benchmark (benchmarks/accuracy.py), by
#: dataset size (below / above `models.SMALL_DATASET` samples)
DPSGD_SETTINGS = {
    "small": {"batch_size": 256, "epochs": 30, "learning_rate": 0.05, "clip": 1.0},
    "large": {"batch_size": 1024, "epochs": 10, "learning_rate": 1.0, "clip": 1.0},
}


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """One audited training run.

    Args:
        data: "digits" or the path of an .npz (x_train, y_train, x_test, y_test).
        model: "clipless" (the `preset`'s recommended recipe) or "dpsgd"
            (`DPSGDModel` on `dpsgd.tanh_cnn`, raw images, `DPSGD_SETTINGS`).
        preset: the `models.recipe` preset trained (its recommended settings).
        epsilon: the target epsilon (sigma calibrated for it); None trains the
            same pipeline without noise (the non-private reference).
        epochs: None: the recipe's.
        num_canaries: m, drawn from the held-out split (<= its size).
        num_guesses: r, half "in" (highest scores), half "out"; fixed in advance.
        kind: "mislabeled" or "noise" (see `make_canaries`).
        delta: the delta of the reported epsilon and of the lower bound.
        confidence: of the lower bound (1 - beta).
        seed: canaries, coins, weights and batches; None: fresh entropy.
        max_train_samples: use only this many training samples (None: all).
    """

    data: str = "digits"
    model: str = "clipless"
    preset: str = "scattering_mlp"
    epsilon: float | None = 3.0
    epochs: int | None = None
    num_canaries: int = 200
    num_guesses: int = 40
    kind: str = "mislabeled"
    delta: float = 1e-5
    confidence: float = 0.95
    seed: int | None = 0
    max_train_samples: int | None = None


def _arrays(data: str):
    if data == "digits":
        return digits_arrays()
    arrays = _read_npz_images(data)
    return tuple(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test"))


def _noise_multiplier(config: AuditConfig, model, epochs: int, accountant: str):
    if config.epsilon is None:
        return NO_NOISE_SIGMA
    return model.privacy_plan.calibrate_noise_multiplier(
        config.epsilon, epochs, accountant
    )


def _build_clipless(config, x_in, y_in, held_x, held_y, num_classes):
    """The preset's recommended recipe, its feature map in the pipeline."""
    settings = recipe(config.preset, x_in.shape[0])
    if config.epochs is not None:
        settings = dataclasses.replace(settings, epochs=config.epochs)
    train, held, meta = from_numpy(
        x_in,
        y_in,
        held_x,
        held_y,
        batch_size=settings.batch_size,
        num_classes=num_classes,
        feature_map=settings.feature_map(),
        sampling="poisson",
        seed=config.seed,
    )
    model = settings.build(meta, settings.dp_parameters(config.delta, seed=config.seed))
    model.set_noise_multiplier(
        _noise_multiplier(config, model, settings.epochs, settings.accountant)
    )
    model.compile(**settings.compile_arguments(meta))
    return model, train, held, settings.epochs, settings.accountant


def _build_dpsgd(config, x_in, y_in, held_x, held_y, num_classes):
    """DP-SGD on the standard tanh CNN, raw images, `DPSGD_SETTINGS`."""
    small = x_in.shape[0] < SMALL_DATASET
    settings = DPSGD_SETTINGS["small" if small else "large"]
    epochs = config.epochs or settings["epochs"]
    train, held, meta = from_numpy(
        x_in,
        y_in,
        held_x,
        held_y,
        batch_size=settings["batch_size"],
        num_classes=num_classes,
        sampling="poisson",
        seed=config.seed,
    )
    network = tanh_cnn(meta.input_shape, num_classes)
    model = DPSGDModel(
        network,
        DPParameters(1.0, config.delta, seed=config.seed),
        meta,
        settings["clip"],
    )
    model.set_noise_multiplier(_noise_multiplier(config, model, epochs, "pld"))
    model.compile(
        optimizer=keras.optimizers.SGD(settings["learning_rate"], momentum=0.9),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
    )
    return model, train, held, epochs, "pld"


def run_audit(config: AuditConfig) -> dict:
    """Train with canaries, score them, and report.

    Returns:
        {"config", "result" (`AuditResult.to_dict()`), "test_accuracy" (on the
        held-out samples that are not canaries), "noise_multiplier",
        "train_seconds", "scores", "included"}.
    """
    x_train, y_train, x_held, y_held = _arrays(config.data)
    y_train = np.asarray(y_train).astype(np.int64).ravel()
    y_held = np.asarray(y_held).astype(np.int64).ravel()
    # public: counted in the held-out labels, never in the training labels
    # (whose max + 1 shows whether a sample of the last class is present)
    num_classes = int(y_held.max() + 1)
    if config.max_train_samples is not None:
        x_train = x_train[: config.max_train_samples]
        y_train = y_train[: config.max_train_samples]
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)
    # canaries drawn from the first half of the held-out split (or its first
    # num_canaries samples), accuracy measured on the rest
    pool = max(config.num_canaries, x_held.shape[0] // 2)
    if pool >= x_held.shape[0]:
        raise ValueError(
            f"`num_canaries` must be below the held-out split's size "
            f"({x_held.shape[0]}). Received: {config.num_canaries}"
        )
    canaries = make_canaries(
        config.kind,
        config.num_canaries,
        x_held[:pool],
        y_held[:pool],
        num_classes,
        seed=config.seed,
    )
    x_in, y_in = insert_canaries(x_train, y_train, canaries)
    # the held-out set: the m canaries first, then the accuracy samples
    held_x = np.concatenate([canaries.x, x_held[pool:]])
    held_y = np.concatenate([canaries.labels, y_held[pool:]])
    build = _build_dpsgd if config.model == "dpsgd" else _build_clipless
    model, train, held, epochs, accountant = build(
        config, x_in, y_in, held_x, held_y, num_classes
    )
    sigma = model.dp_parameters.noise_multiplier
    m = canaries.size
    initial, _ = losses_and_hits(model, held)
    start = time.perf_counter()
    model.fit(
        train,
        epochs=epochs,
        # no accountant without noise: there is no finite epsilon to report
        callbacks=[] if config.epsilon is None else [DP_Accountant(accountant)],
        verbose=0,
    )
    seconds = time.perf_counter() - start
    final, hits = losses_and_hits(model, held)
    scores = initial[:m] - final[:m]
    reported = (
        math.inf if config.epsilon is None else model.privacy_plan.epsilon(accountant)
    )
    result: AuditResult = audit_scores(
        scores,
        canaries,
        config.num_guesses,
        config.delta,
        config.confidence,
        epsilon_reported=reported,
    )
    accuracy = float(np.mean(hits[m:]))
    return {
        "config": dataclasses.asdict(config),
        "result": result.to_dict(),
        "holds": result.holds,
        "test_accuracy": accuracy,
        "noise_multiplier": sigma,
        "train_seconds": seconds,
        "scores": scores.tolist(),
        "included": canaries.included.tolist(),
    }


__all__ = ["DPSGD_SETTINGS", "NO_NOISE_SIGMA", "AuditConfig", "run_audit"]
