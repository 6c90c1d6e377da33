"""CPU structured applies against the memory floor: one read of x (``x.sum()``), timed in the same run.

    python bench/cpu_floor.py [--shape mnist|tall|small] [--functions hm,lorr] [--backends cpu,torch]
                              [--layouts kron,tinybig] [--ops fwd,train] [--dtype float32|bfloat16]
                              [--rounds 15] [--batch 64] [--own-threads] [--first] [--json out.json]

Per (function, layout, op, backend) the median ms and its ratio to the floor; at the small shape the
floor column is a dense F.linear of the same n x D (fwd, or its train: grads of weight and bias).
Everything of one table is timed interleaved (A B C ... A B C ...), each sample looped to >= 2 ms,
so that a shared, noisy machine slows all alike. ``train``: y = apply(x), then grads of w and
bias (x is data and does not require grad), as in an RPN's first layer, of the scalar loss
``(y * g).sum()`` (``benchmark.check.step_grads``, as ``tinyrecon bench``). ``--first``: instead,
``bench/first_call.py``'s table: each function's first call in a fresh process against its warm calls
(median of 5), the first of ``--backends``, with the benchmark's dense layer of the same size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import tinyrecon as tr
from tinyrecon.benchmark.cases import SHAPES
from tinyrecon.benchmark.check import step_grads

import first_call   # bench/, next to this file

LAYOUTED = ("hm", "lphm", "dual_lphm", "duplicated_padding")


def make(name: str, layout: str):
    kw = dict(tr.lookup(name).bench_args)
    if name in LAYOUTED:
        kw["layout"] = layout
    return tr.reconciliation(name, **kw)


def thunk(rec, x, n, op: str, backend: str, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(rec.calculate_l(n, x.shape[1]), generator=gen).to(dtype).requires_grad_(op == "train")
    bias = torch.randn(n, generator=gen).to(dtype).requires_grad_(op == "train")
    g = torch.randn(x.shape[0], n, generator=gen).to(dtype)
    if op == "fwd":
        return torch.no_grad()(lambda: rec.apply(x, w, n=n, bias=bias, backend=backend))
    return lambda: step_grads(rec.apply(x, w, n=n, bias=bias, backend=backend), (w, bias), g)


def dense_thunk(x, n, op: str, dtype):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(n, x.shape[1], generator=gen).to(dtype).requires_grad_(op == "train")
    b = torch.randn(n, generator=gen).to(dtype).requires_grad_(op == "train")
    g = torch.randn(x.shape[0], n, generator=gen).to(dtype)
    if op == "fwd":
        return torch.no_grad()(lambda: F.linear(x, W, b))
    return lambda: step_grads(F.linear(x, W, b), (W, b), g)


def own_threads(fn):
    """``fn`` with the CPU library on threads it starts itself (csrc/threads_cpu.cpp), in the same rounds."""
    from tinyrecon import cpu_lib
    lib = cpu_lib._load()[0]

    def run():
        lib.tinyrecon_cpu_use_openmp(None)
        try:
            return fn()
        finally:
            lib.tinyrecon_cpu_use_openmp(cpu_lib.torch_openmp())
    return run


def _sample(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each callable, over ``rounds`` interleaved rounds."""
    for fn in fns.values():   # warm up (first calls load, allocate, autotune)
        fn(), fn()
    inner = {k: max(1, int(2e-3 / max(_sample(fn, 1), 1e-7))) for k, fn in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(_sample(fn, inner[k]))
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="mnist", choices=SHAPES)
    ap.add_argument("--functions", default=",".join(first_call.FUNCTIONS))
    ap.add_argument("--backends", default="cpu,torch")
    ap.add_argument("--layouts", default="kron,tinybig")
    ap.add_argument("--ops", default="fwd,train")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, help="rows of x (default: the shape's batch)")
    ap.add_argument("--own-threads", action="store_true",
                    help="also time the cpu backend with the library on threads of its own, not torch's OpenMP team")
    ap.add_argument("--first", action="store_true", help="first call in a fresh process vs warm calls")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    s = SHAPES[a.shape]
    if a.batch:
        s = type(s)(s.name, s.n, s.D, a.batch)
    if a.first:
        print(f"# first calls, {a.shape} n={s.n} D={s.D} batch={s.batch} {a.dtype}; load average {os.getloadavg()[0]:.2f}\n")
        if a.batch:
            ap.error("--first times the shape's own batch (and each function's default layout)")
        return first_call.table(a.functions.split(","), a.ops.split(","), a.shape, a.backends.split(",")[0], a.dtype)
    dtype = getattr(torch, a.dtype)
    x32 = torch.randn(s.batch, s.D, generator=torch.Generator().manual_seed(0))
    x = x32.to(dtype)
    small = s.D * s.batch < (1 << 16)
    print(f"# {a.shape} n={s.n} D={s.D} batch={s.batch} {a.dtype}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    rows = []
    for op in a.ops.split(","):
        fns = {"floor": dense_thunk(x, s.n, op, dtype) if small else (lambda: x.sum())}
        for f in a.functions.split(","):
            for layout in (a.layouts.split(",") if f in LAYOUTED else ["kron"]):
                for b in a.backends.split(","):
                    fns[(f, layout, b)] = thunk(make(f, layout), x, s.n, op, b, dtype)
                    if a.own_threads and b == "cpu":
                        fns[(f, layout, "cpu, own threads")] = own_threads(fns[(f, layout, b)])
                    if dtype != torch.float32:   # the same apply on a float32 x, in the same rounds
                        fns[(f, layout, b + ", float32 x")] = thunk(make(f, layout), x32, s.n, op, b, torch.float32)
        t = interleaved(fns, a.rounds)
        floor = t.pop("floor")
        what = "dense F.linear" if small else "x.sum()"
        print(f"\n## {op}: floor ({what}) {1e3 * floor:.3f} ms\n")
        print("| function | layout | backend | ms | x floor |\n|---|---|---|---|---|")
        for (f, layout, b), v in t.items():
            print(f"| {f} | {layout} | {b} | {1e3 * v:.3f} | {v / floor:.2f} |")
            rows.append(dict(shape=a.shape, dtype=a.dtype, op=op, function=f, layout=layout, backend=b,
                             ms=1e3 * v, floor_ms=1e3 * floor, x_floor=v / floor))
        sys.stdout.flush()
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
