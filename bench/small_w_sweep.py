"""Where building W and one F.linear stops beating the structured apply (``base.BUILD_BELOW``):
both paths of ``apply`` (default backend and layout, batch 64, fp32), fwd and train, interleaved,
at growing n*D. Prints structured / small-W time (> 1: the small-W path is faster).

    python bench/small_w_sweep.py
"""
import statistics

import torch

from tinyrecon import base
from tinyrecon.benchmark import timing
from tinyrecon.benchmark.cases import make_function

SIZES = [(8, 32), (16, 64), (32, 128), (64, 256), (64, 1024)]
FUNCS = ("lorr", "hm", "dual_lphm", "duplicated_padding", "random_matrix_adaption")


def main():
    mode = timing.Mode(budget_s=0.2, min_reps=7, max_reps=40, max_call_s=5.0)
    dev = torch.device("cpu")
    print("structured / small-W (median of 3 interleaved runs); n*D:", [n * D for n, D in SIZES])
    for f in FUNCS:
        for op in ("fwd", "train"):
            row = []
            for n, D in SIZES:
                rec = make_function(f)
                w = torch.randn(rec.calculate_l(n, D), requires_grad=op == "train")
                b = torch.randn(n, requires_grad=op == "train")
                x = torch.randn(64, D)

                def call(below):
                    def run():
                        keep, base.BUILD_BELOW = base.BUILD_BELOW, below
                        try:
                            if op == "fwd":
                                with torch.no_grad():
                                    return rec.apply(x, w, n=n, bias=b)
                            y = rec.apply(x, w, n=n, bias=b)
                            return torch.autograd.grad(y, (w, b), torch.ones_like(y))
                        finally:
                            base.BUILD_BELOW = keep
                    return run
                r = []
                for _ in range(3):
                    t = timing.time_interleaved({"small": call(1 << 40), "structured": call(0)}, dev, mode)
                    r.append(t["structured"] / t["small"])
                row.append(statistics.median(r))
            print(f"{f:24s} {op:5s} " + " ".join(f"{v:6.2f}" for v in row))


if __name__ == "__main__":
    main()
