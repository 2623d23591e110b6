"""Lipschitz dense layers without bias (the bias is `DP_AddBias`).

The forward pass uses the kernel directly, `y = x @ K`, so one sample's kernel
gradient is the outer product `x ⊗ g` with norm `||x|| * ||g||` (docs/design.md,
rule 2). The constraint is a projection applied after each optimizer step;
the bound passes use a certified upper bound of `||K||_2` from the current
weights (rule 5), never the hoped-for 1.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .._validation import NO_BIAS, pop_harmless, require_positive
from .base import KernelLayer
from .spectral import (
    rescale_to_certificate,
    spectral_norm_upper_bound,
    spectral_project,
)

_PACKAGE = "deel_lipdp_ext"


class _LipschitzDense(keras.layers.Layer, KernelLayer):
    """Shared code of the three dense layers; subclasses choose `_project_kernel`."""

    #: Whether the projection ends by rescaling the kernel to certificate 1
    #: (the spectral ones; for the orthogonal one, Björck's input comes from a
    #: power iteration, which stops short of the top singular value).
    rescales_to_certificate = True

    def __init__(
        self,
        units: int,
        kernel_initializer: str | keras.initializers.Initializer = "orthogonal",
        nm_coef: float = 1.0,
        **kwargs,
    ):
        pop_harmless(kwargs, type(self).__name__, {"use_bias": NO_BIAS})
        super().__init__(**kwargs)
        if not isinstance(units, int) or isinstance(units, bool) or units <= 0:
            raise ValueError(
                f"`units` of {type(self).__name__} must be a positive integer. "
                f"Received: units={units!r}"
            )
        self.units = units
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.nm_coef = require_positive("nm_coef", nm_coef, type(self).__name__)

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' expects inputs of shape "
                f"(batch, features); flatten first. Received: {input_shape}"
            )
        self._add_kernel(
            (input_shape[-1], self.units), self.units, self.kernel_initializer
        )
        self.project()

    def call(self, inputs):
        return keras.ops.matmul(inputs, self.kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.units)

    def _certificate(self, kernel) -> tf.Tensor:
        """Certified upper bound of the Lipschitz constant (L2): ||K||_2."""
        return spectral_norm_upper_bound(kernel)

    def backpropagate_params(self, input_bound, gradient_bound):
        return input_bound * gradient_bound

    def _projected(self):
        """The subclass's projection; for the spectral ones, then a rescaling
        by the certified norm (to certificate 1), whose certificate follows
        from the one before it (`rescale_to_certificate`)."""
        kernel = self._project_kernel(self.kernel)
        bound = self._certificate(kernel)
        if not self.rescales_to_certificate:
            return kernel, bound
        return rescale_to_certificate(kernel, bound)

    def _project_kernel(self, kernel):
        raise NotImplementedError

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "nm_coef": self.nm_coef,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_QuickSpectralDense(_LipschitzDense):
    """Dense layer (no bias) kept at spectral norm ~1 by a post-step projection.

    Args:
        units: output features.
        kernel_initializer: initializer of the (in, units) kernel.
        nm_coef: share of noise under the per-layer strategy.

    deel-lipdp's `use_bias=False` is accepted (there is no bias);
    `use_bias=True` is refused: add `DP_AddBias` after the layer for a bias.

    Shapes: (batch, in) -> (batch, units).

    Example:
        >>> layer = DP_QuickSpectralDense(10)
    """

    def _project_kernel(self, kernel):
        """Nothing before the rescaling to certificate 1, which is the whole
        projection: a spectral normalisation first would divide the kernel by
        a number that the rescaling then divides out (only the rounding would
        differ), for a power iteration per step."""
        return kernel


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_SpectralDense(_LipschitzDense):
    """Dense layer (no bias) projected to an orthogonal matrix after each step.

    Spectral normalisation then Björck orthonormalisation: all singular
    values ~1, so the layer preserves gradient norms (GNP). Unlike deel-lip's
    SpectralDense, the forward pass does not re-normalise the kernel: the
    projection is post-processing, and the simple `||x|| * ||g||` gradient
    bound stays true (docs/design.md, rule 2).

    Args: as `DP_QuickSpectralDense`.
    """

    def _project_kernel(self, kernel):
        return spectral_project(kernel, self.u, 1.0, orthogonalize=True)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_QuickFrobeniusDense(_LipschitzDense):
    """Dense layer (no bias) projected to Frobenius norm 1 after each step.

    `||K||_2 <= ||K||_F = 1`; cheaper than the spectral projection and the
    natural choice for a last layer with few outputs.

    Args: as `DP_QuickSpectralDense`.
    """

    rescales_to_certificate = False  # ||K||_F = 1 is the constraint

    def _project_kernel(self, kernel):
        norm = tf.norm(kernel)
        return kernel / tf.where(norm > 0, norm, tf.ones_like(norm))
