"""Lipschitz 2-D convolutions without bias (the bias is `DP_AddBias`).

Let M be the kernel reshaped to (kh*kw*c_in, c_out) and P the matrix whose
rows are one sample's input patches. Each input pixel lies in at most
`n = ceil(kh/sh) * ceil(kw/sw)` patches, so ||P||_F <= sqrt(n) * ||x||. Then

* the output is P @ M: ||y|| <= ||M||_2 * ||P||_F <= sqrt(n) * ||M||_2 * ||x||,
  so `sqrt(n) * ||M||_2` (||M||_2 certified by Gram iteration) bounds the
  layer's Lipschitz constant, zero padding included (padding only drops
  terms);
* the kernel gradient is P^T @ G: ||P^T G||_F <= ||P||_F * ||G||_F
  <= sqrt(n) * ||x|| * ||g||  (docs/design.md rule 4; no padding factor: the
  constant image with a constant upstream gradient comes within 5% of it).

`sqrt(n) * ||M||_2` bounds the operator but is loose for most kernels (the
true norm of a random 3x3 kernel is about half of it). When the input size is
known at build time, the layer also certifies the OPERATOR: the circular
convolution on an (H + kh - 1, W + kw - 1) grid contains every zero-padded or
strided convolution of an (H, W) input as a crop, and its norm is bounded
per frequency by Gram iteration (`spectral.conv_operator_norm_upper_bound`,
within ~1% of the truth). The certificate is the smaller of the two bounds;
only the one that can be smaller is computed (`_certificate`).

The projection after each step rescales the kernel so that its certificate is
1 (post-processing): the layer then really is ~1-Lipschitz, not ~0.5. The
rescaled kernel's certificate follows from the one computed before the
division plus the measured rounding error (`spectral.rescaled_certificate`),
and the next bound pass reuses it while the kernel is bitwise unchanged
(`base.CertifiedKernel`): one Gram iteration per step, not two.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from .._validation import (
    NO_BIAS,
    pop_harmless,
    require_one_of,
    require_positive,
    require_positive_ints,
)
from .base import KernelLayer
from .spectral import (
    conv_operator_norm_upper_bound,
    conv_overlap,
    rescale_to_certificate,
    spectral_norm_upper_bound,
    spectral_project,
)

_PACKAGE = "deel_lipdp_ext"


class _LipschitzConv2D(keras.layers.Layer, KernelLayer):
    """Shared code of the two convolutions (channels-last)."""

    orthogonalize = False

    def __init__(
        self,
        filters: int,
        kernel_size: int | tuple[int, int],
        strides: int | tuple[int, int] = 1,
        padding: str = "same",
        kernel_initializer: str | keras.initializers.Initializer = "orthogonal",
        nm_coef: float = 1.0,
        **kwargs,
    ):
        layer = type(self).__name__
        # Keras / deel-lipdp arguments, accepted at the values this layer has.
        pop_harmless(
            kwargs,
            layer,
            {
                "use_bias": NO_BIAS,
                "dilation_rate": ((1, (1, 1), [1, 1]), "no dilation is supported."),
                "data_format": (
                    ("channels_last", None),
                    "inputs are channels-last.",
                ),
            },
        )
        super().__init__(**kwargs)
        if not isinstance(filters, int) or isinstance(filters, bool) or filters <= 0:
            raise ValueError(
                f"`filters` of {layer} must be a positive integer. "
                f"Received: filters={filters!r}"
            )
        self.filters = filters
        self.kernel_size = require_positive_ints("kernel_size", kernel_size, 2, layer)
        self.strides = require_positive_ints("strides", strides, 2, layer)
        self.padding = require_one_of("padding", padding, ("same", "valid"), layer)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.nm_coef = require_positive("nm_coef", nm_coef, layer)
        self._geometry = (self.kernel_size, self.strides, self.padding)

    @property
    def overlap(self) -> int:
        """How many kernel windows can cover one input position (the
        construction-time geometry, checked by `_check_geometry`)."""
        kernel_size, strides, _ = self._check_geometry()
        return conv_overlap(kernel_size, strides)

    def _check_geometry(self) -> tuple:
        """The (kernel_size, strides, padding) of construction, which the
        bounds and the certificate are computed for.

        Raises:
            ValueError: one of them changed since (a stride set from 2 to 1
                after construction left the kernel-gradient bound 1.44 times
                too small, and the certificate 1.09 times: a review).
        """
        now = (tuple(self.kernel_size), tuple(self.strides), self.padding)
        if now != self._geometry:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': kernel_size, strides and "
                "padding cannot change after construction (its gradient bound "
                f"and certificate are computed for them). Constructed with "
                f"{self._geometry}, now {now}; build a new layer instead."
            )
        return self._geometry

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' expects (batch, H, W, C) "
                f"inputs. Received: {input_shape}"
            )
        shape = (*self.kernel_size, input_shape[-1], self.filters)
        spatial = tuple(input_shape[1:3])
        # The operator certificate needs the input size (None: unknown).
        self.input_size = None if None in spatial else tuple(int(d) for d in spatial)
        self._add_kernel(shape, self.filters, self.kernel_initializer)
        self.project()

    def call(self, inputs):
        self._check_geometry()
        if self.input_size is not None:
            # The operator certificate holds for the build-time input size only.
            spatial = tuple(inputs.shape[1:3])
            if None not in spatial and spatial != self.input_size:
                raise ValueError(
                    f"{type(self).__name__} '{self.name}' was built (and certified) "
                    f"for {self.input_size} inputs. Received: {spatial}"
                )
            if None in spatial:
                with tf.control_dependencies(
                    [
                        tf.debugging.assert_equal(
                            tf.shape(inputs)[1:3],
                            tf.constant(self.input_size, tf.int32),
                            message=f"'{self.name}' certified for {self.input_size}",
                        )
                    ]
                ):
                    inputs = tf.identity(inputs)
        return keras.ops.conv(
            inputs, self.kernel, strides=self.strides, padding=self.padding
        )

    def compute_output_shape(self, input_shape):
        return keras.ops.conv(
            keras.KerasTensor(input_shape),
            keras.KerasTensor((*self.kernel_size, input_shape[-1], self.filters)),
            strides=self.strides,
            padding=self.padding,
        ).shape

    def _kernel_matrix(self, kernel):
        return tf.reshape(kernel, (-1, self.filters))

    def _certificate(self, kernel) -> tf.Tensor:
        """Certified bound: the smaller of sqrt(overlap) * ||M||_2 and the
        operator bound for the build-time input size (module docstring).

        Only a bound that can be the smaller one is computed. With unit
        strides (overlap = kh * kw taps K_t), each frequency's matrix
        sum_t e^(i w t) K_t has norm <= sqrt(overlap) * ||M||_2
        (Cauchy-Schwarz over the taps), so the operator bound is the smaller
        up to the Gram iteration's slack. Without overlap (kernel <= stride),
        the grid's frequencies average ||sum_t e^(i w t) K_t x||^2 to
        ||M x||^2 (Parseval), so the operator bound is >= ||M||_2."""
        _, strides, _ = self._check_geometry()
        reshaped_only = self.input_size is None or self.overlap == 1
        if not reshaped_only and strides == (1, 1):
            return conv_operator_norm_upper_bound(kernel, self.input_size)
        reshaped = math.sqrt(self.overlap) * spectral_norm_upper_bound(
            self._kernel_matrix(kernel)
        )
        if reshaped_only:
            return reshaped
        operator = conv_operator_norm_upper_bound(kernel, self.input_size)
        return tf.minimum(reshaped, operator)

    def backpropagate_params(self, input_bound, gradient_bound):
        return math.sqrt(self.overlap) * input_bound * gradient_bound

    def _projected(self):
        """Spectral normalisation (Björck orthonormalisation for the
        orthogonal variant) of M to 1/sqrt(overlap); then, if the input size
        is known, a rescaling of the kernel to certificate 1, whose
        certificate follows from the one computed before it
        (`spectral.rescale_to_certificate`: one Gram iteration per step).
        Without Björck, that rescaling is the whole projection: the spectral
        normalisation before it would only divide by a number the rescaling
        divides out, so it is skipped (no power iteration per step)."""
        kernel = self.kernel
        if self.orthogonalize or self.input_size is None:
            matrix = spectral_project(
                self._kernel_matrix(kernel),
                self.u,
                1.0 / math.sqrt(self.overlap),
                orthogonalize=self.orthogonalize,
            )
            kernel = tf.reshape(matrix, tf.shape(kernel))
        bound = self._certificate(kernel)
        if self.input_size is None:
            return kernel, bound
        return rescale_to_certificate(
            kernel, bound, taps=self.kernel_size[0] * self.kernel_size[1]
        )

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "nm_coef": self.nm_coef,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_QuickSpectralConv2D(_LipschitzConv2D):
    """2-D convolution (no bias) with certified Lipschitz constant ~1.

    After each step the reshaped kernel is spectrally normalised to
    `1 / sqrt(ceil(kh/sh) * ceil(kw/sw))`. With `kernel_size == strides` the
    patches do not overlap and nothing is lost to that factor.

    Args:
        filters: output channels.
        kernel_size: int or (kh, kw).
        strides: int or (sh, sw).
        padding: "same" or "valid".
        kernel_initializer: initializer of the (kh, kw, c_in, filters) kernel.
        nm_coef: share of noise under the per-layer strategy.

    deel-lipdp's `use_bias=False` is accepted (there is no bias);
    `use_bias=True` is refused: add `DP_AddBias` after the layer for a bias.

    Shapes: (batch, H, W, c_in) -> (batch, H', W', filters).

    Raises:
        ValueError: `use_bias=True`, a dilation or channels-first data, or a
            bad filter count, kernel size, stride or padding.

    Example:
        >>> layer = DP_QuickSpectralConv2D(16, 3, padding="same")
    """


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DP_SpectralConv2D(_LipschitzConv2D):
    """As `DP_QuickSpectralConv2D`, with Björck orthonormalisation of the
    reshaped kernel in the projection (all its singular values equal).

    Args: as `DP_QuickSpectralConv2D`.
    """

    orthogonalize = True
