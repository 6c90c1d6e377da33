"""The CPU library built from ``csrc/*.cpp``: how it is compiled, found and loaded.

``setup.py`` compiles every ``csrc/*.cpp`` with the C++ compiler into ONE shared library with a
plain C ABI (no torch headers), placed inside the package as ``libtinyrecon_cpu.so``
(``TINYRECON_BUILD_CPU=0|1|auto``, default auto: built when a compiler is found). On x86-64 with
GCC its kernels carry AVX-512, AVX2 and baseline clones, picked when it loads, so one build runs
on any x86-64 CPU. It is loaded lazily with ctypes; ``TINYRECON_CPU_LIB=path`` loads another build.

This module imports nothing from tinyrecon: ``setup.py`` loads it by path to build the library.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil

LIB_NAME = "libtinyrecon_cpu.so"
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Every entry point the Python glue calls, with its argument types; each returns 0 or an error code.
ENTRY_POINTS = {
    "tinyrecon_cpu_kron_pass": [_INT, _INT] + [_P] * 5 + [_I64] * 5,
    "tinyrecon_cpu_kron_expand": [_INT, _INT] + [_P] * 3 + [_I64] * 4,
    "tinyrecon_cpu_philox_fill": [_INT, _INT] + [_I64] * 5 + [_P],
    "tinyrecon_cpu_philox_mask": [_INT] + [_I64] * 5 + [ctypes.c_float, _P, _I64, _P, _I64],
    "tinyrecon_cpu_mask_bits": [_INT, _I64, _I64, _I64, ctypes.c_float, _P],
    "tinyrecon_cpu_mask_apply": [_INT, _INT, _P] + [_I64] * 4 + [_P, _I64, _P, _I64],
    "tinyrecon_cpu_masked_gemm": [_INT, _INT, _P] + [_I64] * 5 + [_P, _I64, _P, _I64, _P, _P, _I64, _INT],
    "tinyrecon_cpu_random_linear": [_INT, _INT, _I64, _INT] + [_I64] * 7 + [_P] * 6,
}


def find_cxx() -> str | None:
    """$CXX, else c++ or g++ from PATH; None when there is none."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cxx_command(cxx: str, sources: list[str], output: str, werror: bool = False) -> list[str]:
    """The one compiler command that builds ``sources`` into the shared library ``output``.

    No -ffast-math: results must not depend on the compiler's reassociation beyond the
    vector lanes the code spells out.
    """
    return [cxx, "-std=c++17", "-O3", "-fno-math-errno", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
            "-Wall", "-Wextra", "-Wno-psabi", *(["-Werror"] if werror else []), "-o", output, *sources]


def library_path() -> str:
    return os.environ.get("TINYRECON_CPU_LIB") or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)


def open_library(path: str) -> ctypes.CDLL:
    """The library at ``path`` with its entry points typed (OSError or AttributeError if it is not one)."""
    lib = ctypes.CDLL(path)
    for name, argtypes in ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, _INT
    return lib


@functools.lru_cache(maxsize=None)
def _load():
    """(library, '') when it loads, else (None, why not)."""
    path = library_path()
    if not os.path.exists(path):
        return None, (f"no CPU library at {path}: pip install builds it when a C++ compiler is found "
                      "(TINYRECON_BUILD_CPU=1 makes a missing compiler an error)")
    try:
        return open_library(path), ""
    except (OSError, AttributeError) as e:   # not loadable, or built from other sources
        return None, f"the CPU library {path} does not load: {e}"


def load_error() -> str:
    """'' when the CPU library is loaded, else why it is not."""
    return _load()[1]


def call(name: str, *args) -> None:
    """Call entry point ``name``: code 1 (bad arguments; the glue checks them first) raises
    ValueError, code 2 (no memory for per-thread buffers) MemoryError."""
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    code = getattr(lib, name)(*args)
    if code == 2:
        raise MemoryError(f"{name}: out of memory")
    if code != 0:
        raise ValueError(f"{name} refused its arguments {args}")
