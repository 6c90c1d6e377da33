"""What bounds random_matrix_hypernet's speed-up at the MNIST layer: its GEMMs against tinyBIG's algorithm.

    python bench/hypernet_floor.py [--rounds 7] [--r 5]

W = reshape(c @ T^T, n, D) with T (n*D x r) frozen and c (1 x r) from w, dense: any algorithm's
forward makes the GEMM x @ W^T (N*n*D multiply-adds) and reads T (or regenerates it) once; a training
step makes a second GEMM of the same size (dW = g^T @ x, contracted with T as it is formed) and reads
T again. Timed interleaved in one process: tinyrecon (the default backend), tinyBIG's algorithm
(build W, one F.linear), torch's GEMM with W given, the gradient's GEMM as torch makes it (it also
writes dW, which a fused pass does not), and one read of T's bytes. The floors are the GEMM (twice
for train) plus the reads; the last columns are the most any implementation could gain over tinyBIG's
algorithm on this machine (tinyBIG / floor).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import tinyrecon as tr

from cpu_floor import interleaved   # bench/, next to this file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--r", type=int, default=5)
    a = ap.parse_args()
    n, D, N = 64, 615440, 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen)
    rec = tr.reconciliation("random_matrix_hypernet", r=a.r, seed=0)
    w = torch.randn(rec.calculate_l(n, D), generator=gen, requires_grad=True)
    bias = torch.randn(n, generator=gen, requires_grad=True)
    g = torch.randn(N, n, generator=gen)
    with torch.no_grad():
        W = rec(n=n, D=D, w=w, backend="torch")
    T = torch.randn(n * D * a.r // 64, 64, generator=gen)   # T's bytes

    def step(forward):
        return lambda: torch.autograd.grad((forward() * g).sum(), (w, bias))

    fwd = {"tinyrecon": lambda: rec.apply(x, w, n=n, bias=bias),
           "tinyBIG": lambda: F.linear(x, rec(n=n, D=D, w=w, backend="torch"), bias)}
    fns = {f"{k} fwd": torch.no_grad()(f) for k, f in fwd.items()}
    fns |= {f"{k} train": step(f) for k, f in fwd.items()}
    fns |= {"GEMM x @ W^T": torch.no_grad()(lambda: torch.addmm(bias, x, W.T)),
            "GEMM g^T @ x": torch.no_grad()(lambda: g.T @ x),
            "read T": torch.no_grad()(lambda: T.sum())}
    ms = {k: v * 1e3 for k, v in interleaved(fns, a.rounds).items()}
    print(f"# random_matrix_hypernet r={a.r}, n={n} D={D} batch={N} float32; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}, {a.rounds} rounds\n")
    print("| what | ms |\n|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |")
    floor_fwd = ms["GEMM x @ W^T"] + ms["read T"]
    floor_train = 2 * floor_fwd
    print(f"\nfloor fwd (GEMM + one read of T) {floor_fwd:.1f} ms, train (two GEMMs + two reads) {floor_train:.1f} ms")
    for op, floor in (("fwd", floor_fwd), ("train", floor_train)):
        print(f"{op}: tinyBIG / tinyrecon {ms[f'tinyBIG {op}'] / ms[f'tinyrecon {op}']:.2f}x, "
              f"most possible tinyBIG / floor {ms[f'tinyBIG {op}'] / floor:.2f}x")


if __name__ == "__main__":
    main()
