"""The optional CUDA library built from ``csrc/``: how it is compiled, found and loaded.

``setup.py`` compiles every ``csrc/*.cu`` with nvcc into ONE shared library with a plain C ABI
(no torch headers or C++ ABI), placed inside the package as ``libtinyrecon_cuda.so``
(``TINYRECON_BUILD_CUDA=0|1|auto``; target archs from ``TORCH_CUDA_ARCH_LIST``, default
sm_80 and sm_90, plus PTX of the newest listed arch, which the driver compiles for newer GPUs).
It is loaded lazily with ctypes on first use; ``TINYRECON_CUDA_LIB=path``
loads another build instead. Every entry point returns 0 or an error code, turned into
:class:`CudaError` carrying the library's message (``tinyrecon_last_error``).

This module imports nothing from tinyrecon: ``setup.py`` loads it by path to build the library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil

LIB_NAME = "libtinyrecon_cuda.so"
DEFAULT_ARCHS = "8.0;9.0"

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_HEAD = [_INT, _P, _INT]                   # device, stream, dtype code
_WORK = [_P, ctypes.POINTER(_I64)]         # workspace, size query (non-null: report the size only)
_KRON_DIMS = [_I64] * 7                    # C, p, q, rA, s, t, rB
# Every entry point the Python glue calls, with its argument types; each returns an int code.
ENTRY_POINTS = {
    "tinyrecon_kron_build": _HEAD + [_INT] + [_P] * 5 + _WORK + _KRON_DIMS,
    "tinyrecon_kron_build_bwd": _HEAD + [_INT] + [_P] * 9 + _WORK + _KRON_DIMS,
    "tinyrecon_kron_apply": _HEAD + [_P] * 7 + _WORK + [_I64] + _KRON_DIMS,
    "tinyrecon_kron_apply_bwd": _HEAD + [_P] * 11 + _WORK + [_I64] + _KRON_DIMS,
    "tinyrecon_duplicated_diagonal_padding_build": _HEAD + [_P] * 2 + [_I64] * 5,
    "tinyrecon_duplicated_diagonal_padding_build_bwd": _HEAD + [_P] * 2 + [_I64] * 5,
    "tinyrecon_duplicated_diagonal_padding_apply": _HEAD + [_P] * 4 + [_I64] * 6,
    "tinyrecon_duplicated_diagonal_padding_apply_bwd": _HEAD + [_P] * 5 + _WORK + [_I64] * 6,
    "tinyrecon_lorr_build": _HEAD + [_P] * 3 + [_I64] * 4,
    "tinyrecon_lorr_build_bwd": _HEAD + [_P] * 5 + [_I64] * 4,
    "tinyrecon_lorr_apply": _HEAD + [_P] * 5 + _WORK + [_I64] * 5,
    "tinyrecon_lorr_apply_bwd": _HEAD + [_P] * 7 + _WORK + [_I64] * 5,
    "tinyrecon_device_count": [ctypes.POINTER(_INT)],
}


class CudaError(RuntimeError):
    """A call into the CUDA library failed; the message is the library's (a CUDA error string)."""


# ---- building (used by setup.py and tests/test_cuda.py) ---------------------------------------------
def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH; None when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.access(candidate, os.X_OK) else shutil.which("nvcc")


def no_driver_reason() -> str:
    """'' when this machine has an NVIDIA driver (libcuda) or an NVIDIA device node, else what is missing.

    ``setup.py`` skips the build in ``auto`` mode when this is not empty: a library built there
    could only fail with cudaErrorInsufficientDriver.
    """
    if ctypes.util.find_library("cuda") or os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"):
        return ""
    return "no NVIDIA driver or GPU on this machine (no libcuda, /dev/nvidiactl or nvidia-smi)"


def gencode_flags(arch_list: str | None = None) -> list[str]:
    """nvcc -gencode flags for ``TORCH_CUDA_ARCH_LIST`` syntax ("8.0;9.0", "9.0+PTX", "8.6 9.0").

    The newest arch always carries its PTX too (as if written "+PTX"): without it the library
    has no code for GPUs newer than the list, whose driver can compile that PTX."""
    spec = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    archs = []
    for item in spec.replace(";", " ").split():
        digits = item.removesuffix("+PTX").removeprefix("sm_").replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"cannot read CUDA arch {item!r} in {spec!r} (expected e.g. '8.0;9.0+PTX')")
        archs.append((digits, item.endswith("+PTX")))
    newest = max((int(d) for d, _ in archs), default=None)
    flags = []
    for digits, ptx in archs:
        codes = f"sm_{digits},compute_{digits}" if ptx or int(digits) == newest else f"sm_{digits}"
        flags += ["-gencode", f"arch=compute_{digits},code=[{codes}]"]
    return flags


def nvcc_command(nvcc: str, sources: list[str], output: str, arch_list: str | None = None,
                 werror: bool = False) -> list[str]:
    """The one nvcc command that compiles and links ``sources`` into the shared library ``output``."""
    host = "-fPIC,-fvisibility=hidden,-Wall,-Wextra" + (",-Werror" if werror else "")
    return [nvcc, "-std=c++20", "-O3", "-shared", "-Xcompiler", host, *(["--Werror", "all-warnings"] if werror else []),
            *gencode_flags(arch_list), "-o", output, *sources]


# ---- loading ----------------------------------------------------------------------------------------
def library_path() -> str:
    return os.environ.get("TINYRECON_CUDA_LIB") or os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)


@functools.lru_cache(maxsize=None)
def _load():
    """(library, '') when it loads and sees a CUDA device, else (None, why not)."""
    path = library_path()
    if not os.path.exists(path):
        return None, (f"no CUDA library at {path}: pip install builds it when nvcc and an NVIDIA driver are found "
                      "(TINYRECON_BUILD_CUDA=1 makes a missing nvcc an error)")
    try:
        lib = ctypes.CDLL(path)
        for name, argtypes in ENTRY_POINTS.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _INT
        lib.tinyrecon_last_error.argtypes, lib.tinyrecon_last_error.restype = [], ctypes.c_char_p
    except (OSError, AttributeError) as e:   # not loadable, or built from other sources
        return None, f"the CUDA library {path} does not load: {e}"
    count = _INT(0)
    if lib.tinyrecon_device_count(ctypes.byref(count)) != 0:
        message = _message(lib)
        if "cudaErrorInsufficientDriver" in message:   # what the runtime reports for no driver as well
            # nvcc links its CUDA runtime statically; NVIDIA's minimum drivers: CUDA 13 R580, CUDA 12 R525
            return None, (f"the CUDA library finds no NVIDIA driver, or one older than its CUDA runtime needs "
                          f"({message}): a library built with CUDA 13 needs driver R580 or newer, CUDA 12 "
                          "R525; nvidia-smi shows the driver, nvcc --version the CUDA it was built with: "
                          "update the driver, or build with an older CUDA toolkit")
        return None, f"the CUDA library finds no usable CUDA driver/device ({message})"
    if count.value == 0:
        return None, "the CUDA library finds no CUDA device"
    return lib, ""


def _message(lib) -> str:
    return lib.tinyrecon_last_error().decode(errors="replace")


def load_error() -> str:
    """'' when the CUDA library is loaded, else why it is not."""
    return _load()[1]


def call(name: str, *args) -> None:
    """Call entry point ``name``; a non-zero code raises :class:`CudaError` with the library's message."""
    lib, reason = _load()
    if lib is None:
        raise CudaError(reason)
    if getattr(lib, name)(*args) != 0:
        raise CudaError(f"{name}: {_message(lib)}")

