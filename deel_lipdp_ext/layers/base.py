"""The DP layer contract: how each layer bounds norms forward and backward.

All bounds are L2 norms of ONE sample's tensor, over all non-batch axes, as
scalar float32 tensors (they may depend on the current weights, so they are
computed in the train step's graph). Residual branches carry tuples of bounds.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
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


class CertifiedKernel:
    """The last kernel a layer certified and its certificate.

    Certifying a convolution (Gram iteration per frequency, float64) is the
    costliest part of a clipless step. The projection certifies the kernel it
    assigns; the next bound pass reuses that number when, and only when, the
    kernel is still bitwise the one certified (an optimizer step, a
    `load_weights` or any assignment in between makes it certify again).

    Both live in ONE int32 variable, the kernel's bits then the float32
    certificate's (as 32-bit words), read and written together, so a
    certificate is never paired with another kernel; the comparison is of
    bits (no cast that could flush subnormals or merge -0.0 and 0.0). It is a
    plain object holding a raw `tf.Variable`: neither Keras nor
    `tf.train.Checkpoint` tracks it, so it is never saved or loaded and no
    file can supply a certificate. A NaN certificate is never served (NaN at
    creation: nothing certified). Kernels of 16-bit floats are not
    remembered (always certified).
    """

    def __init__(self, size: int, dtype, name: str):
        """`size` entries of `dtype`, the kernel's."""
        itemsize = tf.as_dtype(dtype).size
        self.kernel_words = size * itemsize // 4 if itemsize % 4 == 0 else None
        self.variable = None
        if self.kernel_words is None:
            return
        with tf.init_scope():  # built inside a traced step too (no Input)
            empty = tf.concat(
                [
                    tf.zeros([self.kernel_words], tf.int32),
                    _words(tf.constant([np.nan])),
                ],
                axis=0,
            )
            self.variable = tf.Variable(empty, trainable=False, name=name)

    def store(self, kernel: tf.Tensor, certificate: tf.Tensor) -> None:
        """Remember `certificate` (scalar float32, a certified bound) for
        exactly these kernel bits."""
        certificate = tf.convert_to_tensor(certificate)
        if certificate.dtype != tf.float32:  # a cast could round it down
            raise TypeError(f"A certificate is float32. Received: {certificate.dtype}")
        if self._matches_size(kernel):
            own = _words(tf.reshape(certificate, [1]))
            self.variable.assign(tf.concat([_words(kernel), own], axis=0))

    def lookup(self, kernel: tf.Tensor, certify) -> tf.Tensor:
        """The certificate of `kernel`: the remembered one if `kernel` is
        bitwise the remembered kernel, else `certify(kernel)` (remembered).
        Scalar float32."""
        kernel = tf.convert_to_tensor(kernel)
        if not self._matches_size(kernel):
            return certify(kernel)  # nothing to reuse
        stored = self.variable.read_value()  # one read: kernel and certificate
        remembered = tf.bitcast(stored[self.kernel_words], tf.float32)
        same = tf.logical_and(
            tf.reduce_all(tf.equal(stored[: self.kernel_words], _words(kernel))),
            tf.logical_not(tf.math.is_nan(remembered)),
        )

        def certify_and_store():
            certificate = certify(kernel)
            self.store(kernel, certificate)
            return tf.identity(certificate)

        return tf.cond(same, lambda: remembered, certify_and_store)

    def _matches_size(self, kernel: tf.Tensor) -> bool:
        """Whether `kernel` fills exactly the remembered words."""
        kernel = tf.convert_to_tensor(kernel)
        size = kernel.shape.num_elements()
        if self.kernel_words is None or size is None or kernel.dtype.size % 4:
            return False
        return size * kernel.dtype.size // 4 == self.kernel_words


def _words(value: tf.Tensor) -> tf.Tensor:
    """The bits of a tensor of rank >= 1 with 32- or 64-bit entries, as flat
    int32 words."""
    return tf.reshape(tf.bitcast(value, tf.int32), [-1])


class KernelLayer(DPLayer):
    """A linear layer whose forward pass uses `self.kernel` directly.

    Subclasses give `_certificate(kernel)` (a certified Lipschitz bound of a
    kernel), `_projected()` (the projected kernel and its certificate) and
    `backpropagate_params`; the forward and input-gradient bounds follow.
    """

    def _add_kernel(self, shape: tuple, out_features: int, initializer) -> None:
        """Create `kernel`, the power-iteration vector `u` used by `project`
        and the remembered certificate (`CertifiedKernel`)."""
        self.kernel = self.add_weight(
            name="kernel", shape=shape, initializer=initializer
        )
        self.u = self.add_weight(
            name="power_iteration_u",
            shape=(1, out_features),
            initializer=keras.initializers.RandomUniform(0.0, 1.0, seed=0),
            trainable=False,
        )
        self._certified = CertifiedKernel(
            math.prod(int(d) for d in shape),
            self.kernel.dtype,
            f"{self.name}_certified_kernel",
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
        """The current kernel's certificate (remembered or computed)."""
        return self._certified.lookup(self.kernel, self._certificate)

    def _certificate(self, kernel: tf.Tensor) -> tf.Tensor:
        """Certified upper bound of the Lipschitz constant with this kernel."""
        raise NotImplementedError

    def _projected(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The projected kernel and a certified bound of its Lipschitz
        constant (scalar float32)."""
        raise NotImplementedError

    def project(self) -> None:
        """Assign the projected kernel and remember its certificate."""
        kernel, certificate = self._projected()
        self.kernel.assign(kernel)
        self._certified.store(kernel, certificate)

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
    """L2 norm of each sample of `x` over all non-batch axes (`stable_norm`).
    Shape (batch,)."""
    x = tf.reshape(x, (tf.shape(x)[0], -1))
    return stable_norm(x, axis=1)[:, 0]


def float64_square_sum(x: tf.Tensor, axis, keepdims: bool = False) -> tf.Tensor:
    """Sum of squares of `x` over `axis`, accumulated in float64 (a float32
    sum of n squares can round up to (n - 1) 2^-24 low), in `x`'s dtype."""
    squares = tf.square(tf.cast(x, tf.float64))
    return tf.cast(tf.reduce_sum(squares, axis=axis, keepdims=keepdims), x.dtype)


def example_squares(x: tf.Tensor) -> tf.Tensor:
    """Sum of squares of each example of `x` (batch, ...), shape (batch,).
    Float32 partial sums of at most 256 entries, added in float64: it rounds
    at most ~255 * 2^-24 low whatever the size (a float32 sum of 2^24
    squares rounded 1e-3 low under XLA, and a clip by it let 1.001 C
    through). Inner dimensions unknown at trace time: summed in float64."""
    inner = x.shape[1:]
    if None in inner:
        return float64_square_sum(tf.reshape(x, [tf.shape(x)[0], -1]), axis=1)
    size = math.prod(inner)
    chunk = math.gcd(size, 256)
    squares = tf.reshape(tf.square(x), [-1, size // chunk, chunk])
    partial = tf.cast(tf.reduce_sum(squares, axis=2), tf.float64)
    return tf.cast(tf.reduce_sum(partial, axis=1), x.dtype)


def stable_norm(x: tf.Tensor, axis) -> tf.Tensor:
    """L2 norm of `x` over `axis` (kept as size-1 axes), computed as
    ``peak * ||x / peak||`` with ``peak = max |x|``, so that no square under-
    or overflows. TensorFlow's CPU kernels flush subnormal results to zero:
    the plain sum of squares drops every entry below ~1.1e-19, and a norm
    used as a divisor (x / ||x||) then amplifies (a review found an L2
    pooling gradient 11x its bound). Gradient ``x / ||x||`` (0 where the
    norm is 0): at most 1 in norm, whatever the scale."""

    @tf.custom_gradient
    def norm(x):
        peak = tf.reduce_max(tf.abs(x), axis=axis, keepdims=True)
        positive = peak > 0
        safe_peak = tf.where(positive, peak, tf.ones_like(peak))
        value = safe_peak * tf.sqrt(
            float64_square_sum(x / safe_peak, axis=axis, keepdims=True)
        )
        value = tf.where(positive, value, tf.zeros_like(value))

        def grad(upstream):
            safe_value = tf.where(positive, value, tf.ones_like(value))
            return upstream * tf.where(positive, x / safe_value, tf.zeros_like(x))

        return value, grad

    return norm(x)


def as_bound(value: Any) -> tf.Tensor:
    """A bound as a scalar float32 tensor."""
    return tf.cast(tf.convert_to_tensor(value), tf.float32)
