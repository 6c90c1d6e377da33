"""First call in a fresh process against warm calls (the median of the next 5), per structured function
and a dense ``nn.Linear`` of the same size: fwd (no_grad) and train (grads of w and bias of the scalar
loss, ``benchmark.check.step_grads``), the very callables ``tinyrecon bench`` times warm
(``benchmark.check.prepare``), one fresh process per row; and what the first call imported (heavy:
torch._dynamo, sympy).

    python bench/first_call.py [--functions hm,lorr] [--ops fwd,train] [--shape mnist] [--backend cpu]
                               [--dtype float32]
"""
from __future__ import annotations

import argparse
import os

import torch

from tinyrecon.benchmark import timing
from tinyrecon.benchmark.cases import SHAPES, Case

FUNCTIONS = ("hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding",
             "duplicated_diagonal_padding")
HEAVY = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes")


def table(functions, ops, shape: str = "mnist", backend: str = "cpu", dtype: str = "float32", warm: int = 5) -> None:
    """Print the first / warm table (markdown); the dense row is the layer ``check.prepare`` times as 'dense'."""
    print("| function | op | first ms | warm ms | first / warm | modules the first call imported |\n"
          "|---|---|---|---|---|---|")
    for op in ops:
        for f in [*functions, "dense"]:
            case = Case(functions[0] if f == "dense" else f, shape, op, backend)
            r = timing.first_call(case, getattr(torch, dtype), torch.device("cpu"),
                                  "dense" if f == "dense" else "candidate", warm=warm)
            heavy = [m for m in HEAVY if m in r["imported"]]
            print(f"| {f} | {op} | {1e3 * r['first_s']:.1f} | {1e3 * r['warm_s']:.1f} | "
                  f"{r['first_s'] / r['warm_s']:.2f} | {len(r['imported'])}{' incl. ' + ', '.join(heavy) if heavy else ''} |",
                  flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--functions", default=",".join(FUNCTIONS))
    ap.add_argument("--ops", default="fwd,train")
    ap.add_argument("--shape", default="mnist", choices=SHAPES)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    a = ap.parse_args(argv)
    s = SHAPES[a.shape]
    print(f"# first calls, {a.shape} n={s.n} D={s.D} batch={s.batch} {a.dtype}, backend {a.backend}; "
          f"load average {os.getloadavg()[0]:.2f}\n")
    table(a.functions.split(","), a.ops.split(","), a.shape, a.backend, a.dtype)


if __name__ == "__main__":
    main()
