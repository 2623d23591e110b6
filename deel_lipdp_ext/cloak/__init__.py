"""Stained-Glass-style input transforms: noise layers, ``NoisyModel`` and cloak losses.

Reference: Protopia AI's Stained Glass Transform (``stainedglass_core``, closed
source: the API follows its public docs; the definitions its docs leave open
are ours, written out in ``docs/ports.md``) and Cloak (Mireshghallah et al.,
2021).
This is input obfuscation, not differential privacy: no (epsilon, delta) is
claimed for a trained transform.
"""

from .attackers import attacker_transforms, multi_attacker_privacy_loss
from .callbacks import LossComponentsLogger
from .losses import (
    composite_cloak_loss_factory,
    image_similarity_cloak_loss_factory,
    negative_log_mean,
)
from .noise_layers import CloakNoiseLayer, NoiseLayer, PatchCloakNoiseLayer
from .noisy_model import NoisyModel

__all__ = [
    "CloakNoiseLayer",
    "LossComponentsLogger",
    "NoiseLayer",
    "NoisyModel",
    "PatchCloakNoiseLayer",
    "attacker_transforms",
    "composite_cloak_loss_factory",
    "image_similarity_cloak_loss_factory",
    "multi_attacker_privacy_loss",
    "negative_log_mean",
]
