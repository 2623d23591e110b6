"""Suppress privacy: drive chosen layers to high sparsity on a schedule while
training (a port of MindArmour's ``mindarmour.privacy.sup_privacy`` to Keras 3).

This is not differential privacy: no (epsilon, delta) is claimed for it.
"""

from .controller import SuppressCtrl, SuppressPrivacyFactory, update_layer_masks
from .masks import DeWeight, GradMask, MaskLayerDes
from .model import SuppressMasker, SuppressModel

__all__ = [
    "DeWeight",
    "GradMask",
    "MaskLayerDes",
    "SuppressCtrl",
    "SuppressMasker",
    "SuppressModel",
    "SuppressPrivacyFactory",
    "update_layer_masks",
]
