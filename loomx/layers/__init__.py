"""Layers, written once against the array API (see :mod:`loomx.layers.base`)."""

from .activations import ACTIVATIONS, get_activation
from .base import LAYER_TYPES, Layer, ParamRef, layer_from_config, register_layer
from .dense import Activation, Dense

__all__ = [
    "ACTIVATIONS",
    "LAYER_TYPES",
    "Activation",
    "Dense",
    "Layer",
    "ParamRef",
    "get_activation",
    "layer_from_config",
    "register_layer",
]
