"""Tiny shape (n=6, D=12, batch 64, fp32): each structured apply (default backend and layout)
against the benchmark's dense column (an nn.Linear of the same size) and one F.linear, fwd (no_grad)
and train (grads of w and bias), interleaved in one run, medians. ``structured`` is the same apply
with the small-W path off (``base.BUILD_BELOW = 0``): what every call ran before it.

    python bench/tiny_overhead.py [--repeat 3] [--threads N]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from tinyrecon import base
from tinyrecon.benchmark import check, timing
from tinyrecon.benchmark.cases import Case

FUNCS = ("hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding",
         "duplicated_diagonal_padding")


def structured(fn):
    def run():
        keep, base.BUILD_BELOW = base.BUILD_BELOW, 0
        try:
            return fn()
        finally:
            base.BUILD_BELOW = keep
    return run


def f_linear(op, x, n):
    W = torch.randn(n, x.shape[-1], requires_grad=op == "train")
    b = torch.randn(n, requires_grad=op == "train")
    if op == "fwd":
        return torch.no_grad()(lambda: F.linear(x, W, b))

    def train():
        y = F.linear(x, W, b)
        return (y.detach(), *torch.autograd.grad(y, (W, b), torch.ones_like(y)))
    return train


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--functions", nargs="*", default=FUNCS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = timing.Mode(budget_s=0.3, min_reps=9, max_reps=60, max_call_s=5.0)
    dev = torch.device("cpu")
    cols = ("candidate", "structured", "dense", "F.linear")
    print(f"torch threads {torch.get_num_threads()}; us per call, median of {args.repeat} interleaved runs")
    print(f"{'function':28s} {'op':5s} " + " ".join(f"{c:>10s}" for c in cols) + "  cand/dense cand/F.linear before/dense")
    for f in args.functions:
        for op in ("fwd", "train"):
            res = {c: [] for c in cols}
            for _ in range(args.repeat):
                fns = check.prepare(Case(f, "tiny", op, "auto"), torch.float32, dev)[0]
                x = torch.randn(64, 12)
                fns = {"candidate": fns["candidate"], "structured": structured(fns["candidate"]),
                       "dense": fns["dense"], "F.linear": f_linear(op, x, 6)}
                t = timing.time_interleaved(fns, dev, mode)
                for c in cols:
                    res[c].append(t[c])
            med = {c: statistics.median(v) * 1e6 for c, v in res.items()}
            print(f"{f:28s} {op:5s} " + " ".join(f"{med[c]:10.1f}" for c in cols)
                  + f"  {med['candidate'] / med['dense']:10.2f} {med['candidate'] / med['F.linear']:12.2f}"
                  f" {med['structured'] / med['dense']:12.2f}")


if __name__ == "__main__":
    main()
