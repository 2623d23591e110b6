"""DP losses: per-sample losses that know their Lipschitz constant w.r.t. the logits.

`get_L(num_classes=None)` returns an upper bound of ||d loss / d logits|| (L2,
one sample) valid for ANY label: labels are first mapped into the set the
bound was proved for (one-hot, simplex, [0, 1], unit ball), so a crafted
label can never raise a sample's gradient. With `num_classes` (the size of
the model output) the bound is exact; without, it is the worst case over all
sizes. `call` returns one loss per sample, shape (batch,).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from ._validation import require_positive, unproven_change
from .layers.base import stable_norm

_PACKAGE = "deel_lipdp_ext"


class DPLoss(keras.losses.Loss):
    """Base of the DP losses: a per-sample loss with a Lipschitz constant."""

    def __init__(self, name: str | None = None, reduction="sum_over_batch_size"):
        super().__init__(name=name, reduction=reduction)

    def get_L(self, num_classes: int | None = None) -> float:  # noqa: N802 (API name)
        """Upper bound of ||d loss / d logits|| (L2) for one sample."""
        raise NotImplementedError

    def _labels(self, y_true, y_pred) -> tf.Tensor:
        """Labels cast to the logits' dtype, refusing shapes that would broadcast.

        Broadcasting (B, 1) integer labels against (B, C) logits would give a
        label of norm up to sqrt(C) and break `get_L`, so shapes must match.
        """
        y_true = tf.convert_to_tensor(y_true)
        if (
            len(y_true.shape) != 2
            or len(y_pred.shape) != 2
            or (y_true.shape[-1] != y_pred.shape[-1])
        ):
            raise ValueError(
                f"{self.name} needs labels and logits of the same shape (batch, "
                f"outputs), e.g. one-hot labels. Received: labels {y_true.shape}, "
                f"logits {y_pred.shape}"
            )
        return tf.cast(y_true, y_pred.dtype)


def _one_hot_labels(y_true, y_pred):
    """Any label tensor -> the one-hot vector of its largest entry."""
    return tf.one_hot(
        tf.argmax(y_true, axis=-1), tf.shape(y_pred)[-1], dtype=y_pred.dtype
    )


#: Largest temperature: tau * z must stay far inside float32 for logits up
#: to the models' activation bound (1e18); a review's tau = 1e27 overflowed
#: for one sample only (its presence shown by a NaN update).
MAX_TAU = 1e6
#: Smallest temperature: from tau ~ 1e-38 (float32's smallest normal) every
#: gradient was NaN, for every sample (a review; 1e-37 still trained).
MIN_TAU = 1e-30


def _require_tau(tau, owner: str) -> float:
    tau = require_positive("tau", tau, owner)
    if not MIN_TAU <= tau <= MAX_TAU:
        raise ValueError(
            f"`tau` of {owner} must be in [{MIN_TAU:g}, {MAX_TAU:g}] (tau * "
            "logits would overflow float32 above, and underflow below). "
            f"Received: tau={tau!r}"
        )
    return tau


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_TauCategoricalCrossentropy(DPLoss):
    """Cross-entropy of softmax(tau * z), divided by tau.

    Gradient w.r.t. z: `s * softmax(tau z) - y` with y >= 0, s = sum(y) <= 1;
    both terms lie in the simplex scaled by s, whose diameter is s * sqrt(2),
    so L = sqrt(2) (approached when the softmax puts all mass on a wrong
    class). Labels are clipped to [0, 1] and rescaled to sum at most 1.

    Args:
        tau: temperature (> 0); larger tau behaves more like a hinge.
    """

    def __init__(
        self, tau: float = 1.0, name: str = "DP_TauCategoricalCrossentropy", **kw
    ):
        super().__init__(name=name, **kw)
        self.tau = _require_tau(tau, "DP_TauCategoricalCrossentropy")

    def call(self, y_true, y_pred):
        y = tf.clip_by_value(self._labels(y_true, y_pred), 0.0, 1.0)
        y = y / tf.maximum(1.0, tf.reduce_sum(y, axis=-1, keepdims=True))
        log_p = tf.nn.log_softmax(self.tau * y_pred, axis=-1)
        return -tf.reduce_sum(y * log_p, axis=-1) / self.tau

    def get_L(self, num_classes=None):
        return math.sqrt(2.0)

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_TauBCE(DPLoss):
    """Binary cross-entropy of sigmoid(tau * z) / tau, averaged over the d outputs.

    Gradient: `(sigmoid(tau z_j) - y_j) / d` per output, each in [-1/d, 1/d]
    for y in [0, 1] (labels are clipped there), so L = 1/sqrt(d) (1 when d
    is unknown).

    Args:
        tau: temperature (> 0).
    """

    def __init__(self, tau: float = 1.0, name: str = "DP_TauBCE", **kw):
        super().__init__(name=name, **kw)
        self.tau = _require_tau(tau, "DP_TauBCE")

    def call(self, y_true, y_pred):
        y = tf.clip_by_value(self._labels(y_true, y_pred), 0.0, 1.0)
        per_output = tf.nn.sigmoid_cross_entropy_with_logits(
            labels=y, logits=self.tau * y_pred
        )
        return tf.reduce_mean(per_output, axis=-1) / self.tau

    def get_L(self, num_classes=None):
        return 1.0 if num_classes is None else 1.0 / math.sqrt(num_classes)

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_KCosineSimilarity(DPLoss):
    """Negative cosine similarity with the logits softly normalised at radius K.

    loss = -<y / ||y||, z / max(||z||, K)>. The map z -> z / max(||z||, K) is
    (1/K)-Lipschitz (Jacobian I/K inside the ball, (I - uu^T)/||z|| outside),
    and ||y/||y|||| <= 1, so L = 1/K, reached for small z.

    Args:
        K: radius (> 0) below which the logits are not normalised.
    """

    def __init__(self, K: float = 1.0, name: str = "DP_KCosineSimilarity", **kw):  # noqa: N803
        super().__init__(name=name, **kw)
        self.K = require_positive("K", K, "DP_KCosineSimilarity")

    def call(self, y_true, y_pred):
        y = self._labels(y_true, y_pred)
        # stable norms: a label of entries near 1e-19 (squares flushed to 0)
        # got a norm too small and y / ||y|| a norm of sqrt(C) (a review)
        y_norm = stable_norm(y, axis=-1)
        y = y / tf.where(y_norm > 0, y_norm, tf.ones_like(y_norm))
        z = y_pred / tf.maximum(stable_norm(y_pred, axis=-1), self.K)
        return -tf.reduce_sum(y * z, axis=-1)

    def get_L(self, num_classes=None):
        return 1.0 / self.K

    def get_config(self):
        return {**super().get_config(), "K": self.K}


def _kr_term(onehot, y_pred):
    """z_k - mean_{j != k} z_j for the true class k (needs C >= 2)."""
    c = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
    true_logit = tf.reduce_sum(onehot * y_pred, axis=-1)
    others = tf.reduce_sum((1.0 - onehot) * y_pred, axis=-1) / (c - 1.0)
    return true_logit - others


def _hinge_term(onehot, y_pred, min_margin):
    """deel-lip's multiclass hinge:
    [(C-1) relu(m/2 - z_k) + sum_{j!=k} relu(m/2 + z_j)] / C."""
    c = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
    sign = 2.0 * onehot - 1.0
    hinge = tf.nn.relu(min_margin / 2.0 - sign * y_pred)
    hinge = tf.where(onehot > 0, hinge * (c - 1.0), hinge)
    return tf.reduce_sum(hinge, axis=-1) / c


def _check_classes(num_classes, loss):
    if num_classes is not None and num_classes < 2:
        raise ValueError(
            f"{loss} needs at least 2 classes. Received: num_classes={num_classes}"
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MulticlassKR(DPLoss):
    """Per-sample Kantorovich-Rubinstein loss: -(z_k - mean_{j != k} z_j).

    Gradient: -(e_k - (1 - e_k)/(C-1)), norm sqrt(C/(C-1)) (sqrt(2) when C
    is unknown). Labels are mapped to the one-hot vector of their argmax.
    """

    def __init__(self, name: str = "DP_MulticlassKR", **kw):
        super().__init__(name=name, **kw)

    def call(self, y_true, y_pred):
        return -_kr_term(_one_hot_labels(self._labels(y_true, y_pred), y_pred), y_pred)

    def get_L(self, num_classes=None):
        _check_classes(num_classes, "DP_MulticlassKR")
        return (
            math.sqrt(2.0)
            if num_classes is None
            else math.sqrt(num_classes / (num_classes - 1))
        )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MulticlassHinge(DPLoss):
    """deel-lip's multiclass hinge with margin `min_margin` (see `_hinge_term`).

    Gradient (all terms active): (1/C) * (-(C-1) e_k + (1 - e_k)), norm
    sqrt((C-1)/C) (1 when C is unknown).

    Args:
        min_margin: margin (> 0).
    """

    def __init__(self, min_margin: float = 1.0, name: str = "DP_MulticlassHinge", **kw):
        super().__init__(name=name, **kw)
        self.min_margin = require_positive(
            "min_margin", min_margin, "DP_MulticlassHinge"
        )

    def call(self, y_true, y_pred):
        onehot = _one_hot_labels(self._labels(y_true, y_pred), y_pred)
        return _hinge_term(onehot, y_pred, self.min_margin)

    def get_L(self, num_classes=None):
        _check_classes(num_classes, "DP_MulticlassHinge")
        return (
            1.0 if num_classes is None else math.sqrt((num_classes - 1) / num_classes)
        )

    def get_config(self):
        return {**super().get_config(), "min_margin": self.min_margin}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MulticlassHKR(DPLoss):
    """Hinge + KR: alpha * hinge - (z_k - mean_{j != k} z_j).

    The hinge gradient is ((C-1)/C) times the KR gradient where all hinge
    terms are active, so the two add up in norm:
    L = sqrt(C/(C-1)) + alpha * sqrt((C-1)/C)  (sqrt(2) + alpha if C unknown).

    Args:
        alpha: weight of the hinge term (>= 0).
        min_margin: margin (> 0).
    """

    def __init__(
        self,
        alpha: float = 10.0,
        min_margin: float = 1.0,
        name: str = "DP_MulticlassHKR",
        **kw,
    ):
        super().__init__(name=name, **kw)
        self.alpha = _checked_alpha(alpha)
        self.min_margin = require_positive("min_margin", min_margin, "DP_MulticlassHKR")

    def call(self, y_true, y_pred):
        onehot = _one_hot_labels(self._labels(y_true, y_pred), y_pred)
        return self.alpha * _hinge_term(onehot, y_pred, self.min_margin) - _kr_term(
            onehot, y_pred
        )

    def get_L(self, num_classes=None):
        _check_classes(num_classes, "DP_MulticlassHKR")
        alpha = _checked_alpha(self.alpha)  # public: checked at every use
        if num_classes is None:
            return math.sqrt(2.0) + alpha
        c = num_classes
        return math.sqrt(c / (c - 1)) + alpha * math.sqrt((c - 1) / c)

    def get_config(self):
        return {
            **super().get_config(),
            "alpha": self.alpha,
            "min_margin": self.min_margin,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_MeanAbsoluteError(DPLoss):
    """Mean over the d outputs of |y - z|; gradient sign(z - y)/d, so L = 1/sqrt(d)."""

    def __init__(self, name: str = "DP_MeanAbsoluteError", **kw):
        super().__init__(name=name, **kw)

    def call(self, y_true, y_pred):
        return tf.reduce_mean(tf.abs(self._labels(y_true, y_pred) - y_pred), axis=-1)

    def get_L(self, num_classes=None):
        return 1.0 if num_classes is None else 1.0 / math.sqrt(num_classes)


def _checked_alpha(alpha) -> float:
    """DP_MulticlassHKR's `alpha` as a float, or a ValueError (a negative
    alpha set after construction gave a constant that passed as positive
    and a per-sample gradient twice its bound: a review)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = float("nan")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(
            "`alpha` of DP_MulticlassHKR must be finite and >= 0. "
            f"Received: alpha={alpha!r}"
        )
    return value


def lipschitz_constant(loss, num_classes: int | None = None) -> float:
    """`loss.get_L(num_classes)`, refusing a loss without one.

    Raises:
        TypeError: the loss has no `get_L` (e.g. a plain Keras loss).
    """
    get_l = getattr(loss, "get_L", None)
    if get_l is None:
        name = (
            getattr(loss, "name", None) or getattr(loss, "__name__", None) or repr(loss)
        )
        raise TypeError(
            "A DP model needs a loss with a Lipschitz constant (`get_L`), such as "
            "deel_lipdp_ext.losses.DP_TauCategoricalCrossentropy. "
            f"Received: loss={name!r}"
        )
    problem = unproven_change(loss, (DPLoss,))
    if problem is not None:
        raise ValueError(f"Loss {loss.name!r} ({type(loss).__name__}) {problem}.")
    value = float(get_l(num_classes))
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Loss {loss.name!r} returned an invalid get_L: {value!r}")
    return value
