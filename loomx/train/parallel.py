"""Data-parallel training steps on CPU threads: one mini-batch split over ``workers`` shards.

On the numpy backend a training step is a mix of matrix products, which OpenBLAS spreads over
every core, and elementwise passes (im2col copies, bias + activation, masks, scatter-adds),
which numpy runs on one core. With more than one core the second kind does not scale, so a
convolutional network trains barely faster on 2 BLAS threads than on 1.

:class:`BatchParallel` splits the batch instead. Worker ``k`` runs forward, loss and backward of
shard ``k`` on its own **replica** of the network: the same parameter arrays (shared, never
copied), its own gradients. numpy releases the GIL inside its loops and BLAS calls, so the
shards run side by side; BLAS itself is limited to one thread meanwhile (through
``threadpoolctl``), so that each core runs one shard instead of BLAS's worker threads
competing with the shards. Then the replicas' gradients are added into the network's.

The result equals one pass over the whole batch up to floating-point summation order: each
shard's loss gradient is weighted by its share of the samples, exactly as gradient
accumulation does in :func:`~loomx.train.fit`. Layers that mix samples across the batch
cannot be split; the one loomx has (``Parallel(..., loom_compat=True)``, Loom's whole-batch
concatenation) is refused.

What differs from a serial step:

- layers that draw random numbers in training (Dropout, Gumbel softmax) draw the shards after
  the first from streams jumped ahead of the layer's own (:meth:`RandomSource.jumped`), so
  their masks differ from a serial run, and a resumed run is not bitwise identical to an
  uninterrupted one;
- the network's observers and ``activations`` see the first shard only;
- BLAS is limited to one thread for the whole process while a step runs (the limit is
  process-wide; overlapping steps from several threads share one limit).

The replicas copy the network's structure and settings (``disabled`` flags, dropout rates,
temperatures...) when they are made; each step compares them with the network's and rebuilds
the replicas when something changed.

When it helps: on a 2-core machine (``benchmarks/RESULTS.md``, column ``loomx[numpy+workers]``)
the CNN training step of benchmark b ran 1.2–1.3× faster with 2 workers than on 2 BLAS
threads; an LSTM gained only with numba's compiled cells (numpy's many small per-step
operations contend for the GIL), and an MLP, bound by matrix products that BLAS already
threads, was slower. Only CPU backends are
accepted; on the PyTorch backend, PyTorch's own intra-op threads are not limited (set
``torch.set_num_threads`` yourself).
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

from threadpoolctl import ThreadpoolController

from ..backends import RandomSource
from ..errors import ConfigError, ShapeError
from ..layers.base import Layer, call_backward, walk_layers

Array = Any
LossFn = Callable[[Array, Array], tuple[Array, Array]]

#: Per-layer state a replica must not copy: it gets an empty container of the same type.
_FRESH_ATTRIBUTES = ("grads", "_zero_grads", "_observers", "activations", "activation_grads")
_SCALARS = (bool, int, float, str, type(None))


_SKIP = object()
#: longer lists are data (a softmax's mask over the vocabulary), not settings: comparing them
#: every step would cost more than the step
_MAX_ITEMS = 64


def _plain(value: Any) -> Any:
    """A setting worth comparing, in a comparable form: a scalar (numpy's included, as its
    Python value), or a tuple or list of such (shapes, kernel sizes, a mixture softmax's
    temperatures) as a tuple; ``_SKIP`` for anything else (arrays, objects). Device scalars
    are skipped: reading them would wait for the device."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)):
        if len(value) > _MAX_ITEMS:
            return _SKIP
        items = tuple(_plain(v) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else items
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        item = value.item()  # a host scalar (numpy's own type): no device is read
        return item if isinstance(item, _SCALARS) else _SKIP
    return _SKIP


def _settings(net: Layer) -> str:
    """A fingerprint of the structure and plain settings of every layer of ``net``."""
    settings = []
    for layer in walk_layers(net):
        # settings are public attributes; private ones are caches (a causal mask, a
        # constant), and the per-run state a replica gets fresh (activations...) is neither
        plain = ((k, _plain(v)) for k, v in vars(layer).items()
                 if not k.startswith("_") and k not in _FRESH_ATTRIBUTES)
        settings.append((id(layer), type(layer).__name__,
                         sorted((k, v) for k, v in plain if v is not _SKIP)))
    return repr(settings)


def _replica(net: Layer, index: int, previous: Layer | None = None) -> Layer:
    """A copy of ``net`` sharing its parameter arrays and backend, with empty gradients,
    no observers and no recorded activations.

    Random layers get the stream ``index`` jumps ahead of the original's (``index >= 1``),
    or, when ``previous`` (the replica this one replaces) has a layer of the same type in
    the same place, that layer's stream, so a rebuild never draws the same numbers twice.
    """
    memo: dict[int, Any] = {}
    for layer in walk_layers(net):
        memo[id(layer.params)] = layer.params
        backend = getattr(layer, "backend", None)
        if backend is not None:
            memo[id(backend)] = backend
        for name in _FRESH_ATTRIBUTES:
            value = getattr(layer, name, None)
            if isinstance(value, (list, dict)):
                memo[id(value)] = type(value)()
    clone = copy.deepcopy(net, memo)
    before = list(walk_layers(previous)) if previous is not None else []
    for i, (orig, layer) in enumerate(zip(walk_layers(net), walk_layers(clone))):
        rng = getattr(orig, "_rng", None)
        if isinstance(rng, RandomSource):
            old = before[i] if i < len(before) and type(before[i]) is type(orig) else None
            kept = getattr(old, "_rng", None)
            layer._rng = kept if isinstance(kept, RandomSource) else rng.jumped(index)
    return clone


class ShardResult(NamedTuple):
    """One shard of :meth:`BatchParallel.forward_backward`."""

    value: Array  #: the shard's mean loss (a 0-d array)
    out: Array  #: the network output for the shard ``[n, ...]``
    rows: slice  #: the shard's rows in the batch


def split_batch(n: int, shards: int) -> list[slice]:
    """``n`` samples as at most ``shards`` contiguous, non-empty slices of near-equal size."""
    shards = max(1, min(int(shards), n))
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _BlasLimit:
    """Hold BLAS at one thread while any step runs, process-wide (reference counted, so that
    overlapping steps from several threads restore the original count exactly once)."""

    _lock = threading.Lock()
    _users = 0
    _active = None
    _controller: ThreadpoolController | None = None
    _modules_seen = -1

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                # scanning the loaded libraries takes milliseconds: again only when modules
                # were imported since (importing torch loads its own BLAS and OpenMP)
                if cls._controller is None or len(sys.modules) != cls._modules_seen:
                    cls._controller = ThreadpoolController()
                    cls._modules_seen = len(sys.modules)
                cls._active = cls._controller.limit(limits=1, user_api="blas")
            cls._users += 1

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._active is not None:
                cls._active.restore_original_limits()
                cls._active = None


def _check_splittable(net: Layer) -> None:
    """Raise unless ``net`` can run its batch split over CPU threads."""
    if net.backend.library not in ("numpy", "torch") or \
            not str(net.backend.device).startswith("cpu"):
        raise ConfigError(f"workers > 1 splits batches over CPU threads, for numpy or PyTorch "
                          f"on the CPU; the network runs on {net.backend.name!r} (device "
                          f"{net.backend.device}): use workers=1 there")
    coupled = [layer.describe() for layer in walk_layers(net)
               if getattr(layer, "loom_compat", False)]
    if coupled:
        raise ConfigError(f"{coupled[0]} mixes samples across the batch (loom_compat=True), "
                          "so the batch cannot be split over workers: use workers=1")


class BatchParallel:
    """Forward + backward of mini-batches split over ``workers`` CPU threads.

    Args:
        net: a built network (any layer); its parameters are shared with the replicas.
        workers: number of shards, hence threads (the calling thread runs the first shard).
        limit_blas: hold BLAS to one thread while the shards run.

    Use it as a context manager, or call :meth:`close` to stop the threads::

        with BatchParallel(net, workers=2) as par:
            for xb, yb in batches:
                par.forward_backward(xb, yb, loss)   # the gradients are now in net
                optimizer.step(); optimizer.zero_grad()

    ``workers=1`` runs the whole batch on the calling thread, on any backend.

    Raises:
        ConfigError: ``workers < 1``, an unbuilt network, or with ``workers > 1`` a backend that
            is not on the CPU or a layer that mixes samples across the batch.
    """

    def __init__(self, net: Layer, workers: int = 2, *, limit_blas: bool = True):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
        if not getattr(net, "built", False):
            raise ConfigError("BatchParallel needs a built network: call net.build(...) first")
        if workers > 1:
            _check_splittable(net)
        self.net = net
        self.workers = workers
        self.limit_blas = bool(limit_blas)
        self._closed = False
        self._pool = ThreadPoolExecutor(workers - 1) if workers > 1 else None
        self._make_replicas()

    def _make_replicas(self) -> None:
        previous = getattr(self, "replicas", None) or [None] * (self.workers - 1)
        self.replicas = [_replica(self.net, k, previous[k - 1])
                         for k in range(1, self.workers)]
        self._settings = _settings(self.net)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the worker threads (the replicas are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.replicas = []
        self._closed = True

    def __enter__(self) -> BatchParallel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ work
    def forward_backward(self, x: Array, y: Array, loss: LossFn, *,
                         total: int | None = None) -> list[ShardResult]:
        """Run forward, ``loss`` and backward of ``(x, y)`` split into shards.

        ``x [N, ...]`` and ``y [N, ...]`` are split along the first axis. ``loss(out, y)``
        returns ``(mean value, d value / d out)`` for its shard; the gradient is scaled by
        ``shard size / total`` (``total`` defaults to ``N``; pass the size of the whole
        accumulation group when several calls make up one update), so the gradients added into
        ``net`` are those of the mean loss over ``total`` samples.

        If a shard raises, every other shard is waited for and the exception propagates; the
        network's gradients are then partial: zero them before the next step.

        Returns:
            one :class:`ShardResult` ``(value, out, rows)`` per shard, in batch order.
        """
        if self._closed:
            raise ConfigError("this BatchParallel is closed")
        n = int(x.shape[0])
        if n == 0 or int(y.shape[0]) != n:
            raise ShapeError(f"forward_backward needs a non-empty batch with as many targets as "
                             f"inputs, got {n} inputs and {int(y.shape[0])} targets")
        total = n if total is None else int(total)
        parts = split_batch(n, self.workers)
        if len(parts) > 1 and _settings(self.net) != self._settings:
            self._make_replicas()
        nets = [self.net, *self.replicas][:len(parts)]
        for r in nets[1:]:
            r.zero_grad()
        limited = self.limit_blas and len(parts) > 1
        if limited:
            _BlasLimit.acquire()
        try:
            futures = [self._pool.submit(_shard_step, r, x, y, p, loss, total)
                       for r, p in zip(nets[1:], parts[1:])]
            try:
                results = [_shard_step(nets[0], x, y, parts[0], loss, total)]
            finally:
                wait(futures)
            results += [f.result() for f in futures]
        finally:
            if limited:
                _BlasLimit.release()
        for r in nets[1:]:
            _add_grads(self.net, r)
        return results


def _shard_step(net: Layer, x: Array, y: Array, rows: slice, loss: LossFn,
                total: int) -> ShardResult:
    """Forward, loss and backward of ``x[rows]`` on ``net`` (gradients accumulate in it)."""
    out, ctx = net.forward(x[rows, ...], train=True)
    value, dout = loss(out, y[rows, ...])
    n = rows.stop - rows.start
    if n != total:
        dout = dout * (n / total)
    call_backward(net, dout, ctx, need_input_grad=False)  # nothing reads dL/dx
    return ShardResult(value, out, rows)


def _add_grads(net: Layer, replica: Layer) -> None:
    """``net.grads += replica.grads`` for every layer (same structure; shared layers once)."""
    for a, b in zip(walk_layers(net), walk_layers(replica)):
        for key, g in b.grads.items():
            a._accumulate(key, g)
