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
    """Every kernel a launcher in kernels/*.py launches (``name[grid](...)``, ``name[build_grid(...)](...)``
    or ``name[(...)](...)``)."""
    names = set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        names |= set(re.findall(r"\b(_\w+)\[(?:grid|build_grid\(|\()", open(path).read()))
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
        if r["kernel"] in ("_kron_mm", "_masked_mm", "_blocked_mm", "_lorr_apply_kernel", "_bmm_kernel") \
                and "float16" in r["spec"]:
            assert r["mma"], r


def test_autotune_reuses_a_config_within_a_batch_bucket():
    """The package's autotuner keys the batch size by its next power of two: 33 and 60 share one tuning,
    65 tunes again; other key arguments stay exact."""
    import triton

    from tinyrecon.kernels._common import _Autotuner

    launched = []

    class Kernel:   # what the autotuner needs of a JITFunction
        arg_names = ["X", "N", "D"]
        fn = staticmethod(lambda X, N, D: None)

        def run(self, *args, **kwargs):
            launched.append(kwargs["B"])

    tuner = _Autotuner(Kernel(), ["N"], configs=[triton.Config({"B": 1}), triton.Config({"B": 2})],
                       key=["N", "D"], reset_to_zero=None, restore_value=None)
    timed = []
    tuner._bench = lambda *args, config, **kw: timed.append(config) or [3.0 - config.kwargs["B"]]
    for N, D in [(33, 7), (60, 7), (64, 7), (65, 7), (60, 8)]:
        tuner.run(None, N, D, grid=(1,), warmup=False)
    assert len(timed) == 2 * 3          # tuned for (64, 7), (128, 7), (64, 8): both configs each time
    assert launched == [2] * 5          # the faster config, every call
