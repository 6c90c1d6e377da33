"""The install commands' pins agree with what torch itself requires.

pip cannot install ``torch==X triton==Y`` on Linux unless Y is the Triton that torch X's Linux
wheels require (``Requires-Dist: triton==Y``): it fails with ResolutionImpossible after downloading
the CUDA wheels. The CPU wheels list no triton, so the torch this runs with may not say which one
its Linux build needs: ``TORCH_TRITON`` records it, read from the metadata of the public Linux
x86-64 wheels (``torch-X-cp311-cp311-manylinux_2_28_x86_64.whl``, ``METADATA``). Checked here:
- every ``torch==X`` in README.md and .ci/run is in the table, and a ``triton==Y`` named in the
  same command is ``TORCH_TRITON[X]`` (no ``triton==`` without its torch);
- the installed torch's version is in the table (a torch upgrade must update the table and the
  pins together), and where its metadata does list triton (Linux CUDA wheels) it agrees;
- the installed Triton, if any, is the one the installed torch requires on Linux.
"""
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
TORCH_TRITON = {"2.13.0": "3.7.1"}    # torch version -> the triton its Linux x86-64 wheels require
FILES = ["README.md", ".ci/run"]


def commands(text: str):
    """Each ``pip install`` command (split at && ; and newlines, line continuations joined) naming a pin."""
    for command in re.split(r"&&|;|\n", text.replace("\\\n", " ")):
        if "pip install" in command and "==" in command:
            yield command


def pins(command: str, package: str) -> list[str]:
    return re.findall(rf"(?<![\w-]){package}==([\w.+]+)", command)


def test_pins_in_the_install_commands_agree_with_torch():
    checked = 0
    for name in FILES:
        for command in commands((ROOT / name).read_text()):
            torches, tritons = pins(command, "torch"), pins(command, "triton")
            for version in torches:
                assert version in TORCH_TRITON, f"{name}: torch=={version} is not in TORCH_TRITON: {command!r}"
                checked += 1
            for version in tritons:
                assert torches, f"{name}: triton=={version} pinned without its torch: {command!r}"
                assert version == TORCH_TRITON[torches[0]], (
                    f"{name}: torch=={torches[0]}'s Linux wheels require triton=={TORCH_TRITON[torches[0]]}, "
                    f"not {version}: {command!r}")
    assert checked >= 2    # the README's commands and .ci/run pin torch


def test_the_pin_check_catches_a_conflict():
    bad = "pip install torch==2.13.0 triton==3.8.0 && pip install -e ."
    command, = commands(bad)
    assert pins(command, "torch") == ["2.13.0"] and pins(command, "triton") == ["3.8.0"] != [TORCH_TRITON["2.13.0"]]
    assert pins("pip install pytorch-triton==1.0", "triton") == []


def test_installed_torch_is_in_the_table_and_agrees_with_its_metadata():
    version = torch.__version__.split("+")[0]
    assert version in TORCH_TRITON, f"torch {torch.__version__}: add the triton its Linux wheels require to TORCH_TRITON"
    listed = [r for r in importlib.metadata.requires("torch") or [] if re.match(r"triton\b", r)]
    for requirement in listed:   # a Linux CUDA wheel says it itself
        assert f"triton=={TORCH_TRITON[version]}" in requirement.replace(" ", ""), requirement


def test_installed_triton_is_the_one_torch_requires():
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Triton is not installed")
    assert triton_version == TORCH_TRITON[torch.__version__.split("+")[0]]
