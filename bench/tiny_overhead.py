"""Tiny shape (n=6, D=12, batch 64, fp32): each structured apply (default backend and layout)
against the benchmark's dense column (an nn.Linear of the same size) and one F.linear, fwd (no_grad)
and train (grads of w and bias), interleaved in one run, medians. ``structured`` is the same apply
with the small-W path off (``base.BUILD_BELOW = 0``); ``no-keep`` with the W it keeps between no-grad
calls off (``base.CACHE_SMALL_W = False``: W built every call, as train does); ``Function`` is one
F.linear inside a minimal ``torch.autograd.Function`` (a two-op backward): the least a train path
with its own Python backward costs; ``Function+C`` the same with a fresh W and a fresh gradient each
filled by one ctypes call (libc's memcpy): about what the CPU backend's fused small-W step
(``cpu_ops.small_linear``, whose arithmetic here is a few thousand FMAs) adds to it.

    python bench/tiny_overhead.py [--repeat 3] [--threads N] [--clock thread]

``--clock thread`` times with the calling thread's CPU time (``time.thread_time``, one torch thread)
in the same interleaved rounds, instead of the wall clock of ``timing.time_interleaved``: on a
shared machine a wall-clock sample also holds the time other processes ran; this one only the
call's own work.
"""
import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

from tinyrecon import base
from tinyrecon.benchmark import check, timing
from tinyrecon.benchmark.cases import Case

FUNCS = ("hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding",
         "duplicated_diagonal_padding")


def patched(fn, name, value):
    """``fn`` run with ``base.<name>`` set to ``value``."""
    def run():
        keep = getattr(base, name)
        setattr(base, name, value)
        try:
            return fn()
        finally:
            setattr(base, name, keep)
    return run


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x)
        return F.linear(x, W, b)

    @staticmethod
    def backward(ctx, dy):
        x, = ctx.saved_tensors
        return None, dy.T @ x, dy.sum(0)


_memcpy = ctypes.CDLL(None).memcpy
_memcpy.argtypes, _memcpy.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p


def _c_fill(src):
    out = torch.empty_like(src)
    _memcpy(out.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    return out


class _LinearC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b):
        ctx.save_for_backward(x)
        return F.linear(x, _c_fill(W), b)

    @staticmethod
    def backward(ctx, dy):
        x, = ctx.saved_tensors
        return None, _c_fill(dy.T @ x), dy.sum(0)


def f_linear(op, x, n, linear=F.linear):
    W = torch.randn(n, x.shape[-1], requires_grad=op == "train")
    b = torch.randn(n, requires_grad=op == "train")
    if op == "fwd":
        return torch.no_grad()(lambda: linear(x, W, b))

    g = torch.randn(x.shape[0], n)

    def train():   # the step the candidate and dense take (check.step_grads), so the columns compare
        y = linear(x, W, b)
        return (y.detach(), *check.step_grads(y, (W, b), g))
    return train


def time_thread(fns: dict, rounds: int = 15, calls: int = 200) -> dict:
    """Median thread CPU seconds per call of each callable, in interleaved rounds of ``calls`` calls."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.thread_time() - t0) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--functions", nargs="*", default=FUNCS)
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    args = ap.parse_args()
    if args.clock == "thread" and args.threads not in (None, 1):
        ap.error("--clock thread counts the calling thread only: run it with one torch thread")
    if args.threads or args.clock == "thread":
        torch.set_num_threads(args.threads or 1)
    mode = timing.Mode(budget_s=0.3, min_reps=9, max_reps=60, max_call_s=5.0)
    dev = torch.device("cpu")
    cols = ("candidate", "no-keep", "structured", "dense", "F.linear", "Function", "Function+C")
    print(f"torch threads {torch.get_num_threads()}; {args.clock} clock; us per call, median of {args.repeat} interleaved runs")
    print(f"{'function':28s} {'op':5s} " + " ".join(f"{c:>10s}" for c in cols)
          + "  cand/dense no-keep/dense structured/dense Function/dense Function+C/dense")
    for f in args.functions:
        for op in ("fwd", "train"):
            res = {c: [] for c in cols}
            for _ in range(args.repeat):
                fns = check.prepare(Case(f, "tiny", op, "auto"), torch.float32, dev)[0]
                x = torch.randn(64, 12)
                fns = {"candidate": fns["candidate"], "no-keep": patched(fns["candidate"], "CACHE_SMALL_W", False),
                       "structured": patched(fns["candidate"], "BUILD_BELOW", 0), "dense": fns["dense"],
                       "F.linear": f_linear(op, x, 6), "Function": f_linear(op, x, 6, _Linear.apply),
                       "Function+C": f_linear(op, x, 6, _LinearC.apply)}
                t = timing.time_interleaved(fns, dev, mode) if args.clock == "wall" else time_thread(fns)
                for c in cols:
                    res[c].append(t[c])
            med = {c: statistics.median(v) * 1e6 for c, v in res.items()}
            print(f"{f:28s} {op:5s} " + " ".join(f"{med[c]:10.1f}" for c in cols) + "  "
                  + " ".join(f"{med[c] / med['dense']:{len(c) + 6}.2f}" for c in ("candidate", "no-keep", "structured", "Function",
                                                                                "Function+C")))


if __name__ == "__main__":
    main()
