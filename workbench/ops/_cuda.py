"""The one place that loads the CUDA sources and imports CuPy.

The sources are package data, ``workbench/kernels/*.cu``, found through :mod:`importlib.resources`
so that a non-editable install or a wheel carries them (see ``kernels/README.md``). Each source is
read once, prefixed with ``#line 1 "<path>"`` so compiler errors point at the file, and compiled
by CuPy with NVRTC at first use on each device (CuPy also caches the binary on disk). Importing
this module never touches a GPU: CuPy is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
import torch
from torch import Tensor

KERNEL_DIR: Traversable = resources.files("workbench") / "kernels"

# PTX for Hopper by default; the test-suite compiles every source for this without a GPU.
NVRTC_OPTIONS = ("--std=c++17",)


def kernel_names() -> list[str]:
    """The file names of the shipped CUDA sources, sorted."""
    return sorted(entry.name for entry in KERNEL_DIR.iterdir() if entry.name.endswith(".cu"))


def kernel_source(name: str) -> str:
    """The text of ``workbench/kernels/<name>`` with a ``#line`` directive naming the file."""
    path = KERNEL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {name!r} not found in {KERNEL_DIR}")
    return f'#line 1 "{path}"\n' + path.read_text()


def compile_ptx(name: str, arch: str = "compute_90") -> str:
    """Compile ``workbench/kernels/<name>`` to PTX with NVRTC directly, which needs no GPU.

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
    """A ``cupy.RawModule`` for ``workbench/kernels/<name>``; CuPy compiles it per device at first use."""
    cupy = _cupy()
    return cupy.RawModule(code=kernel_source(name), options=NVRTC_OPTIONS)


@functools.lru_cache(maxsize=None)
def get_kernel(name: str, function: str, device: int):
    """The ``__global__`` function ``function`` of ``workbench/kernels/<name>``, loaded on GPU ``device``.

    Cached per device: a CuPy kernel object is bound to the device whose context loaded it.
    """
    with _cupy().cuda.Device(device):
        return load_module(name).get_function(function)


def as_cupy(t: Tensor):
    """A zero-copy CuPy view of a CUDA tensor, which must be contiguous (the kernels index it flat)."""
    assert t.is_contiguous(), "kernel arguments must be contiguous"
    return _cupy().from_dlpack(t.detach())


@contextlib.contextmanager
def on_device_of(t: Tensor) -> Iterator[int]:
    """Launch CuPy work on ``t``'s device and on PyTorch's current stream there, so ordering
    with surrounding PyTorch work is preserved. Yields the device index."""
    cupy = _cupy()
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield index


def launch(source: str, function: str, grid: int, block: int, args: Sequence[Tensor | np.generic | None],
           shared_mem: int = 0) -> None:
    """Launch ``function`` of ``workbench/kernels/<source>`` as ``grid`` blocks of ``block`` threads.

    ``args`` are the kernel's arguments in order: contiguous CUDA tensors (passed as pointers),
    ``None`` (a null pointer) or numpy scalars (``np.int64``, ``np.float32``, ...). The kernel is
    fetched and the tensors converted inside the first tensor's device context, on PyTorch's
    current stream there. This is the one door to the GPU: ``tests/cuda_host.py`` provides the
    same call on the CPU, which lets the tests run the real glue through emulated kernels.
    """
    first = next(a for a in args if isinstance(a, Tensor))
    with on_device_of(first) as device:
        kernel = get_kernel(source, function, device)
        converted = tuple(as_cupy(a) if isinstance(a, Tensor) else a for a in args)
        kernel((grid,), (block,), converted, shared_mem=shared_mem)


def blocks_for(n: int, threads: int, max_blocks: int = 65535) -> int:
    """Grid size for ``n`` work items; kernels use grid-stride loops, so capping is safe."""
    return max(1, min((n + threads - 1) // threads, max_blocks))
