"""Layers, written once against the array API (protocol: :mod:`loomx.layers.base`).

Every module of this package is imported here, and every registered layer class is exported
under its class name (``loomx.layers.Dense``, ``loomx.layers.Conv2D``, ...).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .activations import ACTIVATIONS as ACTIVATIONS
from .activations import get_activation as get_activation
from .base import LAYER_TYPES as LAYER_TYPES
from .base import Layer as Layer
from .base import ParamRef as ParamRef
from .base import layer_from_config as layer_from_config
from .base import register_layer as register_layer

for _info in _pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

_classes = {cls.__name__: cls for cls in LAYER_TYPES.values()}
globals().update(_classes)

__all__ = sorted(["ACTIVATIONS", "LAYER_TYPES", "Layer", "ParamRef", "get_activation",
                  "layer_from_config", "register_layer", *_classes])
