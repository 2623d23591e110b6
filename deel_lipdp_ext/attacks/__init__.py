"""Attacks that measure what a trained model leaks: MI-FACE model inversion."""

from .mi_face import MI_FACE

__all__ = ["MI_FACE"]
