"""Whole LSTM sequences on CUDA in one kernel launch each way (the CuPy backend's
``recurrent_sequence_forward`` / ``recurrent_sequence_backward``).

loomx's LSTM runs one step at a time: per step a hidden-state product and a cell kernel each
way, 32 steps of benchmark c being about 130 launches, each costing the host 10–20 µs, while
PyTorch makes one cuDNN call for the whole sequence. Here every thread block owns ``R`` rows of
the batch and runs all ``T`` steps for them: the rows of an LSTM are independent, so no block
ever waits for another. Per step a block multiplies its rows' hidden state by ``W_hhᵀ`` (read
from the device's caches; each thread owns gate columns and keeps ``R`` accumulators), applies
the gates, and keeps ``h`` and ``c`` in shared memory. The input projection of all steps before
it, and the weight gradients, the bias gradient and the input gradient after the backward
kernel, are one matrix product each over all ``B·T`` rows, batch-major (no transposed copies).

- ``forward(mode, x [B, T, I], [h0, c0], [w_ih [4H, I], w_hh [4H, H], b_ih | None,
  b_hh | None], train) -> (y [B, T, H], [h_T, c_T], handle) | None``, the contract of
  :mod:`loomx.backends.torch_rnn`. It declines (``None``) for modes other than ``"lstm"``,
  dtypes other than float32/float64 or mixed ones, empty batches or sequences, hidden sizes
  above ``MAX_HIDDEN`` (256), and when the kernels fail to compile (with a warning, once); the
  layer then runs its per-step path. Every block reads all of ``W_hh`` each step, ``16·H²``
  bytes in float32, which the device's L2 cache serves while ``W_hh`` is small; for larger
  ``H`` the per-step path's cuBLAS products use the device better than this kernel would, and
  its launch overhead matters less against them (a bound from that estimate, not a
  measurement).
- ``backward(handle, dy [B, T, H] | None, dh_T [B, H] | None, need_input_grad) ->
  (dx | None, [dh0, dc0], [dw_ih, dw_hh, db_ih | None, db_hh | None])``.

The arithmetic is PyTorch's formulation in the parameters' gate order (i, f, g, o) with
``σ(z) = 1 / (1 + e^(-z))``; results agree with the per-step path up to rounding (another
summation order in the hidden-state products).

The module is written against the array library passed in (``cupy``, or numpy for the CPU
emulation of the kernels in the tests) and a ``build(code, name)`` function that compiles the
kernel source and returns ``launch(grid, block, args, shared_mem)``, or ``None`` when it
cannot compile it.
"""

from __future__ import annotations

import contextlib
import functools
import math
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

#: The two kernels; ``T``, ``H``, ``R`` (rows per block), ``NT`` (threads per block), ``GRP``
#: (thread groups of the backward product) and ``SHARED_MEMORY`` come from the prelude.
KERNELS = r"""
#define G (4 * H)

__device__ __forceinline__ T loomx_sigmoid(T z) { return (T)1 / ((T)1 + EXP_(-z)); }

// xw [B, S, G]: x·W_ihᵀ; bias [G] (has_bias); wt [H, G]: W_hhᵀ; h0, c0, hT, cT [B, H];
// y [B, S, H]; with save: gates [B, S, G] (i, f, g, o after their activations), cs [B, S, H].
extern "C" __global__ void __launch_bounds__(NT) lstm_seq_fwd(
    const T* __restrict__ xw, const T* __restrict__ bias, const T* __restrict__ wt,
    const T* __restrict__ h0, const T* __restrict__ c0, T* __restrict__ y,
    T* __restrict__ hT, T* __restrict__ cT, T* __restrict__ gates, T* __restrict__ cs,
    int batch, int steps, int has_bias, int save)
{
    SHARED_MEMORY(T);
    T* const hs = smem;            // [R][H] hidden state of the block's rows
    T* const cst = hs + R * H;     // [R][H] cell state
    T* const pre = cst + R * H;    // [R][G] the step's pre-activations
    const int row0 = blockIdx.x * R;
    const int rows = min(R, batch - row0);
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        const long long at = (long long)(row0 + r) * H + idx % H;
        hs[idx] = r < rows ? h0[at] : (T)0;
        cst[idx] = r < rows ? c0[at] : (T)0;
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
            // the input side after the product: its loads wait off the critical path
            const T b = has_bias ? bias[j] : (T)0;
#pragma unroll
            for (int r = 0; r < R; ++r)
                pre[r * G + j] = acc[r] + (r < rows
                    ? xw[((long long)(row0 + r) * steps + t) * G + j] + b : (T)0);
        }
        __syncthreads();
        for (int idx = threadIdx.x; idx < R * H; idx += NT) {
            const int r = idx / H, u = idx % H;
            if (r < rows) {
                const T* p = pre + r * G;
                const T i = loomx_sigmoid(p[u]), f = loomx_sigmoid(p[H + u]);
                const T g = TANH_(p[2 * H + u]), o = loomx_sigmoid(p[3 * H + u]);
                const T c = f * cst[idx] + i * g;
                const T h = o * TANH_(c);
                cst[idx] = c;
                hs[idx] = h;
                const long long bt = (long long)(row0 + r) * steps + t;
                y[bt * H + u] = h;
                if (save) {
                    T* q = gates + bt * G;
                    q[u] = i; q[H + u] = f; q[2 * H + u] = g; q[3 * H + u] = o;
                    cs[bt * H + u] = c;
                }
            }
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        if (r < rows) {
            const long long at = (long long)(row0 + r) * H + idx % H;
            hT[at] = hs[idx];
            cT[at] = cst[idx];
        }
    }
}

// gates, cs, c0 as saved by the forward; w [G, H]: W_hh; dy [B, S, H] (has_dy); dhT [B, H]
// (has_dh); writes dpre [B, S, G] (pre-activation gradients) and dh0, dc0 [B, H].
extern "C" __global__ void __launch_bounds__(NT) lstm_seq_bwd(
    const T* __restrict__ gates, const T* __restrict__ cs, const T* __restrict__ c0,
    const T* __restrict__ w, const T* __restrict__ dy, const T* __restrict__ dhT,
    T* __restrict__ dpre, T* __restrict__ dh0, T* __restrict__ dc0,
    int batch, int steps, int has_dy, int has_dh)
{
    SHARED_MEMORY(T);
    T* const dh = smem;            // [R][H] gradient of the hidden state after the step
    T* const dc = dh + R * H;      // [R][H] gradient of the cell state after the step
    T* const dg = dc + R * H;      // [R][G] the step's pre-activation gradients
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
                const T* s = gates + bt * G;
                const T i = s[u], f = s[H + u], g = s[2 * H + u], o = s[3 * H + u];
                const T c = cs[bt * H + u];
                const T c_prev = t > 0 ? cs[(bt - 1) * H + u] : c0[(long long)(row0 + r) * H + u];
                const T tc = TANH_(c);
                const T dcv = d * o * ((T)1 - tc * tc) + dc[idx];
                q[u] = dcv * g * i * ((T)1 - i);
                q[H + u] = dcv * c_prev * f * ((T)1 - f);
                q[2 * H + u] = dcv * i * ((T)1 - g * g);
                q[3 * H + u] = d * tc * o * ((T)1 - o);
                T* out = dpre + bt * G;
                out[u] = q[u]; out[H + u] = q[H + u];
                out[2 * H + u] = q[2 * H + u]; out[3 * H + u] = q[3 * H + u];
                dc[idx] = dcv * f;
            } else {
                q[u] = (T)0; q[H + u] = (T)0; q[2 * H + u] = (T)0; q[3 * H + u] = (T)0;
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
            T sum = (T)0;
            for (int grp = 0; grp < GRP; ++grp) sum += part[grp * R * H + idx];
            dh[idx] = sum;
        }
        __syncthreads();
    }
    for (int idx = threadIdx.x; idx < R * H; idx += NT) {
        const int r = idx / H;
        if (r < rows) {
            const long long at = (long long)(row0 + r) * H + idx % H;
            dh0[at] = dh[idx];
            dc0[at] = dc[idx];
        }
    }
}
"""

#: How device code reaches the block's dynamic shared memory on CUDA (the CPU emulation in
#: the tests defines ``SHARED_MEMORY`` its own way).
CUDA_PRELUDE = """
#define SHARED_MEMORY(T) extern __shared__ __align__(16) unsigned char loomx_shared[]; \\
    T* const smem = reinterpret_cast<T*>(loomx_shared)
"""


@dataclass(frozen=True)
class Plan:
    """The launch geometry of one (dtype, H, B): rows per block, threads per block, thread
    groups of the backward product, blocks, and each kernel's shared memory in bytes."""

    rows: int
    threads: int
    groups: int
    blocks: int
    forward_shared: int
    backward_shared: int


def plan_for(hidden: int, batch: int, itemsize: int, multiprocessors: int,
             rows: int | None = None, threads: int | None = None) -> Plan | None:
    """Rows per block so that the blocks about fill the device once (at most ``MAX_ROWS``),
    threads to cover the ``4H`` gate columns (a multiple of 32, at most ``MAX_THREADS``),
    fewer rows while the backward's shared memory exceeds ``SHARED_LIMIT``; ``None`` when one
    row does not fit, or ``hidden`` exceeds ``MAX_HIDDEN``. ``rows``/``threads`` force a choice
    (the tests' small emulated blocks)."""
    if hidden > MAX_HIDDEN or hidden < 1:
        return None
    if threads is None:
        threads = min(MAX_THREADS, 32 * math.ceil(4 * hidden / 32))
    groups = max(1, threads // hidden)
    if rows is None:
        rows = min(MAX_ROWS, max(1, math.ceil(batch / max(1, multiprocessors))))
        rows = 1 << (rows - 1).bit_length()  # a power of two: few compiled variants
        rows = min(rows, MAX_ROWS)

    def shared(r: int) -> tuple[int, int]:
        return (itemsize * r * 6 * hidden,
                itemsize * r * (6 * hidden + groups * hidden))

    while rows > 1 and shared(rows)[1] > SHARED_LIMIT:
        rows //= 2
    fwd, bwd = shared(rows)
    if bwd > SHARED_LIMIT:
        return None
    return Plan(rows, threads, groups, math.ceil(batch / rows), fwd, bwd)


@functools.lru_cache(maxsize=64)
def kernel_code(dtype: Any, hidden: int, plan: Plan) -> str:
    """The kernels' source for one dtype, hidden size and plan (without a prelude; cached, so
    that the compiled-module cache keyed by it hashes each source once)."""
    ctype, exp, tanh = _CTYPES[np.dtype(dtype)]
    return (f"typedef {ctype} T;\n#define EXP_ {exp}\n#define TANH_ {tanh}\n"
            f"#define H {hidden}\n#define R {plan.rows}\n#define NT {plan.threads}\n"
            f"#define GRP {plan.groups}\n{KERNELS}")


Launch = Callable[[int, int, tuple, int], None]


class LSTMSequence:
    """The two whole-sequence kernels over one array library.

    Args:
        xp: the array library (``cupy``; numpy in the emulation tests).
        build: ``build(code, name) -> launch(grid, block, args, shared_mem)``.
        multiprocessors: ``() -> int``, the current device's multiprocessor count.
        device: ``device(array)`` -> a context manager making the array's device current.
        rows, threads: force the plan (tests).
    """

    def __init__(self, xp: Any, build: Callable[[str, str], Launch | None],
                 multiprocessors: Callable[[], int],
                 device: Callable[[Any], Any] = lambda a: contextlib.nullcontext(),
                 rows: int | None = None, threads: int | None = None):
        self.xp, self.build, self.multiprocessors = xp, build, multiprocessors
        self.device = device
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
            warnings.warn("the whole-sequence LSTM kernels failed to compile; LSTM layers run "
                          "step by step on this device", RuntimeWarning, stacklevel=4)
        return launch

    def _plan(self, dtype: Any, hidden: int, batch: int) -> Plan | None:
        return plan_for(hidden, batch, np.dtype(dtype).itemsize, self.multiprocessors(),
                        self.rows, self.threads)

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
        if mode != "lstm" or len(states) != 2:
            return None
        given = [x, *states, *(p for p in params if p is not None)]
        dtype = x.dtype
        if np.dtype(dtype) not in _CTYPES or any(a.dtype != dtype for a in given):
            return None
        batch, steps, features = x.shape
        w_ih, w_hh, b_ih, b_hh = params
        hidden = w_hh.shape[1]
        plan = self._plan(dtype, hidden, batch)
        if batch == 0 or steps == 0 or plan is None:
            return None
        launch = self._launcher(kernel_code(dtype, hidden, plan), "lstm_seq_fwd")
        if launch is None:
            return None
        x2 = xp.ascontiguousarray(x).reshape(batch * steps, features)
        xw = xp.matmul(x2, w_ih.T)  # [B·T, 4H], batch-major
        bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)
        h0, c0 = (xp.ascontiguousarray(s) for s in states)
        y = xp.empty((batch, steps, hidden), dtype=dtype)
        h_t, c_t = xp.empty_like(h0), xp.empty_like(c0)
        gates = xp.empty((batch, steps, 4 * hidden), dtype=dtype) if train else y
        cells = xp.empty((batch, steps, hidden), dtype=dtype) if train else y
        launch(plan.blocks, plan.threads,
               (xw, y if bias is None else xp.ascontiguousarray(bias), xp.ascontiguousarray(w_hh.T),
                h0, c0, y, h_t, c_t, gates, cells, np.int32(batch), np.int32(steps),
                np.int32(bias is not None), np.int32(bool(train))), plan.forward_shared)
        handle = None
        if train:
            handle = (x2, (batch, steps, features), h0, c0, y, gates, cells, w_ih, w_hh,
                      (b_ih is not None, b_hh is not None), plan)
        return y, [h_t, c_t], handle

    def _backward(self, handle, dy, dh_last, need_input_grad: bool):
        xp = self.xp
        x2, (batch, steps, features), h0, c0, y, gates, cells, w_ih, w_hh, biases, plan = handle
        hidden = w_hh.shape[1]
        dtype = y.dtype
        dpre = xp.empty((batch, steps, 4 * hidden), dtype=dtype)
        dh0, dc0 = xp.empty_like(h0), xp.empty_like(c0)
        dy_ = y if dy is None else xp.ascontiguousarray(dy, dtype=dtype)
        dh_ = h0 if dh_last is None else xp.ascontiguousarray(dh_last, dtype=dtype)
        launch = self.build(kernel_code(dtype, hidden, plan), "lstm_seq_bwd")
        if launch is None:  # the forward's module compiled, so this one did too
            raise RuntimeError("the whole-sequence LSTM backward kernel failed to compile")
        launch(plan.blocks, plan.threads,
               (gates, cells, c0, xp.ascontiguousarray(w_hh), dy_, dh_, dpre, dh0, dc0,
                np.int32(batch), np.int32(steps), np.int32(dy is not None),
                np.int32(dh_last is not None)), plan.backward_shared)
        d2 = dpre.reshape(batch * steps, 4 * hidden)
        h_prev = xp.concatenate([h0[:, None, :], y[:, :-1, :]], axis=1)
        d_w_hh = xp.matmul(d2.T, h_prev.reshape(batch * steps, hidden))
        d_w_ih = xp.matmul(d2.T, x2)
        d_bias = None
        if any(biases):
            d_bias = xp.matmul(xp.ones((batch * steps,), dtype=dtype), d2)
        d_biases = [d_bias if biases[0] else None,
                    None if not biases[1] else d_bias.copy() if biases[0] else d_bias]
        d_params = [d_w_ih, d_w_hh, *d_biases]
        dx = None
        if need_input_grad:
            dx = xp.matmul(d2, w_ih).reshape(batch, steps, features)
        return dx, [dh0, dc0], d_params
