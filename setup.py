"""Packaging: ``src/tinyrecon`` plus the top-level ``kernels/`` as ``tinyrecon.kernels``.

Two optional libraries with a plain C ABI, placed in the package (next to the sources for
editable installs), each with an ``auto`` (default: build when the compiler is found), ``1``
(require it) or ``0`` (skip) switch:
- ``csrc/*.cu`` compiled with nvcc into ``libtinyrecon_cuda.so`` (``TINYRECON_BUILD_CUDA``;
  archs from ``TORCH_CUDA_ARCH_LIST``, default "8.0;9.0"); ``auto`` also skips it on a machine
  with no NVIDIA driver or GPU, where it could not run;
- ``csrc/*.cpp`` compiled with the C++ compiler into ``libtinyrecon_cpu.so`` (``TINYRECON_BUILD_CPU``).
"""
import glob
import importlib.util
import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_by_path(name):
    """src/tinyrecon/<name>.py: the package is not importable while it builds."""
    spec = importlib.util.spec_from_file_location(f"_tinyrecon_{name}", os.path.join(ROOT, "src", "tinyrecon", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# extension name -> (switch variable, what it needs, module, its compiler finder, its command builder,
#                    what says why it could not run here (None: it always can))
LIBRARIES = {
    "tinyrecon.libtinyrecon_cuda": ("TINYRECON_BUILD_CUDA", "nvcc", "cuda_lib", "find_nvcc", "nvcc_command",
                                    "no_driver_reason"),
    "tinyrecon.libtinyrecon_cpu": ("TINYRECON_BUILD_CPU", "a C++ compiler", "cpu_lib", "find_cxx", "cxx_command",
                                   None),
}


class BuildLibraries(build_ext):
    """Builds each library with one compiler command instead of compiling a Python extension."""

    def run(self):
        self.compilers, kept = {}, []
        for ext in self.extensions:
            switch, needs, module, find, _, runs_here = LIBRARIES[ext.name]
            mode = os.environ.get(switch, "auto")
            if mode not in ("0", "1", "auto"):
                raise SystemExit(f"{switch} must be 0, 1 or auto, got {mode!r}")
            lib = _load_by_path(module)
            compiler = getattr(lib, find)() if mode != "0" else None
            if mode == "1" and not compiler:
                raise SystemExit(f"{switch}=1 but {needs} was not found ({switch}=0 installs without it)")
            cannot_run = getattr(lib, runs_here)() if compiler and runs_here and mode == "auto" else ""
            if compiler and not cannot_run:
                self.compilers[ext.name] = (lib, compiler)
                kept.append(ext)
                print(f"tinyrecon: building {lib.LIB_NAME} with {compiler} ({switch}={mode})")
            elif cannot_run:
                print(f"tinyrecon: not building {lib.LIB_NAME}: {cannot_run} ({switch}=1 builds it anyway)")
            else:
                print(f"tinyrecon: not building {lib.LIB_NAME} " + (f"({switch}=0)" if mode == "0" else f"({needs} not found)"))
        self.extensions = kept
        super().run()

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")[:-1], fullname.split(".")[-1] + ".so")

    def build_extension(self, ext):
        output = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        lib, compiler = self.compilers[ext.name]
        sources = [os.path.join(ROOT, s) for s in ext.sources]
        command = getattr(lib, LIBRARIES[ext.name][4])(compiler, sources, output)
        print("tinyrecon: " + " ".join(command))
        if subprocess.run(command).returncode:
            raise SystemExit(f"tinyrecon: building {lib.LIB_NAME} failed (see above); "
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
