"""Token embedding: integer ids → rows of a learned table, with a scatter-add gradient.

Id validation without hidden syncs
----------------------------------
Checking the *values* of ids that live on a GPU means copying them to the host, a
synchronisation the forward pass must not make. loomx therefore splits the check in two:

- :func:`validate_ids` (also :meth:`Embedding.validate_ids`) checks dtype and range and raises
  :class:`~loomx.errors.ShapeError` naming the first bad id and its position. Call it where data
  enters (data loaders, tokenizer output, ``generate``): on host arrays it costs nothing extra;
  on device arrays it makes one explicit ``backend.to_host`` copy.
- :meth:`Embedding.forward` checks only what is known without looking at values (integer dtype,
  shape). An id outside ``[0, num_embeddings)`` that reaches it yields a row of NaN, computed on
  the device: never a silent zero row (Loom) nor a wrapped-around row (negative indexing, CuPy's
  out-of-range behaviour). Its gradient is dropped, so it cannot corrupt another row.
"""

from __future__ import annotations

import math
from typing import Any

from ..backends import Backend, RandomSource, get_backend
from ..errors import ShapeError
from .base import Array, Layer, Shape, config_int, register_layer
from .init import init_weight


def validate_ids(ids: Any, num_embeddings: int, label: str = "Embedding",
                 backend: Backend | None = None) -> None:
    """Raise :class:`ShapeError` unless every id is an integer in ``[0, num_embeddings)``.

    The check runs on the host (numpy backend).

    Args:
        ids: token ids: a host array (numpy), a nested list, or a device array of ``backend``
            (then copied to the host once: keep this off the per-step hot path).
        num_embeddings: the table size ``V``.
        label: the layer named in the message.
        backend: the backend owning ``ids`` when they are a device array.
    """
    if backend is not None and backend.is_array(ids):
        ids = backend.to_host(ids)
    host = get_backend("numpy")
    xp = host.xp
    arr = host.from_host(ids)
    if not xp.isdtype(arr.dtype, "integral"):
        raise ShapeError(f"{label} expected integer token ids but received dtype "
                         f"{getattr(ids, 'dtype', arr.dtype)}; convert them to int64 first")
    flat = xp.reshape(arr, (-1,))
    bad = (flat < 0) | (flat >= num_embeddings)
    if flat.shape[0] == 0 or not bool(xp.any(bad)):
        return
    first = int(xp.argmax(xp.astype(bad, xp.int8)))
    pos, rest = [], first
    for d in reversed(arr.shape):
        pos.append(rest % d)
        rest //= d
    raise ShapeError(f"{label} received token id {int(flat[first])} at position "
                     f"{pos[::-1]} of ids with shape {list(arr.shape)}; expected ids in "
                     f"[0, {num_embeddings}) ({int(xp.sum(xp.astype(bad, xp.int64)))} ids out "
                     "of range). Check the tokenizer's vocabulary size against num_embeddings.")


@register_layer
class Embedding(Layer):
    """``y[..., :] = weight[ids[...], :]``.

    Shapes: int ``ids [B, *S]`` (usually ``[B, T]`` or ``[B]``) → ``y [B, *S, D]``. ``S`` need
    not match the shape given at build: one table serves prompts of any length ``T`` and
    ``[B, 1]`` decoding steps alike.
    Parameters: ``weight [V, D]``.

    Backward: ``weight`` receives ``dy`` rows scatter-added at their ids (repeated ids add up);
    integer ids have no gradient, so ``backward`` returns ``None``.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: row width ``D``.
        init: initialisation scheme of :func:`loomx.layers.init.init_weight` (default
            ``"normal"``: N(0, 0.02)); ``fan_in = D``, ``fan_out = V``.
    """

    takes_ids = True

    type_name = "embedding"
    config_fields = ("num_embeddings", "embedding_dim", "init")

    def __init__(self, num_embeddings: int, embedding_dim: int, init: str = "normal", **kw):
        super().__init__(**kw)
        self.num_embeddings = config_int(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = config_int(embedding_dim, "embedding_dim", "Embedding")
        self.init = init

    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        self.params["weight"] = init_weight(
            rng, self.init, (self.num_embeddings, self.embedding_dim), self.embedding_dim,
            self.num_embeddings, self.float_dtype)
        return (*input_shape, self.embedding_dim)

    def validate_ids(self, ids: Any) -> None:
        """Check ids (host or device) against this table; see :func:`validate_ids`."""
        validate_ids(ids, self.num_embeddings, self.describe(), self.backend)

    def check_input(self, x: Array) -> None:
        """Raise unless ``x`` holds integer ids with a batch axis; any other shape is accepted.

        The ids' per-sample shape may differ from the one given at build (``[B, 1]`` decoding
        steps after a ``[B, T]`` prompt, say): the output is ``[*x.shape, D]``.
        """
        if not self.built:
            raise self._not_built()
        if not hasattr(x, "shape"):
            raise self._not_array(x)
        if x.ndim < 1:
            raise ShapeError(f"{self.describe()} expected token ids [B, ...] with a batch axis "
                             "but received a 0-d array; add one with xp.reshape(ids, (1,))")
        if not self.xp.isdtype(x.dtype, "integral"):
            raise ShapeError(f"{self.describe()} expected integer token ids [B, ...] but "
                             f"received dtype {x.dtype}; convert them with "
                             "xp.astype(ids, xp.int64)")

    def forward(self, x: Array, train: bool = False) -> tuple[Array, Any]:
        self.check_input(x)
        xp = self.xp
        flat = xp.reshape(x, (-1,))
        valid = (flat >= 0) & (flat < self.num_embeddings)
        safe = xp.where(valid, flat, 0)
        rows = xp.take(self.params["weight"], safe, axis=0)
        rows = xp.where(valid[:, None], rows, math.nan)
        y = xp.reshape(rows, (*x.shape, self.embedding_dim))
        return y, (safe, valid, y.shape)

    def backward(self, dy: Array, ctx: Any) -> None:
        safe, valid, shape = ctx
        self.check_grad(dy, shape)
        xp = self.xp
        rows = xp.where(valid[:, None], xp.reshape(dy, (-1, self.embedding_dim)), 0.0)
        # scatter_add is functional: adding into the gradient itself spares a [V, D] temporary
        self.grads["weight"] = self.backend.scatter_add(self.grads["weight"], safe, rows)
        return None
