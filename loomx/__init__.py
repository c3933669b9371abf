"""loomx: grid neural networks written once against the Python array API.

Quick start::

    import loomx
    with loomx.use_backend("numpy"):
        net = loomx.Network.chain([loomx.layers.Dense(64, activation="relu"),
                                   loomx.layers.Dense(10)], input_shape=(784,))

Importing loomx imports neither CuPy nor PyTorch and probes no GPU; backends are resolved on
first use. Public names are loaded lazily from their modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from .backends import (
    Backend,
    available_backends,
    current_backend,
    get_backend,
    set_default_backend,
    use_backend,
)
from .errors import (
    BackendUnavailableError,
    ConfigError,
    FormatError,
    LoomxError,
    ShapeError,
    TrainingError,
)

__version__ = "0.1.0"

# name -> module that defines it (imported on first attribute access)
_LAZY: dict[str, str] = {
    "layers": "loomx.layers",
    "grid": "loomx.grid",
    "train": "loomx.train",
    "tween": "loomx.tween",
    "io": "loomx.io",
    "models": "loomx.models",
    "Network": "loomx.grid",
    "Layer": "loomx.layers",
    # training (loomx.train)
    "fit": "loomx.train",
    "evaluate": "loomx.train",
    # serialisation (loomx.grid.serialize)
    "save": "loomx.grid.serialize",
    "load": "loomx.grid.serialize",
    # tweening (loomx.tween)
    "TweenConfig": "loomx.tween",
    "TweenTrainer": "loomx.tween",
    # loader (loomx.models)
    "sniff": "loomx.models",
    "load_model": "loomx.models",
}

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "ConfigError",
    "FormatError",
    "LoomxError",
    "ShapeError",
    "TrainingError",
    "available_backends",
    "current_backend",
    "get_backend",
    "set_default_backend",
    "use_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'loomx' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
