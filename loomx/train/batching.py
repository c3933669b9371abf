"""Data entering training or evaluation: validation on entry and mini-batch extraction.

Inputs may be host arrays (numpy; each batch is copied with ``backend.from_host``) or arrays
of the network's backend (batches are taken on the device). Validation runs once, when the data
enters, and is the only place where whole-dataset checks reach the host: shapes, sample counts,
NaN/Inf, label ranges. Nothing here runs inside the training step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..backends import Backend
from ..errors import LoomxError, ShapeError

Array = Any


def wide_dtype(backend: Backend) -> Any:
    """The dtype of running sums (losses, counts): float64, or float32 where the device has
    no float64 (Apple's MPS). Sums of thousands of float16 or bfloat16 terms would stop
    growing, and their counts stop being exact past 2048 or 256."""
    return backend.xp.float32 if "mps" in str(backend.device) else backend.xp.float64


def widened(backend: Backend, value: Array) -> Array:
    """``value`` in :func:`wide_dtype` (unchanged when it already is)."""
    wide = wide_dtype(backend)
    return value if value.dtype == wide else backend.xp.astype(value, wide)


def entry_layer(net: Any) -> Any:
    """The first layer ``net`` runs its input through (inside containers, first enabled)."""
    layer = net
    while True:
        kids = [c for _, c in layer.children() if not getattr(c, "disabled", False)]
        if not kids:
            return layer
        layer = kids[0]


def input_source(net: Any, array: Any, label: str) -> DataSource:
    """``array`` as the inputs of ``net``: in the dtype its first layer computes in, integer
    features cast to it unless that layer takes ids (an Embedding)."""
    first = entry_layer(net)
    dtype = first.float_dtype if first.backend is not None else net.backend.float_dtype
    return DataSource(array, net.backend, label, float_dtype=dtype,
                      cast_ints=not getattr(first, "takes_ids", False))


class DataSource:
    """One array (inputs or targets) that batches are drawn from.

    Args:
        array: ``[N, ...]`` host (numpy) array or a device array of ``backend``.
        backend: the network's backend.
        label: ``"x"``, ``"y"``, ``"validation x"``... (for error messages).
    """

    def __init__(self, array: Any, backend: Backend, label: str, float_dtype: Any = None,
                 cast_ints: bool = False):
        if not hasattr(array, "shape") or len(array.shape) == 0:
            raise LoomxError(f"{label} must be an array with a leading sample axis "
                             f"(a numpy array or a {backend.name} array), got {type(array)}")
        self.array = array
        self.backend = backend
        self.label = label
        self.on_device = backend.is_array(array)
        self.shape = tuple(int(d) for d in array.shape)
        self._xp = backend.xp if self.on_device else _host_namespace(array)
        self.float_dtype = backend.float_dtype if float_dtype is None else float_dtype
        self.cast_ints = bool(cast_ints)
        xp = backend.xp
        # the dtype batches are handed over in: float data of a wider dtype than the network
        # computes in (float64 numpy data for a float32 network) is narrowed to it, never
        # widened or narrowed further; integer features are cast where the network's first
        # layer computes on values (an Embedding takes the ids themselves)
        if self.is_float and self.on_device:
            self._target = self.float_dtype if (
                xp.finfo(array.dtype).bits > xp.finfo(self.float_dtype).bits) else None
        elif self.is_float:
            self._target = self.float_dtype  # host data is copied anyway: in the network's dtype
        else:
            self._target = self.float_dtype if self.cast_ints else None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def is_integer(self) -> bool:
        return bool(self._xp.isdtype(self.array.dtype, "integral"))

    @property
    def is_float(self) -> bool:
        return bool(self._xp.isdtype(self.array.dtype, "real floating"))

    def take(self, indices: Sequence[int]) -> Array:
        """Rows ``indices`` as a device array (float data in the backend's float dtype)."""
        b = self.backend
        start = indices[0] if len(indices) else 0
        contiguous = list(indices) == list(range(start, start + len(indices)))
        if self.on_device:
            if contiguous:
                rows = self.array[start:start + len(indices), ...]
            else:
                idx = b.asarray(list(indices), dtype=b.xp.int64)
                rows = b.xp.take(self.array, idx, axis=0)
            return rows if self._target is None else b.xp.astype(rows, self._target)
        rows = self.array[start:start + len(indices)] if contiguous else \
            self.array[list(indices)]
        return b.from_host(rows, dtype=self._target)

    def subset(self, start: int, stop: int) -> DataSource:
        """A view on rows ``[start, stop)``."""
        return DataSource(self.array[start:stop, ...], self.backend, self.label,
                          self.float_dtype, self.cast_ints)

    # ------------------------------------------------------------------ host checks
    def _to_python(self, value: Array):
        if self.on_device:
            value = self.backend.to_host(value)
        return value.tolist() if hasattr(value, "tolist") else value

    def count_nonfinite(self) -> int:
        """Number of NaN/±Inf entries (0 for integer data)."""
        if not self.is_float:
            return 0
        xp = self._xp
        bad = xp.sum(xp.astype(~xp.isfinite(self.array), xp.int64))
        return int(self._to_python(bad))

    def value_range(self) -> tuple[int, int]:
        """``(min, max)`` of the data (one host copy of two numbers)."""
        xp = self._xp
        return int(self._to_python(xp.min(self.array))), int(self._to_python(xp.max(self.array)))


def _host_namespace(array: Any):
    from array_api_compat import array_namespace

    try:
        return array_namespace(array)
    except TypeError as exc:
        raise LoomxError(f"unsupported array type {type(array)}: pass a numpy array or an "
                         "array of the network's backend") from exc


def validate_pair(net, x: DataSource, y: DataSource, loss: Any = None) -> None:
    """Raise a clear :class:`LoomxError` for data the network cannot train on.

    Checks: equal sample counts; ``x [N, *net.input_shape]``; no NaN/Inf in ``x`` or float
    ``y``; integer labels in ``[0, C)`` for a ``[B, C]`` output with ``C > 1``; float targets
    shaped like the output. For a ``[B, 1]`` output, integer labels are the targets themselves
    (binary classification or integer regression): with a ``loss`` (a
    :class:`~loomx.train.losses.Loss`) whose output kind is logits or probabilities they must
    be 0 or 1, and a softmax loss (``classification``) is refused, since a softmax over one
    output is constant.
    """
    if len(x) != len(y):
        raise ShapeError(f"{x.label} has {len(x)} samples but {y.label} has {len(y)}; "
                         "inputs and targets must have the same length")
    if len(x) == 0:
        raise LoomxError(f"{x.label} is empty: nothing to train or evaluate on")
    if x.shape[1:] != tuple(net.input_shape):
        raise ShapeError(f"{x.label} has samples of shape {list(x.shape[1:])} but the network "
                         f"expects {list(net.input_shape)} (arrays [N, "
                         f"{', '.join(map(str, net.input_shape))}])")
    for src in (x, y):
        bad = src.count_nonfinite()
        if bad:
            raise LoomxError(f"{src.label} contains {bad} NaN or infinite values; clean or "
                             "impute them before training")
    out_shape = tuple(net.output_shape)
    if y.is_integer:
        if len(y.shape) != 1:
            raise ShapeError(f"integer labels {y.label} must be [N], got {list(y.shape)}")
        if len(out_shape) != 1:
            raise ShapeError(f"integer labels need a network output [B, C]; this network "
                             f"outputs [B, {', '.join(map(str, out_shape))}]")
        lo, hi = y.value_range()
        n_classes = out_shape[0]
        if n_classes == 1:
            if loss is not None and loss.classification:
                raise LoomxError(f"the {loss.name} loss needs a network output [B, C] with "
                                 "C ≥ 2 for integer labels; for a binary classifier with one "
                                 "output use bce_logits (or bce after a sigmoid)")
            if loss is not None and loss.output_kind in ("logits", "probabilities") and (
                    lo < 0 or hi > 1):
                raise LoomxError(f"{y.label} holds labels in [{lo}, {hi}] but the {loss.name} "
                                 "loss on a one-output network takes binary labels 0 and 1")
        elif lo < 0 or hi >= n_classes:
            raise LoomxError(f"{y.label} holds labels in [{lo}, {hi}] but the network has "
                             f"{n_classes} outputs, so labels must lie in [0, {n_classes - 1}]")
    elif y.is_float:
        if y.shape[1:] != out_shape:
            raise ShapeError(f"{y.label} has targets of shape {list(y.shape[1:])} but the "
                             f"network outputs {list(out_shape)} per sample")
    else:
        raise LoomxError(f"{y.label} must hold integer class labels or float targets, "
                         f"got dtype {y.array.dtype}")


def batch_slices(n: int, batch_size: int) -> list[range]:
    """``range(n)`` cut into consecutive batches of ``batch_size`` (the last may be shorter)."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
