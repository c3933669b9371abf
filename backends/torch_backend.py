"""The PyTorch backend through array-api-compat (devices: cpu, cuda[:i], mps)."""

from __future__ import annotations

import numpy as np

from .base import Backend, window_scatter_add_with


def _torch_window_gather(x, window: tuple[int, ...], stride: tuple[int, ...]):
    """Strided windows over the trailing ``len(window)`` axes as a view (``Tensor.unfold``).

    Shapes: ``x [*lead, *spatial]`` → ``[*lead, *out_spatial, *window]``: each ``unfold``
    turns one spatial axis into its window count and appends the window axis; no data moves.
    """
    first = x.ndim - len(window)
    for axis, (w, s) in enumerate(zip(window, stride)):
        x = x.unfold(first + axis, w, s)
    return x


class TorchBackend(Backend):
    """PyTorch tensors. loomx computes its own gradients; autograd runs only inside the
    ``recurrent_sequence`` kernels (``torch_rnn.py``), on copies that nothing outside them sees."""

    def _from_host(self, arr: np.ndarray, dtype):
        import torch

        np_dtype = self.numpy_dtype(dtype)
        if self.dtype_name(dtype) == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(arr.astype(np.float32)))
            return t.to(device=self.device, dtype=dtype)
        t = torch.from_numpy(np.ascontiguousarray(arr.astype(np_dtype, copy=False)))
        return t.to(device=self.device)

    def _to_host(self, x):
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.float().cpu().numpy().astype(ml_dtypes.bfloat16)
        return t.cpu().numpy()

    def erf(self, x):
        import torch

        return torch.special.erf(x)

    def scatter_add(self, target, indices, values):
        return target.index_add(0, indices, values)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def memory_info(self) -> dict:
        import torch

        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return {"used": total - free, "total": total}
        return {"used": None, "total": None}


def with_index(dev, current_cuda):
    """``dev`` with its index: a bare ``cuda`` is the current CUDA device (``current_cuda()``),
    a bare ``mps`` is ``mps:0``. Tensors report indexed devices, so ``backend.device`` compares
    equal to theirs."""
    import torch

    if dev.index is not None or dev.type not in ("cuda", "mps"):
        return dev
    return torch.device(dev.type, current_cuda() if dev.type == "cuda" else 0)


def make_torch_backend(name: str = "torch", device: str | None = None) -> TorchBackend:
    """Build the torch backend on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    A bare ``"cuda"`` is the CUDA device current when the backend is built (backends are
    cached per spec, so later ``torch.cuda.set_device`` calls do not move it); name the index
    to choose another.
    """
    from loomx.errors import BackendUnavailableError

    try:
        import array_api_compat.torch as xp
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            "the torch backend needs PyTorch: pip install 'loomx[torch]'") from exc
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"torch device {dev} requested but torch.cuda.is_available() is False "
            "(a CPU-only torch build, no NVIDIA driver, or no GPU).")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise BackendUnavailableError(
            f"torch device {dev} requested but only {torch.cuda.device_count()} CUDA devices "
            "exist.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendUnavailableError("torch device mps requested but MPS is not available.")
    from .torch_kernels import activation_kernels, reduction_kernels
    from .torch_rnn import recurrent_sequence_backward, recurrent_sequence_forward
    from .torch_windows import (
        avg_pool_backward,
        avg_pool_forward,
        max_pool_backward,
        max_pool_forward,
        window_matmul,
        window_matmul_backward,
    )

    dev = with_index(dev, torch.cuda.current_device)
    return TorchBackend(name=name, xp=xp, device=dev, library="torch",
                        kernels={"window_gather": _torch_window_gather,
                                 "window_scatter_add": window_scatter_add_with(
                                     lambda view, part: view.add_(part)),
                                 "window_matmul": window_matmul,
                                 "window_matmul_backward": window_matmul_backward,
                                 "max_pool_forward": max_pool_forward,
                                 "max_pool_backward": max_pool_backward,
                                 "avg_pool_forward": avg_pool_forward,
                                 "avg_pool_backward": avg_pool_backward,
                                 "recurrent_sequence_forward": recurrent_sequence_forward,
                                 "recurrent_sequence_backward": recurrent_sequence_backward,
                                 **activation_kernels(), **reduction_kernels(dev)})
