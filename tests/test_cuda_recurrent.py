"""The whole-sequence RNN, LSTM and GRU kernels of the CuPy backend
(``backends/cuda_recurrent.py``), without a GPU.

The CUDA source runs in the CPU emulation of ``tests/cuda_emulation.py`` (each CUDA thread a
real thread, ``__syncthreads`` a barrier) through the same host code the CuPy backend uses,
with numpy arrays, against ``torch.nn.LSTM``, ``GRU`` and ``RNN``; ``nvcc``, where installed,
compiles it for a real GPU. On a GPU the ``gpu``-marked recurrent tests run it through CuPy
itself.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from loomx.backends import get_backend
from loomx.backends.cuda_recurrent import (
    CUDA_PRELUDE,
    MAX_HIDDEN,
    MODES,
    SHARED_LIMIT,
    RecurrentSequence,
    kernel_code,
    plan_for,
)

from loomx.layers import GRU, LSTM, RNN
from tests import cuda_emulation
from tests.test_kernels import check_recurrent_sequence

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}


class _NanNumpy:
    """numpy whose ``empty`` and ``empty_like`` fill with NaN: an output element a kernel
    never writes shows up in the results."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype=dtype)

    @staticmethod
    def empty_like(a):
        return np.full_like(a, np.nan)


def _sequence(emulated, rows, threads):
    return RecurrentSequence(_NanNumpy(), emulated, lambda: 3, rows=rows, threads=threads)


def _case(mode, batch, steps, features, hidden, dtype, bias, seed=0):
    """Input, initial states and parameters of ``mode``; ``bias`` ``"ih"`` (only the
    input-side bias), ``"both"`` or ``"none"``."""
    rng = np.random.default_rng(seed)
    width = MODES[mode][1] * hidden

    def draw(*shape, scale=0.5):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    x = draw(batch, steps, features, scale=1.0)
    states = [draw(batch, hidden) for _ in range(2 if mode == "lstm" else 1)]
    params = [draw(width, features), draw(width, hidden),
              draw(width) if bias in ("ih", "both") else None,
              draw(width) if bias == "both" else None]
    return x, states, params


def _torch_reference(mode, x, states, params, dy, dh_last):
    """Outputs, final states, input and state gradients, and parameter gradients of the
    PyTorch module with the same weights, in float64."""
    batch, steps, features = x.shape
    hidden = params[1].shape[1]
    m = TORCH[mode](features, hidden, batch_first=True, bias=True, dtype=torch.float64)
    with torch.no_grad():
        m.weight_ih_l0.copy_(torch.tensor(params[0]))
        m.weight_hh_l0.copy_(torch.tensor(params[1]))
        for p, mine in ((m.bias_ih_l0, params[2]), (m.bias_hh_l0, params[3])):
            p.copy_(torch.zeros(p.shape) if mine is None else torch.tensor(mine))
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True)
              for a in (x, *states)]
    initial = tuple(s[None] for s in leaves[1:])
    y, last = m(leaves[0], initial if mode == "lstm" else initial[0])
    last = list(last) if mode == "lstm" else [last]
    total = (y * torch.tensor(dy)).sum() if dy is not None else 0
    if dh_last is not None:
        total = total + (last[0][0] * torch.tensor(dh_last)).sum()
    total.backward()
    grads = [m.weight_ih_l0.grad, m.weight_hh_l0.grad, m.bias_ih_l0.grad, m.bias_hh_l0.grad]
    return ([y.detach().numpy(), *(s[0].detach().numpy() for s in last)],
            [t.grad.numpy() for t in leaves], [g.numpy() for g in grads])


CASES = [  # batch, steps, features, hidden, rows, threads
    pytest.param(5, 4, 3, 8, 2, 32, id="partial_last_block"),
    pytest.param(3, 3, 2, 40, 1, 32, id="hidden_above_threads"),
    pytest.param(4, 1, 5, 6, 4, 64, id="one_step_wide_groups"),
    pytest.param(9, 6, 4, 16, 8, 64, id="eight_rows"),
    pytest.param(7, 3, 2, 129, None, None, id="production_plan"),  # G·H not a multiple of NT
]
MODE_IDS = sorted(MODES)


@pytest.mark.parametrize("batch,steps,features,hidden,rows,threads", CASES)
@pytest.mark.parametrize("bias", ["ih", "both", "none"])
@pytest.mark.parametrize("mode", MODE_IDS)
def test_sequence_matches_torch_float64(emulated, mode, batch, steps, features, hidden, rows,
                                        threads, bias):
    seq = _sequence(emulated, rows, threads)
    x, states, params = _case(mode, batch, steps, features, hidden, np.float64, bias)
    rng = np.random.default_rng(1)
    dy, dh = rng.standard_normal((batch, steps, hidden)), rng.standard_normal((batch, hidden))
    y, last, handle = seq.forward(mode, x, states, params, True)
    outs, tgrad_in, tgrads = _torch_reference(mode, x, states, params, dy, dh)
    assert len(last) == len(states)
    for got, want in zip((y, *last), outs, strict=True):
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    dx, d_states, d_params = seq.backward(handle, dy, dh, True)
    for got, want in zip((dx, *d_states), tgrad_in, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    for got, want, given in zip(d_params, tgrads, params):
        if given is None:
            assert got is None
        else:
            assert got.shape == given.shape
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dy_given,dh_given", [(True, False), (False, True)],
                         ids=["sequence_grad", "last_grad"])
@pytest.mark.parametrize("mode", MODE_IDS)
def test_sequence_gradient_sources_and_float32(emulated, mode, dy_given, dh_given):
    seq = _sequence(emulated, 2, 32)
    x, states, params = _case(mode, 3, 5, 4, 8, np.float32, "both")
    rng = np.random.default_rng(2)
    dy = rng.standard_normal((3, 5, 8)).astype(np.float32) if dy_given else None
    dh = rng.standard_normal((3, 8)).astype(np.float32) if dh_given else None
    y, last, handle = seq.forward(mode, x, states, params, True)
    outs, tgrad_in, tgrads = _torch_reference(mode, x, states, params, dy, dh)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, outs[0], rtol=1e-5, atol=1e-6)
    dx, d_states, d_params = seq.backward(handle, dy, dh, False)
    assert dx is None
    for got, want in zip((*d_states, *d_params), (*tgrad_in[1:], *tgrads), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODE_IDS)
def test_inference_forward_keeps_nothing(emulated, mode):
    seq = _sequence(emulated, 2, 32)
    x, states, params = _case(mode, 3, 4, 2, 8, np.float64, "ih")
    y, last, handle = seq.forward(mode, x, states, params, False)
    assert handle is None
    y_train, last_train, _ = seq.forward(mode, x, states, params, True)
    np.testing.assert_array_equal(y, y_train)
    for a, b in zip(last, last_train, strict=True):
        np.testing.assert_array_equal(a, b)


def test_declines_what_it_does_not_run(emulated):
    seq = _sequence(emulated, 2, 32)
    x, states, params = _case("lstm", 2, 3, 2, 8, np.float32, "ih")
    assert seq.forward("rnn_relu", x, states[:1], params, True) is None
    assert seq.forward("gru", x, states, params, True) is None  # two states
    assert seq.forward("lstm", x.astype(np.float64), states, params, True) is None
    half = [None if p is None else p.astype(np.float16) for p in params]
    assert seq.forward("lstm", x.astype(np.float16), [s.astype(np.float16) for s in states],
                       half, True) is None
    assert seq.forward("lstm", x[:, :0], states, params, True) is None
    assert seq.forward("lstm", x[:0], [s[:0] for s in states], params, True) is None
    big = MAX_HIDDEN + 1
    xb, sb, pb = _case("lstm", 1, 1, 1, big, np.float32, "none")
    assert seq.forward("lstm", xb, sb, pb, True) is None


def test_compile_failure_declines_with_one_warning():
    seq = RecurrentSequence(np, lambda code, name: None, lambda: 1)
    x, states, params = _case("lstm", 2, 3, 2, 8, np.float32, "ih")
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        assert seq.forward("lstm", x, states, params, True) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert seq.forward("lstm", x, states, params, True) is None


@pytest.mark.parametrize("gates", [4, 3, 1])
@pytest.mark.parametrize("hidden,batch,itemsize", [(128, 512, 4), (128, 64, 4), (256, 4096, 8),
                                                   (20, 7, 4), (1, 1, 8)])
def test_plan_fits_the_device_limits(hidden, batch, itemsize, gates):
    plan = plan_for(hidden, batch, itemsize, 132, gates)
    assert plan is not None
    assert plan.rows & (plan.rows - 1) == 0 and 1 <= plan.rows <= 8
    assert plan.threads % 32 == 0 and plan.threads <= 512
    assert plan.threads >= min(512, gates * hidden)
    assert plan.groups * hidden <= max(plan.threads, hidden)
    assert plan.blocks * plan.rows >= batch > (plan.blocks - 1) * plan.rows
    assert plan.backward_shared <= SHARED_LIMIT
    assert plan.forward_shared == itemsize * plan.rows * (2 + gates) * hidden


def test_plan_fills_the_device_once():
    assert plan_for(128, 512, 4, 132).rows == 4   # 128 blocks on 132 multiprocessors
    assert plan_for(128, 64, 4, 132).rows == 1
    assert plan_for(MAX_HIDDEN + 1, 64, 4, 132) is None


def test_layers_take_the_kernels_and_match_their_step_path(emulated):
    """The kernel check every backend's ``recurrent_sequence_*`` kernels pass: RNN, LSTM and
    GRU layers on numpy with the emulated kernels against the per-step path, with and without
    bias and initial state (a strided view), every step or the last, repeated and
    inference-context backward passes."""
    seq = _sequence(emulated, 2, 32)
    base = get_backend("numpy")
    fused = dataclasses.replace(base, kernels={
        **base.kernels, "recurrent_sequence_forward": seq.forward,
        "recurrent_sequence_backward": seq.backward})
    for cls in (RNN, LSTM, GRU):
        layer = cls(5)
        layer.build((4, 3), fused, rng=0)
        assert layer.forward(np.ones((2, 4, 3), np.float32), True)[1].fused is not None
    check_recurrent_sequence(fused, seq.forward, "recurrent_sequence_forward")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_compile_for_a_gpu(tmp_path, dtype):
    """The source CuPy compiles (with its CUDA prelude), through nvcc for an H100 (sm_90):
    no errors and no more than a word or two of register spills."""
    for mode in MODE_IDS:
        plan = plan_for(128, 512, np.dtype(dtype).itemsize, 132, MODES[mode][1])
        cuda_emulation.nvcc_compiles(CUDA_PRELUDE + kernel_code(mode, dtype, 128, plan),
                                     str(tmp_path))


def test_rows_per_block_can_be_set_for_measuring(monkeypatch, emulated):
    monkeypatch.setenv("LOOMX_CUDA_RNN_ROWS", "8")
    seq = RecurrentSequence(np, emulated, lambda: 132)
    assert seq.rows == 8
    x, states, params = _case("lstm", 3, 2, 2, 8, np.float64, "ih")
    y, _, _ = seq.forward("lstm", x, states, params, False)
    np.testing.assert_allclose(y, _torch_reference("lstm", x, states, params, None,
                                                   np.ones((3, 8)))[0][0], rtol=1e-12)
    monkeypatch.setenv("LOOMX_CUDA_RNN_ROWS", "3")
    with pytest.raises(ValueError, match="LOOMX_CUDA_RNN_ROWS"):
        RecurrentSequence(np, emulated, lambda: 132)
