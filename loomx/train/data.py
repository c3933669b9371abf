"""The handwritten-digits data set (scikit-learn's bundled copy, available offline).

1,797 grey-scale 8×8 images of the digits 0–9, pixel values 0–16 scaled to [0, 1]. The split is
stratified and seeded, so every backend sees the same samples.
"""

from __future__ import annotations

from typing import Any

from ..errors import LoomxError


def load_digits(test_fraction: float = 0.2, seed: int = 0,
                image: bool = False) -> tuple[Any, Any, Any, Any]:
    """Return ``(x_train, y_train, x_test, y_test)`` as host (numpy) arrays.

    Args:
        test_fraction: share of samples held out (stratified by class).
        seed: split seed.
        image: ``x`` as ``[N, 1, 8, 8]`` images instead of ``[N, 64]`` vectors.

    Shapes: ``x`` float32 in [0, 1]; ``y`` int64 labels ``[N]`` in 0..9.

    Raises:
        LoomxError: scikit-learn is missing (``pip install 'loomx[data]'``).
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise LoomxError("the digits data set comes with scikit-learn, which is not "
                         "installed: pip install 'loomx[data]'") from exc
    if not 0.0 < test_fraction < 1.0:
        raise LoomxError(f"test_fraction must be in (0, 1), got {test_fraction}")
    digits = sk_load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int64")
    if image:
        x = x.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test
