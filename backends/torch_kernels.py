"""PyTorch fast kernels: bias + activation and activation gradients as native ATen operations.

The reference activations (``loomx.layers.activations``) are written with array-API calls: a
ReLU backward is a comparison, a cast and a product, three PyTorch dispatches (plus
array-api-compat's scalar promotion in ``maximum``). Here each activation and each derivative
is one ATen operation (``relu``, ``threshold_backward``, ``gelu_backward``, ...), which is one
kernel launch on CUDA and one loop on the CPU. Same contracts as the CuPy kernels
(``docs/kernels.md``):

- ``bias_act:<activation>``: ``(x [..., N], bias [N] | None) -> (z, y)``, ``z = x + bias``,
  ``y = act(z)``; inputs are not modified;
- ``act_backward:<activation>``: ``(z, y, dy) -> dz``;
- ``bias_act_inplace:<ReLU family>``: ``(x, bias | None) -> (x, x)``, overwriting ``x`` (the
  layer's own fresh product);
- ``softmax``, ``log_softmax`` and their ``*_backward`` over the last axis (``torch.softmax``,
  ``aten._softmax_backward_data``, ...);
- ``layer_norm_forward`` / ``layer_norm_backward`` (``aten.native_layer_norm`` and its
  backward); RMSNorm keeps the reference path, because ATen's fused RMSNorm has no CPU
  backward and its CPU forward is itself a composition of operations;
- ``adam_update``: PyTorch's fused Adam / AdamW step on one parameter, in place;
- ``linear``: ``F.linear`` (one ``addmm`` with the bias), for ``Dense``;
- ``sgd_update``: plain SGD in place (``sub_`` with ``alpha``), and ``sgd_update_many`` for
  every parameter in one ``torch._foreach_add_``; ``adam_update_many``: the fused Adam over
  every parameter in one call;
- ``lstm_cell_forward`` / ``lstm_cell_backward``: one LSTM step's gate arithmetic in 8 and
  about 16 ATen operations (``addcmul`` for the ``x·(1 - x)`` factors, ``out=`` into the
  gradient buffer) instead of 14 and 26 array calls: fewer launches per step on CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention

_aten = torch.ops.aten

#: ``name -> (forward(z), backward(z, y, dy))`` for every fused activation.
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "identity": (lambda z: z, lambda z, y, dy: dy),
    "relu": (torch.relu, lambda z, y, dy: _aten.threshold_backward(dy, z, 0)),
    "scaled_relu": (lambda z: torch.relu(z * 1.1),
                    lambda z, y, dy: _aten.threshold_backward(dy, z, 0) * 1.1),
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.01),
                   lambda z, y, dy: _aten.leaky_relu_backward(dy, z, 0.01, False)),
    "loom_leaky_relu": (lambda z: F.leaky_relu(z, 0.1),
                        lambda z, y, dy: _aten.leaky_relu_backward(dy, z, 0.1, False)),
    "sigmoid": (torch.sigmoid, lambda z, y, dy: _aten.sigmoid_backward(dy, y)),
    "tanh": (torch.tanh, lambda z, y, dy: _aten.tanh_backward(dy, y)),
    "gelu": (F.gelu, lambda z, y, dy: _aten.gelu_backward(dy, z)),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"),
                  lambda z, y, dy: _aten.gelu_backward(dy, z, approximate="tanh")),
    "silu": (F.silu, lambda z, y, dy: _aten.silu_backward(dy, z)),
}


def make_bias_act(name: str) -> Callable:
    """``bias_act:<name>``: ``(x, bias | None) -> (z, y)``."""
    forward = _ACTIVATIONS[name][0]

    def bias_act(x, bias=None):
        z = x if bias is None else x + bias
        return z, forward(z)

    bias_act.__name__ = f"bias_act_{name}"
    return bias_act


#: ReLU family in place: ``x ← act(x + bias)``; their derivatives need only the sign of ``z``.
_IN_PLACE: dict[str, Callable] = {
    "relu": torch.relu_,
    "scaled_relu": lambda x: torch.relu_(x.mul_(1.1)),
    "leaky_relu": lambda x: F.leaky_relu_(x, 0.01),
    "loom_leaky_relu": lambda x: F.leaky_relu_(x, 0.1),
}


def make_bias_act_inplace(name: str) -> Callable:
    """``bias_act_inplace:<name>``: ``(x, bias | None) -> (x, x)``, overwriting ``x``."""
    apply = _IN_PLACE[name]

    def bias_act_inplace(x, bias=None):
        if bias is not None:
            x.add_(bias)
        apply(x)
        return x, x

    bias_act_inplace.__name__ = f"bias_act_inplace_{name}"
    return bias_act_inplace


def activation_kernels() -> dict[str, Callable]:
    """Every ``bias_act:*``, ``bias_act_inplace:*`` and ``act_backward:*`` kernel, by name."""
    kernels: dict[str, Callable] = {}
    for name in _ACTIVATIONS:
        kernels[f"bias_act:{name}"] = make_bias_act(name)
        kernels[f"act_backward:{name}"] = _ACTIVATIONS[name][1]
    for name in _IN_PLACE:
        kernels[f"bias_act_inplace:{name}"] = make_bias_act_inplace(name)
    return kernels


# ---------------------------------------------------------------------- softmax
def _softmax(x):
    return torch.softmax(x, -1)


def _log_softmax(x):
    return torch.log_softmax(x, -1)


def _softmax_backward(y, g):
    """``y ⊙ (g - Σ g·y)`` at the softmax output ``y``."""
    return _aten._softmax_backward_data(g, y, -1, y.dtype)


def _log_softmax_backward(y, g):
    """``g - exp(y)·Σ g`` at the log-softmax output ``y``."""
    return _aten._log_softmax_backward_data(g, y, -1, y.dtype)


# ---------------------------------------------------------------------- normalisation
#: dtypes whose LayerNorm statistics ATen keeps in the same dtype on every device (on CUDA it
#: keeps float16/bfloat16 statistics in float32, so those take the composed path below).
_LN_NATIVE = (torch.float32, torch.float64)


def _layer_norm_forward(x, weight, bias, eps):
    """``(y, xhat, rstd [..., 1])`` of a LayerNorm over the last axis, all in ``x``'s dtype."""
    y, mean, rstd = _aten.native_layer_norm(x, [x.shape[-1]], weight, bias, float(eps))
    mean, rstd = mean.to(x.dtype), rstd.to(x.dtype)
    return y, (x - mean) * rstd, rstd


def _layer_norm_backward(dy, xhat, rstd, weight):
    """``(dx, dweight | None, dbias)`` from the saved ``xhat`` and ``rstd``.

    ATen's backward wants the input, its mean and its ``rstd``; given ``xhat`` itself with mean
    0 and ``rstd`` 1 it returns ``g - mean(g) - xhat·mean(g·xhat)`` (``g = dy·weight``), the
    input gradient divided by ``rstd``, and the exact parameter gradients. Half-precision input
    uses the same formula composed of PyTorch operations.
    """
    d = xhat.shape[-1]
    dbias = dy.reshape(-1, d).sum(0)
    if xhat.dtype not in _LN_NATIVE or dy.dtype != xhat.dtype or (
            weight is not None and weight.dtype != xhat.dtype):
        g = dy if weight is None else dy * weight
        dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        dweight = None if weight is None else (dy * xhat).reshape(-1, d).sum(0)
        return dx, dweight, dbias
    dxhat, dweight, _ = _aten.native_layer_norm_backward(
        dy, xhat, [d], torch.zeros_like(rstd), torch.ones_like(rstd), weight,
        None, [True, weight is not None, False])  # ATen's bias gradient needs a bias tensor
    return dxhat * rstd, dweight, dbias


# ---------------------------------------------------------------------- Adam
def _adam_update(w, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam (``decoupled=False``) or AdamW step of ``w`` with PyTorch's fused kernel,
    updating ``w``, ``m`` and ``v`` in place; ``step`` is 1-based.

    The fused kernel pairs elements by their position in memory, so it runs on the tensors
    themselves only when all four are contiguous. Otherwise (a convolution's weight
    gradient computed transposed, buffers restored contiguous next to a strided weight) it runs
    on contiguous copies, which are then copied back.
    """
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    steps = torch.full((), float(step), dtype=torch.float32, device=w.device)
    same = all(t.is_contiguous() for t in (w, g, m, v))
    ws, ms, vs = (w, m, v) if same else (w.contiguous(), m.contiguous(), v.contiguous())
    fused([ws], [g if same else g.contiguous()], [ms], [vs], [], [steps], lr=float(lr),
          beta1=float(beta1), beta2=float(beta2), weight_decay=float(weight_decay),
          eps=float(eps), amsgrad=False, maximize=False)
    for dst, src in ((w, ws), (m, ms), (v, vs)):
        if dst is not src:
            dst.copy_(src)
    return w


def _adam_update_many(ws, gs, ms, vs, *, lr, beta1, beta2, eps, weight_decay, step,
                      decoupled):
    """``adam_update_many``: :func:`_adam_update` over every parameter, the contiguous ones of
    each dtype and device in one call of the fused kernel (which takes lists)."""
    groups: dict[tuple, list[tuple]] = {}
    for quad in zip(ws, gs, ms, vs, strict=True):
        w = quad[0]
        # the same strides too: before PyTorch 2.5 the fused kernel compared the strides of
        # unit axes as well
        if all(t.is_contiguous() and t.dtype == w.dtype and t.stride() == w.stride()
               for t in quad):
            groups.setdefault((w.dtype, w.device), []).append(quad)
        else:
            _adam_update(*quad, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, step=step, decoupled=decoupled)
    fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
    for (_, device), quads in groups.items():
        steps = torch.full((), float(step), dtype=torch.float32, device=device)
        lists = [list(t) for t in zip(*quads)]
        fused(*lists, [], [steps] * len(quads), lr=float(lr), beta1=float(beta1),
              beta2=float(beta2), weight_decay=float(weight_decay), eps=float(eps),
              amsgrad=False, maximize=False)


def _sgd_update(w, g, *, lr, weight_decay=0.0):
    """``sgd_update``: ``w ← w − lr·(g + weight_decay·w)`` **in place**, the decayed gradient
    formed first as on the reference path; without decay one ATen operation
    (``sub_(g, alpha=lr)``) instead of a product, a difference and a new tensor."""
    if weight_decay:
        g = g + weight_decay * w
    return w.sub_(g, alpha=float(lr))


def _linear(x, weight, bias=None):
    """``linear``: ``x [..., in] @ weight [out, in]ᵀ + bias`` as PyTorch's own ``F.linear``
    (one ``addmm`` with the bias for 2-d inputs), or ``None`` for mixed dtypes."""
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        return None
    return F.linear(x, weight, bias)


def _sgd_update_many(ws, gs, *, lr, weight_decay=0.0):
    """``sgd_update_many``: :func:`_sgd_update` over every pair in one ``foreach`` call
    (on CUDA, PyTorch's multi-tensor kernels: a few launches for the whole network)."""
    if not ws:
        return
    if weight_decay:
        gs = torch._foreach_add(gs, ws, alpha=float(weight_decay))
    torch._foreach_add_(ws, gs, alpha=-float(lr))


@functools.lru_cache(maxsize=16)
def _fused_adam_runs(device: str) -> bool:
    """Whether this PyTorch build has the fused Adam and AdamW kernels on ``device`` (CPU
    support arrived in PyTorch 2.4): one step on one element each, once per device."""
    try:
        for decoupled in (False, True):
            t = [torch.zeros(1, device=device) for _ in range(4)]
            _adam_update(*t, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                         step=1, decoupled=decoupled)
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------- LSTM cell
def _lstm_cell_forward(xw_t, hw, c_prev):
    """``lstm_cell_forward`` in 8 ATen operations instead of 14 array calls: the sigmoid
    gates as ``(tanh(½z) + 1)·½`` over one ``[B, 3H]`` block, ``c`` through ``addcmul``."""
    hs = c_prev.shape[-1]
    u = torch.add(xw_t, hw).tanh_()
    s = u[:, :3 * hs].add(1.0).mul_(0.5)
    i, f, o = s[:, :hs], s[:, hs:2 * hs], s[:, 2 * hs:]
    g = u[:, 3 * hs:]
    c = torch.addcmul(f * c_prev, i, g)
    tc = torch.tanh(c)
    return i, f, g, o, c, tc, o * tc


def _lstm_cell_backward(i, f, g, o, c_prev, tc, dh, dc_next, dpx, t):
    """``lstm_cell_backward`` in about 16 ATen operations instead of 26 array calls: each
    ``x·(1 - x)`` as one ``addcmul``, each gate gradient written by its last product into
    ``dpx[t]`` (``out=``, which casts to ``dpx``'s dtype as the reference's assignment)."""
    hs = i.shape[-1]
    a = torch.mul(dh, o)
    dc = torch.addcmul(a, a, tc.square(), value=-1)  # dh·o·(1 - tanh²c)
    if dc_next is not None:
        dc = dc + dc_next
    d = dpx[t]
    torch.mul(dc * g, torch.addcmul(i, i, i, value=-1), out=d[:, :hs])
    torch.mul(dc * c_prev, torch.addcmul(f, f, f, value=-1), out=d[:, hs:2 * hs])
    x = dc * i
    torch.addcmul(x, x, g.square(), value=-1, out=d[:, 2 * hs:3 * hs])
    torch.mul(dh * tc, torch.addcmul(o, o, o, value=-1), out=d[:, 3 * hs:])
    return dc * f


def reduction_kernels(device=None) -> dict[str, Callable]:
    """The softmax, normalisation and Adam kernels, by name (Adam only where this PyTorch
    build runs its fused kernel on ``device``)."""
    kernels = {"softmax": _softmax, "log_softmax": _log_softmax,
               "softmax_backward": _softmax_backward,
               "log_softmax_backward": _log_softmax_backward,
               "layer_norm_forward": _layer_norm_forward,
               "layer_norm_backward": _layer_norm_backward,
               "lstm_cell_forward": _lstm_cell_forward,
               "lstm_cell_backward": _lstm_cell_backward, "sgd_update": _sgd_update,
               "sgd_update_many": _sgd_update_many, "linear": _linear}
    if _fused_adam_runs(str(device) if device is not None else "cpu"):
        kernels["adam_update"] = _adam_update
        kernels["adam_update_many"] = _adam_update_many
    return kernels
