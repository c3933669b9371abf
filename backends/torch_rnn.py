"""A whole LSTM sequence on PyTorch tensors, through ATen's fused LSTM.

loomx's LSTM runs one step at a time: a hidden-state product and a cell kernel per step each
way, 64 steps and about 30 ATen operations per step for a 32-step sequence. PyTorch's own
``nn.LSTM`` makes one call for the whole sequence (oneDNN's RNN primitive on the CPU, cuDNN on
CUDA). These kernels run that call; its derivative is PyTorch's own, taken with autograd
inside the kernel (the layer's parameters and inputs are plain tensors; the graph lives only
in the handle the forward returns, and nothing outside the kernel requires gradients):

- ``lstm_sequence_forward(x [B, T, I], h0 [B, H], c0 [B, H], weight_ih [4H, I],
  weight_hh [4H, H], bias [4H] | None, train) -> (y [B, T, H], h_T, c_T, handle)`` in PyTorch's
  gate order (i, f, g, o); ``handle`` is ``None`` unless ``train``; ``None`` as a whole for
  mixed dtypes, where the layer takes its per-step path. The graph is recorded even inside
  ``torch.no_grad()`` or ``torch.inference_mode()`` (inference tensors are copied first);
- ``lstm_sequence_backward(handle, dy [B, T, H] | None, dh_T [B, H] | None, need_input_grad)
  -> (dx [B, T, I] | None, dh0, dc0, dweight_ih, dweight_hh, dbias | None)``; it may be
  called more than once with the same handle (the graph is kept).
"""

from __future__ import annotations

import torch


def lstm_sequence_forward(x, h0, c0, weight_ih, weight_hh, bias, train: bool):
    """One fused LSTM call over the whole sequence (see the module docstring)."""
    dtype = x.dtype
    if not (h0.dtype == c0.dtype == weight_ih.dtype == weight_hh.dtype == dtype
            and (bias is None or bias.dtype == dtype) and dtype.is_floating_point):
        return None
    tensors = [x, h0, c0, weight_ih, weight_hh] + ([] if bias is None else [bias])
    with torch.inference_mode(False), torch.enable_grad() if train else torch.no_grad():
        # an inference tensor cannot enter a graph: a copy of it can
        leaves = [(t.clone() if train and t.is_inference() else t).detach().requires_grad_(train)
                  for t in tensors]
        x_, h0_, c0_, w_ih, w_hh = leaves[:5]
        params = [w_ih, w_hh]
        if bias is not None:  # PyTorch's two biases: loomx folds them into one
            params += [leaves[5], torch.zeros_like(bias)]
        # cuDNN requires contiguous initial states (a user's state may be a strided view)
        state = (h0_.unsqueeze(0).contiguous(), c0_.unsqueeze(0).contiguous())
        y, h_t, c_t = torch._VF.lstm(x_, state, params, bias is not None, 1, 0.0, bool(train),
                                     False, True)
    handle = (leaves, y, h_t) if train else None
    return y.detach(), h_t[0].detach(), c_t[0].detach(), handle


def lstm_sequence_backward(handle, dy, dh_last, need_input_grad: bool = True):
    """The gradients of one :func:`lstm_sequence_forward` (see the module docstring)."""
    leaves, y, h_t = handle
    outputs, grads = [], []
    if dy is not None:
        outputs.append(y)
        grads.append(dy)
    if dh_last is not None:
        outputs.append(h_t)
        grads.append(dh_last.unsqueeze(0))
    wanted = leaves if need_input_grad else leaves[1:]
    with torch.inference_mode(False):
        found = torch.autograd.grad(outputs, wanted, grads, retain_graph=True,
                                    allow_unused=True)
    found = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(wanted, found)]
    if not need_input_grad:
        found = [None, *found]
    dx, dh0, dc0, dw_ih, dw_hh = found[:5]
    return dx, dh0, dc0, dw_ih, dw_hh, (found[5] if len(found) > 5 else None)
