"""The CPU library built from ``csrc/*.cpp`` (``build_libs.py``, ``TINYRECON_BUILD_CPU=0|1|auto``): its
entry points, loaded lazily; ``TINYRECON_CPU_LIB=path`` loads another build."""
from __future__ import annotations

import ctypes
import functools
import os

from . import _clib

LIB_NAME = "libtinyrecon_cpu.so"


library_path = functools.partial(_clib.library_path, LIB_NAME, "TINYRECON_CPU_LIB")


@functools.lru_cache(maxsize=None)
def _load():
    """(library, '') when it loads, else (None, why not); loaded, it runs on torch's OpenMP threads."""
    lib, reason = _clib.load(library_path(), "CPU library", "pip install builds it when a C++ compiler is found "
                             "(TINYRECON_BUILD_CPU=1 makes a missing compiler an error)")
    if lib is not None:
        lib.tinyrecon_cpu_use_openmp(torch_openmp())
    return lib, reason


@functools.lru_cache(maxsize=None)
def torch_openmp() -> int | None:
    """The address of ``GOMP_parallel`` as torch's CPU library resolves it, so the library runs on
    torch's OpenMP threads (``csrc/threads_cpu.cpp`` says why); None where not found (own threads)."""
    import torch
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not torch._C.has_openmp or not os.path.exists(path):
        return None
    try:   # (already loaded by torch: the same handle, whose symbol lookup follows its dependencies)
        return ctypes.cast(ctypes.CDLL(path).GOMP_parallel, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def load_error() -> str:
    """'' when the CPU library is loaded, else why it is not."""
    return _load()[1]


def function(name: str):
    """Entry point ``name``, typed; its return code goes to :func:`check`."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return _clib.entry_point(lib, name, library_path())


def check(code: int, name: str, args=()) -> None:
    """Code 1 (bad arguments) raises ValueError, 2 (no memory for buffers) MemoryError."""
    if code == 2:
        raise MemoryError(f"{name}: out of memory")
    if code != 0:
        raise ValueError(f"{name} refused its arguments {args}")


def call(name: str, *args) -> None:
    """Call entry point ``name`` and :func:`check` its code."""
    check(function(name)(*args), name, args)
