"""Whole RNN, LSTM and GRU sequences on CUDA in one kernel launch each way (the CuPy backend's
``recurrent_sequence_forward`` / ``recurrent_sequence_backward``).

loomx's recurrent layers run one step at a time: per step a hidden-state product and a cell
kernel each way, 32 LSTM steps of benchmark c being about 130 launches, each costing the host
10–20 µs, while PyTorch makes one cuDNN call for the whole sequence. Here every thread block
owns ``R`` rows of the batch and runs all ``T`` steps for them: the rows of a recurrent layer
are independent, so no block ever waits for another. Per step a block multiplies its rows'
hidden state by ``W_hhᵀ`` (read from the device's caches; each thread owns gate columns and
keeps ``R`` accumulators), applies the gates, and keeps the state in shared memory. The input
projection of all steps before it, and the weight gradients, the bias gradients and the input
gradient after the backward kernel, are one matrix product each over all ``B·T`` rows,
batch-major (no transposed copies).

- ``forward(mode, x [B, T, I], states, [w_ih [G·H, I], w_hh [G·H, H], b_ih | None,
  b_hh | None], train) -> (y [B, T, H], last_states, handle) | None``, the contract of
  :mod:`loomx.backends.torch_rnn`: ``mode`` ``"lstm"`` (states ``[h0, c0]``, G = 4),
  ``"gru"`` (``[h0]``, G = 3) or ``"rnn_tanh"`` (``[h0]``, G = 1). It declines (``None``) for
  other modes, dtypes other than float32/float64 or mixed ones, empty batches or sequences,
  hidden sizes above ``MAX_HIDDEN`` (256), and when the kernels fail to compile (with a
  warning, once); the layer then runs its per-step path. Every block reads all of ``W_hh``
  each step, ``4·G·H²`` bytes in float32, which the device's L2 cache serves while ``W_hh`` is
  small; for larger ``H`` the per-step path's cuBLAS products use the device better than
  this kernel would, and its launch overhead matters less against them (a bound from that
  estimate, not a measurement).
- ``backward(handle, dy [B, T, H] | None, dh_T [B, H] | None, need_input_grad) ->
  (dx | None, d_states, [dw_ih, dw_hh, db_ih | None, db_hh | None])``.

The arithmetic is PyTorch's formulation in the parameters' gate orders (LSTM i, f, g, o; GRU
r, z, n with ``b_hn`` inside the reset gate) with ``σ(z) = 1 / (1 + e^(-z))``; results agree
with the per-step path up to rounding (another summation order in the hidden-state products).

The module is written against the array library passed in (``cupy``, or numpy for the CPU
emulation of the kernels in the tests) and a ``build(code, name)`` function that compiles the
kernel source and returns ``launch(grid, block, args, shared_mem)``, or ``None`` when it
cannot compile it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Most dynamic shared memory a block may take without opting in (every CUDA device).
SHARED_LIMIT = 48 << 10
#: Largest number of batch rows one block owns.
MAX_ROWS = 8
#: Threads per block, at most.
MAX_THREADS = 512
#: Largest hidden size run as a whole sequence (see the module docstring).
MAX_HIDDEN = 256

_CTYPES = {np.dtype(np.float32): ("float", "expf", "tanhf"),
           np.dtype(np.float64): ("double", "exp", "tanh")}

#: The two kernels; ``T``, ``MODE`` (0 LSTM, 1 GRU, 2 RNN), ``GATES``, ``H``, ``R`` (rows per
#: block), ``NT`` (threads per block), ``GRP`` (thread groups of the backward product) and
#: ``SHARED_MEMORY`` come from the prelude.
KERNELS = r"""
#define G (GATES * H)

__device__ __forceinline__ T loomx_sigmoid(T z) { return (T)1 / ((T)1 + EXP_(-z)); }

// the block's rows of the shared [R][H] state h (and, for the LSTM, c) into [B, H] arrays
__device__ __forceinline__ void store_rows(T* __restrict__ gh, T* __restrict__ gc,
                                           const T* h, const T* c, int row0, int rows) {
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        if (r < rows) {
            const long long at = (long long)(row0 + r) * H + idx % H;
            gh[at] = h[idx];
            if (MODE == 0) gc[at] = c[idx];
        }
    }
}

// xw [B, S, G]: x·W_ihᵀ; bx [G] (has_bx): the input-side bias (LSTM, RNN: both biases);
// bh [G] (has_bh): the hidden-side bias (GRU); wt [H, G]: W_hhᵀ; h0, c0, hT, cT [B, H];
// y [B, S, H]. With save: saved [B, S, SAVED] (LSTM: i, f, g, o; GRU: r, z, n, and the
// hidden side of n) and, for the LSTM, cs [B, S, H] (the cell states).
extern "C" __global__ void __launch_bounds__(NT) rnn_seq_fwd(
    const T* __restrict__ xw, const T* __restrict__ bx, const T* __restrict__ bh,
    const T* __restrict__ wt, const T* __restrict__ h0, const T* __restrict__ c0,
    T* __restrict__ y, T* __restrict__ hT, T* __restrict__ cT, T* __restrict__ saved,
    T* __restrict__ cs, int batch, int steps, int has_bx, int has_bh, int save)
{
    SHARED_MEMORY(T);
    T* const hs = smem;            // [R][H] hidden state of the block's rows
    T* const cst = hs + R * H;     // [R][H] cell state (LSTM)
    T* const pre = cst + R * H;    // [R][G] the step's hidden-side pre-activations
    const int row0 = blockIdx.x * R;
    const int rows = min(R, batch - row0);
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        const long long at = (long long)(row0 + r) * H + idx % H;
        hs[idx] = r < rows ? h0[at] : (T)0;
        cst[idx] = r < rows && MODE == 0 ? c0[at] : (T)0;
    }
    __syncthreads();
    for (int t = 0; t < steps; ++t) {
        for (int j = threadIdx.x; j < G; j += NT) {
            T acc[R];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = (T)0;
#pragma unroll 8
            for (int k = 0; k < H; ++k) {
                const T w = wt[k * G + j];
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] += hs[r * H + k] * w;
            }
            const T b = has_bh ? bh[j] : (T)0;
#pragma unroll
            for (int r = 0; r < R; ++r) pre[r * G + j] = acc[r] + b;
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < R * H; idx += NT) {
            const int r = idx / H, u = idx % H;
            if (r < rows) {
                const long long bt = (long long)(row0 + r) * steps + t;
                const T* p = pre + r * G;
                const T* x = xw + bt * G;
#define XIN(q) (x[(q) * H + u] + (has_bx ? bx[(q) * H + u] : (T)0))
#if MODE == 0
                const T i = loomx_sigmoid(XIN(0) + p[u]);
                const T f = loomx_sigmoid(XIN(1) + p[H + u]);
                const T g = TANH_(XIN(2) + p[2 * H + u]);
                const T o = loomx_sigmoid(XIN(3) + p[3 * H + u]);
                const T c = f * cst[idx] + i * g;
                const T h = o * TANH_(c);
                cst[idx] = c;
                if (save) {
                    T* q = saved + bt * SAVED;
                    q[u] = i; q[H + u] = f; q[2 * H + u] = g; q[3 * H + u] = o;
                    cs[bt * H + u] = c;
                }
#elif MODE == 1
                const T rg = loomx_sigmoid(XIN(0) + p[u]);
                const T z = loomx_sigmoid(XIN(1) + p[H + u]);
                const T hn = p[2 * H + u];
                const T n = TANH_(XIN(2) + rg * hn);
                const T h = ((T)1 - z) * n + z * hs[idx];
                if (save) {
                    T* q = saved + bt * SAVED;
                    q[u] = rg; q[H + u] = z; q[2 * H + u] = n; q[3 * H + u] = hn;
                }
#else
                const T h = TANH_(XIN(0) + p[u]);
#endif
#undef XIN
                hs[idx] = h;
                y[bt * H + u] = h;
            }
        }
        __syncthreads();
    }
    store_rows(hT, cT, hs, cst, row0, rows);
}

// saved, cs, c0 as saved by the forward; h0 and y its initial and hidden states; w [G, H]:
// W_hh; dy [B, S, H] (has_dy); dhT [B, H] (has_dh). Writes the input-side pre-activation
// gradients dpx [B, S, G], for the GRU the hidden-side ones dph [B, S, G] (elsewhere they
// are the same), and dh0, dc0 [B, H].
extern "C" __global__ void __launch_bounds__(NT) rnn_seq_bwd(
    const T* __restrict__ saved, const T* __restrict__ cs, const T* __restrict__ c0,
    const T* __restrict__ h0, const T* __restrict__ y, const T* __restrict__ w,
    const T* __restrict__ dy, const T* __restrict__ dhT, T* __restrict__ dpx,
    T* __restrict__ dph, T* __restrict__ dh0, T* __restrict__ dc0,
    int batch, int steps, int has_dy, int has_dh)
{
    SHARED_MEMORY(T);
    T* const dh = smem;            // [R][H] gradient of the hidden state after the step
    T* const dc = dh + R * H;      // [R][H] LSTM: of the cell state; GRU: dh·z, the direct
                                   // part of the previous hidden state's gradient
    T* const dg = dc + R * H;      // [R][G] the step's hidden-side pre-activation gradients
    T* const part = dg + R * G;    // [GRP][R][H] partial sums of dg·W_hh
    const int row0 = blockIdx.x * R;
    const int rows = min(R, batch - row0);
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        dh[idx] = r < rows && has_dh ? dhT[(long long)(row0 + r) * H + idx % H] : (T)0;
        dc[idx] = (T)0;
    }
    __syncthreads();
    for (int t = steps - 1; t >= 0; --t) {
        for (int idx = threadIdx.x; idx < R * H; idx += NT) {
            const int r = idx / H, u = idx % H;
            T* q = dg + r * G;
            if (r < rows) {
                const long long bt = (long long)(row0 + r) * steps + t;
                const T d = dh[idx] + (has_dy ? dy[bt * H + u] : (T)0);
                T* out = dpx + bt * G;
#if MODE == 0
                const T* s = saved + bt * SAVED;
                const T i = s[u], f = s[H + u], g = s[2 * H + u], o = s[3 * H + u];
                const T c = cs[bt * H + u];
                const T c_prev = t > 0 ? cs[(bt - 1) * H + u] : c0[(long long)(row0 + r) * H + u];
                const T tc = TANH_(c);
                const T dcv = d * o * ((T)1 - tc * tc) + dc[idx];
                q[u] = dcv * g * i * ((T)1 - i);
                q[H + u] = dcv * c_prev * f * ((T)1 - f);
                q[2 * H + u] = dcv * i * ((T)1 - g * g);
                q[3 * H + u] = d * tc * o * ((T)1 - o);
                dc[idx] = dcv * f;
                for (int gate = 0; gate < GATES; ++gate) out[gate * H + u] = q[gate * H + u];
#elif MODE == 1
                const T* s = saved + bt * SAVED;
                const T rg = s[u], z = s[H + u], n = s[2 * H + u], hn = s[3 * H + u];
                const T h_prev = t > 0 ? y[(bt - 1) * H + u] : h0[(long long)(row0 + r) * H + u];
                const T dn = d * ((T)1 - z) * ((T)1 - n * n);
                const T dz = d * (h_prev - n) * z * ((T)1 - z);
                const T dr = dn * hn * rg * ((T)1 - rg);
                out[u] = dr; out[H + u] = dz; out[2 * H + u] = dn;
                q[u] = dr; q[H + u] = dz; q[2 * H + u] = dn * rg;
                T* hid = dph + bt * G;
                hid[u] = dr; hid[H + u] = dz; hid[2 * H + u] = dn * rg;
                dc[idx] = d * z;
#else
                const T h = y[bt * H + u];
                q[u] = d * ((T)1 - h * h);
                out[u] = q[u];
#endif
            } else {
                for (int gate = 0; gate < GATES; ++gate) q[gate * H + u] = (T)0;
            }
        }
        __syncthreads();
        // dh_prev[r][k] = sum_j dg[r][j] · W_hh[j][k]: GRP groups of threads, each over a
        // contiguous range of gate columns (so that dg is read in vectors), then the groups'
        // partial sums are added
        for (int idx = threadIdx.x; idx < GRP * H; idx += NT) {
            const int k = idx % H, grp = idx / H;
            const int span = (G + GRP - 1) / GRP;
            const int j_end = min(G, (grp + 1) * span);
            T acc[R];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = (T)0;
#pragma unroll 8
            for (int j = grp * span; j < j_end; ++j) {
                const T wv = w[j * H + k];
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] += dg[r * G + j] * wv;
            }
#pragma unroll
            for (int r = 0; r < R; ++r) part[(grp * R + r) * H + k] = acc[r];
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < R * H; idx += NT) {
            T sum = MODE == 1 ? dc[idx] : (T)0;
            for (int grp = 0; grp < GRP; ++grp) sum += part[grp * R * H + idx];
            dh[idx] = sum;
        }
        __syncthreads();
    }
    store_rows(dh0, dc0, dh, dc, row0, rows);
}
"""

#: How device code reaches the block's dynamic shared memory on CUDA (the CPU emulation in
#: the tests defines ``SHARED_MEMORY`` its own way).
CUDA_PRELUDE = """
#define SHARED_MEMORY(T) extern __shared__ __align__(16) unsigned char loomx_shared[]; \\
    T* const smem = reinterpret_cast<T*>(loomx_shared)
"""


#: mode -> (MODE in the source, gates G, values saved per unit and step for the backward)
MODES = {"lstm": (0, 4, 4), "gru": (1, 3, 4), "rnn_tanh": (2, 1, 0)}


@dataclass(frozen=True)
class Plan:
    """The launch geometry of one (mode, dtype, H, B): rows per block, threads per block,
    thread groups of the backward product, blocks, and each kernel's shared memory in bytes."""

    rows: int
    threads: int
    groups: int
    blocks: int
    forward_shared: int
    backward_shared: int


def plan_for(hidden: int, batch: int, itemsize: int, multiprocessors: int, gates: int = 4,
             rows: int | None = None, threads: int | None = None) -> Plan | None:
    """Rows per block so that the blocks about fill the device once (at most ``MAX_ROWS``),
    threads to cover the ``G·H`` gate columns (a multiple of 32, at most ``MAX_THREADS``),
    fewer rows while the backward's shared memory exceeds ``SHARED_LIMIT``; ``None`` when one
    row does not fit, or ``hidden`` exceeds ``MAX_HIDDEN``. ``rows``/``threads`` force a choice
    (the tests' small emulated blocks)."""
    if hidden > MAX_HIDDEN or hidden < 1:
        return None
    if threads is None:
        threads = min(MAX_THREADS, 32 * math.ceil(gates * hidden / 32))
    groups = max(1, threads // hidden)
    if rows is None:
        rows = min(MAX_ROWS, max(1, math.ceil(batch / max(1, multiprocessors))))
        rows = 1 << (rows - 1).bit_length()  # a power of two: few compiled variants
        rows = min(rows, MAX_ROWS)

    def shared(r: int) -> tuple[int, int]:
        state = 2 * hidden + gates * hidden  # h (or dh), c (or dc), and the gates
        return itemsize * r * state, itemsize * r * (state + groups * hidden)

    while rows > 1 and shared(rows)[1] > SHARED_LIMIT:
        rows //= 2
    fwd, bwd = shared(rows)
    if bwd > SHARED_LIMIT:
        return None
    return Plan(rows, threads, groups, math.ceil(batch / rows), fwd, bwd)


@functools.lru_cache(maxsize=64)
def kernel_code(mode: str, dtype: Any, hidden: int, plan: Plan) -> str:
    """The kernels' source for one mode, dtype, hidden size and plan (without a prelude;
    cached, so that the compiled-module cache keyed by it hashes each source once)."""
    ctype, exp, tanh = _CTYPES[np.dtype(dtype)]
    number, gates, saved = MODES[mode]
    return (f"typedef {ctype} T;\n#define EXP_ {exp}\n#define TANH_ {tanh}\n"
            f"#define MODE {number}\n#define GATES {gates}\n#define SAVED ({saved} * H)\n"
            f"#define H {hidden}\n#define R {plan.rows}\n#define NT {plan.threads}\n"
            f"#define GRP {plan.groups}\n{KERNELS}")


Launch = Callable[[int, int, tuple, int], None]


class RecurrentSequence:
    """The two whole-sequence kernels over one array library.

    Args:
        xp: the array library (``cupy``; numpy in the emulation tests).
        build: ``build(code, name) -> launch(grid, block, args, shared_mem)``.
        multiprocessors: ``() -> int``, the current device's multiprocessor count.
        device: ``device(array)`` -> a context manager making the array's device current.
        rows, threads: force the plan (tests). ``rows`` defaults to the environment variable
            ``LOOMX_CUDA_RNN_ROWS`` when it is set (1, 2, 4 or 8: for measuring the choice of
            rows per block on a device; unset, the plan fills the device once).
    """

    def __init__(self, xp: Any, build: Callable[[str, str], Launch | None],
                 multiprocessors: Callable[[], int],
                 device: Callable[[Any], Any] = lambda a: contextlib.nullcontext(),
                 rows: int | None = None, threads: int | None = None):
        self.xp, self.build, self.multiprocessors = xp, build, multiprocessors
        self.device = device
        if rows is None and os.environ.get("LOOMX_CUDA_RNN_ROWS"):
            rows = int(os.environ["LOOMX_CUDA_RNN_ROWS"])
            if rows not in (1, 2, 4, 8):
                raise ValueError(f"LOOMX_CUDA_RNN_ROWS must be 1, 2, 4 or 8, got {rows}")
        self.rows, self.threads = rows, threads
        self._failed: set[str] = set()

    def _launcher(self, code: str, name: str) -> Launch | None:
        """The compiled kernel, or ``None`` (warned once per source) when it fails to
        compile."""
        if code in self._failed:
            return None
        launch = self.build(code, name)
        if launch is None:
            self._failed.add(code)
            warnings.warn("the whole-sequence recurrent kernels failed to compile; recurrent "
                          "layers run step by step on this device", RuntimeWarning, stacklevel=4)
        return launch

    def forward(self, mode: str, x, states, params, train: bool):
        """Run the sequence (see the module docstring); ``None`` where it declines."""
        with self.device(x):
            return self._forward(mode, x, states, params, train)

    def backward(self, handle, dy, dh_last, need_input_grad: bool = True):
        """The gradients of one :meth:`forward` with ``train`` (see the module docstring)."""
        with self.device(handle[0]):
            return self._backward(handle, dy, dh_last, need_input_grad)

    def _forward(self, mode: str, x, states, params, train: bool):
        xp = self.xp
        if mode not in MODES or len(states) != (2 if mode == "lstm" else 1):
            return None
        given = [x, *states, *(p for p in params if p is not None)]
        dtype = x.dtype
        if np.dtype(dtype) not in _CTYPES or any(a.dtype != dtype for a in given):
            return None
        batch, steps, features = x.shape
        w_ih, w_hh, b_ih, b_hh = params
        hidden, (_, gates, saved_width) = w_hh.shape[1], MODES[mode]
        plan = plan_for(hidden, batch, np.dtype(dtype).itemsize, self.multiprocessors(),
                        gates, self.rows, self.threads)
        if batch == 0 or steps == 0 or plan is None:
            return None
        launch = self._launcher(kernel_code(mode, dtype, hidden, plan), "rnn_seq_fwd")
        if launch is None:
            return None
        x2 = xp.ascontiguousarray(x).reshape(batch * steps, features)
        xw = xp.matmul(x2, w_ih.T)  # [B·T, G·H], batch-major
        if mode == "gru":  # b_hn sits inside the reset gate: the biases stay apart
            bx, bh = b_ih, b_hh
        else:
            bx, bh = (b_ih if b_hh is None else b_hh if b_ih is None else b_ih + b_hh), None
        h0 = xp.ascontiguousarray(states[0])
        c0 = xp.ascontiguousarray(states[1]) if mode == "lstm" else h0
        y = xp.empty((batch, steps, hidden), dtype=dtype)
        h_t = xp.empty_like(h0)
        c_t = xp.empty_like(h0) if mode == "lstm" else h_t
        saved = (xp.empty((batch, steps, saved_width * hidden), dtype=dtype)
                 if train and saved_width else y)
        cells = xp.empty((batch, steps, hidden), dtype=dtype) if train and mode == "lstm" else y

        def bias(b):
            return y if b is None else xp.ascontiguousarray(b)

        launch(plan.blocks, plan.threads,
               (xw, bias(bx), bias(bh), xp.ascontiguousarray(w_hh.T), h0, c0, y, h_t, c_t,
                saved, cells, np.int32(batch), np.int32(steps), np.int32(bx is not None),
                np.int32(bh is not None), np.int32(bool(train))), plan.forward_shared)
        handle = None
        if train:
            handle = (x2, mode, (batch, steps, features), h0, c0, y, saved, cells, w_ih, w_hh,
                      (b_ih is not None, b_hh is not None), plan)
        return y, ([h_t, c_t] if mode == "lstm" else [h_t]), handle

    def _backward(self, handle, dy, dh_last, need_input_grad: bool):
        xp = self.xp
        (x2, mode, (batch, steps, features), h0, c0, y, saved, cells, w_ih, w_hh, biases,
         plan) = handle
        hidden, dtype = w_hh.shape[1], y.dtype
        width = MODES[mode][1] * hidden
        dpx = xp.empty((batch, steps, width), dtype=dtype)
        dph = xp.empty((batch, steps, width), dtype=dtype) if mode == "gru" else dpx
        dh0 = xp.empty_like(h0)
        dc0 = xp.empty_like(c0) if mode == "lstm" else dh0
        dy_ = y if dy is None else xp.ascontiguousarray(dy, dtype=dtype)
        dh_ = h0 if dh_last is None else xp.ascontiguousarray(dh_last, dtype=dtype)
        launch = self.build(kernel_code(mode, dtype, hidden, plan), "rnn_seq_bwd")
        if launch is None:  # the forward's module compiled, so this one did too
            raise RuntimeError("the whole-sequence recurrent backward kernel failed to compile")
        launch(plan.blocks, plan.threads,
               (saved, cells, c0, h0, y, xp.ascontiguousarray(w_hh), dy_, dh_, dpx, dph, dh0,
                dc0, np.int32(batch), np.int32(steps), np.int32(dy is not None),
                np.int32(dh_last is not None)), plan.backward_shared)
        dpx2 = dpx.reshape(batch * steps, width)
        dph2 = dph.reshape(batch * steps, width)
        h_prev = xp.concatenate([h0[:, None, :], y[:, :-1, :]], axis=1)
        d_w_hh = xp.matmul(dph2.T, h_prev.reshape(batch * steps, hidden))
        d_w_ih = xp.matmul(dpx2.T, x2)
        ones = xp.ones((batch * steps,), dtype=dtype) if any(biases) else None
        d_bx = None if ones is None else xp.matmul(ones, dpx2)
        d_bh = None
        if biases[1]:
            # GRU: its own gradient; elsewhere the same sum as b_ih's, as an array of its own
            d_bh = (xp.matmul(ones, dph2) if mode == "gru"
                    else d_bx.copy() if biases[0] else d_bx)
        d_params = [d_w_ih, d_w_hh, d_bx if biases[0] else None, d_bh]
        dx = None
        if need_input_grad:
            dx = xp.matmul(dpx2, w_ih).reshape(batch, steps, features)
        return dx, ([dh0, dc0] if mode == "lstm" else [dh0]), d_params
