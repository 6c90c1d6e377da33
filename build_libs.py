"""How the two C libraries of tinyrecon are built: their compilers and command lines.

Owned by the build (``setup.py``), used by tests and bench/ too; tinyrecon never imports it at run
time (the loaders are ``tinyrecon.cpu_lib`` and ``tinyrecon.cuda_lib``).
- ``csrc/*.cpp`` with the C++ compiler into ``libtinyrecon_cpu.so``: on x86-64 with GCC its kernels
  carry AVX-512, AVX2 and baseline clones, picked when it loads, so one build runs on any x86-64 CPU;
- ``csrc/*.cu`` with nvcc into ``libtinyrecon_cuda.so``: target archs from ``TORCH_CUDA_ARCH_LIST``
  (default sm_80 and sm_90), plus PTX of the newest listed arch, which the driver compiles for newer GPUs.
"""
from __future__ import annotations

import ctypes.util
import os
import shutil

DEFAULT_ARCHS = "8.0;9.0"


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


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, else from PATH; None when there is none."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.access(candidate, os.X_OK) else shutil.which("nvcc")


def no_driver_reason() -> str:
    """'' when this machine has an NVIDIA driver (libcuda) or an NVIDIA device node, else what is missing.

    ``setup.py`` skips the CUDA build in ``auto`` mode when this is not empty: a library built there
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
