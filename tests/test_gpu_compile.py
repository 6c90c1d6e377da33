"""The GPU-readiness gate, with no GPU: bench/gpu_compile_sweep.py --ci captures the launches of every
Triton op (forward and backward; the MNIST layer, a small odd shape, inputs wider than 2^21 columns,
rank tiles up to 128) and compiles a representative subset for sm_80 and sm_90, checking that each
compiles, fits the arch's shared memory, launches a grid within CUDA's limits, does not spill
registers (fp32/fp16/bf16), and that autotune keys name every launcher constexpr and bucket the
batch size; it also checks the CUDA library's ptxas report (nvcc -Xptxas -v). Minutes of CPU: the
sweep runs in a subprocess because it needs TRITON_INTERPRET unset."""
import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_compile_sweep.py")


def _launched_kernels():
    """Every kernel a launcher in kernels/*.py launches (``name[grid](...)`` or ``name[(...)](...)``)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        names |= set(re.findall(r"\b(_\w+)\[(?:grid|\()", open(path).read()))
    return names


def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, SCRIPT, "--ci", "--out", str(tmp_path)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["problems"] and report["failures"] == 0
    compiled = {r["kernel"] for r in report["results"]}
    assert compiled == _launched_kernels()
    targets = {r["target"] for r in report["results"]}
    assert targets == {"cuda:80", "cuda:90"}
    # fp16 dots run on tensor cores: mma (sm_80) or wgmma (sm_90) instructions in every fp16 variant with a dot
    for r in report["results"]:
        if r["kernel"] in ("_kron_mm", "_masked_mm", "_blocked_mm", "_lowrank_apply_kernel", "_bmm_kernel") \
                and "float16" in r["spec"]:
            assert r["mma"], r
