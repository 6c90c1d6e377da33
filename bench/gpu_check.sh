#!/usr/bin/env bash
# One command that checks the GPU backends on a real NVIDIA GPU (about 8 minutes at most on one
# H100/H200; each step has a time limit, so a slow step is reported, not waited for):
#   1. the environment (GPU, driver, versions, which backends load);
#   2. the CUDA library is built if it is missing (nvcc, archs of TORCH_CUDA_ARCH_LIST);
#   3. the GPU tests of both backends: tests/test_cuda.py and the Triton tests on CUDA tensors
#      (every autotuned kernel with its first config: TINYRECON_AUTOTUNE=first);
#   4. compute-sanitizer memcheck and racecheck on a small CUDA-library workload (bench/gpu_sanitize.py);
#   5. a short benchmark: the MNIST layer and one 4096 square, every family, fwd and train, every
#      backend that runs, with GB/s and % of the measured device copy bandwidth (autotuning included).
# Everything goes to bench/results/<gpu>-<date>/ (OUT_DIR overrides): one log per step, summary.md,
# and the benchmark's results.md/json per family. Exits 1 when a step fails or runs out of time.
# Without a GPU it says so and exits 0 (CI runs it that way: tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
unset TRITON_INTERPRET

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check." \
         "Run bash bench/gpu_check.sh on a machine with an NVIDIA GPU."
    exit 0
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
slug=$(echo "${gpu:-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
out=${OUT_DIR:-bench/results/${slug}-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
summary="$out/summary.md"
printf '# GPU check: %s, %s\n\n| step | status | seconds | limit |\n|---|---|---|---|\n' \
    "${gpu:-unknown GPU}" "$(date -u +%Y-%m-%dT%H:%MZ)" > "$summary"
failed=0

step() {   # step NAME LIMIT_S COMMAND...: runs COMMAND with a time limit, logs to $out/NAME.log
    local name=$1 limit=$2 start rc status
    shift 2
    echo "== $name (at most ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124) status="TIMED OUT"; failed=1 ;;
        *) status="FAILED (exit $rc)"; failed=1 ;;
    esac
    echo "| $name | $status | $(( $(date +%s) - start )) | $limit |" >> "$summary"
    tail -n 3 "$out/$name.log"
    echo "-- $name: $status"
}

step environment 30 bash -c "nvidia-smi; \"$PY\" -c '
import torch, triton, tinyrecon
from tinyrecon import dispatch
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
print(\"backends on cuda tensors:\", dispatch.available(\"cuda\"))'"

step build_cuda_library 120 "$PY" -c '
import glob, subprocess
import build_libs
from tinyrecon import cuda_lib
reason = cuda_lib.load_error()
if "no CUDA library at" in reason:
    nvcc = build_libs.find_nvcc()
    assert nvcc, "no CUDA library and no nvcc to build it"
    cmd = build_libs.nvcc_command(nvcc, sorted(glob.glob("csrc/*.cu")), cuda_lib.library_path())
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    cuda_lib._load.cache_clear()
    reason = cuda_lib.load_error()
print("CUDA library:", reason or "loaded")
assert not reason, reason'

step tests 100 env TINYRECON_AUTOTUNE=first "$PY" -m pytest -q -x tests/test_cuda.py tests/test_kron.py \
    tests/test_padding.py tests/test_lowrank.py tests/test_masking.py tests/test_hypernet.py tests/test_api.py

sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
if [ -x "$sanitizer" ]; then
    step memcheck 45 "$sanitizer" --tool memcheck --error-exitcode 1 "$PY" bench/gpu_sanitize.py
    step racecheck 45 "$sanitizer" --tool racecheck --error-exitcode 1 "$PY" bench/gpu_sanitize.py
else
    echo "| memcheck, racecheck | SKIPPED (no compute-sanitizer) | 0 | 0 |" >> "$summary"
    failed=1
fi

# one run per family, so a family that runs out of time leaves the others' results
for item in basic:30 masking:30 padding:40 lowrank:40 kron:60 hypernet:40; do
    family=${item%:*}
    step "bench_$family" "${item#*:}" "$PY" -m tinyrecon bench --device cuda --functions "$family" \
        --shapes mnist square4096 --ops fwd train --quick --out "$out/bench_$family"
done

echo
cat "$summary"
echo "results in $out"
exit $failed
