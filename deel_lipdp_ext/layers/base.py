"""The DP layer contract: how each layer bounds norms forward and backward.

All bounds are L2 norms of ONE sample's tensor, over all non-batch axes, as
scalar float32 tensors (they may depend on the current weights, so they are
computed in the train step's graph). Residual branches carry tuples of bounds.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf

Bound = Any  # a scalar tensor, or a tuple of them on residual branches


class DPLayer:
    """Mixin every DP layer implements (see docs/design.md, "The bound contract").

    Attributes:
        nm_coef: the layer's share of noise under the per-layer strategy: its
            gradient gets noise of std `sigma * bound * nm_coef`.
    """

    nm_coef: float = 1.0

    def propagate_inputs(self, input_bound: Bound) -> Bound:
        """Bound on the output norm, given the bound on the input norm."""
        raise NotImplementedError(f"{type(self).__name__}.propagate_inputs")

    def backpropagate_inputs(self, input_bound: Bound, gradient_bound: Bound) -> Bound:
        """Bound on dLoss/dInput, given the bound on dLoss/dOutput."""
        raise NotImplementedError(f"{type(self).__name__}.backpropagate_inputs")

    def backpropagate_params(self, input_bound: Bound, gradient_bound: Bound) -> Bound:
        """Bound on the per-sample gradient of the layer's bounded variable."""
        raise NotImplementedError(f"{type(self).__name__}.backpropagate_params")

    def has_parameters(self) -> bool:
        """Whether the layer owns a trainable variable (`bounded_variable`)."""
        return False

    @property
    def bounded_variable(self) -> keras.Variable | None:
        """The trainable variable `backpropagate_params` bounds, if any."""
        return None

    def project(self) -> None:
        """Post-step projection onto the constraint set (post-processing)."""

    def sublayers(self) -> list:
        """The DP layers this layer calls (a wrapper's inner layer), so the
        model's checks see every layer of the chain."""
        return []


class GNPLayer(DPLayer):
    """A parameter-free layer f with ||f(x)|| <= ||x|| and Lipschitz constant 1.

    Such a layer leaves both the forward bound and the backward bound unchanged.
    """

    def propagate_inputs(self, input_bound: Bound) -> Bound:
        return input_bound

    def backpropagate_inputs(self, input_bound: Bound, gradient_bound: Bound) -> Bound:
        return gradient_bound


#: Every bounding step (the data loaders' rescaling, `DP_BoundedInput`'s
#: projection) aims this fraction of the bound, so float32 rounding of the
#: rescaled values (~1e-7 relative) stays below the bound itself.
BOUND_MARGIN = 1.0 - 1e-6

_PASS_CACHE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "dp_bound_pass_cache", default=None
)


@contextlib.contextmanager
def bound_pass() -> Iterator[None]:
    """Within one bound pass, each layer's certificate is computed once.

    The forward and backward passes both need a kernel layer's Lipschitz
    certificate (a Gram iteration); the cache lives only for the pass, so it
    can never serve a certificate of weights that have since changed.
    """
    token = _PASS_CACHE.set({})
    try:
        yield
    finally:
        _PASS_CACHE.reset(token)


class KernelLayer(DPLayer):
    """A linear layer whose forward pass uses `self.kernel` directly.

    Subclasses give `_certify()` (a certified Lipschitz bound from the current
    weights) and `backpropagate_params`; the forward and input-gradient
    bounds follow.
    """

    def _add_kernel(self, shape: tuple, out_features: int, initializer) -> None:
        """Create `kernel` and the power-iteration vector `u` used by `project`."""
        self.kernel = self.add_weight(
            name="kernel", shape=shape, initializer=initializer
        )
        self.u = self.add_weight(
            name="power_iteration_u",
            shape=(1, out_features),
            initializer=keras.initializers.RandomUniform(0.0, 1.0, seed=0),
            trainable=False,
        )

    def lipschitz_bound(self) -> tf.Tensor:
        """Certified upper bound of the layer's L2 Lipschitz constant."""
        cache = _PASS_CACHE.get()
        if cache is None:
            return self._certify()
        if id(self) not in cache:
            cache[id(self)] = self._certify()
        return cache[id(self)]

    def _certify(self) -> tf.Tensor:
        raise NotImplementedError

    def propagate_inputs(self, input_bound: Bound) -> Bound:
        return self.lipschitz_bound() * input_bound

    def backpropagate_inputs(self, input_bound: Bound, gradient_bound: Bound) -> Bound:
        return self.lipschitz_bound() * gradient_bound

    def has_parameters(self) -> bool:
        return True

    @property
    def bounded_variable(self) -> keras.Variable:
        return self.kernel


def sample_norms(x: tf.Tensor) -> tf.Tensor:
    """L2 norm of each sample of `x` over all non-batch axes. Shape (batch,)."""
    x = tf.reshape(x, (tf.shape(x)[0], -1))
    return tf.norm(x, axis=1)


def as_bound(value: Any) -> tf.Tensor:
    """A bound as a scalar float32 tensor."""
    return tf.cast(tf.convert_to_tensor(value), tf.float32)
