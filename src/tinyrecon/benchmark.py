"""Benchmark cases shared by ``tinyrecon bench`` and ``pytest bench/``: one list, one check, one timer.

A case is (function, shape, op, backend) with op one of ``build`` (W = psi(w)), ``fwd``
(``apply``), ``fwdbwd`` (``apply`` then gradients for x, w and bias) and ``train`` (``apply`` then
gradients for w and bias only: x is data, as ``kappa(x)`` is in an RPN's first layer). Every case is first
checked against the torch reference in float64 (tinyBIG's algorithm: build W, then F.linear);
a wrong result is reported as ``wrong`` and never timed. Then the candidate and two baselines,
tinyBIG's algorithm and a dense ``nn.Linear`` of the same n x D, are timed interleaved
(A B C A B C ...) so that a noisy machine slows all three alike; the median is reported.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, dispatch, registry

OPS = ("build", "fwd", "fwdbwd", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# Tolerances against a float64 (or float32) reference: one rounding of the output in the dtype
# plus fp32 accumulation error; atol is scaled by the reference's largest magnitude. The tests
# (tests/conftest.py) use this table too.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    D: int
    batch: int


SHAPES = {s.name: s for s in (
    Shape("small", 6, 12, 8),
    Shape("square1024", 1024, 1024, 64),
    Shape("square4096", 4096, 4096, 64),
    Shape("tall", 64, 65536, 64),          # a tall RPN layer
    Shape("mnist", 64, 615440, 64),        # tinyBIG's MNIST RPN layer (D = 784 * 785)
)}
QUICK_SHAPES = ("small", "tall")
# --quick also runs the headline cases: forward+backward of dual_lphm (p=8, q=784, r=5) on the MNIST layer.
QUICK_EXTRA = (("dual_lphm", "mnist", "fwdbwd"), ("dual_lphm", "mnist", "train"))

FUNCTIONS = tuple(registry.CLASSES)   # short names, in docs/functions.md order
FAMILY = {f: cls.__module__.rsplit(".", 1)[-1] for f, cls in registry.CLASSES.items()}
FAMILIES = tuple(dict.fromkeys(FAMILY.values()))
# Constructor arguments (the rest are tinyBIG's defaults). p and q default to the divisors
# closest to sqrt(n), sqrt(D): at the mnist shape that is the headline p=8, q=784.
KWARGS = {"lphm": dict(r=5), "dual_lphm": dict(r=5), "lorr": dict(r=5),
          "random_matrix_adaption": dict(r=5, seed=0), "random_matrix_hypernet": dict(r=5, seed=0),
          "masking": dict(seed=0), "hypernet": dict(seed=0)}


@dataclass(frozen=True)
class Mode:
    """How hard to try: seconds of timed rounds per case, repeat bounds, and what is too slow."""
    budget_s: float
    min_reps: int
    max_reps: int
    max_call_s: float     # a call slower than this (after warmup) is not timed


QUICK = Mode(budget_s=0.1, min_reps=3, max_reps=10, max_call_s=5.0)
FULL = Mode(budget_s=1.5, min_reps=9, max_reps=50, max_call_s=10.0)


@dataclass(frozen=True)
class Case:
    function: str
    shape: str
    op: str
    backend: str

    @property
    def id(self) -> str:
        return f"{self.function}-{self.shape}-{self.op}-{self.backend}"


def _split(names) -> list[str]:
    """Names given as a list and/or comma-separated, in order, without repeats."""
    parts = (p.strip() for name in names for p in str(name).split(","))
    return list(dict.fromkeys(p for p in parts if p))


def _pick(names, valid, what: str) -> list[str]:
    out = _split(names)
    for name in out:
        if name not in valid:
            raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")
    return out


def family_functions(family: str) -> list[str]:
    return [f for f in FUNCTIONS if FAMILY[f] == family]


def function_names(names) -> list[str]:
    """Short function names for function names, tinyBIG class names/paths or family names
    (``kron``); a name that is both (``hypernet``, ``masking``) means the function."""
    out = []
    for name in _split(names):
        try:
            out.append(registry.lookup(name).__name__[: -len(registry.SUFFIX)])
        except ValueError:
            if name not in FAMILIES:
                raise ValueError(f"unknown function {name!r}; valid: {', '.join(FUNCTIONS)} "
                                 f"or a family: {', '.join(FAMILIES)}") from None
            out += family_functions(name)
    return list(dict.fromkeys(out))


def select(functions=None, shapes=None, backends=None, ops=None, quick=True) -> list[Case]:
    """The cases to run; ``None`` means the default (``--quick``: small and tall shapes plus the
    headline MNIST case; otherwise every shape). Unknown names raise ValueError listing valid ones.
    ``functions`` may also be a list of short names (as :func:`function_names` returns)."""
    fs = function_names(functions) if functions else list(FUNCTIONS)
    ss = _pick(shapes, SHAPES, "shape") if shapes else list(QUICK_SHAPES if quick else SHAPES)
    bs = _pick(backends, dispatch.BACKENDS, "backend") if backends else list(dispatch.BACKENDS)
    os_ = _pick(ops, OPS, "op") if ops else list(OPS)
    cases = [Case(f, s, op, b) for s in ss for f in fs for op in os_ for b in bs]
    if quick and not shapes:
        cases += [Case(f, s, op, b) for f, s, op in QUICK_EXTRA if f in fs and op in os_ for b in bs]
    return cases


def make_function(name: str):
    return registry.reconciliation(name, **KWARGS.get(name, {}))


def dispatch_op(case: Case) -> str | None:
    prefix = registry.CLASSES[case.function].op
    return prefix and f"{prefix}_{'build' if case.op == 'build' else 'apply'}"


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def skip_reason(case: Case, device: torch.device, dtype: torch.dtype) -> str:
    """'' if the case can run here, else why not (shown in the results, never silently dropped)."""
    op = dispatch_op(case)
    if op is None:
        if case.backend != "torch":
            return "no kernels: plain torch code on every device"
    elif case.backend == "cuda" and dispatch.implementation(op, "cuda") is None:   # the hot families only
        return f"no {case.backend} kernel yet"
    else:
        reason = dispatch.why_not(case.backend, op, device.type)
        if reason:
            return reason
    shape = SHAPES[case.shape]
    if case.backend == "triton" and device.type != "cuda" and case.shape != "small":
        return "the Triton interpreter (TRITON_INTERPRET=1) is for correctness checks: small shape only"
    # Peak memory, roughly: W, its gradient and the dense layer (+ grad) in dtype, W and dW of the
    # float64 reference; x and its gradient in dtype and in float64.
    size = torch.finfo(dtype).bits // 8
    need = shape.n * shape.D * (4 * size + 2 * 8) + shape.batch * shape.D * (2 * size + 2 * 8)
    avail = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else _available_bytes()
    if avail is not None and need > avail // 2:
        return f"needs about {need / 2**30:.1f} GiB, more than half of the {avail / 2**30:.1f} GiB available"
    return ""


# ---- inputs and the callables timed -----------------------------------------------------------
def _thunks(rec, shape: Shape, op: str, x, w, bias, g, backend: str, dense: bool):
    """Callables for the candidate (``backend``), tinyBIG's algorithm and (optionally) a dense layer."""
    n, D = shape.n, shape.D

    def tinybig():
        return F.linear(x, rec(n=n, D=D, w=w, backend="torch"), bias)

    def apply():
        return rec.apply(x, w, n=n, bias=bias, backend=backend)

    if op == "build":
        return {"candidate": lambda: rec(n=n, D=D, w=w, backend=backend),
                "tinybig": lambda: rec(n=n, D=D, w=w, backend="torch")}
    lin = torch.nn.Linear(D, n, device=x.device, dtype=x.dtype) if dense else None
    if op == "fwd":
        fns = {"candidate": apply, "tinybig": tinybig} | ({"dense": lambda: lin(x)} if lin else {})
        return {name: torch.no_grad()(f) for name, f in fns.items()}
    wrt = (x, w, bias) if op == "fwdbwd" else (w, bias)
    fns = {"candidate": _with_grads(apply, wrt, g), "tinybig": _with_grads(tinybig, wrt, g)}
    if lin:
        fns["dense"] = _with_grads(lambda: lin(x), (x, lin.weight, lin.bias)[3 - len(wrt):], g)
    return fns


def _with_grads(forward, inputs, g):
    def run():
        y = forward()
        return (y.detach(), *torch.autograd.grad(y, inputs, g, materialize_grads=True))
    return run


def prepare(case: Case, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """``(fns, reference)``: the timed callables, and a callable computing the float64 reference
    of the candidate's outputs (tinyBIG's algorithm with the torch backend)."""
    shape = SHAPES[case.shape]
    rec = make_function(case.function)
    gen = torch.Generator().manual_seed(seed)
    grad = case.op in ("fwdbwd", "train")

    def tensor(*size, grad=grad):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype).requires_grad_(grad)

    w = tensor(rec.calculate_l(shape.n, shape.D))
    x = tensor(shape.batch, shape.D, grad=case.op == "fwdbwd") if case.op != "build" else None
    bias = tensor(shape.n) if case.op != "build" else None
    g = torch.randn(shape.batch, shape.n, generator=gen).to(device=device, dtype=dtype)
    fns = _thunks(rec, shape, case.op, x, w, bias, g, case.backend, dense=True)

    def reference():
        x64, w64, b64 = (None if t is None else t.detach().double().requires_grad_(t.requires_grad)
                         for t in (x, w, bias))
        return _thunks(rec, shape, case.op, x64, w64, b64, g.double(), "torch", dense=False)["tinybig"]()
    return fns, reference


def finite(v: float) -> float | None:
    """``v``, or None for inf (a wrong shape or NaN), which JSON cannot hold."""
    return v if math.isfinite(v) else None


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def tolerance_used(actual, expected, dtype: torch.dtype) -> float:
    """Largest |actual - expected| as a fraction of the dtype's tolerance (> 1: wrong; inf: shape or NaN)."""
    tol = TOL[dtype]
    actual, expected = _as_tuple(actual), _as_tuple(expected)
    if len(actual) != len(expected):
        return math.inf
    worst = 0.0
    for a, e in zip(actual, expected):
        if tuple(a.shape) != tuple(e.shape):
            return math.inf
        if not e.numel():
            continue
        scale = max(1.0, e.abs().max().item())
        ratio = (a.double() - e).abs() / (tol["atol"] * scale + tol["rtol"] * e.abs())
        worst = max(worst, torch.nan_to_num(ratio, nan=math.inf).max().item())
    return worst


# ---- timing ------------------------------------------------------------------------------------
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


class TooSlow(Exception):
    """A case too slow to time in this mode."""


def time_interleaved(fns: dict, device: torch.device, mode: Mode) -> dict:
    """Median seconds per call of each callable, timed in interleaved rounds (A B C A B C ...).

    One warmup call each sizes the run: calls shorter than 1 ms are looped so each sample
    is about 1 ms, and the number of rounds fills ``mode.budget_s``. Raises TooSlow when a
    warm call takes longer than ``mode.max_call_s``.
    """
    warm = {name: _once(fn, device) for name, fn in fns.items()}
    slowest = max(warm.values())
    if slowest > mode.max_call_s:
        raise TooSlow(f"one warm call takes {slowest:.1f} s (limit {mode.max_call_s:g} s in this mode)")
    inner = {name: max(1, int(1e-3 / max(t, 1e-7))) for name, t in warm.items()}
    per_round = sum(warm[k] * inner[k] for k in fns)
    reps = int(min(mode.max_reps, max(mode.min_reps, mode.budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_once(fn, device, inner[name]))
    return {name: statistics.median(s) for name, s in samples.items()} | {"reps": reps}


def traffic(case: Case, dtype: torch.dtype) -> tuple[float, float | None]:
    """(bytes, flops) of a case: the least memory traffic (each input read once, each output
    written once), and the FLOPs of the dense GEMM it replaces (None for build)."""
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


# ---- cold calls ---------------------------------------------------------------------------------
# Functions whose frozen matrices are regenerated from the seed: their first call in a process pays
# for what a cache keeps later, so they are also timed cold.
COLD_FUNCTIONS = ("masking", "random_matrix_adaption", "random_matrix_hypernet", "hypernet")


def time_cold(case: Case, dtype: torch.dtype, device: torch.device, which: str, timeout_s: float = 600) -> float:
    """Seconds of the first call of ``which`` ('candidate' or 'tinybig') in a fresh Python process
    (inputs made before the clock starts)."""
    code = ("import sys, time, torch; from tinyrecon import benchmark as tb; "
            "case = tb.Case(*sys.argv[1:5]); dt = getattr(torch, sys.argv[5]); dev = torch.device(sys.argv[6]); "
            "fn = tb.prepare(case, dt, dev)[0][sys.argv[7]]; tb.synchronize(dev); t = time.perf_counter(); fn(); "
            "tb.synchronize(dev); print(time.perf_counter() - t)")
    args = [case.function, case.shape, case.op, case.backend, str(dtype).replace("torch.", ""), str(device), which]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
        raise RuntimeError(f"cold {which} call failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def generator_throughput(numel: int = 1 << 23) -> dict:
    """Numbers per second per core of the CPU library's Philox (one thread; uniform and normal),
    and of a memcpy of the same float32 bytes, for scale; {} without the library."""
    from . import cpu_lib
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


# ---- running -----------------------------------------------------------------------------------
def run_case(case: Case, dtype: torch.dtype, device: torch.device, mode: Mode = QUICK,
             copy_gbps: float | None = None) -> dict:
    """Check then time one case; returns its result record (a dict, JSON-ready)."""
    shape = SHAPES[case.shape]
    res = dict(asdict(case), family=FAMILY[case.function], n=shape.n, D=shape.D, batch=shape.batch,
               dtype=str(dtype).replace("torch.", ""), status="ok", reason="", ms=None, ms_tinybig=None,
               ms_dense=None, x_tinybig=None, x_dense=None, reps=None, tol_used=None, tol_tinybig=None,
               gbps=None, tflops=None, pct_copy=None, cold_ms=None, cold_ms_tinybig=None)
    reason = skip_reason(case, device, dtype)
    if reason:
        return res | dict(status="skipped", reason=reason)
    try:
        fns, reference = prepare(case, dtype, device)
        expected = reference()
        used = tolerance_used(fns["candidate"](), expected, dtype)
        res["tol_used"] = finite(used)
        if not used <= 1.0:
            # Half-precision gradients through a chain of ops (e.g. dw of the hypernets) can miss the
            # one-rounding tolerance in tinyBIG's algorithm too: then no worse than twice its error passes.
            base = tolerance_used(fns["tinybig"](), expected, dtype)
            res["tol_tinybig"] = finite(base)
            if not used <= 2 * base < math.inf:
                return res | dict(status="wrong", reason=f"differs from the float64 torch reference by {used:.3g}x "
                                  f"the {res['dtype']} tolerance (tinyBIG's algorithm in {res['dtype']}: "
                                  f"{base:.3g}x); not timed")
        del fns, reference, expected   # the cold calls' processes need the memory
        if case.function in COLD_FUNCTIONS and case.op != "build":
            res["cold_ms"], res["cold_ms_tinybig"] = (1e3 * time_cold(case, dtype, device, w)
                                                      for w in ("candidate", "tinybig"))
        fns = prepare(case, dtype, device)[0]
        t = time_interleaved(fns, device, mode)
    except TooSlow as e:
        return res | dict(status="skipped", reason=str(e))
    except Exception as e:  # a failing kernel is a result, not the end of the run
        return res | dict(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    res.update(ms=1e3 * t["candidate"], ms_tinybig=1e3 * t["tinybig"], reps=t["reps"],
               x_tinybig=t["tinybig"] / t["candidate"])
    if "dense" in t:
        res.update(ms_dense=1e3 * t["dense"], x_dense=t["dense"] / t["candidate"])
    nbytes, flops = traffic(case, dtype)
    res["gbps"] = nbytes / t["candidate"] / 1e9
    res["tflops"] = flops / t["candidate"] / 1e12 if flops else None
    res["pct_copy"] = 100 * res["gbps"] / copy_gbps if copy_gbps else None
    return res


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def metadata(device: torch.device, dtype: torch.dtype, quick: bool, copy_gbps: float | None,
             load=(None, None)) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg": list(load),
            "device": device_name(device), "device_type": device.type, "cpu": cpu_name(),
            "dtype": str(dtype).replace("torch.", ""), "mode": "quick" if quick else "full",
            "copy_gbps": copy_gbps, "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            **versions()}


def run(cases, dtype=torch.float32, device=None, quick=True, progress=None) -> dict:
    """Run cases and return ``{"meta": ..., "results": [...]}`` (what results.json holds).

    ``progress``: wraps the case iterable (e.g. a tqdm bar); called with the list of cases.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = QUICK if quick else FULL
    copy_gbps = copy_bandwidth(device) if device.type == "cuda" else None
    load = load_average()
    results = [run_case(case, dtype, device, mode, copy_gbps) for case in (progress(cases) if progress else cases)]
    return {"meta": metadata(device, dtype, quick, copy_gbps, (load, load_average())), "results": results}


# ---- reporting ---------------------------------------------------------------------------------
def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def table(data: dict, markdown: bool = False) -> str:
    """The results as a table (plain text, or markdown), skipped cases listed below it by reason."""
    gpu = data["meta"]["device_type"] == "cuda"
    head = ["function", "shape", "op", "backend", "ms", "x vs tinyBIG", "x vs dense", "cold ms", "cold x vs tinyBIG"]
    head += ["GB/s", "TFLOP/s", "% copy"] if gpu else []
    rows, skipped = [], {}
    for r in data["results"]:
        if r["status"] == "skipped":
            skipped.setdefault(r["reason"], []).append(r)
            continue
        if r["status"] == "ok":
            cold = r.get("cold_ms")
            cells = [_fmt(r["ms"]), _fmt(r["x_tinybig"]), _fmt(r["x_dense"]), _fmt(cold),
                     _fmt(cold and r["cold_ms_tinybig"] / cold)]
            cells += [_fmt(r["gbps"]), _fmt(r["tflops"]), _fmt(r["pct_copy"])] if gpu else []
        else:
            cells = [r["status"].upper() + ": " + r["reason"]] + [""] * (len(head) - 5)
        rows.append([r["function"], r["shape"], r["op"], r["backend"], *cells])
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(head, *[row[:len(head)] for row in rows])]
        for row in [head, *rows]:
            lines.append("  ".join(str(c).ljust(wd) for c, wd in zip(row, widths)).rstrip())
    if skipped:
        lines += ["", f"skipped ({sum(map(len, skipped.values()))} cases):"]
        ran = {}   # function -> the shapes it was asked for
        for r in data["results"]:
            ran.setdefault(r["function"], {})[r["shape"]] = None
        for reason, rs in skipped.items():
            shapes = {}
            for r in rs:
                shapes.setdefault(r["function"], {})[r["shape"]] = None
            where = ", ".join(f if list(s) == list(ran[f]) else f"{f} ({', '.join(s)})" for f, s in shapes.items())
            lines.append(f"{'- ' if markdown else '  '}{reason} ({len(rs)} case{'s' * (len(rs) > 1)}): {where}")
    return "\n".join(lines)


def header(meta: dict) -> str:
    interp = " | Triton interpreter: its timings mean nothing" if meta.get("triton_interpret") else ""
    load = meta.get("load_avg") or [None]
    busy = f" | load average {load[0]:.1f} -> {load[-1]:.1f}" if None not in load else ""
    return (f"{meta['date']} | {meta['device']} | torch {meta['torch']}, triton {meta['triton']}, "
            f"tinyrecon {meta['tinyrecon']} | {meta['dtype']}, {meta['mode']} mode{busy}{interp}")


def plot(data: dict, path) -> None:
    """Speedup vs tinyBIG's algorithm per function and backend, one panel per op (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if r["status"] == "ok"]
    ops = [op for op in OPS if any(r["op"] == op for r in ok)] or ["fwd"]
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.2 * len(ops) + 0.8), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        rows = [r for r in ok if r["op"] == op]
        funcs = list(dict.fromkeys(r["function"] for r in rows))
        series = list(dict.fromkeys((r["shape"], r["backend"]) for r in rows))
        width = 0.8 / max(1, len(series))
        for k, (shape, backend) in enumerate(series):
            xs, ys = [], []
            for i, f in enumerate(funcs):
                for r in rows:
                    if (r["function"], r["shape"], r["backend"]) == (f, shape, backend):
                        xs.append(i + (k - (len(series) - 1) / 2) * width)
                        ys.append(r["x_tinybig"])
            # bars grow from 1 (no change): up for speedups, down for slowdowns
            ax.bar(xs, [y - 1 for y in ys], width, bottom=1, label=f"{shape} / {backend}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{op}: x vs tinyBIG")
        ax.set_xticks(range(len(funcs)))
        ax.set_xticklabels(funcs, rotation=20, ha="right", fontsize=8)
        if series:
            ax.legend(fontsize=7, ncol=min(4, len(series)))
        else:
            ax.text(0.5, 0.5, "no timed cases", ha="center", transform=ax.transAxes)
    fig.suptitle("speedup vs tinyBIG's algorithm (build W, then F.linear)\n" + header(data["meta"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(data: dict, out_dir) -> Path:
    """Write results.json, results.md (header + markdown table) and speedup.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "results.md").write_text(f"{header(data['meta'])}\n\n{table(data, markdown=True)}\n")
    plot(data, out / "speedup.png")
    return out


def load(path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "results" not in data:
        raise ValueError(f"{path} is not a tinyrecon bench results.json (needs 'meta' and 'results')")
    return data


def compare(a: dict, b: dict) -> list[dict]:
    """Per case present in either run: ms in A and B and B's speedup over A (A ms / B ms)."""
    def key(r):
        return (r["function"], r["shape"], r["op"], r["backend"], r["dtype"])
    ra, rb = {key(r): r for r in a["results"]}, {key(r): r for r in b["results"]}
    rows = []
    for k in list(ra) + [k for k in rb if k not in ra]:
        x, y = ra.get(k), rb.get(k)
        ms_a, ms_b = x and x["ms"], y and y["ms"]
        rows.append(dict(zip(("function", "shape", "op", "backend", "dtype"), k), ms_a=ms_a, ms_b=ms_b,
                         speedup=ms_a / ms_b if ms_a and ms_b else None,
                         status_a=x["status"] if x else "absent", status_b=y["status"] if y else "absent"))
    return rows


def compare_table(rows: list[dict]) -> str:
    """The rows of :func:`compare` as text; cases timed in neither run with nothing new to say
    (skipped or absent on both sides, or the same failure) are counted, not listed."""
    head = ["function", "shape", "op", "backend", "dtype", "A ms", "B ms", "B vs A"]
    body = []
    same = [r for r in rows if r["status_a"] == r["status_b"] != "ok"
            or {r["status_a"], r["status_b"]} <= {"skipped", "absent"}]
    for r in rows:
        if r in same:
            continue
        note = (f"{_fmt(r['speedup'])}x" if r["speedup"] else f"{r['status_a']} -> {r['status_b']}")
        body.append([r["function"], r["shape"], r["op"], r["backend"], r["dtype"], _fmt(r["ms_a"]),
                     _fmt(r["ms_b"]), note])
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join(lines + ([f"({len(same)} cases timed in neither run not shown)"] if same else []))
