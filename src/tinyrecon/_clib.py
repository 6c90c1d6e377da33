"""The one ctypes loader of tinyrecon's two C libraries (``cpu_lib``, ``cuda_lib``): plain C ABI, placed in
the package by ``pip install``. A library lists its entry points with their types (``csrc/entry_points.h``),
so nothing here restates a C signature.
"""
from __future__ import annotations

import ctypes
import os

_CTYPES = {"i": ctypes.c_int, "l": ctypes.c_int64, "f": ctypes.c_float, "p": ctypes.c_void_p, "s": ctypes.c_char_p}


def address(t) -> int | None:
    """A tensor's data pointer for a pointer argument; None (a null pointer) for None or an empty tensor."""
    return None if t is None or not t.numel() else t.data_ptr()


def library_path(lib_name: str, env: str) -> str:
    """``$env``, else ``lib_name`` next to this module, where the build places it."""
    return os.environ.get(env) or os.path.join(os.path.dirname(os.path.abspath(__file__)), lib_name)


def open_library(path: str) -> ctypes.CDLL:
    """The library at ``path`` with every entry point it lists typed; ``lib.entry_points`` holds their
    names (OSError, AttributeError or ValueError if it is not such a library)."""
    lib = ctypes.CDLL(path)
    lib.tinyrecon_entry_points.restype = ctypes.c_char_p
    lib.entry_points = set()
    for entry in lib.tinyrecon_entry_points().decode().split(";")[:-1]:
        name, types = entry.split(":")
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = _CTYPES[types[0]], [_CTYPES[t] for t in types[1:]]
        lib.entry_points.add(name)
    return lib


def load(path: str, what: str, how_to_build: str):
    """(library, '') when it loads, else (None, why not)."""
    if not os.path.exists(path):
        return None, f"no {what} at {path}: {how_to_build}"
    try:
        return open_library(path), ""
    except (OSError, AttributeError, ValueError) as e:   # not loadable, older than the entry list, a bad list
        return None, f"the {what} {path} does not load: {e}"


def entry_point(lib, name: str, path: str):
    """``lib``'s typed function ``name``; a library built from other sources lacks it: say so."""
    if name not in lib.entry_points:
        raise RuntimeError(f"the library {path} has no entry point {name}: it was built from other sources "
                           "(reinstall tinyrecon, or point the environment variable at a current build)")
    return getattr(lib, name)
