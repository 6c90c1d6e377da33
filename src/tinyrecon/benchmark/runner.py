"""Running: one case (check, then time) and a run of many, with the metadata of the machine."""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time

import torch

from . import check, timing
from .cases import FAMILY, SHAPES, Case, skip_reason, times_cold

RESULT_NONE = ("ms", "ms_tinybig", "ms_dense", "ms_floor", "x_tinybig", "x_dense", "over_floor", "reps", "tol_used",
               "tol_tinybig", "gbps", "tflops", "pct_copy", "cold_ms", "cold_ms_tinybig")


def run_case(case: Case, dtype: torch.dtype, device: torch.device, mode: timing.Mode = timing.QUICK,
             copy_gbps: float | None = None) -> dict:
    """Check then time one case; returns its result record (a dict, JSON-ready)."""
    start = time.perf_counter()
    res = _run_case(case, dtype, device, mode, copy_gbps)
    return res | {"wall_s": time.perf_counter() - start}


def _run_case(case, dtype, device, mode, copy_gbps) -> dict:
    shape = SHAPES[case.shape]
    res = dict(dataclasses.asdict(case), family=FAMILY[case.function], n=shape.n, D=shape.D, batch=shape.batch,
               dtype=str(dtype).replace("torch.", ""), status="ok", reason="") | dict.fromkeys(RESULT_NONE)
    reason = skip_reason(case, device, dtype)
    if reason:
        return res | dict(status="skipped", reason=reason)
    try:
        fns, reference = check.prepare(case, dtype, device)
        expected = reference()
        used = check.tolerance_used(fns["candidate"](), expected, dtype)
        res["tol_used"] = check.finite(used)
        if not used <= 1.0:
            # Half-precision gradients can miss the tolerance in tinyBIG's algorithm too: twice its error passes.
            base = check.tolerance_used(fns["tinybig"](), expected, dtype)
            res["tol_tinybig"] = check.finite(base)
            if not used <= 2 * base < math.inf:
                return res | dict(status="wrong", reason=f"differs from the float64 torch reference by {used:.3g}x "
                                  f"the {res['dtype']} tolerance (tinyBIG's algorithm in {res['dtype']}: "
                                  f"{base:.3g}x); not timed")
        del fns, reference, expected   # the cold calls' processes need the memory
        if mode.cold and times_cold(case):
            res["cold_ms"], res["cold_ms_tinybig"] = (1e3 * timing.first_call(case, dtype, device, w)["first_s"]
                                                      for w in ("candidate", "tinybig"))
        fns = check.prepare(case, dtype, device)[0]
        t = timing.time_interleaved(fns, device, mode)
    except Exception as e:  # a failing kernel is a result, not the end of the run
        return res | dict(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    res.update(ms=1e3 * t["candidate"], ms_tinybig=1e3 * t["tinybig"], reps=t["reps"],
               x_tinybig=t["tinybig"] / t["candidate"])
    if "dense" in t:
        res.update(ms_dense=1e3 * t["dense"], x_dense=t["dense"] / t["candidate"])
    if "floor" in t:
        res.update(ms_floor=1e3 * t["floor"], over_floor=t["candidate"] / t["floor"])
    nbytes, flops = timing.traffic(case, dtype)
    res["gbps"] = nbytes / t["candidate"] / 1e9
    res["tflops"] = flops / t["candidate"] / 1e12 if flops else None
    res["pct_copy"] = 100 * res["gbps"] / copy_gbps if copy_gbps else None
    return res


def metadata(device: torch.device, dtypes, quick: bool, copy_gbps: float | None, load=(None, None),
             cold: bool = False) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_avg": list(load),
            "device": timing.device_name(device), "device_type": device.type, "cpu": timing.cpu_name(),
            "dtype": ",".join(str(d).replace("torch.", "") for d in dtypes), "mode": "quick" if quick else "full",
            "cold": cold, "copy_gbps": copy_gbps,
            "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), **timing.versions()}


def run(cases, dtype=torch.float32, device=None, quick=True, progress=None, cold=None) -> dict:
    """Run cases and return ``{"meta": ..., "results": [...]}`` (what results.json holds). ``dtype``:
    one or several (each case runs in each); ``cold``: time first calls in a fresh process (None: the
    mode's default); ``progress`` wraps the iterable of ``(case, dtype)`` pairs."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [dtype] if isinstance(dtype, torch.dtype) else list(dtype)
    mode = timing.QUICK if quick else timing.FULL
    if cold is not None:
        mode = dataclasses.replace(mode, cold=cold)
    copy_gbps = timing.copy_bandwidth(device) if device.type == "cuda" else None
    load = timing.load_average()
    items = [(case, dt) for case in cases for dt in dtypes]
    results = [run_case(case, dt, device, mode, copy_gbps) for case, dt in (progress(items) if progress else items)]
    meta = metadata(device, dtypes, quick, copy_gbps, (load, timing.load_average()), mode.cold)
    return {"meta": meta, "results": results}
