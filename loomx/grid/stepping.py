"""The stepping executor ("train while running"): the network as a synchronous pipeline.

Every occupied, enabled slot is one pipeline *stage*. ``buffers[s]`` holds the input of stage
``s`` (``buffers[0]`` is the network input, ``buffers[depth]`` the network output). One
:meth:`Stepper.step` is one clock tick: every stage ``s`` computes ``f_s(buffers[s])`` from the
buffers as they were *before* the tick, and all results are committed at once (a double
buffer). The output after tick ``t`` therefore reflects the input set before tick
``t - depth + 1``: on a constant input, the output after ``depth`` ticks equals the ordinary
forward pass. All buffers start at zero, so early ticks see ``f(0)`` downstream.

Residual stages read the skip that belongs to the *same input tick* as their main input: a
residual at stage ``k`` whose source is the input of stage ``j`` reads ``buffers[j]`` as it
was ``k - j`` ticks ago (a small delay line). Loom instead feeds each layer's previous output
back into itself, which accumulates without bound; loomx does not reproduce that.

Recurrent layers (those with ``final_state(ctx)``) may carry their state across ticks
(``stateful=True``): the state after tick ``t`` is the ``initial_state`` of tick ``t + 1``.

:meth:`Stepper.step_backward` is one reverse sweep over the stages using the contexts of the
latest tick (as Loom's ``StepBackward``): each stage's parameter gradient is exact for its own
latest input/output pair; the sweep equals ordinary backpropagation once the input has been
constant for ``depth`` ticks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import LoomxError, ShapeError
from ..layers.base import Array, Layer
from .network import Network, Position, backward_slot


class StepState:
    """The mutable state of a stepping run (buffers, contexts, delay lines, tick count)."""

    def __init__(self, buffers: list[Array | None], delays: dict[int, deque],
                 states: dict[int, Any]):
        self.buffers = buffers
        self.ctxs: list[Any] = [None] * (len(buffers) - 1)
        self.skips: list[Array | None] = [None] * (len(buffers) - 1)
        self.delays = delays
        self.states = states
        self.step_count = 0


class Stepper:
    """Runs ``net`` tick by tick (see the module docstring).

    Args:
        net: a built :class:`Network`.
        batch_size: number of independent streams (the leading axis of every buffer).
        stateful: carry recurrent layers' state across ticks.

    Example::

        stepper = Stepper(net)
        for x_t in stream:                 # x_t [1, *input_shape]
            stepper.set_input(x_t)
            stepper.step()
            y = stepper.output             # reflects the input of depth - 1 ticks ago
    """

    def __init__(self, net: Network, batch_size: int = 1, stateful: bool = False):
        if not net.built:
            raise LoomxError("the stepping executor needs a built network: call "
                             "net.build(input_shape) first")
        self.net = net
        self.batch_size = int(batch_size)
        self.stateful = bool(stateful)
        self.stages: list[tuple[int, Layer]] = [(i, layer) for i, layer in net.layers()
                                                if not layer.disabled]
        # stage index of the input of every slot (slot i's input = buffers[stage_of_slot[i]])
        self.stage_of_slot: list[int] = []
        s = 0
        for i in range(net.size + 1):
            self.stage_of_slot.append(s)
            if i < net.size and s < len(self.stages) and self.stages[s][0] == i:
                s += 1
        self.sources: dict[int, int] = {}
        for k, (i, layer) in enumerate(self.stages):
            if getattr(layer, "needs_skip", False):
                self.sources[k] = self.stage_of_slot[net.resolve_source(layer.source, i)]
        self.reset()

    @property
    def depth(self) -> int:
        """Number of stages; the output lags the input by ``depth - 1`` ticks."""
        return len(self.stages)

    @property
    def latency(self) -> int:
        """Ticks between setting an input and reading its output (``depth - 1``)."""
        return max(self.depth - 1, 0)

    def _own_dtype(self, layer: Layer) -> Any:
        """The float dtype ``layer`` computes in: its parameters', else its override, else None."""
        xp = self.net.backend.xp
        for ref in layer.parameters():
            if xp.isdtype(ref.value.dtype, "real floating"):
                return ref.value.dtype
        return layer.float_dtype if layer.dtype else None

    def _buffer_dtypes(self) -> list[Any]:
        """The dtype of every buffer: ``buffers[s + 1]`` takes stage ``s``'s own dtype (see
        :meth:`_own_dtype`); parameterless stages pass their input's dtype on. ``buffers[0]``
        (the input) is taken to be in the first stage's dtype, else the backend's."""
        first = self._own_dtype(self.stages[0][1]) if self.stages else None
        dtypes = [first or self.net.backend.float_dtype]
        for _, layer in self.stages:
            dtypes.append(self._own_dtype(layer) or dtypes[-1])
        return dtypes

    def reset(self) -> None:
        """Zero every buffer, delay line and recurrent state, each in the dtype its stage
        computes in (:meth:`_buffer_dtypes`)."""
        b = self.net.backend
        dtypes = self._buffer_dtypes()
        bufs: list[Array | None] = [None]
        for s, (i, _) in enumerate(self.stages):
            bufs.append(b.zeros((self.batch_size, *self.net.slot_shapes[i + 1]),
                                dtype=dtypes[s + 1]))
        delays = {}
        for k, j in self.sources.items():
            zero = b.zeros((self.batch_size, *self.net.slot_shapes[self.stages[j][0]]),
                           dtype=dtypes[j])
            delays[k] = deque([zero] * (k - j), maxlen=k - j + 1)
        self.state = StepState(bufs, delays, {})

    # ------------------------------------------------------------------ io
    def set_input(self, x: Array) -> None:
        """Set the network input read by the next tick: ``x [batch_size, *input_shape]``.

        The input is copied, as Loom's ``SetInput`` copies: a caller that refills one array
        every tick does not change what the delay lines and the first stage already hold.
        """
        want = (self.batch_size, *self.net.input_shape)
        if tuple(x.shape) != want:
            raise ShapeError(f"stepping input must be [{', '.join(map(str, want))}] "
                             f"(batch_size={self.batch_size}), received {list(x.shape)}")
        self.state.buffers[0] = self.net.backend.xp.asarray(x, copy=True)

    @property
    def output(self) -> Array:
        """The network output buffer (the last stage's output after the latest tick)."""
        return self.state.buffers[-1]

    @property
    def step_count(self) -> int:
        return self.state.step_count

    def layer_output(self, key: int | Position) -> Array:
        """The output buffer of slot ``key`` (flat index or position) after the latest tick.

        For an empty or disabled slot this is its input (the identity).
        """
        i = self.net._index(key)
        return self.state.buffers[self.stage_of_slot[i + 1]]

    # ------------------------------------------------------------------ ticks
    def step(self, train: bool = False) -> Array:
        """Advance every stage by one tick; returns the new output buffer."""
        st = self.state
        if st.buffers[0] is None:
            raise LoomxError("set_input(x) before the first step()")
        new = list(st.buffers)
        for k, (_, layer) in enumerate(self.stages):
            x = st.buffers[k]
            if k in self.sources:
                line = st.delays[k]
                line.append(st.buffers[self.sources[k]])
                skip = line[0]
                st.skips[k] = skip
                y, ctx = layer.forward(x, train, skip=skip)
            elif self.stateful and hasattr(layer, "final_state"):
                y, ctx = layer.forward(x, train, initial_state=st.states.get(k))
                st.states[k] = layer.final_state(ctx)
            else:
                y, ctx = layer.forward(x, train)
            new[k + 1] = y
            st.ctxs[k] = ctx
            if self.net._observers:
                self.net._notify("forward", self.stages[k][0], layer, x, y, mode="step",
                                 step=st.step_count + 1)
        st.buffers = new
        st.step_count += 1
        return st.buffers[-1]

    def step_backward(self, dy: Array) -> Array:
        """One reverse sweep with the latest tick's contexts; accumulates parameter grads.

        ``dy [batch_size, *output_shape]`` → gradient of the network input buffer.
        """
        if self.state.step_count == 0:
            raise LoomxError("step() at least once before step_backward()")
        pending: dict[int, Array] = {}
        for k in range(self.depth - 1, -1, -1):
            layer = self.stages[k][1]
            d_out = dy
            dy = backward_slot(layer, dy, self.state.ctxs[k], self.sources.get(k), pending)
            if self.net._observers:
                self.net._notify("backward", self.stages[k][0], layer, d_out, dy, mode="step",
                                 step=self.state.step_count)
            if k in pending:
                dy = dy + pending.pop(k)
        return dy


def mse_loss(xp, y: Array, target: Array) -> tuple[Array, Array]:
    """Mean squared error and its gradient: ``(mean((y - t)²), 2 (y - t) / n)``."""
    d = y - target
    n = math.prod(y.shape)
    return xp.sum(d * d) / n, d * (2.0 / n)


def train_while_running(stepper: Stepper, inputs: Iterable[Array], targets: Iterable[Array],
                        loss: str | Callable[[Array, Array], tuple[Array, Array]] = "mse",
                        lr: float = 0.01, optimizer: Any = None,
                        clip_norm: float | None = None, delay: int | None = None) -> list[float]:
    """Loom's continuous "train while running" loop with a target delay queue.

    Each tick: ``set_input(x_t)``, ``step(train=True)``; the target of ``x_t`` waits in a
    queue for ``delay`` ticks (default ``stepper.latency``), until the output that belongs to
    ``x_t`` appears.
    Then ``(loss, dy) = loss(output, delayed_target)``, optional clipping of ``dy`` to
    ``clip_norm``, ``step_backward(dy)`` and an update: ``optimizer.step()`` when an optimizer
    (anything with ``step()``, and optionally ``zero_grad()``) is given, else plain SGD with
    ``lr`` on every parameter of the network.

    Returns the loss of every trained tick (moved to the host once, at the end).
    """
    net = stepper.net
    xp = net.backend.xp
    loss_fn = (lambda y, t: mse_loss(xp, y, t)) if loss == "mse" else loss
    if not callable(loss_fn):
        raise LoomxError(f"loss must be 'mse' or a callable (y, target) -> (loss, dy), "
                         f"got {loss!r}")
    delay = stepper.latency if delay is None else int(delay)
    queue: deque = deque()
    losses = []
    for x, target in zip(inputs, targets, strict=True):
        stepper.set_input(x)
        y = stepper.step(train=True)
        queue.append(target)
        if len(queue) <= delay:
            continue
        value, dy = loss_fn(y, queue.popleft())
        if clip_norm is not None:
            norm = xp.sqrt(xp.sum(dy * dy))
            dy = dy * xp.minimum(clip_norm / (norm + 1e-12), 1.0)
        if optimizer is not None and hasattr(optimizer, "zero_grad"):
            optimizer.zero_grad()
        else:
            net.zero_grad()
        stepper.step_backward(dy)
        if optimizer is not None:
            optimizer.step()
        else:
            for p in net.parameters():
                p.value = p.value - lr * p.grad
        losses.append(value)
    if not losses:
        return []
    return [float(v) for v in net.backend.to_host(xp.stack(losses))]
