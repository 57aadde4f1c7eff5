"""The one place that loads ``kernels/*.cu`` and imports CuPy.

Each source is read once, prefixed with ``#line 1 "<path>"`` so compiler errors point at the
file, and compiled by CuPy with NVRTC at first use (CuPy caches the binary per device and on
disk). Importing this module never touches a GPU: CuPy is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"

# PTX for Hopper by default; the test-suite compiles every source for this without a GPU.
NVRTC_OPTIONS = ("--std=c++17",)


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>`` with a ``#line`` directive naming the file."""
    path = KERNEL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found")
    return f'#line 1 "{path}"\n' + path.read_text()


def compile_ptx(name: str, arch: str = "compute_90") -> str:
    """Compile ``kernels/<name>`` to PTX with NVRTC directly, which needs no GPU.

    Raises:
        RuntimeError: with the compiler log when the source does not compile.
    """
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(kernel_source(name), name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", *NVRTC_OPTIONS])
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"{name} failed to compile:\n{nvrtc.getProgramLog(prog)}") from e
        ptx = nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("CUDA tensors need CuPy: pip install cupy-cuda13x") from e
    return cupy


@functools.lru_cache(maxsize=None)
def load_module(name: str):
    """A ``cupy.RawModule`` for ``kernels/<name>``; compiled lazily, per device, by CuPy."""
    cupy = _cupy()
    return cupy.RawModule(code=kernel_source(name), options=NVRTC_OPTIONS)


def get_kernel(name: str, function: str):
    """The ``__global__`` function ``function`` of ``kernels/<name>``."""
    return load_module(name).get_function(function)


def as_cupy(t: Tensor):
    """A zero-copy CuPy view of a contiguous CUDA tensor."""
    return _cupy().from_dlpack(t.detach().contiguous())


@contextlib.contextmanager
def on_device_of(t: Tensor) -> Iterator[None]:
    """Launch CuPy work on ``t``'s device and on PyTorch's current stream there, so ordering
    with surrounding PyTorch work is preserved."""
    cupy = _cupy()
    stream = torch.cuda.current_stream(t.device)
    with cupy.cuda.Device(t.device.index), cupy.cuda.ExternalStream(stream.cuda_stream, t.device.index):
        yield


def blocks_for(n: int, threads: int, max_blocks: int = 65535) -> int:
    """Grid size for ``n`` work items; kernels use grid-stride loops, so capping is safe."""
    return max(1, min((n + threads - 1) // threads, max_blocks))
