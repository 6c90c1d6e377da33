"""The optional CUDA library built from ``csrc/*.cu`` (``build_libs.py``, ``TINYRECON_BUILD_CUDA=0|1|auto``):
its entry points, loaded lazily; ``TINYRECON_CUDA_LIB=path`` loads another build. An error code
becomes :class:`CudaError` with the library's message."""
from __future__ import annotations

import ctypes
import functools

from . import _clib

LIB_NAME = "libtinyrecon_cuda.so"


class CudaError(RuntimeError):
    """A call into the CUDA library failed; the message is the library's (a CUDA error string)."""


library_path = functools.partial(_clib.library_path, LIB_NAME, "TINYRECON_CUDA_LIB")


@functools.lru_cache(maxsize=None)
def _load():
    """(library, '') when it loads and sees a CUDA device, else (None, why not)."""
    lib, reason = _clib.load(library_path(), "CUDA library",
                             "pip install builds it when nvcc and an NVIDIA driver are found "
                             "(TINYRECON_BUILD_CUDA=1 makes a missing nvcc an error)")
    if lib is None:
        return None, reason
    count = ctypes.c_int(0)
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


def entry_points() -> set:
    """The names of the loaded library's entry points (none when it does not load)."""
    lib = _load()[0]
    return set() if lib is None else lib.entry_points


def call(name: str, *args) -> None:
    """Call entry point ``name``; a non-zero code raises :class:`CudaError` with the library's message."""
    lib, reason = _load()
    if lib is None:
        raise CudaError(reason)
    if _clib.entry_point(lib, name, library_path())(*args) != 0:
        raise CudaError(f"{name}: {_message(lib)}")

