"""Mask descriptions and the per-parameter mask state of suppress privacy.

``MaskLayerDes`` says which parameter to suppress; ``GradMask`` (the
multiply-mask M) and ``DeWeight`` (the one-shot add-mask A) hold its state for
the gradient rewrite ``g' = A + g * M``. Both keep a NumPy copy (what the
controller computes on) and, once a ``SuppressModel`` is linked, write every
update to the model's variables (what the compiled train step reads).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._checks import check_type, check_value


class MaskLayerDes:
    """Describes one parameter to suppress.

    Args:
        layer_name: a substring of the parameter's Keras ``variable.path``
            (e.g. ``"fc1/kernel"``); the first not-yet-matched description whose
            name is in a parameter's path claims that parameter.
        grad_idx: the parameter's index in ``network.trainable_variables``
            (the order of the gradients).
        is_add_noise: add uniform noise to large kept weights at each update.
        is_lower_clip: push small kept weights up to magnitude 0.005.
        min_num: number of weights that must stay unsuppressed (negative: none).
        upper_bound: maximum |w| of the layer (``max(0.1, upper_bound)`` is used).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: ``grad_idx < 0`` or ``upper_bound <= 0``.

    Reference: MindArmour ``mindarmour.privacy.sup_privacy.MaskLayerDes``.
    """

    def __init__(
        self,
        layer_name: str,
        grad_idx: int,
        is_add_noise: bool,
        is_lower_clip: bool,
        min_num: int,
        upper_bound: float = 1.20,
    ):
        self.layer_name = check_type("layer_name", layer_name, (str,))
        self.grad_idx = check_type("grad_idx", grad_idx, (int,))
        check_value("grad_idx", grad_idx, grad_idx >= 0, "non-negative")
        self.is_add_noise = check_type("is_add_noise", is_add_noise, (bool,))
        self.is_lower_clip = check_type("is_lower_clip", is_lower_clip, (bool,))
        self.min_num = check_type("min_num", min_num, (int,))
        check_type("upper_bound", upper_bound, (int, float))
        self.upper_bound = check_value(
            "upper_bound", upper_bound, upper_bound > 0, "> 0"
        )
        self.inited = False

    def get_config(self) -> dict[str, Any]:
        return {
            "layer_name": self.layer_name,
            "grad_idx": self.grad_idx,
            "is_add_noise": self.is_add_noise,
            "is_lower_clip": self.is_lower_clip,
            "min_num": self.min_num,
            "upper_bound": self.upper_bound,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"MaskLayerDes({args})"


def part_count(para_num: int) -> int:
    """Parts a huge layer is split into: halve while > 1e9, even and < 16 parts."""
    parts, size = 1, para_num
    while size > 1e9 and size % 2 == 0 and parts < 16:
        size //= 2
        parts *= 2
    return parts


class GradMask:
    """Multiply-mask M of one gradient (1 keep, 0 suppressed), persistent.

    A placeholder (``mask_able=False``, shape ``[1]``) is never applied.
    """

    def __init__(self, shape=(1,), des: MaskLayerDes | None = None):
        self.shape = tuple(shape)
        self.mask_able = des is not None
        self.mul_mask_array_flat = np.ones(int(np.prod(self.shape)), np.float32)
        self.para_num = self.mul_mask_array_flat.size
        self.layer_name = des.layer_name if des else ""
        self.is_add_noise = des.is_add_noise if des else False
        self.is_lower_clip = des.is_lower_clip if des else False
        self.min_num = des.min_num if des else 0
        self.upper_bound = max(0.10, des.upper_bound) if des else 1.20
        self.is_approximity = self.mask_able and self.para_num > 10000
        if self.is_approximity:
            self.is_add_noise = False
            self.is_lower_clip = False
        self.part_num = part_count(self.para_num) if self.mask_able else 1
        self.sparse_pos_list = [0]
        self.variable = None  # the SuppressModel's copy, set when linked

    def update(self) -> None:
        """Publishes the NumPy mask to the linked model."""
        if self.variable is not None:
            self.variable.assign(self.mul_mask_array_flat.reshape(self.shape))

    def pull(self) -> None:
        """Reads the mask back from the linked model (after a load)."""
        if self.variable is not None:
            self.mul_mask_array_flat = np.asarray(self.variable.numpy()).reshape(-1)


class DeWeight:
    """One-shot add-mask A of one gradient: applied at the step after an update."""

    def __init__(self, shape=(1,), mask_able: bool = False):
        self.shape = tuple(shape)
        self.mask_able = mask_able
        self.add_mask_array_flat = np.zeros(int(np.prod(self.shape)), np.float32)
        self.just_update = -1.0
        self.variable = None  # the SuppressModel's copies, set when linked
        self.armed_variable = None

    def update(self) -> None:
        """Arms the add-mask (and publishes it to the linked model)."""
        self.just_update = 1.0
        if self.variable is not None:
            self.variable.assign(self.add_mask_array_flat.reshape(self.shape))
            self.armed_variable.assign(1.0)

    def reset_zeros(self) -> None:
        """Disarms the add-mask."""
        self.just_update = -1.0
        if self.armed_variable is not None:
            self.armed_variable.assign(0.0)

    def pull(self) -> None:
        if self.variable is not None:
            self.add_mask_array_flat = np.asarray(self.variable.numpy()).reshape(-1)
            self.just_update = 1.0 if float(self.armed_variable.numpy()) > 0 else -1.0

    def __call__(self) -> tuple[bool, np.ndarray]:
        """``(mask_able, A)`` when armed, else ``(mask_able, zeros)``."""
        if self.just_update > 0:
            return self.mask_able, self.add_mask_array_flat
        return self.mask_able, np.zeros_like(self.add_mask_array_flat)
