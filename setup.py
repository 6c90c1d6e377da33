"""Packaging: ``src/tinyrecon`` plus the top-level ``kernels/`` as ``tinyrecon.kernels``.

Two optional libraries with a plain C ABI, placed in the package (next to the sources for
editable installs), each with an ``auto`` (default: build when the compiler is found), ``1``
(require it) or ``0`` (skip) switch:
- ``csrc/*.cu`` compiled with nvcc into ``libtinyrecon_cuda.so`` (``TINYRECON_BUILD_CUDA``;
  archs from ``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0"); ``auto`` also skips it on a machine
  with no NVIDIA driver or GPU, where it could not run;
- ``csrc/*.cpp`` compiled with the C++ compiler into ``libtinyrecon_cpu.so`` (``TINYRECON_BUILD_CPU``).
The compilers and command lines are ``build_libs.py``'s; the package's ``cpu_lib``/``cuda_lib`` load the results.
"""
import glob
import os
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import build_libs  # noqa: E402  (the build's compilers and command lines, next to this file)

# extension name -> (switch variable, what it needs, its compiler finder, its command builder,
#                    what says why it could not run here (None: it always can))
LIBRARIES = {
    "tinyrecon.libtinyrecon_cuda": ("TINYRECON_BUILD_CUDA", "nvcc", build_libs.find_nvcc, build_libs.nvcc_command,
                                    build_libs.no_driver_reason),
    "tinyrecon.libtinyrecon_cpu": ("TINYRECON_BUILD_CPU", "a C++ compiler", build_libs.find_cxx,
                                   build_libs.cxx_command, None),
}


class BuildLibraries(build_ext):
    """Builds each library with one compiler command instead of compiling a Python extension."""

    def run(self):
        self.compilers, kept = {}, []
        for ext in self.extensions:
            switch, needs, find, _, runs_here = LIBRARIES[ext.name]
            name = ext.name.split(".")[-1] + ".so"
            mode = os.environ.get(switch, "auto")
            if mode not in ("0", "1", "auto"):
                raise SystemExit(f"{switch} must be 0, 1 or auto, got {mode!r}")
            compiler = find() if mode != "0" else None
            if mode == "1" and not compiler:
                raise SystemExit(f"{switch}=1 but {needs} was not found ({switch}=0 installs without it)")
            cannot_run = runs_here() if compiler and runs_here and mode == "auto" else ""
            if compiler and not cannot_run:
                self.compilers[ext.name] = compiler
                kept.append(ext)
                print(f"tinyrecon: building {name} with {compiler} ({switch}={mode})")
            elif cannot_run:
                print(f"tinyrecon: not building {name}: {cannot_run} ({switch}=1 builds it anyway)")
            else:
                print(f"tinyrecon: not building {name} " + (f"({switch}=0)" if mode == "0" else f"({needs} not found)"))
        self.extensions = kept
        super().run()

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")[:-1], fullname.split(".")[-1] + ".so")

    def build_extension(self, ext):
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        sources = [os.path.join(ROOT, s) for s in ext.sources]
        command = LIBRARIES[ext.name][3](self.compilers[ext.name], sources, output)
        print("tinyrecon: " + " ".join(command))
        if subprocess.run(command).returncode:
            raise SystemExit(f"tinyrecon: building {os.path.basename(output)} failed (see above); "
                             f"{LIBRARIES[ext.name][0]}=0 installs without it")


setup(
    packages=["tinyrecon", "tinyrecon.benchmark", "tinyrecon.functions", "tinyrecon.kernels"],
    package_dir={"tinyrecon": "src/tinyrecon", "tinyrecon.kernels": "kernels"},
    ext_modules=[Extension("tinyrecon.libtinyrecon_cuda", sources=sorted(glob.glob("csrc/*.cu")),
                           depends=sorted(glob.glob("csrc/*.cuh"))),
                 Extension("tinyrecon.libtinyrecon_cpu", sources=sorted(glob.glob("csrc/*.cpp")),
                           depends=sorted(glob.glob("csrc/*.h")))],
    cmdclass={"build_ext": BuildLibraries},
)
