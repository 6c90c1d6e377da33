"""The CPU library built from ``csrc/*.cpp`` (``build_libs.py``): its entry points, loaded lazily.

``setup.py`` compiles every ``csrc/*.cpp`` into ONE shared library with a plain C ABI (no torch
headers), placed inside the package as ``libtinyrecon_cpu.so`` (``TINYRECON_BUILD_CPU=0|1|auto``,
default auto: built when a compiler is found); ``TINYRECON_CPU_LIB=path`` loads another build.
"""
from __future__ import annotations

import ctypes
import functools

from . import _clib

LIB_NAME = "libtinyrecon_cpu.so"
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# Every entry point the Python glue calls, with its argument types; each returns 0 or an error code.
ENTRY_POINTS = {
    "tinyrecon_cpu_kron_pass": [_INT, _INT] + [_P] * 5 + [_I64] * 7,
    "tinyrecon_cpu_kron_chain": [_INT, _INT] + [_P] * 4 + [_I64] * 5,
    "tinyrecon_cpu_kron_expand": [_INT, _INT] + [_P] * 3 + [_I64] * 4,
    "tinyrecon_cpu_philox_fill": [_INT, _INT] + [_I64] * 5 + [_P],
    "tinyrecon_cpu_philox_mask": [_INT] + [_I64] * 5 + [ctypes.c_float, _P, _I64, _P, _I64],
    "tinyrecon_cpu_mask_bits": [_INT, _I64, _I64, _I64, ctypes.c_float, _P],
    "tinyrecon_cpu_mask_apply": [_INT, _INT, _P] + [_I64] * 4 + [_P, _I64, _P, _I64],
    "tinyrecon_cpu_masked_gemm": [_INT, _INT, _P] + [_I64] * 5 + [_P, _I64, _P, _I64, _P, _P, _I64, _INT],
    "tinyrecon_cpu_random_linear": [_INT, _INT, _I64, _INT] + [_I64] * 7 + [_P] * 6,
    "tinyrecon_cpu_random_gemm": [_INT, _INT, _I64, _INT] + [_I64] * 6 + [_P, _P, _I64, _P, _P, _I64] + [_P] * 3,
}


def library_path() -> str:
    return _clib.library_path(LIB_NAME, "TINYRECON_CPU_LIB")


def open_library(path: str):
    return _clib.open_library(path, ENTRY_POINTS)


@functools.lru_cache(maxsize=None)
def _load():
    """(library, '') when it loads, else (None, why not)."""
    return _clib.load(library_path(), "CPU library", ENTRY_POINTS, "pip install builds it when a C++ compiler is found "
                      "(TINYRECON_BUILD_CPU=1 makes a missing compiler an error)")


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
