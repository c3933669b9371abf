"""Full float32 in the cuDNN calls of the PyTorch backend.

PyTorch lets cuDNN run float32 convolutions and recurrent layers in TF32 by default
(``torch.backends.cudnn.allow_tf32``): a 10-bit mantissa, relative errors around 1e-3. loomx's
float32 means float32 on every backend (its CuPy and numpy paths never use TF32), so the
backend's convolution and RNN kernels switch TF32 off for the length of their cuDNN calls
and restore the setting after. ``LOOMX_TORCH_TF32=1`` leaves PyTorch's setting alone.
"""

from __future__ import annotations

import contextlib
import os

import torch

_cudnn = torch.backends.cudnn


def _allowed() -> bool:
    return os.environ.get("LOOMX_TORCH_TF32", "0").strip().lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def full_float32(a: torch.Tensor):
    """Within the block, cuDNN computes float32 in float32 when ``a`` is a CUDA float32
    tensor (a no-op otherwise, and when ``LOOMX_TORCH_TF32=1``)."""
    if a.dtype != torch.float32 or not a.is_cuda or not _cudnn.allow_tf32 or _allowed():
        yield
        return
    _cudnn.allow_tf32 = False
    try:
        yield
    finally:
        _cudnn.allow_tf32 = True
