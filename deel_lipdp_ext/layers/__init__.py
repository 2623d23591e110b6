"""DP layers: Keras 3 layers that bound their per-sample gradients (docs/design.md)."""

from .base import DPLayer, GNPLayer
from .bias import DP_AddBias
from .bounded import DP_BoundedInput
from .clipping import DP_ClipGradient
from .conv import DP_QuickSpectralConv2D, DP_SpectralConv2D
from .dense import DP_QuickFrobeniusDense, DP_QuickSpectralDense, DP_SpectralDense
from .gnp import (
    DP_Flatten,
    DP_GNP_Factory,
    DP_GroupSort,
    DP_InputLayer,
    DP_Lambda,
    DP_LayerCentering,
    DP_MaxPool2D,
    DP_Permute,
    DP_ReLU,
    DP_Reshape,
)
from .pooling import (
    DP_ScaledGlobalL2NormPooling2D,
    DP_ScaledL2NormPooling1D,
    DP_ScaledL2NormPooling2D,
)
from .residual import (
    DP_MergeResidual,
    DP_SplitResidual,
    DP_WrappedResidual,
    make_residuals,
)

__all__ = [
    "DPLayer",
    "GNPLayer",
    "DP_AddBias",
    "DP_BoundedInput",
    "DP_ClipGradient",
    "DP_QuickSpectralConv2D",
    "DP_SpectralConv2D",
    "DP_QuickFrobeniusDense",
    "DP_QuickSpectralDense",
    "DP_SpectralDense",
    "DP_Flatten",
    "DP_GNP_Factory",
    "DP_GroupSort",
    "DP_InputLayer",
    "DP_Lambda",
    "DP_LayerCentering",
    "DP_MaxPool2D",
    "DP_Permute",
    "DP_ReLU",
    "DP_Reshape",
    "DP_ScaledGlobalL2NormPooling2D",
    "DP_ScaledL2NormPooling1D",
    "DP_ScaledL2NormPooling2D",
    "DP_MergeResidual",
    "DP_SplitResidual",
    "DP_WrappedResidual",
    "make_residuals",
]
