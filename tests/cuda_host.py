"""Run a ``kernels/*.cu`` source on the CPU, one emulated thread at a time, to test its logic without a GPU.

The source is compiled by the host C++ compiler after a small shim that turns the CUDA
qualifiers into plain C++, makes ``blockIdx``/``threadIdx``/``blockDim``/``gridDim`` settable
globals and ``atomicAdd`` a plain add. :func:`launch` then calls an entry point once for every
(block, thread) of the grid, in order. This is exact for kernels whose threads are independent
apart from atomics (grid-stride loops), which is how the PrRoIPool kernels are written; it
cannot emulate ``__syncthreads`` between threads, so block-cooperative kernels only run with a
single thread per block. The GPU itself is still the final judge: see ``tests/test_cuda.py``.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np

from workbench.ops._cuda import KERNEL_DIR

SHIM = r"""
#include <cmath>
#include <cstdint>
using std::ceil; using std::exp; using std::fabs; using std::floor; using std::fmax; using std::fmin;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __syncthreads()
struct EmuDim { unsigned x, y, z; };
static EmuDim blockIdx, threadIdx, blockDim, gridDim;
template <typename T> T atomicAdd(T* address, T value) { T old = *address; *address += value; return old; }
extern "C" void emu_set_thread(unsigned block, unsigned thread, unsigned grid, unsigned block_dim) {
    blockIdx = {block, 0, 0}; threadIdx = {thread, 0, 0}; gridDim = {grid, 1, 1}; blockDim = {block_dim, 1, 1};
}
"""

_CTYPES = {np.float32: ctypes.c_float, np.float64: ctypes.c_double, np.int32: ctypes.c_int32, np.int64: ctypes.c_int64}


def compiler_available() -> bool:
    return shutil.which("g++") is not None


def build(name: str, workdir: Path) -> ctypes.CDLL:
    """Compile ``kernels/<name>`` for the host into ``workdir`` and load it."""
    source = (KERNEL_DIR / name).read_text()
    digest = hashlib.sha256((SHIM + source).encode()).hexdigest()[:16]
    lib = workdir / f"{Path(name).stem}-{digest}.so"
    if not lib.exists():
        cpp = workdir / f"{Path(name).stem}-{digest}.cpp"
        cpp.write_text(SHIM + f'#line 1 "{KERNEL_DIR / name}"\n' + source)
        subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-x", "c++", str(cpp), "-o", str(lib)],
                       check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib))


def launch(lib: ctypes.CDLL, function: str, grid: int, block: int, *args: object) -> None:
    """Call ``function`` for every emulated thread of a ``grid x block`` launch.

    ``args`` are C-contiguous numpy arrays (passed as pointers, written in place) or numpy scalars
    (``np.float32``, ``np.int32``, ...), the same argument types the CuPy launch uses.
    """
    c_args = []
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous, "arrays must be C-contiguous"
            c_args.append(ctypes.c_void_p(a.ctypes.data))
        else:
            c_args.append(_CTYPES[type(a)](a))
    entry = getattr(lib, function)
    entry.restype = None
    for b in range(grid):
        for t in range(block):
            lib.emu_set_thread(b, t, grid, block)
            entry(*c_args)
