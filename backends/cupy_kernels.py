"""Fused CuPy kernels for the hot elementwise and row-wise chains (contracts: docs/kernels.md).

Every kernel here is compiled on first use (``functools.cache`` around the CuPy kernel object;
CuPy caches the compiled binary on disk as well) and registered by name in the CuPy backend's
``kernels`` dict. Layers ask for them with ``backend.kernel(name)`` and fall back to their
array-API reference path when a backend has no such kernel; every kernel is tested against
that reference (tests/test_kernels.py).

- ``bias_act:<activation>``: ``(x [..., N], bias [N] | None) -> (z, y)``, ``z = x + bias``,
  ``y = act(z)``, one pass;
- ``act_backward:<activation>``: ``(z, y, dy) -> dz``, one pass;
- ``softmax`` / ``log_softmax`` and ``softmax_backward`` / ``log_softmax_backward``: over the
  last axis, one thread block per row;
- ``layer_norm_forward`` / ``layer_norm_backward`` and ``rms_norm_forward`` /
  ``rms_norm_backward``: one block per row for the row statistics, the parameter gradients
  as products with a vector of ones;
- ``sum_rows``: ``a [R, N] -> [N]`` as ``ones [R] @ a`` (on a GPU many times faster than
  ``cupy.sum(a, axis=0)`` for tall matrices);
- ``adam_update``: one elementwise kernel updating param, first and second moment in place;
- ``sgd_update``: ``w ← w − lr·(g + weight_decay·w)`` in place, one pass;
- ``bias_act_inplace:<ReLU family>``: bias + activation written over the layer's own product;
- ``silu_gate_forward`` / ``silu_gate_backward``: SwiGLU's gate in one pass each;
- ``softmax_cross_entropy``: the loss rows and the gradient of softmax cross-entropy in one
  row kernel;
- ``rope``: the rotary position embedding of queries or keys (both styles) in one pass;
- ``lstm_cell_forward`` / ``lstm_cell_backward``: one LSTM step's gate arithmetic in one pass
  each (the hidden-state product stays a matrix product);

The convolutions' ``window_matmul`` kernels live in ``cupy_windows.py``, the whole-sequence
recurrent kernels in ``cuda_recurrent.py`` and the multi-tensor optimizer updates in
``cuda_foreach.py``.

float32 and float64 run natively. For other float dtypes (float16) the activation, row, Adam
and LSTM kernels compute in float32 and cast back; SGD and the SwiGLU gate run the reference's
arithmetic; ``softmax_cross_entropy`` and ``rope`` decline (``None``) and the caller runs the
reference.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_ROW_THREADS = 256


def _c(value: float) -> str:
    """A literal of the kernel's element type ``T``."""
    return f"((T){value!r})"


_SIG = f"({_c(0.5)} * tanh({_c(0.5)} * t) + {_c(0.5)})"

#: activation name -> (forward body setting ``y`` from ``t``, backward body setting ``dz``
#: from ``z``, ``y``, ``dy``). Formulas match loomx/layers/activations.py.
ACTIVATION_BODIES: dict[str, tuple[str, str]] = {
    "identity": ("y = t;", "dz = dy;"),
    "relu": (f"y = t > {_c(0.0)} ? t : {_c(0.0)};",
             f"dz = z > {_c(0.0)} ? dy : {_c(0.0)};"),
    "scaled_relu": (f"y = t > {_c(0.0)} ? t * {_c(1.1)} : {_c(0.0)};",
                    f"dz = z > {_c(0.0)} ? dy * {_c(1.1)} : {_c(0.0)};"),
    "leaky_relu": (f"y = t >= {_c(0.0)} ? t : t * {_c(0.01)};",
                   f"dz = z > {_c(0.0)} ? dy : dy * {_c(0.01)};"),
    "loom_leaky_relu": (f"y = t >= {_c(0.0)} ? t : t * {_c(0.1)};",
                        f"dz = z > {_c(0.0)} ? dy : dy * {_c(0.1)};"),
    "sigmoid": (f"y = {_SIG};", f"dz = dy * y * ({_c(1.0)} - y);"),
    "tanh": ("y = tanh(t);", f"dz = dy * ({_c(1.0)} - y * y);"),
    "gelu": (f"y = {_c(0.5)} * t * ({_c(1.0)} + erf(t * {_c(_INV_SQRT2)}));",
             f"dz = dy * ({_c(0.5)} * ({_c(1.0)} + erf(z * {_c(_INV_SQRT2)})) "
             f"+ z * exp({_c(-0.5)} * z * z) * {_c(_INV_SQRT_2PI)});"),
    "gelu_tanh": (f"y = {_c(0.5)} * t * ({_c(1.0)} + tanh({_c(_SQRT_2_OVER_PI)} * "
                  f"(t + {_c(0.044715)} * t * t * t)));",
                  f"T u = tanh({_c(_SQRT_2_OVER_PI)} * (z + {_c(0.044715)} * z * z * z)); "
                  f"T du = {_c(_SQRT_2_OVER_PI)} * ({_c(1.0)} + {_c(3 * 0.044715)} * z * z); "
                  f"dz = dy * ({_c(0.5)} * ({_c(1.0)} + u) "
                  f"+ {_c(0.5)} * z * ({_c(1.0)} - u * u) * du);"),
    "silu": (f"y = t * {_SIG};",
             f"T t = z; T s = {_SIG}; dz = dy * (s + z * s * ({_c(1.0)} - s));"),
}


def _cupy():
    import cupy

    return cupy


def _native(a) -> bool:
    return a.dtype in (np.float32, np.float64)


def _up(*arrays):
    """Cast non-native float arrays (float16) to float32; ``None`` passes through."""
    return tuple(None if a is None or _native(a) else a.astype(np.float32) for a in arrays)


# ---------------------------------------------------------------------- bias + activation
@functools.cache
def _bias_act_kernel(name: str, with_bias: bool):
    cp = _cupy()
    fwd, _ = ACTIVATION_BODIES[name]
    if with_bias:
        return cp.ElementwiseKernel("T x, T b", "T z, T y", f"T t = x + b; z = t; {fwd}",
                                    f"loomx_bias_{name}")
    return cp.ElementwiseKernel("T t", "T y", fwd, f"loomx_act_{name}")


@functools.cache
def _act_backward_kernel(name: str):
    _, bwd = ACTIVATION_BODIES[name]
    return _cupy().ElementwiseKernel("T z, T y, T dy", "T dz", bwd, f"loomx_act_bwd_{name}")


def make_bias_act(name: str):
    """``bias_act:<name>``: ``(x [..., N], bias [N] | None) -> (z, y)`` in one pass."""

    def bias_act(x, bias=None):
        dtype = x.dtype
        if not _native(x):
            z, y = bias_act(*_up(x, bias))
            return z.astype(dtype), y.astype(dtype)
        if bias is None:
            return x, _bias_act_kernel(name, False)(x)
        if bias.dtype != dtype:  # the kernel takes one T: add with the reference's promotion
            z = x + bias
            return z, _bias_act_kernel(name, False)(z)
        return _bias_act_kernel(name, True)(x, bias)

    bias_act.__name__ = f"bias_act_{name}"
    return bias_act


def make_act_backward(name: str):
    """``act_backward:<name>``: ``(z, y, dy) -> dz`` in one pass."""

    def act_backward(z, y, dy):
        if not _native(dy):
            return act_backward(*_up(z, y, dy)).astype(dy.dtype)
        return _act_backward_kernel(name)(z, y, dy)

    act_backward.__name__ = f"act_backward_{name}"
    return act_backward


#: activations whose derivative depends only on the sign of ``z``, which ``y`` keeps: their
#: ``bias_act_inplace`` may overwrite the pre-activation with the output
INPLACE_ACTIVATIONS = ("relu", "scaled_relu", "leaky_relu", "loom_leaky_relu")


@functools.cache
def _bias_act_inplace_kernel(name: str):
    fwd, _ = ACTIVATION_BODIES[name]
    return _cupy().ElementwiseKernel("T b", "T x", f"T t = x + b; T y; {fwd} x = y;",
                                     f"loomx_bias_{name}_inplace")


def make_bias_act_inplace(name: str):
    """``bias_act_inplace:<name>``: ``(x [..., N], bias [N] | None) -> (x, x)``, ``x`` overwritten
    with ``act(x + bias)`` in one pass (only for a layer's own fresh product)."""

    def bias_act_inplace(x, bias=None):
        if bias is not None and bias.dtype != x.dtype:  # promotes, as the reference: not in place
            _, y = make_bias_act(name)(x + bias, None)
            return y, y
        if not _native(x):
            _, y = make_bias_act(name)(x, bias)
            x[...] = y
        elif bias is None:
            _bias_act_kernel(name, False)(x, x)
        else:
            _bias_act_inplace_kernel(name)(bias, x)
        return x, x

    bias_act_inplace.__name__ = f"bias_act_inplace_{name}"
    return bias_act_inplace


# ---------------------------------------------------------------------- row kernels
_ROW_SOURCE = r"""
template <typename T>
__device__ T block_sum(T v, T* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = ((int)threadIdx.x < nw) ? red[threadIdx.x] : (T)0;
    if (wid == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    const T r = red[0];
    __syncthreads();
    return r;
}

template <typename T>
__device__ T block_max(T v, T* red) {
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = ((int)threadIdx.x < nw) ? red[threadIdx.x] : red[0];
    if (wid == 0) {
        for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_down_sync(0xffffffffu, v, o));
        if (lane == 0) red[0] = v;
    }
    __syncthreads();
    const T r = red[0];
    __syncthreads();
    return r;
}

#define ROW_LOOP(i) for (long long i = threadIdx.x; i < n; i += blockDim.x)

// the row's maximum m and sum of exp(x - m) (softmax and cross-entropy)
template <typename T>
__device__ void max_sum_exp(const T* xr, long long n, T* red, T& m, T& s) {
    m = xr[0];
    ROW_LOOP(i) m = max(m, xr[i]);
    m = block_max(m, red);
    s = (T)0;
    ROW_LOOP(i) s += exp(xr[i] - m);
    s = block_sum(s, red);
}

template <typename T>
__global__ void softmax_fwd(const T* x, T* y, long long n, int log_out) {
    __shared__ T red[32];
    const T* xr = x + (long long)blockIdx.x * n;
    T* yr = y + (long long)blockIdx.x * n;
    T m, s;
    max_sum_exp(xr, n, red, m, s);
    if (log_out) {
        const T shift = m + log(s);
        ROW_LOOP(i) yr[i] = xr[i] - shift;
    } else {
        const T inv = (T)1 / s;
        ROW_LOOP(i) yr[i] = exp(xr[i] - m) * inv;
    }
}

template <typename T>
__global__ void softmax_bwd(const T* y, const T* g, T* dx, long long n, int log_out) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* yr = y + off; const T* gr = g + off; T* dr = dx + off;
    T s = (T)0;
    if (log_out) { ROW_LOOP(i) s += gr[i]; } else { ROW_LOOP(i) s += gr[i] * yr[i]; }
    s = block_sum(s, red);
    if (log_out) { ROW_LOOP(i) dr[i] = gr[i] - exp(yr[i]) * s; }
    else { ROW_LOOP(i) dr[i] = yr[i] * (gr[i] - s); }
}

template <typename T>
__global__ void layer_norm_fwd(const T* x, const T* w, const T* b, T* y, T* xhat, T* rstd,
                               long long n, T eps, int has_w, int has_b) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* xr = x + off; T* yr = y + off; T* hr = xhat + off;
    T s = (T)0;
    ROW_LOOP(i) s += xr[i];
    const T mean = block_sum(s, red) / (T)n;
    T q = (T)0;
    ROW_LOOP(i) { const T c = xr[i] - mean; q += c * c; }
    const T r = (T)1 / sqrt(block_sum(q, red) / (T)n + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    ROW_LOOP(i) {
        const T h = (xr[i] - mean) * r;
        hr[i] = h;
        T v = has_w ? h * w[i] : h;
        yr[i] = has_b ? v + b[i] : v;
    }
}

template <typename T>
__global__ void layer_norm_bwd(const T* dy, const T* xhat, const T* rstd, const T* w, T* dx,
                               long long n, int has_w) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* gr = dy + off; const T* hr = xhat + off; T* dr = dx + off;
    T sg = (T)0, sgx = (T)0;
    ROW_LOOP(i) { const T g = has_w ? gr[i] * w[i] : gr[i]; sg += g; sgx += g * hr[i]; }
    const T mg = block_sum(sg, red) / (T)n;
    const T mgx = block_sum(sgx, red) / (T)n;
    const T r = rstd[blockIdx.x];
    ROW_LOOP(i) {
        const T g = has_w ? gr[i] * w[i] : gr[i];
        dr[i] = r * (g - mg - hr[i] * mgx);
    }
}

template <typename T>
__global__ void rms_norm_fwd(const T* x, const T* w, T* y, T* rinv, long long n, T eps,
                             int unit_offset) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* xr = x + off; T* yr = y + off;
    T q = (T)0;
    ROW_LOOP(i) q += xr[i] * xr[i];
    const T r = (T)1 / sqrt(block_sum(q, red) / (T)n + eps);
    if (threadIdx.x == 0) rinv[blockIdx.x] = r;
    ROW_LOOP(i) yr[i] = xr[i] * r * (unit_offset ? (T)1 + w[i] : w[i]);
}

template <typename T>
__global__ void rms_norm_bwd(const T* dy, const T* x, const T* rinv, const T* w, T* dx,
                             long long n, int unit_offset) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* gr = dy + off; const T* xr = x + off; T* dr = dx + off;
    T sgx = (T)0;
    ROW_LOOP(i) sgx += gr[i] * (unit_offset ? (T)1 + w[i] : w[i]) * xr[i];
    const T mgx = block_sum(sgx, red) / (T)n;
    const T r = rinv[blockIdx.x];
    const T r3 = r * r * r;
    ROW_LOOP(i) dr[i] = r * gr[i] * (unit_offset ? (T)1 + w[i] : w[i]) - xr[i] * r3 * mgx;
}

template <typename T>
__global__ void softmax_xent(const T* x, const T* t, T* grad, T* loss, long long n, T batch) {
    __shared__ T red[32];
    const long long off = (long long)blockIdx.x * n;
    const T* xr = x + off; const T* tr = t + off; T* gr = grad + off;
    T m, s;
    max_sum_exp(xr, n, red, m, s);
    const T ls = log(s);
    T ts = (T)0, tl = (T)0;
    ROW_LOOP(i) { ts += tr[i]; tl += tr[i] * ((xr[i] - m) - ls); }
    ts = block_sum(ts, red);
    tl = block_sum(tl, red);
    ROW_LOOP(i) gr[i] = (exp(xr[i] - m) / s * ts - tr[i]) / batch;
    if (threadIdx.x == 0) loss[blockIdx.x] = -tl;
}
"""

_ROW_KERNELS = ("softmax_fwd", "softmax_bwd", "layer_norm_fwd", "layer_norm_bwd",
                "rms_norm_fwd", "rms_norm_bwd", "softmax_xent")
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


@functools.cache
def _row_module():
    names = [f"{k}<{t}>" for k in _ROW_KERNELS for t in _CTYPES.values()]
    return _cupy().RawModule(code=_ROW_SOURCE, options=("-std=c++14",), name_expressions=names)


def _row_kernel(name: str, dtype):
    return _row_module().get_function(f"{name}<{_CTYPES[np.dtype(dtype)]}>")


def _rows(x):
    """``x [..., N]`` as a C-contiguous ``[R, N]`` array (a view when already contiguous)."""
    cp = _cupy()
    x = cp.ascontiguousarray(x)
    n = x.shape[-1]
    return x.reshape(-1, n), n


def _launch(name: str, rows: int, args, dtype) -> None:
    if rows:
        _row_kernel(name, dtype)((rows,), (_ROW_THREADS,), args)


def _softmax_forward(x, log_out: bool):
    cp = _cupy()
    if not _native(x):
        return _softmax_forward(*_up(x), log_out).astype(x.dtype)
    x2, n = _rows(x)
    y = cp.empty_like(x2)
    _launch("softmax_fwd", x2.shape[0], (x2, y, np.int64(n), np.int32(log_out)), x2.dtype)
    return y.reshape(x.shape)


def _softmax_backward(y, g, log_out: bool):
    cp = _cupy()
    if not _native(g):
        return _softmax_backward(*_up(y, g), log_out).astype(g.dtype)
    y2, n = _rows(y)
    g2, _ = _rows(g)
    dx = cp.empty_like(g2)
    _launch("softmax_bwd", y2.shape[0], (y2, g2, dx, np.int64(n), np.int32(log_out)),
            g2.dtype)
    return dx.reshape(g.shape)


def softmax(x):
    """``softmax``: ``x [..., N] -> y [..., N]`` over the last axis."""
    return _softmax_forward(x, False)


def log_softmax(x):
    """``log_softmax``: ``x [..., N] -> x - max - log Σ exp(x - max)`` over the last axis."""
    return _softmax_forward(x, True)


def softmax_backward(y, g):
    """``softmax_backward``: ``(y, g) -> y ⊙ (g - Σ g·y)``."""
    return _softmax_backward(y, g, False)


def log_softmax_backward(y, g):
    """``log_softmax_backward``: ``(y = log_softmax(x), g) -> g - exp(y) · Σ g``."""
    return _softmax_backward(y, g, True)


def softmax_cross_entropy(logits, target):
    """``softmax_cross_entropy``: ``(logits [B, C], target [B, C])`` (dense targets of the
    logits' dtype) → ``(value, grad [B, C])`` with ``value = −Σ t·log_softmax(logits) / B``
    (a 0-d array) and ``grad = (softmax(logits)·Σ_c t − t) / B``; one row kernel for the
    gradient and the per-row losses, then their sum."""
    cp = _cupy()
    if (not _native(logits) or target.dtype != logits.dtype or logits.ndim != 2
            or 0 in logits.shape):
        return None
    x2 = cp.ascontiguousarray(logits)
    t2 = cp.ascontiguousarray(target)
    rows, n = x2.shape
    grad = cp.empty_like(x2)
    loss = cp.empty((rows,), dtype=x2.dtype)
    _launch("softmax_xent", rows, (x2, t2, grad, loss, np.int64(n), x2.dtype.type(rows)),
            x2.dtype)
    return cp.sum(loss) / rows, grad


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: str, device: int):
    """A cached vector of ``n`` ones on ``device`` (never written; filled before it is
    returned, so that work on any stream may read it)."""
    cp = _cupy()
    with cp.cuda.Device(device):
        ones = cp.ones(n, dtype=dtype)
        cp.cuda.get_current_stream().synchronize()
    return ones


def sum_rows(a):
    """``sum_rows``: ``a [R, N] -> [N]``, the sum over rows, as ``ones [R] @ a`` (cuBLAS).

    ``cupy.sum(a, axis=0)`` reduces each column in one thread block, which leaves most of the
    GPU idle on tall, narrow matrices (a convolution's bias gradient over ``B·P`` rows);
    the product spreads the rows over the whole device. Other dtypes use ``cupy.sum``, and so
    does float32 under ``CUPY_TF32=1`` (TF32 would round the summands to 10-bit mantissas).
    The ones are made once per length, dtype and device.
    """
    cp = _cupy()
    if a.ndim != 2 or not _native(a) or (a.dtype == np.float32 and _tf32()):
        return cp.sum(a, axis=0)
    return _ones(a.shape[0], a.dtype.str, a.device.id) @ a


def _tf32() -> bool:
    import os

    return os.environ.get("CUPY_TF32", "0") != "0"


def _column_sum(*arrays):
    """``Σ_rows prod(arrays)`` for ``[R, N]`` (or ``[R, 1]``) arrays → ``[N]``."""
    prod = arrays[0]
    for a in arrays[1:]:
        prod = prod * a
    return sum_rows(prod)


def layer_norm_forward(x, weight, bias, eps: float):
    """``layer_norm_forward``: ``(x [..., D], weight [D] | None, bias [D] | None, eps)``
    → ``(y [..., D], xhat [..., D], rstd [..., 1])``."""
    cp = _cupy()
    if not _native(x):
        y, xhat, rstd = layer_norm_forward(*_up(x, weight, bias), eps)
        return y.astype(x.dtype), xhat.astype(x.dtype), rstd.astype(x.dtype)
    x2, n = _rows(x)
    rows = x2.shape[0]
    y, xhat = cp.empty_like(x2), cp.empty_like(x2)
    rstd = cp.empty((rows, 1), dtype=x2.dtype)
    # the kernel reads every pointer as T: parameters of another dtype are cast first
    w = x2 if weight is None else cp.ascontiguousarray(weight, dtype=x2.dtype)
    b = x2 if bias is None else cp.ascontiguousarray(bias, dtype=x2.dtype)
    _launch("layer_norm_fwd", rows,
            (x2, w, b, y, xhat, rstd, np.int64(n), x2.dtype.type(eps),
             np.int32(weight is not None), np.int32(bias is not None)), x2.dtype)
    lead = tuple(x.shape[:-1])
    return y.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(lead + (1,))


def layer_norm_backward(dy, xhat, rstd, weight):
    """``layer_norm_backward``: ``(dy, xhat, rstd, weight | None)``
    → ``(dx [..., D], dweight [D] | None, dbias [D])``."""
    cp = _cupy()
    if not _native(dy):
        dx, dw, db = layer_norm_backward(*_up(dy, xhat, rstd, weight))
        return (dx.astype(dy.dtype), None if dw is None else dw.astype(dy.dtype),
                db.astype(dy.dtype))
    g2, n = _rows(dy)
    h2, _ = _rows(xhat)
    r2 = cp.ascontiguousarray(rstd).reshape(-1, 1)
    dx = cp.empty_like(g2)
    w = g2 if weight is None else cp.ascontiguousarray(weight, dtype=g2.dtype)  # read as T
    _launch("layer_norm_bwd", g2.shape[0],
            (g2, h2, r2, w, dx, np.int64(n), np.int32(weight is not None)), g2.dtype)
    dweight = None if weight is None else _column_sum(g2, h2)
    return dx.reshape(dy.shape), dweight, _column_sum(g2)


def rms_norm_forward(x, weight, eps: float, unit_offset: bool = False):
    """``rms_norm_forward``: ``(x [..., D], weight [D], eps, unit_offset)``
    → ``(y [..., D], rinv [..., 1])``; the scale is ``weight`` or ``1 + weight``."""
    cp = _cupy()
    if not _native(x):
        y, rinv = rms_norm_forward(*_up(x, weight), eps, unit_offset)
        return y.astype(x.dtype), rinv.astype(x.dtype)
    x2, n = _rows(x)
    rows = x2.shape[0]
    y = cp.empty_like(x2)
    rinv = cp.empty((rows, 1), dtype=x2.dtype)
    _launch("rms_norm_fwd", rows,
            (x2, cp.ascontiguousarray(weight, dtype=x2.dtype), y, rinv, np.int64(n),
             x2.dtype.type(eps),
             np.int32(bool(unit_offset))), x2.dtype)
    return y.reshape(x.shape), rinv.reshape(tuple(x.shape[:-1]) + (1,))


def rms_norm_backward(dy, x, rinv, weight, unit_offset: bool = False):
    """``rms_norm_backward``: ``(dy, x, rinv, weight, unit_offset)``
    → ``(dx [..., D], dweight [D])``."""
    cp = _cupy()
    if not _native(dy):
        dx, dw = rms_norm_backward(*_up(dy, x, rinv, weight), unit_offset)
        return dx.astype(dy.dtype), dw.astype(dy.dtype)
    g2, n = _rows(dy)
    x2, _ = _rows(x)
    r2 = cp.ascontiguousarray(rinv).reshape(-1, 1)
    dx = cp.empty_like(g2)
    _launch("rms_norm_bwd", g2.shape[0],
            (g2, x2, r2, cp.ascontiguousarray(weight, dtype=g2.dtype), dx, np.int64(n),
             np.int32(bool(unit_offset))), g2.dtype)
    return dx.reshape(dy.shape), _column_sum(g2, x2, r2)


# ---------------------------------------------------------------------- LSTM cell
_LSTM_FORWARD = f"""
const ptrdiff_t b = i / H, j = i % H, k = b * 4 * H + j;
const T ui = tanh(xw[k] + hw[k]), uf = tanh(xw[k + H] + hw[k + H]);
const T uo = tanh(xw[k + 2 * H] + hw[k + 2 * H]);
gi = {_c(0.5)} * ui + {_c(0.5)};
gf = {_c(0.5)} * uf + {_c(0.5)};
go = {_c(0.5)} * uo + {_c(0.5)};
gg = tanh(xw[k + 3 * H] + hw[k + 3 * H]);
c = gf * c_prev + gi * gg;
tc = tanh(c);
h = go * tc;
"""

_LSTM_BACKWARD = f"""
const ptrdiff_t b = i / H, j = i % H, k = off + b * 4 * H + j;
const T dc = dh * go * ({_c(1.0)} - tc * tc) + dcn;
dpx[k] = dc * gg * gi * ({_c(1.0)} - gi);
dpx[k + H] = dc * c_prev * gf * ({_c(1.0)} - gf);
dpx[k + 2 * H] = dc * gi * ({_c(1.0)} - gg * gg);
dpx[k + 3 * H] = dh * tc * go * ({_c(1.0)} - go);
dc_prev = dc * gf;
"""


@functools.cache
def _lstm_kernels():
    cp = _cupy()
    forward = cp.ElementwiseKernel("raw T xw, raw T hw, T c_prev, int64 H",
                                   "T gi, T gf, T gg, T go, T c, T tc, T h", _LSTM_FORWARD,
                                   "loomx_lstm_cell_forward")
    backward = cp.ElementwiseKernel(
        "T gi, T gf, T gg, T go, T c_prev, T tc, T dh, T dcn, int64 H, int64 off",
        "T dc_prev, raw T dpx", _LSTM_BACKWARD, "loomx_lstm_cell_backward")
    return forward, backward


def _common_dtype(*arrays):
    """``(result dtype, dtype to compute in)``: the promoted float dtype of ``arrays`` (as the
    reference path promotes), computed natively, or in float32 for float16."""
    dtype = np.dtype(_cupy().result_type(*arrays))
    return dtype, (dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32))


def lstm_cell_forward(xw_t, hw, c_prev):
    """``lstm_cell_forward``: ``(xw_t [B, 4H], hw [B, 4H], c_prev [B, H])`` →
    ``(i, f, g, o, c, tanh(c), h)``, each ``[B, H]``, in one pass; pre-activation blocks in
    the order (i, f, o, g) with i, f, o halved (loomx/layers/recurrent.py). Mixed dtypes
    promote as the reference does."""
    cp = _cupy()
    dt = c_prev.dtype
    shape = (xw_t.shape[0], xw_t.shape[1] // 4)
    if (xw_t.dtype == hw.dtype == dt and _native(c_prev) and tuple(c_prev.shape) == shape
            and xw_t.flags.c_contiguous and hw.flags.c_contiguous):
        return _lstm_kernels()[0](xw_t, hw, c_prev, np.int64(shape[1]))
    # the general case: computed in the promoted dtype, then given the reference's dtypes
    # (the gates that of xw_t + hw, the states that of all three)
    gates, _ = _common_dtype(xw_t, hw)
    states, work = _common_dtype(xw_t, hw, c_prev)
    outs = lstm_cell_forward(cp.ascontiguousarray(xw_t, dtype=work),
                             cp.ascontiguousarray(hw, dtype=work),
                             cp.broadcast_to(c_prev.astype(work, copy=False), shape))
    return tuple(a.astype(gates if k < 4 else states, copy=False) for k, a in enumerate(outs))


def lstm_cell_backward(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t: int):
    """``lstm_cell_backward``: the step's saved gates and states, ``dh [B, H]`` and
    ``dc_next [B, H] | None`` → ``dc_prev [B, H]``; writes the pre-activation gradient in gate
    order (i, f, g, o) into ``dpx[t]`` of the time-major ``[T, B, 4H]`` buffer ``dpx`` (in
    place when ``dpx`` is C-contiguous and of the computing dtype, else through a copy).
    Mixed dtypes promote as the reference does."""
    cp = _cupy()
    saved = (i, f, g, o, c_prev, tc, dh)
    dt = dpx.dtype
    if (_native(dpx) and dpx.flags.c_contiguous and all(a.dtype == dt for a in saved)
            and (dc_next is None or dc_next.dtype == dt)):
        dtype = work = dt  # the common case: one launch straight into dpx[t]
        target, row = dpx, t
    else:
        dtype, work = _common_dtype(*saved, *(() if dc_next is None else (dc_next,)))
        saved = tuple(a.astype(work, copy=False) for a in saved)
        dc_next = None if dc_next is None else dc_next.astype(work, copy=False)
        direct = dt == work and dpx.flags.c_contiguous
        target = dpx if direct else cp.empty((1,) + tuple(dpx.shape[1:]), dtype=work)
        row = t if direct else 0
    dcn = work.type(0) if dc_next is None else dc_next
    rows, width = target.shape[1], target.shape[2]
    dc_prev = cp.empty(tuple(i.shape), dtype=work)
    _lstm_kernels()[1](*saved, dcn, np.int64(width // 4), np.int64(row * rows * width),
                       dc_prev, target)
    if target is not dpx:
        dpx[t, ...] = target[0].astype(dt)
    return dc_prev if work == dtype else dc_prev.astype(dtype)


# ---------------------------------------------------------------------- SGD, SwiGLU gate
@functools.cache
def _sgd_kernels():
    cp = _cupy()
    return (cp.ElementwiseKernel("T g, T lr", "T w", "w = w - lr * g;", "loomx_sgd_update"),
            cp.ElementwiseKernel("T g, T lr, T wd", "T w", "w = w - lr * (g + wd * w);",
                                 "loomx_sgd_update_decay"))


def sgd_update(w, g, *, lr: float, weight_decay: float):
    """``sgd_update``: ``w ← w − lr·(g + weight_decay·w)`` **in place** (the reference's order
    of operations); returns ``w``. Non-native dtypes (float16) run the reference's
    arithmetic and write the result back into ``w``."""
    if not _native(w) or g.dtype != w.dtype:
        step = g + weight_decay * w if weight_decay else g
        w[...] = w - lr * step
        return w
    t = w.dtype.type
    plain, decay = _sgd_kernels()
    if weight_decay:
        decay(g, t(lr), t(weight_decay), w)
    else:
        plain(g, t(lr), w)
    return w


@functools.cache
def _silu_gate_kernels():
    cp = _cupy()
    forward = cp.ElementwiseKernel(
        "T g, T u", "T s, T h",
        f"s = {_c(0.5)} * tanh({_c(0.5)} * g) + {_c(0.5)}; h = g * s * u;",
        "loomx_silu_gate_forward")
    backward = cp.ElementwiseKernel(
        "T g, T u, T s, T dh", "T dg, T du",
        f"dg = dh * u * (s + g * s * ({_c(1.0)} - s)); du = dh * g * s;",
        "loomx_silu_gate_backward")
    return forward, backward


def _same_native(*arrays) -> bool:
    dt = arrays[0].dtype
    return _native(arrays[0]) and all(a.dtype == dt for a in arrays[1:])


def silu_gate_forward(g, u):
    """``silu_gate_forward``: ``(g, u [..., M]) -> (σ(g), g·σ(g)·u)`` in one pass (σ as
    ``½·tanh(½g) + ½``, as the reference). Mixed or half dtypes run the reference's
    arithmetic."""
    if not _same_native(g, u):
        cp = _cupy()
        s = 0.5 * cp.tanh(0.5 * g) + 0.5
        return s, g * s * u
    return _silu_gate_kernels()[0](g, u)


def silu_gate_backward(g, u, s, dh):
    """``silu_gate_backward``: ``(g, u, σ(g), dh) -> (dh·u·(σ + g·σ·(1 − σ)), dh·g·σ)`` in one
    pass."""
    if not _same_native(g, u, s, dh):
        return dh * u * (s + g * s * (1.0 - s)), dh * g * s
    return _silu_gate_kernels()[1](g, u, s, dh)


# ---------------------------------------------------------------------- rotary embedding
_ROPE = """
const ptrdiff_t j = i % hd;
if (j >= rot) {
    out = x[i];
} else {
    const ptrdiff_t base = i - j, half = rot / 2, t = (i / hd) % steps;
    const ptrdiff_t p = interleaved ? j / 2 : (j < half ? j : j - half);
    const T a = interleaved ? x[base + 2 * p] : x[base + p];
    const T b = interleaved ? x[base + 2 * p + 1] : x[base + p + half];
    const T cv = cos_t[t * half + p], sv = sin_t[t * half + p];
    const bool first = interleaved ? (j % 2 == 0) : (j < half);
    out = first ? a * cv - b * sv : b * cv + a * sv;
}
"""


@functools.cache
def _rope_kernel():
    return _cupy().ElementwiseKernel(
        "raw T x, raw T cos_t, raw T sin_t, int64 steps, int64 hd, int64 rot, "
        "int32 interleaved", "T out", _ROPE, "loomx_rope")


def rope(x, cos, sin, rot: int, style: str):
    """``rope``: ``(x [..., T, hd], cos [T, rot/2], sin [T, rot/2], rot, style)`` → the first
    ``rot`` dims of ``x`` rotated (``"half"``: the halves ``(a, b)`` of those dims,
    ``"interleaved"``: pairs ``(x[2p], x[2p+1])``) into ``(a·cos − b·sin, b·cos + a·sin)``,
    the rest copied; one pass. ``None`` (declined) for mixed or half dtypes or tables of
    another shape."""
    cp = _cupy()
    half = rot // 2
    if (not _same_native(x, cos, sin) or x.ndim < 2 or rot % 2 or not 0 < rot <= x.shape[-1]
            or tuple(cos.shape) != (x.shape[-2], half) or tuple(sin.shape) != tuple(cos.shape)):
        return None
    xc = cp.ascontiguousarray(x)
    out = cp.empty_like(xc)
    _rope_kernel()(xc, cp.ascontiguousarray(cos), cp.ascontiguousarray(sin),
                   np.int64(x.shape[-2]), np.int64(x.shape[-1]), np.int64(rot),
                   np.int32(style != "half"), out)
    return out


# ---------------------------------------------------------------------- Adam / AdamW
@functools.cache
def _adam_kernel():
    body = """
    T gg = g + wd * w;
    w = w * decay;
    m = b1 * m + ((T)1 - b1) * gg;
    v = b2 * v + ((T)1 - b2) * (gg * gg);
    w = w - step_size * (m / (sqrt(v) / bc2_sqrt + eps));
    """
    return _cupy().ElementwiseKernel(
        "T g, T step_size, T b1, T b2, T eps, T wd, T bc2_sqrt, T decay", "T w, T m, T v",
        body, "loomx_adam_update")


def adam_update(w, g, m, v, *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int, decoupled: bool):
    """``adam_update``: one Adam/AdamW step on ``w``, ``m``, ``v`` **in place**; returns ``w``.

    ``m`` and ``v`` start as zeros; ``step`` is the 1-based step count (bias corrections).
    ``decoupled=True`` is AdamW (``w ← w(1 - lr·wd)`` first), else L2 decay (``g + wd·w``).
    """
    if not _native(w):
        w32, m32, v32 = (a.astype(np.float32) for a in (w, m, v))
        adam_update(w32, g.astype(np.float32), m32, v32, lr=lr, beta1=beta1, beta2=beta2,
                    eps=eps, weight_decay=weight_decay, step=step, decoupled=decoupled)
        for dst, src in ((w, w32), (m, m32), (v, v32)):
            dst[...] = src.astype(dst.dtype)
        return w
    t = w.dtype.type
    l2 = 0.0 if decoupled else weight_decay
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    _adam_kernel()(g, t(lr / (1.0 - beta1 ** step)), t(beta1), t(beta2), t(eps), t(l2),
                   t(math.sqrt(1.0 - beta2 ** step)), t(decay), w, m, v)
    return w


def cupy_kernels() -> dict:
    """Every kernel of this module by its registered name (nothing is compiled yet)."""
    kernels = {}
    for name in ACTIVATION_BODIES:
        kernels[f"bias_act:{name}"] = make_bias_act(name)
        kernels[f"act_backward:{name}"] = make_act_backward(name)
    for name in INPLACE_ACTIVATIONS:
        kernels[f"bias_act_inplace:{name}"] = make_bias_act_inplace(name)
    kernels.update({
        "softmax": softmax, "log_softmax": log_softmax, "softmax_backward": softmax_backward,
        "log_softmax_backward": log_softmax_backward,
        "layer_norm_forward": layer_norm_forward, "layer_norm_backward": layer_norm_backward,
        "rms_norm_forward": rms_norm_forward, "rms_norm_backward": rms_norm_backward,
        "adam_update": adam_update, "sgd_update": sgd_update,
        "silu_gate_forward": silu_gate_forward, "silu_gate_backward": silu_gate_backward,
        "softmax_cross_entropy": softmax_cross_entropy, "rope": rope,
        "sum_rows": sum_rows,
        "lstm_cell_forward": lstm_cell_forward, "lstm_cell_backward": lstm_cell_backward,
    })
    return kernels
