"""Timing: interleaved rounds, first calls in a fresh process, traffic and throughput, and the
environment the numbers were measured in."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .. import __version__
from .cases import SHAPES, Case, make_function, proc_field


@dataclass(frozen=True)
class Mode:
    """How hard to try: seconds of timed rounds, repeat bounds, whether cold calls are timed (``cases.times_cold``)."""
    budget_s: float
    min_reps: int
    max_reps: int
    max_call_s: float     # a case whose warm call is slower than this is timed by that one round
    cold: bool = False


QUICK = Mode(budget_s=0.1, min_reps=3, max_reps=10, max_call_s=5.0)
FULL = Mode(budget_s=1.5, min_reps=9, max_reps=50, max_call_s=10.0, cold=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _once(fn, device, inner: int = 1) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / inner


def time_interleaved(fns: dict, device: torch.device, mode: Mode) -> dict:
    """Median seconds per call of each callable, timed in interleaved rounds (A B C A B C ...). A
    warmup call each sizes the run: calls under 1 ms are looped to samples of about 1 ms, rounds fill
    ``mode.budget_s``; a warm call over ``mode.max_call_s`` is the measurement (reps 1). A first call
    also pays one-off work (checks, plans, allocations): one under 0.1 s is made again to size the
    loops (sized by a 1 ms first call, a 25 us apply was timed alone, 2x slower than in a loop)."""
    warm = {name: _once(fn, device) for name, fn in fns.items()}
    warm = {name: _once(fns[name], device) if t < 0.1 else t for name, t in warm.items()}
    if max(warm.values()) > mode.max_call_s:
        return warm | {"reps": 1}
    inner = {name: max(1, int(1e-3 / max(t, 1e-7))) for name, t in warm.items()}
    per_round = sum(warm[k] * inner[k] for k in fns)
    reps = int(min(mode.max_reps, max(mode.min_reps, mode.budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_once(fn, device, inner[name]))
    return {name: statistics.median(s) for name, s in samples.items()} | {"reps": reps}


_FIRST_CALL = """
import json, statistics, sys, time, torch
from tinyrecon.benchmark import cases, check, timing
case, dt, dev = cases.Case(*sys.argv[1:5]), getattr(torch, sys.argv[5]), torch.device(sys.argv[6])
fn = check.prepare(case, dt, dev)[0][sys.argv[7]]
before, times = set(sys.modules), []
for i in range(1 + int(sys.argv[8])):
    timing.synchronize(dev)
    t = time.perf_counter()
    fn()
    timing.synchronize(dev)
    times.append(time.perf_counter() - t)
    if i == 0:
        imported = sorted(set(sys.modules) - before)
print(json.dumps(dict(first_s=times[0], warm_s=statistics.median(times[1:]) if times[1:] else None,
                      imported=imported)))
"""


def first_call(case: Case, dtype: torch.dtype, device: torch.device, which: str, warm: int = 0,
               timeout_s: float = 600) -> dict:
    """The first call of ``which`` (a key of ``check.prepare``'s callables) in a fresh Python process,
    inputs made before the clock starts, then ``warm`` more: ``{'first_s', 'warm_s' (their median or
    None), 'imported' (modules the first call imported)}``."""
    args = [case.function, case.shape, case.op, case.backend, str(dtype).replace("torch.", ""), str(device), which,
            str(warm)]
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL, *args], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
        raise RuntimeError(f"cold {which} call failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def traffic(case: Case, dtype: torch.dtype) -> tuple[float, float | None]:
    """(bytes, flops): the least traffic (inputs read, outputs written once), the dense GEMM's FLOPs (None: build)."""
    s = SHAPES[case.shape]
    size = torch.finfo(dtype).bits // 8
    l = make_function(case.function).calculate_l(s.n, s.D)
    if case.op == "build":
        return (l + s.n * s.D) * size, None
    fwd = s.batch * s.D + l + s.n + s.batch * s.n
    if case.op == "fwd":
        return fwd * size, 2.0 * s.batch * s.n * s.D
    # backward: read dy and x again, write dw, dbias (and dx for fwdbwd)
    if case.op == "train":
        return (fwd + s.batch * s.n + s.batch * s.D + l + s.n) * size, 4.0 * s.batch * s.n * s.D
    return (fwd + s.batch * s.n + 2 * s.batch * s.D + l + s.n) * size, 6.0 * s.batch * s.n * s.D


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, reps: int = 10) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(_once(lambda: dst.copy_(src), device) for _ in range(reps))
    return 2 * nbytes / t / 1e9


def generator_throughput(numel: int = 1 << 23) -> dict:
    """Numbers/s of the CPU library's Philox on one thread (rand, randn) and of a memcpy of as many floats, or {}."""
    from .. import cpu_lib
    if cpu_lib.load_error():
        return {}
    out, src = torch.empty(numel), torch.zeros(numel)
    result = {}
    for kind in (0, 1):
        def fill(kind=kind):
            cpu_lib.call("tinyrecon_cpu_philox_fill", kind, 1, 1, 0, 1, numel, numel, out.data_ptr())
        fill()
        result[("rand", "randn")[kind]] = numel / min(_once(fill, torch.device("cpu")) for _ in range(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out.copy_(src)
        result["memcpy"] = numel / min(_once(lambda: out.copy_(src), torch.device("cpu")) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return result


# ---- the environment ---------------------------------------------------------------------------
def cpu_name() -> str:
    return proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:  # not installed, or broken
        triton_version = f"unavailable ({type(e).__name__})"
    return {"tinyrecon": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def device_tag(device: torch.device) -> str:
    """Short folder-name tag: ``cpu-2core`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    if device.type == "cuda":
        return "cuda-" + "-".join(torch.cuda.get_device_name(device).lower().split())
    return f"{device.type}-{os.cpu_count()}core"


def load_average() -> float | None:
    """1-minute load average (other processes slow the timings down), where the OS tells it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
