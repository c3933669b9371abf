"""Backend selection: specs, context managers, defaults, and honest unavailability errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from loomx.backends import available_backends, current_backend, get_backend
from loomx.backends.cupy_backend import cupy_status

import loomx
from loomx.errors import BackendUnavailableError, LoomxError
from tests.conftest import assert_close


def test_use_backend_context_and_default():
    before = current_backend()
    with loomx.use_backend("torch") as b:
        assert current_backend() is b
        assert b.library == "torch"
    assert current_backend() is before
    try:
        loomx.use_backend("strict")
        assert current_backend().library == "array_api_strict"
    finally:
        loomx.set_default_backend(before)


def test_dtype_request():
    b = get_backend("numpy", "float64")
    assert b.float_dtype == b.xp.float64
    assert b.zeros((2,)).dtype == b.xp.float64
    with pytest.raises(LoomxError, match="no dtype"):
        get_backend("numpy", "float7")


def test_unknown_spec_is_a_clear_error():
    with pytest.raises(LoomxError, match="unknown backend 'tensorflow'"):
        get_backend("tensorflow")


def test_env_variable_is_read_lazily():
    code = ("import loomx; from loomx.backends import current_backend; "
            "print(current_backend().library)")
    env = dict(os.environ, LOOMX_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "torch", out.stderr


@pytest.mark.skipif(cupy_status()[0], reason="a GPU is usable here")
def test_cupy_unavailable_says_why():
    with pytest.raises(BackendUnavailableError, match="cupy backend is unavailable: .+"):
        get_backend("cupy")
    assert get_backend("auto").library == "numpy"


def test_torch_cuda_unavailable_says_why():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(BackendUnavailableError, match="is_available"):
        get_backend("torch:cuda")


def test_available_backends_report():
    rows = {name: (ok, detail) for name, ok, detail in available_backends()}
    assert rows["numpy"][0] is True
    assert set(rows) == {"numpy", "cupy", "torch", "strict"}
    assert all(detail for _, detail in rows.values())


def test_info_command_lists_backends():
    out = subprocess.run([sys.executable, "-m", "loomx", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "numpy    available" in out.stdout
    assert "cupy" in out.stdout and "torch" in out.stdout


def test_host_round_trip_preserves_integer_kinds(backend):
    ids = backend.from_host(np.array([1, 2, 3], dtype=np.int64))
    assert ids.dtype == backend.xp.int64
    np.testing.assert_array_equal(backend.to_host(ids), [1, 2, 3])


def test_bfloat16_host_round_trip():
    import ml_dtypes

    b = get_backend("torch", "bfloat16")
    host = np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)
    x = b.from_host(host)
    assert str(x.dtype) == "torch.bfloat16"
    np.testing.assert_array_equal(b.to_host(x).astype(np.float32), [1.5, -2.25])


def test_torch_backend_device_carries_its_index():
    """Tensors report ``cuda:0`` / ``mps:0``; a backend built from a bare ``torch:cuda`` must
    name the same device, or device checks compare ``cuda`` with ``cuda:0``."""
    torch = pytest.importorskip("torch")
    from loomx.backends.torch_backend import with_index

    assert with_index(torch.device("cuda"), lambda: 2) == torch.device("cuda", 2)
    assert with_index(torch.device("cuda:1"), lambda: 2) == torch.device("cuda", 1)
    assert with_index(torch.device("mps"), lambda: 2) == torch.device("mps", 0)
    assert with_index(torch.device("cpu"), lambda: 2) == torch.device("cpu")
    assert str(get_backend("torch").device) == "cpu"


def test_without_kernels_is_the_same_backend_on_its_reference_paths():
    b = get_backend("numpy")
    plain = b.without_kernels()
    assert plain.kernels == {} and b.kernels  # the original keeps its kernels
    assert type(plain) is type(b) and plain.device == b.device
    assert plain.float_dtype == b.float_dtype and plain.xp is b.xp
    assert plain.kernel("sum_rows") is None


def test_zero_grad_gives_zeros_that_the_first_gradient_replaces(backend):
    from loomx.layers import Dense

    layer = Dense(3)
    layer.build((4,), backend=backend)
    layer.zero_grad()
    assert_close(layer.grads["weight"], np.zeros((3, 4)), backend, rtol=0, atol=0)
    g = backend.from_host(np.ones((3, 4), np.float32))
    layer._accumulate("weight", g)
    assert layer.grads["weight"] is g  # replaced, not added to
    layer._accumulate("weight", g)
    assert_close(layer.grads["weight"], 2 * np.ones((3, 4)), backend, rtol=0, atol=0)


def test_numpy_grad_zeros_are_a_shared_read_only_view():
    b = get_backend("numpy")
    like = b.zeros((512, 784))
    z = b.grad_zeros(like)
    assert z.strides == (0, 0) and not z.flags.writeable and z.dtype == np.float32
    assert b.grad_zeros(b.zeros((512, 784))) is z  # cached per shape and dtype
    with pytest.raises(ValueError, match="read-only"):
        z += 1.0
    assert not np.any(z)


def test_cudnn_calls_of_the_torch_backend_run_in_full_float32(monkeypatch):
    """TF32 is off for the length of a CUDA float32 cuDNN call and restored after (also when
    the call raises); CPU tensors, other dtypes and LOOMX_TORCH_TF32=1 leave it alone."""
    torch = pytest.importorskip("torch")
    from loomx.backends.torch_precision import full_float32

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "allow_tf32", True)

    class CudaTensor:  # what full_float32 reads of a CUDA tensor, without a GPU
        dtype, is_cuda = torch.float32, True

    with full_float32(CudaTensor()):
        assert cudnn.allow_tf32 is False
    assert cudnn.allow_tf32 is True
    with pytest.raises(RuntimeError), full_float32(CudaTensor()):
        raise RuntimeError("a failing cuDNN call")
    assert cudnn.allow_tf32 is True
    for tensor in (torch.zeros(2), torch.zeros(2, dtype=torch.float16)):
        with full_float32(tensor):
            assert cudnn.allow_tf32 is True
    monkeypatch.setenv("LOOMX_TORCH_TF32", "1")
    with full_float32(CudaTensor()):
        assert cudnn.allow_tf32 is True
    monkeypatch.setattr(cudnn, "allow_tf32", False)  # a user who turned it off keeps it off
    monkeypatch.delenv("LOOMX_TORCH_TF32")
    with full_float32(CudaTensor()):
        assert cudnn.allow_tf32 is False
    assert cudnn.allow_tf32 is False


def test_moving_a_network_keeps_each_layers_own_dtype_unless_one_is_given():
    """Layer.to: without a dtype, float parameters take the new backend's float dtype except
    in layers built with their own; with a dtype, every nested layer takes it."""
    pytest.importorskip("torch")
    import loomx
    from loomx.layers import Dense, LayerNorm

    net = loomx.Network.chain([Dense(4, dtype="float64"), LayerNorm(dtype="float64"),
                               Dense(3)], input_shape=(5,), backend="numpy", seed=0)
    want = ["float64"] * 4 + ["float32"] * 2
    before = [net.backend.to_host(p.value) for p in net.parameters()]
    for target in ("torch", "numpy"):
        net.to(target)
        assert [str(p.value.dtype).replace("torch.", "") for p in net.parameters()] == want
    for a, p in zip(before, net.parameters()):
        np.testing.assert_array_equal(net.backend.to_host(p.value), a)  # nothing rounded
    net.to("numpy", "float32")
    assert {str(p.value.dtype) for p in net.parameters()} == {"float32"}
    assert [la.dtype for _, la in net.layers()] == [None, None, None]


def test_a_move_to_a_backend_without_a_layers_dtype_is_refused_before_anything_moves():
    torch = pytest.importorskip("torch")
    import loomx
    from loomx.errors import ConfigError
    from loomx.layers import Dense, LayerNorm

    net = loomx.Network.chain([Dense(4), LayerNorm(dtype="bfloat16"), Dense(3)],
                              input_shape=(5,), backend="torch", seed=0)
    with pytest.raises(ConfigError, match="dtype 'bfloat16', which backend numpy does not"):
        net.to("numpy")
    assert all(isinstance(p.value, torch.Tensor) for p in net.parameters())
    net.to("numpy", "float32")  # the way out the message names
    assert {str(p.value.dtype) for p in net.parameters()} == {"float32"}


def test_a_use_backend_made_early_and_entered_late_keeps_the_newer_default():
    from loomx.backends import current_backend, set_default_backend, use_backend

    import loomx

    before = current_backend()
    try:
        manager = use_backend("numpy", "float64")
        set_default_backend("numpy", "float16")  # the default changes after the call
        with manager as b:
            assert current_backend() is b and b.dtype_name(b.float_dtype) == "float64"
        assert current_backend().dtype_name(current_backend().float_dtype) == "float16"
    finally:
        set_default_backend(before)
    assert loomx.get_backend() is before
