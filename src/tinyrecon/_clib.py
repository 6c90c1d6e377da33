"""The one ctypes loader of tinyrecon's two C libraries (``cpu_lib``, ``cuda_lib``; built by ``build_libs.py``).

Each is a plain C ABI shared library placed inside the package by ``pip install``, loaded lazily
on first use; an environment variable names another build instead.
"""
from __future__ import annotations

import ctypes
import os


def library_path(lib_name: str, env: str) -> str:
    """``$env``, else ``lib_name`` next to this module, where the build places it."""
    return os.environ.get(env) or os.path.join(os.path.dirname(os.path.abspath(__file__)), lib_name)


def open_library(path: str, entry_points: dict) -> ctypes.CDLL:
    """The library at ``path`` with its entry points typed, each returning an int code (OSError or
    AttributeError if it is not one)."""
    lib = ctypes.CDLL(path)
    for name, argtypes in entry_points.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib


def load(path: str, what: str, entry_points: dict, how_to_build: str):
    """(library, '') when it loads, else (None, why not)."""
    if not os.path.exists(path):
        return None, f"no {what} at {path}: {how_to_build}"
    try:
        return open_library(path, entry_points), ""
    except (OSError, AttributeError) as e:   # not loadable, or built from other sources
        return None, f"the {what} {path} does not load: {e}"
