"""Recurrent layers: RNN (tanh), LSTM and GRU with exact backpropagation through time.

Shapes (batch first): ``x [B, T, I]`` → ``y [B, T, H]`` (``return_sequences=True``) or
``y [B, H]`` (the last hidden state). ``T`` may differ between calls (the stepping executor feeds
one step at a time), only ``I`` is fixed by ``build``.

Speed: the input projection of all ``T`` steps is one matrix product over ``[T·B, I]``; each
step only multiplies the hidden state by a contiguous copy of ``weight_hhᵀ`` and does the gate
arithmetic. The backward pass writes the per-step pre-activation gradients into one time-major
``[T, B, G·H]`` buffer and forms ``weight_ih``, ``weight_hh`` and bias gradients with one
matrix product each.

Extra forward argument ``initial_state`` (``h [B, H]``, or ``(h, c)`` for LSTM; zeros when
``None``); :meth:`RecurrentLayer.final_state` returns the state after the last step, and after
``backward`` :meth:`RecurrentLayer.initial_state_grad` returns the gradient with respect to the
initial state (for truncated backpropagation across calls).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from ..backends import RandomSource
from ..errors import LoomxError, ShapeError
from .activations import sigmoid
from .base import Array, Layer, Shape, config_int, register_layer
from .dense import accumulate_linear_grads, linear, linear_backward
from .init import init_weight

#: ``step_back(t, dh) -> dh_prev`` for one step of backpropagation through time; it writes the
#: step's pre-activation gradients into ``dpx[t]`` (and ``dph[t]`` when the hidden side differs).
StepBack = Callable[[int, Array], Array]


def _add(a: Array | None, b: Array | None) -> Array | None:
    """``a + b`` where either may be ``None`` (a missing gradient)."""
    if a is None:
        return b
    return a if b is None else a + b


def lstm_cell_forward(xp: Any, xw_t: Array, hw: Array, c_prev: Array) -> tuple[Array, ...]:
    """One LSTM step's gate arithmetic (the reference of the ``lstm_cell_forward`` kernel).

    ``xw_t`` and ``hw`` are the input- and hidden-side pre-activations ``[B, 4H]`` with the
    gate blocks in the order (i, f, o, g) and the sigmoid blocks i, f, o halved (see
    :meth:`LSTM._gate_weights`), ``c_prev [B, H]`` the cell state before the step. Returns
    ``(i, f, g, o, c, tanh(c), h)``, each ``[B, H]`` and contiguous (the backward step reads
    each gate several times).
    """
    hs_ = c_prev.shape[-1]
    # u = tanh(½·pre) for i, f, o (σ(z) = ½·tanh(½z) + ½) and tanh(pre) for g
    u = xp.tanh(xw_t + hw)
    i = 0.5 * u[:, :hs_] + 0.5
    f = 0.5 * u[:, hs_:2 * hs_] + 0.5
    o = 0.5 * u[:, 2 * hs_:3 * hs_] + 0.5
    g = xp.asarray(u[:, 3 * hs_:], copy=True)
    c = f * c_prev + i * g
    tc = xp.tanh(c)
    return i, f, g, o, c, tc, o * tc


def lstm_cell_backward(xp: Any, i: Array, f: Array, g: Array, o: Array, c_prev: Array, tc: Array,
                       dh: Array, dc_next: Array | None, dpx: Array, t: int) -> Array:
    """One LSTM step backwards (the reference of the ``lstm_cell_backward`` kernel).

    Takes the step's saved ``(i, f, g, o, c_prev, tanh(c))`` (each ``[B, H]``), the gradient
    ``dh`` of its hidden output and ``dc_next`` of its cell state (``None``: zero). Writes the
    pre-activation gradient ``[B, 4H]``, in the parameters' gate order (i, f, g, o), into
    ``dpx[t]`` of the time-major ``[T, B, 4H]`` buffer ``dpx``; returns the gradient of
    ``c_prev``.
    """
    hs_ = i.shape[-1]
    dc = _add(dh * o * (1.0 - tc * tc), dc_next)
    dpx[t, :, :hs_] = dc * g * i * (1.0 - i)
    dpx[t, :, hs_:2 * hs_] = dc * c_prev * f * (1.0 - f)
    dpx[t, :, 2 * hs_:3 * hs_] = dc * i * (1.0 - g * g)
    dpx[t, :, 3 * hs_:] = dh * tc * o * (1.0 - o)
    return dc * f


def gru_cell_forward(xp: Any, xw_t: Array, hw: Array, h_prev: Array) -> tuple[Array, ...]:
    """One GRU step's gate arithmetic (the reference of the ``gru_cell_forward`` kernel).

    ``xw_t`` and ``hw`` are the input- and hidden-side pre-activations ``[B, 3H]`` (gate blocks
    r, z, n; ``hw`` includes ``bias_hh``), ``h_prev [B, H]`` the state before the step.
    Returns ``(r, z, n, hn, h)``, each ``[B, H]``, with ``hn`` the hidden side of the n gate.
    """
    hs_ = h_prev.shape[-1]
    rz = sigmoid(xp, xw_t[:, :2 * hs_] + hw[:, :2 * hs_])  # r and z in one call
    r, z = rz[:, :hs_], rz[:, hs_:]
    hn = hw[:, 2 * hs_:]
    n = xp.tanh(xw_t[:, 2 * hs_:] + r * hn)
    return r, z, n, hn, (1.0 - z) * n + z * h_prev


def gru_cell_backward(xp: Any, r: Array, z: Array, n: Array, hn: Array, h_prev: Array,
                      dh: Array, dpx: Array, dph: Array, t: int) -> Array:
    """One GRU step backwards (the reference of the ``gru_cell_backward`` kernel).

    Takes the step's saved ``(r, z, n, hn, h_prev)`` and the gradient ``dh`` of its output.
    Writes the input-side and hidden-side pre-activation gradients ``[B, 3H]`` into ``dpx[t]``
    and ``dph[t]`` (time-major ``[T, B, 3H]`` buffers); returns ``dh·z``, the direct part of
    the gradient of ``h_prev`` (the layer adds ``dph[t] @ weight_hh``).
    """
    hs_ = r.shape[-1]
    dn_pre = dh * (1.0 - z) * (1.0 - n * n)
    dz_pre = dh * (h_prev - n) * z * (1.0 - z)
    dr_pre = dn_pre * hn * r * (1.0 - r)
    for buf in (dpx, dph):
        buf[t, :, :hs_] = dr_pre
        buf[t, :, hs_:2 * hs_] = dz_pre
    dpx[t, :, 2 * hs_:] = dn_pre
    dph[t, :, 2 * hs_:] = dn_pre * r
    return dh * z


class RecurrentContext:
    """What ``backward`` needs from one forward call (kept by the caller).

    Attributes:
        x_tb: the input, time-major and flattened, ``[T·B, I]``.
        h0: the initial hidden state ``[B, H]`` (``c0`` too for LSTM).
        steps: per-step saved tensors (layer-specific tuples), in time order.
        hs: hidden states after each step, time-major ``[T, B, H]``.
        h_prev: hidden states before each step, ``[T, B, H]`` (``h0`` then ``hs[:-1]``).
        state: the state after the last step (``h`` or ``(h, c)``).
        d_initial: filled by ``backward``: the gradient of the initial state.
        fused: ``(x, handle)`` when a whole-sequence kernel ran the forward (PyTorch
            tensors); ``x_tb``, ``steps``, ``hs`` and ``h_prev`` are then unset.
    """

    __slots__ = ("x_tb", "batch", "steps", "h0", "c0", "hs", "h_prev", "state", "d_initial",
                 "fused")

    def __init__(self, x_tb: Array, batch: int, h0: Array, c0: Array | None = None):
        self.x_tb, self.batch, self.h0, self.c0 = x_tb, batch, h0, c0
        self.steps: list[Any] = []
        self.hs: Array = None
        self.h_prev: Array = None
        self.state: Any = None
        self.d_initial: Any = None
        self.fused: Any = None


class RecurrentLayer(Layer):
    """Shared config, checks and the time-major bookkeeping of RNN, LSTM and GRU.

    Args:
        hidden_size: H, the width of the hidden state.
        input_size: I; inferred from the input shape at build when ``None``.
        return_sequences: output every step ``[B, T, H]`` (True) or the last ``[B, H]``.
        bias: whether to learn biases.
    """

    config_fields = ("hidden_size", "input_size", "return_sequences", "bias")
    gates = 1

    def __init__(self, hidden_size: int, input_size: int | None = None,
                 return_sequences: bool = True, bias: bool = True, **kw):
        super().__init__(**kw)
        owner = type(self).__name__
        self.hidden_size = config_int(hidden_size, "hidden_size", owner)
        self.input_size = config_int(input_size, "input_size", owner, optional=True)
        self.return_sequences = bool(return_sequences)
        self.bias = bool(bias)

    # ------------------------------------------------------------------ build
    def _build(self, input_shape: Shape, rng: RandomSource) -> Shape:
        if len(input_shape) != 2:
            raise ShapeError(f"{self.describe()} expects per-sample input [T, I] but the input "
                             f"shape is {list(input_shape)}")
        t, i = input_shape
        if self.input_size is None:
            self.input_size = i
        elif self.input_size != i:
            raise ShapeError(f"{self.describe()} expected {self.input_size} input features but "
                             f"the input shape is {list(input_shape)}")
        h, g, dt = self.hidden_size, self.gates, self.float_dtype
        # Loom's InitRNNLayer/InitLSTMLayer: Xavier normal per gate block, zero biases.
        self.params["weight_ih"] = init_weight(rng, "xavier", (g * h, i), i, h, dt)
        self.params["weight_hh"] = init_weight(rng, "xavier", (g * h, h), h, h, dt)
        self._build_biases(dt)
        return (t, h) if self.return_sequences else (h,)

    def _build_biases(self, dt: Any) -> None:
        if self.bias:
            self.params["bias"] = self.backend.zeros((self.gates * self.hidden_size,), dtype=dt)

    # ------------------------------------------------------------------ checks
    def check_input(self, x: Array) -> None:
        self.check_sequence(x, self.input_size)

    def _check_state(self, s: Array, batch: int, what: str) -> Array:
        want = (batch, self.hidden_size)
        if not hasattr(s, "shape"):
            raise ShapeError(f"{self.describe()} expected {what} to be one array of shape "
                             f"{list(want)} but received a {type(s).__name__}"
                             + (" (only LSTM takes an (h, c) tuple)"
                                if isinstance(s, (tuple, list)) else ""))
        if tuple(s.shape) != want:
            raise ShapeError(f"{self.describe()} expected {what} of shape {list(want)} but "
                             f"received {list(s.shape)}")
        return s

    def _zeros_state(self, batch: int) -> Array:
        return self.backend.zeros((batch, self.hidden_size), dtype=self.float_dtype)

    def _initial_h(self, initial_state: Array | None, batch: int) -> Array:
        """The checked ``initial_state`` ``h [B, H]``, or zeros."""
        if initial_state is None:
            return self._zeros_state(batch)
        return self._check_state(initial_state, batch, "initial_state h")

    # ------------------------------------------------------------------ helpers
    def _project_inputs(self, x: Array, weight: Array,
                        bias: Array | None) -> tuple[Array, Array]:
        """``x [B, T, I]`` → ``(x_tb [T·B, I], x @ weight.T + bias`` time-major ``[T, B, G·H])``."""
        xp = self.xp
        b, t, i = x.shape
        x_tb = xp.reshape(xp.permute_dims(x, (1, 0, 2)), (t * b, i))
        xw = linear(xp, x_tb, weight, bias)
        return x_tb, xp.reshape(xw, (t, b, xw.shape[-1]))

    def _hidden_weight_t(self, weight: Array) -> Array:
        """``weightᵀ`` of a ``[G·H, H]`` hidden weight as a C-contiguous ``[H, G·H]`` copy (the
        per-step product with a contiguous right operand is measurably faster than with the
        transposed view)."""
        xp = self.xp
        rows, cols = weight.shape
        return xp.reshape(xp.reshape(xp.matrix_transpose(weight), (-1,)), (cols, rows))

    def _finish(self, ctx: RecurrentContext, hs: list[Array],
                state: Any) -> tuple[Array, RecurrentContext]:
        """Store the per-step hidden states ``hs`` and the final ``state``; return ``(y, ctx)``."""
        xp = self.xp
        h_all = xp.stack([ctx.h0, *hs], axis=0)  # [T+1, B, H]
        ctx.hs, ctx.h_prev = h_all[1:, ...], h_all[:-1, ...]
        ctx.state = state
        if self.return_sequences:
            return xp.permute_dims(ctx.hs, (1, 0, 2)), ctx
        return hs[-1], ctx

    def _dy_time_major(self, dy: Array, steps: int) -> list[Array | None]:
        """Per-step output gradients ``[B, H]`` (``None`` where the output had no step)."""
        xp = self.xp
        if self.return_sequences:
            dyt = xp.permute_dims(dy, (1, 0, 2))
            return [dyt[t, ...] for t in range(steps)]
        return [None] * (steps - 1) + [dy]

    def _grad_buffer(self, ctx: RecurrentContext) -> Array:
        """An uninitialised time-major ``[T, B, G·H]`` buffer for pre-activation gradients."""
        shape = (ctx.hs.shape[0], ctx.batch, self.gates * self.hidden_size)
        return self.xp.empty(shape, dtype=ctx.hs.dtype, device=self.backend.device)

    def _bptt(self, dy: Array, ctx: RecurrentContext, step_back: StepBack, dpx: Array,
              dph: Array, bias_x: str | None, bias_h: str | None,
              need_input_grad: bool = True) -> Array | None:
        """Backpropagation through time; returns ``dx [B, T, I]`` (``None`` when
        ``need_input_grad`` is ``False``), sets ``ctx.d_initial``.

        ``step_back`` runs from the last step to the first with the gradient ``dh`` of the
        hidden state after step ``t`` and fills ``dpx[t]`` / ``dph[t]`` (time-major
        ``[T, B, G·H]`` buffers of the input-side and hidden-side pre-activation gradients;
        the same array when they agree). They then give W_ih, W_hh and the biases
        (``bias_x`` on the input side, ``bias_h`` on the hidden side) with one product each.
        """
        xp = self.xp
        steps = ctx.hs.shape[0]
        self._check_dy(dy, ctx, steps)
        dys = self._dy_time_major(dy, steps)
        dh_next = None
        for t in range(steps - 1, -1, -1):
            dh_next = step_back(t, _add(dys[t], dh_next))
        ctx.d_initial = dh_next
        b, gh = ctx.batch, self.gates * self.hidden_size
        dpx2 = xp.reshape(dpx, (steps * b, gh))
        dph2 = dpx2 if dph is dpx else xp.reshape(dph, (steps * b, gh))
        accumulate_linear_grads(self, ctx.h_prev, dph2, "weight_hh", bias_h)
        dx = linear_backward(self, ctx.x_tb, dpx2, "weight_ih", bias_x, need_input_grad)
        if dx is None:
            return None
        return xp.permute_dims(xp.reshape(dx, (steps, b, dx.shape[-1])), (1, 0, 2))

    def _check_dy(self, dy: Array, ctx: RecurrentContext, steps: int) -> None:
        """``dy`` must be ``[B, T, H]`` (``return_sequences``) or ``[B, H]``."""
        h = self.hidden_size
        self.check_grad(dy, (ctx.batch, steps, h) if self.return_sequences else (ctx.batch, h))

    # ------------------------------------------------------------------ fused sequences
    #: the ``recurrent_sequence_forward`` mode of this layer (``"lstm"``, ``"gru"``,
    #: ``"rnn_tanh"``); backends with that kernel (PyTorch) run the whole sequence in one call
    sequence_mode: str | None = None

    def _sequence_names(self) -> list[str | None]:
        """The parameter names in the kernel's order ``[weight_ih, weight_hh, bias_ih,
        bias_hh]`` (``None`` for a bias the layer does not have)."""
        return ["weight_ih", "weight_hh", "bias" if self.bias else None, None]

    def _sequence(self, x: Array, states: list[Array],
                  train: bool) -> tuple[Array, RecurrentContext] | None:
        """The whole sequence through the backend's ``recurrent_sequence_forward`` kernel
        (ATen's fused RNN/LSTM/GRU on PyTorch tensors), or ``None`` where it has none or
        declines."""
        kernel = self.backend.kernel("recurrent_sequence_forward")
        if kernel is None or self.sequence_mode is None:
            return None
        params = [None if n is None else self.params[n] for n in self._sequence_names()]
        found = kernel(self.sequence_mode, x, states, params, train)
        if found is None:
            return None
        y, last, handle = found
        ctx = RecurrentContext(None, x.shape[0], *states)
        ctx.fused = (x, handle)
        ctx.state = tuple(last) if len(last) > 1 else last[0]
        return (y if self.return_sequences else last[0]), ctx

    def _sequence_backward(self, dy: Array, ctx: RecurrentContext,
                           need_input_grad: bool) -> Array | None:
        """Backward of :meth:`_sequence` (a forward without ``train`` is run again, with)."""
        x, handle = ctx.fused
        self._check_dy(dy, ctx, x.shape[1])
        if handle is None:
            states = [ctx.h0] if ctx.c0 is None else [ctx.h0, ctx.c0]
            found = self._sequence(x, states, True)
            if found is None:
                raise LoomxError(f"{self.describe()}: backward needs a forward with "
                                 "train=True on these arrays")
            ctx.fused = found[1].fused
            handle = ctx.fused[1]
        seq, last = (dy, None) if self.return_sequences else (None, dy)
        dx, d_states, d_params = self.backend.kernel("recurrent_sequence_backward")(
            handle, seq, last, need_input_grad)
        for name, grad in zip(self._sequence_names(), d_params):
            if name is not None:
                self._accumulate(name, grad)
        ctx.d_initial = tuple(d_states) if len(d_states) > 1 else d_states[0]
        return dx

    # ------------------------------------------------------------------ public extras
    def final_state(self, ctx: RecurrentContext) -> Any:
        """The state after the last step: ``h [B, H]`` (LSTM: ``(h, c)``)."""
        return ctx.state

    def initial_state_grad(self, ctx: RecurrentContext) -> Any:
        """After ``backward``: the gradient of the initial state (same structure as it)."""
        return ctx.d_initial

    def __call__(self, x: Array, train: bool = False, initial_state: Any = None) -> Array:
        return self.forward(x, train, initial_state)[0]


@register_layer
class RNN(RecurrentLayer):
    """Elman RNN: ``h_t = tanh(x_t W_ihᵀ + h_{t-1} W_hhᵀ + b)``.

    Parameters: ``weight_ih [H, I]``, ``weight_hh [H, H]``, ``bias [H]`` (PyTorch's
    ``bias_ih_l0 + bias_hh_l0`` folded into one vector). Initialisation as Loom's
    ``InitRNNLayer``: ``weight_ih ~ N(0, sqrt(2/(I+H)))``, ``weight_hh ~ N(0, sqrt(2/(2H)))``,
    zero bias. The bias gradient is the exact sum of the pre-activation gradients (Loom's
    double-counts it).
    """

    type_name = "rnn"
    sequence_mode = "rnn_tanh"

    def forward(self, x: Array, train: bool = False,
                initial_state: Array | None = None) -> tuple[Array, RecurrentContext]:
        self.check_input(x)
        xp = self.xp
        batch = x.shape[0]
        h = self._initial_h(initial_state, batch)
        fused = self._sequence(x, [h], train)
        if fused is not None:
            return fused
        x_tb, xw = self._project_inputs(x, self.params["weight_ih"], self.params.get("bias"))
        ctx = RecurrentContext(x_tb, batch, h)
        w_hh_t = self._hidden_weight_t(self.params["weight_hh"])
        hs = []
        for t in range(xw.shape[0]):
            h = xp.tanh(xw[t, ...] + xp.matmul(h, w_hh_t))
            hs.append(h)
        return self._finish(ctx, hs, h)

    def backward(self, dy: Array, ctx: RecurrentContext,
                 need_input_grad: bool = True) -> Array | None:
        if ctx.fused is not None:
            return self._sequence_backward(dy, ctx, need_input_grad)
        xp = self.xp
        w_hh = self.params["weight_hh"]
        dpx = self._grad_buffer(ctx)

        def step_back(t: int, dh: Array) -> Array:
            h = ctx.hs[t, ...]
            da = dh * (1.0 - h * h)
            dpx[t, ...] = da
            return xp.matmul(da, w_hh)

        return self._bptt(dy, ctx, step_back, dpx, dpx, "bias" if self.bias else None, None,
                          need_input_grad)


@register_layer
class LSTM(RecurrentLayer):
    """Long short-term memory, PyTorch's formulation and gate order (i, f, g, o).

    ``[i f g o] = x_t W_ihᵀ + h_{t-1} W_hhᵀ + b``; ``i, f, o = σ(·)``, ``g = tanh(·)``;
    ``c_t = f⊙c_{t-1} + i⊙g``; ``h_t = o⊙tanh(c_t)``.

    Parameters: ``weight_ih [4H, I]``, ``weight_hh [4H, H]``, ``bias [4H]``. Initialisation as
    Loom's ``InitLSTMLayer``: Xavier normal per gate block, forget-gate bias 1, other biases 0.
    State: ``(h, c)``, each ``[B, H]``.
    """

    type_name = "lstm"
    gates = 4
    sequence_mode = "lstm"

    def _build_biases(self, dt: Any) -> None:
        if self.bias:
            h = self.hidden_size
            xp = self.xp
            zeros = self.backend.zeros((h,), dtype=dt)
            ones = self.backend.ones((h,), dtype=dt)
            self.params["bias"] = xp.concat([zeros, ones, zeros, zeros])

    def forward(self, x: Array, train: bool = False,
                initial_state: tuple[Array, Array] | None = None,
                ) -> tuple[Array, RecurrentContext]:
        self.check_input(x)
        xp = self.xp
        batch, hs_ = x.shape[0], self.hidden_size
        if initial_state is None:
            h, c = self._zeros_state(batch), self._zeros_state(batch)
        else:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise ShapeError(f"{self.describe()} expected initial_state as a pair (h, c) of "
                                 f"[B, {hs_}] arrays but received {type(initial_state).__name__}")
            h = self._check_state(initial_state[0], batch, "initial_state h")
            c = self._check_state(initial_state[1], batch, "initial_state c")
        fused = self._sequence(x, [h, c], train)
        if fused is not None:
            return fused
        w_ih, w_hh, bias = self._gate_weights()
        x_tb, xw = self._project_inputs(x, w_ih, bias)
        ctx = RecurrentContext(x_tb, batch, h, c)
        w_hh_t = self._hidden_weight_t(w_hh)
        cell = self.backend.kernel("lstm_cell_forward") or partial(lstm_cell_forward, xp)
        hs = []
        for t in range(xw.shape[0]):
            c_prev = c
            i, f, g, o, c, tc, h = cell(xw[t, ...], xp.matmul(h, w_hh_t), c_prev)
            ctx.steps.append((i, f, g, o, c_prev, tc))
            hs.append(h)
        return self._finish(ctx, hs, (h, c))

    def _gate_weights(self) -> tuple[Array, Array, Array | None]:
        """``weight_ih``, ``weight_hh`` and ``bias`` with the gate blocks reordered to
        (i, f, o, g) and the sigmoid blocks halved, so that one ``tanh`` over ``[B, 4H]`` gives
        every gate of a step (``σ(z) = ½·tanh(½z) + ½`` as in :func:`sigmoid`; halving is
        exact, so the gates equal those of the unscaled formula)."""
        xp, h = self.xp, self.hidden_size

        def reorder(a: Array) -> Array:
            return xp.concat([a[:2 * h, ...] * 0.5, a[3 * h:, ...] * 0.5, a[2 * h:3 * h, ...]],
                             axis=0)

        bias = self.params.get("bias")
        return (reorder(self.params["weight_ih"]), reorder(self.params["weight_hh"]),
                None if bias is None else reorder(bias))

    def backward(self, dy: Array, ctx: RecurrentContext,
                 need_input_grad: bool = True) -> Array | None:
        if ctx.fused is not None:
            return self._sequence_backward(dy, ctx, need_input_grad)
        xp = self.xp
        w_hh = self.params["weight_hh"]
        dpx = self._grad_buffer(ctx)  # gate order of the parameters: i, f, g, o
        cell = self.backend.kernel("lstm_cell_backward") or partial(lstm_cell_backward, xp)
        dc_next = None

        def step_back(t: int, dh: Array) -> Array:
            nonlocal dc_next
            dc_next = cell(*ctx.steps[t], dh, dc_next, dpx, t)
            return xp.matmul(dpx[t, ...], w_hh)

        dx = self._bptt(dy, ctx, step_back, dpx, dpx, "bias" if self.bias else None, None,
                        need_input_grad)
        ctx.d_initial = (ctx.d_initial, dc_next)
        return dx


@register_layer
class GRU(RecurrentLayer):
    """Gated recurrent unit, PyTorch's formulation and gate order (r, z, n).

    ``r = σ(x W_irᵀ + b_ir + h W_hrᵀ + b_hr)``, ``z = σ(x W_izᵀ + b_iz + h W_hzᵀ + b_hz)``,
    ``n = tanh(x W_inᵀ + b_in + r⊙(h W_hnᵀ + b_hn))``, ``h_t = (1 − z)⊙n + z⊙h_{t-1}``.

    Parameters: ``weight_ih [3H, I]``, ``weight_hh [3H, H]``, ``bias_ih [3H]``, ``bias_hh [3H]``
    (two biases, because ``b_hn`` sits inside the reset gate). Xavier normal weights, zero biases.
    """

    type_name = "gru"
    gates = 3
    sequence_mode = "gru"

    def _sequence_names(self) -> list[str | None]:
        bias = ["bias_ih", "bias_hh"] if self.bias else [None, None]
        return ["weight_ih", "weight_hh", *bias]

    def _build_biases(self, dt: Any) -> None:
        if self.bias:
            self.params["bias_ih"] = self.backend.zeros((3 * self.hidden_size,), dtype=dt)
            self.params["bias_hh"] = self.backend.zeros((3 * self.hidden_size,), dtype=dt)

    def forward(self, x: Array, train: bool = False,
                initial_state: Array | None = None) -> tuple[Array, RecurrentContext]:
        self.check_input(x)
        xp = self.xp
        batch = x.shape[0]
        h = self._initial_h(initial_state, batch)
        fused = self._sequence(x, [h], train)
        if fused is not None:
            return fused
        x_tb, xw = self._project_inputs(x, self.params["weight_ih"], self.params.get("bias_ih"))
        ctx = RecurrentContext(x_tb, batch, h)
        w_hh_t = self._hidden_weight_t(self.params["weight_hh"])
        b_hh = self.params.get("bias_hh")
        cell = self.backend.kernel("gru_cell_forward") or partial(gru_cell_forward, xp)
        hs = []
        for t in range(xw.shape[0]):
            hw = xp.matmul(h, w_hh_t)
            if b_hh is not None:
                hw = hw + b_hh
            h_prev = h
            r, z, n, hn, h = cell(xw[t, ...], hw, h_prev)
            ctx.steps.append((r, z, n, hn, h_prev))
            hs.append(h)
        return self._finish(ctx, hs, h)

    def backward(self, dy: Array, ctx: RecurrentContext,
                 need_input_grad: bool = True) -> Array | None:
        if ctx.fused is not None:
            return self._sequence_backward(dy, ctx, need_input_grad)
        xp = self.xp
        w_hh = self.params["weight_hh"]
        dpx, dph = self._grad_buffer(ctx), self._grad_buffer(ctx)
        cell = self.backend.kernel("gru_cell_backward") or partial(gru_cell_backward, xp)

        def step_back(t: int, dh: Array) -> Array:
            return cell(*ctx.steps[t], dh, dpx, dph, t) + xp.matmul(dph[t, ...], w_hh)

        bx, bh = ("bias_ih", "bias_hh") if self.bias else (None, None)
        return self._bptt(dy, ctx, step_back, dpx, dph, bx, bh, need_input_grad)
