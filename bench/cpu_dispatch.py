"""Where the CPU library's pass over x beats torch's GEMMs: the data behind ``cpu_ops._worth_it``.

    python bench/cpu_dispatch.py [--rounds 15]

For each pass a structured apply makes at the benchmark's shapes (and sizes between them), the
kernel (``cpu_ops.KERNEL_X_OPS``) and torch's GEMMs (``base.TORCH_X_OPS``) are timed interleaved
on the same x, best of ``rounds`` (the least disturbed run on a shared machine); ratio > 1: the
kernel is faster. Columns: x (N, M, K), the ranks of the U and V halves asked for.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from tinyrecon import cpu_ops
from tinyrecon.base import TORCH_X_OPS

# (what, N, M, K, RA, RB): U with RA rows and/or V with RB rows (0: not asked for).
CASES = [
    ("kron fwd, mnist (dual_lphm)", 64, 784, 785, 5, 0),
    ("kron train, mnist (dual_lphm)", 64, 784, 785, 5, 5),
    ("kron train, mnist (hm)", 64, 784, 785, 8, 8),
    ("lorr fwd, mnist", 1, 64, 615440, 0, 5),
    ("lorr bwd, mnist", 1, 64, 615440, 5, 0),
    ("kron fwd, tall (dual_lphm)", 64, 256, 256, 5, 0),
    ("kron train, tall (dual_lphm)", 64, 256, 256, 5, 5),
    ("kron train, tall (hm)", 64, 256, 256, 8, 8),
    ("lorr fwd, tall", 1, 64, 65536, 0, 5),
    ("lorr bwd, tall", 1, 64, 65536, 5, 0),
    ("dup_pad fwd, tall (sum of halves)", 64, 2, 32768, 1, 0),
    ("kron fwd, 1/4 tall", 16, 256, 256, 5, 0),
    ("kron train, 1/4 tall", 16, 256, 256, 5, 5),
    ("lorr fwd, 1/4 tall", 1, 16, 65536, 0, 5),
    ("lorr fwd, square4096", 1, 64, 4096, 0, 5),
    ("kron train, square4096 (hm)", 64, 64, 64, 8, 8),
    ("kron fwd, rank 16", 64, 256, 256, 16, 0),
    ("kron train, rank 16+16", 64, 256, 256, 16, 16),
    ("lorr fwd, rank 32, tall", 1, 64, 65536, 0, 32),
    ("lorr fwd, rank 32, mnist", 1, 64, 615440, 0, 32),
    ("duplicated_diagonal_padding fwd, mnist", 1, 128, 307720, 0, 32),
    ("duplicated_diagonal_padding dB, mnist", 1, 128, 307720, 32, 0),
    ("lorr dB, rank 32, tall", 1, 64, 65536, 32, 0),
    ("duplicated_padding V, mnist", 64, 2, 307720, 0, 32),
    ("duplicated_padding V, tall", 64, 2, 32768, 0, 32),
    ("kron train, 1M elements in 64 batches of 128 x 128 (hm)", 64, 128, 128, 8, 8),
    ("kron fwd, 1M elements in 64 batches of 128 x 128", 64, 128, 128, 5, 0),
]


def best(fn, rounds: int) -> float:
    fn()
    out = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n")
    print("| pass | N, M, K | RA, RB | kernel ms | torch ms | torch / kernel |\n|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for what, N, M, K, RA, RB in CASES:
        x = torch.randn(N, M, K, generator=g)
        L, R = torch.randn(max(RA, 1), M, generator=g), torch.randn(max(RB, 1), K, generator=g)
        fns = {"kernel": lambda: cpu_ops.KERNEL_X_OPS.passes(x, L, R, RA > 0, RB > 0),
               "torch": lambda: TORCH_X_OPS.passes(x, L, R, RA > 0, RB > 0)}
        t = {k: float("inf") for k in fns}
        for _ in range(3):   # interleaved: each gets its best of several disturbed stretches
            for k, fn in fns.items():
                t[k] = min(t[k], best(fn, max(1, a.rounds // 3)))
        print(f"| {what} | {N}, {M}, {K} | {RA}, {RB} | {1e3 * t['kernel']:.3f} | {1e3 * t['torch']:.3f} | "
              f"{t['torch'] / t['kernel']:.2f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
