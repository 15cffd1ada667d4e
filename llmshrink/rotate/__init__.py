"""Rotations for low-bit quantization (QuaRot/SpinQuant-style, fused offline): the rotated model is
an ordinary checkpoint of the same architecture with the same outputs, which GPTQ then rounds with
fewer outliers. hadamard.py builds the matrices, apply.py folds norms and turns the weights."""

from .apply import FAMILIES, check_rotatable, rotate_model
from .config import RotateConfig
from .hadamard import hadamard, hadamard_order_factors, orthogonal

__all__ = ["FAMILIES", "RotateConfig", "check_rotatable", "hadamard", "hadamard_order_factors", "orthogonal",
           "rotate_model"]
