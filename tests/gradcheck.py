"""Gradient-checking helpers shared by the layer tests.

- :func:`run_layer`: forward + backward of a built layer on host inputs; returns host arrays.
- :func:`finite_difference_check`: float64 central differences of ``sum(y * w)`` with respect
  to the input and every parameter, compared with the layer's analytic backward.
- :func:`torch_params`: a layer's parameters as float64 torch leaf tensors (for the oracle).
"""

from __future__ import annotations

import numpy as np
from loomx.backends import get_backend


def run_layer(layer, x_host: np.ndarray, dy_host: np.ndarray | None = None, train: bool = False,
              backend=None):
    """Forward and backward of ``layer`` on ``x_host``; returns (y, dx, grads) on the host."""
    b = backend or layer.backend
    x = b.from_host(x_host) if x_host.dtype.kind == "f" else b.from_host(
        x_host, dtype=getattr(b.xp, str(x_host.dtype)))
    layer.zero_grad()
    y, ctx = layer.forward(x, train)
    if dy_host is None:
        dy_host = np.ones(tuple(y.shape))
    dx = layer.backward(b.from_host(dy_host), ctx)
    grads = {k: b.to_host(v) for k, v in layer.grads.items()}
    return b.to_host(y), (None if dx is None else b.to_host(dx)), grads


def finite_difference_check(layer, x_host: np.ndarray, seed: int = 0, eps: float = 1e-6,
                            rtol: float = 1e-5, atol: float = 1e-7, check_input: bool = True,
                            max_entries: int = 40, train: bool = False) -> None:
    """Compare analytic gradients of a float64 layer with central differences.

    The scalar objective is ``sum(y * w)`` for a fixed random ``w``. At most ``max_entries``
    randomly chosen entries of the input and of each parameter are perturbed.
    """
    b = layer.backend
    assert b.dtype_name(b.float_dtype) == "float64", "finite differences need float64"
    rng = np.random.default_rng(seed)
    x_host = np.asarray(x_host, dtype=np.float64) if x_host.dtype.kind == "f" else x_host

    def objective(xh) -> float:
        y, _ = layer.forward(b.from_host(xh) if xh.dtype.kind == "f" else
                             b.from_host(xh, dtype=getattr(b.xp, str(xh.dtype))), train)
        return float(np.sum(b.to_host(y) * w))

    y0, _ = layer.forward(b.from_host(x_host) if x_host.dtype.kind == "f" else
                          b.from_host(x_host, dtype=getattr(b.xp, str(x_host.dtype))), train)
    w = rng.standard_normal(tuple(y0.shape))
    _, dx, grads = run_layer(layer, x_host, w, train=train)

    def pick(shape):
        n = int(np.prod(shape))
        return rng.choice(n, size=min(n, max_entries), replace=False)

    if check_input and x_host.dtype.kind == "f":
        num = np.zeros(x_host.size)
        idx = pick(x_host.shape)
        for i in idx:
            xp_, xm_ = x_host.copy().ravel(), x_host.copy().ravel()
            xp_[i] += eps
            xm_[i] -= eps
            num[i] = (objective(xp_.reshape(x_host.shape)) -
                      objective(xm_.reshape(x_host.shape))) / (2 * eps)
        np.testing.assert_allclose(dx.ravel()[idx], num[idx], rtol=rtol, atol=atol,
                                   err_msg="input gradient vs finite differences")
    for ref in list(layer.parameters()):
        host = b.to_host(ref.value).astype(np.float64)
        if host.dtype.kind != "f":
            continue
        idx = pick(host.shape)
        num = np.zeros(host.size)
        for i in idx:
            for sign in (1, -1):
                h = host.copy().ravel()
                h[i] += sign * eps
                ref.value = b.from_host(h.reshape(host.shape))
                num[i] += sign * objective(x_host)
            num[i] /= 2 * eps
        ref.value = b.from_host(host)
        key = ref.name
        got = grads.get(key)
        if got is None:  # nested parameter: read from its own layer
            got = b.to_host(ref.grad)
        np.testing.assert_allclose(got.ravel()[idx], num[idx], rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {ref.name} vs finite differences")


def torch_params(layer) -> dict:
    """``{name: float64 torch leaf tensor}`` copies of every parameter of ``layer``."""
    import torch

    b = layer.backend
    return {p.name: torch.tensor(b.to_host(p.value).astype(np.float64), requires_grad=True)
            for p in layer.parameters()}


def numpy64():
    """The numpy backend in float64."""
    return get_backend("numpy", "float64")
