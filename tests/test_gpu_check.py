"""bench/gpu_check.sh, the one command that checks both GPU backends on a GPU: here (no GPU) it must
say so and exit 0, so that CI and a GPU slot can run it unconditionally."""
import os
import subprocess

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: bash bench/gpu_check.sh runs the real check")
def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    run = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no CUDA GPU here" in run.stdout
