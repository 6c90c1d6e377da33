"""Packaging: ``src/tinyrecon`` plus the top-level ``kernels/`` as ``tinyrecon.kernels``.

The optional CUDA library (``csrc/*.cu``, a plain C ABI) is compiled with nvcc into
``tinyrecon/libtinyrecon_cuda.so`` (next to the sources for editable installs):
``TINYRECON_BUILD_CUDA=auto`` (default) builds it when nvcc is found, ``1`` requires it,
``0`` skips it; archs come from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0").
"""
import glob
import importlib.util
import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_lib():
    """src/tinyrecon/cuda_lib.py, loaded by path: the package is not importable while it builds."""
    spec = importlib.util.spec_from_file_location("_tinyrecon_cuda_lib", os.path.join(ROOT, "src", "tinyrecon", "cuda_lib.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildCuda(build_ext):
    """Builds the CUDA library with one nvcc command instead of compiling a Python extension."""

    def run(self):
        mode = os.environ.get("TINYRECON_BUILD_CUDA", "auto")
        if mode not in ("0", "1", "auto"):
            raise SystemExit(f"TINYRECON_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
        self.nvcc = _cuda_lib().find_nvcc() if mode != "0" else None
        if mode == "1" and not self.nvcc:
            raise SystemExit("TINYRECON_BUILD_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME "
                             "(or TINYRECON_BUILD_CUDA=0 to install without the CUDA backend)")
        if not self.nvcc:
            print("tinyrecon: not building the CUDA library "
                  + ("(TINYRECON_BUILD_CUDA=0)" if mode == "0" else "(nvcc not found)"))
            self.extensions = []
        super().run()

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")[:-1], _cuda_lib().LIB_NAME)

    def build_extension(self, ext):
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        command = _cuda_lib().nvcc_command(self.nvcc, [os.path.join(ROOT, s) for s in ext.sources], output)
        print("tinyrecon: " + " ".join(command))
        if subprocess.run(command).returncode:
            raise SystemExit("tinyrecon: nvcc failed to build the CUDA library (see above); "
                             "TINYRECON_BUILD_CUDA=0 installs without the CUDA backend")


setup(
    packages=["tinyrecon", "tinyrecon.functions", "tinyrecon.kernels"],
    package_dir={"tinyrecon": "src/tinyrecon", "tinyrecon.kernels": "kernels"},
    ext_modules=[Extension("tinyrecon.libtinyrecon_cuda", sources=sorted(glob.glob("csrc/*.cu")),
                           depends=sorted(glob.glob("csrc/*.cuh")))],
    cmdclass={"build_ext": BuildCuda},
)
