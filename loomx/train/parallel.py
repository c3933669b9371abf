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
accumulation does in :func:`~loomx.train.fit`.

What differs from a serial step:

- layers that draw random numbers in training (Dropout, Gumbel softmax) draw the shards after
  the first from independent streams (``PCG64.jumped``), so their masks differ from a serial
  run, and a resumed run is not bitwise identical to an uninterrupted one;
- the network's observers and ``activations`` see the first shard only.

When it helps: on a 2-core machine (``benchmarks/RESULTS.md``, column ``loomx[numpy+workers]``)
the CNN training step of benchmark b ran 1.23× faster with 2 workers than on 2 BLAS threads; an
LSTM did not gain (its many small per-step operations contend for the GIL), and an MLP, bound
by matrix products that BLAS already threads, was slower. Only CPU backends are accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, NamedTuple

from threadpoolctl import ThreadpoolController

from ..backends import RandomSource
from ..errors import ConfigError
from ..layers.base import Layer, call_backward

Array = Any
LossFn = Callable[[Array, Array], tuple[Array, Array]]


def _walk(layer: Layer):
    """``layer`` and every nested layer, depth first."""
    yield layer
    for _, child in layer.children():
        yield from _walk(child)


def _replica(net: Layer, index: int) -> Layer:
    """A copy of ``net`` sharing its parameter arrays and backend, with its own gradients.

    Random layers get the stream ``index`` jumps ahead of the original's (``index >= 1``).
    """
    memo: dict[int, Any] = {}
    for layer in _walk(net):
        memo[id(layer.params)] = layer.params
        backend = getattr(layer, "backend", None)
        if backend is not None:
            memo[id(backend)] = backend
    clone = copy.deepcopy(net, memo)
    for orig, layer in zip(_walk(net), _walk(clone)):
        layer.grads = {}
        if hasattr(layer, "_observers"):
            layer._observers = []
        rng = getattr(orig, "_rng", None)
        if isinstance(rng, RandomSource):
            layer._rng = rng.jumped(index)
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

    Raises:
        ConfigError: ``workers < 1``, an unbuilt network, or a backend that is not on the CPU.
    """

    def __init__(self, net: Layer, workers: int = 2, *, limit_blas: bool = True):
        workers = int(workers)
        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if not getattr(net, "built", False):
            raise ConfigError("BatchParallel needs a built network: call net.build(...) first")
        device = str(getattr(net.backend, "device", "cpu"))
        if not device.startswith("cpu"):
            raise ConfigError(f"workers > 1 splits batches over CPU threads; the network runs on "
                              f"{net.backend.name!r} (device {device}): use workers=1 there")
        self.net = net
        self.workers = workers
        self.replicas = [_replica(net, k) for k in range(1, workers)]
        self._pool = ThreadPoolExecutor(workers - 1) if workers > 1 else None
        self._blas = ThreadpoolController() if limit_blas and workers > 1 else None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the worker threads (the replicas are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.replicas = []

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

        Returns:
            one :class:`ShardResult` ``(value, out, rows)`` per shard, in batch order.
        """
        n = int(x.shape[0])
        total = n if total is None else int(total)
        parts = split_batch(n, self.workers)
        if self._pool is None and len(parts) > 1:
            raise ConfigError("this BatchParallel is closed")
        nets = [self.net, *self.replicas][:len(parts)]
        for r in nets[1:]:
            r.zero_grad()
        limit = (self._blas.limit(limits=1, user_api="blas")
                 if self._blas is not None and len(parts) > 1 else nullcontext())
        with limit:
            futures = [self._pool.submit(_shard_step, r, x, y, p, loss, total)
                       for r, p in zip(nets[1:], parts[1:])]
            results = [_shard_step(nets[0], x, y, parts[0], loss, total)]
            results += [f.result() for f in futures]
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
    call_backward(net, dout, ctx, need_input_grad=False)
    return ShardResult(value, out, rows)


def _add_grads(net: Layer, replica: Layer) -> None:
    """``net.grads += replica.grads`` for every layer (same structure)."""
    for a, b in zip(_walk(net), _walk(replica)):
        for key, g in b.grads.items():
            a.grads[key] = a.grads[key] + g

