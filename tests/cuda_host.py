"""Run the unmodified ``workbench/kernels/*.cu`` sources on the CPU, one OS thread per CUDA thread.

The source is compiled by the host C++ compiler (C++20) after a shim that turns the CUDA
qualifiers into plain C++ and supplies the device built-ins:

* ``threadIdx``/``blockIdx`` are thread-local, ``blockDim``/``gridDim`` global;
* ``__syncthreads()`` is a real barrier of the block's threads (``std::barrier``), and
  ``__shfl_down_sync`` exchanges values between the 32 threads of a warp through a buffer and a
  barrier of that warp, so a missing barrier or a divergent one shows up as a wrong answer or a
  hang (reported as a deadlock after a timeout);
* ``__shared__`` variables are ``static``: one copy shared by the threads of a block. Blocks run
  one after the other, so that copy is never shared by two blocks at once. The one textual change
  to the source: ``extern __shared__`` (dynamic shared memory) loses its ``__shared__`` and names a
  buffer the shim defines, as large as a block may have without opting in (48 KiB);
* ``atomicAdd`` is a real atomic (``std::atomic_ref``); the ``__f*_rn`` intrinsics are plain IEEE
  operations (compiled with ``-ffp-contract=off``, so nothing is fused, as on the GPU);
  ``expf``/``exp`` are the host libm's, which may differ from CUDA's in the last bit.

:class:`HostDevice` has the signature of :func:`workbench.ops._cuda.launch`, so a test can put it
in its place and run the real glue (``ops/nms.py``, ``ops/prroi_pool.py``) on CPU tensors. A GPU
remains the final judge (``tests/test_cuda.py``): the emulation checks the kernels' logic and
synchronization, not the hardware's scheduling, memory model or compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

import numpy as np
import torch

from workbench.ops._cuda import KERNEL_DIR

DYNAMIC_SHARED_BYTES = 48 * 1024

SHIM = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
using std::ceil; using std::exp; using std::fabs; using std::floor; using std::fmax; using std::fmin;
using std::max; using std::min;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim { unsigned x, y, z; };
static thread_local EmuDim threadIdx, blockIdx;
static EmuDim blockDim, gridDim;

static std::unique_ptr<std::barrier<>> emu_block_barrier;
static std::unique_ptr<std::barrier<>> emu_warp_barrier[32];
static std::uint64_t emu_lanes[2][32][32];  // [phase][warp][lane]: double-buffered shuffle slots
static thread_local int emu_phase = 0;

static void emu_fail(const char* what) { std::fprintf(stderr, "cuda_host: %s\n", what); std::abort(); }

extern "C" void emu_begin_block(unsigned grid, unsigned block) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    emu_block_barrier = std::make_unique<std::barrier<>>(block);
    for (unsigned w = 0; w < 32; ++w) {
        const unsigned lanes = w * 32 < block ? min(32u, block - w * 32) : 0u;
        emu_warp_barrier[w] = lanes ? std::make_unique<std::barrier<>>(lanes) : nullptr;
    }
}
extern "C" void emu_enter(unsigned block, unsigned thread) {
    blockIdx = {block, 0, 0};
    threadIdx = {thread, 0, 0};
    emu_phase = 0;
}
// A thread that has returned no longer holds the others back, as on current GPUs.
extern "C" void emu_exit() {
    (void)emu_block_barrier->arrive_and_drop();
    (void)emu_warp_barrier[threadIdx.x >> 5]->arrive_and_drop();
}

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "shuffle of a type wider than 64 bits");
    if (mask != 0xffffffffu || (threadIdx.x | 31u) >= blockDim.x) emu_fail("shuffle outside a full warp");
    const unsigned warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    std::uint64_t* slots = emu_lanes[emu_phase][warp];
    std::memcpy(&slots[lane], &value, sizeof(T));
    emu_warp_barrier[warp]->arrive_and_wait();
    // Lanes past the end of the warp read their own value. The next shuffle writes the other
    // buffer, and the one after it can only start once every lane has passed the next barrier,
    // that is, after every lane has read this one: one barrier per shuffle suffices.
    if (lane + delta < 32u) std::memcpy(&value, &slots[lane + delta], sizeof(T));
    emu_phase ^= 1;
    return value;
}

template <typename T> T atomicAdd(T* address, T value) { return std::atomic_ref<T>(*address).fetch_add(value); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
"""

_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+([\w\s]+?)\s*(\w+)\s*\[\s*\]\s*;")

_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32,
           np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64}

# A barrier no thread can pass keeps the launch waiting forever; past this, call it a deadlock.
DEADLOCK_SECONDS = 120.0


def compiler_available() -> bool:
    return shutil.which("g++") is not None


def host_source(path: Traversable) -> str:
    """The C++ translation unit for the CUDA source ``path``: shim, dynamic shared buffers, source."""
    source = path.read_text()
    buffers = "".join(
        f"alignas(16) {ctype} {var}[{DYNAMIC_SHARED_BYTES} / sizeof({ctype})];\n"
        for ctype, var in _DYNAMIC_SHARED.findall(source)
    )
    # Same line count, so the #line directive still holds.
    body = _DYNAMIC_SHARED.sub(lambda m: m.group(0).replace("__shared__", "", 1), source)
    return SHIM + buffers + f'#line 1 "{path}"\n' + body


def build(path: Traversable, workdir: Path) -> ctypes.CDLL:
    """Compile the CUDA source ``path`` for the host into ``workdir`` and load it."""
    name = path.name
    text = host_source(path)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    lib = workdir / f"{Path(name).stem}-{digest}.so"
    if not lib.exists():
        cpp = workdir / f"{Path(name).stem}-{digest}.cpp"
        cpp.write_text(text)
        subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-x", "c++",
                        str(cpp), "-o", str(lib)], check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def _c_arg(a: object) -> object:
    if a is None:
        return ctypes.c_void_p(None)
    if isinstance(a, torch.Tensor):
        assert a.device.type == "cpu" and a.is_contiguous(), "emulated kernels take contiguous CPU tensors"
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "arrays must be C-contiguous"
        return ctypes.c_void_p(a.ctypes.data)
    return _CTYPES[type(a)](a)


class HostDevice:
    """Compiles each kernel source of ``kernel_dir`` once into ``workdir`` and runs launches of it on host threads."""

    def __init__(self, workdir: Path, kernel_dir: Traversable = KERNEL_DIR) -> None:
        self.workdir = workdir
        self.kernel_dir = kernel_dir
        self._libs: dict[str, ctypes.CDLL] = {}
        self._lock = threading.Lock()  # one launch at a time: the shim's barriers are global
        # Threads stuck in a deadlocked launch still wait on the shim's barriers, which a new
        # launch would replace under them: after a deadlock this device refuses further work.
        self._deadlocked = False

    def library(self, source: str) -> ctypes.CDLL:
        if source not in self._libs:
            self._libs[source] = build(self.kernel_dir / source, self.workdir)
        return self._libs[source]

    def launch(self, source: str, function: str, grid: int, block: int, args: Sequence[object],
               shared_mem: int = 0) -> None:
        """Run ``function`` of ``workbench/kernels/<source>`` as a ``grid x block`` launch.

        ``args`` as for :func:`workbench.ops._cuda.launch`: contiguous CPU tensors or numpy arrays
        (passed as pointers, written in place), ``None`` (a null pointer) or numpy scalars.
        Each block's threads run concurrently; blocks run one after the other.
        """
        if self._deadlocked:
            raise RuntimeError("an earlier launch deadlocked; this emulated device cannot run more kernels")
        if shared_mem > DYNAMIC_SHARED_BYTES:
            raise ValueError(f"shared_mem {shared_mem} exceeds the emulated {DYNAMIC_SHARED_BYTES} bytes")
        if not 1 <= block <= 1024 or grid < 1:
            raise ValueError(f"invalid launch geometry grid={grid}, block={block}")
        lib = self.library(source)
        entry = getattr(lib, function)
        entry.restype = None
        c_args = [_c_arg(a) for a in args]
        with self._lock:
            lib.emu_begin_block(grid, block)
            # Between blocks every thread waits here; the last one in makes fresh barriers.
            between = threading.Barrier(block, action=lambda: lib.emu_begin_block(grid, block))
            errors: list[BaseException] = []

            def thread(t: int) -> None:
                try:
                    for b in range(grid):
                        lib.emu_enter(b, t)
                        entry(*c_args)  # ctypes releases the GIL: the threads really run together
                        lib.emu_exit()
                        between.wait()
                except BaseException as e:  # pragma: no cover - reported below
                    errors.append(e)
                    between.abort()

            threads = [threading.Thread(target=thread, args=(t,), daemon=True) for t in range(block)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(DEADLOCK_SECONDS)
                if th.is_alive():
                    self._deadlocked = True
                    raise RuntimeError(f"{function}: a thread is stuck after {DEADLOCK_SECONDS} s (deadlock)")
            if errors:
                raise errors[0]
