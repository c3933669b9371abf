"""Every CuPy kernel through the kernel checks of ``tests/test_kernels.py``, without a GPU.

loomx's CuPy kernel modules are imported against a stand-in ``cupy`` (``tests/cupy_emulation.py``)
whose ``ElementwiseKernel`` and ``RawModule`` compile the same CUDA operations for the CPU;
the whole-sequence and multi-tensor kernels run in the thread emulation. The kernels are
registered on a numpy backend as the CuPy backend registers them, and each goes through the
same check as on a GPU: against the backend's reference path, in float32 (and float64 where
the check has a float64 case). What this cannot see is the device: streams, memory placement,
and how nvcc/NVRTC compile (the nvcc tests of the kernel modules cover compilation).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from loomx.backends import get_backend
from loomx.backends.cuda_foreach import AdamMany, SGDMany
from loomx.backends.cuda_recurrent import RecurrentSequence

from tests import cupy_emulation
from tests.test_kernels import KERNEL_CHECKS


@pytest.fixture(scope="module")
def cupy_like(emulated):
    """A numpy backend carrying the CuPy backend's kernels, run on the CPU."""
    with cupy_emulation.cupy_on_cpu() as (kernels, windows):
        table = dict(kernels.cupy_kernels())
        table["window_matmul"] = windows.window_matmul
        table["window_matmul_backward"] = windows.window_matmul_backward
        sequence = RecurrentSequence(np, emulated, lambda: 4)
        table["recurrent_sequence_forward"] = sequence.forward
        table["recurrent_sequence_backward"] = sequence.backward
        table["sgd_update_many"] = SGDMany(emulated, kernels.sgd_update, threads=64, chunk=256)
        table["adam_update_many"] = AdamMany(emulated, kernels.adam_update, threads=64,
                                             chunk=256)
        base = get_backend("numpy")
        yield dataclasses.replace(base, name="cupy-on-cpu", kernels=table)


def test_every_cupy_kernel_matches_its_reference_on_cpu(cupy_like):
    """All of them, reporting every failure at once (the first GPU run of these checks
    found one wrong kernel; here a failure names the kernel and the error)."""
    names = sorted(cupy_like.kernels)
    assert not [n for n in names if n not in KERNEL_CHECKS]
    assert len(names) > 40
    failures = []
    for name in names:
        try:
            KERNEL_CHECKS[name](cupy_like, cupy_like.kernel(name), name)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(f"{name}: {type(exc).__name__}: {exc}"[:400])
    assert not failures, "\n".join(failures)
