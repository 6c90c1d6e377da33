"""First call in a fresh process against a warm one, at the MNIST shape (n=64, D=615,440, batch 64,
fp32), fwd (no_grad) and train (grads of w and bias), per structured function; and what the first
call imports (torch._dynamo, sympy). One fresh process per (function, op).

    python bench/first_call.py [--functions ...] [--ops fwd train] [--preimport]
"""
import argparse
import json
import subprocess
import sys

CODE = r"""
import sys, time, torch
import tinyrecon as tr
from tinyrecon.benchmark.cases import make_function
fn, op = sys.argv[1], sys.argv[2]
if sys.argv[3] == "1":   # what torch.autograd.grad imports on its first call with a grad_output tensor
    import torch.fx.experimental.symbolic_shapes
n, D, N = 64, 615440, 64
g = torch.Generator().manual_seed(0)
x = torch.randn(N, D, generator=g)
if fn == "dense":
    lin = torch.nn.Linear(D, n)
    call = lambda: lin(x)
    params = (lin.weight, lin.bias)
else:
    rec = make_function(fn)
    w = torch.randn(rec.calculate_l(n, D), generator=g, requires_grad=op == "train")
    b = torch.randn(n, generator=g, requires_grad=op == "train")
    call = lambda: rec.apply(x, w, n=n, bias=b)
    params = (w, b)
def step():
    if op == "fwd":
        with torch.no_grad():
            return call()
    y = call()
    return torch.autograd.grad(y, params, torch.ones_like(y))
before = set(sys.modules)
times = []
for i in range(6):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
    if i == 0:
        new = set(sys.modules) - before
first, warm = times[0], sorted(times[1:])[len(times[1:]) // 2]
print(__import__("json").dumps(dict(function=fn, op=op, first_ms=first * 1e3, warm_ms=warm * 1e3, ratio=first / warm,
      dynamo="torch._dynamo" in new, sympy="sympy" in new, new_modules=len(new))))
"""

FUNCS = ("hm", "lphm", "dual_lphm", "lorr", "random_matrix_adaption", "duplicated_padding",
         "duplicated_diagonal_padding", "dense")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--functions", nargs="*", default=FUNCS)
    ap.add_argument("--ops", nargs="*", default=("fwd", "train"))
    ap.add_argument("--preimport", action="store_true",
                    help="import torch.fx.experimental.symbolic_shapes (sympy) before the clock starts")
    args = ap.parse_args()
    for f in args.functions:
        for op in args.ops:
            out = subprocess.run([sys.executable, "-c", CODE, f, op, str(int(args.preimport))], capture_output=True, text=True)
            if out.returncode:
                print(f, op, "failed:", out.stderr.strip().splitlines()[-1])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{f:30s} {op:5s} first {r['first_ms']:8.1f} ms  warm {r['warm_ms']:8.1f} ms  "
                  f"x{r['ratio']:5.2f}  imports dynamo={r['dynamo']} sympy={r['sympy']} ({r['new_modules']} modules)")


if __name__ == "__main__":
    main()
