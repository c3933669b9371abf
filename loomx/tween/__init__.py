"""Neural Tweening: Loom's algorithm (faithful and corrected), legacy and difference target
propagation, batch and stepping variants, telemetry and pruning. See ``docs/tweening.md``."""

from .config import TweenConfig
from .telemetry import TweenTelemetry, heat_bar
from .trainer import TweenTrainer

__all__ = ["TweenConfig", "TweenTelemetry", "TweenTrainer", "demo_section", "heat_bar"]


def demo_section(backend=None, quick: bool = True) -> list[str]:
    """Lines for ``loomx demo``: tweening next to plain SGD on the digits data."""
    from .demo import demo_section as _demo

    return _demo(backend, quick)
