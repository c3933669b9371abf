"""What a benchmark case is: one operation timed for loomx and for PyTorch on equal terms."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .timing import Op


class Missing(Exception):  # noqa: N818 - reads as "the case is missing a part"
    """A part of loomx a case needs does not exist (yet); the case reports ``n/a``."""

    def __init__(self, *parts: str):
        super().__init__(", ".join(parts))
        self.parts = parts


@dataclass
class Case:
    """One timed operation.

    Attributes:
        key: short id used on the command line and in JSON (``"a_mlp"``).
        title: the row label (``"a. MLP 784-512-512-10 train step"``).
        suite: ``"main"`` (workloads a–f) or ``"layers"`` (forward+backward of single layers).
        items: what one call processes (samples, tokens) for the throughput column.
        item_name: unit of ``items``.
        flops: floating-point operations of the matrix products in one call (0 if not counted);
            the effective GFLOP/s is compared with the measured sgemm peak.
        target: the loomx/PyTorch time ratio to meet (best thread count), or ``None``.
        loomx: ``backend → Op``; may raise :class:`Missing`.
        torch: ``device → Op`` (PyTorch eager, the reference).
        plain: optional ``() → Op`` of the same math in hand-written numpy (overhead check).
    """

    key: str
    title: str
    suite: str
    items: int
    item_name: str
    flops: float
    target: float | None
    loomx: Callable[..., Op]
    torch: Callable[..., Op]
    plain: Callable[[], Op] | None = None
    notes: list[str] = field(default_factory=list)


def loomx_layer(name: str):
    """The loomx layer class ``name`` from ``loomx.layers``, or raise :class:`Missing`."""
    try:
        import loomx.layers as layers
    except Exception as exc:  # noqa: BLE001 - a layer module being edited must not crash a run
        raise Missing(f"loomx.layers (import failed: {type(exc).__name__}: {exc})") from exc
    cls = getattr(layers, name, None)
    if cls is None:
        raise Missing(f"loomx.layers.{name}")
    return cls


def loomx_attr(module: str, name: str):
    """``module.name`` from loomx, or raise :class:`Missing` naming it."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise Missing(f"{module}.{name}") from exc
    except Exception as exc:  # noqa: BLE001
        raise Missing(f"{module} (import failed: {type(exc).__name__}: {exc})") from exc
    value = getattr(mod, name, None)
    if value is None:
        raise Missing(f"{module}.{name}")
    return value
