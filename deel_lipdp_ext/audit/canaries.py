"""The one-run canary audit of a DP training run (Steinke et al. 2023).

m canaries are made from data the training set does not contain; each is
added to the training set independently with probability 1/2 (a secret coin)
and then sampled by the model's own Poisson pipeline like any sample. After
training, each canary's score is how much training lowered its loss
(initial loss - final loss); the auditor guesses "in" for the highest scores
and "out" for the lowest, and `statistics.one_run_epsilon_lower_bound` turns
the correct guesses into an epsilon that the run provably exceeds with
probability at most 1 - confidence. A lower bound above the reported epsilon
means a bound or the accounting is wrong.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from .._validation import require_one_of
from . import statistics

CANARY_KINDS = ("mislabeled", "noise")


@dataclasses.dataclass(frozen=True)
class Canaries:
    """m audit samples and their secret inclusion coins.

    Attributes:
        x: inputs, shape (m, *input_shape).
        labels: integer labels, shape (m,).
        included: bool, shape (m,): True if the canary is in the training set.
        kind: "mislabeled" (held-out images, each with a label drawn among the
            other classes) or "noise" (uniform random images with random labels).
    """

    x: np.ndarray
    labels: np.ndarray
    included: np.ndarray
    kind: str

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def make_canaries(
    kind: str,
    num_canaries: int,
    held_out_x: np.ndarray,
    held_out_labels: np.ndarray,
    num_classes: int,
    seed: int | None = None,
) -> Canaries:
    """Draw `num_canaries` canaries and their coins (each in with prob. 1/2).

    Args:
        kind: one of `CANARY_KINDS`.
        num_canaries: m (>= 2).
        held_out_x: samples the training set does not contain (shape (n, ...)):
            the source of "mislabeled" canaries, the shape and value range of
            "noise" ones.
        held_out_labels: their integer labels, shape (n,).
        num_classes: number of classes.
        seed: seed of the canaries and coins (None: fresh entropy).
    """
    require_one_of("kind", kind, CANARY_KINDS, "make_canaries")
    held_out_x = np.asarray(held_out_x, np.float32)
    held_out_labels = np.asarray(held_out_labels).astype(np.int64).ravel()
    if held_out_labels.shape[0] != held_out_x.shape[0]:
        raise ValueError("`held_out_x` and `held_out_labels` differ in length.")
    if not 2 <= num_canaries <= held_out_x.shape[0]:
        raise ValueError(
            f"`num_canaries` must be in [2, {held_out_x.shape[0]}] (the held-out "
            f"samples). Received: {num_canaries!r}"
        )
    rng = np.random.default_rng(seed)
    if kind == "mislabeled":
        chosen = rng.choice(held_out_x.shape[0], num_canaries, replace=False)
        x = held_out_x[chosen]
        shift = rng.integers(1, num_classes, num_canaries)  # never the true class
        labels = (held_out_labels[chosen] + shift) % num_classes
    else:
        low, high = float(held_out_x.min()), float(held_out_x.max())
        x = rng.uniform(low, high, (num_canaries, *held_out_x.shape[1:]))
        labels = rng.integers(0, num_classes, num_canaries)
    included = rng.random(num_canaries) < 0.5
    return Canaries(x.astype(np.float32), labels.astype(np.int64), included, kind)


def insert_canaries(
    x_train: np.ndarray, labels_train: np.ndarray, canaries: Canaries
) -> tuple[np.ndarray, np.ndarray]:
    """The training arrays with the included canaries appended (the Poisson
    sampling then treats them like any sample)."""
    labels_train = np.asarray(labels_train).astype(np.int64).ravel()
    keep = canaries.included
    return (
        np.concatenate([np.asarray(x_train, np.float32), canaries.x[keep]]),
        np.concatenate([labels_train, canaries.labels[keep]]),
    )


def losses_and_hits(model: keras.Model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's loss under `model`'s compiled loss (no reduction) and
    whether its prediction is right, over a dataset of (x, y) batches in a
    fixed order, in one pass."""
    losses, hits = [], []
    for x, y in dataset:
        logits = model(x, training=False)
        losses.append(np.asarray(model.loss.call(y, logits)))
        hits.append(np.argmax(logits, -1) == np.argmax(y, -1))
    return np.concatenate(losses).astype(np.float64), np.concatenate(hits)


def per_sample_losses(model: keras.Model, dataset) -> np.ndarray:
    """Each sample's loss under `model`'s compiled loss (no reduction)."""
    return losses_and_hits(model, dataset)[0]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """One audited run: the reported and the measured epsilon, side by side."""

    epsilon_reported: float
    epsilon_lower_bound: float
    delta: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    canary_auc: float  # AUC of the scores, included vs excluded canaries
    kind: str
    # membership inference on the same scores (included = members):
    # TPR at FPR <= 1e-2 and 1e-1, and its own epsilon lower bound
    tpr_at_fpr_001: float = float("nan")
    tpr_at_fpr_01: float = float("nan")
    membership_epsilon_lower_bound: float = float("nan")

    @property
    def holds(self) -> bool:
        """True unless a measured bound (canary guesses, or membership
        inference on the same scores) exceeds the reported epsilon."""
        bounds = (self.epsilon_lower_bound, self.membership_epsilon_lower_bound)
        return not any(bound > self.epsilon_reported for bound in bounds)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if math.isinf(self.epsilon_reported):
            d["epsilon_reported"] = "inf"
        return d


def audit_scores(
    scores: np.ndarray,
    canaries: Canaries,
    num_guesses: int,
    delta: float,
    confidence: float = 0.95,
    epsilon_reported: float = math.inf,
) -> AuditResult:
    """Guess half "in" (highest scores) and half "out" (lowest) of
    `num_guesses`, fixed before looking at the scores, and bound epsilon."""
    num_in = num_guesses // 2
    guesses = statistics.guesses_from_scores(scores, num_in, num_guesses - num_in)
    r, v = statistics.count_correct(guesses, canaries.included)
    members = scores[canaries.included]
    others = scores[~canaries.included]
    membership = {}
    if members.size and others.size:
        fpr, tpr, _ = statistics.roc_curve(members, others)
        membership = {
            "canary_auc": statistics.auc(fpr, tpr),
            "tpr_at_fpr_001": statistics.tpr_at_fpr(fpr, tpr, 1e-2),
            "tpr_at_fpr_01": statistics.tpr_at_fpr(fpr, tpr, 1e-1),
            "membership_epsilon_lower_bound": (
                statistics.membership_epsilon_lower_bound(
                    members, others, delta, confidence, fpr_targets=(1e-2, 1e-1)
                )
            ),
        }
    return AuditResult(
        epsilon_reported=float(epsilon_reported),
        epsilon_lower_bound=statistics.one_run_epsilon_lower_bound(
            canaries.size, r, v, delta, confidence
        ),
        delta=float(delta),
        confidence=float(confidence),
        num_canaries=canaries.size,
        num_guesses=r,
        num_correct=v,
        kind=canaries.kind,
        **{"canary_auc": float("nan"), **membership},
    )


__all__ = [
    "CANARY_KINDS",
    "AuditResult",
    "Canaries",
    "audit_scores",
    "insert_canaries",
    "losses_and_hits",
    "make_canaries",
    "per_sample_losses",
]
