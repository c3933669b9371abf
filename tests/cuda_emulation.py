"""Run CUDA kernel source on the CPU: every CUDA thread a real thread, ``__syncthreads`` a barrier.

For kernels written with block-stride loops and dynamic shared memory (``SHARED_MEMORY(T)``),
such as :mod:`loomx.backends.cuda_recurrent`, without a GPU. The source is compiled by the host's
C++ compiler with a prelude that maps the CUDA built-ins onto C++ threads: ``threadIdx`` is
thread-local, ``__syncthreads`` is a barrier over the block's threads, ``__shfl_down_sync`` an
exchange through a barrier over the warp's lanes, blocks run one after another (so static
``__shared__`` arrays are plain statics), and shared memory is filled with NaN bytes before
each block. Template kernels are named with their argument, as CuPy's ``name_expressions``.

What it catches: indexing errors and wrong arithmetic (wrong values), reads of shared memory
that no thread wrote or past what the launch asked for (NaN in the results; a guard region
follows the requested bytes), writes past it (an error), missing barriers (the threads
really race, so the results are wrong in most runs, not all), and a barrier inside divergent
code (an error after 5 s). The threads of a launch are made once and run their thread of
every block in turn. What it does
not: everything device-specific (``__restrict__`` loads, flush-to-zero, compiler limits,
register pressure, speed).

``build(code, name)`` returns ``launch(grid, block, args, shared_mem)`` over numpy arrays and
numpy scalars, the interface the CuPy backend's kernel modules expect of a device compiler.
Compiled libraries are cached by source hash in a temporary directory.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
using std::min; using std::max; using std::sqrt; using std::exp; using std::log; using std::tanh;
struct emu_dim3 { unsigned x, y, z; };
static thread_local emu_dim3 threadIdx;
static thread_local emu_dim3 blockIdx;
static emu_dim3 blockDim, gridDim;
// __syncthreads: a barrier over the block's threads that gives up (and marks the launch
// failed) when some thread never arrives, as when a kernel syncs inside divergent code
struct emu_barrier_t {
    std::mutex m;
    std::condition_variable cv;
    int count = 0, waiting = 0;
    long generation = 0;
    bool broken = false;
    void wait() {
        std::unique_lock<std::mutex> lock(m);
        if (broken) return;
        const long g = generation;
        if (++waiting == count) { waiting = 0; ++generation; cv.notify_all(); return; }
        if (!cv.wait_for(lock, std::chrono::seconds(5),
                         [&] { return generation != g || broken; })) {
            broken = true;
            cv.notify_all();
        }
    }
};
static emu_barrier_t* emu_barrier = nullptr;
static unsigned char* emu_shared = nullptr;
// a warp: its own barrier over its lanes, and a slot per lane for shuffles
struct emu_warp_t {
    emu_barrier_t bar;
    alignas(16) unsigned char slots[32 * 16];
};
static emu_warp_t* emu_warps = nullptr;
template <class T> static T __shfl_down_sync(unsigned, T v, int delta) {
    const int lane = threadIdx.x & 31;
    emu_warp_t& w = emu_warps[threadIdx.x >> 5];
    T* slot = reinterpret_cast<T*>(w.slots);
    slot[lane] = v;
    w.bar.wait();
    const T r = lane + delta < w.bar.count ? slot[lane + delta] : v;
    w.bar.wait();
    return r;
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  /* blocks run one after another */
#define __syncthreads() emu_barrier->wait()
#define SHARED_MEMORY(T) T* const smem = reinterpret_cast<T*>(emu_shared)

// returns 0, 1 (a barrier some thread never reached) or 2 (a write past the shared memory
// the launch asked for, into a guard region after it). One thread per CUDA thread of a block,
// made once per launch, runs that thread of every block in turn; between blocks, thread 0
// checks the guard region and fills the shared memory with NaN bytes again.
static std::mutex emu_launch;  // one launch at a time: the emulation's state is global
template <class F> static int emu_run(int grid, int block, long long shared, F body) {
    std::lock_guard<std::mutex> one_at_a_time(emu_launch);
    const long long guard = 256;
    std::vector<unsigned char> memory(shared + guard);
    std::memset(memory.data(), 0xff, memory.size());  // NaN in every float type
    emu_shared = memory.data();
    gridDim = {(unsigned)grid, 1, 1};
    blockDim = {(unsigned)block, 1, 1};
    emu_barrier_t bar, between;
    bar.count = between.count = block;
    emu_barrier = &bar;
    const int nwarps = (block + 31) / 32;
    std::unique_ptr<emu_warp_t[]> warps(new emu_warp_t[nwarps]);
    for (int w = 0; w < nwarps; ++w) warps[w].bar.count = std::min(32, block - 32 * w);
    emu_warps = warps.get();
    bool overrun = false;
    auto thread = [&](int t) {
        threadIdx = {(unsigned)t, 0, 0};
        for (int b = 0; b < grid; ++b) {
            blockIdx = {(unsigned)b, 0, 0};
            between.wait();
            body();
            between.wait();
            if (t == 0) {
                for (long long i = shared; i < shared + guard; ++i)
                    if (memory[i] != 0xff) overrun = true;
                std::memset(memory.data(), 0xff, memory.size());
            }
        }
    };
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t) threads.emplace_back(thread, t);
    for (auto& th : threads) th.join();
    bool broken = bar.broken || between.broken;
    for (int w = 0; w < nwarps; ++w) broken = broken || warps[w].bar.broken;
    return broken ? 1 : overrun ? 2 : 0;
}
"""


#: What precedes a kernel's name: ``__global__ void`` and optional launch bounds.
_KERNEL = r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?"
#: A template kernel's head, up to its name.
_TEMPLATE = r"template\s*<\s*typename\s+(\w+)\s*>\s*" + _KERNEL


def compiler() -> str | None:
    """The host C++ compiler, or ``None``."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def unavailable() -> str | None:
    """Why the emulation cannot run here, or ``None`` when it can."""
    if compiler() is None:
        return "no C++ compiler for the CUDA emulation"
    probe = 'extern "C" __global__ void probe(float* a, int n) { __syncthreads(); }'
    try:
        build(probe, "probe")
    except subprocess.CalledProcessError as exc:
        return f"the host compiler cannot build the CUDA emulation: {exc.stderr}"
    return None


#: Scalar parameter types -> (ctypes type, the numpy scalar type a launch must pass, as CuPy
#: requires for its kernels)
_SCALARS = {"int": (ctypes.c_int, np.int32), "long long": (ctypes.c_longlong, np.int64),
            "float": (ctypes.c_float, np.float32), "double": (ctypes.c_double, np.float64)}


def _parts(name: str) -> tuple[str, str | None]:
    """``"softmax_fwd<float>"`` -> ``("softmax_fwd", "float")``; a plain name -> ``(name,
    None)``."""
    found = re.fullmatch(r"(\w+)\s*<\s*(\w+)\s*>", name)
    return (found.group(1), found.group(2)) if found else (name, None)


def _declared(code: str, name: str) -> tuple[str, dict[str, str]]:
    """The parameter list of kernel ``name`` (``"base<type>"`` for an instantiation of a
    template kernel), and the type names to substitute in it."""
    base, targ = _parts(name)
    if targ is None:
        found = re.search(_KERNEL + re.escape(base) + r"\s*\(([^)]*)\)", code)
        if found is None:
            raise ValueError(f"no kernel {name!r} in the source")
        return found.group(1), {}
    found = re.search(_TEMPLATE + re.escape(base) + r"\s*\(([^)]*)\)", code)
    if found is None:
        raise ValueError(f"no template kernel {base!r} in the source")
    return found.group(2), {found.group(1): targ}


def _signature(code: str, name: str) -> list[tuple[str, str]]:
    """``[(type, name)]`` of the kernel's parameters, ``type`` ``"ptr"`` or a key of
    ``_SCALARS`` (``T`` resolved through the source's ``typedef ... T;`` or the template
    argument)."""
    declared, types = _declared(code, name)
    typedef = re.search(r"typedef\s+(float|double)\s+T\s*;", code)
    if typedef is not None:
        types.setdefault("T", typedef.group(1))
    params = []
    for part in declared.split(","):
        words = part.replace("*", " * ").split()
        if "*" in words:
            params.append(("ptr", words[-1]))
            continue
        kind = " ".join(types.get(w, w) for w in words[:-1] if w != "const")
        if kind not in _SCALARS:
            raise ValueError(f"{name}: parameter type {kind!r} is not emulated")
        params.append((kind, words[-1]))
    return params


def _symbol(name: str) -> str:
    base, targ = _parts(name)
    return f"emu_{base}" if targ is None else f"emu_{base}__{targ}"


_COMPILING = threading.Lock()  # threads of one process (BatchParallel's shards) share a build


def _library(code: str, instances: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled source with a launcher for every plain kernel and for each template
    instantiation in ``instances`` (built once per process and kept on disk)."""
    with _COMPILING:
        return _build_library(code, instances)


@functools.cache
def _build_library(code: str, instances: tuple[str, ...]) -> ctypes.CDLL:
    templates = {m.group(2) for m in re.finditer(_TEMPLATE + r"(\w+)\s*\(", code)}
    names = [n for n in re.findall(_KERNEL + r"(\w+)\s*\(", code) if n not in templates]
    wrappers = []
    for name in (*names, *instances):
        declared, types = _declared(code, name)
        for old, new in types.items():
            declared = re.sub(r"\b" + old + r"\b", new, declared)
        base, targ = _parts(name)
        call = ", ".join(p for _, p in _signature(code, name))
        callee = base if targ is None else f"{base}<{targ}>"
        wrappers.append(f'extern "C" int {_symbol(name)}(int grid, int block, long long shared, '
                        f'{declared}) {{ return emu_run(grid, block, shared, [&] {{ '
                        f'{callee}({call}); }}); }}')
    source = PRELUDE + code + "\n" + "\n".join(wrappers) + "\n"
    return compile_library(source, ["-O1", "-g", "-pthread", "-Wno-unknown-pragmas"])


def compile_library(source: str, flags: list[str]) -> ctypes.CDLL:
    """``source`` compiled by the host's C++ compiler into a shared library, kept on disk by
    the hash of the source and the flags (per-process temporary files: test workers may race
    here), and loaded."""
    digest = hashlib.sha1((source + " ".join(flags)).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "loomx-cuda-emulation")
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, f"{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(folder, f"{digest}.{os.getpid()}.cpp")
        with open(src, "w") as f:
            f.write(source)
        tmp = f"{lib}.{os.getpid()}.tmp"
        try:
            subprocess.run([compiler(), "-std=c++17", "-shared", "-fPIC", "-Wall", "-Werror",
                            *flags, src, "-o", tmp], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, lib)
        finally:
            os.remove(src)
    return ctypes.CDLL(lib)


def build(code: str, name: str, instances: tuple[str, ...] = ()):
    """``launch(grid, block, args, shared_mem)`` running kernel ``name`` of ``code``: pointer
    arguments are C-contiguous numpy arrays, scalars numpy scalars of the parameter's exact
    type (``np.int32`` for ``int``, ``np.int64`` for ``long long``, ...), as CuPy wants.

    A template kernel is named with its argument (``"softmax_fwd<float>"``), like CuPy's
    ``name_expressions``; ``instances`` lists every instantiation the source will be asked
    for, so that one compiled library serves them all."""
    if _parts(name)[1] is not None and name not in instances:
        instances = (*instances, name)
    fn = getattr(_library(code, tuple(instances)), _symbol(name))
    kinds = [kind for kind, _ in _signature(code, name)]
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong,
                   *(ctypes.c_void_p if k == "ptr" else _SCALARS[k][0] for k in kinds)]

    def launch(grid: int, block: int, args: tuple, shared_mem: int) -> None:
        if len(args) != len(kinds):
            raise TypeError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
        converted = []
        for kind, a in zip(kinds, args):
            if kind == "ptr":
                if not (isinstance(a, np.ndarray) and a.flags.c_contiguous):
                    raise TypeError(f"{name}: pointer arguments must be C-contiguous arrays")
                converted.append(a.ctypes.data)
            else:
                if type(a) is not _SCALARS[kind][1]:
                    raise TypeError(f"{name}: a {kind} argument must be "
                                    f"{_SCALARS[kind][1].__name__}, got {type(a).__name__}")
                converted.append(a.item())
        failed = fn(grid, block, shared_mem, *converted)
        if failed == 1:
            raise RuntimeError(f"{name}: a __syncthreads() was not reached by every thread of "
                               "a block (a barrier in divergent code)")
        if failed == 2:
            raise RuntimeError(f"{name}: a thread wrote past the {shared_mem} bytes of shared "
                               "memory the launch asked for")

    return launch


def nvcc_compiles(source: str, folder) -> str:
    """Compile ``source`` with nvcc for an H100 (sm_90) with CuPy's options; return ptxas's
    report, asserting success and at most 16 bytes of register spills per kernel."""
    src = os.path.join(folder, "kernel.cu")
    with open(src, "w") as f:
        f.write(source)
    done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-std=c++14", "-ftz=true",
                           "-Xptxas", "-v", src, "-o", os.path.join(folder, "kernel.cubin")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "error" not in done.stderr.lower()
    spilled = [int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr)]
    assert spilled and max(spilled) <= 16, done.stderr  # a word or two at most
    return done.stderr
