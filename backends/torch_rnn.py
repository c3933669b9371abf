"""Whole recurrent sequences on PyTorch tensors, through ATen's fused RNN, LSTM and GRU.

loomx's recurrent layers run one step at a time: a hidden-state product and the gate
arithmetic per step each way, for an LSTM about 30 ATen operations per step. PyTorch's own
``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` make one call for the whole sequence (oneDNN's RNN
primitive on the CPU, cuDNN on CUDA). These kernels run that call; its derivative is
PyTorch's own, taken with autograd inside the kernel (the layer's parameters and inputs are
plain tensors; the graph lives only in the handle the forward returns, and nothing the
kernels return requires gradients):

- ``recurrent_sequence_forward(mode, x [B, T, I], states, params, train) ->
  (y [B, T, H], last_states, handle) | None``: ``mode`` is ``"lstm"``, ``"gru"`` or
  ``"rnn_tanh"``; ``states`` the initial ``[h0]`` (LSTM: ``[h0, c0]``), each ``[B, H]``;
  ``params`` ``[weight_ih, weight_hh, bias_ih | None, bias_hh | None]`` in PyTorch's layout
  and gate order (a ``None`` bias of a pair with one bias is zeros). ``handle`` is ``None``
  unless ``train``; the whole result is ``None`` for mixed dtypes, where the layer takes its
  per-step path. The graph is recorded even inside ``torch.no_grad()`` or
  ``torch.inference_mode()`` (inference tensors are copied first);
- ``recurrent_sequence_backward(handle, dy [B, T, H] | None, dh_T [B, H] | None,
  need_input_grad) -> (dx [B, T, I] | None, d_states, d_params)``, ``d_params`` with
  ``None`` for the biases that were ``None``; it may be called more than once with the same
  handle (the graph is kept).
"""

from __future__ import annotations

import torch

from .torch_precision import full_float32

_CALLS = {"lstm": torch._VF.lstm, "gru": torch._VF.gru, "rnn_tanh": torch._VF.rnn_tanh}


def recurrent_sequence_forward(mode: str, x, states, params, train: bool):
    """One fused call over the whole sequence (see the module docstring)."""
    dtype = x.dtype
    given = [x, *states, *(p for p in params if p is not None)]
    if not dtype.is_floating_point or any(t.dtype != dtype for t in given):
        return None
    has_bias = params[2] is not None or params[3] is not None
    with torch.inference_mode(False), torch.enable_grad() if train else torch.no_grad():
        # an inference tensor cannot enter a graph: a copy of it can
        leaves = [(t.clone() if train and t.is_inference() else t).detach().requires_grad_(train)
                  for t in given]
        x_, states_ = leaves[0], leaves[1:1 + len(states)]
        weights = iter(leaves[1 + len(states):])
        flat = [next(weights), next(weights)]
        if has_bias:
            flat += [torch.zeros(params[0].shape[0], dtype=dtype, device=x.device)
                     if p is None else next(weights) for p in params[2:]]
        # cuDNN requires contiguous initial states (a user's state may be a strided view)
        hx = [s.unsqueeze(0).contiguous() for s in states_]
        call = _CALLS[mode]
        with full_float32(x):
            if mode == "lstm":
                y, *last = call(x_, hx, flat, has_bias, 1, 0.0, bool(train), False, True)
            else:
                y, h_t = call(x_, hx[0], flat, has_bias, 1, 0.0, bool(train), False, True)
                last = [h_t]
    handle = (leaves, len(states), [p is not None for p in params], y, last[0]) if train else None
    return y.detach(), [s[0].detach() for s in last], handle


def recurrent_sequence_backward(handle, dy, dh_last, need_input_grad: bool = True):
    """The gradients of one :func:`recurrent_sequence_forward` (see the module docstring)."""
    leaves, n_states, present, y, h_t = handle
    outputs, grads = [], []
    if dy is not None:
        outputs.append(y)
        grads.append(dy)
    if dh_last is not None:
        outputs.append(h_t)
        grads.append(dh_last.unsqueeze(0))
    wanted = leaves if need_input_grad else leaves[1:]
    with torch.inference_mode(False), full_float32(y):
        found = torch.autograd.grad(outputs, wanted, grads, retain_graph=True,
                                    allow_unused=True)
    found = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(wanted, found)]
    if not need_input_grad:
        found = [None, *found]
    weights = iter(found[1 + n_states:])
    d_params = [next(weights) if here else None for here in present]
    return found[0], found[1:1 + n_states], d_params
